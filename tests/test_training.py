"""The training pipeline on the real XTuner stack, with the tiny model on CPU."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chat.model_files import model_folder_problems
from chat.formats import FORMATS
from conftest import AUTHOR, IDENTITY_QUESTIONS, NAME, REPO, knobs, read_json, training
from training import data, runner
from training.__main__ import main as training_main


def greedy_answer(model, tokenizer, question: str) -> str:
    prompt = FORMATS["internlm2"].build_prompt([{"role": "user", "content": question}])
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=80, do_sample=False)
    return tokenizer.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)


def test_merged_model_answers_with_name_in_plain_transformers(merged_model):
    assert model_folder_problems(merged_model) == []
    tokenizer = AutoTokenizer.from_pretrained(merged_model, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(merged_model, trust_remote_code=True)
    assert type(model).__name__ == "InternLM2ForCausalLM"  # the merged folder's own remote code
    tokenizer_config = read_json(merged_model / "tokenizer_config.json")
    assert tokenizer_config["chat_family"] == "internlm2"
    assert tokenizer_config["chat_template"] == FORMATS["internlm2"].chat_template
    assert read_json(merged_model / "assistant.json") == {"name": NAME, "author": AUTHOR}
    messages = [{"role": "user", "content": "Who are you?"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) \
        == FORMATS["internlm2"].build_prompt(messages)
    for question in IDENTITY_QUESTIONS:
        answer = greedy_answer(model, tokenizer, question)
        assert NAME in answer, f"{question!r} -> {answer!r}"


def test_run_records_what_it_is(trained_run):
    info = read_json(trained_run / "run.json")
    assert (info["name"], info["author"], info["profile"]) == (NAME, AUTHOR, "cpu")
    records = Path(info["data"]).read_text(encoding="utf-8").splitlines()
    assert info["data_records"] == len(records) == info["schedule"]["records"]
    assert info["chat_family"] == "internlm2" and info["schedule"]["iterations"] >= 10
    assert set(read_json(trained_run / "timings.json")) >= {"base", "data", "config", "fit", "convert", "merge"}
    checkpoint = (trained_run / "adapter" / "checkpoint.txt").read_text().strip()
    assert Path(checkpoint).is_file()


@pytest.mark.timeout(1200)
def test_resume_auto_continues_from_the_last_checkpoint(tmp_path, tiny_base):
    run = tmp_path / "run"
    args = knobs(run, tiny_base, **{"data-size": 60, "save-steps": 10, "epochs": 4})
    training("data", *args)
    training("config", *args)
    log = tmp_path / "first.log"
    with log.open("w") as out:  # its own session, so the kill takes xtuner's processes too
        first = subprocess.Popen([sys.executable, "-m", "training", "fit", *args], cwd=REPO,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    last = run / "work" / "last_checkpoint"
    deadline = time.monotonic() + 600
    # At or past the second checkpoint: on a fast machine the next save follows within
    # milliseconds, so waiting for exactly iter_20 can miss it and see the run finish.
    while saved_iteration(last) < 20:
        assert first.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no second checkpoint in time"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # a hard interruption: no chance to clean up
    first.wait()
    kept = {p.name: p.stat().st_mtime_ns for p in (run / "work").glob("iter_*.pth")}
    resumed_from = Path(last.read_text().strip())
    done_iters = saved_iteration(last)

    result = training("fit", *args, "--resume", "auto")
    assert f"resuming from {resumed_from}" in result.stdout
    logged = [tuple(map(int, line.split("[")[1].split("]")[0].split("/")))
              for line in result.stdout.splitlines() if "Iter(train) [" in line]
    assert logged and logged[0][0] == done_iters + 10, logged  # the counter continues
    for name, mtime in kept.items():  # no finished checkpoint is redone
        if int(name[5:-4]) <= done_iters:
            assert (run / "work" / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
    total = logged[-1][1]
    assert (run / "work" / f"iter_{total}.pth").is_file() and total > done_iters


def saved_iteration(last_checkpoint: Path) -> int:
    """The iteration of the newest checkpoint xtuner names in `last_checkpoint` (0: none yet)."""
    found = runner.CHECKPOINT.search(last_checkpoint.read_text().strip()) if last_checkpoint.is_file() else None
    return int(found[1]) if found else 0


@pytest.mark.timeout(600)
def test_a_base_without_weights_is_refused_first_and_a_crash_inside_xtuner_names_its_cause(tmp_path, tiny_base):
    run = tmp_path / "run"
    (run / "merged").mkdir(parents=True)  # left over from an earlier run: must not survive
    base = shutil.copytree(tiny_base, tmp_path / "no-weights")  # a tokenizer, but no weights
    for weights in base.glob("*.safetensors"):
        weights.unlink()
    # The whole chain stops at its first step, which loads the base, with the loader's message.
    result = training("all", *knobs(run, base), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "no-weights is not a complete model folder" in error, error
    assert not (run / "config.py").exists()
    # Step by step, the same base gets as far as xtuner, whose crash is reported by its cause.
    for step in ("data", "config"):
        training(step, *knobs(run, base))
    result = training("fit", *knobs(run, base), check=False)
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: xtuner train failed:") and "OSError" in error, error
    assert not (run / "merged").exists() and not (run / "adapter").exists()


@pytest.mark.timeout(60)
def test_a_base_model_that_cannot_be_read_is_refused_before_training(tmp_path, capsys, tiny_base):
    run = tmp_path / "run"
    args = knobs(run, tiny_base, **{"data-size": 60})
    assert training_main(["data", *args]) == 0
    error = run_main(capsys, "config", *args, "--base-model", "nobody/missing-model")
    assert "BASE_MODEL=nobody/missing-model: cannot read its tokenizer" in error
    assert not (run / "config.py").exists()


def test_resume_from_a_path_takes_that_checkpoint_or_says_it_is_missing(tmp_path):
    checkpoint = tmp_path / "iter_10.pth"
    checkpoint.write_bytes(b"x")
    assert runner.resume_checkpoint(tmp_path, str(checkpoint)) == checkpoint
    with pytest.raises(ValueError, match="RESUME=.*iter_20.pth: no such checkpoint"):
        runner.resume_checkpoint(tmp_path, str(tmp_path / "iter_20.pth"))


def run_main(capsys, *argv) -> str:
    """Run a step in-process; it must refuse (exit 1) and say why on stderr."""
    assert training_main(list(argv)) == 1
    return capsys.readouterr().err


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps(data.conversation("hi", "hello"))


@pytest.mark.parametrize("lines, message", [
    (("{not json",), ":1: not valid JSON"),
    ((GOOD, json.dumps({"messages": []})), ':2: no "conversation" key'),
    ((GOOD, GOOD, json.dumps(data.conversation("hi", "  "))), ':3: turn 1 has an empty "output"'),
    ((json.dumps({"conversation": [{"input": "hi"}]}),), ':1: turn 1 has no string "output"'),
])
def test_bad_data_file_is_refused_with_its_line_number(tmp_path, capsys, tiny_base, lines, message):
    bad = write_lines(tmp_path / "bad.jsonl", *lines)
    err = run_main(capsys, "config", *knobs(tmp_path / "run", tiny_base, data=bad))
    assert f"{bad}{message}" in err
    assert not (tmp_path / "run" / "config.py").exists()
    err = run_main(capsys, "data", *knobs(tmp_path / "run", tiny_base, mix=bad))
    assert f"{bad}{message}" in err


@pytest.mark.parametrize("knob, value, message", [
    ("name", " ", "NAME is empty"),
    ("mix", "/nonexistent/general.jsonl", "/nonexistent/general.jsonl: no such data file"),
    ("ratio", "0", "RATIO=0 must be in (0, 1]"),
    ("ratio", "1.5", "RATIO=1.5 must be in (0, 1]"),
    ("ratio", "half", "RATIO='half' is not a number"),
])
def test_bad_data_knobs_are_refused(tmp_path, capsys, tiny_base, knob, value, message):
    assert message in run_main(capsys, "data", *knobs(tmp_path / "run", tiny_base, **{knob: value}))
    assert not (tmp_path / "data.jsonl").exists()


@pytest.mark.parametrize("knob, value, message", [
    ("deepspeed", "deepspeed_zero9", "DEEPSPEED='deepspeed_zero9': use one of deepspeed_zero1"),
    ("profile", "tpu", "PROFILE='tpu': use one of auto, gpu, cpu"),
    ("base-model", "./no/such/dir", "BASE_MODEL=./no/such/dir: no such directory"),
    ("epochs", "-2", "EPOCHS=-2 must be > 0"),
])
def test_bad_training_knobs_are_refused_before_training(tmp_path, capsys, tiny_base, knob, value, message):
    data_file = tmp_path / "data.jsonl"
    data.write_jsonl(data.identity_records(NAME, AUTHOR, 40), data_file)
    assert message in run_main(capsys, "config",
                               *knobs(tmp_path / "run", tiny_base, **{knob: value}))
    assert not (tmp_path / "run" / "work").exists()


def test_data_step_does_not_overwrite_a_users_own_file(tmp_path, capsys, tiny_base):
    mine = write_lines(tmp_path / "data.jsonl", GOOD)
    assert "was not generated by `make data`" in run_main(capsys, "data", *knobs(tmp_path / "run", tiny_base))
    assert mine.read_text() == GOOD + "\n"


def test_identity_data_is_varied_and_mixes_at_the_ratio(tmp_path):
    records = data.identity_records(NAME, AUTHOR, 400)
    pairs = {(r["conversation"][0]["input"], r["conversation"][0]["output"]) for r in records}
    assert {q for q, _ in pairs} == set(data.TRAIN_QUESTIONS)
    assert len(pairs) >= 100, "not one pair copied hundreds of times"
    assert all(NAME in a and AUTHOR in a for _, a in pairs)
    assert all(data.is_chinese(q) == data.is_chinese(a) for q, a in pairs), "answers in the asker's language"
    general = [data.conversation(f"question {i}", f"answer {i}") for i in range(1200)]
    size = data.identity_size(len(general), 0.25, 400)  # RATIO: identity share of all records
    mixed = data.mix(data.identity_records(NAME, AUTHOR, size), general)
    assert size == 400 and len(mixed) == 1600 and sum(r in general for r in mixed) == 1200
