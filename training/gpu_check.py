"""`make gpu-check`: whether the GPU path works on this machine, and how fast, with no download.
It builds a random model of InternLM2-Chat-1.8B's exact shape (training/tiny.py) and runs the
kit's real pipeline on it: QLoRA NF4 + AMP training, the same under DeepSpeed ZeRO-2, pth_to_hf,
merge, then loading in the app's dtype and streaming; it ends with one table.

    python3 -m training.gpu_check probe          # stdlib only, before anything is installed
    .venv/bin/python -m training.gpu_check run   # QUICK=1: QLoRA + merge + stream; FULL=1: + image

The steps are data (`plan`), so a test can check the exact commands without a GPU. This module
imports only the standard library at the top: `probe` runs before the venv exists."""
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the steps run from the repository root
WORK = Path("runs/gpu-check")
NAME = "GPU Check"
DATA_SIZE = 200       # identity records: one epoch packs into a few dozen 512-token iterations
EVAL_TOKENS = 16      # a random model's evaluation samples are noise to max_new_tokens: keep them short
STREAM_TOKENS = 128
IMAGE = "assistant-kit-gpu-check"
IMAGE_PORT = 7861


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]        # run from the repository root
    needs: tuple[str, ...] = ()  # steps whose failure skips this one


def plan(mode: str, python: str = "python", work: Path = WORK) -> list[Step]:
    """The steps of `mode` (quick | standard | full), in order."""
    base, data = work / "base", work / "data.jsonl"
    module = (python, "-m", "training.gpu_check")

    def training(step: str, run: Path, *extra: str) -> tuple[str, ...]:
        return (python, "-m", "training", step, "--run", str(run), *extra)

    def train(label: str, run: Path, deepspeed: str, needs: tuple[str, ...]) -> list[Step]:
        flags = ("--deepspeed", deepspeed) if deepspeed else ()
        return [
            Step(f"config ({label})", training("config", run, "--profile", "gpu", "--base-model",
                                               str(base), "--data", str(data), "--epochs", "1",
                                               "--save-steps", "1000", *flags), needs),
            Step(f"short eval ({label})", (*module, "short-eval", str(run / "config.py")),
                 (f"config ({label})",)),
            Step(f"train ({label})", training("fit", run, *flags), (f"short eval ({label})",)),
            Step(f"convert ({label})", training("convert", run), (f"train ({label})",)),
        ]

    qlora, zero2 = work / "qlora", work / "zero2"
    steps = [
        Step("build model", (*module, "build", str(base))),
        Step("data", training("data", qlora, "--name", NAME, "--data", str(data),
                              "--data-size", str(DATA_SIZE), "--replay", "0")),
        *train("QLoRA", qlora, "", ("build model", "data")),
        Step("merge", training("merge", qlora), ("convert (QLoRA)",)),
        Step("stream", (*module, "stream", str(qlora / "merged")), ("merge",)),
    ]
    if mode in ("standard", "full"):
        steps += train("ZeRO-2", zero2, "deepspeed_zero2", ("build model", "data"))
    if mode == "full":
        steps += [Step("image build", ("make", "image", f"IMAGE={IMAGE}")),
                  Step("image run", (*module, "serve-image", str(qlora / "merged")),
                       ("image build", "merge"))]
    return steps


def mode_from_env() -> str:
    if os.environ.get("FULL", "") not in ("", "0"):
        return "full"
    return "quick" if os.environ.get("QUICK", "") not in ("", "0") else "standard"


# ---- probe: before anything is installed ----

def probe() -> int:
    """Exit 0 when nvidia-smi lists a GPU; otherwise one line saying what is missing."""
    smi = shutil.which("nvidia-smi")
    reason = None
    if smi is None:
        reason = "nvidia-smi is not installed (no NVIDIA driver)"
    else:
        try:
            result = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version",
                                     "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            gpus = [line.strip() for line in result.stdout.splitlines() if line.strip()]
            if result.returncode != 0 or not gpus:
                detail = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
                reason = f"nvidia-smi finds no GPU ({detail})"
        except subprocess.TimeoutExpired:
            reason = "nvidia-smi did not answer within 20 s"
    if reason:
        print(f"gpu-check: no NVIDIA GPU on this machine: {reason}. The GPU path (QLoRA, AMP, "
              "DeepSpeed) needs one; on a CPU use PROFILE=cpu (make demo, make test).", file=sys.stderr)
        return 2
    for gpu in gpus:
        print(f"gpu-check: found {gpu}")
    return 0


