"""A local server that speaks the part of vLLM's protocol the app uses (GET /v1/models, POST
/tokenize, streamed POST /v1/completions) with a real tokenizer, for what a real engine will not
do on demand: stall after one chunk, send only keep-alives, cut its stream short, send garbage.
The prompt picks the behaviour: a prompt whose text contains MODE:<name> gets that mode.

    with FakeEngine(tokenizer_dir) as engine:
        AppServer({"ENGINE_URL": engine.v1}) ...; engine.prompts[-1]  # the ids the app sent
"""
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from transformers import AutoTokenizer

from chat.formats import detect

KEEPALIVE_S = 0.1


class FakeEngine:
    def __init__(self, tokenizer_dir, context: int = 1024):
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.format = detect(self.tokenizer)
        self.context = context
        self.prompts: list[list[int]] = []   # token ids of each /v1/completions request
        self.model_calls = 0                 # GET /v1/models
        self.release = threading.Event()     # set at exit: stalled answers end

    def __enter__(self) -> "FakeEngine":
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                engine.model_calls += 1
                self.reply({"data": [{"id": "fake", "max_model_len": engine.context}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/tokenize":  # as vLLM: special tokens in text are read as such
                    if "messages" in body:
                        ids = engine.tokenizer.apply_chat_template(
                            body["messages"], chat_template=engine.format.chat_template,
                            add_generation_prompt=body.get("add_generation_prompt", True))
                    else:
                        ids = engine.tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]
                    return self.reply({"tokens": ids, "count": len(ids), "max_model_len": engine.context})
                engine.prompts.append(body["prompt"])
                self.stream(engine.tokenizer.decode(body["prompt"]))

            def event(self, text: str) -> None:
                self.wfile.write(f"{len(text):x}\r\n{text}\r\n".encode())
                self.wfile.flush()

            def chunk(self, text: str) -> None:
                self.event("data: " + json.dumps({"choices": [{"index": 0, "text": text,
                                                               "finish_reason": None}]}) + "\n\n")

            def stream(self, prompt: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                mode = (re.search(r"MODE:(\w+)", prompt) or [None, "answer"])[1]
                try:
                    self.chunk("Hello")
                    if mode in ("stall", "keepalive"):
                        while not engine.release.wait(KEEPALIVE_S):
                            if mode == "keepalive":
                                self.event(": keep-alive\n\n")
                        return
                    if mode == "malformed":
                        self.event("data: {not json\n\n")
                    elif mode != "truncated":
                        self.chunk(" there.")
                        self.event("data: " + json.dumps({"choices": [{"index": 0, "text": "",
                                                                       "finish_reason": "stop"}]}) + "\n\n")
                        self.event("data: [DONE]\n\n")
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass  # the app shut the connection

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.v1 = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

