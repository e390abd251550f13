"""Deploy the chat app as a Hugging Face Docker Space pointed at the model repo: push the model
first if the hub does not have it, then create or update the Space so it holds exactly the app
bundle plus a README with the Space's front matter, set its variables (MODEL_ID,
MODEL_REVISION) and, only for a private model, the HF_TOKEN secret the app reads it with; with
API_KEY exported, the API_KEY secret that guards the app's /v1 API.

On CPU hardware (HARDWARE=cpu-basic ...) the Space serves the GGUF from `make gguf` through llama.cpp:
RUN/gguf/model-QUANT.gguf and its chat_family.json go to the model repo's gguf/ folder, and the
Space is built from Dockerfile.cpu, whose start (deploy/start_cpu.py) fetches them."""
import json
import math
import os
import shlex
import struct
from pathlib import Path

import yaml
from huggingface_hub import HfApi, SpaceHardware

from deploy import DeployError
from deploy.bundle import app_files
from deploy.gguf import gguf_path
from deploy.hf import model_files, model_on_hub, push_model, repo_url, sync_files
from deploy.llamacpp_server import FAMILY_FILE
from deploy.start_cpu import HUB_FOLDER

APP_PORT = 7860          # the port app.py listens on in the image (Dockerfile, GRADIO_SERVER_PORT)
# Up to ~0.5B parameters (SmolLM2-135M) a model answers at a readable pace on the free 2-vCPU
# cpu-basic; InternLM2-Chat-1.8B in fp16 wants a GPU.
CPU_MAX_PARAMS = 500_000_000
HARDWARE = sorted(h.value for h in SpaceHardware)
CPU_HARDWARE = [h for h in HARDWARE if h.startswith("cpu-")]  # served by llama.cpp from a GGUF
# The Space reads a private model with this token; export it to give the Space a read-only token
# instead of the write token used for the upload. The upload token itself goes to the Space only
# when it is read-only, or when SPACE_WRITE_TOKEN=1 asks for it (a public app holding a write token
# would let whoever breaks into it rewrite the model).
SPACE_TOKEN_VAR = "SPACE_HF_TOKEN"
WRITE_TOKEN_VAR = "SPACE_WRITE_TOKEN"


def check_hardware(hardware: str) -> str:
    if hardware and hardware not in HARDWARE:
        raise DeployError(f"HARDWARE={hardware!r} is not a Space hardware: use one of {', '.join(HARDWARE)}")
    return hardware


