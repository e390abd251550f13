"""The OpenAI-compatible API: GET /v1/models and POST /v1/chat/completions (whole or streamed as
server-sent events), on the app's own server and port, beside the chat page (README:
"OpenAI-compatible API"). A thin layer like the page: it checks the request, takes a turn in the
app's one pool of generation slots (chat/pool.py) and streams the model's answer through the same
function as the page; chat/ knows nothing of it.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:7860/v1", api_key="...")
    client.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "Hi"}])

Errors are OpenAI's JSON, {"error": {"message", "type", "param", "code"}}, with its statuses:
400 bad request, 401 key, 404 model, 413 body too large (guards.py), 429 pool full or too
many wrong keys, 503 model (or engine) not ready, 500 generation failed. Sizes are checked before
the request takes a generation slot or anything is tokenized.
"""
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from chat import history
from chat.engine import EngineError
from chat.generation import Sampling
from chat.pool import Pool, PoolFull
from guards import Keys, error_body

log = logging.getLogger(__name__)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# OpenAI request fields this server cannot honour, with the values that ask for nothing (accepted).
UNSUPPORTED = {
    "n": (1,), "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "parallel_tool_calls": (True, False), "logprobs": (False,), "top_logprobs": (0,),
    "response_format": ({"type": "text"},), "presence_penalty": (0,), "frequency_penalty": (0,),
    "logit_bias": ({},), "modalities": (["text"],), "audio": (), "prediction": (),
    "reasoning_effort": (), "web_search_options": (), "min_tokens": (0,), "ignore_eos": (False,),
    "best_of": (1,), "echo": (False,), "suffix": (),
}
IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}
# Request field -> Sampling field; top_k and repetition_penalty are the app's extra controls.
SAMPLING = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
            "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
            "repetition_penalty": "repetition_penalty", "seed": "seed"}
KNOWN = {"model", "messages", "stream", "stream_options", "stop", *SAMPLING, *UNSUPPORTED, *IGNORED}
MAX_STOPS = 4  # as OpenAI
MAX_MESSAGES = 2048  # per request; older turns beyond the context are dropped anyway
DISCONNECT_POLL_S = 0.05
CLOSE_RETRY_S = 0.01


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.kind, self.param, self.code),
                            status_code=self.status, headers=headers)


@dataclass
class ChatRequest:
    messages: list[dict]      # user / assistant turns, text only
    system: str | None        # the system messages joined; None: the app's SYSTEM_PROMPT
    sampling: dict            # Sampling fields the client set (max_new_tokens may be missing)
    stops: list[str]
    stream: bool
    include_usage: bool


def parse(body: bytes, served_name: str) -> ChatRequest:
    """The request, checked field by field; APIError (400, 404) names what is wrong."""
    try:
        request = json.loads(body)
    except RecursionError:
        raise APIError(400, "The body of the request is nested too deeply.") from None
    except ValueError as e:  # also UnicodeDecodeError, and numbers of over 4300 digits
        raise APIError(400, f"The body of the request is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(request, dict):
        raise APIError(400, "The body of the request must be a JSON object.")
    for key in request:
        if key not in KNOWN:
            raise APIError(400, f"Unrecognized request argument supplied: {key}", key)
    for key, harmless in UNSUPPORTED.items():
        if request.get(key) is not None and request[key] not in harmless:
            raise APIError(400, f"{key}={request[key]!r:.100} is not supported by this server.",
                           key, "unsupported_parameter")
    model = request.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "model must be a string.", "model")
    stream = request.get("stream") or False
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false.", "stream")
    options = request.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise APIError(400, "stream_options must be {\"include_usage\": true | false}.", "stream_options")
    if options and not stream:
        raise APIError(400, "stream_options is only allowed when stream is true.", "stream_options")
    for key in sorted(set(options) - {"include_usage"}):
        raise APIError(400, f"stream_options.{key} is not supported by this server.",
                       f"stream_options.{key}", "unsupported_parameter")
    messages, system = parse_messages(request.get("messages"))
    sampling = parse_sampling(request)
    stops = parse_stops(request.get("stop"))
    if model is not None and model != served_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves "
                            f"`{served_name}` (GET /v1/models).", "model", "model_not_found")
    return ChatRequest(messages, system, sampling, stops, stream, options.get("include_usage", False))


