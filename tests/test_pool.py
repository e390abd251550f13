"""The one pool of generation slots (chat/pool.py): first come, first served under a line longer
than one, and every slot and place in line given back however a request ends: it leaves the line,
is refused, fails before or during its answer, or its client goes away at any stage. Unit tests on
the pool, then the real /v1 routes over HTTP on a scripted model (tests/scripted_api.py)."""
import json
import random
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from chat.pool import Pool, PoolFull
from scripted_api import FAIL, HOLD, TOO_LONG, WAIT_S, ScriptedAPI


def test_a_freed_slot_goes_to_the_first_in_line():
    pool = Pool(slots=1, queue_size=4)
    tickets = [pool.join() for _ in range(5)]
    assert [t.place() for t in tickets] == [0, 1, 2, 3, 4]
    for served in range(4):
        tickets[served].leave()
        assert [t.wait(0) for t in tickets[served + 1:]] == [True] + [False] * (3 - served)
        assert [t.place() for t in tickets[served + 1:]] == list(range(4 - served))
        assert pool.snapshot() == {"running": 1, "waiting": 3 - served}
    tickets[4].leave()
    assert pool.snapshot() == {"running": 0, "waiting": 0}


def test_leaving_the_line_keeps_the_order_of_the_rest():
    pool = Pool(slots=2, queue_size=3)
    running = [pool.join(), pool.join()]
    first, second, third = pool.join(), pool.join(), pool.join()
    second.leave()
    assert (first.place(), third.place()) == (1, 2) and pool.snapshot() == {"running": 2, "waiting": 2}
    running[1].leave()
    assert first.wait(0) and not third.wait(0) and third.place() == 1
    running[0].leave()
    assert third.wait(0) and pool.snapshot() == {"running": 2, "waiting": 0}
    first.leave(), third.leave()
    assert pool.snapshot() == {"running": 0, "waiting": 0}


def test_a_full_line_refuses_at_once_and_a_freed_place_admits_again():
    pool = Pool(slots=1, queue_size=2)
    holder, waiting = pool.join(), [pool.join(), pool.join()]
    with pytest.raises(PoolFull, match=r"1 answer\(s\) running and 2 waiting \(CONCURRENCY=1, QUEUE_SIZE=2\)"):
        pool.join()
    assert pool.snapshot() == {"running": 1, "waiting": 2}  # the refused one holds nothing
    waiting[0].leave()
    late = pool.join()
    assert late.place() == 2 and not late.wait(0)
    for ticket in (holder, waiting[1], late):
        ticket.leave()
    assert pool.snapshot() == {"running": 0, "waiting": 0}


def test_no_line_at_all_refuses_whenever_every_slot_is_busy():
    pool = Pool(slots=1, queue_size=0)
    ticket = pool.join()
    with pytest.raises(PoolFull):
        pool.join()
    ticket.leave()
    pool.join().leave()


def test_leaving_twice_frees_one_slot_only():
    pool = Pool(slots=2, queue_size=1)
    a, b = pool.join(), pool.join()
    a.leave()
    a.leave()
    assert pool.snapshot() == {"running": 1, "waiting": 0}
    waiting = [pool.join(), pool.join()]  # one free slot, one place in line: both admitted
    assert waiting[0].wait(0) and not waiting[1].wait(0)
    waiting[1].leave()
    waiting[1].leave()
    assert pool.snapshot() == {"running": 2, "waiting": 0}
    b.leave(), waiting[0].leave()
    assert pool.snapshot() == {"running": 0, "waiting": 0}


def test_many_threads_never_hold_more_slots_than_there_are_and_leave_nothing_behind():
    pool, lock = Pool(slots=3, queue_size=5), threading.Lock()
    holding, most, refused = [0], [0], [0]

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(50):
            try:
                ticket = pool.join()
            except PoolFull:
                with lock:
                    refused[0] += 1
                continue
            try:
                if rng.random() < 0.2 and not ticket.wait(0):
                    continue  # gives up its place in line
                assert ticket.wait(WAIT_S)
                with lock:
                    holding[0] += 1
                    most[0] = max(most[0], holding[0])
                with lock:
                    holding[0] -= 1
            finally:
                ticket.leave()

    with ThreadPoolExecutor(12) as threads:
        list(threads.map(client, range(12)))
    assert most[0] <= 3 and pool.snapshot() == {"running": 0, "waiting": 0}


# ---- through the real /v1 routes ----

def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=WAIT_S)


def ask(server, question: str, **kwargs):
    return client(server).chat.completions.create(
        model=server.settings.model_name, messages=[{"role": "user", "content": question}], **kwargs)


