"""Wall time of each step of `make demo`'s pipeline on the tiny model (CPU), in one run:
tiny base -> data -> config -> xtuner train -> select -> convert -> merge. The run is kept
(RUN/merged is what the serving benchmarks load).

    python -m bench.bench_pipeline [RUN]     (default: runs/bench; emptied first)"""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def training(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/bench").resolve()
    shutil.rmtree(run, ignore_errors=True)
    base = run.with_name(run.name + "-tiny-base")
    started = time.perf_counter()
    training("tiny", "--base-model", str(base))
    timings = {"tiny": time.perf_counter() - started}
    training("all", "--profile", "cpu", "--base-model", str(base), "--run", str(run),
             "--data", str(run / "data.jsonl"))
    timings.update(json.loads((run / "timings.json").read_text()))
    total = sum(timings.values())
    print(f"\n`make demo` pipeline on the tiny model, CPU ({total:.0f} s in all)")
    for step, seconds in timings.items():
        print(f"  {step:<8}{seconds:7.1f} s  {seconds / total:6.1%}")


if __name__ == "__main__":
    main()
