"""A legitimate 1-token /v1 request's latency while an attacker loops oversized requests, against
the idle latency, side by side in one run of the real app on the real small model (SmolLM2-135M,
CONCURRENCY=1). The attacker, a separate process (as a remote one would be), sends in turn: a
20 MB message (refused by its Content-Length), a chunked body without a Content-Length (refused
once 2 MiB have arrived) and a message just over the character limit but under the body limit
(refused before a slot, untokenized). Idle and attacked requests alternate, so both see the same
machine. Target: within 2x of idle (docs/security.md).

    python -m bench.bench_abuse [MODEL_DIR]    (default: the SmolLM2 base, `make base`)"""
import multiprocessing
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from app_server import AppServer  # noqa: E402 - the tests' way of running the real app

MAX_INPUT_TOKENS = 4096  # the app's default
ROUNDS = 15
LEGIT_ADDRESS = "127.0.0.2"  # the attacker comes from 127.0.0.1: another client, its own lockout count


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


def raw(url: str, head: bytes, body_parts) -> str:
    """Send a request by hand (an attacker need not send what it announces); the status line."""
    address = urlparse(url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as s:
        try:
            s.sendall(head)
            for part in body_parts:
                s.sendall(part)
        except OSError:
            pass  # the server answered and closed before the upload ended
        return s.recv(64).split(b" ")[1].decode() if head else ""


def attack(url: str, running, counts) -> None:
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
    while True:
        running.wait()
        for kind, (head, parts) in kinds.items():
            status = raw(url, head, parts)
            counts[f"{kind}: {status}"] = counts.get(f"{kind}: {status}", 0) + 1


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
        running, counts = manager.Event(), manager.dict()
        attacker = multiprocessing.Process(target=attack, args=(app.url, running, counts), daemon=True)
        attacker.start()
        legit(client)  # warm
        idle, attacked, server_cpu, attack_requests = [], [], 0.0, 0
        for _ in range(ROUNDS):
            running.clear()
            time.sleep(0.2)  # the attacker's request in flight ends
            idle.append(legit(client))
            sent, cpu = sum(counts.values()), cpu_seconds(app.process.pid)
            running.set()
            while sum(counts.values()) == sent:
                time.sleep(0.01)
            attacked.append(legit(client))
            server_cpu += cpu_seconds(app.process.pid) - cpu
            attack_requests += sum(counts.values()) - sent
        attacker.kill()
        counts, health = dict(counts), app.health()[1]
    idle_s, attacked_s = statistics.median(idle), statistics.median(attacked)
    print(f"model: {model.name}, CONCURRENCY=1; the attacker's {sum(counts.values())} oversized "
          f"requests (kind: status): {counts}; tokens generated in all: {health['tokens_generated']}")
    print(f"while attacked: {attack_requests} oversized requests, the server's CPU "
          f"{server_cpu:.2f} s in all (legitimate requests included)")
    print(f"1-token request, median of {ROUNDS}: idle {idle_s * 1000:.0f} ms, under attack "
          f"{attacked_s * 1000:.0f} ms: {attacked_s / idle_s:.2f}x (target <= 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
