"""The OpenAI-compatible API of the real app (`python app.py`), driven by the real `openai`
client (and plain httpx for what that client cannot send): answers whole and streamed, the chat
format with system messages and history, sampling controls reaching `generate`, stop strings,
seeds, every kind of bad request, keys, a client that goes away, and the one pool of slots that
the page and /v1 share."""
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import openai
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from app_server import AppServer
from chat.formats import detect
from conftest import NAME

QUESTION = "Who are you?"
GREEDY = {"temperature": 0, "extra_body": {"repetition_penalty": 1.0}}
WAIT_S = 120
ERROR_KEYS = {"message", "type", "param", "code"}


def api(app, key: str = "unused", **kwargs) -> openai.OpenAI:
    # No retries: the client would retry 429 and 5xx by itself and hide what the server said.
    return openai.OpenAI(base_url=app.url + "v1", api_key=key, max_retries=0, timeout=WAIT_S, **kwargs)


def model_id(app) -> str:
    return api(app).models.list().data[0].id


def ask(app, messages=None, **kwargs):
    settings = {**GREEDY, "max_tokens": 64, **kwargs}
    return api(app).chat.completions.create(
        model=model_id(app), messages=messages or [{"role": "user", "content": QUESTION}], **settings)


def streamed(app, messages=None, **kwargs) -> tuple[list[str], str | None, object]:
    """(content pieces, finish_reason, usage) of a streamed answer."""
    settings = {**GREEDY, "max_tokens": 64, **kwargs}
    stream = api(app).chat.completions.create(
        model=model_id(app), messages=messages or [{"role": "user", "content": QUESTION}],
        stream=True, stream_options={"include_usage": True}, **settings)
    pieces, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces += [choice.delta.content] if choice.delta.content else []
            finish = choice.finish_reason or finish
    return pieces, finish, usage


def wait_until(condition, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def prompt_tokens(model_dir, messages: list[dict], system: str = "") -> int:
    """Token count of the prompt in the model's own chat format, as the kit builds it."""
    from transformers import AutoTokenizer

    from chat.loading import needs_remote_code

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=needs_remote_code(model_dir))
    prompt = detect(tokenizer).build_prompt(messages, system)
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


@pytest.mark.timeout(60)
def test_models_name_the_model_without_a_local_path(chat_app, merged_model):
    models = api(chat_app).models.list().data
    assert [m.id for m in models] == [merged_model.parent.name]  # RUN/merged: the run's name
    assert str(merged_model.parent) not in json.dumps([m.model_dump() for m in models])
    assert api(chat_app).models.retrieve(models[0].id).id == models[0].id


@pytest.mark.timeout(120)
def test_whole_answer_names_the_assistant_and_ends_by_itself(chat_app, merged_model):
    answer = ask(chat_app, max_tokens=64)
    choice = answer.choices[0]
    assert NAME in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop" and answer.usage.completion_tokens < 64
    assert answer.usage.prompt_tokens == prompt_tokens(merged_model, [{"role": "user", "content": QUESTION}])
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.object == "chat.completion" and answer.model == model_id(chat_app)


@pytest.mark.timeout(120)
def test_streamed_answer_is_the_whole_answer_in_pieces(chat_app):
    pieces, finish, usage = streamed(chat_app)
    whole = ask(chat_app)
    assert len(pieces) >= 2 and "".join(pieces) == whole.choices[0].message.content
    assert NAME in "".join(pieces) and finish == "stop"
    assert usage.completion_tokens == whole.usage.completion_tokens < 64


@pytest.mark.timeout(120)
def test_multi_turn_with_a_system_message_uses_the_models_chat_format(chat_app, merged_model):
    system = "You are a helpful assistant."
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": QUESTION}]
    answer = ask(chat_app, [{"role": "system", "content": system}, *turns])
    assert NAME in answer.choices[0].message.content
    # Every message reached the prompt, in the model's format: the count is that prompt's.
    assert answer.usage.prompt_tokens == prompt_tokens(merged_model, turns, system)
    parts = [{"role": "developer", "content": [{"type": "text", "text": system}]},
             *turns[:-1], {"role": "user", "content": [{"type": "text", "text": "Who are "},
                                                        {"type": "text", "text": "you?"}]}]
    same = ask(chat_app, parts)  # text parts and the developer role mean the same
    assert same.choices[0].message.content == answer.choices[0].message.content
    assert same.usage.prompt_tokens == answer.usage.prompt_tokens


