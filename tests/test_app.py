"""The real app (`python app.py`) serving the tiny models, driven by gradio_client and plain
HTTP on 127.0.0.1: streaming, per-session history, the queue, cancelling, auth, bad input,
and models that cannot be loaded."""
import http.cookiejar
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError, AuthenticationError

from app_server import AppServer
from chat.loading import load_model
from conftest import IDENTITY_QUESTIONS, NAME, REPO

QUESTION = IDENTITY_QUESTIONS[0]
GREEDY = {"temperature": 0, "repetition_penalty": 1.0}
ENDLESS = {"max_new_tokens": 4096, "temperature": 0}  # on the endless model: runs until stopped
WAIT_S = 120
SERVER_TEST_S = 600  # budget of a test that starts its own app servers (START_TIMEOUT_S each, at once)


@pytest.fixture(scope="module")
def merged(merged_model):
    """The model in this process too, to count tokens as the app does."""
    return load_model(str(merged_model))


def client(app, **kwargs) -> Client:
    # A generous HTTP timeout: on a busy 2-core machine the server can stall for seconds.
    return Client(app.url, verbose=False, httpx_kwargs={"timeout": WAIT_S}, **kwargs)


def chat(app_client: Client, message: str, **settings) -> tuple[str, str]:
    """(answer, notice) for `message` in this client's session."""
    return app_client.predict(message, **{**GREEDY, **settings}, api_name="/chat")


def wait_until(condition, what: str):
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_health_is_ready_and_the_page_names_the_model(chat_app, merged_model):
    """By its public name (the run's), never by the server's local path (docs/security.md)."""
    status, body = chat_app.health()
    assert status == 200 and body["status"] == "ready" and body["model"] == merged_model.parent.name
    with urllib.request.urlopen(chat_app.url, timeout=WAIT_S) as page:
        text = page.read().decode()
    assert merged_model.parent.name in text and str(merged_model) not in text


@pytest.mark.timeout(WAIT_S)
def test_streams_partial_answers_ending_with_the_name_and_by_itself(chat_app):
    before = chat_app.health()[1]
    job = client(chat_app).submit(QUESTION, **GREEDY, max_new_tokens=512, api_name="/chat")
    answers = [answer for answer, _ in job]
    final, notice = job.result()
    assert len(set(answers)) >= 3, answers
    assert all(later.startswith(earlier) for earlier, later in zip(answers, answers[1:]))
    assert NAME in final and notice == ""
    after = chat_app.wait_for(lambda h: h["generating"] == 0, "the generation to end")
    # It ended at a stop token, not at the limit: an answer that runs on to 512 tokens is broken.
    assert after["finished"] == before["finished"] + 1
    assert after["tokens_generated"] - before["tokens_generated"] < 128


@pytest.mark.timeout(WAIT_S)
def test_max_new_tokens_decides_the_length_of_an_endless_answer(endless_app):
    """A setting from the page reaches generation: the endless model stops only at the limit."""
    for limit in (3, 11):
        before = endless_app.health()[1]
        chat(client(endless_app), "hi", max_new_tokens=limit)
        after = endless_app.wait_for(lambda h: h["generating"] == 0, "the generation to end")
        assert after["tokens_generated"] - before["tokens_generated"] == limit


def test_two_clients_at_once_keep_their_own_history(chat_app):
    """History is visible through trimming: A's two long messages no longer fit the prompt
    budget together, while B's short + long ones do. Shared history would trim B too."""
    long_a, long_b = "a" * 500, "b" * 500
    settings = {"max_new_tokens": 100}  # budget 1024 - 100 tokens; answers stay under 100
    a, b = client(chat_app), client(chat_app)
    with ThreadPoolExecutor(2) as pool:  # CONCURRENCY=2: both generate at the same time
        first = [pool.submit(chat, a, long_a, **settings), pool.submit(chat, b, "hi", **settings)]
        assert [f.result()[1] for f in first] == ["", ""]
        second = [pool.submit(chat, a, long_a, **settings), pool.submit(chat, b, long_b, **settings)]
        (_, notice_a), (_, notice_b) = [f.result() for f in second]
    assert notice_a == "The 2 oldest message(s) were left out so that the conversation fits the " \
                       "924-token prompt budget."
    assert notice_b == ""


