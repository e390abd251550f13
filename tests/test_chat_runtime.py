"""chat/ on the real tiny models: the merged model's chat template, loading from each source,
sampling settings and that they reach `generate`, answers that end by themselves, history
fitting, streaming, a stop that really ends the generating thread, and a generation that never
ends failing at its test's time budget."""
import re
import subprocess
import threading
import time

import pytest
import torch
from transformers import AutoTokenizer

from chat import history
from chat.generation import STATS, Sampling, reply, stream_reply
from chat.loading import ModelLoadError, load_model, needs_remote_code
from chat.formats import IM_END
from conftest import IDENTITY_QUESTIONS, NAME, REPO

GREEDY = Sampling(temperature=0, repetition_penalty=1.0)
# What a stop test lets the endless model generate: far more than a stop within a token leaves,
# few enough that a stop that does not work ends its test (waiting on the thread) within minutes.
ENDLESS_LIMIT = 1000
SYSTEM = "You are Ada's assistant."
CONVERSATION = [{"role": "user", "content": "Who are you?"},
                {"role": "assistant", "content": "I am Ada Lin's assistant."},
                {"role": "user", "content": "你好"}]


@pytest.fixture(scope="module")
def merged(merged_model):
    return load_model(str(merged_model))


@pytest.fixture(scope="module")
def endless(endless_model_dir):
    return load_model(str(endless_model_dir))


def test_the_merged_models_chat_template_is_the_runtimes_with_and_without_the_header(merged, merged_model):
    """The template the pipeline wrote into the merged tokenizer_config.json (what other tools use)
    renders exactly the runtime's prompt, with the assistant header only when asked for."""
    tokenizer = AutoTokenizer.from_pretrained(merged_model, trust_remote_code=True)
    for system, messages in [("", CONVERSATION[:1]), (SYSTEM, CONVERSATION)]:
        with_system = [{"role": "system", "content": system}] if system else []
        for header in (True, False):
            rendered = tokenizer.apply_chat_template(with_system + messages, tokenize=False,
                                                     add_generation_prompt=header)
            assert rendered == merged.format.build_prompt(messages, system, add_generation_prompt=header)
            assert rendered.endswith("<|im_start|>assistant\n") == header


def spy_on_generate(loaded, monkeypatch) -> list[dict]:
    """Record what `generate` receives (and returns, under "output") for each call."""
    calls, real = [], loaded.model.generate

    def generate(**kwargs):
        calls.append(dict(kwargs))
        calls[-1]["output"] = real(**kwargs)
        return calls[-1]["output"]
    monkeypatch.setattr(loaded.model, "generate", generate)
    return calls


def test_an_answer_ends_by_itself_at_the_stop_token(merged, monkeypatch):
    """The fine-tuned model ends its answer with <|im_end|>, and generation stops there, well
    before max_new_tokens (not only "names NAME": junk after the answer must not happen)."""
    calls = spy_on_generate(merged, monkeypatch)
    info = {}
    answer = reply(merged, [{"role": "user", "content": IDENTITY_QUESTIONS[1]}],
                   sampling=Sampling(max_new_tokens=200, temperature=0, repetition_penalty=1.0), info=info)
    assert NAME in answer
    assert info["finish_reason"] == "stop" and info["completion_tokens"] < 100, info
    [call] = calls
    assert call["output"][0, -1].item() == merged.tokenizer.convert_tokens_to_ids(IM_END)
    assert call["output"].shape[1] - call["input_ids"].shape[1] == info["completion_tokens"]


def test_sampling_settings_reach_generate(merged, monkeypatch):
    calls = spy_on_generate(merged, monkeypatch)
    question = [{"role": "user", "content": "hi"}]
    reply(merged, question, sampling=Sampling(max_new_tokens=9, temperature=0.5, top_p=0.7, top_k=13,
                                              repetition_penalty=1.3))
    reply(merged, question, sampling=Sampling(max_new_tokens=5, temperature=0, repetition_penalty=1.2))
    sampled, greedy = calls
    assert {k: sampled[k] for k in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
                                    "max_new_tokens")} == \
        {"do_sample": True, "temperature": 0.5, "top_p": 0.7, "top_k": 13, "repetition_penalty": 1.3,
         "max_new_tokens": 9}
    assert (greedy["do_sample"], greedy["repetition_penalty"], greedy["max_new_tokens"]) == (False, 1.2, 5)
    for call in calls:
        assert call["eos_token_id"] == merged.stop_ids


def test_loads_local_model_for_cpu(merged, merged_model):
    assert (merged.model_id, merged.device, merged.dtype) == (str(merged_model), "cpu", "float32")
    tokenizer = merged.tokenizer
    assert merged.stop_ids == [tokenizer.convert_tokens_to_ids("</s>"), tokenizer.convert_tokens_to_ids(IM_END)]
    assert {p.dtype for p in merged.model.parameters()} == {torch.float32}


