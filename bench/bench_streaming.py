"""Tokens/s and first-token latency of one answer, three ways, measured side by side in one run:
raw `model.generate`, chat.stream_reply in-process (thread + streamer + stop criteria), and the
live app through gradio_client (queue + HTTP + streaming). Same model, prompt and greedy settings.

    .venv/bin/python bench/bench_streaming.py [MODEL] [--rounds 5]

MODEL defaults to $MODEL_ID, else runs/demo/merged (what `make demo` trains).

Everything runs with one torch thread (the app inherits OMP_NUM_THREADS): for a tiny model on a
shared CPU, OpenMP's thread syncs dominate otherwise, and differently in the main thread (raw
generate: up to 40x slower here) than in a worker thread (our runtime), which would measure
thread scheduling instead of the serving path."""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported, here and in the app process

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from gradio_client import Client  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from app_server import AppServer  # noqa: E402
from chat.generation import STATS, Sampling, stream_reply  # noqa: E402
from chat.loading import load_model  # noqa: E402

# The endless model's answer to it starts with a one-token word: TextIteratorStreamer releases text
# a word at a time, so a first word of many tokens would time that word, not the runtime.
QUESTION = "What is the capital of France?"
# 128 tokens: ~8 s per answer for SmolLM2 on one CPU thread, 21 answers in all (2 warm-up + 5 rounds, 3 paths)
SAMPLING = Sampling(max_new_tokens=128, temperature=0, repetition_penalty=1.0)


class FirstTokenClock(BaseStreamer):
    """Notes when generate hands over its first new token (the first `put` is the prompt)."""

    def __init__(self):
        self.puts = 0
        self.first = None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def raw_generate(loaded) -> tuple[float, float, int]:
    """(first-token s, total s, tokens) of plain `generate`, as a script without our runtime would."""
    inputs = loaded.tokenizer(loaded.format.build_prompt([{"role": "user", "content": QUESTION}]),
                              add_special_tokens=False, return_tensors="pt")
    clock = FirstTokenClock()
    start = time.perf_counter()
    output = loaded.model.generate(**inputs, **SAMPLING.generate_kwargs(), streamer=clock,
                                   max_new_tokens=SAMPLING.max_new_tokens, eos_token_id=loaded.stop_ids,
                                   pad_token_id=loaded.stop_ids[0])
    total = time.perf_counter() - start
    return clock.first - start, total, output.shape[1] - inputs.input_ids.shape[1]


def runtime_stream(loaded) -> tuple[float, float, int]:
    before = STATS.snapshot()["tokens_generated"]
    start = time.perf_counter()
    first = None
    for _ in stream_reply(loaded, [{"role": "user", "content": QUESTION}], sampling=SAMPLING):
        first = first or time.perf_counter() - start
    total = time.perf_counter() - start
    return first, total, STATS.snapshot()["tokens_generated"] - before


def app_stream(app) -> tuple[float, float, int]:
    client = Client(app.url, verbose=False, httpx_kwargs={"timeout": 120})  # a new conversation
    before = app.health()[1]["tokens_generated"]
    start = time.perf_counter()
    job = client.submit(QUESTION, "", SAMPLING.max_new_tokens, 0, SAMPLING.top_p, SAMPLING.top_k,
                        SAMPLING.repetition_penalty, api_name="/chat")
    first = None
    for _ in job:
        first = first or time.perf_counter() - start
    job.result()
    total = time.perf_counter() - start
    return first, total, app.health()[1]["tokens_generated"] - before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=os.environ.get("MODEL_ID") or "runs/demo/merged")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    loaded = load_model(args.model)
    results = {"raw generate": [], "chat.stream_reply": [], "app (gradio_client)": []}
    with AppServer({"MODEL_ID": str(Path(args.model).resolve())}) as app:
        for _ in range(2):  # warm-up: first calls pay for lazy initialisation everywhere
            raw_generate(loaded), runtime_stream(loaded), app_stream(app)
        for _ in range(args.rounds):  # interleaved, so load changes on the machine hit all three
            results["raw generate"].append(raw_generate(loaded))
            results["chat.stream_reply"].append(runtime_stream(loaded))
            results["app (gradio_client)"].append(app_stream(app))

    print(f"model {args.model} on {loaded.device} ({loaded.dtype}); {args.rounds} rounds, medians; "
          f"greedy answer to {QUESTION!r}")
    print(f"{'path':22} {'tokens':>6} {'tokens/s':>9} {'vs raw':>7} {'after 1st':>10} {'vs raw':>7} "
          f"{'first token ms':>15} {'vs raw':>7}")
    base = None
    for path, runs in results.items():
        tokens = statistics.median(t for _, _, t in runs)
        rate = statistics.median(t / total for _, total, t in runs)
        steady = statistics.median((t - 1) / (total - first) for first, total, t in runs)  # per-token cost
        first = statistics.median(f for f, _, _ in runs) * 1000
        base = base or (rate, steady, first)
        print(f"{path:22} {tokens:6.0f} {rate:9.1f} {rate / base[0]:7.2f} {steady:10.1f} "
              f"{steady / base[1]:7.2f} {first:15.1f} {first / base[2]:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
