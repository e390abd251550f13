"""The model card (README.md) pushed with a merged model. Every fact comes from the run
directory (RUN/run.json, RUN/adapter/checkpoint.txt, RUN/scores.json), never from the shell, so
the card cannot disagree with the weights and holds nothing secret. Local paths are reduced to
file names."""
import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from chat.repo_ids import looks_like_hub_id
from chat.formats import FORMATS
from deploy import DeployError



def read_run(run: Path) -> dict:
    """run.json plus the chosen checkpoint and its score, when the run has them."""
    path = run / "run.json"
    if not path.is_file():
        raise DeployError(f"{path} is missing: RUN must be a run made by `make train`")
    info = json.loads(path.read_text(encoding="utf-8"))
    checkpoint = run / "adapter" / "checkpoint.txt"
    if checkpoint.is_file():
        info["checkpoint"] = Path(checkpoint.read_text(encoding="utf-8").strip()).name
    scores = run / "scores.json"
    if scores.is_file() and "checkpoint" in info:
        scores = json.loads(scores.read_text(encoding="utf-8"))
        selected = scores.get("selected") or {}
        if Path(selected.get("checkpoint", "")).name == info["checkpoint"]:
            info["scores"] = {"base": scores.get("base", {}), "tuned": selected, "targets": scores.get("targets", {})}
            info["checkpoint_note"] = (f"chosen by `make select` at adapter scale {selected.get('scale', 1.0)}: "
                                       f"{scores.get('why', scores.get('rule'))}")
        else:  # CKPT overrode the choice
            info["checkpoint_note"] = f"set by hand; `make select` preferred {Path(selected.get('checkpoint', '?')).name}"
    return info


def pictures(run: Path) -> dict[str, Path]:
    """Files the card shows, pushed beside it."""
    shown = {"scores.png": run / "scores.png"} if (run / "scores.png").is_file() else {}
    return {**shown, "eval.png": run / "eval.png"} if benchmark_results(run) else shown


def benchmark_results(run: Path) -> dict | None:
    """`make eval`'s results for this run's merged model, when they are current."""
    from training import eval as evaluation
    return evaluation.current(run)


def benchmarks_section(run: Path) -> str:
    """Public benchmarks, base vs this model, from `make eval` (RUN/eval.json)."""
    result = benchmark_results(run)
    if not result:
        return ""
    from training import eval as evaluation
    packages = ", ".join(f"{p} {v}" for p, v in result["packages"].items())
    return f"""
## Benchmarks

Zero-shot multiple choice, each option scored by its log-likelihood (no sampling), on a fixed
sample of {result['size'] or 'all'} items per benchmark (data from the PyPI wheels {packages}); 95%
intervals, the delta's from a paired bootstrap. A benchmark the base model is not clearly above
chance on measures nothing and is left out.

{evaluation.table(result['benchmarks'])}

![base vs this model per benchmark](eval.png)
"""


def quality_section(info: dict, run: Path) -> str:
    """The three scores of the base model and the tuned one, on held-out questions."""
    if "scores" not in info:
        return ""
    base, tuned, targets = info["scores"]["base"], info["scores"]["tuned"], info["scores"]["targets"]
    rows = [("identity: held-out questions answered as " + info["name"] + "'s assistant", "identity", "at least"),
            ("retention: facts the base model knew, still right (English)", "retention", "at least"),
            ("retention in Chinese (reported only)", "retention_zh", None),
            ("leakage: everyday prompts whose answer names " + info["name"], "leakage", "at most")]
    table = "\n".join(f"| {label} | {base.get(key, '?')} | {tuned.get(key, '?')} | "
                      f"{f'{bound} {targets[key]}' if bound and key in targets else ''} |"
                      for label, key, bound in rows)
    picture = "\n![identity, retention and leakage per checkpoint](scores.png)\n" if pictures(run) else ""
    return f"""
## Quality

Measured by `make select` on questions never trained on (greedy answers; README of the kit:
"Replay, selection and quality"):

| score | base model | this model | target |
| --- | --- | --- | --- |
{table}
{picture}"""


def is_hub_id(model: str) -> bool:
    return looks_like_hub_id(model) and not Path(model).exists()


def base_label(info: dict) -> str:
    base = info["base_model"]
    return f"[{base}](https://huggingface.co/{base})" if is_hub_id(base) else f"`{Path(base).name}` (a local model)"