def test_loads_straight_into_the_requested_dtype(merged_model):
    loaded = load_model(str(merged_model), dtype="bf16")
    assert loaded.dtype == "bfloat16"
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("kwargs, message", [
    ({"model_id": "no/such/folder"}, "no such folder, and not a hub repo id"),
    ({"model_id": "./missing"}, "no such folder"),
    ({"source": "s3"}, "MODEL_SOURCE='s3'"),
    ({"revision": "v2"}, "only applies to hub repos"),
    ({"device": "tpu9"}, "DEVICE='tpu9'"),
    ({"device": "cuda:99"}, "cuda"),
    ({"dtype": "int3"}, "DTYPE='int3'"),
])
def test_load_errors_say_what_to_change(merged_model, kwargs, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(**{"model_id": str(merged_model), **kwargs})


def test_runs_repo_code_only_for_models_that_ship_it(merged_model, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    assert needs_remote_code(merged_model) and not needs_remote_code(tmp_path)


def test_a_tokenizer_shipped_as_sentencepiece_only_loads_fast(tmp_path):
    """InternLM2-Chat ships tokenizer.model and no tokenizer.json: transformers builds the fast
    tokenizer from it, which needs protobuf (requirements.txt), in the app and in training."""
    from transformers import AutoTokenizer

    from test_gguf import train_sentencepiece
    train_sentencepiece(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer("Who are you? 你是谁", add_special_tokens=False)["input_ids"]
    assert tokenizer.is_fast and tokenizer.decode(ids) == "Who are you? 你是谁"


def test_refuses_a_folder_that_is_not_a_complete_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="not a complete model folder.*safetensors"):
        load_model(str(tmp_path))


def git(*args, cwd):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_loads_from_an_openxlab_style_git_lfs_repo(merged_model, tmp_path, monkeypatch):
    """OpenXLab model repos are git + git-lfs repos; a local bare repo stands in for one."""
    remote, work = tmp_path / "git" / "alice" / "assistant.git", tmp_path / "work"
    git("init", "-q", "--bare", "-b", "main", str(remote), cwd=tmp_path)
    git("init", "-q", "-b", "main", str(work), cwd=tmp_path)
    git("lfs", "track", "*.safetensors", cwd=work)
    for file in merged_model.iterdir():
        (work / file.name).write_bytes(file.read_bytes())
    git("add", "-A", cwd=work)
    git("commit", "-qm", "model", cwd=work)
    git("tag", "v1", cwd=work)
    git("push", "-q", remote.as_uri(), "main", "--tags", cwd=work)
    monkeypatch.setenv("OPENXLAB_GIT_ENDPOINT", (tmp_path / "git").as_uri())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    loaded = load_model("alice/assistant", source="openxlab")
    assert NAME in reply(loaded, [{"role": "user", "content": IDENTITY_QUESTIONS[0]}], sampling=GREEDY)
    pinned = load_model(remote.as_uri(), source="openxlab", revision="v1")  # a git URL works too
    assert pinned.stop_ids == loaded.stop_ids
    with pytest.raises(ModelLoadError, match="MODEL_REVISION=v9: no such branch, tag or commit"):
        load_model("alice/assistant", source="openxlab", revision="v9")
    with pytest.raises(ModelLoadError, match="could not clone .*/alice/nothing.git"):
        load_model("alice/nothing", source="openxlab")


@pytest.mark.parametrize("field, value, message", [
    ("max_new_tokens", 0, "max_new_tokens=0 is out of range: it must be at least 1"),
    ("max_new_tokens", 2.5, "max_new_tokens must be a whole number"),
    ("temperature", -1, "temperature=-1 is out of range"),
    ("temperature", float("nan"), "temperature must be a number, got nan"),
    ("temperature", "hot", "temperature must be a number"),
    ("top_p", 2, "top_p=2 is out of range: it must be between 0.01 and 1.0"),
    ("top_k", -5, "top_k=-5 is out of range"),
    ("repetition_penalty", float("inf"), "repetition_penalty must be a number"),
])
def test_sampling_refuses_bad_values_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**{field: value})


def test_temperature_zero_is_greedy():
    assert Sampling(temperature=0).generate_kwargs() == {"do_sample": False, "repetition_penalty": 1.005}
    assert Sampling(max_new_tokens=7.0).max_new_tokens == 7


def test_history_drops_oldest_turns_and_says_so(merged):
    turns = [{"role": role, "content": f"{role} {i} " + "x" * 100}
             for i in range(10) for role in ("user", "assistant")]
    messages = turns + [{"role": "user", "content": "last question"}]
    fitted = history.fit(merged.tokenizer, merged.format, messages, SYSTEM, 512, merged.context)
    prompt = merged.tokenizer(merged.format.build_prompt(fitted.messages, SYSTEM), add_special_tokens=False)["input_ids"]
    assert len(prompt) <= merged.context - 512
    assert fitted.messages[0]["role"] == "user" and fitted.messages[-1] == messages[-1]
    dropped = len(messages) - len(fitted.messages)
    assert fitted.messages == messages[dropped:] and dropped > 0
    assert fitted.notices == [f"The {dropped} oldest message(s) were left out so that the "
                              f"conversation fits the {merged.context - 512}-token prompt budget."]
    small = history.fit(merged.tokenizer, merged.format, messages, SYSTEM, 512, merged.context, max_input_tokens=100)
    assert len(small.messages) < len(fitted.messages)


def test_history_lowers_max_new_tokens_to_the_room_left(merged):
    fitted = history.fit(merged.tokenizer, merged.format, CONVERSATION, "", 10**9, merged.context)
    prompt = merged.tokenizer(merged.format.build_prompt(fitted.messages), add_special_tokens=False)["input_ids"]
    assert fitted.max_new_tokens == merged.context - len(prompt)
    assert "max_new_tokens lowered from 1000000000" in fitted.notices[0]


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": " \n "}], "Your message is empty"),
    ([{"role": "user", "content": "x" * 5_000}], r"Your message is 50\d\d tokens long; the limit is 10\d\d tokens"),
    # Refused by its length in characters, before any tokenizing (docs/security.md).
    ([{"role": "user", "content": "x" * 100_000}], r"Your message is 100,000 characters long; the limit is 10,230"),
    ([{"role": "assistant", "content": "hi"}], "must end with a user message"),
    ([{"role": "system", "content": "hi"}], "message 0 must be"),
    ([], "must end with a user message"),
])
def test_history_refuses_what_cannot_be_answered(merged, messages, message):
    with pytest.raises(ValueError, match=message):
        history.fit(merged.tokenizer, merged.format, messages, "", 512, merged.context)


