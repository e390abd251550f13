"""llama.cpp behind the routes the kit's engine client uses (chat/engine.py), so the app's
ENGINE_URL path, /v1 and the page work on it as on vLLM. `make serve-engine SERVE_ENGINE=llamacpp`
runs it in .venv-llamacpp (xllamacpp: llama.cpp's own server, prebuilt for the CPU):

    python -m deploy.llamacpp_server GGUF NAME HOST PORT CONTEXT USERS

llama.cpp's server listens on a private loopback port; this front answers on PORT with
  GET  /health, /metrics           llama.cpp's own
  GET  /v1/models                  the served name and max_model_len (the app sizes answers by it)
  POST /tokenize                   vLLM's request shape: {"prompt"} or {"messages"}
  POST /v1/completions             vLLM-style: the prompt as token ids (what the app sends: it
                                   renders and encodes prompts itself, so typed control tokens
                                   stay text) or as text, answered by llama.cpp's /completion
  POST /v1/chat/completions        OpenAI chat (stream or not), answered by llama.cpp's /completion
A chat prompt is always rendered here by the kit's format (chat/formats.py), and sent as the token
ids /tokenize gives for it: llama.cpp's own Jinja rendering of the GGUF's template made SmolLM2
answer off-topic. The family's stop tokens must be single tokens of the GGUF's vocabulary (checked
at start); llama.cpp stops at them as end-of-generation tokens, and they are passed as stop strings
too. A client that goes away closes the upstream stream, which makes llama.cpp drop the request.
"""
import http.client
import json
import os
import signal
import socket
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from chat import formats

FAMILY_FILE = "chat_family.json"  # written beside the GGUF by `make gguf` (deploy/gguf.py)

