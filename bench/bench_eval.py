"""`make eval`'s option scoring (training.eval.option_logprobs) at a few batch sizes, side by side
in one run on the CPU default base, SmolLM2-135M-Instruct: seconds for the same options of each
benchmark, the ratio to batch size 1, and whether the picks are the same (they must be: padding
does not change a log-likelihood).

    .venv/bin/python -m bench.bench_eval [--items 24] [--sizes 1,16] [--benchmarks piqa,boolq]
"""
import argparse
import time

from chat.loading import load_model
from training import benchmarks
from training import eval as evaluation
from training.base import default_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=24, help="items per benchmark (the start of make eval's sample)")
    parser.add_argument("--sizes", default="1,16", help="batch sizes, the baseline first")
    parser.add_argument("--benchmarks", default="piqa,hellaswag,boolq")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    loaded = load_model(str(default_base()))
    print(f"\noption scoring on SmolLM2-135M-Instruct, {args.items} items per benchmark")
    for name in args.benchmarks.split(","):
        bench = benchmarks.BENCHMARKS[name]
        items = benchmarks.sample(benchmarks.load(name), args.items)
        pairs = [(item.context, option) for item in items for option in item.options]
        seconds, picks = {}, {}
        for size in sizes:
            start = time.perf_counter()
            scores = evaluation.option_logprobs(loaded.model, loaded.tokenizer, pairs, size)
            seconds[size] = time.perf_counter() - start
            at, picks[size] = 0, []
            for item in items:
                picks[size].append(evaluation.choose(item, scores[at:at + len(item.options)], bench.norm))
                at += len(item.options)
        first = sizes[0]
        for size in sizes:
            same = sum(a == b for a, b in zip(picks[size], picks[first]))
            print(f"  {bench.title:<10} batch {size:>3}: {seconds[size]:6.1f} s  {seconds[first] / seconds[size]:5.2f}x "
                  f"vs {first}  {len(pairs) / seconds[size]:5.1f} options/s  same picks: {same} of {len(items)}")


if __name__ == "__main__":
    main()
