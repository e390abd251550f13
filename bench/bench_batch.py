"""Batched greedy generation (chat.generation.generate_batch, what answers the replay prompts and
scores every checkpoint) at a few batch sizes, side by side in one run on the CPU default base,
SmolLM2-135M-Instruct: seconds for the same prompts, the ratio to the smallest size, and whether
the answers are the same as at that size (they must be: greedy answers do not depend on batching).

    .venv/bin/python -m bench.bench_batch [--prompts 128] [--sizes 16,64,128]
"""
import argparse
import time

from chat.generation import BATCH_SIZE, Sampling, generate_batch
from chat.loading import load_model
from training.base import default_base
from training.replay import MAX_NEW_TOKENS, PROMPTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=128, help="how many replay prompts to answer")
    parser.add_argument("--sizes", default=f"16,{BATCH_SIZE},128", help="batch sizes, smallest first")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    loaded = load_model(str(default_base()))
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS[:args.prompts]]
    greedy = Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=MAX_NEW_TOKENS)
    seconds, answers = {}, {}
    for size in sizes:
        start = time.perf_counter()
        answers[size] = [a.text for a in generate_batch(loaded, conversations, sampling=greedy, batch_size=size)]
        seconds[size] = time.perf_counter() - start
    first = sizes[0]
    print(f"\ngenerate_batch, {len(conversations)} replay prompts, greedy, up to {MAX_NEW_TOKENS} new tokens "
          f"(default batch size {BATCH_SIZE})")
    for size in sizes:
        same = sum(a == b for a, b in zip(answers[size], answers[first]))
        print(f"  batch {size:>4}: {seconds[size]:6.1f} s  {seconds[first] / seconds[size]:5.2f}x vs {first}  "
              f"same answers as {first}: {same} of {len(conversations)}")


if __name__ == "__main__":
    main()
