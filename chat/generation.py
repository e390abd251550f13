"""Streaming generation on public transformers APIs only: `generate` runs in a thread and feeds a
TextIteratorStreamer; a StoppingCriteria watches a stop event, so Stop (or a closed tab) ends the
thread itself within a token, not just the stream the user sees."""
import logging
import math
import queue
import threading
from dataclasses import dataclass, fields
from typing import Callable, Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from chat import history
from chat.template import build_prompt

log = logging.getLogger(__name__)

# Inclusive ranges; values outside are refused with a message naming the range. The one clamp is
# max_new_tokens, lowered to the room left in the model's context (see chat/history.py).
RANGES = {
    "max_new_tokens": (1, None),
    "temperature": (0.0, 2.0),     # 0 = greedy decoding
    "top_p": (0.01, 1.0),
    "top_k": (0, 100),             # 0 = off
    "repetition_penalty": (1.0, 2.0),
}
POLL_S = 0.1  # how often the reader checks that the generating thread is still alive


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; defaults are the tutorial demo's (top_p 0.8, temperature 0.7,
    repetition_penalty 1.005). Invalid values raise ValueError with a message for the user."""
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 50
    repetition_penalty: float = 1.005

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, checked(f.name, getattr(self, f.name), f.type is int))

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False, "repetition_penalty": self.repetition_penalty}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "repetition_penalty": self.repetition_penalty}


def checked(name: str, value, integer: bool):
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or (integer and number != int(number)):
        kind = "a whole number" if integer else "a number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    low, high = RANGES[name]
    if number < low or (high is not None and number > high):
        allowed = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name}={value!r} is out of range: it must be {allowed}")
    return int(number) if integer else number


class Stats:
    """Process-wide counters of generation threads; the app exposes them (GET /health) so tests
    and operators can see that a stopped generation really ended."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts = {"generating": 0, "tokens_generated": 0, "finished": 0, "stopped": 0,
                       "failed": 0}

    def add(self, **deltas: int) -> None:
        with self._lock:
            for key, delta in deltas.items():
                self.counts[key] += delta

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self.counts)


STATS = Stats()


class StopOnEvent(StoppingCriteria):
    """Called by `generate` after every new token: counts it, and ends generation once
    `stop_event` is set."""

    def __init__(self, stop_event: threading.Event):
        self.stop_event = stop_event
        self.fired = False  # whether generation ended because of the event

    def __call__(self, input_ids, scores, **kwargs):
        STATS.add(tokens_generated=input_ids.shape[0])
        self.fired = self.stop_event.is_set()
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool,
                          device=input_ids.device)


def run_generate(model, kwargs: dict, stopper: StopOnEvent, errors: list) -> None:
    """Thread body: any exception is handed to the reader, which re-raises it."""
    STATS.add(generating=1)
    try:
        model.generate(**kwargs, stopping_criteria=StoppingCriteriaList([stopper]))
        STATS.add(**{"stopped" if stopper.fired else "finished": 1})
    except BaseException as e:  # noqa: BLE001 - everything must reach the reader
        errors.append(e)
        STATS.add(failed=1)
    finally:
        STATS.add(generating=-1)


def stream_reply(loaded, messages: list[dict], system: str = "", sampling: Sampling = Sampling(),
                 stop_event: threading.Event | None = None, *,
                 max_input_tokens: int | None = None,
                 notify: Callable[[str], None] | None = None) -> Iterator[str]:
    """Yield the reply to `messages` as it grows (at least once: the final text). Setting
    `stop_event`, or closing this generator, ends the generating thread within a token.
    Bad input raises ValueError; notices (history trimmed, max_new_tokens lowered) go to
    `notify` (default: the log)."""
    fitted = history.fit(loaded.tokenizer, messages, system, sampling.max_new_tokens,
                         loaded.context, max_input_tokens)
    for notice in fitted.notices:
        (notify or log.warning)(notice)
    stop_event = stop_event or threading.Event()
    inputs = loaded.tokenizer(build_prompt(fitted.messages, system), add_special_tokens=False,
                              return_tensors="pt").to(loaded.model.device)
    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                    timeout=POLL_S)
    pad_id = loaded.tokenizer.pad_token_id
    kwargs = {**inputs, **sampling.generate_kwargs(), "max_new_tokens": fitted.max_new_tokens,
              "eos_token_id": loaded.stop_ids, "streamer": streamer,
              "pad_token_id": loaded.stop_ids[0] if pad_id is None else pad_id}
    errors = []
    thread = threading.Thread(target=run_generate, name="generate", daemon=True,
                              args=(loaded.model, kwargs, StopOnEvent(stop_event), errors))
    thread.start()
    text = ""
    try:
        while True:
            try:
                piece = next(streamer)
            except StopIteration:
                break
            except queue.Empty:
                if thread.is_alive():
                    continue
                break  # the thread died without ending the stream: its error is raised below
            if piece:
                text += piece
                yield text
    finally:
        stop_event.set()  # the reader is gone (done, Stop, closed tab): end generation now
        thread.join()
    if errors:
        raise errors[0]
    if not text:
        yield text


def reply(loaded, messages: list[dict], system: str = "", sampling: Sampling = Sampling(),
          **kwargs) -> str:
    """The whole reply (same path as streaming, so evaluation sees what users see)."""
    text = ""
    for text in stream_reply(loaded, messages, system, sampling, **kwargs):
        pass
    return text