def parse_messages(messages) -> tuple[list[dict], str | None]:
    """OpenAI messages -> (user/assistant turns, system prompt or None). System (and developer)
    messages, wherever they stand, become the one system prompt, joined by blank lines."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {\"role\", \"content\"}.", "messages")
    if len(messages) > MAX_MESSAGES:
        raise APIError(400, f"messages has {len(messages)} messages; the most is {MAX_MESSAGES}.",
                       "messages", "too_many_messages")
    turns, systems = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object with role and content.", where)
        for key in message:
            if key not in ("role", "content", "name"):
                raise APIError(400, f"{where}.{key} is not supported by this server.",
                               f"{where}.{key}", "unsupported_parameter")
        role = message.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role={role!r:.50}: use one of {', '.join(ROLES)}.",
                           f"{where}.role")
        text = content_text(message.get("content"), f"{where}.content")
        if ROLES[role] == "system":
            systems.append(text)
        else:
            turns.append({"role": ROLES[role], "content": text})
    return turns, "\n\n".join(systems) if systems else None


def content_text(content, where: str) -> str:
    """A message's text: a string, or a list of text parts (other parts are refused)."""
    if isinstance(content, str):
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{where} is not valid Unicode text (a lone surrogate).", where) from None
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of text parts.", where)
    texts = []
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise APIError(400, f"{where}[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                f"are supported, got {kind!r:.50}.", f"{where}[{j}]")
        texts.append(content_text(part["text"], f"{where}[{j}].text"))
    return "".join(texts)


def check_sizes(chat: ChatRequest, max_input_tokens: int) -> None:
    """The question and the system prompt must fit the prompt budget in characters (checked
    before anything is tokenized, chat/history.py); older turns are trimmed later."""
    for where, text in (("messages", chat.messages[-1]["content"] if chat.messages else ""),
                        ("messages (system)", chat.system or "")):
        try:
            history.check_size(text, max_input_tokens)
        except ValueError as e:
            raise APIError(400, str(e), where, "context_length_exceeded") from None


def parse_sampling(request: dict) -> dict:
    """The sampling fields the client set, each checked by chat.generation's own rules (RANGES)
    on its own so that an error names the request field."""
    if request.get("max_tokens") is not None and request.get("max_completion_tokens") is not None:
        raise APIError(400, "Give max_tokens or max_completion_tokens, not both.", "max_tokens")
    values = {}
    for key, field in SAMPLING.items():
        value = request.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise APIError(400, f"{key} must be a number, got {value!r:.50}.", key)
        try:
            values[field] = getattr(Sampling(**{field: value}), field)
        except ValueError as e:
            raise APIError(400, str(e).replace(field, key, 1), key) from None
    return values


def parse_stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS \
            or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, f"stop must be a non-empty string or a list of up to {MAX_STOPS} of them.",
                       "stop")
    return stops


def cut_at_stops(texts, stops: list[str], info: dict):
    """What each growing text adds (deltas), ending before the first stop string. The last
    characters that could still begin a stop string are held back until they cannot. Closes
    `texts` (which ends its generation) when done; a stop string makes finish_reason "stop"."""
    hold = max(map(len, stops), default=1) - 1
    text, sent = "", 0
    try:
        for text in texts:
            found = [i for i in (text.find(s, max(0, sent - hold)) for s in stops) if i >= 0]
            if found:
                if min(found) > sent:
                    yield text[sent:min(found)]
                texts.close()
                info["finish_reason"] = "stop"
                return
            if len(text) - hold > sent:
                yield text[sent:len(text) - hold]
                sent = len(text) - hold
        if len(text) > sent:
            yield text[sent:]
    finally:
        texts.close()