def test_bad_input_gets_a_clear_message_and_the_server_keeps_serving(chat_app):
    app_client = client(chat_app)
    for message, settings, expected in [
        ("", {}, "Your message is empty"),
        (" \n\t", {}, "Your message is empty"),
        ("x" * 100_000, {}, "Your message is 100,000 characters long; the limit is"),
        ("hi", {"max_new_tokens": 0}, "Value 0 is less than minimum value 1"),
        ("hi", {"max_new_tokens": 10**9}, "Value 1000000000 is greater than maximum value 4096"),
        ("hi", {"temperature": -1}, "Value -1 is less than minimum value 0"),
        ("hi", {"top_p": 2}, "Value 2 is greater than maximum value 1"),
    ]:
        with pytest.raises(AppError, match=expected):
            chat(app_client, message, **settings)
    # JSON clients can send NaN, which gradio_client cannot: plain HTTP.
    events = http_chat(chat_app, ["hi", None, "", 64, float("nan"), 0.8, 50, 1.0])
    assert events[-1][0] == "error" and "temperature must be a number, got nan" in events[-1][1]
    answer, notice = chat(app_client, QUESTION, max_new_tokens=4096)  # more than the context
    assert NAME in answer
    assert notice.startswith("max_new_tokens lowered from 4096 to ")


def http_chat(app, data: list, opener=None) -> list[tuple[str, str]]:
    """The plain HTTP API: POST the inputs, then read the answer's server-sent events (`opener`:
    e.g. one that sends the login cookie)."""
    opener = opener or urllib.request.build_opener()
    request = urllib.request.Request(app.url + "gradio_api/call/chat", json.dumps({"data": data}).encode(),
                                     {"Content-Type": "application/json"})
    with opener.open(request, timeout=WAIT_S) as response:
        event_id = json.load(response)["event_id"]
    events, kind = [], None
    with opener.open(f"{app.url}gradio_api/call/chat/{event_id}", timeout=WAIT_S) as stream:
        for line in stream:
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: ") and kind != "heartbeat":
                events.append((kind, line[len("data: "):]))
    return events


def test_plain_http_streams_the_answer(chat_app):
    events = http_chat(chat_app, [QUESTION, None, "", 512, 0, 0.8, 50, 1.0])
    kinds = [kind for kind, _ in events]
    assert kinds.count("generating") >= 2 and kinds[-1] == "complete", kinds
    answer, _history, notice = json.loads(events[-1][1])
    assert NAME in answer and notice == ""


def test_cancelling_a_job_ends_its_generating_thread(endless_app):
    before = endless_app.health()[1]
    job = client(endless_app).submit("hi", **ENDLESS, api_name="/chat")
    wait_until(lambda: len(job.outputs()) >= 3, "the answer to stream")
    job.cancel()
    after = endless_app.wait_for(lambda h: h["generating"] == 0 and h["stopped"] > before["stopped"],
                                 "the generating thread to stop", timeout=WAIT_S)
    assert after["finished"] == before["finished"]
    assert after["tokens_generated"] - before["tokens_generated"] < ENDLESS["max_new_tokens"]
    assert endless_app.health()[1]["tokens_generated"] == after["tokens_generated"]  # no thread left


def test_a_full_queue_refuses_new_requests_clearly(endless_app):
    """CONCURRENCY=1, QUEUE_SIZE=1: one answer running, one waiting (the page says so), the
    third is refused. The line is the app's pool, which /v1 shares (tests/test_api.py)."""
    running = client(endless_app).submit("hi", **ENDLESS, api_name="/chat")
    wait_until(lambda: len(running.outputs()) >= 1, "the first answer to stream")
    waiting = client(endless_app).submit("hi", **ENDLESS, api_name="/chat")
    wait_until(lambda: {notice for _, notice in waiting.outputs()} == {"Waiting for a free slot: number 1 in line."},
               "the second request to wait in line")
    with pytest.raises(AppError, match="The server is busy: 1 answer.s. running and 1 waiting"):
        client(endless_app).submit("hi", **ENDLESS, api_name="/chat").result()
    running.cancel()
    waiting.cancel()
    wait_until(lambda: running.done() and waiting.done(), "both jobs to end")
    endless_app.wait_for(lambda h: h["generating"] == 0, "generation to stop", timeout=WAIT_S)


def limit_of(app_client, **settings) -> int:
    """The prompt budget left for a message, from the refusal of one too long for it."""
    with pytest.raises(AppError) as refused:
        chat(app_client, "x" * 2000, **settings)
    return int(re.search(r"the limit is (\d+) tokens", str(refused.value)).group(1))


