"""Serving side by side, in one run on the real small model (SmolLM2-135M, made endless so every
answer is exactly MAX_TOKENS long): raw `generate`, the in-process app (page and /v1), vLLM's CPU
build direct (`make serve-engine`) and the app on that engine (ENGINE_URL, page and /v1).
Single-user tokens/s and first-token p50, aggregate tokens/s and p95 wait at 1, 4 and 8 users,
the app's memory in each mode; then the ratios the README quotes.

    python -m bench.bench_engine [MODEL_DIR]    (default: the SmolLM2 base, `make base`)"""
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from gradio_client import Client
from openai import OpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.bench_streaming import FirstTokenClock
from chat import formats
from chat.loading import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from app_server import AppServer  # noqa: E402 - the tests' way of running the real app
from engine_server import EngineServer  # noqa: E402 - ... and `make serve-engine`

REPO = Path(__file__).resolve().parent.parent
MAX_TOKENS = 64
USERS = (1, 4, 8)
REQUESTS_PER_USER = 2
QUESTION = "Tell me about the sea."
TIMEOUT_S = 600


def endless_copy(source: Path, out: Path) -> Path:
    """`source` whose output rows for the stop tokens are zero (lm_head untied from the input
    embeddings first), so greedy answers never end before MAX_TOKENS; same size and speed."""
    if (out / "model.safetensors").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(source)
    stops = formats.stop_ids(tokenizer, formats.detect(tokenizer))
    model = AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32)
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    with torch.no_grad():
        head.weight[stops] = 0
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, out / name)
    return out


def page_ask(url: str):
    def ask() -> tuple[float, int]:
        client = Client(url, verbose=False, httpx_kwargs={"timeout": TIMEOUT_S})
        start, first = time.perf_counter(), None
        job = client.submit(QUESTION, "", MAX_TOKENS, 0, 0.8, 50, 1.0, api_name="/chat")
        for _ in job:
            first = first or time.perf_counter() - start
        job.result()
        return first, MAX_TOKENS
    return ask


def openai_ask(base_url: str, model: str):
    client = OpenAI(base_url=base_url, api_key="none", timeout=TIMEOUT_S)

    def ask() -> tuple[float, int]:
        start, first, usage = time.perf_counter(), None, None
        for chunk in client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": QUESTION}], temperature=0,
                max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter() - start
            usage = chunk.usage or usage
        return first, usage.completion_tokens
    return ask