def test_streams_a_growing_answer_with_the_name(merged):
    messages = [{"role": "user", "content": IDENTITY_QUESTIONS[0]}]
    parts = list(stream_reply(merged, messages, sampling=GREEDY))
    assert len(parts) > 2
    assert all(later.startswith(earlier) for earlier, later in zip(parts, parts[1:]))
    assert NAME in parts[-1]
    assert reply(merged, messages, sampling=GREEDY) == parts[-1]


def test_stop_event_ends_the_generating_thread(endless):
    event = threading.Event()
    stream = stream_reply(endless, [{"role": "user", "content": "hi"}],
                          sampling=Sampling(max_new_tokens=ENDLESS_LIMIT, temperature=0), stop_event=event)
    before = STATS.snapshot()
    parts = [next(stream) for _ in range(3)]
    event.set()
    parts += list(stream)  # the stream ends because the thread did
    moved = {key: value - before[key] for key, value in STATS.snapshot().items()}
    assert (moved["generating"], moved["stopped"], moved["finished"]) == (0, 1, 0)
    assert moved["tokens_generated"] < ENDLESS_LIMIT
    assert STATS.snapshot()["generating"] == 0


def test_closing_the_stream_ends_the_generating_thread(endless):
    stream = stream_reply(endless, [{"role": "user", "content": "hi"}],
                          sampling=Sampling(max_new_tokens=ENDLESS_LIMIT, temperature=0))
    before = STATS.snapshot()
    for _ in range(3):
        next(stream)
    stream.close()  # what Gradio does on Stop or a closed tab
    after = STATS.snapshot()
    assert after["generating"] == 0 and after["stopped"] == before["stopped"] + 1
    assert after["tokens_generated"] - before["tokens_generated"] < ENDLESS_LIMIT
    assert STATS.snapshot()["tokens_generated"] == after["tokens_generated"]  # no thread left


def test_an_error_in_the_generating_thread_reaches_the_caller(merged_model):
    broken = load_model(str(merged_model))
    broken.model.to("meta")  # weights gone: the forward pass fails inside the thread
    before = STATS.snapshot()["failed"]
    with pytest.raises(Exception, match="meta"):
        reply(broken, [{"role": "user", "content": "hi"}])
    assert STATS.snapshot()["failed"] == before + 1 and STATS.snapshot()["generating"] == 0


HANGING_TEST = '''
import pytest
from chat.generation import Sampling, reply
from chat.loading import load_model


@pytest.fixture
def endless():
    return load_model({model!r})


@pytest.mark.timeout(3)
def test_an_answer_that_does_not_end(endless):
    reply(endless, [{{"role": "user", "content": "hi"}}], sampling=Sampling(max_new_tokens=8000, temperature=0))
'''


@pytest.mark.timeout(300)
def test_a_hanging_generation_fails_at_its_timeout(pytester, monkeypatch, endless_model_dir):
    """Under this suite's pytest.ini, a test stuck in a generation that does not end (the endless
    model, 8000 tokens: about a minute here) fails at its 3 s budget with a clear message, and the
    generating thread is stopped on the way out."""
    pytester.makefile(".ini", pytest=(REPO / "pytest.ini").read_text())
    pytester.makepyfile(test_hang=HANGING_TEST.format(model=str(endless_model_dir)))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    start = time.monotonic()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--durations=1", timeout=240)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["timeout: 120.0s", "*Failed: Timeout (>3.0s) from pytest-timeout*"])
    [took] = re.findall(r"([\d.]+)s call\s+test_hang.py::", result.stdout.str())
    assert float(took) < 10, result.stdout.str()
    assert time.monotonic() - start < 200