@pytest.mark.timeout(SERVER_TEST_S)
def test_app_auth_system_prompt_and_max_input_tokens(merged_model, merged):
    """README's settings on one server: APP_AUTH (gradio_client and the README's curl login),
    SYSTEM_PROMPT (the system box's initial value, which reaches the prompt: its tokens come off
    the budget), MAX_INPUT_TOKENS (the budget of a message)."""
    system = "You are Ada Lin's assistant."
    env = {"MODEL_ID": str(merged_model), "APP_AUTH": "ada:s3cret", "SYSTEM_PROMPT": system,
           "MAX_INPUT_TOKENS": "300"}
    with AppServer(env) as app:
        with pytest.raises(AuthenticationError):
            client(app)
        with pytest.raises(ValueError, match="Could not login"):
            client(app, auth=("ada", "wrong"))
        with pytest.raises(urllib.error.HTTPError, match="401"):
            http_chat(app, ["hi", None])
        assert app.health()[0] == 200  # a container HEALTHCHECK needs no credentials
        logged_in = client(app, auth=("ada", "s3cret"))
        answer, _ = chat(logged_in, QUESTION)
        assert NAME in answer

        # curl -c cookies -d username=USER -d password=PASS URL/login, then -b cookies
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        opener.open(app.url + "login", urllib.parse.urlencode({"username": "ada", "password": "s3cret"}).encode(),
                    timeout=WAIT_S).close()
        events = http_chat(app, [QUESTION, None, "", 64, 0, 0.8, 50, 1.0], opener=opener)
        assert events[-1][0] == "complete" and NAME in json.loads(events[-1][1])[0]

        def cost(text: str) -> int:
            return len(merged.tokenizer(text, add_special_tokens=False)["input_ids"])
        fixed = cost(merged.format.build_prompt([], system))
        assert limit_of(logged_in) == 300 - fixed                         # SYSTEM_PROMPT is the default
        assert limit_of(logged_in, system="") == 300 - cost(merged.format.build_prompt([]))  # the box overrides it


@pytest.mark.timeout(SERVER_TEST_S)
def test_models_that_cannot_load_keep_health_not_ready(tmp_path, merged_model):
    """Each bad MODEL_ID / MODEL_REVISION: a clear error at start-up, /health 503 with the
    reason, and the page still answers chat requests with that reason."""
    cases = [
        ({"MODEL_ID": str(tmp_path / "missing")}, "no such folder"),
        ({"MODEL_ID": "nobody/no-such-model"}, "cannot reach .* not in the local cache"),
        ({"MODEL_ID": str(merged_model), "MODEL_REVISION": "v2"}, "only applies to hub repos"),
        ({"MODEL_ID": str(merged_model), "DEVICE": "tpu9"}, "DEVICE='tpu9'"),
    ]
    with ExitStack() as stack:  # start them all at once: each start-up mostly waits on imports
        apps = [stack.enter_context(AppServer(env, wait_ready=False)) for env, _ in cases]
        for app, (_, reason) in zip(apps, cases):
            body = app.wait_for(lambda h: h["status"] != "loading", "the load to fail")
            assert app.health()[0] == 503 and body["status"] == "failed"
            assert body["generating"] == 0 and re.search(reason, body["error"]), body
            assert "the model could not be loaded" in app.log()
            with pytest.raises(AppError, match="The model could not be loaded"):
                chat(client(app), "hi")


@pytest.mark.timeout(SERVER_TEST_S)
def test_serves_a_hub_model_at_a_pinned_revision(tmp_path, merged_model):
    """The production path (snapshot_download from HF_ENDPOINT) against a local fake Hub."""
    from fake_hub import FakeHub

    with FakeHub({"hf_appTestToken": "alice"}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_appTestToken", "HF_HUB_OFFLINE": "0"}
        commit = hub.add_repo("alice/assistant", {p.name: p.read_bytes() for p in merged_model.iterdir() if p.is_file()})
        cases = [("alice/assistant", commit, None),
                 ("alice/assistant", "v9", "MODEL_REVISION=v9: no such branch, tag or commit in alice/assistant"),
                 ("alice/nothing", "", "model repo alice/nothing on http://127.0.0.1:\\d+ not found")]
        with ExitStack() as stack:
            apps = [stack.enter_context(AppServer({**env, "MODEL_ID": repo, "MODEL_REVISION": revision,
                                                   "HF_HOME": str(tmp_path / f"hf-home-{i}")},
                                                  wait_ready=False))
                    for i, (repo, revision, _) in enumerate(cases)]
            for app, (_, _, error) in zip(apps, cases):
                body = app.wait_for(lambda h: h["status"] != "loading", "the model to load")
                if error is None:
                    assert body["status"] == "ready", body
                    assert NAME in chat(client(app), QUESTION)[0]
                else:
                    assert body["status"] == "failed" and re.search(error, body["error"]), body


@pytest.mark.timeout(SERVER_TEST_S)
def test_bad_settings_stop_the_app_with_a_message(merged_model):
    cases = [({"CONCURRENCY": "many"}, "CONCURRENCY='many': must be a whole number"),
             ({"APP_AUTH": "nopassword"}, "APP_AUTH must be user:password")]

    def start(env):
        return subprocess.run([sys.executable, "app.py"], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "MODEL_ID": str(merged_model), **env}, timeout=WAIT_S)

    with ThreadPoolExecutor(len(cases)) as pool:
        for (_, message), result in zip(cases, pool.map(start, [env for env, _ in cases])):
            assert result.returncode == 2 and f"error: {message}" in result.stderr
