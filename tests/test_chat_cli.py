"""The terminal chat (`python -m chat`, `make chat`) as a user runs it. Every read of its output
has a deadline (`Output`), so an answer that never ends fails the test instead of hanging it."""
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import IDENTITY_QUESTIONS, NAME, REPO

GREEDY = ["--temperature", "0", "--repetition-penalty", "1"]
WAIT_S = 120


def chat(*args, env=None) -> subprocess.Popen:
    # Ctrl-C as at a terminal: a runner started in the background (`cmd &` in a script) passes
    # SIGINT down ignored, and Python then never turns it into KeyboardInterrupt.
    return subprocess.Popen([sys.executable, "-m", "chat", *map(str, args)], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def talk(process: subprocess.Popen, lines: list[str], timeout: float = WAIT_S) -> tuple[str, str]:
    """Type `lines`, then Ctrl-D (end of input); (stdout, stderr) once the chat has exited."""
    try:
        return process.communicate("".join(f"{line}\n" for line in lines), timeout=timeout)
    finally:
        process.kill()


def answers(out: str) -> list[str]:
    return [line.split("assistant> ", 1)[1] for line in out.splitlines() if "assistant> " in line]


class Output:
    """The chat's stdout, read by a thread, so that the test waits with a deadline."""

    def __init__(self, process: subprocess.Popen):
        self.chars, self.seen = queue.Queue(), ""
        threading.Thread(target=lambda: [self.chars.put(c) for c in iter(lambda: process.stdout.read(1), "")],
                         daemon=True).start()

    def wait_for(self, done, what: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not done(self.seen):
            try:
                self.seen += self.chars.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                raise AssertionError(f"no {what} within {timeout} s; the chat wrote: {self.seen[-500:]!r}") from None
        return self.seen


def answer_length(seen: str) -> int:
    return len(seen.split("assistant> ", 1)[1]) if "assistant> " in seen else -1


@pytest.mark.timeout(300)
def test_answers_refuses_what_does_not_fit_and_goes_on(merged_model):
    process = chat(merged_model, *GREEDY)
    out, err = talk(process, ["x" * 5000, IDENTITY_QUESTIONS[0], "/exit"], timeout=240)
    assert process.returncode == 0, err
    assert "error: Your message is" in err  # the 5000-character message is refused ...
    assert NAME in answers(out)[-1]        # ... and the next question is answered


@pytest.mark.timeout(300)
def test_max_input_tokens_clear_and_ctrl_d(merged_model):
    """MAX_INPUT_TOKENS bounds the prompt: a longer message is refused, and a second message that
    no longer fits with the first one's turn leaves it out (a notice says so); after /clear
    there is nothing to leave out; Ctrl-D (end of input) quits cleanly."""
    process = chat(merged_model, *GREEDY, "--max-new-tokens", 30, env={"MAX_INPUT_TOKENS": "100"})
    out, err = talk(process, ["y" * 150, "a" * 50, "b" * 50, "/clear", "c" * 50])
    assert process.returncode == 0, err
    assert "error: Your message is" in err and "the limit is" in err
    assert err.count("oldest message(s) were left out") == 1, err   # for "b", not after /clear
    assert len(answers(out)) == 4                                   # y refused: its line is empty


@pytest.mark.timeout(300)
def test_sampling_flags_reach_generation(endless_model_dir):
    """The endless model never stops by itself: its answer is as long as --max-new-tokens, and
    with --temperature 0 (greedy) the same question gets the same answer (sampling from its
    nearly flat random distribution would not)."""
    process = chat(endless_model_dir, "--max-new-tokens", 12, "--temperature", 0)
    out, err = talk(process, ["hi", "/clear", "hi"])
    assert process.returncode == 0, err
    first, second = answers(out)
    # Each token of the tiny vocabulary is one character or one byte (a stray byte shows as one
    # "�"), so 12 tokens are at most 12 characters; re-tokenizing the text would not count them.
    assert 1 <= len(first) <= 12, first
    assert first == second


@pytest.mark.timeout(120)
def test_bad_flags_and_models_exit_with_a_message(merged_model, tmp_path):
    for args, message in [([merged_model, "--temperature", "-1"], "temperature=-1.0 is out of range"),
                          ([tmp_path / "none"], "no such folder")]:
        process = chat(*args)
        _, err = talk(process, [], timeout=100)
        assert process.returncode == 2 and message in err, err


@pytest.mark.timeout(300)
def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(endless_model_dir):
    process = chat(endless_model_dir, "--max-new-tokens", 4000, "--temperature", 0)
    try:
        output = Output(process)
        process.stdin.write("hi\n")
        process.stdin.flush()
        output.wait_for(lambda seen: answer_length(seen) >= 20, "streamed answer", WAIT_S)
        process.send_signal(signal.SIGINT)
        output.wait_for(lambda seen: "[stopped]" in seen, "[stopped] after Ctrl-C", WAIT_S)
        process.stdin.write("/exit\n")
        process.stdin.flush()
        assert process.wait(timeout=WAIT_S) == 0
    finally:
        process.kill()


@pytest.mark.timeout(300)
def test_a_read_that_never_gets_its_text_fails_at_its_deadline(endless_model_dir):
    """The deadline itself: waiting for an end that the endless model never writes fails after
    the wait's timeout, instead of hanging the suite."""
    process = chat(endless_model_dir, "--max-new-tokens", 4000, "--temperature", 0)
    try:
        output = Output(process)
        process.stdin.write("hi\n")
        process.stdin.flush()
        output.wait_for(lambda seen: answer_length(seen) >= 1, "streamed answer", WAIT_S)
        start = time.monotonic()
        with pytest.raises(AssertionError, match="no end of the answer within 3 s"):
            output.wait_for(lambda seen: "\nyou> " in seen.split("assistant> ", 1)[1], "end of the answer", 3)
        assert time.monotonic() - start < 10
    finally:
        process.kill()