def bitsandbytes_cuda_libs() -> list[str]:
    """The CUDA versions the installed bitsandbytes ships kernels for (libbitsandbytes_cudaXYZ.so),
    read from its package folder without importing it (its import is what fails on a mismatch)."""
    import importlib.util
    spec = importlib.util.find_spec("bitsandbytes")
    if spec is None:
        return []
    return sorted(p.name for p in Path(spec.origin).parent.glob("libbitsandbytes_cuda*.so"))


def cuda_report(torch_cuda: str | None, libs: list[str]) -> tuple[bool, str]:
    """Whether bitsandbytes has a library for torch's CUDA version (the usual QLoRA failure)."""
    wanted = f"libbitsandbytes_cuda{torch_cuda.replace('.', '')}.so" if torch_cuda else None
    shipped = ", ".join(libs) or "none"
    if wanted is None:
        return False, f"torch has no CUDA (a CPU build); bitsandbytes ships: {shipped}"
    if wanted not in libs:
        return False, (f"torch CUDA {torch_cuda}, but bitsandbytes has no {wanted} (ships: {shipped}); "
                       "install a bitsandbytes that ships it, or set BNB_CUDA_VERSION to a shipped "
                       "version with that CUDA runtime on LD_LIBRARY_PATH")
    return True, f"torch CUDA {torch_cuda}; bitsandbytes ships {wanted} (of {len(libs)} CUDA builds)"


# ---- the steps gpu-check itself runs ----

def build(out_dir: str) -> None:
    from training import tiny
    tiny.build(out_dir, sizes=tiny.CHAT_1_8B, device="cuda", dtype="bfloat16")


def short_eval(config_path: str) -> None:
    """Shorten the evaluation samples xtuner's EvaluateChatHook writes while training."""
    from mmengine.config import Config
    cfg = Config.fromfile(config_path)
    for hook in cfg.custom_hooks:
        if "evaluation_inputs" in hook:  # EvaluateChatHook
            hook["max_new_tokens"] = EVAL_TOKENS
    cfg.dump(config_path)


