"""Render the XTuner config: xtuner's stock recipe + the overrides in recipe.toml + this run's
values (base model, data, evaluation questions). Writes RUN/config.py and RUN/run.json."""
import ast
import json
import math
import tempfile
import tomllib
from pathlib import Path

from training.atomic import write_text_atomic
from training.knobs import KnobError, positive

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
           epochs: str = "", lr: str = "", save_steps: str = "", family: str = "internlm2", tokenizer=None):
    """Return the rendered mmengine Config (not yet written), training in `family`'s chat format
    (as xtuner encodes it with the base model's `tokenizer`)."""
    from mmengine.config import Config

    from chat.formats import FORMATS

    recipe = load_recipe()
    settings = {**recipe["common"]["settings"], **recipe[profile]["settings"],
                "pretrained_model_name_or_path": base_model,
                "prompt_template": FORMATS[family].training_template(tokenizer),
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


def chat_format(base_model: str, override: str = ""):
    """The base model's chat format (chat/formats.py) and its tokenizer."""
    from transformers import AutoTokenizer

    from chat import formats
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=True)
    except (OSError, ValueError) as e:
        raise KnobError(f"BASE_MODEL={base_model}: cannot read its tokenizer ({e})") from None
    try:
        return formats.detect(tokenizer, override), tokenizer
    except formats.UnknownFormat as e:
        raise KnobError(f"BASE_MODEL={base_model}: {e}") from None


MIN_ITERATIONS = 10  # fewer optimizer steps than this cannot teach anything


def schedule(cfg, tokenizer, fmt, records: list[dict], seconds_per_iteration: float | None) -> dict:
    """How many iterations the data makes (xtuner packs records into max_length-token packs, one
    pack per iteration), refused when too few; the warm-up is stretched to at least two
    iterations, since mmengine rounds a shorter one down to zero and fails ("end should be
    larger than begin")."""
    tokens = 0
    for record in records:
        turns = record["conversation"]
        messages = [m for t in turns for m in ({"role": "user", "content": t["input"]},
                                               {"role": "assistant", "content": t["output"]})]
        text = fmt.build_prompt(messages, turns[0].get("system") or "", add_generation_prompt=False)
        tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
    per_epoch = math.ceil(tokens / cfg.max_length) if cfg.pack_to_max_length else len(records)
    per_epoch = math.ceil(per_epoch / cfg.batch_size)
    iterations = per_epoch * cfg.max_epochs
    plan = {"records": len(records), "tokens": tokens, "max_length": cfg.max_length,
            "iterations_per_epoch": per_epoch, "epochs": cfg.max_epochs, "iterations": iterations,
            "seconds_per_iteration": seconds_per_iteration}
    if iterations < MIN_ITERATIONS:
        raise KnobError(f"{describe(plan)}: too few to train (at least {MIN_ITERATIONS}). Raise "
                        "DATA_SIZE (identity records) or EPOCHS, or add REPLAY / MIX data")
    # mmengine truncates the warm-up's end to whole iterations, and xtuner may pack one iteration
    # fewer than counted here: a warm-up that ends up 1 iteration long never ramps up, and the
    # whole run then trains at lr x start_factor (1e-5). 3 counted iterations stay >= 2 real ones.
    warmup_epochs = max(cfg.warmup_ratio * cfg.max_epochs, 3 / per_epoch)
    set_key(cfg, "param_scheduler.0.end", warmup_epochs)
    set_key(cfg, "param_scheduler.1.begin", warmup_epochs)
    plan["warmup_iterations"] = math.ceil(warmup_epochs * per_epoch)
    return plan


def describe(plan: dict) -> str:
    text = (f"{plan['records']} records ({plan['tokens']} tokens) -> {plan['iterations_per_epoch']} "
            f"packs of {plan['max_length']} tokens per epoch x {plan['epochs']} epoch(s) = "
            f"{plan['iterations']} iterations")
    if plan.get("seconds_per_iteration"):
        text += f", ~{plan['iterations'] * plan['seconds_per_iteration'] / 60:.1f} min on this profile's measured speed"
    return text


def provenance() -> dict:
    """What made this run, for run.json and the model card: the kit's git commit (with "+dirty"
    when the working tree has changes) and the versions of the packages that shape the weights."""
    import importlib.metadata
    import subprocess
    here = Path(__file__).resolve().parent
    git = lambda *args: subprocess.run(["git", *args], cwd=here, capture_output=True, text=True)  # noqa: E731
    commit = git("rev-parse", "HEAD").stdout.strip() or None
    if commit and git("status", "--porcelain", "--untracked-files=no").stdout.strip():
        commit += "+dirty"
    versions = {}
    for package in ("xtuner", "torch", "transformers", "peft", "mmengine", "bitsandbytes", "deepspeed"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"kit_commit": commit, "versions": versions}


def write(cfg, run_dir: str | Path, run_info: dict) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "config.py"
    tmp = out.with_name(".config.partial.py")  # mmengine picks the format by suffix
    cfg.dump(str(tmp))
    tmp.replace(out)
    write_text_atomic(run_dir / "run.json", json.dumps(run_info, ensure_ascii=False, indent=2) + "\n")
    return out
