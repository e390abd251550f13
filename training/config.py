"""Render the XTuner config: xtuner's stock recipe + the overrides in recipe.toml + this run's
values (base model, data, evaluation questions). Writes RUN/config.py and RUN/run.json."""
import ast
import json
import tempfile
import tomllib
from pathlib import Path

from training.atomic import write_text_atomic

RECIPE = Path(__file__).with_name("recipe.toml")
PROFILES = ("gpu", "cpu")
EVALUATION_INPUTS = ["请介绍一下你自己", "Please introduce yourself"]


def load_recipe() -> dict:
    return tomllib.loads(RECIPE.read_text(encoding="utf-8"))


def resolve_profile(profile: str) -> str:
    if profile in ("", "auto"):
        import torch
        return "gpu" if torch.cuda.is_available() else "cpu"
    if profile not in PROFILES:
        raise ValueError(f"unknown PROFILE={profile!r}: use one of {', '.join(PROFILES)} or auto")
    return profile


def template_path(recipe: dict) -> Path:
    import xtuner
    return Path(xtuner.__file__).parent / "configs" / recipe["template"]


def replace_settings(source: str, settings: dict) -> str:
    """Rewrite top-level `name = value` lines of a config's source. A name the template does not
    assign is an error, so a typo in the recipe cannot silently do nothing."""
    lines = source.splitlines(keepends=True)
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id in settings:
            found[node.targets[0].id] = node
    missing = set(settings) - set(found)
    if missing:
        raise ValueError(f"recipe settings not assigned in the template: {sorted(missing)}")
    for name, node in sorted(found.items(), key=lambda item: -item[1].lineno):
        first, last = node.lineno - 1, node.end_lineno - 1
        lines[first:last + 1] = [f"{name} = {settings[name]!r}\n"]
    return "".join(lines)


def parent_of(cfg, dotted: str):
    """The container holding a dotted key, and the key's last part (an index inside lists)."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node, int(leaf) if isinstance(node, list) else leaf


def set_key(cfg, dotted: str, value) -> None:
    node, leaf = parent_of(cfg, dotted)
    node[leaf] = value


def delete_key(cfg, dotted: str) -> None:
    node, leaf = parent_of(cfg, dotted)
    if leaf not in node:
        raise KeyError(f"recipe deletes {dotted!r}, which the template does not have")
    del node[leaf]


def render(profile: str, base_model: str, data_file: str, run_dir: str | Path,
           epochs: str = "", lr: str = "", save_steps: str = ""):
    """Return the rendered mmengine Config (not yet written)."""
    from mmengine.config import Config

    recipe = load_recipe()
    settings = {**recipe["common"]["settings"], **recipe[profile]["settings"],
                "pretrained_model_name_or_path": base_model,
                "evaluation_inputs": EVALUATION_INPUTS}
    if epochs:
        settings["max_epochs"] = positive(int, "EPOCHS", epochs)
    if lr:
        settings["lr"] = positive(float, "LR", lr)
    if save_steps:
        settings["save_steps"] = settings["evaluation_freq"] = positive(int, "SAVE_STEPS", save_steps)
    source = replace_settings(template_path(recipe).read_text(encoding="utf-8"), settings)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.py"
        path.write_text(source, encoding="utf-8")
        cfg = Config.fromfile(path)
    for section in (recipe["common"], recipe[profile]):
        for key, value in section.get("set", {}).items():
            set_key(cfg, key, value)
        for key in section.get("delete", {}).get("keys", []):
            delete_key(cfg, key)
    set_key(cfg, "train_dataloader.dataset.dataset.data_files", {"train": str(Path(data_file).resolve())})
    cfg.work_dir = str(Path(run_dir).resolve() / "work")
    return cfg


def number(kind, knob: str, text: str):
    """A knob's value as `kind`, or an error naming the knob."""
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{knob}={text!r} is not a number") from None


def positive(kind, knob: str, text: str):
    value = number(kind, knob, text)
    if not value > 0:
        raise ValueError(f"{knob}={text} must be > 0")
    return value


def write(cfg, run_dir: str | Path, run_info: dict) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "config.py"
    tmp = out.with_name(".config.partial.py")  # mmengine picks the format by suffix
    cfg.dump(str(tmp))
    tmp.replace(out)
    write_text_atomic(run_dir / "run.json", json.dumps(run_info, ensure_ascii=False, indent=2) + "\n")
    return out
