"""What a complete model folder is. Steps refuse incomplete folders instead of using them
(merge before swapping its output in, push before uploading anything)."""
import json
import os
from pathlib import Path


class IncompleteModel(ValueError):
    pass


def model_folder_problems(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a directory"]
    problems = []
    if not (path / "config.json").is_file():
        problems.append("config.json is missing")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        for shard in sorted(shards):
            shard_path = path / shard
            if not shard_path.is_file() or shard_path.stat().st_size == 0:
                problems.append(f"shard {shard} named in model.safetensors.index.json is missing")
            elif not os.access(shard_path, os.R_OK):
                problems.append(f"shard {shard} is not readable by this user (uid {os.getuid()}): "
                                "check its permissions (chmod -R a+rX)")
    elif not (path / "model.safetensors").is_file():
        problems.append("no model.safetensors or model.safetensors.index.json")
    config = path / "tokenizer_config.json"
    if not config.is_file():
        problems.append("tokenizer_config.json is missing")
    elif "chat_template" not in json.loads(config.read_text(encoding="utf-8")):
        problems.append("tokenizer_config.json has no chat_template")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        problems.append("no tokenizer.json or tokenizer.model")
    return problems


def require_complete_model(path: str | Path) -> Path:
    problems = model_folder_problems(path)
    if problems:
        raise IncompleteModel(f"{path} is not a complete model folder: " + "; ".join(problems))
    return Path(path)
