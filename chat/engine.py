"""The app on a serving engine: with ENGINE_URL set (an OpenAI-compatible base URL ending in /v1,
e.g. `make serve-engine`'s vLLM) the app loads no weights and streams answers from the engine,
which batches every user's requests together.

    engine = EngineModel("http://127.0.0.1:8000/v1")
    for text in engine.stream_reply([{"role": "user", "content": "Who are you?"}]): ...

Token counts for trimming the history come from the engine's own tokenizer (vLLM's POST
/tokenize), so the app needs no model files. On first use the client checks that the engine's
chat template is one of the kit's formats token for token (chat/formats.py): the trimming below
counts the prompt the engine really builds. Closing the stream (Stop, a closed tab, a client that
went away) closes the HTTP response, which makes the engine abort the request.
"""
import json
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import httpx

from chat import formats, history
from chat.generation import STATS, Sampling

log = logging.getLogger(__name__)

# Connecting fails fast; a read may wait while the engine works through a queue of other users.
TIMEOUT = httpx.Timeout(10.0, read=120.0)
CHECK_TIMEOUT_S = 3.0
TOKEN_CACHE_SIZE = 4096  # texts; cleared when full
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

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        key = (self.model, text, add_special_tokens)
        ids = self.engine.token_cache.get(key)
        if ids is None:
            body = {"model": self.model, "prompt": text, "add_special_tokens": add_special_tokens}
            ids = self.engine.post("tokenize", body)["tokens"]
            if len(self.engine.token_cache) >= TOKEN_CACHE_SIZE:
                self.engine.token_cache.clear()
            self.engine.token_cache[key] = ids
        return {"input_ids": ids}


class EngineModel:
    """Stands where chat.loading.LoadedModel stands when ENGINE_URL is set."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None):
        self.url = url.rstrip("/")
        self.root = self.url.removesuffix("/v1")  # vLLM serves /tokenize and /health beside /v1
        self.model_id = model or ""
        self.device, self.dtype = f"the engine at {self.url}", "the engine's"
        self.assistant = {}  # whose assistant: only merged folders say (chat/loading.py)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=TIMEOUT)
        self._served = None
        self._lock = threading.Lock()
        # Token ids by text: trimming re-counts every earlier message (and the empty prompt) on
        # each turn, one /tokenize round trip each; cached, a turn costs one or two.
        self.token_cache = {}

    def unreachable(self, e: Exception) -> EngineError:
        return EngineError(f"The serving engine at {self.url} is not answering ({type(e).__name__}: "
                           f"{e}). The chat works again as soon as the engine is back.")

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
            raise EngineError(f"ENGINE_MODEL={self.model_id!r}, but the engine at {self.url} "
                              f"serves {', '.join(ids) or 'nothing'}")
        chosen = next(m for m in models if m["id"] == (self.model_id or ids[0]))
        if "max_model_len" not in chosen:
            raise EngineError(f"the engine at {self.url} does not say its context length "
                              "(max_model_len in /v1/models); the app needs vLLM's server")
        tokenizer = EngineTokenizer(self, chosen["id"])
        fmt = self.chat_format(tokenizer)
        ids_of = {token: tokenizer(token)["input_ids"] for token in fmt.stop_tokens}
        stops = [ids[0] for ids in ids_of.values() if len(ids) == 1]
        if len(stops) != len(ids_of):
            raise EngineError(f"the engine's tokenizer has no single token for each of "
                              f"{', '.join(fmt.stop_tokens)}, which {fmt.name} stops on")
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
        raise EngineError(f"the engine at {self.url} formats conversations with a chat template "
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
        """chat.generation.stream_reply's contract (notices, `info`), answered by the engine."""
        try:
            served = self.served()
            tokenizer = EngineTokenizer(self, served.model)
            fitted = history.fit(tokenizer, served.format, messages, system,
                                 sampling.max_new_tokens, served.context, max_input_tokens)
            prompt = served.format.build_prompt(fitted.messages, system)
            counts = {"prompt_tokens": len(tokenizer(prompt)["input_ids"]), "completion_tokens": 0,
                      "finish_reason": "stop"}  # "stop" also when the caller stops the answer
        except EngineError:
            self.forget()
            raise
        for notice in fitted.notices:
            (notify or log.warning)(notice)
        body = {"model": served.model, "stream": True, "stream_options": {"include_usage": True},
                "messages": ([{"role": "system", "content": system}] if system else [])
                + fitted.messages,
                "max_tokens": fitted.max_new_tokens, **request_sampling(sampling),
                "stop_token_ids": served.stop_ids, "skip_special_tokens": True}
        text = ""
        STATS.add(generating=1)
        outcome = "stopped"  # unless the stream ends by itself
        try:
            with self.client.stream("POST", f"{self.url}/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise EngineError(f"The serving engine refused the request "
                                      f"({response.status_code}: {error_text(response)})")
                for chunk in events(response):
                    if stop_event is not None and stop_event.is_set():
                        break  # leaving the block closes the response: the engine aborts
                    if chunk.get("usage"):  # the last chunk: the engine's own counts
                        usage = chunk["usage"]
                        STATS.add(tokens_generated=usage["completion_tokens"]
                                  - counts["completion_tokens"])
                        counts.update(prompt_tokens=usage["prompt_tokens"],
                                      completion_tokens=usage["completion_tokens"])
                    for choice in chunk.get("choices", []):
                        counts["finish_reason"] = choice.get("finish_reason") or "stop"
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece:  # a chunk is a token or more: counted exactly at the end
                            counts["completion_tokens"] += 1
                            STATS.add(tokens_generated=1)
                            text += piece
                            yield text
                else:
                    outcome = "finished"
        except httpx.HTTPError as e:
            outcome = "failed"
            self.forget()
            raise self.unreachable(e) from None
        except EngineError:
            outcome = "failed"
            raise
        finally:
            STATS.add(generating=-1, **{outcome: 1})
            if info is not None:
                info.update(counts)
        if not text:
            yield text


def request_sampling(sampling: Sampling) -> dict:
    """The app's sampling controls as vLLM request fields (top_k 0 = off in both)."""
    fields = {"temperature": sampling.temperature, "top_p": sampling.top_p,
              "top_k": sampling.top_k, "repetition_penalty": sampling.repetition_penalty}
    seed = getattr(sampling, "seed", None)
    if seed is not None:
        fields["seed"] = seed
    return fields


def events(response: httpx.Response) -> Iterator[dict]:
    """The JSON chunks of a server-sent-events stream, up to `data: [DONE]`."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    error = body.get("error", body) if isinstance(body, dict) else body
    return str(error.get("message", error) if isinstance(error, dict) else error)[:300]
