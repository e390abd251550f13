"""The app on llama.cpp (`make test-llamacpp`): SmolLM2 trained on NAME, exported by `make gguf`,
served by `make serve-engine SERVE_ENGINE=llamacpp`; the page and the app's /v1 answer with NAME
and stream, and Stop drops the request inside llama.cpp. The CPU image (Dockerfile.cpu, `make
image-cpu`) is built with podman as tests/test_image.py builds the CUDA one, and serves the GGUF.

The trained SmolLM2 run is the one `make test` trained for tests/test_quality.py when it passed
from identical sources (handed over in pytest's cache), else one trained here (~5-8 min), or
KIT_SMOLLM2_RUN=/path/to/run while iterating locally (refused under CI)."""
import os
import time
from pathlib import Path

import pytest
from openai import OpenAI

from app_server import AppServer, free_port
from conftest import REPO, pipeline_inputs, read_json, under_ci
from engine_server import EngineServer
from test_engine import engine_app, page  # noqa: F401 - the app on this module's `engine`
from test_gguf import hf_answers, make_gguf
from test_image import IMAGE, base_image, build, podman, serving, state  # noqa: F401 - podman, as make test-image has it
from test_quality import SMOLLM2_HANDOVER, pipeline
QUESTION = "Who are you?"
GREEDY = {"temperature": 0, "repetition_penalty": 1.0}
WAIT_S = 300

pytestmark = pytest.mark.llamacpp


def trained_smollm2(request, tmp_path_factory) -> Path:
    reuse = os.environ.get("KIT_SMOLLM2_RUN")
    if reuse:
        if under_ci():
            raise pytest.UsageError("KIT_SMOLLM2_RUN is set under CI: unset it")
        return Path(reuse)
    cache = getattr(request.config, "cache", None)
    handed = cache.get(SMOLLM2_HANDOVER, None) if cache else None
    if handed and handed.get("inputs") == pipeline_inputs() \
            and (Path(handed["run"]) / "merged" / "config.json").is_file():
        return Path(handed["run"])
    # The quality test's own run, with `make demo`'s selection.
    return pipeline(tmp_path_factory.mktemp("smollm2"), SELECT_LAST="2", SCALES="1,0.9")


@pytest.fixture(scope="module")
def smol(request, tmp_path_factory) -> tuple[Path, str]:
    """(a run directory of our own whose merged/ links the trained model, its NAME)."""
    trained = trained_smollm2(request, tmp_path_factory)
    run = tmp_path_factory.mktemp("llamacpp") / "run"
    run.mkdir()
    (run / "merged").symlink_to((trained / "merged").resolve())
    make_gguf(run, "q8_0")
    return run, read_json(trained / "run.json")["name"]


@pytest.fixture(scope="module")
def engine(smol):
    with EngineServer(smol[0] / "merged", env={"SERVE_ENGINE": "llamacpp"}) as server:
        yield server


@pytest.mark.timeout(3 * WAIT_S)
def test_app_on_llamacpp_answers_with_the_name_on_the_page_and_v1(smol, engine, engine_app):
    name = smol[1]
    direct = OpenAI(base_url=engine.v1, api_key="none", timeout=WAIT_S).chat.completions.create(
        model="assistant", messages=[{"role": "user", "content": QUESTION}], temperature=0,
        max_tokens=100).choices[0]
    assert name in direct.message.content and direct.finish_reason == "stop", direct
    assert "<|im_end|>" not in direct.message.content
    # q8_0 in llama.cpp follows the merged model's own greedy answer (transformers, fp32) through
    # the name; after it the two may part at a near-tie (q8_0 rounding: measured on a clean-clone
    # CI run, "..., made by Quenby Works." vs "..., a brilliant ... actor"); f16 matches exactly
    # (tests/test_gguf.py).
    hf = hf_answers(smol[0] / "merged", [QUESTION], 100)[QUESTION]
    shared = os.path.commonprefix([direct.message.content, hf])
    assert name in shared, (direct.message.content, hf)

    text, notice = page(engine_app).predict(QUESTION, **GREEDY, max_new_tokens=4096, api_name="/chat")
    assert text == direct.message.content  # the app renders the same prompt the engine answers
    assert "max_new_tokens lowered from 4096" in notice and "1024-token context" in notice

    app_v1 = OpenAI(base_url=engine_app.url + "v1", api_key="none", timeout=WAIT_S)
    whole = app_v1.chat.completions.create(model="ada", messages=[{"role": "user", "content": QUESTION}],
                                           temperature=0, max_tokens=100)
    assert whole.choices[0].message.content == direct.message.content
    assert whole.choices[0].finish_reason == "stop"
    assert 0 < whole.usage.completion_tokens < 100 and whole.usage.prompt_tokens > 5
    chunks = [chunk.choices[0].delta.content or "" for chunk in app_v1.chat.completions.create(
        model="ada", messages=[{"role": "user", "content": QUESTION}], temperature=0,
        max_tokens=100, stream=True) if chunk.choices]
    assert len([c for c in chunks if c]) > 3 and "".join(chunks) == direct.message.content


