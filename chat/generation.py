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
from transformers import (LogitsProcessor, LogitsProcessorList, StoppingCriteria,
                          StoppingCriteriaList, TemperatureLogitsWarper, TextIteratorStreamer,
                          TopKLogitsWarper, TopPLogitsWarper)

from chat import history

log = logging.getLogger(__name__)

# Inclusive ranges; values outside are refused with a message naming the range. The one clamp is
# max_new_tokens, lowered to the room left in the model's context (see chat/history.py).
RANGES = {
    "max_new_tokens": (1, None),
    "temperature": (0.0, 2.0),     # 0 = greedy decoding
    "top_p": (0.01, 1.0),
    "top_k": (0, 100),             # 0 = off
    "repetition_penalty": (1.0, 2.0),
    "seed": (0, 2**63 - 1),
}
POLL_S = 0.1  # how often the reader checks that the generating thread is still alive
# Rows per generate_batch call: on 2 CPU cores 64 rows answered 128 replay prompts 1.53x faster than
# 16, with the same greedy answers (bench/bench_batch.py); 128 was slower again (more padding).
BATCH_SIZE = 64


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; defaults are the tutorial demo's (top_p 0.8, temperature 0.7,
    repetition_penalty 1.005). Invalid values raise ValueError with a message for the user."""
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 50
    repetition_penalty: float = 1.005
    seed: int | None = None  # None: draws from torch's global RNG; see SeededSample

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or f.default is not None:
                object.__setattr__(self, f.name, checked(f.name, value, f.type in (int, int | None)))

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False, "repetition_penalty": self.repetition_penalty}
        warpers = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        if self.seed is None:
            return {"do_sample": True, "repetition_penalty": self.repetition_penalty, **warpers}
        # The same warpers as `generate` applies when sampling, in its order, then our own draw.
        processors = [TemperatureLogitsWarper(self.temperature)]
        processors += [TopKLogitsWarper(self.top_k)] if self.top_k else []
        processors += [TopPLogitsWarper(self.top_p)] if self.top_p < 1 else []
        return {"do_sample": False, "repetition_penalty": self.repetition_penalty,
                "logits_processor": LogitsProcessorList([*processors, SeededSample(self.seed)])}


class SeededSample(LogitsProcessor):
    """Draws the next token from its own torch.Generator and leaves only that token possible, so
    the greedy step of `generate` picks it. `generate` itself samples from torch's global RNG,
    which every concurrent generation shares; with this, a request's seed alone decides its draws:
    the same seed, settings and conversation give the same answer, whatever else runs."""

    def __init__(self, seed: int):
        self.seed = seed
        self.generator = None  # made on the logits' device at the first token

    def __call__(self, input_ids, scores):
        if self.generator is None:
            self.generator = torch.Generator(scores.device).manual_seed(self.seed)
        choice = torch.multinomial(scores.float().softmax(-1), 1, generator=self.generator)
        return torch.full_like(scores, -math.inf).scatter_(1, choice, 0.0)


def checked(name: str, value, integer: bool):
    try:
        number = value if type(value) is int else float(value)  # ints exactly, however large (seeds)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or (isinstance(number, float) and not math.isfinite(number)) \
            or (integer and number != int(number)):
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
        self.ids = None     # prompt + answer so far, for finish_info

    def __call__(self, input_ids, scores, **kwargs):
        STATS.add(tokens_generated=input_ids.shape[0])
        self.ids = input_ids
        self.fired = self.stop_event.is_set()
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool,
                          device=input_ids.device)

    def finish_info(self, prompt_tokens: int, max_new_tokens: int, stop_ids: list[int]) -> dict:
        """Token counts and why the answer ended: "stop" (a stop token, or stopped by the
        caller) or "length" (max_new_tokens reached), as OpenAI's finish_reason says it."""
        completion = 0 if self.ids is None else self.ids.shape[1] - prompt_tokens
        on_stop_token = completion > 0 and int(self.ids[0, -1]) in stop_ids
        length = completion >= max_new_tokens and not on_stop_token
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "finish_reason": "length" if length else "stop"}


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
                 notify: Callable[[str], None] | None = None,
                 info: dict | None = None) -> Iterator[str]:
    """Yield the reply to `messages` as it grows (at least once: the final text). Setting
    `stop_event`, or closing this generator, ends the generating thread within a token.
    Bad input raises ValueError; notices (history trimmed, max_new_tokens lowered) go to
    `notify` (default: the log). Once generation has ended (also when the caller closes this
    generator), `info` gets prompt_tokens, completion_tokens (the stop token included) and
    finish_reason ("stop" | "length")."""
    if hasattr(loaded, "stream_reply"):  # chat.engine.EngineModel (ENGINE_URL): the engine answers
        yield from loaded.stream_reply(messages, system, sampling, stop_event, info=info,
                                       max_input_tokens=max_input_tokens, notify=notify)
        return
    fitted = history.fit(loaded.tokenizer, loaded.format, messages, system, sampling.max_new_tokens,
                         loaded.context, max_input_tokens)
    for notice in fitted.notices:
        (notify or log.warning)(notice)
    stop_event = stop_event or threading.Event()
    ids = torch.tensor([loaded.format.encode(loaded.tokenizer, fitted.messages, system)])
    inputs = {"input_ids": ids.to(loaded.model.device),
              "attention_mask": torch.ones_like(ids).to(loaded.model.device)}
    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                    timeout=POLL_S)
    pad_id = loaded.tokenizer.pad_token_id
    kwargs = {**inputs, **sampling.generate_kwargs(), "max_new_tokens": fitted.max_new_tokens,
              "eos_token_id": loaded.stop_ids, "streamer": streamer,
              "pad_token_id": loaded.stop_ids[0] if pad_id is None else pad_id}
    errors = []
    stopper = StopOnEvent(stop_event)
    thread = threading.Thread(target=run_generate, name="generate", daemon=True,
                              args=(loaded.model, kwargs, stopper, errors))
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
        if info is not None:
            info.update(stopper.finish_info(inputs["input_ids"].shape[1], fitted.max_new_tokens,
                                            loaded.stop_ids))
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


@dataclass(frozen=True)
class Answer:
    text: str
    ended: bool  # stopped at a stop token, rather than at max_new_tokens


def generate_batch(loaded, conversations: list[list[dict]], system: str = "",
                   sampling: Sampling = Sampling(temperature=0), batch_size: int = BATCH_SIZE) -> list[Answer]:
    """Answers to many conversations at once (evaluation, the base model's replay answers):
    prompts of similar length are left-padded into batches of `batch_size`. With greedy
    sampling each answer is the one `reply` gives; sampled answers differ (one RNG per batch)."""
    tokenizer, fmt = loaded.tokenizer, loaded.format
    prompts = [fmt.encode(tokenizer, messages, system) for messages in conversations]
    pad = loaded.stop_ids[0] if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    answers: list[Answer | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in rows])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in rows])
        with torch.no_grad():
            out = loaded.model.generate(
                input_ids=ids.to(loaded.model.device), attention_mask=mask.to(loaded.model.device),
                **sampling.generate_kwargs(), max_new_tokens=sampling.max_new_tokens,
                eos_token_id=loaded.stop_ids, pad_token_id=pad)
        for i, new in zip(rows, out[:, width:].tolist()):
            end = next((k for k, token in enumerate(new) if token in loaded.stop_ids), None)
            answers[i] = Answer(tokenizer.decode(new[:end], skip_special_tokens=True), end is not None)
    return answers
