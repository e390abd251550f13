"""`make serve-engine`: serve a merged model from a real serving engine (OpenAI-compatible /v1,
/health) in the foreground; Ctrl-C stops it.

    SERVE_ENGINE=vllm MODEL_ID=runs/assistant/merged ENGINE_PORT=8000 python3 -m deploy.engine
    python3 -m deploy.engine --install      # only install this machine's engine build (CI, bench)
    SERVE_ENGINE=llamacpp MODEL_ID=runs/assistant/merged QUANT=q8_0 python3 -m deploy.engine
                                            # llama.cpp on the CPU: serves RUN/gguf/model-q8_0.gguf

The engine lives in its own venv (its pins fight the training stack's), so this runs in two
stages. Stage 1, under any python3 and the standard library only: check the knobs and the model
folder, pick the engine build for this machine (vLLM's CPU build without an NVIDIA GPU; vLLM or
LMDeploy with one) and install it once into its venv (a stamp file makes later starts fast).
Stage 2, re-run with that venv's python: read the model's chat format and stop tokens from its
tokenizer (chat/formats.py) and replace itself with the server, so Ctrl-C reaches the engine
directly. `command()` is the one place the engines' command lines are written (tests check it).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from chat.model_files import IncompleteModel, remote_code_files, require_complete_model
from deploy import DeployError

REPO = Path(__file__).resolve().parent.parent
ENGINES = ("vllm", "lmdeploy", "llamacpp")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Build:
    """One engine build: what it installs and where."""
    requirements: str
    venv: str
    note: str  # what the user waits for, shown before installing


BUILDS = {
    ("vllm", "cpu"): Build("requirements-engine.txt", ".venv-engine",
                           "vLLM's CPU build: 2-5 min and 3.4 GB, once"),
    ("vllm", "cuda"): Build("requirements-engine-cuda.txt", ".venv-engine-cuda",
                            "vLLM with CUDA: several minutes and ~10 GB, once"),
    ("lmdeploy", "cuda"): Build("requirements-engine-lmdeploy.txt", ".venv-engine-lmdeploy",
                                "LMDeploy with CUDA: several minutes and ~8 GB, once"),
    ("llamacpp", "cpu"): Build("requirements-engine-llamacpp.txt", ".venv-llamacpp",
                               "llama.cpp's CPU build (xllamacpp): seconds and 130 MB, once"),
}
# vLLM's CPU build pulls in CUDA builds of these, which crash on import there (DESIGN.md).
CPU_BUILD_REMOVES = ("torchvision", "torchaudio", "torchcodec")
# vLLM's CPU KV cache in GiB; 1 GiB holds 1024-token contexts for dozens of users of a small model.
CPU_KVCACHE_GIB = "1"
CPU_MAX_MODEL_LEN = 1024
CHAT_TEMPLATE = "chat_template.jinja"
# llama.cpp's parallel slots (users generating at once; later ones queue), each a whole context.
LLAMACPP_USERS = "4"


@dataclass(frozen=True)
class Knobs:
    engine: str
    device: str          # cpu | cuda once resolved
    model: Path | None   # None when only installing
    name: str            # the model id the engine's /v1/models shows
    host: str
    port: int
    max_model_len: int | None
    tp: int              # GPUs to split the model over (tensor parallel)

    @classmethod
    def from_env(cls, env=os.environ, need_model: bool = True) -> "Knobs":
        def number(key: str, default: int | None, low: int) -> int | None:
            raw = env.get(key, "").strip()
            if not raw:
                return default
            if not raw.isdigit() or int(raw) < low:
                raise DeployError(f"{key}={raw!r}: must be a whole number >= {low}")
            return int(raw)

        engine = env.get("SERVE_ENGINE", "vllm").strip()
        if engine not in ENGINES:
            raise DeployError(f"SERVE_ENGINE={engine!r}: use vllm, lmdeploy or llamacpp")
        device = env.get("ENGINE_DEVICE", "auto").strip() or "auto"
        if device not in DEVICES:
            raise DeployError(f"ENGINE_DEVICE={device!r}: use auto, cpu or cuda")
        if device == "auto":
            # The llama.cpp build the kit installs is CPU-only: the free-hardware path.
            device = "cpu" if engine == "llamacpp" else "cuda" if has_nvidia_gpu() else "cpu"
        if (engine, device) not in BUILDS:
            raise DeployError(f"SERVE_ENGINE={engine} needs an NVIDIA GPU (CUDA) and this machine "
                              "has none: use SERVE_ENGINE=vllm (its CPU build)")
        model = None
        if need_model and engine == "llamacpp":
            model = gguf_file(env.get("MODEL_ID", "").strip(), env.get("QUANT", "").strip() or "q8_0")
        elif need_model:
            model = model_folder(env.get("MODEL_ID", "").strip())
        port = number("ENGINE_PORT", 8000, 1)
        if port > 65535:
            raise DeployError(f"ENGINE_PORT={port}: must be at most 65535")
        default_len = CPU_MAX_MODEL_LEN if device == "cpu" else None
        return cls(engine, device, model, env.get("SERVED_MODEL_NAME", "").strip() or "assistant",
                   env.get("ENGINE_HOST", "").strip() or "127.0.0.1", port,
                   number("ENGINE_MAX_LEN", default_len, 16), number("ENGINE_TP", 1, 1))


def model_folder(model_id: str) -> Path:
    if not model_id:
        raise DeployError("MODEL_ID is empty: give the merged model folder (e.g. "
                          "runs/assistant/merged)")
    try:
        return require_complete_model(Path(model_id).expanduser().resolve())
    except IncompleteModel as e:
        raise DeployError(f"MODEL_ID={model_id}: {e} (serve-engine serves a local merged "
                          "folder; download a hub model first)") from None


def gguf_file(model_id: str, quant: str) -> Path:
    """llama.cpp serves a GGUF file: MODEL_ID itself, or the one `make gguf` wrote for the merged
    folder MODEL_ID (RUN/merged -> RUN/gguf/model-QUANT.gguf)."""
    path = Path(model_id).expanduser().absolute()  # RUN/merged may be a link: RUN/gguf is beside it
    if path.is_dir():
        path = path.parent / "gguf" / f"model-{quant}.gguf"
    if path.suffix != ".gguf" or not path.is_file():
        raise DeployError(f"MODEL_ID={model_id}: no GGUF file at {path}: run `make gguf "
                          f"QUANT={quant}` first (SERVE_ENGINE=llamacpp serves a .gguf)")
    return path.resolve()


def has_nvidia_gpu() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    try:
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and "GPU" in result.stdout


def command(knobs: Knobs, venv: Path, *, remote_code: bool, family: Path) -> tuple[list[str], dict]:
    """The server's command line and the environment it adds, for `knobs` on its device.
    `family` is the folder `write_family_files` filled for the model."""
    if knobs.engine == "llamacpp":
        # The kit's front for llama.cpp (deploy/llamacpp_server.py) renders every prompt itself.
        argv = [str(venv / "bin" / "python"), "-m", "deploy.llamacpp_server", str(knobs.model),
                knobs.name, knobs.host, str(knobs.port),
                str(knobs.max_model_len or CPU_MAX_MODEL_LEN), LLAMACPP_USERS]
        return argv, {"PYTHONPATH": str(REPO)}
    if knobs.engine == "lmdeploy":
        # LMDeploy recognises InternLM2 itself (chat template and stop words built in) and uses
        # the tokenizer's chat_template for other models, so it gets no template or stop flags.
        argv = [str(venv / "bin" / "lmdeploy"), "serve", "api_server", str(knobs.model),
                "--server-name", knobs.host, "--server-port", str(knobs.port),
                "--model-name", knobs.name, "--tp", str(knobs.tp)]
        if knobs.max_model_len:
            argv += ["--session-len", str(knobs.max_model_len)]
        return argv, {"HF_HUB_OFFLINE": "1"}
    argv = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(knobs.model), "--served-model-name", knobs.name,
            "--host", knobs.host, "--port", str(knobs.port),
            "--chat-template", str(family / CHAT_TEMPLATE),
            # Every request stops at the family's stop tokens (InternLM2: <|im_end|>, vllm#5777),
            # whatever the model folder's generation_config.json lists.
            "--generation-config", str(family)]
    if knobs.max_model_len:
        argv += ["--max-model-len", str(knobs.max_model_len)]
    if remote_code:
        argv.append("--trust-remote-code")
    env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    if knobs.device == "cpu":
        # The `vllm serve` CLI is broken in the CPU build; the module above is the same server.
        argv += ["--dtype", "float32", "--enforce-eager"]
        env["VLLM_CPU_KVCACHE_SPACE"] = CPU_KVCACHE_GIB
    else:
        argv += ["--tensor-parallel-size", str(knobs.tp)]
    return argv, env


def write_family_files(model: Path, venv: Path, chat_template: str, stop_ids: list[int]) -> Path:
    """A folder beside the engine holding the family's chat template and the model's
    generation_config.json with the family's stop ids as eos_token_id (vLLM stops at every
    eos_token_id there; the model folder itself may be read-only)."""
    folder = venv / "served" / hashlib.sha256(str(model).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CHAT_TEMPLATE).write_text(chat_template, encoding="utf-8")
    source = model / "generation_config.json"
    config = json.loads(source.read_text(encoding="utf-8")) if source.is_file() else {}
    config["eos_token_id"] = stop_ids
    (folder / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n",
                                                   encoding="utf-8")
    return folder


def install(build: Build, python: str) -> Path:
    """The build's venv, created and filled once; the stamp records what it was installed from."""
    venv = REPO / build.venv
    requirements = (REPO / build.requirements).read_text(encoding="utf-8")
    stamp = venv / ".engine-installed"
    if stamp.is_file() and stamp.read_text(encoding="utf-8") == requirements:
        return venv
    print(f"installing {build.note} into {build.venv} ...", file=sys.stderr, flush=True)
    steps = [[python, "-m", "venv", str(venv)],
             [str(venv / "bin" / "pip"), "install", "--progress-bar", "on", "-r",
              str(REPO / build.requirements)]]
    if build.venv == BUILDS[("vllm", "cpu")].venv:
        steps.append([str(venv / "bin" / "pip"), "uninstall", "-q", "-y", *CPU_BUILD_REMOVES])
    for step in steps:
        if subprocess.run(step).returncode != 0:
            raise DeployError(f"installing the engine failed at: {' '.join(step)}")
    stamp.write_text(requirements, encoding="utf-8")
    return venv