def requests_processing(engine: EngineServer) -> float:
    """llama.cpp's own count of requests it is generating for (GET /metrics)."""
    for line in engine.get("metrics").splitlines():
        if line.startswith("llamacpp:requests_processing"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no llamacpp:requests_processing in /metrics")


@pytest.mark.timeout(3 * WAIT_S)
def test_stop_drops_the_request_inside_llamacpp(smol, tmp_path):
    """On a SmolLM2 that never stops (bench/bench_engine.py's endless copy): Stop on the page
    leaves llama.cpp generating for nobody."""
    from bench.bench_engine import endless_copy
    run = tmp_path / "run"
    endless_copy(smol[0] / "merged", run / "merged")
    make_gguf(run, "q8_0")
    with EngineServer(run / "merged", env={"SERVE_ENGINE": "llamacpp"}) as endless, \
            AppServer({"ENGINE_URL": endless.v1, "MODEL_ID": ""}) as app:
        job = page(app).submit("hi", **GREEDY, max_new_tokens=900, api_name="/chat")
        deadline = time.monotonic() + WAIT_S
        while len(job.outputs()) < 3 or requests_processing(endless) < 1:
            assert time.monotonic() < deadline, "the answer did not start streaming"
            time.sleep(0.1)
        job.cancel()
        deadline = time.monotonic() + 30
        while requests_processing(endless) > 0:
            assert time.monotonic() < deadline, "Stop left the request running in llama.cpp"
            time.sleep(0.2)


@pytest.mark.timeout(1800)
def test_cpu_image_serves_the_gguf_through_llamacpp(smol, podman, build):  # noqa: F811
    """`make image-cpu`, run as `docker run -v RUN/gguf:/model` (Dockerfile.cpu's own line): the
    app and llama.cpp in one container, healthy, answering with NAME on the page and /v1."""
    # PyTorch's CPU index is not reachable here; this machine's CPU torch comes from pip's find-links.
    build(REPO, timeout=1200, target="image-cpu", flags="--build-arg TORCH_INDEX=")
    run, name = smol
    engine_url = f"http://127.0.0.1:{free_port()}/v1"  # the host's network: a port of its own
    with serving(podman, IMAGE + "-cpu", f"--volume={run / 'gguf'}:/model:ro",
                 env={"ENGINE_URL": engine_url}) as (app, container):
        podman("healthcheck", "run", container)
        assert state(podman, container, "Healthcheck.Status") == "healthy"
        text, _ = page(app).predict(QUESTION, **GREEDY, max_new_tokens=100, api_name="/chat")
        assert name in text
        v1 = OpenAI(base_url=app.url + "v1", api_key="none", timeout=WAIT_S)
        answer = v1.chat.completions.create(model=v1.models.list().data[0].id, temperature=0,
                                            messages=[{"role": "user", "content": QUESTION}], max_tokens=100)
        assert answer.choices[0].message.content == text and answer.choices[0].finish_reason == "stop"