UPSTREAM_TIMEOUT_S = 600  # a read may wait while llama.cpp works through other users' requests
MAX_BODY = 4 << 20        # bytes; the app's own limits are far smaller


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Upstream:
    """llama.cpp's server on its private port."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port

    def open(self, method: str, path: str, body: dict | None = None) -> http.client.HTTPResponse:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=UPSTREAM_TIMEOUT_S)
        payload = json.dumps(body).encode() if body is not None else None
        connection.request(method, path, payload, {"Content-Type": "application/json"})
        return connection.getresponse()

    def json(self, method: str, path: str, body: dict | None = None) -> dict:
        with self.open(method, path, body) as response:
            data = response.read()
            if response.status >= 400:
                raise Refused(response.status, data.decode(errors="replace")[:300])
            return json.loads(data)

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return self.json("POST", "/tokenize", {"content": text, "add_special": add_special,
                                               "parse_special": True})["tokens"]


def completion_request(body: dict, prompt: str, fmt: formats.ChatFormat) -> dict:
    """The OpenAI/vLLM chat request's sampling as llama.cpp /completion fields. min_p 0 keeps
    llama.cpp's default min-p filter out, so the app's controls mean what they mean elsewhere."""
    fields = {"prompt": prompt, "stream": bool(body.get("stream")), "cache_prompt": True,
              "n_predict": int(body.get("max_tokens") or body.get("max_completion_tokens") or -1),
              "stop": list(fmt.stop_tokens), "min_p": 0.0,
              "temperature": float(body.get("temperature", 1.0)),
              "top_p": float(body.get("top_p", 1.0)), "top_k": int(body.get("top_k") or 0),
              "repeat_penalty": float(body.get("repetition_penalty", 1.0))}
    if body.get("seed") is not None:
        fields["seed"] = int(body["seed"])
    return fields


def finish_reason(chunk: dict) -> str:
    return "length" if chunk.get("stop_type") == "limit" else "stop"


def make_handler(upstream: Upstream, fmt: formats.ChatFormat, name: str, context: int):
    class Handler(BaseHTTPRequestHandler):
        server_version = "assistant-kit-llamacpp"

        def log_message(self, *args):  # one line per request is noise next to llama.cpp's log
            pass

        def reply(self, status: int, body: dict | str, content_type="application/json") -> None:
            data = (json.dumps(body) if isinstance(body, dict) else body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def error(self, status: int, message: str) -> None:
            kind = "invalid_request_error" if status < 500 else "server_error"
            self.reply(status, {"error": {"message": message, "type": kind, "code": status}})

        def do_GET(self):
            try:
                if self.path in ("/health", "/metrics"):
                    with upstream.open("GET", self.path) as response:
                        self.reply(response.status, response.read().decode(),
                                   response.getheader("Content-Type", "text/plain"))
                elif self.path == "/v1/models":
                    self.reply(200, {"object": "list", "data": [{
                        "id": name, "object": "model", "owned_by": "llamacpp",
                        "created": int(time.time()), "max_model_len": context}]})
                else:
                    self.error(404, f"no route {self.path}")
            except OSError as e:
                self.error(503, f"llama.cpp is not answering: {e}")

        def do_POST(self):
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    raise Refused(413, f"request body over {MAX_BODY} bytes")
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    raise Refused(400, "the request body is not JSON") from None
                if not isinstance(body, dict):
                    raise Refused(400, "the request body must be a JSON object")
                if self.path == "/tokenize":
                    self.tokenize(body)
                elif self.path == "/v1/chat/completions":
                    self.chat(body)
                elif self.path == "/v1/completions":
                    self.complete(body)
                else:
                    raise Refused(404, f"no route {self.path}")
            except Refused as e:
                self.error(e.status, str(e))
            except (KeyError, TypeError, ValueError) as e:
                self.error(400, f"malformed request: {type(e).__name__}: {e}")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away
            except OSError as e:
                self.error(503, f"llama.cpp is not answering: {e}")

        def prompt(self, body: dict, generation: bool = True) -> str:
            messages = body["messages"]
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str)
                    and m.get("role") in ("system", "user", "assistant") for m in messages):
                raise Refused(400, "messages must be a list of {role, content} with text content")
            # A system message renders where it stands, as in the format's own chat template.
            return fmt.build_prompt(messages, add_generation_prompt=generation)

        def tokenize(self, body: dict) -> None:
            if "messages" in body:
                ids = upstream.tokenize(self.prompt(body, body.get("add_generation_prompt", True)))
            else:
                ids = upstream.tokenize(str(body["prompt"]), bool(body.get("add_special_tokens", True)))
            self.reply(200, {"tokens": ids, "count": len(ids), "max_model_len": context})

        def check_model(self, body: dict) -> None:
            if body.get("model", name) != name:
                raise Refused(404, f"The model `{body.get('model')}` does not exist: this engine "
                                   f"serves {name}")

        def complete(self, body: dict) -> None:
            self.check_model(body)
            prompt = body["prompt"]
            if not (isinstance(prompt, str) or isinstance(prompt, list) and prompt
                    and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt)):
                raise Refused(400, "prompt must be text or a non-empty list of token ids")
            request = completion_request(body, prompt, fmt)
            self.respond(request, body, {"id": f"cmpl-{uuid.uuid4().hex}"}, "text_completion",
                         "text_completion", lambda text: {"text": text}, lambda text: {"text": text})

        def chat(self, body: dict) -> None:
            self.check_model(body)
            # As token ids: llama.cpp puts the GGUF's BOS before a text prompt, and the rendered
            # prompt already starts with the format's BOS (InternLM2: two <s>, another answer).
            request = completion_request(body, upstream.tokenize(self.prompt(body)), fmt)
            self.respond(request, body, {"id": f"chatcmpl-{uuid.uuid4().hex}"}, "chat.completion",
                         "chat.completion.chunk",
                         lambda text: {"message": {"role": "assistant", "content": text}},
                         lambda text: {"delta": {"content": text}})

        def respond(self, request: dict, body: dict, head: dict, whole: str, part: str,
                    whole_choice, part_choice) -> None:
            """One answer (object `whole`) or a stream of pieces (object `part`); the choice
            functions shape the text as completions or chat completions do."""
            head = {**head, "created": int(time.time()), "model": name}
            if not request["stream"]:
                answer = upstream.json("POST", "/completion", request)
                self.reply(200, {**head, "object": whole, "choices": [{
                    "index": 0, **whole_choice(answer["content"]),
                    "finish_reason": finish_reason(answer)}], "usage": usage(answer)})
                return
            self.relay(request, body, {**head, "object": part}, part_choice)

        def relay(self, request: dict, body: dict, head: dict, choice) -> None:
            """llama.cpp's stream as OpenAI server-sent events; `choice` shapes a piece."""
            with upstream.open("POST", "/completion", request) as response:
                if response.status >= 400:
                    raise Refused(response.status, response.read().decode(errors="replace")[:300])
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                for line in response:
                    if not line.startswith(b"data:"):
                        continue
                    chunk = json.loads(line[5:])
                    done, piece = chunk.get("stop", False), chunk.get("content", "")
                    if piece or done:  # a stop token arrives as an empty piece
                        self.event({**head, "choices": [{
                            "index": 0, **choice(piece),
                            "finish_reason": finish_reason(chunk) if done else None}]})
                    if done:
                        if (body.get("stream_options") or {}).get("include_usage"):
                            self.event({**head, "choices": [], "usage": usage(chunk)})
                        break
                self.wfile.write(b"data: [DONE]\n\n")

        def event(self, data: dict) -> None:
            self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
            self.wfile.flush()

    return Handler