def stage_two(venv: Path, module: str, env: dict) -> None:
    """Become `python -m MODULE --in-venv` in `venv`, with the kit importable and `env` added."""
    python = venv / "bin" / "python"
    os.execve(python, [str(python), "-m", module, "--in-venv"],
              {**os.environ, **env, "PYTHONPATH": str(REPO)})


def serve(knobs: Knobs, venv: Path) -> None:
    """Stage 2 (in the engine's venv): read the chat format from the model's tokenizer, write its
    template where the engine reads it, and become the server. llama.cpp's front reads the
    family `make gguf` recorded beside the GGUF itself (its venv has no transformers)."""
    if knobs.engine == "llamacpp":
        argv, env = command(knobs, venv, remote_code=False, family=knobs.model.parent)
        os.execve(argv[0], argv, {**os.environ, **env})
    from transformers import AutoTokenizer

    from chat import formats

    remote_code = bool(remote_code_files(knobs.model))
    tokenizer = AutoTokenizer.from_pretrained(knobs.model, trust_remote_code=remote_code)
    try:
        fmt = formats.detect(tokenizer, os.environ.get("TEMPLATE", "").strip())
        stops = formats.stop_ids(tokenizer, fmt)
    except formats.UnknownFormat as e:
        raise DeployError(f"{knobs.model}: {e}") from None
    family = write_family_files(knobs.model, venv, fmt.chat_template, stops)
    argv, env = command(knobs, venv, remote_code=remote_code, family=family)
    print(f"serving {knobs.model} as {knobs.name!r} with {knobs.engine} on {knobs.device} at "
          f"http://{knobs.host}:{knobs.port}/v1 ({fmt.name} chat format, stop ids {stops}); "
          "Ctrl-C stops it", file=sys.stderr, flush=True)
    os.execve(argv[0], argv, {**os.environ, **env})


def main(argv: list[str]) -> int:
    if argv not in ([], ["--install"], ["--in-venv"]):
        print("usage: python3 -m deploy.engine [--install]  (knobs come from the environment)",
              file=sys.stderr)
        return 2
    try:
        knobs = Knobs.from_env(need_model=argv != ["--install"])
        build = BUILDS[(knobs.engine, knobs.device)]
        if argv == ["--in-venv"]:
            serve(knobs, REPO / build.venv)
        venv = install(build, sys.executable)
        if argv == ["--install"]:
            return 0
        # The device is decided once: stage 2 must not look for a GPU again.
        stage_two(venv, "deploy.engine", {"ENGINE_DEVICE": knobs.device})
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