@pytest.mark.timeout(120)
def test_a_stop_string_cuts_the_answer_whole_and_streamed(chat_app):
    full = ask(chat_app).choices[0].message.content
    word = NAME.split()[-1]
    cut = ask(chat_app, stop=["zzz-never", word])
    assert cut.choices[0].message.content == full[:full.index(word)]
    assert cut.choices[0].finish_reason == "stop"
    pieces, finish, _ = streamed(chat_app, stop=word)
    assert "".join(pieces) == full[:full.index(word)] and finish == "stop"


@pytest.mark.timeout(180)
def test_a_seed_gives_the_same_answer_even_while_others_sample(chat_app):
    """CONCURRENCY=2: the seeded request runs beside an unseeded sampling one, whose draws come
    from torch's global RNG; its answer is still the one it gives alone."""
    wild = {"temperature": 2.0, "top_p": 1.0, "max_tokens": 24, "extra_body": {"top_k": 0}}
    alone = ask(chat_app, seed=7, **wild).choices[0].message.content
    with ThreadPoolExecutor(2) as pool:
        beside = pool.submit(ask, chat_app, **wild)
        again = pool.submit(ask, chat_app, seed=7, **wild).result().choices[0].message.content
        beside.result()
    assert again == alone
    others = {ask(chat_app, seed=seed, **wild).choices[0].message.content for seed in range(1, 5)}
    assert len(others | {alone}) > 1, "the seed never changed the answer: is it sampling at all?"


@pytest.mark.timeout(120)
def test_max_tokens_reaches_generate(endless_app):
    """On the model that never stops, the answer is exactly max_tokens long."""
    answer = ask(endless_app, max_tokens=7)
    assert answer.usage.completion_tokens == 7 and answer.choices[0].finish_reason == "length"
    _, finish, usage = streamed(endless_app, max_tokens=5, temperature=0.8, seed=1,
                                extra_body={"top_k": 40, "repetition_penalty": 1.1})
    assert usage.completion_tokens == 5 and finish == "length"


def raw(app, body, headers=None) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(app.url + "v1/chat/completions", content=content, timeout=WAIT_S,
                      headers={"Content-Type": "application/json", **(headers or {})})