async def in_thread(iterator, stop_event: threading.Event):
    """Iterate a blocking answer stream from async code, one worker-thread hop per item.
    Cancelled (the client went away), it sets `stop_event` at once, even while the thread waits
    for text that may never come (a tokenizer can hold back text for long), and then closes the
    stream, which ends its generation."""
    done = object()
    try:
        while (item := await anyio.to_thread.run_sync(next, iterator, done,
                                                      abandon_on_cancel=True)) is not done:
            yield item
    finally:
        stop_event.set()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(close_when_free, iterator)


def close_when_free(iterator) -> None:
    """Close `iterator` once an abandoned thread's next() on it has returned."""
    while True:
        try:
            return iterator.close()
        except ValueError as e:
            if "already executing" not in str(e):
                raise
            time.sleep(CLOSE_RETRY_S)


async def unless_disconnected(request: Request, work):
    """`await work()`, cancelled if the client disconnects first (then None)."""
    outcome = {}

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        group.cancel_scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(watch)
        try:
            outcome["value"] = await work()
        except Exception as e:  # noqa: BLE001 - raised below, not wrapped in an ExceptionGroup
            outcome["error"] = e
        group.cancel_scope.cancel()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


class EventStream(StreamingResponse):
    """Server-sent events that end the answer and give its pool slot back however the response
    ends, even for a client gone before the first event (then `events` never ran)."""

    def __init__(self, answer: "Answer", ticket):
        super().__init__(answer.events(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.answer, self.ticket = answer, ticket

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.answer.close()
            self.ticket.leave()


def install(app: FastAPI, settings, holder, pool: Pool) -> None:
    """Add the /v1 routes to `app`, before the page is mounted at "/". `holder` has `status`,
    `error`, `loaded` and `stream(messages, system, sampling, **kwargs)` (the
    chat.generation.stream_reply contract, info included)."""
    keys = Keys(settings.api_key, settings.app_auth)
    served = settings.model_name

    async def authorized(request: Request) -> None:
        """The one rule for keys (guards.Keys): API_KEY or the APP_AUTH password as a Bearer
        key, so that /v1 is no open side door to a protected page."""
        if not keys.required:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not keys.key_ok(given.strip()):
            which = "API_KEY" if settings.api_key else "the APP_AUTH password"
            raise APIError(401, f"Missing or wrong API key: send `Authorization: Bearer <key>` "
                                f"with the server's {which}.", None, "invalid_api_key")

    router = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    @router.get("/models")
    def models():
        return {"object": "list", "data": [model_card()]}

    @router.get("/models/{model:path}")
    def model(model: str):
        if model != served:
            raise APIError(404, f"The model `{model}` does not exist.", "model", "model_not_found")
        return model_card()

    def model_card() -> dict:
        return {"id": served, "object": "model", "created": 0, "owned_by": "assistant-kit"}

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        chat = parse(await request.body(), served)
        check_sizes(chat, settings.max_input_tokens)
        if holder.status != "ready":
            detail = f"failed to load: {holder.error}" if holder.error else "is still loading"
            raise APIError(503, f"The model {detail} (GET /health says when it is ready).",
                           None, "model_not_ready", "server_error")
        try:
            ticket = pool.join()
        except PoolFull as e:
            raise APIError(429, str(e), None, "queue_full", "rate_limit_error") from None
        answer, handed_over = Answer(chat, holder, settings), False
        try:  # 499: the client went away (while in line, or before its answer was done)
            if await unless_disconnected(request, lambda: wait_turn(ticket)) is None \
                    or await unless_disconnected(request, answer.start) is None:
                return JSONResponse({}, status_code=499)
            if chat.stream:
                handed_over = True
                return EventStream(answer, ticket)
            body = await unless_disconnected(request, answer.whole)
            return JSONResponse(body, status_code=200 if body else 499)
        finally:
            if not handed_over:
                await answer.close()  # the generation has ended before its slot is free again
                ticket.leave()

    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def unknown(path: str):
        raise APIError(404, f"Unknown API path /v1/{path}: this server has /v1/models and "
                            "/v1/chat/completions.", None, "unknown_url")

    def error_response(request: Request, e: APIError) -> JSONResponse:
        return e.response({"WWW-Authenticate": "Bearer"} if e.status == 401 else None)

    def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.error("unexpected error on %s: %s", request.url.path, type(e).__name__)
        return JSONResponse(error_body(f"Internal error ({type(e).__name__}).", "server_error"),
                            status_code=500)

    app.add_exception_handler(APIError, error_response)
    app.add_exception_handler(Exception, unexpected)
    app.include_router(router)


async def wait_turn(ticket) -> bool:
    while not ticket.wait(0):
        await anyio.sleep(DISCONNECT_POLL_S)
    return True


def generation_failed(e: Exception) -> APIError:
    log.exception("generation failed")
    return APIError(500, f"Generation failed: {type(e).__name__}: {e}", None, None, "server_error")


class Answer:
    """One answer: started in the pool slot (the first piece decides between an error status
    and 200), then read whole or as chat.completion.chunk events."""

    def __init__(self, chat: ChatRequest, holder, settings):
        self.chat, self.holder, self.settings = chat, holder, settings
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = settings.model_name
        self.info = {}
        self.stop = threading.Event()  # set: the generation ends within a token
        self.deltas = self.first = None

    def open(self):
        """The answer's deltas (blocking: the context size may come from an engine)."""
        # Without max_tokens, the page's default length (history.fit lowers it to the room left).
        sampling = Sampling(**self.chat.sampling)
        system = self.settings.system_prompt if self.chat.system is None else self.chat.system
        texts = self.holder.stream(self.chat.messages, system, sampling, self.stop,
                                   max_input_tokens=self.settings.max_input_tokens,
                                   notify=log.info, info=self.info)
        return cut_at_stops(texts, self.chat.stops, self.info)

    async def start(self) -> bool:
        """Read the first piece: bad input (a message too long, an empty question) is a 400."""
        try:
            self.deltas = in_thread(await anyio.to_thread.run_sync(self.open), self.stop)
            self.first = await anext(self.deltas, "")
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        except EngineError as e:  # ENGINE_URL: the engine is down or refused; it may come back
            raise APIError(503, str(e), None, "engine_unavailable", "server_error") from None
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: the client gets the reason
            raise generation_failed(e) from None
        return True

    async def whole(self) -> dict:
        try:
            text = self.first + "".join([delta async for delta in self.deltas])
        except EngineError as e:
            raise APIError(503, str(e), None, "engine_unavailable", "server_error") from None
        except Exception as e:  # noqa: BLE001 - failed mid-answer: an error, not a short answer
            raise generation_failed(e) from None
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model, "usage": self.usage(),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": self.info.get("finish_reason", "stop")}]}

    async def close(self) -> None:
        if self.deltas is not None:
            await self.deltas.aclose()

    def usage(self) -> dict:
        prompt, completion = self.info.get("prompt_tokens", 0), self.info.get("completion_tokens", 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def chunk(self, delta: dict, finish_reason: str | None = None) -> str:
        return self.event({"choices": [{"index": 0, "delta": delta, "logprobs": None,
                                        "finish_reason": finish_reason}]})

    def event(self, fields: dict) -> str:
        return "data: " + json.dumps({"id": self.id, "object": "chat.completion.chunk",
                                      "created": self.created, "model": self.model, **fields},
                                     ensure_ascii=False) + "\n\n"

    async def events(self):
        try:
            yield self.chunk({"role": "assistant", "content": self.first})
            async for delta in self.deltas:
                yield self.chunk({"content": delta})
            yield self.chunk({}, self.info.get("finish_reason", "stop"))
            if self.chat.include_usage:
                yield self.event({"choices": [], "usage": self.usage()})
        except Exception as e:  # noqa: BLE001 - the status is sent already: say it in the stream
            log.exception("generation failed")
            yield "data: " + json.dumps(error_body(f"Generation failed: {type(e).__name__}: {e}",
                                                   "server_error")) + "\n\n"
        yield "data: [DONE]\n\n"