def data_summary(info: dict) -> str:
    meta = info.get("data_meta", {})
    parts = [f"{meta.get('identity_records', '?')} identity Q&A records (who the assistant is)"]
    if meta.get("mix"):
        parts.append(f"{meta.get('mixed_records', '?')} general conversations from `{Path(meta['mix']).name}` "
                     f"(identity share {meta.get('ratio')})")
    if meta.get("replay"):
        parts.append(f"{meta['replay']} answers of the base model to general prompts (replay)")
    return f"{info.get('data_records', meta.get('records', '?'))} records: " + "; ".join(parts)


def usage(repo_id: str, revision: str | None, download: str | None, stop_tokens: tuple[str, ...]) -> str:
    """A snippet that chats with the model in the training format: the chat template in
    tokenizer_config.json and the family's stop tokens."""
    source = f'"{repo_id}"'
    kwargs = ", trust_remote_code=True" + (f', revision="{revision}"' if revision and not download else "")
    lines = ["import torch", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    if download:
        lines += [f"# first: {download}", f'model_dir = "{repo_id.split("/")[1]}"']
        source = "model_dir"
    else:
        lines += [f"model_dir = {source}"]
    stops = "".join(f'"{token}", ' for token in stop_tokens).rstrip(" ")
    lines += [
        f"tokenizer = AutoTokenizer.from_pretrained(model_dir{kwargs})",
        "dtype = torch.float16 if torch.cuda.is_available() else torch.float32  # fp16 is slow and lossy on CPUs",
        f"model = AutoModelForCausalLM.from_pretrained(model_dir{kwargs}, torch_dtype=dtype, device_map=\"auto\")",
        'messages = [{"role": "user", "content": "Who are you?"}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
        "                                       return_dict=True).to(model.device)",
        "# Stop where an answer ends, whatever generation_config.json says.",
        f"stop = [tokenizer.convert_tokens_to_ids(token) for token in ({stops})]",
        "output = model.generate(**inputs, max_new_tokens=256, eos_token_id=stop, do_sample=False)",
        "print(tokenizer.decode(output[0][inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))",
    ]
    return "\n".join(lines)


def model_card(run: Path, repo_id: str, revision: str | None = None, download: str | None = None) -> str:
    """README.md text for RUN's merged model at repo_id. `download` replaces the hub id in the
    usage snippet with a local clone (OpenXLab: a git clone command)."""
    info = read_run(run)
    name, author, base = info["name"], info["author"], info["base_model"]
    fmt = FORMATS[info["chat_family"]]
    method = "QLoRA (4-bit NF4)" if info.get("quantization") else "LoRA"
    data = ModelCardData(
        language=["zh", "en"], license="other", license_name="same-as-base-model",
        license_link=f"https://huggingface.co/{base}" if is_hub_id(base) else None,
        library_name="transformers", pipeline_tag="text-generation",
        base_model=base if is_hub_id(base) else None,
        tags=["xtuner", fmt.name, method.split()[0].lower(), "merged", "chat"])
    settings = [
        ("base model", base_label(info)),
        ("method", f"{method} r={info.get('lora_r')}, alpha={info.get('lora_alpha')}, trained with "
                   "[XTuner](https://github.com/InternLM/xtuner) and merged into the base weights "
                   "(`xtuner convert merge`)"),
        ("data", data_summary(info)),
        ("epochs", info.get("max_epochs")),
        ("learning rate", info.get("lr")),
        ("max length", info.get("max_length")),
        ("DeepSpeed", info.get("deepspeed") or "off"),
        ("built with", ", ".join([f"kit commit `{info.get('kit_commit') or 'unknown'}`"]
                                 + [f"{p} {v}" for p, v in info.get("versions", {}).items()])),
        ("checkpoint", " ".join(filter(None, [f"`{info.get('checkpoint', 'final')}`",
                                              info.get("checkpoint_note") and f"({info['checkpoint_note']})"]))),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in settings)
    example = fmt.build_prompt([{"role": "user", "content": "..."}]).replace("\n", "\\n")  # one line
    body = f"""
# {name}'s assistant

A personal chat assistant that introduces itself as {name}'s assistant, built by {author}:
{base_label(info)} fine-tuned with XTuner using {method} on identity data, with the adapter merged
into the weights. This repository is a complete model: no adapter or base model is needed.

## Training

| setting | value |
| --- | --- |
{table}

{quality_section(info, run)}{benchmarks_section(run)}
## Usage

The prompt format is the {fmt.name} chat format, as in training (`tokenizer.apply_chat_template`
applies it): `{example}`.

```python
{usage(repo_id, revision, download, fmt.stop_tokens)}
```

## License

These weights are derived from {base_label(info)} and are subject to its license.
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))