def level(ask, users: int) -> dict:
    """`users` threads, each asking REQUESTS_PER_USER times in a row."""
    waits, tokens, lock = [], [], threading.Lock()

    def user():
        for _ in range(REQUESTS_PER_USER):
            first, count = ask()
            with lock:
                waits.append(first)
                tokens.append(count)

    started = time.perf_counter()
    threads = [threading.Thread(target=user) for _ in range(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    waits.sort()
    assert set(tokens) == {MAX_TOKENS}, f"answers of unequal length: {sorted(set(tokens))}"
    return {"tok_s": sum(tokens) / seconds, "p50": statistics.median(waits),
            "p95": waits[min(len(waits) - 1, round(0.95 * (len(waits) - 1)))]}


def levels(ask, users_levels: tuple = USERS) -> dict:
    ask()  # warm-up: first-request costs are not a property of the mode
    return {users: level(ask, users) for users in users_levels}


def raw_generate(model_dir: Path) -> dict:
    loaded = load_model(str(model_dir))
    inputs = loaded.tokenizer(loaded.format.build_prompt([{"role": "user", "content": QUESTION}]),
                              add_special_tokens=False, return_tensors="pt")
    runs = []
    for _ in range(1 + REQUESTS_PER_USER):  # the first is the warm-up
        clock, start = FirstTokenClock(), time.perf_counter()
        out = loaded.model.generate(**inputs, do_sample=False, max_new_tokens=MAX_TOKENS,
                                    min_new_tokens=MAX_TOKENS, streamer=clock,
                                    pad_token_id=loaded.stop_ids[0])
        assert out.shape[1] - inputs.input_ids.shape[1] == MAX_TOKENS
        runs.append((clock.first - start, time.perf_counter() - start))
    firsts, totals = zip(*runs[1:])
    return {1: {"tok_s": MAX_TOKENS / statistics.mean(totals), "p50": statistics.median(firsts),
                "p95": max(firsts)}}


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory now (VmRSS), or its peak so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def group_rss_mb(pgid: int, field: str = "VmRSS") -> float:
    """Resident memory of every process in the group (the engine and its workers)."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                total += rss_mb(int(proc.name), field)
        except (OSError, ValueError):
            pass  # gone meanwhile
    return total


def main() -> None:
    # One torch thread here and in the apps (they inherit OMP_NUM_THREADS), as bench_streaming
    # does: on a shared CPU, OpenMP's thread syncs otherwise dominate, differently in a main
    # thread (raw generate) than in a worker thread (the app). vLLM's CPU build binds its own.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if len(sys.argv) > 1:
        source = Path(sys.argv[1])
    else:
        from training.base import default_base
        source = Path(default_base())
    model = endless_copy(source, REPO / "runs" / "bench" / f"endless-{source.name}")
    results, memory = {}, {}
    print(f"model: {source.name} (endless copy {model}), {MAX_TOKENS} tokens per answer, "
          f"{REQUESTS_PER_USER} answers per user per level", flush=True)
    results["raw generate"] = raw_generate(model)
    print("raw generate done", flush=True)
    # The in-process app with as many slots as users: its best case (threads share the cores).
    with AppServer({"MODEL_ID": str(model), "CONCURRENCY": str(max(USERS)), "QUEUE_SIZE": "64",
                    "SERVED_MODEL_NAME": "bench"}) as app:
        results["app page"] = levels(page_ask(app.url))
        results["app /v1"] = levels(openai_ask(app.url + "v1", "bench"))
        memory["app (in-process model)"] = rss_mb(app.process.pid)
    print("in-process app done", flush=True)
    with EngineServer(model) as engine:
        print(f"engine started in {engine.start_s:.0f} s", flush=True)
        results["engine direct"] = levels(openai_ask(engine.v1, "assistant"))
        with AppServer({"ENGINE_URL": engine.v1, "MODEL_ID": "", "SERVED_MODEL_NAME": "bench"}) as app:
            results["app on engine, page"] = levels(page_ask(app.url))
            results["app on engine, /v1"] = levels(openai_ask(app.url + "v1", "bench"))
            memory["app (on engine)"] = rss_mb(app.process.pid)
        memory["engine (all its processes)"] = group_rss_mb(engine.process.pid)
    report(results, memory)


def report(results: dict, memory: dict) -> None:
    print(f"\n| mode | 1 user tok/s | first token p50 | 4 users tok/s | 8 users tok/s | p95 wait at 8 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, by_users in results.items():
        cells = [f"{by_users[1]['tok_s']:.1f}", f"{by_users[1]['p50'] * 1000:.0f} ms"]
        cells += [f"{by_users[u]['tok_s']:.1f}" if u in by_users else "-" for u in (4, 8)]
        cells.append(f"{by_users[8]['p95']:.2f} s" if 8 in by_users else "-")
        print(f"| {mode} | " + " | ".join(cells) + " |")
    print("\n| process | resident memory |\n| --- | --- |")
    for name, mb in memory.items():
        print(f"| {name} | {mb:.0f} MB |")

    def ratio(a: str, b: str, users: int) -> str:
        return f"{results[a][users]['tok_s'] / results[b][users]['tok_s']:.2f}x"

    raw = results["raw generate"][1]
    print("\nratios (targets in README):")
    print(f"  in-process /v1 vs raw generate, 1 user: {ratio('app /v1', 'raw generate', 1)} "
          f"(first token +{(results['app /v1'][1]['p50'] - raw['p50']) * 1000:.0f} ms); "
          f"page: {ratio('app page', 'raw generate', 1)} "
          f"(+{(results['app page'][1]['p50'] - raw['p50']) * 1000:.0f} ms)")
    for users in (1, 8):
        print(f"  app on engine vs engine direct, {users} user(s): page "
              f"{ratio('app on engine, page', 'engine direct', users)}, /v1 "
              f"{ratio('app on engine, /v1', 'engine direct', users)}")
    print(f"  engine, 8 users vs 1: {results['engine direct'][8]['tok_s'] / results['engine direct'][1]['tok_s']:.2f}x; "
          f"in-process app page, 8 users vs 1: "
          f"{results['app page'][8]['tok_s'] / results['app page'][1]['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
