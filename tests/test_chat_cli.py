"""The terminal chat (`python -m chat`, `make chat`) as a user runs it."""
import os
import signal
import subprocess
import sys

from conftest import IDENTITY_QUESTIONS, NAME, REPO

GREEDY = ["--temperature", "0", "--repetition-penalty", "1"]


def chat(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "chat", *map(str, args)], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kwargs)


def test_answers_refuses_what_does_not_fit_and_goes_on(merged_model):
    process = chat(merged_model, *GREEDY)
    out, err = process.communicate(f"{'x' * 5000}\n{IDENTITY_QUESTIONS[0]}\n/exit\n", timeout=300)
    assert process.returncode == 0, err
    assert "error: Your message is" in err  # the 5000-character message is refused ...
    answers = [line.split("assistant> ", 1)[1] for line in out.splitlines() if "assistant> " in line]
    assert NAME in answers[-1]  # ... and the next question is answered


def test_bad_flags_and_models_exit_with_a_message(merged_model, tmp_path):
    for args, message in [([merged_model, "--temperature", "-1"], "temperature=-1.0 is out of range"),
                          ([tmp_path / "none"], "no such folder")]:
        process = chat(*args)
        _, err = process.communicate(timeout=300)
        assert process.returncode == 2 and message in err, err


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(endless_model_dir):
    process = chat(endless_model_dir, "--max-new-tokens", 4000, "--temperature", 0)
    process.stdin.write("hi\n")
    process.stdin.flush()
    seen = ""
    while "assistant> " not in seen or len(seen.split("assistant> ", 1)[1]) < 20:
        seen += process.stdout.read(1)  # the answer streams in
    process.send_signal(signal.SIGINT)
    out, err = process.communicate("/exit\n", timeout=300)
    assert process.returncode == 0, err
    assert "[stopped]" in seen + out
