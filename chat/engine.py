"""The app on a serving engine: with ENGINE_URL set (an OpenAI-compatible base URL ending in /v1,
e.g. `make serve-engine`'s vLLM) the app loads no weights and streams answers from the engine,
which batches every user's requests together.

    engine = EngineModel("http://127.0.0.1:8000/v1")
    for text in engine.stream_reply([{"role": "user", "content": "Who are you?"}]): ...

Token ids come from the engine's own tokenizer (vLLM's POST /tokenize), so the app needs no model
files. On first use the client checks that the engine's chat template is one of the kit's formats
token for token (chat/formats.py). The app then builds the prompt's token ids itself and sends
them to the engine's /v1/completions: the engine's chat template would read a `<|im_start|>` typed
by a user as a control token, the kit's format (chat/formats.py) keeps it text. Closing the
stream (Stop, a closed tab, a client that went away, a stalled engine) shuts the connection,
which makes the engine abort the request.
"""
import json
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import httpx

from chat import formats, history
from chat.generation import STATS, Sampling

log = logging.getLogger(__name__)

# Connecting fails fast; a read may wait while the engine works through a queue of other users.
TIMEOUT = httpx.Timeout(10.0, read=120.0)
CHUNK_TIMEOUT_S = 60.0   # default ENGINE_READ_TIMEOUT: the most an answer may wait for its next chunk
WATCH_S = 0.05           # how soon a stopped or stalled stream's connection is shut
CHECK_TIMEOUT_S = 3.0
TOKEN_CACHE_BYTES = 32 * 2**20  # texts and their ids; cleared when over
# Text that could hold a special token (<s>, </s>, <|im_start|>, ...): the engine's /tokenize
# reads those as control tokens, so such text is tokenized in pieces that cannot (text_ids).
SPECIAL_LIKE = re.compile(r"<[^<>]*>")
SAMPLE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
          {"role": "user", "content": "Who are you?"}]


class EngineError(RuntimeError):
    """The engine is unreachable or failed; the message says so in words a user understands."""


@dataclass(frozen=True)
class Served:
    """What the engine serves, read once per connection."""
    model: str
    context: int              # max_model_len: prompt + answer
    format: formats.ChatFormat
    stop_ids: list[int]


class EngineTokenizer:
    """Just enough of a tokenizer for chat/history.py: token ids of a text, from the engine."""

    def __init__(self, engine: "EngineModel", model: str):
        self.engine, self.model = engine, model

    def __call__(self, text: str, add_special_tokens: bool = False,
                 split_special_tokens: bool = False) -> dict:
        if split_special_tokens and SPECIAL_LIKE.search(text):
            # Cut after each "<": no piece holds a whole <...> token, so none becomes one.
            pieces = [piece for piece in re.split(r"(?<=<)", text) if piece]
            return {"input_ids": [i for piece in pieces for i in self(piece)["input_ids"]]}
        key = (self.model, text, add_special_tokens)
        ids = self.engine.token_cache.get(key)
        if ids is None:
            body = {"model": self.model, "prompt": text, "add_special_tokens": add_special_tokens}
            ids = self.engine.post("tokenize", body)["tokens"]
            self.engine.token_cache.put(key, ids)
        return {"input_ids": ids}

    def convert_tokens_to_ids(self, token: str) -> int:
        ids = self(token)["input_ids"]
        if len(ids) != 1:
            raise EngineError(f"the engine's tokenizer has no single token for {token}")
        return ids[0]


class TokenCache:
    """Token ids by text, bounded by the bytes it holds (texts are at most MAX_INPUT_TOKENS x
    history.CHARS_PER_TOKEN characters, but many of them add up): cleared when over `limit`."""

    def __init__(self, limit: int = TOKEN_CACHE_BYTES):
        self.limit, self.size, self.items = limit, 0, {}
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            return self.items.get(key)

    def put(self, key, ids: list[int]) -> None:
        cost = len(key[1].encode("utf-8", "surrogatepass")) + 8 * len(ids) + 100
        with self.lock:
            if self.size + cost > self.limit:
                self.items.clear()
                self.size = 0
            if key not in self.items:
                self.items[key] = ids
                self.size += cost

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
            self.size = 0

    def __len__(self) -> int:
        return len(self.items)