def stream(model_dir: str) -> None:
    """Load the merged model as the app does (its default dtype on the GPU) and stream one answer
    to the end of STREAM_TOKENS; prints one JSON line of figures."""
    import torch
    from chat.generation import STATS, Sampling, stream_reply
    from chat.loading import load_model

    started = time.perf_counter()
    loaded = load_model(model_dir)
    load_s = time.perf_counter() - started
    before = STATS.snapshot()["tokens_generated"]
    started, first = time.perf_counter(), None
    for _ in stream_reply(loaded, [{"role": "user", "content": "Who are you?"}],
                          sampling=Sampling(max_new_tokens=STREAM_TOKENS, temperature=0)):
        first = first or time.perf_counter() - started
    seconds = time.perf_counter() - started
    tokens = STATS.snapshot()["tokens_generated"] - before
    print("RESULT " + json.dumps({
        "device": loaded.device, "dtype": loaded.dtype, "load_s": round(load_s, 1),
        "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
        "first_token_s": round(first or seconds, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if loaded.device != "cpu" else None}))


def serve_image(model_dir: str) -> None:
    """Run the serving image on the GPU with the merged model mounted; wait until /health says
    the model is loaded."""
    import urllib.error
    import urllib.request
    tool = os.environ.get("CONTAINER") or ("docker" if shutil.which("docker") else "podman")
    gpus = ["--device", "nvidia.com/gpu=all"] if tool == "podman" else ["--gpus", "all"]
    name = f"{IMAGE}-{os.getpid()}"
    subprocess.run([tool, "run", "-d", "--rm", "--name", name, *gpus, "-p", f"127.0.0.1:{IMAGE_PORT}:7860",
                    "-v", f"{Path(model_dir).resolve()}:/model:ro", "-e", "MODEL_ID=/model", IMAGE], check=True)
    started = time.perf_counter()
    try:
        while time.perf_counter() - started < 600:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{IMAGE_PORT}/health", timeout=5):
                    print(f"RESULT {json.dumps({'ready_s': round(time.perf_counter() - started, 1)})}")
                    return
            except urllib.error.HTTPError as e:  # 503 while loading; with "error" when it failed
                health = json.loads(e.read() or b"{}")
                if "error" in health:
                    raise RuntimeError(f"the app could not load the model: {health['error']}") from None
            except OSError:
                pass  # not listening yet
            time.sleep(3)
        raise RuntimeError("the app in the image did not load the model within 600 s")
    finally:
        subprocess.run([tool, "stop", name], capture_output=True)


# ---- run: every step, then the table ----

def run_steps(steps: list[Step], work: Path) -> list[dict]:
    from training import knobs
    from training.runner import crash_cause

    # The plan's flags are the whole truth: knobs exported by make do not leak into the steps.
    env = {key: value for key, value in os.environ.items() if key not in knobs.DEFAULTS}
    env["HF_HUB_OFFLINE"] = "1"  # nothing may download: the base is built here
    logs = ROOT / work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows = {}
    for step in steps:
        failed = [need for need in step.needs if rows[need]["result"] != "pass"]
        if failed:
            rows[step.name] = {"step": step.name, "result": "skipped", "reason": f"{failed[0]} did not pass"}
            continue
        log = logs / (re.sub(r"\W+", "-", step.name).strip("-") + ".log")
        print(f"gpu-check: {step.name}: {' '.join(step.argv)} (log: {log})", flush=True)
        started = time.perf_counter()
        with log.open("w", encoding="utf-8") as out:
            result = subprocess.run(step.argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    text=True)
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
        row = {"step": step.name, "seconds": round(time.perf_counter() - started, 1)}
        errors = [line for line in lines if line.startswith("error: ")]
        if result.returncode != 0:
            reason = (errors[-1] if errors else crash_cause(lines)) or f"exit code {result.returncode}"
            row.update(result="FAIL", reason=f"{reason} (log: {log})")
        else:
            row.update(result="pass", **figures(step, lines))
        rows[step.name] = row
    return list(rows.values())


def figures(step: Step, lines: list[str]) -> dict:
    """What a passed step measured: its RESULT line, or a training run's iteration log."""
    measured = [json.loads(line[len("RESULT "):]) for line in lines if line.startswith("RESULT ")]
    if measured:
        return measured[-1]
    if step.name.startswith("train"):
        return training_figures(ROOT / step.argv[step.argv.index("--run") + 1])
    return {}


def training_figures(run: Path) -> dict:
    """Tokens/s and peak memory from mmengine's iteration lines ("time: 0.41 ... memory: 5123",
    the mean seconds per iteration over the log interval and torch's peak allocation in MiB)."""
    from mmengine.config import Config
    cfg = Config.fromfile(str(run / "config.py"))
    tokens_per_iter = cfg.max_length * cfg.train_dataloader.batch_size  # packed to max_length
    text = (run / "logs" / "fit.log").read_text(encoding="utf-8", errors="replace")
    lines = [line for line in text.splitlines() if "Iter(train)" in line]
    times = [float(m.group(1)) for line in lines[1:] or lines if (m := re.search(r"\btime: ([\d.]+)", line))]
    memory = [int(m.group(1)) for line in lines if (m := re.search(r"\bmemory: (\d+)", line))]
    found = {}
    if times:
        found["tokens_per_s"] = round(tokens_per_iter / statistics.median(times))
    if memory:
        found["peak_gib"] = round(max(memory) / 1024, 2)
    return found


def table(rows: list[dict]) -> str:
    lines = [f"{'step':<20} {'result':<8} {'seconds':>8}  figures / reason"]
    for row in rows:
        extra = row.get("reason") or ", ".join(f"{k} {v}" for k, v in row.items()
                                               if k not in ("step", "result", "seconds"))
        lines.append(f"{row['step']:<20} {row['result']:<8} {row.get('seconds', ''):>8}  {extra}")
    return "\n".join(lines)


def run(mode: str, work: Path = WORK) -> int:
    import torch
    if not torch.cuda.is_available():
        print(f"gpu-check: nvidia-smi sees a GPU but torch {torch.__version__} does not (CUDA build: "
              f"{torch.version.cuda}): install torch's CUDA build for this driver", file=sys.stderr)
        return 2
    ok, report = cuda_report(torch.version.cuda, bitsandbytes_cuda_libs())
    print(f"gpu-check: {torch.cuda.get_device_name()}, torch {torch.__version__}; {report}")
    shutil.rmtree(ROOT / work, ignore_errors=True)
    rows = run_steps(plan(mode, sys.executable, work), work)
    print(f"\ngpu-check ({mode}) on {torch.cuda.get_device_name()}; {report}\n{table(rows)}")
    return 0 if ok and all(row["result"] == "pass" for row in rows) else 1


def main(argv: list[str]) -> int:
    command, *args = argv or ["probe"]
    if command == "probe":
        return probe()
    if command == "run":
        return run(mode_from_env())
    {"build": build, "short-eval": short_eval, "stream": stream, "serve-image": serve_image}[command](*args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