@pytest.fixture
def server():
    with ScriptedAPI(concurrency=1, queue_size=3) as server:
        yield server


def start_holding(server, pool) -> object:
    """A request that holds the only slot (its answer waits for server.model.release())."""
    future = pool.submit(ask, server, HOLD)
    server.wait_for(lambda: server.model.started == [HOLD], "the held answer to start")
    return future


def test_requests_in_line_are_answered_first_come_first_served(server):
    with ThreadPoolExecutor(4) as pool:
        held = start_holding(server, pool)
        futures = []
        for i, question in enumerate(["third", "first", "second"], 1):  # names unlike the order
            futures.append(pool.submit(ask, server, question))
            server.wait_for(lambda: server.pool.snapshot()["waiting"] == i, f"request {i} in line")
        server.model.release()
        answers = [f.result(WAIT_S).choices[0].message.content for f in (held, *futures)]
    assert server.model.started == [HOLD, "third", "first", "second"]
    assert answers == ["held, then done.", "Hello there.", "Hello there.", "Hello there."]
    server.wait_for(server.idle, "every slot to be free")


def raw_request(server, body: dict) -> socket.socket:
    """A POST /v1/chat/completions sent on a plain socket, left open so that the test decides
    when its client goes away."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_gone_while_in_line_gives_its_place_back_and_never_generates(server, stream):
    with ThreadPoolExecutor(2) as pool:
        held = start_holding(server, pool)
        gone = raw_request(server, {"messages": [{"role": "user", "content": "gone"}], "stream": stream})
        server.wait_for(lambda: server.pool.snapshot()["waiting"] == 1, "the request to wait in line")
        gone.close()
        server.wait_for(lambda: server.pool.snapshot() == {"running": 1, "waiting": 0},
                        "its place in line to be given back")
        later = pool.submit(ask, server, "later")
        server.wait_for(lambda: server.pool.snapshot()["waiting"] == 1, "the next request in line")
        server.model.release()
        assert later.result(WAIT_S).choices[0].message.content == "Hello there."
        assert held.result(WAIT_S).choices[0].message.content == "held, then done."
    assert server.model.started == [HOLD, "later"]
    server.wait_for(server.idle, "every slot to be free")


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_gone_during_its_answer_stops_it_and_frees_the_slot(server, stream):
    sock = raw_request(server, {"messages": [{"role": "user", "content": HOLD}], "stream": stream})
    server.wait_for(lambda: server.model.started == [HOLD], "the answer to start")
    if stream:
        assert b"held" in sock.recv(4096)  # the first event came before the client left
    sock.close()
    server.wait_for(server.idle, "the generation to stop and its slot to be free")
    assert server.model.unfinished == 1
    assert ask(server, "next").choices[0].message.content == "Hello there."


def test_a_refused_request_holds_nothing(server):
    with ThreadPoolExecutor(5) as pool:
        held = start_holding(server, pool)
        waiting = [pool.submit(ask, server, f"w{i}") for i in range(3)]
        server.wait_for(lambda: server.pool.snapshot()["waiting"] == 3, "a full line")
        with pytest.raises(openai.RateLimitError, match="QUEUE_SIZE=3"):
            ask(server, "one too many")
        assert server.pool.snapshot() == {"running": 1, "waiting": 3}
        server.model.release()
        assert [f.result(WAIT_S).choices[0].message.content for f in waiting] == ["Hello there."] * 3
        held.result(WAIT_S)
    server.wait_for(server.idle, "every slot to be free")


def test_failures_before_and_during_an_answer_give_the_slot_back(server):
    with pytest.raises(openai.BadRequestError, match="MAX_INPUT_TOKENS"):
        ask(server, TOO_LONG)
    assert server.idle()
    with pytest.raises(openai.InternalServerError, match="CUDA out of memory") as caught:
        ask(server, FAIL)
    assert caught.value.status_code == 500 and caught.value.type == "server_error"
    assert server.idle()
    server.model.script["mid"] = ["Half", RuntimeError("device lost")]
    response = httpx.post(server.v1 + "/chat/completions", timeout=WAIT_S,
                          json={"messages": [{"role": "user", "content": "mid"}]})
    assert response.status_code == 500, response.text
    assert response.json()["error"]["type"] == "server_error" and "device lost" in response.json()["error"]["message"]
    server.wait_for(server.idle, "the slot after a failed whole answer")
    stream = ask(server, "mid", stream=True)
    with pytest.raises(openai.APIError, match="device lost"):
        for _ in stream:
            pass
    server.wait_for(server.idle, "the slot after a failed streamed answer")
    assert ask(server, "after").choices[0].message.content == "Hello there."
    server.wait_for(server.idle, "every slot to be free")
