"""N chat users at once (1, 4, 8) against the live app: aggregate tokens/s and p50/p95 wait
(submit -> first streamed text), each level measured in this one run against the same server.

    python -m bench.bench_concurrency [MODEL_DIR]     (default: runs/assistant/merged)"""
import statistics
import sys
import threading
import time
from pathlib import Path

from gradio_client import Client

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from app_server import AppServer  # noqa: E402 - the tests' way of running the real app

USERS = (1, 4, 8)
REQUESTS_PER_USER = 3
QUESTIONS = ["请介绍一下你自己", "Who are you?", "今天天气怎么样？"]
SETTINGS = {"temperature": 0, "max_new_tokens": 64, "repetition_penalty": 1.0}


def user(url: str, waits: list, lock: threading.Lock) -> None:
    client = Client(url, verbose=False)
    for i in range(REQUESTS_PER_USER):
        started = time.perf_counter()
        job = client.submit(QUESTIONS[i % len(QUESTIONS)], **SETTINGS, api_name="/chat")
        first = None
        for _ in job:
            first = first or time.perf_counter()
        job.result()
        with lock:
            waits.append((first or time.perf_counter()) - started)


def level(app: AppServer, users: int) -> dict:
    waits, lock = [], threading.Lock()
    tokens_before = app.health()[1]["tokens_generated"]
    started = time.perf_counter()
    threads = [threading.Thread(target=user, args=(app.url, waits, lock)) for _ in range(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    tokens = app.health()[1]["tokens_generated"] - tokens_before
    waits.sort()
    return {"users": users, "tokens_per_s": tokens / seconds, "p50": statistics.median(waits),
            "p95": waits[min(len(waits) - 1, round(0.95 * (len(waits) - 1)))]}


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "runs/assistant/merged"
    with AppServer({"MODEL_ID": str(Path(model).resolve()), "CONCURRENCY": str(max(USERS)),
                    "QUEUE_SIZE": "64"}) as app:
        level(app, 1)  # warm-up: first-request costs are not a property of concurrency
        results = [level(app, users) for users in USERS]
    one = results[0]["tokens_per_s"]
    import torch  # the app runs on this machine: its default device is this one
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\nconcurrent chat users, live app on {device}, {REQUESTS_PER_USER} requests each, "
          f"max_new_tokens {SETTINGS['max_new_tokens']}")
    print(f"  {'users':>5} {'tokens/s':>10} {'vs 1 user':>10} {'p50 wait':>10} {'p95 wait':>10}")
    for r in results:
        print(f"  {r['users']:>5} {r['tokens_per_s']:>10.1f} {r['tokens_per_s'] / one:>9.2f}x "
              f"{r['p50']:>9.2f}s {r['p95']:>9.2f}s")


if __name__ == "__main__":
    main()
