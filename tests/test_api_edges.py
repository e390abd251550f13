"""/v1 at the edges of the protocol, with the real `openai` client and httpx: which Authorization
headers are a key, every parameter the client can send either honoured or named in a 400, stop
strings split across streamed pieces and up to OpenAI's 4 of them, the stream's last event
`data: [DONE]`, finish_reason when the stop token is exactly the max_tokens-th token, and a client
that leaves while still in line. The routes run on a scripted model where the test must decide the
answer's pieces (tests/scripted_api.py), on the real app with the trained tiny model otherwise."""
import inspect
import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from openai.resources.chat.completions import Completions

from chat.generation import StopOnEvent
from scripted_api import WAIT_S, ScriptedAPI

KEY = "sk-test-Edge1"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server():
    with ScriptedAPI(concurrency=1, queue_size=2) as server:
        yield server


@pytest.fixture(scope="module")
def keyed():
    with ScriptedAPI(api_key=KEY) as server:
        yield server


def client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0, timeout=WAIT_S)


def post(server, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(server.v1 + "/chat/completions", json=body, headers=headers, timeout=WAIT_S)


# ---- keys ----
@pytest.mark.parametrize("header", [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER {KEY}", f"Bearer  {KEY}"])
def test_a_bearer_key_is_accepted_in_any_case_of_the_scheme(keyed, header):
    response = post(keyed, {"messages": USER}, {"Authorization": header})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Hello there."


@pytest.mark.parametrize("header", [None, "", KEY, f"Basic {KEY}", f"Token {KEY}", f"Bearer{KEY}", "Bearer",
                                    f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"Bearer {KEY} {KEY}",
                                    f"Bearer x{KEY}", f"Bearer {KEY.lower()}"])
def test_anything_but_bearer_and_the_exact_key_is_refused(keyed, header):
    headers = {} if header is None else {"Authorization": header}
    started = len(keyed.model.started)
    for response in (post(keyed, {"messages": USER}, headers),
                     httpx.get(keyed.v1 + "/models", headers=headers, timeout=WAIT_S)):
        assert response.status_code == 401, (header, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    assert len(keyed.model.started) == started  # refused before any work


def test_the_openai_client_with_the_key_is_answered_and_without_it_refused(keyed):
    assert client(keyed, KEY).chat.completions.create(model=keyed.settings.model_name,
                                                      messages=USER).choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        client(keyed, "sk-wrong").chat.completions.create(model=keyed.settings.model_name, messages=USER)


# ---- parameters ----
# A value asking for something, for every parameter of the openai client's create().
ASKING = {
    "audio": {"voice": "alloy", "format": "wav"}, "frequency_penalty": 0.5, "function_call": "auto",
    "functions": [{"name": "f", "parameters": {}}], "logit_bias": {"50256": -100}, "logprobs": True,
    "max_completion_tokens": 5, "max_tokens": 5, "metadata": {"team": "a"}, "modalities": ["text", "audio"],
    "moderation": {"mode": "block"}, "n": 2, "parallel_tool_calls": True, "prediction": {"type": "content", "content": "x"},
    "presence_penalty": -0.5, "prompt_cache_key": "k", "prompt_cache_options": {"ttl": "1h"},
    "prompt_cache_retention": "24h", "reasoning_effort": "high", "response_format": {"type": "json_object"},
    "safety_identifier": "u1", "seed": 3, "service_tier": "flex", "stop": ["x"], "store": True, "stream": True,
    "stream_options": {"include_usage": True}, "temperature": 0.5,
    "tool_choice": "auto", "tools": [{"type": "function", "function": {"name": "f"}}], "top_logprobs": 2,
    "top_p": 0.5, "user": "u1", "verbosity": "low", "web_search_options": {},
}
HONOURED = {"max_completion_tokens", "max_tokens", "seed", "stop", "stream", "stream_options", "temperature", "top_p"}
# Labels for the caller's own bookkeeping: they ask nothing of the answer.
BOOKKEEPING = {"metadata", "prompt_cache_key", "safety_identifier", "service_tier", "store", "user",
               "parallel_tool_calls"}  # the last: only means something with tools, which are refused


def client_parameters() -> list[str]:
    transport = {"self", "messages", "model", "extra_headers", "extra_query", "extra_body", "timeout"}
    return [p for p in inspect.signature(Completions.create).parameters if p not in transport]


def test_every_parameter_of_the_openai_client_has_a_case_here():
    assert sorted(set(client_parameters()) - set(ASKING)) == [], "add a value that asks for something"


@pytest.mark.parametrize("parameter", sorted(ASKING))
def test_a_parameter_the_server_cannot_honour_is_named_in_a_400(server, parameter):
    response = post(server, {"messages": USER, parameter: ASKING[parameter],
                             **({"stream": True} if parameter == "stream_options" else {})})
    if parameter in HONOURED | BOOKKEEPING:
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 400, f"{parameter}={ASKING[parameter]!r} was accepted silently"
    error = response.json()["error"]
    assert error["param"] == parameter and parameter in error["message"], error


def test_stream_options_other_than_include_usage_are_named(server):
    response = post(server, {"messages": USER, "stream": True,
                             "stream_options": {"include_usage": True, "include_obfuscation": True}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options.include_obfuscation"


def test_the_openai_client_sees_the_unsupported_parameter_named(server):
    with pytest.raises(openai.BadRequestError) as caught:
        client(server).chat.completions.create(model=server.settings.model_name, messages=USER,
                                               presence_penalty=1.0)
    assert caught.value.param == "presence_penalty" and caught.value.code == "unsupported_parameter"


@pytest.mark.parametrize("parameter, value", [("n", 1), ("presence_penalty", 0), ("frequency_penalty", 0.0),
                                              ("logprobs", False), ("tool_choice", "none"), ("tools", []),
                                              ("response_format", {"type": "text"})])
def test_values_that_ask_for_nothing_are_accepted(server, parameter, value):
    assert post(server, {"messages": USER, parameter: value}).status_code == 200


# ---- stop strings ----
def answer(server, question: str, pieces: list[str], stop, stream: bool, model_finish: str) -> tuple[str, str]:
    """(content, finish_reason) of the scripted answer `pieces` (its growing texts), which the
    model says ended with `model_finish`."""
    server.model.script[question] = pieces
    server.model.finish[question] = model_finish
    create = client(server).chat.completions.create
    kwargs = {"model": server.settings.model_name, "messages": [{"role": "user", "content": question}],
              "stop": stop}
    if not stream:
        choice = create(**kwargs).choices[0]
        return choice.message.content, choice.finish_reason
    content, finish = "", None
    for chunk in create(stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return content, finish


STOP_CASES = [  # (growing texts, stop, content, finish_reason); the model ran to max_tokens ("length")
    (["Hello wor", "Hello world. ST", "Hello world. STOP and more"], "STOP", "Hello world. ", "stop"),
    (["Hello S", "Hello ST", "Hello STO", "Hello STOP"], ["STOP"], "Hello ", "stop"),     # over 4 pieces
    (["Hello ST", "Hello STx", "Hello STx!"], "STOP", "Hello STx!", "length"),             # held back, then sent
    (["ab", "abcd", "abcdef"], ["zz", "de", "cd"], "ab", "stop"),                          # the earliest wins
    (["a", "a cd de"], ["de", "cd"], "a ", "stop"),                                        # both in one piece
    (["STOP now"], "STOP", "", "stop"),                                                    # nothing before it
    (["one", "one two", "one two three"], ["a", "b", "c", "three"], "one two ", "stop"),  # the 4th of 4
    (["Hello", "Hello there."], [], "Hello there.", "length"),
    (["Hello", "Hello there."], ["x"], "Hello there.", "length"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("pieces, stop, content, finish", STOP_CASES, ids=range(len(STOP_CASES)))
def test_stop_strings_split_across_pieces_cut_the_answer(server, pieces, stop, content, finish, stream):
    assert answer(server, f"q{pieces}{stop}", pieces, stop, stream, "length") == (content, finish)
    server.wait_for(server.idle, "the answer's slot")


def test_a_streamed_piece_never_shows_part_of_a_stop_string(server):
    server.model.script["parts"] = ["Hi <", "Hi <|", "Hi <|e", "Hi <|end|> tail"]
    stream = client(server).chat.completions.create(
        model=server.settings.model_name, messages=[{"role": "user", "content": "parts"}], stop="<|end|>",
        stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == "Hi " and not any("<" in piece for piece in pieces)


@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], "", [""], ["a", 1], {"a": 1}])
def test_more_than_four_or_empty_stop_strings_are_refused(server, stop):
    response = post(server, {"messages": USER, "stop": stop})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stop", response.text


# ---- the event stream ----
def events(response: httpx.Response) -> list[str]:
    """The data of each server-sent event, checking the framing: `data: ...` then a blank line."""
    body = response.read().decode()
    assert body.endswith("\n\n"), body[-200:]
    blocks = body[:-2].split("\n\n")
    assert all(block.startswith("data: ") and "\n" not in block for block in blocks), blocks
    return [block[len("data: "):] for block in blocks]


def streamed_events(url: str, body: dict, headers: dict | None = None) -> list[str]:
    with httpx.stream("POST", url + "/chat/completions", json={"stream": True, **body},
                      headers=headers, timeout=WAIT_S) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        return events(response)


def test_the_stream_ends_with_done_after_the_finish_and_usage(server):
    data = streamed_events(server.v1, {"messages": USER, "stream_options": {"include_usage": True}})
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 2) + ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "Hello there."
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_a_stream_that_fails_midway_says_so_and_still_ends_with_done(server):
    server.model.script["breaks"] = ["Half", RuntimeError("device lost")]
    data = streamed_events(server.v1, {"messages": [{"role": "user", "content": "breaks"}]})
    assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["type"] == "server_error"
    assert "device lost" in json.loads(data[-2])["error"]["message"]
    server.wait_for(server.idle, "the slot after the failure")


@pytest.mark.timeout(120)
def test_the_real_apps_stream_ends_with_done(chat_app):
    data = streamed_events(chat_app.url + "v1", {"messages": [{"role": "user", "content": "Who are you?"}],
                                                 "max_tokens": 8, "temperature": 0})
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    assert json.loads(data[-2])["choices"][0]["finish_reason"] in ("stop", "length")


# ---- finish_reason at exactly max_tokens ----
STOP_ID, OTHER = 2, 7


def finish(answer_ids: list[int], max_new_tokens: int) -> dict:
    stopper = StopOnEvent(None)
    stopper.ids = torch.tensor([[1, 1, 1] + answer_ids])
    return stopper.finish_info(prompt_tokens=3, max_new_tokens=max_new_tokens, stop_ids=[STOP_ID, 92542])


def test_finish_reason_is_stop_when_the_stop_token_is_the_last_allowed_token():
    assert finish([OTHER, OTHER, STOP_ID], 3) == {"prompt_tokens": 3, "completion_tokens": 3, "finish_reason": "stop"}
    assert finish([OTHER, OTHER, 92542], 3)["finish_reason"] == "stop"
    assert finish([OTHER, OTHER, OTHER], 3)["finish_reason"] == "length"
    assert finish([OTHER, STOP_ID], 3)["finish_reason"] == "stop"
    assert finish([STOP_ID], 1)["finish_reason"] == "stop"
    assert finish([OTHER, OTHER], 3)["finish_reason"] == "stop"  # stopped by the caller one token short
    assert finish([], 3) == {"prompt_tokens": 3, "completion_tokens": 0, "finish_reason": "stop"}


@pytest.mark.timeout(120)
def test_the_real_app_says_stop_at_exactly_max_tokens_and_length_one_below(chat_app):
    api = openai.OpenAI(base_url=chat_app.url + "v1", api_key="unused", max_retries=0, timeout=WAIT_S)
    model = api.models.list().data[0].id

    def ask(max_tokens: int):
        return api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Who are you?"}],
                                           max_tokens=max_tokens, temperature=0,
                                           extra_body={"repetition_penalty": 1.0})
    free = ask(256)
    used = free.usage.completion_tokens  # the stop token included
    assert free.choices[0].finish_reason == "stop" and 1 < used < 256
    exact = ask(used)
    assert (exact.choices[0].finish_reason, exact.usage.completion_tokens) == ("stop", used)
    assert exact.choices[0].message.content == free.choices[0].message.content
    short = ask(used - 1)
    assert (short.choices[0].finish_reason, short.usage.completion_tokens) == ("length", used - 1)


# ---- a client that leaves while in line, on the real app ----
@pytest.mark.timeout(180)
def test_a_client_gone_while_in_line_on_the_real_app_gives_its_place_back(endless_app):
    """CONCURRENCY=1, QUEUE_SIZE=1: a running answer, one request in line that leaves; the line
    is empty again and the next request is admitted, not refused."""
    api = openai.OpenAI(base_url=endless_app.url + "v1", api_key="unused", max_retries=0, timeout=WAIT_S)
    model = api.models.list().data[0].id
    running = api.chat.completions.create(model=model, messages=USER, max_tokens=4000, stream=True,
                                          temperature=0)
    next(iter(running))
    payload = json.dumps({"messages": USER, "max_tokens": 3}).encode()
    gone = socket.create_connection(("127.0.0.1", endless_app.port), timeout=WAIT_S)
    gone.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    endless_app.wait_for(lambda h: h["waiting"] == 1, "the request to wait in line", timeout=60)
    gone.close()
    endless_app.wait_for(lambda h: h["waiting"] == 0 and h["running"] == 1, "its place to come back", timeout=60)
    with ThreadPoolExecutor(1) as pool:
        admitted = pool.submit(api.chat.completions.create, model=model, messages=USER, max_tokens=3,
                               temperature=0)
        endless_app.wait_for(lambda h: h["waiting"] == 1, "the next request to be admitted in line", timeout=60)
        running.close()
        assert admitted.result(WAIT_S).usage.completion_tokens == 3
    endless_app.wait_for(lambda h: h["generating"] == 0 and h["running"] == 0 and h["waiting"] == 0,
                         "every slot to be free", timeout=60)
