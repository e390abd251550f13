"""Load a chat model from a local folder, a Hugging Face Hub repo or an OpenXLab repo, straight
into the dtype and device it will run in (no fp32 copy on the way: a 1.8B model in fp32 is 7 GB).

    loaded = load_model("runs/assistant/merged")          # or "you/assistant-model", ...
"""
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from transformers import AutoModelForCausalLM, AutoTokenizer

from chat import openxlab
from chat.repo_ids import looks_like_hub_id
from chat.model_files import IncompleteModel, require_complete_model
from chat import formats

SOURCES = ("auto", "local", "hf", "openxlab")
# Downloads go over plain HTTP, not Xet, even with hf_xet installed: the path the tests run
# against a local Hub (Xet needs Hugging Face's storage servers). docs/publishing.md: "Hub transfers".
constants.HF_HUB_DISABLE_XET = True
# What a model folder needs; other weight formats (.bin, .h5, .gguf, ...) are never downloaded.
HUB_FILES = ["*.json", "*.safetensors", "*.py", "*.model", "*.tiktoken", "*.txt"]
ASSISTANT_FILE = "assistant.json"  # whose assistant a merged model is: {"name", "author"}
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}


class ModelLoadError(ValueError):
    """The model cannot be loaded; the message says what to change."""


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    model_id: str
    device: str
    dtype: str
    format: formats.ChatFormat
    stop_ids: list[int]
    assistant: dict  # {"name", "author"} from the kit's merged folders; {} for other models

    @property
    def context(self) -> int:
        """Tokens the model can attend to (prompt + answer)."""
        return self.model.config.max_position_embeddings


def load_model(model_id: str, source: str = "auto", revision: str | None = None,
               token: str | None = None, device: str | None = None,
               dtype: str | None = None, template: str = "") -> LoadedModel:
    """Fetch `model_id` (see `resolve_source`) and load model + tokenizer for chat.
    `device`: cpu | cuda | cuda:N (default: cuda when available); `dtype`: bfloat16 | float16 |
    float32 (default: bf16 on GPUs that support it, else fp16; fp32 on CPU); `template`: a chat
    format name (chat/formats.py) for a tokenizer the kit cannot recognise."""
    folder = fetch(model_id, resolve_source(model_id, source), revision or None, token or None)
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    remote = needs_remote_code(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
        # device_map places each weight on `device` as it is read, in `dtype`.
        model = AutoModelForCausalLM.from_pretrained(
            folder, torch_dtype=getattr(torch, dtype), device_map=device,
            low_cpu_mem_usage=True, trust_remote_code=remote)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"could not load the model in {folder}: {e}") from e
    model.eval()
    try:
        fmt = formats.detect(tokenizer, template)
        stops = formats.stop_ids(tokenizer, fmt)
    except formats.UnknownFormat as e:
        raise ModelLoadError(f"{folder}: {e}") from None
    assistant = folder / ASSISTANT_FILE
    about = json.loads(assistant.read_text(encoding="utf-8")) if assistant.is_file() else {}
    return LoadedModel(model, tokenizer, model_id, device, dtype, fmt, stops, about)


def resolve_source(model_id: str, source: str = "auto") -> str:
    """auto: an existing folder is local, an OpenXLab git URL is openxlab, owner/name is hf."""
    if source not in SOURCES:
        raise ModelLoadError(f"MODEL_SOURCE={source!r}: use one of {', '.join(SOURCES)}")
    if not model_id:
        raise ModelLoadError("MODEL_ID is empty: give a model folder, a hub repo id (owner/name) "
                             "or an OpenXLab repo")
    if source != "auto":
        return source
    if Path(model_id).expanduser().is_dir():
        return "local"
    if "openxlab.org.cn" in model_id:
        return "openxlab"
    if looks_like_hub_id(model_id):
        return "hf"
    raise ModelLoadError(f"MODEL_ID={model_id}: no such folder, and not a hub repo id like "
                         "owner/name")


def fetch(model_id: str, source: str, revision: str | None, token: str | None) -> Path:
    """A complete local model folder for `model_id`, downloaded into the cache when remote."""
    if source == "local":
        if revision:
            raise ModelLoadError(f"MODEL_REVISION={revision} only applies to hub repos; "
                                 f"{model_id} is a local folder")
        folder = Path(model_id).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"MODEL_ID={model_id}: no such folder")
    elif source == "hf":
        folder = hf_snapshot(model_id, revision, token)
    else:
        folder = openxlab_snapshot(model_id, revision)
    try:
        return require_complete_model(folder)
    except IncompleteModel as e:
        raise ModelLoadError(str(e)) from None


