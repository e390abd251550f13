"""Runs the real xtuner CLI (train, convert pth_to_hf, convert merge) and never trusts its exit
code: the CLI exits 0 even when the tool it starts crashes, so each step checks its outputs and
turns a crash into StepFailed with a one-line cause. Outputs are written atomically."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from chat.model_files import remote_code_files, require_complete_model
from chat import formats
from chat.loading import ASSISTANT_FILE
from training.knobs import DEEPSPEED_CONFIGS
from training.atomic import atomic_dir, write_text_atomic

COMPAT = Path(__file__).with_name("xtuner_compat")
ITER_LOG = re.compile(r"Iter\(train\) \[\s*(\d+)/(\d+)\]")
CHECKPOINT = re.compile(r"iter_(\d+)\.pth$")


class StepFailed(RuntimeError):
    pass


def xtuner_env(deepspeed: bool = False) -> dict:
    venv_bin = str(Path(sys.executable).parent)
    env = dict(os.environ)
    # The CLI starts its tools with whatever `python` is first on PATH: make it ours.
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(COMPAT), env.get("PYTHONPATH")]))
    # torch >= 2.6 loads checkpoints weights-only by default and refuses the mmengine objects in
    # xtuner's own checkpoints (resume, pth_to_hf). These are files this run wrote itself.
    env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    single = env.get("NPROC_PER_NODE", "1") in ("", "1") and env.get("NNODES", "1") in ("", "1")
    if deepspeed and single and "RANK" not in env:
        # One process: xtuner runs train.py without torchrun, and DeepSpeed then looks for MPI
        # (mpi4py) to find its rank (xtuner#592). Say what torchrun would: rank 0 of 1.
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=env.get("PORT") or str(free_port()))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def xtuner(args: list[str], log_path: Path, step: str, deepspeed: bool = False) -> list[str]:
    """Run `xtuner ARGS`, streaming its output to the terminal and to log_path. Returns the
    output lines; raises StepFailed with the tool's own error line if it crashed."""
    command = [str(Path(sys.executable).parent / "xtuner"), *args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    with log_path.open("a", encoding="utf-8") as log, subprocess.Popen(
            command, env=xtuner_env(deepspeed), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", bufsize=1) as proc:
        log.write(f"$ xtuner {' '.join(args)}\n")
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            lines.append(line.rstrip("\n"))
    cause = crash_cause(lines)
    if cause or proc.returncode:
        raise StepFailed(f"{step} failed: {cause or f'exit code {proc.returncode}'} (log: {log_path})")
    return lines


def crash_cause(lines: list[str]) -> str | None:
    """The exception line that ends the last traceback in `lines`, if any."""
    cause, in_traceback = None, False
    for line in lines:
        if line.startswith("Traceback (most recent call last)"):
            in_traceback = True
        elif in_traceback and line and not line[0].isspace() and not line.startswith("During handling"):
            cause, in_traceback = line.strip(), False
    return cause


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    work = run_dir / "work"
    found = [(int(m.group(1)), p) for p in work.glob("iter_*.pth") if (m := CHECKPOINT.search(p.name))]
    return sorted(found)


def check_deepspeed(name: str) -> None:
    if not name:
        return
    if name not in DEEPSPEED_CONFIGS:
        raise ValueError(f"unknown DEEPSPEED={name!r}: use one of {', '.join(DEEPSPEED_CONFIGS)}")
    import importlib.util
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError("DEEPSPEED is set but deepspeed is not installed: run `make setup-deepspeed`")


def resume_checkpoint(run_dir: Path, resume: str) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        # mmengine names a checkpoint in last_checkpoint only once it is fully written; a newer
        # iter_*.pth may be torn by the interruption (training overwrites it when it gets there).
        last = run_dir / "work" / "last_checkpoint"
        named = Path(last.read_text(encoding="utf-8").strip()) if last.is_file() else None
        if named and named.exists():
            return named
        print(f"RESUME=auto: no checkpoint in {run_dir / 'work'} yet, starting from scratch")
        return None
    path = Path(resume)
    if not path.exists():
        raise ValueError(f"RESUME={resume}: no such checkpoint")
    return path


def fit(run_dir: Path, resume: str = "", deepspeed: str = "") -> Path:
    """`xtuner train`; returns the final checkpoint. Starting afresh removes the old run's
    checkpoints and everything derived from them (adapter, merged model, scores)."""
    check_deepspeed(deepspeed)
    start = resume_checkpoint(run_dir, resume)
    for stale in ("adapter", "merged"):
        shutil.rmtree(run_dir / stale, ignore_errors=True)
    (run_dir / "scores.json").unlink(missing_ok=True)
    if start is None:
        for _, old in checkpoints(run_dir):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    args = ["train", str(run_dir / "config.py"), "--work-dir", str(run_dir / "work")]
    if deepspeed:
        args += ["--deepspeed", deepspeed]
    if start is not None:
        print(f"resuming from {start}")
        args += ["--resume", str(start)]
    lines = xtuner(args, run_dir / "logs" / "fit.log", "xtuner train", deepspeed=bool(deepspeed))
    progress = [tuple(map(int, m.groups())) for line in lines if (m := ITER_LOG.search(line))]
    found = checkpoints(run_dir)
    if not found:
        raise StepFailed(f"xtuner train wrote no checkpoint (log: {run_dir / 'logs' / 'fit.log'})")
    total = progress[-1][1] if progress else found[-1][0]
    if found[-1][0] < total:
        raise StepFailed(f"xtuner train stopped at iteration {found[-1][0]} of {total}")
    return found[-1][1]


def chosen_checkpoint(run_dir: Path, ckpt: str = "") -> Path:
    """CKPT if given, else the one `make select` chose, else the newest."""
    if ckpt:
        path = Path(ckpt)
        if not path.exists():
            raise ValueError(f"CKPT={ckpt}: no such checkpoint")
        return path
    scores = run_dir / "scores.json"
    if scores.is_file():
        return Path(json.loads(scores.read_text(encoding="utf-8"))["selected"]["checkpoint"])
    found = checkpoints(run_dir)
    if not found:
        raise ValueError(f"no checkpoint in {run_dir / 'work'}: run `make fit` first")
    return found[-1][1]


def convert(run_dir: Path, checkpoint: Path) -> Path:
    print(f"converting {checkpoint} to a Hugging Face adapter")
    with atomic_dir(run_dir / "adapter") as tmp:
        xtuner(["convert", "pth_to_hf", str(run_dir / "config.py"), str(checkpoint), str(tmp),
                "--safe-serialization"], run_dir / "logs" / "convert.log", "xtuner convert pth_to_hf")
        if not (tmp / "adapter_config.json").is_file():
            raise StepFailed(f"xtuner convert pth_to_hf wrote no adapter_config.json into {tmp}")
        (tmp / "checkpoint.txt").write_text(str(checkpoint) + "\n", encoding="utf-8")
    return run_dir / "adapter"


def merge(run_dir: Path, info: dict) -> Path:
    """`xtuner convert merge` RUN/adapter into the base named in run.json, then record the chat
    format and whose assistant it is in the merged folder."""
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ValueError(f"no adapter in {adapter}: run `make convert` first")
    with atomic_dir(run_dir / "merged") as tmp:
        xtuner(["convert", "merge", info["base_model"], str(adapter), str(tmp), "--safe-serialization",
                "--max-shard-size", info["max_shard_size"]], run_dir / "logs" / "merge.log",
               "xtuner convert merge")
        copy_remote_code(info["base_model"], tmp)
        add_chat_format(tmp, formats.FORMATS[info["chat_family"]])
        write_text_atomic(tmp / ASSISTANT_FILE, json.dumps(
            {"name": info["name"], "author": info["author"]}, ensure_ascii=False, indent=2) + "\n")
        require_complete_model(tmp)
    return run_dir / "merged"


def copy_remote_code(base_model: str, model_dir: Path) -> None:
    """Give the merged folder the base's own code (InternLM2's modeling and tokenizer .py files,
    named by auto_map) that the merge did not write, so it loads from its own folder in a fresh
    process, offline, and on the hub after a push."""
    base = Path(base_model)
    if not base.is_dir():  # a hub id: the merge has just downloaded it into the cache
        from huggingface_hub import snapshot_download
        base = Path(snapshot_download(base_model, allow_patterns=["*.py", "*.json"]))
    for name in remote_code_files(model_dir):
        if not (model_dir / name).is_file() and (base / name).is_file():
            shutil.copy(base / name, model_dir / name)


def add_chat_format(model_dir: Path, fmt: formats.ChatFormat) -> None:
    """Make any tool that calls apply_chat_template or plain generate() use the training format:
    the family's template (and its name, `chat_family`) in tokenizer_config.json, its stop tokens
    in generation_config.json."""
    from transformers import AutoTokenizer

    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(chat_template=fmt.chat_template, chat_family=fmt.name)
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    generation_path = model_dir / "generation_config.json"
    generation = json.loads(generation_path.read_text(encoding="utf-8")) if generation_path.is_file() else {}
    generation["eos_token_id"] = formats.stop_ids(tokenizer, fmt)
    generation_path.write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")


def timed(step: str, run_dir: Path, fn, *args):
    """Run one step and record its wall time in RUN/timings.json (benchmarks read it)."""
    started = time.perf_counter()
    result = fn(*args)
    seconds = round(time.perf_counter() - started, 1)
    path = run_dir / "timings.json"
    timings = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    timings[step] = seconds
    write_text_atomic(path, json.dumps(timings, indent=2) + "\n")
    print(f"[{step}] done in {seconds} s")
    return result