def parameter_count(folder: Path) -> int | None:
    """Parameters in the folder's safetensors files, from their headers (no weights read)."""
    total, shards = 0, sorted(folder.glob("*.safetensors"))
    for shard in shards:
        with open(shard, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, tensor in header.items():
            if name != "__metadata__":
                total += math.prod(tensor["shape"])
    return total if shards else None


def suggest_hardware(merged: Path) -> str:
    """Free CPU hardware for small models, a T4 otherwise (or when the size is unknown)."""
    params = parameter_count(merged) if merged.is_dir() else None
    return "cpu-basic" if params is not None and params <= CPU_MAX_PARAMS else "t4-small"


def gguf_files(run: Path, quant: str) -> dict[str, Path]:
    """{path in the model repo: local file} of the GGUF a CPU Space serves; refused, with the
    command that makes it, when `make gguf` has not made it."""
    gguf = gguf_path(run, quant)
    family = gguf.parent / FAMILY_FILE
    if not (gguf.is_file() and family.is_file()):
        raise DeployError(f"{gguf if not gguf.is_file() else family} is missing: a Space on CPU hardware "
                          f"serves the {quant} GGUF through llama.cpp. Make it first with "
                          f"`make gguf RUN={shlex.quote(str(run))} QUANT={quant}`, then deploy again")
    return {f"{HUB_FOLDER}/{gguf.name}": gguf, f"{HUB_FOLDER}/{FAMILY_FILE}": family}


def space_readme(name: str, repo_id: str, revision: str, hardware: str, gguf: str = "") -> str:
    front = {"title": f"{name}'s assistant", "emoji": "💬", "colorFrom": "blue", "colorTo": "indigo",
             "sdk": "docker", "app_port": APP_PORT, "suggested_hardware": hardware,
             "models": [repo_id], "pinned": False}
    return f"""---
{yaml.safe_dump(front, allow_unicode=True, sort_keys=False)}---

# {name}'s assistant

A streaming chat with [{repo_id}]({repo_url(repo_id)}) (branch `{revision}`), built from the
kit's Dockerfile{f" (CPU: llama.cpp serving its `{gguf}`)" if gguf else ""}. The app reads its model from the Space variables `MODEL_ID` and
`MODEL_REVISION`; a private model is read with the `HF_TOKEN` secret. The OpenAI-compatible API
is at `/v1` (with an `API_KEY` secret set, it wants `Authorization: Bearer <key>`).
"""


def space_token(api: HfApi, repo_id: str) -> str:
    """The token the Space reads the private `repo_id` with: SPACE_HF_TOKEN, else the upload
    token if it is read-only or SPACE_WRITE_TOKEN=1 allows a write token."""
    if os.environ.get(SPACE_TOKEN_VAR):
        return os.environ[SPACE_TOKEN_VAR]
    role = api.whoami().get("auth", {}).get("accessToken", {}).get("role")
    if role == "read" or os.environ.get(WRITE_TOKEN_VAR) == "1":
        return api.token
    raise DeployError(f"{repo_id} is private and the Space needs a token to read it, but your token "
                      f"can write ({role or 'unknown'} role): export {SPACE_TOKEN_VAR}=<a read-only "
                      f"token> (huggingface.co/settings/tokens), or {WRITE_TOKEN_VAR}=1 to give the "
                      "Space your write token anyway")


def deploy_space(api: HfApi, run: Path, repo_id: str, space_id: str, name: str, private: bool,
                 revision: str, hardware: str, quant: str = "q8_0") -> str:
    """Returns the Space's commit."""
    cpu = hardware in CPU_HARDWARE
    bundle = app_files(dockerfile=True, cpu=cpu)
    gguf = gguf_files(run, quant) if cpu else {}
    existing = model_on_hub(api, repo_id, revision)
    if existing:
        print(f"model already on the hub: {repo_url(repo_id)} ({revision}, commit {existing}); "
              "`make push` updates it")
    else:
        print(f"{repo_id} has no model on {revision} yet: pushing {run / 'merged'} first")
        push_model(api, model_files(run, repo_id, revision), repo_id, private, revision)
    if gguf:
        sync_files(api, repo_id, "model", revision, gguf, f"Upload the {quant} GGUF for llama.cpp",
                   folder=f"{HUB_FOLDER}/")
    model_private = api.model_info(repo_id).private
    token = space_token(api, repo_id) if model_private else None  # before the Space exists

    api.create_repo(space_id, repo_type="space", space_sdk="docker", exist_ok=True)
    sdk = api.space_info(space_id).sdk
    if sdk != "docker":
        raise DeployError(f"SPACE={space_id} exists with sdk {sdk!r}; this deploy needs a Docker Space: "
                          "pick another SPACE name")
    # Settings first: the upload below starts the build, which then already sees them.
    api.add_space_variable(space_id, "MODEL_ID", repo_id, description="model repo the app serves")
    api.add_space_variable(space_id, "MODEL_REVISION", revision, description="branch or commit of MODEL_ID")
    if gguf:
        api.add_space_variable(space_id, "GGUF", f"/model/{gguf_path(run, quant).name}",
                               description=f"the GGUF fetched from MODEL_ID's {HUB_FOLDER}/ (by its name)")
    if model_private:
        api.add_space_secret(space_id, "HF_TOKEN", token, description=f"reads the private model {repo_id}")
        print(f"{repo_id} is private: the Space reads it with the HF_TOKEN secret")
    if os.environ.get("API_KEY"):
        api.add_space_secret(space_id, "API_KEY", os.environ["API_KEY"],
                             description="Bearer key of the app's /v1 API")
        print("the Space's /v1 API wants the key in API_KEY (set as the API_KEY secret)")
    suggested = hardware or suggest_hardware(run / "merged")
    readme = space_readme(name, repo_id, revision, suggested, next(iter(gguf), ""))
    files = {**bundle, "README.md": readme.encode()}
    commit = sync_files(api, space_id, "space", "main", files, f"Deploy the chat app for {repo_id}")
    if hardware:
        runtime = api.request_space_hardware(space_id, hardware)
        print(f"requested hardware {runtime.requested_hardware or hardware} (billed by Hugging Face)")
    print(f"Space: {repo_url(space_id, 'space')}  commit: {commit} (it builds and starts in a few minutes)")
    return commit
