"""A legitimate 1-token /v1 request's latency while an attacker loops oversized requests, against
the idle latency, side by side in one run of the real app on the real small model (SmolLM2-135M,
CONCURRENCY=1). The attacker, a separate process (as a remote one would be) on CONNECTIONS
connections at once, sends in turn: a 20 MB message (refused by its Content-Length), a chunked
body without a Content-Length (refused once 2 MiB have arrived) and a message just over the
character limit but under the body limit (refused before a slot, untokenized). Two attackers:
one address (locked out after MAX_FAILURES, then tarpitted: guards.py), and one that takes a new
loopback address for every request, as a botnet would, so no lockout ever applies and every
request is refused on its own. Idle and attacked requests alternate, so both see the same
machine. Target: within 2x of idle (docs/security.md).

    python -m bench.bench_abuse [MODEL_DIR]    (default: the SmolLM2 base, `make base`)"""
import multiprocessing
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from app_server import AppServer  # noqa: E402 - the tests' way of running the real app

MAX_INPUT_TOKENS = 4096  # the app's default
ROUNDS = 15
CONNECTIONS = 4              # the attacker's requests in flight at once
LEGIT_ADDRESS = "127.0.0.2"  # the attacker comes from 127.0.0.1 (or 127.1.x.y): another client


def legit(client: httpx.Client) -> float:
    started = time.perf_counter()
    response = client.post("v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0})
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw(url: str, head: bytes, body_parts, source: str = "127.0.0.1") -> str:
    """Send a request by hand (an attacker need not send what it announces); the status line."""
    address = urlparse(url)
    with socket.create_connection((address.hostname, address.port), timeout=30,
                                  source_address=(source, 0)) as s:
        try:
            s.sendall(head)
            for part in body_parts:
                s.sendall(part)
        except OSError:
            pass  # the server answered and closed before the upload ended
        return s.recv(64).split(b" ")[1].decode() if head else ""


def attack(url: str, running, counts, spread: bool) -> None:
    """CONNECTIONS loops of the three kinds; with `spread`, each request from a new address."""
    megabyte = b"a" * 2**20
    path = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    over = ('{"messages": [{"role": "user", "content": "' + "word " * (4 * MAX_INPUT_TOKENS)
            + '"}]}').encode()
    kinds = {
        "20 MB announced": (path + b"Content-Length: 20000000\r\n\r\n", [megabyte]),
        "chunked": (path + b"Transfer-Encoding: chunked\r\n\r\n",
                    [b"%x\r\n" % len(megabyte) + megabyte + b"\r\n"] * 20),
        "over the character limit": (path + b"Content-Length: %d\r\n\r\n" % len(over), [over]),
    }
    addresses = (f"127.1.{n // 250}.{n % 250 + 1}" for n in range(10**9))
    lock = threading.Lock()

    def loop():
        while True:
            running.wait()
            for kind, (head, parts) in kinds.items():
                with lock:
                    source = next(addresses) if spread else "127.0.0.1"
                status = raw(url, head, parts, source)
                with lock:
                    counts[f"{kind}: {status}"] = counts.get(f"{kind}: {status}", 0) + 1

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(CONNECTIONS)]
    for thread in threads:
        thread.start()
    threads[0].join()


def measure(app, client: httpx.Client, manager, spread: bool) -> dict:
    """ROUNDS of (idle request, attacked request) with one attacker running between them."""
    running, counts = manager.Event(), manager.dict()
    attacker = multiprocessing.Process(target=attack, args=(app.url, running, counts, spread), daemon=True)
    attacker.start()
    idle, attacked, server_cpu, attacker_cpu, attack_requests, attack_s = [], [], 0.0, 0.0, 0, 0.0
    for _ in range(ROUNDS):
        running.clear()
        time.sleep(0.5)  # the attacker's requests in flight end
        idle.append(legit(client))
        sent, started = sum(counts.values()), time.perf_counter()
        cpu, their_cpu = cpu_seconds(app.process.pid), cpu_seconds(attacker.pid)
        running.set()
        while sum(counts.values()) == sent:
            time.sleep(0.01)
        attacked.append(legit(client))
        server_cpu += cpu_seconds(app.process.pid) - cpu
        attacker_cpu += cpu_seconds(attacker.pid) - their_cpu
        attack_requests += sum(counts.values()) - sent
        attack_s += time.perf_counter() - started
    attacker.kill()
    return {"idle": statistics.median(idle), "attacked": statistics.median(attacked),
            "counts": dict(counts), "server_cpu": server_cpu, "attacker_cpu": attacker_cpu,
            "requests": attack_requests,
            "seconds": attack_s}


def main() -> int:
    if len(sys.argv) > 1:
        model = Path(sys.argv[1])
    else:
        from training.base import default_base
        model = default_base()
    with AppServer({"MODEL_ID": str(model), "CONCURRENCY": "1"}) as app, \
            multiprocessing.Manager() as manager, \
            httpx.Client(base_url=app.url, timeout=120, transport=httpx.HTTPTransport(
                local_address=LEGIT_ADDRESS)) as client:
        legit(client)  # warm
        results = {"one address": measure(app, client, manager, spread=False),
                   "a new address per request": measure(app, client, manager, spread=True)}
        health = app.health()[1]
    print(f"model: {model.name}, CONCURRENCY=1, attacker on {CONNECTIONS} connections; tokens "
          f"generated in all: {health['tokens_generated']} (the legitimate requests' only)")
    for attacker, r in results.items():
        print(f"attacker from {attacker}: {sum(r['counts'].values())} oversized requests (kind: status): "
              f"{r['counts']}")
        print(f"  while attacked: {r['requests'] / r['seconds']:.0f} oversized requests/s, the server's "
              f"CPU {r['server_cpu'] / r['seconds']:.2f} s per second (legitimate requests included), "
              f"the attacker's own {r['attacker_cpu'] / r['seconds']:.2f} s per second on the same 2 cores")
        print(f"  1-token request, median of {ROUNDS}: idle {r['idle'] * 1000:.0f} ms, under attack "
              f"{r['attacked'] * 1000:.0f} ms: {r['attacked'] / r['idle']:.2f}x (target <= 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
