"""`xtuner train` speed of the CPU recipe against the stock setup, side by side in one run on the CPU
default base, SmolLM2-135M-Instruct: the same data (identity records + REPLAY base answers, one
epoch of 256-token packs) trained twice by the real xtuner CLI,
  stock   as xtuner's template would run on a CPU: fp32 matmuls, activation checkpointing;
  recipe  as training/recipe.toml runs it: bf16 autocast where the CPU has native bf16
          (training/xtuner_compat/cpu_autocast.py), no activation checkpointing.
It prints seconds per iteration (mmengine's own `time:`, the first 10 iterations left out as
warm-up), the ratio, and each run's last logged loss (both must learn alike).

    python -m bench.bench_fit [--replay 90]     (the base's cached answers; `make base` first)
"""
import argparse
import contextlib
import io
import re
import statistics
import tempfile
from pathlib import Path

from training import config, data, replay, runner
from training.base import default_base

VARIANTS = {  # dotted config key -> value, over the rendered cpu recipe
    "stock": {"optim_wrapper.type": "mmengine.optim.OptimWrapper", "model.use_activation_checkpointing": True},
    "recipe": {},
}
ITER = re.compile(r"Iter\(train\) \[\s*(\d+)/\d+\].*?\btime: ([0-9.]+).*?\bloss: ([0-9.]+)")


def train(variant: dict, base: str, data_file: Path, records: list, run_dir: Path) -> tuple[float, float, int]:
    """(median seconds per iteration after the first 10, last logged loss, iterations)."""
    cfg = config.render("cpu", base, str(data_file), run_dir, epochs="1")
    for key, value in variant.items():
        config.set_key(cfg, key, value)
    fmt, tokenizer = config.chat_format(base)
    plan = config.schedule(cfg, tokenizer, fmt, records, None)
    config.write(cfg, run_dir, {"schedule": plan})
    with contextlib.redirect_stdout(io.StringIO()):  # xtuner's log goes to RUN/logs/fit.log
        runner.fit(run_dir)
    logged = [(int(i), float(t), float(loss)) for i, t, loss in
              ITER.findall((run_dir / "logs" / "fit.log").read_text(encoding="utf-8"))]
    times = [t for i, t, _ in logged if i > 10]
    return statistics.median(times), logged[-1][2], plan["iterations"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replay", type=int, default=90, help="replayed base answers (a third as many identity records)")
    args = parser.parse_args()
    base = str(default_base())
    records = data.mix(data.identity_records("Bench Mark", "Bench Lab", args.replay // 3),
                       replay.records(replay.base_answers(base, args.replay)))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "data.jsonl"
        data.write_jsonl(records, data_file)
        for name, variant in VARIANTS.items():
            print(f"training: {name} ...", flush=True)
            results[name] = train(variant, base, data_file, records, Path(tmp) / name)
    stock = results["stock"][0]
    print(f"\nxtuner train on {Path(base).name}, CPU, {len(records)} records, "
          f"{results['recipe'][2]} iterations of 256-token packs each")
    for name, (seconds, loss, _) in results.items():
        print(f"  {name:<7}{seconds:6.2f} s/iteration  {stock / seconds:5.2f}x vs stock  last loss {loss:.3f}")


if __name__ == "__main__":
    main()