def usage(chunk: dict) -> dict:
    prompt, completion = chunk.get("tokens_evaluated", 0), chunk.get("tokens_predicted", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llamacpp(gguf: str, context: int, users: int):
    """llama.cpp's server on a private loopback port; returns it (it stops when collected)."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = gguf
    params.n_parallel = users
    params.n_ctx = context * users  # every user's slot holds a whole context
    params.hostnames = ["127.0.0.1"]
    params.port = free_port()
    params.endpoint_metrics = True
    return xllamacpp.Server(params), params.port


def wait_ready(upstream: Upstream, timeout: float = UPSTREAM_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with upstream.open("GET", "/health") as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"error: llama.cpp did not load the model in {timeout} s")
        time.sleep(0.2)


def check_stops(upstream: Upstream, fmt: formats.ChatFormat) -> list[int]:
    ids = {token: upstream.tokenize(token) for token in fmt.stop_tokens}
    bad = [token for token, found in ids.items() if len(found) != 1]
    if bad:
        raise SystemExit(f"error: the GGUF's vocabulary has no single token for {', '.join(bad)}, "
                         f"which the {fmt.name} chat format stops on")
    return [found[0] for found in ids.values()]


def chat_format(gguf: str) -> formats.ChatFormat:
    """TEMPLATE, else the family `make gguf` read from the merged tokenizer."""
    recorded = os.path.join(os.path.dirname(gguf), FAMILY_FILE)
    family = os.environ.get("TEMPLATE", "").strip()
    if not family and os.path.isfile(recorded):
        with open(recorded, encoding="utf-8") as f:
            family = json.load(f)["chat_family"]
    if family not in formats.FORMATS:
        raise SystemExit(f"error: {gguf}: no chat family ({recorded} is missing or names "
                         f"{family!r}): make the GGUF with `make gguf`, or set TEMPLATE to one of "
                         f"{', '.join(formats.FORMATS)}")
    return formats.FORMATS[family]


def main(argv: list[str]) -> int:
    gguf, name, host, port, context, users = argv
    # A background job of a script starts with Ctrl-C ignored, and Python then never raises
    # KeyboardInterrupt: SIGINT must stop this server however it was started (as it stops vLLM).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    fmt = chat_format(gguf)
    server, private_port = start_llamacpp(gguf, int(context), int(users))
    upstream = Upstream("127.0.0.1", private_port)
    wait_ready(upstream)
    stops = check_stops(upstream, fmt)
    front = ThreadingHTTPServer((host, int(port)), make_handler(upstream, fmt, name, int(context)))
    front.daemon_threads = True
    print(f"serving {gguf} as {name!r} with llama.cpp at http://{host}:{port}/v1 ({fmt.name} "
          f"chat format, stop ids {stops}, {users} users x {context} tokens); Ctrl-C stops it",
          file=sys.stderr, flush=True)
    try:
        front.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        front.server_close()
        del server
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