def hf_snapshot(repo_id: str, revision: str | None, token: str | None) -> Path:
    """Download (or reuse the cached) `repo_id` at `revision`. The client talks to HF_ENDPOINT
    (default huggingface.co) and, when `token` is None, authenticates with HF_TOKEN."""
    where = f"{repo_id} on {constants.ENDPOINT}"
    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token,
                                      allow_patterns=HUB_FILES))
    except RevisionNotFoundError:
        raise ModelLoadError(f"MODEL_REVISION={revision}: no such branch, tag or commit in "
                             f"{where}") from None
    except GatedRepoError:
        raise ModelLoadError(f"{where} is gated: accept its terms on the website and set HF_TOKEN "
                             "to a token of that account") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"model repo {where} not found (if it is private, set HF_TOKEN to a "
                             "token that can read it)") from None
    except LocalEntryNotFoundError:
        raise ModelLoadError(f"cannot reach {constants.ENDPOINT} to download {repo_id}, and it is "
                             "not in the local cache") from None


def openxlab_snapshot(model_id: str, revision: str | None) -> Path:
    """Clone (or update) the model's git repo into the cache and check out `revision` (default:
    the remote's default branch) with its git-lfs files. `model_id` is owner/name (a repo on
    OPENXLAB_GIT_ENDPOINT, default https://code.openxlab.org.cn) or a git URL."""
    url = openxlab.repo_url(model_id) if looks_like_hub_id(model_id) else model_id
    if not shutil.which("git-lfs"):
        raise ModelLoadError("OpenXLab models are git-lfs repos: install git-lfs "
                             "(apt-get install git-lfs)")
    slug = re.sub(r"[^\w.-]+", "--", re.sub(r"^\w+://", "", url).removesuffix(".git")).strip("-")
    folder = cache_dir() / "openxlab" / slug
    if (folder / ".git").is_dir():
        git(["fetch", "--tags", "--force", "origin"], folder, f"could not fetch {url}")
    else:
        # Clone beside the final folder and rename, so a failed clone leaves no half repo behind.
        partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        git(["clone", "--no-checkout", url, str(partial)], None, f"could not clone {url}")
        partial.rename(folder)
    ref = revision or "origin/HEAD"
    git(["checkout", "--force", "--detach", ref], folder,
        f"MODEL_REVISION={revision}: no such branch, tag or commit in {url}" if revision
        else f"could not check out {url}")
    git(["lfs", "pull"], folder, f"could not fetch the git-lfs files of {url}")
    for weights in folder.glob("*.safetensors"):
        with open(weights, "rb") as f:
            if f.read(24).startswith(b"version https://git-lfs"):
                raise ModelLoadError(f"{weights} is still a git-lfs pointer after `git lfs pull`")
    return folder


def git(args: list[str], cwd: Path | None, failure: str) -> None:
    # Smudging during checkout would need `git lfs install`; `git lfs pull` fetches explicitly.
    env = {**os.environ, "GIT_LFS_SKIP_SMUDGE": "1", "GIT_TERMINAL_PROMPT": "0"}
    result = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ModelLoadError(f"{failure}: {detail}")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "assistant-kit"


def pick_device(device: str | None) -> str:
    if not device or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ModelLoadError(f"DEVICE={device!r}: use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"DEVICE={device} but torch sees no CUDA GPU (use DEVICE=cpu)")
    return device


def pick_dtype(dtype: str | None, device: str) -> str:
    if not dtype or dtype == "auto":
        if not device.startswith("cuda"):
            return "float32"  # fp16/bf16 matmuls on CPUs are slow or missing
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dtype not in DTYPES:
        raise ModelLoadError(f"DTYPE={dtype!r}: use one of auto, bfloat16, float16, float32")
    return DTYPES[dtype]


def needs_remote_code(folder: Path) -> bool:
    """InternLM2 ships its modeling and tokenizer code in the repo (named by `auto_map`); models
    transformers knows natively (the tiny Llama) must not run repo code."""
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file() and "auto_map" in json.loads(path.read_text(encoding="utf-8")):
            return True
    return False

