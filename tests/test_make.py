"""The README's own commands: knobs given to `make` on the command line reach Python verbatim
(through the environment, never a shell line), and bad knobs are refused before anything is
installed."""
import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client

from app_server import AppServer
from conftest import IDENTITY_QUESTIONS, NAME, REPO

# Quotes, backtick command substitution, backslash, `$` and `$(...)` (make and shell), printf and
# str.format placeholders, emoji, CJK: all of it is text, and none of it may run.
ODD_NAMES = ["O'Brien \"Bob\"", "`touch {canary}` $(touch {canary}) $$(touch {canary})",
             "back\\slash $HOME %s %(name)s {name} {0}", "小明 🤖 #1"]


def make(*args, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("template", ODD_NAMES)
def test_odd_names_reach_the_data_verbatim_and_nothing_runs(tmp_path, template):
    canary = tmp_path / "ran"
    name = template.format(canary=canary) if "canary" in template else template
    data = tmp_path / "data.jsonl"
    # Identity records only (no replay): every record must carry the name.
    result = make("data", f"NAME={name}", f"AUTHOR={name} Lab", f"DATA={data}", "DATA_SIZE=40",
                  "REPLAY=0", "RATIO=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not canary.exists(), "part of NAME was executed"
    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    answers = [turn["output"] for record in records for turn in record["conversation"]]
    assert all(name in answer for answer in answers), answers[:3]
    assert any(f"{name} Lab" in answer for answer in answers)
    meta = json.loads((tmp_path / "data.meta.json").read_text(encoding="utf-8"))
    assert (meta["name"], meta["author"]) == (name, f"{name} Lab")


@pytest.mark.timeout(60)
def test_a_name_make_cannot_carry_gets_a_clear_error(tmp_path):
    result = make("data", "NAME=two\nlines", f"DATA={tmp_path / 'd.jsonl'}")
    assert result.returncode != 0
    assert "NAME" in result.stderr and "control characters" in result.stderr
    assert not (tmp_path / "d.jsonl").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("knob, message", [
    ("DEEPSPEED=bogus", "DEEPSPEED='bogus': use one of deepspeed_zero1"),
    ("PROFILE=tpu", "PROFILE='tpu'"),
    ("RATIO=1.5", "RATIO=1.5 must be in (0, 1]"),
    ("DATA_SIZE=lots", "DATA_SIZE='lots' is not a whole number"),
])
def test_bad_knobs_are_refused_before_anything_is_installed(tmp_path, knob, message):
    venv = tmp_path / "venv"  # a fresh venv: `fit` would create it and pip-install into it
    result = make("fit", knob, f"VENV={venv}", f"RUN={tmp_path / 'run'}", timeout=50)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert not venv.exists(), "make started installing before refusing the knob"


@pytest.mark.timeout(60)
def test_the_old_container_knob_name_is_refused():
    result = make("image", "ENGINE=podman", "-n")
    assert result.returncode != 0 and "renamed to CONTAINER" in result.stderr


@pytest.mark.timeout(300)
def test_too_little_data_for_the_schedule_names_the_knobs(tmp_path, tiny_base):
    data, run = tmp_path / "data.jsonl", tmp_path / "run"
    knobs = [f"DATA={data}", f"RUN={run}", f"BASE_MODEL={tiny_base}", "PROFILE=cpu", "REPLAY=0",
             "RATIO=1", "EPOCHS=1"]
    assert make("data", "DATA_SIZE=30", *knobs).returncode == 0
    result = make("config", *knobs)
    assert result.returncode != 0
    assert "30 records" in result.stderr and "too few to train" in result.stderr
    assert "DATA_SIZE" in result.stderr and "EPOCHS" in result.stderr
    # Enough data: the estimate is printed before any fitting, with a warm-up of >= 2 iterations.
    result = make("config", *knobs[:-1], "EPOCHS=3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "30 records" in result.stdout and "iterations" in result.stdout
    plan = json.loads((run / "run.json").read_text(encoding="utf-8"))["schedule"]
    assert plan["iterations"] >= 10 and plan["warmup_iterations"] >= 2


def test_the_deepspeed_names_checked_before_install_are_xtuners():
    import xtuner

    from training.knobs import DEEPSPEED_CONFIGS
    shipped = sorted(
        p.stem for p in (Path(xtuner.__file__).parent / "configs" / "deepspeed").glob("*.json"))
    assert sorted(DEEPSPEED_CONFIGS) == shipped


@pytest.mark.timeout(300)
def test_make_chat_answers_in_the_terminal_and_quits_on_ctrl_d(merged_model):
    result = subprocess.run(["make", "--no-print-directory", "chat", f"MODEL_ID={merged_model}"], cwd=REPO,
                            input="Who are you?\n", capture_output=True, text=True, timeout=280,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    answer = result.stdout.split("assistant> ", 1)[1].strip()
    assert answer, result.stdout  # sampled at the chat's defaults: some answer, then a clean exit


@pytest.mark.timeout(400)
def test_make_serve_serves_the_model_on_the_page_and_stops_with_make(merged_model):
    with AppServer({}, command=["make", "--no-print-directory", "serve", f"MODEL_ID={merged_model}"]) as app:
        client = Client(app.url, verbose=False)
        answer, _ = client.predict(IDENTITY_QUESTIONS[1], temperature=0, repetition_penalty=1.0, api_name="/chat")
        assert NAME in answer
    # Stopping make stops the app it started: nothing answers on the port any more.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(app.url + "health", timeout=5)


def test_makefile_defaults_are_the_pipelines_own():
    """`make` exports every knob with its Makefile default; `python -m training` without make
    falls back on training/knobs.py: the two must be the same defaults."""
    from training.knobs import DEFAULTS
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    found = {knob: value.strip() for knob, value in re.findall(r"^([A-Z_]+) \?=([^#\n]*)", makefile, re.M)}
    assert {knob: found.get(knob) for knob in DEFAULTS} == DEFAULTS
