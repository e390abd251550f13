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
    for name, named_in in remote_code_files(path).items():
        if not (path / name).is_file():
            problems.append(f"{name} is missing: auto_map in {named_in} names it, and the model "
                            "cannot load without its code")
    return problems


def remote_code_files(path: str | Path) -> dict[str, str]:
    """The .py files the folder's own code lives in (InternLM2's modeling and tokenizer code):
    every module that `auto_map` names in config.json or tokenizer_config.json, mapped to the
    file naming it. References into another repo ("org/name--module.Class") are loaded from
    that repo, not from here."""
    files = {}
    for config_name in ("config.json", "tokenizer_config.json"):
        config = Path(path) / config_name
        if not config.is_file():
            continue
        for value in json.loads(config.read_text(encoding="utf-8")).get("auto_map", {}).values():
            for reference in value if isinstance(value, list) else [value]:
                if reference and "--" not in reference:
                    files.setdefault(reference.rsplit(".", 1)[0] + ".py", config_name)
    return files


def require_complete_model(path: str | Path) -> Path:
    problems = model_folder_problems(path)
    if problems:
        raise IncompleteModel(f"{path} is not a complete model folder: " + "; ".join(problems))
    return Path(path)