class EngineModel:
    """Stands where chat.loading.LoadedModel stands when ENGINE_URL is set."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None,
                 chunk_timeout: float = CHUNK_TIMEOUT_S):
        self.url = url.rstrip("/")
        self.public_url = redact_url(self.url)  # what messages, logs and pages may show
        self.root = self.url.removesuffix("/v1")  # vLLM serves /tokenize and /health beside /v1
        self.model_id = model or ""
        self.chunk_timeout = chunk_timeout
        self.device, self.dtype = f"the engine at {self.public_url}", "the engine's"
        self.assistant = {}  # whose assistant: only merged folders say (chat/loading.py)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=TIMEOUT)
        self._served = None
        self._lock = threading.Lock()
        # Token ids by text: trimming re-counts every earlier message (and the empty prompt) on
        # each turn, one /tokenize round trip each; cached, a turn costs one or two.
        self.token_cache = TokenCache()

    def unreachable(self, e: Exception) -> EngineError:
        detail = str(e).replace(self.url, self.public_url).replace(self.root, redact_url(self.root))
        return EngineError(f"The serving engine at {self.public_url} is not answering "
                           f"({type(e).__name__}: {detail}). The chat works again as soon as the "
                           "engine is back.")

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        base = self.root if path == "tokenize" else self.url
        try:
            response = self.client.request(method, f"{base}/{path}", **kwargs)
        except httpx.HTTPError as e:
            raise self.unreachable(e) from None
        if response.status_code >= 400:
            raise EngineError(f"The serving engine refused the request ({response.status_code}: "
                              f"{error_text(response)})")
        return response

    def post(self, path: str, body: dict) -> dict:
        return self.request("POST", path, json=body).json()

    def served(self) -> Served:
        """The engine's model, context and chat format (cached until a request fails)."""
        with self._lock:
            if self._served is None:
                self._served = self.connect()
            return self._served

    def connect(self) -> Served:
        models = self.request("GET", "models").json()["data"]
        ids = [m["id"] for m in models]
        if self.model_id and self.model_id not in ids:
            raise EngineError(f"ENGINE_MODEL={self.model_id!r}, but the engine at {self.public_url} "
                              f"serves {', '.join(ids) or 'nothing'}")
        chosen = next(m for m in models if m["id"] == (self.model_id or ids[0]))
        if "max_model_len" not in chosen:
            raise EngineError(f"the engine at {self.public_url} does not say its context length "
                              "(max_model_len in /v1/models); the app needs vLLM's server")
        tokenizer = EngineTokenizer(self, chosen["id"])
        fmt = self.chat_format(tokenizer)
        stops = [tokenizer.convert_tokens_to_ids(token) for token in fmt.stop_tokens]
        return Served(chosen["id"], chosen["max_model_len"], fmt, stops)

    def chat_format(self, tokenizer: EngineTokenizer) -> formats.ChatFormat:
        """The kit's format whose prompt the engine tokenizes exactly as it tokenizes the same
        messages through its own chat template."""
        system = "You are a helpful assistant."
        engine_ids = self.post("tokenize", {
            "model": tokenizer.model, "add_generation_prompt": True,
            "messages": [{"role": "system", "content": system}, *SAMPLE]})["tokens"]
        for fmt in formats.FORMATS.values():
            if tokenizer(fmt.build_prompt(SAMPLE, system))["input_ids"] == engine_ids:
                return fmt
        raise EngineError(f"the engine at {self.public_url} formats conversations with a chat template "
                          f"that is none of the kit's ({', '.join(formats.FORMATS)}): serve the "
                          "model with `make serve-engine`, which passes the family's template")

    @property
    def tokenizer(self) -> EngineTokenizer:
        return EngineTokenizer(self, self.served().model)

    @property
    def format(self) -> formats.ChatFormat:
        return self.served().format

    @property
    def context(self) -> int:
        return self.served().context

    def check(self) -> str | None:
        """Why the engine cannot answer right now, or None when it can (for /health)."""
        try:
            response = self.client.get(f"{self.url}/models", timeout=CHECK_TIMEOUT_S)
            response.raise_for_status()
        except httpx.HTTPError as e:
            self.forget()
            return str(self.unreachable(e))
        return None

    def forget(self) -> None:
        """Read the engine's model and format again next time (it may have restarted)."""
        with self._lock:
            self._served = None
            self.token_cache.clear()

    def stream_reply(self, messages: list[dict], system: str = "", sampling: Sampling = Sampling(),
                     stop_event: threading.Event | None = None, *,
                     max_input_tokens: int | None = None,
                     notify: Callable[[str], None] | None = None,
                     info: dict | None = None) -> Iterator[str]:
        """chat.generation.stream_reply's contract (notices, `info`), answered by the engine.
        A chunk that takes longer than `chunk_timeout` (a stalled engine, one that sends only
        keep-alives) ends the answer with an EngineError; a stream cut short is one too."""
        try:
            served = self.served()
            tokenizer = EngineTokenizer(self, served.model)
            fitted = history.fit(tokenizer, served.format, messages, system,
                                 sampling.max_new_tokens, served.context, max_input_tokens)
            prompt = served.format.encode(tokenizer, fitted.messages, system)
            counts = {"prompt_tokens": len(prompt), "completion_tokens": 0,
                      "finish_reason": "stop"}  # "stop" also when the caller stops the answer
        except EngineError:
            self.forget()
            raise
        for notice in fitted.notices:
            (notify or log.warning)(notice)
        body = {"model": served.model, "prompt": prompt, "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": fitted.max_new_tokens, **request_sampling(sampling),
                "stop_token_ids": served.stop_ids, "skip_special_tokens": True}
        stop_event = stop_event or threading.Event()
        text = ""
        STATS.add(generating=1)
        outcome = "stopped"  # unless the stream ends by itself
        watch = None
        try:
            with self.client.stream("POST", f"{self.url}/completions", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise EngineError(f"The serving engine refused the request "
                                      f"({response.status_code}: {error_text(response)})")
                watch = Watch(response, stop_event, self.chunk_timeout)
                for chunk in events(response, watch):
                    if stop_event.is_set():
                        break  # leaving the block closes the response: the engine aborts
                    if chunk.get("usage"):  # the last chunk: the engine's own counts
                        usage = chunk["usage"]
                        STATS.add(tokens_generated=usage["completion_tokens"]
                                  - counts["completion_tokens"])
                        counts.update(prompt_tokens=usage["prompt_tokens"],
                                      completion_tokens=usage["completion_tokens"])
                    for choice in chunk.get("choices") or []:
                        counts["finish_reason"] = choice.get("finish_reason") or "stop"
                        piece = choice.get("text") or ""
                        if piece:  # a chunk is a token or more: counted exactly at the end
                            counts["completion_tokens"] += 1
                            STATS.add(tokens_generated=1)
                            text += piece
                            yield text
                else:
                    outcome = "finished"
        except (httpx.HTTPError, EngineError, ValueError, KeyError, TypeError) as e:
            if stop_event.is_set() and not (watch and watch.stalled):
                return  # stopped by the caller: the shut connection is no failure
            outcome = "failed"
            if watch and watch.stalled:
                raise EngineError(f"The serving engine sent nothing for "
                                  f"{self.chunk_timeout:g} s (ENGINE_READ_TIMEOUT): the answer "
                                  "was stopped.") from None
            if isinstance(e, httpx.HTTPError):
                self.forget()
                raise self.unreachable(e) from None
            if isinstance(e, EngineError):
                raise
            raise EngineError(f"The serving engine sent a malformed answer ({type(e).__name__}: "
                              f"{str(e)[:200]}).") from None
        finally:
            if watch:
                watch.done.set()
            STATS.add(generating=-1, **{outcome: 1})
            if info is not None:
                info.update(counts)
        if not text:
            yield text


class Watch:
    """Shuts a streamed response's connection when the caller stops (a closed tab, a client gone)
    or when no event has come for `timeout` seconds, so a reader blocked on a silent engine
    returns at once instead of holding its generation slot."""

    def __init__(self, response: httpx.Response, stop_event: threading.Event, timeout: float):
        self.stop_event, self.timeout = stop_event, timeout
        self.last = time.monotonic()  # of the last event (keep-alives do not count)
        self.stalled = False
        self.done = threading.Event()
        stream = response.extensions.get("network_stream")
        self.socket = stream.get_extra_info("socket") if stream is not None else None
        threading.Thread(target=self.run, name="engine-watch", daemon=True).start()

    def progress(self) -> None:
        self.last = time.monotonic()

    def run(self) -> None:
        while not self.done.wait(WATCH_S):
            self.stalled = time.monotonic() - self.last > self.timeout
            if self.stalled or self.stop_event.is_set():
                self.stop_event.set()
                try:
                    self.socket.shutdown(socket.SHUT_RDWR)  # the blocked read returns now
                except (OSError, AttributeError):
                    pass
                return


def request_sampling(sampling: Sampling) -> dict:
    """The app's sampling controls as vLLM request fields (top_k 0 = off in both)."""
    fields = {"temperature": sampling.temperature, "top_p": sampling.top_p,
              "top_k": sampling.top_k, "repetition_penalty": sampling.repetition_penalty}
    seed = getattr(sampling, "seed", None)
    if seed is not None:
        fields["seed"] = seed
    return fields


def events(response: httpx.Response, watch: Watch) -> Iterator[dict]:
    """The JSON chunks of a server-sent-events stream, up to `data: [DONE]`; a stream that ends
    before it, or a chunk that is not a JSON object, is an EngineError."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue  # keep-alives and comments: no progress
        watch.progress()
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if not isinstance(chunk, dict):
            raise EngineError(f"The serving engine sent a malformed chunk: {data[:200]}")
        if "error" in chunk:
            raise EngineError(f"The serving engine failed mid-answer: {error_text_of(chunk)}")
        yield chunk
    raise EngineError("The serving engine's answer was cut off before its end (no [DONE]).")


def error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    return error_text_of(body)


def error_text_of(body) -> str:
    error = body.get("error", body) if isinstance(body, dict) else body
    return str(error.get("message", error) if isinstance(error, dict) else error)[:300]


def redact_url(url: str) -> str:
    """`url` without its credentials (user:password@), which pages and logs must not show."""
    return re.sub(r"(?<=://)[^/@]*@", "***@", url or "")
