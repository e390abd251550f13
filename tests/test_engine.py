"""`make serve-engine` and the app on an engine (ENGINE_URL).

The fast tests (every `make test`) check the command line each engine would run, GPU ones
included, and that bad knobs are refused before anything is installed. The `engine` tests
(`make test-engine`, which installs vLLM's CPU build first) serve the session's merged model
through `make serve-engine` and drive the engine, the app page (gradio_client) and the app's /v1
(openai client) on it, then kill the engine and bring it back under the running app."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from openai import OpenAI

from app_server import AppServer
from chat import formats
from chat.settings import ENGINE_CONCURRENCY, Settings, SettingsError
from conftest import NAME, REPO
from deploy import DeployError
from deploy.engine import BUILDS, Knobs, command, write_family_files
from engine_server import EngineServer, group_alive

QUESTION = "Who are you?"
GREEDY = {"temperature": 0, "repetition_penalty": 1.0}
WAIT_S = 120


def knobs(engine: str, device: str, **extra) -> Knobs:
    values = dict(engine=engine, device=device, model=Path("/m/merged"), name="ada",
                  host="0.0.0.0", port=8000, max_model_len=None, tp=2)
    return Knobs(**{**values, **extra})


def test_each_engine_runs_exactly_this_command():
    family, venv = Path("/f"), Path("/v")
    assert command(knobs("vllm", "cuda"), venv, remote_code=True, family=family) == (
        ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m/merged",
         "--served-model-name", "ada", "--host", "0.0.0.0", "--port", "8000",
         "--chat-template", "/f/chat_template.jinja", "--generation-config", "/f",
         "--trust-remote-code", "--tensor-parallel-size", "2"],
        {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"})
    assert command(knobs("lmdeploy", "cuda", max_model_len=4096), venv, remote_code=True,
                   family=family) == (
        ["/v/bin/lmdeploy", "serve", "api_server", "/m/merged", "--server-name", "0.0.0.0",
         "--server-port", "8000", "--model-name", "ada", "--tp", "2", "--session-len", "4096"],
        {"HF_HUB_OFFLINE": "1"})
    assert command(knobs("vllm", "cpu", max_model_len=1024, tp=1), venv, remote_code=False,
                   family=family) == (
        ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m/merged",
         "--served-model-name", "ada", "--host", "0.0.0.0", "--port", "8000",
         "--chat-template", "/f/chat_template.jinja", "--generation-config", "/f",
         "--max-model-len", "1024", "--dtype", "float32", "--enforce-eager"],
        {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert command(knobs("llamacpp", "cpu", model=Path("/r/gguf/model-q8_0.gguf"), max_model_len=None),
                   venv, remote_code=False, family=family) == (
        ["/v/bin/python", "-m", "deploy.llamacpp_server", "/r/gguf/model-q8_0.gguf", "ada",
         "0.0.0.0", "8000", "1024", "4"], {"PYTHONPATH": str(REPO)})
    assert {build.venv for build in BUILDS.values()} == {
        ".venv-engine", ".venv-engine-cuda", ".venv-engine-lmdeploy", ".venv-llamacpp"}
    for build in BUILDS.values():
        assert (REPO / build.requirements).is_file()


def test_the_engine_gets_the_familys_template_and_stop_ids(tiny_base, tmp_path):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    fmt = formats.detect(tokenizer)
    stops = formats.stop_ids(tokenizer, fmt)
    folder = write_family_files(tiny_base, tmp_path, fmt.chat_template, stops)
    assert (folder / "chat_template.jinja").read_text() == fmt.chat_template
    config = json.loads((folder / "generation_config.json").read_text())
    assert config["eos_token_id"] == stops == [tokenizer.convert_tokens_to_ids(token)
                                               for token in ("</s>", "<|im_end|>")]


@pytest.mark.parametrize("env, message", [
    ({"SERVE_ENGINE": "bogus"}, "SERVE_ENGINE='bogus': use vllm, lmdeploy or llamacpp"),
    ({"SERVE_ENGINE": "lmdeploy", "ENGINE_DEVICE": "cpu"}, "needs an NVIDIA GPU"),
    ({"ENGINE_PORT": "80x"}, "ENGINE_PORT='80x'"),
    ({"MODEL_ID": "/no/such/folder"}, "is not a complete model folder"),
    ({"SERVE_ENGINE": "llamacpp"}, "run `make gguf QUANT=q8_0` first"),
])
def test_bad_knobs_are_refused_before_installing(env, message, tiny_base):
    """Through make, as a user runs it: an error naming the knob, within seconds, before any
    install starts."""
    started = time.monotonic()
    result = subprocess.run(["make", "--no-print-directory", "serve-engine"], cwd=REPO,
                            env={**os.environ, "MODEL_ID": str(tiny_base), **env},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert "installing" not in result.stderr
    assert time.monotonic() - started < 30


def test_knobs_read_from_the_environment_without_a_gpu():
    assert Knobs.from_env({"ENGINE_DEVICE": "cpu"}, need_model=False) == Knobs(
        "vllm", "cpu", None, "assistant", "127.0.0.1", 8000, 1024, 1)
    with pytest.raises(DeployError, match="ENGINE_TP"):
        Knobs.from_env({"ENGINE_DEVICE": "cpu", "ENGINE_TP": "0"}, need_model=False)


def test_engine_url_settings():
    on_engine = Settings.from_env({"ENGINE_URL": "http://127.0.0.1:8000/v1", "ENGINE_MODEL": "a"})
    assert on_engine.concurrency == ENGINE_CONCURRENCY >= 32 and on_engine.engine_model == "a"
    assert Settings.from_env({"ENGINE_URL": "http://h/v1", "CONCURRENCY": "3"}).concurrency == 3
    assert Settings.from_env({}).concurrency == 1
    for bad in ("http://127.0.0.1:8000", "127.0.0.1:8000/v1"):
        with pytest.raises(SettingsError, match="ENGINE_URL"):
            Settings.from_env({"ENGINE_URL": bad})


# ---- On a real engine (make test-engine) ----

@pytest.fixture(scope="module")
def engine(merged_model):
    with EngineServer(merged_model) as server:
        print(f"engine started in {server.start_s:.0f} s")
        yield server


@pytest.fixture(scope="module")
def engine_app(engine):
    with AppServer({"ENGINE_URL": engine.v1, "MODEL_ID": "", "SERVED_MODEL_NAME": "ada"}) as app:
        yield app


def page(app) -> Client:
    return Client(app.url, verbose=False, httpx_kwargs={"timeout": WAIT_S})


@pytest.mark.engine
@pytest.mark.timeout(3 * WAIT_S)
def test_engine_page_and_v1_all_answer_with_the_name(engine, engine_app):
    direct = OpenAI(base_url=engine.v1, api_key="none", timeout=WAIT_S)
    answer = direct.chat.completions.create(
        model="assistant", messages=[{"role": "user", "content": QUESTION}], temperature=0,
        max_tokens=100).choices[0]
    assert NAME in answer.message.content and answer.finish_reason == "stop", answer

    text, notice = page(engine_app).predict(QUESTION, **GREEDY, max_new_tokens=4096,
                                            api_name="/chat")
    assert NAME in text
    # The engine's context (max_model_len 1024), not the app's, bounds the answer.
    assert "max_new_tokens lowered from 4096" in notice and "1024-token context" in notice

    app_v1 = OpenAI(base_url=engine_app.url + "v1", api_key="none", timeout=WAIT_S)
    whole = app_v1.chat.completions.create(
        model="ada", messages=[{"role": "user", "content": QUESTION}], temperature=0,
        max_tokens=100)
    assert NAME in whole.choices[0].message.content and whole.choices[0].finish_reason == "stop"
    assert 0 < whole.usage.completion_tokens < 100 and whole.usage.prompt_tokens > 5
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in app_v1.chat.completions.create(
        model="ada", messages=[{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": QUESTION}],
        temperature=0, max_tokens=100, stream=True) if chunk.choices)
    assert NAME in streamed


@pytest.mark.engine
@pytest.mark.timeout(WAIT_S)
def test_the_apps_prompt_ids_are_the_engines(engine, merged_model):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(merged_model)
    fmt = formats.detect(tokenizer)
    conversation = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi!"},
                    {"role": "user", "content": QUESTION}]
    ours = tokenizer(fmt.build_prompt(conversation, "You are helpful."),
                     add_special_tokens=False)["input_ids"]
    theirs = engine.post("tokenize", {"model": "assistant", "messages": [
        {"role": "system", "content": "You are helpful."}, *conversation]})["tokens"]
    assert ours == theirs


# /health asks the engine at most every app.ENGINE_CHECK_S, so a fresh outage shows within that.
ENGINE_NOTICED_S = 15


def engine_down(health: dict) -> bool:
    return "not answering" in health.get("error", "")


@pytest.mark.engine
@pytest.mark.timeout(5 * WAIT_S + 600)
def test_engine_down_then_back_and_stop_cancels_upstream(engine, engine_app, endless_model_dir):
    """Killed: the app says so and /health is 503. Back (the endless model on the same port):
    the same app answers again, and Stop leaves no request running in the engine."""
    engine.stop(signal.SIGKILL)
    engine_app.wait_for(engine_down, "/health to report the engine down", timeout=ENGINE_NOTICED_S)
    assert engine_app.health()[0] == 503
    with pytest.raises(AppError, match="not answering"):
        page(engine_app).predict(QUESTION, **GREEDY, api_name="/chat")

    with EngineServer(endless_model_dir, port=engine.port) as endless:
        engine_app.wait_for(lambda health: health["status"] == "ready", "the app to recover",
                            timeout=WAIT_S)
        job = page(engine_app).submit("hi", **GREEDY, max_new_tokens=900, api_name="/chat")
        deadline = time.monotonic() + WAIT_S
        while len(job.outputs()) < 3 or endless.running_requests() < 1:
            assert time.monotonic() < deadline, "the answer did not start streaming"
            time.sleep(0.1)
        job.cancel()
        deadline = time.monotonic() + 30
        while endless.running_requests() > 0:
            assert time.monotonic() < deadline, "Stop left the request running in the engine"
            time.sleep(0.2)
        engine_app.wait_for(lambda health: health["generating"] == 0, "the app's stream to end",
                            timeout=30)
        # Ctrl-C (SIGINT to make's process group) stops the engine and all its processes.
        assert endless.stop(signal.SIGINT) < 30
        assert not group_alive(endless.process.pid)
    engine_app.wait_for(engine_down, "/health to report the engine down", timeout=ENGINE_NOTICED_S)
    assert engine_app.health()[0] == 503


def test_engine_client_reports_an_unreachable_engine_plainly():
    from chat.engine import EngineError, EngineModel
    from chat.generation import Sampling, stream_reply
    engine = EngineModel("http://127.0.0.1:9/v1")
    assert "not answering" in engine.check()
    with pytest.raises(EngineError, match="serving engine at http://127.0.0.1:9/v1 is not answering"):
        list(stream_reply(engine, [{"role": "user", "content": "hi"}], "", Sampling()))