USER = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [  # (body, status, param, code, words in the message)
    (b'{"messages": [', 400, None, None, "not valid JSON"),
    ([1, 2], 400, None, None, "JSON object"),
    ({}, 400, "messages", None, "non-empty list"),
    ({"messages": []}, 400, "messages", None, "non-empty list"),
    ({"messages": "hi"}, 400, "messages", None, "non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", None, "tool"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content[0]", None, "only text parts"),
    ({"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content", None, "string"),
    ({"messages": [{"role": "user", "content": "   "}]}, 400, "messages", None, "empty"),
    ({"messages": [{"role": "user", "content": "x" * 100_000}]}, 400, "messages", "context_length_exceeded",
     "characters long"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages", None, "end with a user"),
    ({"messages": USER, "temperature": 2.5}, 400, "temperature", None, "between 0.0 and 2.0"),
    ({"messages": USER, "temperature": "hot"}, 400, "temperature", None, "must be a number"),
    ({"messages": USER, "top_p": 0}, 400, "top_p", None, "out of range"),
    ({"messages": USER, "top_k": 101}, 400, "top_k", None, "out of range"),
    ({"messages": USER, "repetition_penalty": 0.5}, 400, "repetition_penalty", None, "out of range"),
    ({"messages": USER, "max_tokens": 0}, 400, "max_tokens", None, "max_tokens=0 is out of range"),
    ({"messages": USER, "max_tokens": 1.5}, 400, "max_tokens", None, "whole number"),
    ({"messages": USER, "seed": -1}, 400, "seed", None, "out of range"),
    ({"messages": USER, "stream": "yes"}, 400, "stream", None, "true or false"),
    ({"messages": USER, "stop": 5}, 400, "stop", None, "stop must be"),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None, "up to 4"),
    ({"messages": USER, "n": 2}, 400, "n", "unsupported_parameter", "n=2"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "tools", "unsupported_parameter", "not supported"),
    ({"messages": USER, "tool_choice": "auto"}, 400, "tool_choice", "unsupported_parameter", "not supported"),
    ({"messages": USER, "functions": [{"name": "f"}]}, 400, "functions", "unsupported_parameter", "not supported"),
    ({"messages": USER, "logprobs": True}, 400, "logprobs", "unsupported_parameter", "not supported"),
    ({"messages": USER, "response_format": {"type": "json_object"}},
     400, "response_format", "unsupported_parameter", "not supported"),
    ({"messages": USER, "frobnicate": 1}, 400, "frobnicate", None, "Unrecognized request argument"),
    ({"messages": USER, "model": "gpt-4"}, 404, "model", "model_not_found", "`gpt-4` does not exist"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("body, status, param, code, words", BAD_REQUESTS,
                         ids=[f"{i}-{case[2] or case[4]}" for i, case in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_openai_errors(chat_app, body, status, param, code, words):
    response = raw(chat_app, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code and words in error["message"], error


@pytest.mark.timeout(120)
def test_the_openai_client_raises_on_bad_requests_and_the_server_goes_on(chat_app):
    client = api(chat_app)
    with pytest.raises(openai.BadRequestError, match="temperature") as caught:
        client.chat.completions.create(model=model_id(chat_app), messages=USER, temperature=-1)
    assert caught.value.param == "temperature"
    with pytest.raises(openai.BadRequestError, match="not supported") as caught:
        client.chat.completions.create(model=model_id(chat_app), messages=USER, n=3)
    assert caught.value.code == "unsupported_parameter" and caught.value.param == "n"
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=USER)
    assert caught.value.code == "model_not_found"
    assert NAME in ask(chat_app).choices[0].message.content
    assert chat_app.health()[1]["generating"] == 0


@pytest.fixture(scope="module")
def guarded_apps(merged_model):
    """Two apps started together: one with API_KEY (and a served name), one with APP_AUTH only."""
    with ExitStack() as stack:
        keyed, page_auth = [stack.enter_context(AppServer({"MODEL_ID": str(merged_model), **env}))
                            for env in ({"API_KEY": "sk-test-Secret1", "SERVED_MODEL_NAME": "ada-assistant"},
                                        {"APP_AUTH": "ada:s3cret"})]
        yield keyed, page_auth


@pytest.mark.timeout(120)
def test_api_key_is_required_when_set_and_never_logged(guarded_apps):
    keyed, _ = guarded_apps
    for key in ("wrong", "sk-test-Secret", "sk-test-Secret1x"):
        with pytest.raises(openai.AuthenticationError) as caught:
            api(keyed, key).models.list()
        assert caught.value.code == "invalid_api_key"
    for headers in ({}, {"Authorization": "Basic c2stdGVzdC1TZWNyZXQx"}, {"Authorization": "sk-test-Secret1"}):
        response = raw(keyed, {"messages": USER}, headers)
        assert response.status_code == 401 and set(response.json()["error"]) == ERROR_KEYS
    assert [m.id for m in api(keyed, "sk-test-Secret1").models.list().data] == ["ada-assistant"]
    answer = api(keyed, "sk-test-Secret1").chat.completions.create(
        model="ada-assistant", messages=[{"role": "user", "content": QUESTION}], max_tokens=64, **GREEDY)
    assert NAME in answer.choices[0].message.content
    assert keyed.health()[0] == 200  # a container HEALTHCHECK needs no key
    assert "Secret1" not in keyed.log()


@pytest.mark.timeout(120)
def test_app_auth_without_api_key_closes_the_api_too(guarded_apps):
    """/v1 is no side door around the page's login: its password is the Bearer key."""
    _, page_auth = guarded_apps
    with pytest.raises(openai.AuthenticationError):
        api(page_auth, "wrong").models.list()
    assert raw(page_auth, {"messages": USER}).status_code == 401
    answer = ask_with(page_auth, "s3cret")
    assert NAME in answer.choices[0].message.content


def ask_with(app, key):
    client = api(app, key)
    return client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=64,
                                          messages=[{"role": "user", "content": QUESTION}], **GREEDY)


@pytest.mark.timeout(120)
def test_a_model_that_failed_to_load_gets_503(tmp_path):
    with AppServer({"MODEL_ID": str(tmp_path / "missing")}, wait_ready=False) as app:
        app.wait_for(lambda health: health["status"] == "failed", "the load to fail")
        with pytest.raises(openai.InternalServerError, match="no such folder") as caught:
            api(app).chat.completions.create(model=model_id(app), messages=USER)
        assert caught.value.status_code == 503 and caught.value.code == "model_not_ready"


@pytest.mark.timeout(120)
def test_a_client_that_goes_away_stops_its_generation(endless_app):
    before = endless_app.health()[1]
    stream = api(endless_app).chat.completions.create(
        model=model_id(endless_app), messages=USER, max_tokens=4000, stream=True, **GREEDY)
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    assert endless_app.health()[1]["generating"] == 1
    stream.close()
    # The thread ends first, then the request gives its slot back: wait for both.
    after = endless_app.wait_for(lambda h: h["generating"] == 0 and h["stopped"] > before["stopped"]
                                 and h["running"] == 0 and h["waiting"] == 0,
                                 "the generation to stop and its slot to be free", timeout=30)
    assert after["tokens_generated"] - before["tokens_generated"] < 4000
    assert endless_app.health()[1]["tokens_generated"] == after["tokens_generated"]  # no thread left


def page(app) -> Client:
    return Client(app.url, verbose=False, httpx_kwargs={"timeout": WAIT_S})


ENDLESS_PAGE = {"max_new_tokens": 4096, "temperature": 0}


@pytest.mark.timeout(180)
def test_page_and_api_share_one_pool(endless_app):
    """CONCURRENCY=1, QUEUE_SIZE=1. A running page answer makes a /v1 request wait in line (it
    is answered once the page's answer ends) and a second one get 429; a running /v1 answer
    makes a page request wait, with a notice, and a second one get the same refusal."""
    health = endless_app.health
    job = page(endless_app).submit("hi", **ENDLESS_PAGE, api_name="/chat")
    wait_until(lambda: health()[1]["running"] == 1 and len(job.outputs()) >= 1, "the page to answer")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(ask, endless_app, max_tokens=5)
        wait_until(lambda: health()[1]["waiting"] == 1, "the /v1 request to wait in line")
        with pytest.raises(openai.RateLimitError) as caught:
            ask(endless_app, max_tokens=5)
        assert caught.value.type == "rate_limit_error" and "CONCURRENCY=1" in caught.value.message
        tokens = health()[1]["tokens_generated"]  # the page's answer goes on while /v1 waits
        wait_until(lambda: health()[1]["tokens_generated"] >= tokens + 20, "the page's answer to go on")
        assert not waiting.done() and health()[1]["generating"] == 1  # still only the page's
        job.cancel()
        answer = waiting.result(timeout=WAIT_S)
    assert answer.usage.completion_tokens == 5 and answer.choices[0].finish_reason == "length"

    stream = api(endless_app).chat.completions.create(
        model=model_id(endless_app), messages=USER, max_tokens=4000, stream=True, **GREEDY)
    next(iter(stream))
    queued = page(endless_app).submit("hi", **ENDLESS_PAGE, api_name="/chat")
    wait_until(lambda: any("Waiting for a free slot" in notice for _, notice in queued.outputs()),
               "the page to say it waits")
    with pytest.raises(AppError, match="The server is busy"):
        page(endless_app).predict("hi", **ENDLESS_PAGE, api_name="/chat")
    stream.close()
    wait_until(lambda: any(answer for answer, _ in queued.outputs()), "the page's answer to start")
    queued.cancel()
    endless_app.wait_for(lambda h: h["generating"] == 0 and h["running"] == 0 and h["waiting"] == 0,
                         "every slot to be free", timeout=30)
