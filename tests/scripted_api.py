"""The real /v1 routes (api.py) and pool (chat/pool.py) on a real uvicorn server on loopback,
answering from a scripted model instead of weights: the test decides each answer's pieces, when
it blocks and where it fails, so the pool's accounting and the protocol's edges (a stop string
split across pieces, an error mid-answer) are checked exactly, in well under a second each.
The real app with real models is tests/app_server.py; this stands only where the model is.

    with ScriptedAPI(concurrency=1, queue_size=3) as server:
        server.model.script["hi"] = ["Hel", "Hello"]          # the growing texts of the answer
        openai.OpenAI(base_url=server.v1, api_key="x").chat.completions.create(...)
"""
import threading
import time
from types import SimpleNamespace

import uvicorn
from fastapi import FastAPI

import api
from app_server import free_port
from chat.pool import Pool
from chat.settings import Settings

WAIT_S = 30
HOLD = "hold"      # an answer that says "held" and then waits for release() (or its stop)
FAIL = "fail"      # an answer whose generation fails before its first piece
TOO_LONG = "long"  # a question the model refuses as bad input (history.fit's ValueError)


class ScriptedModel:
    """The app's ModelHolder contract (status, error, loaded.context, stream) with scripted
    answers. `started` lists the questions in the order their generation began; `running` counts
    generations not yet ended (the generator closed or run out)."""

    status, error = "ready", None

    def __init__(self):
        self.loaded = SimpleNamespace(context=1024)
        self.script: dict[str, list] = {}  # question -> growing texts; an Exception item is raised
        self.finish: dict[str, str] = {}   # question -> the finish_reason the model reports (default stop)
        self.started: list[str] = []
        self.running = 0
        self.unfinished = 0  # generations ended before their last piece (stopped, closed, failed)
        self.released = threading.Event()
        self.lock = threading.Lock()

    def release(self) -> None:
        self.released.set()

    def stream(self, messages, system, sampling, stop_event, *, info=None, **_):
        return self.answer(messages[-1]["content"], stop_event, info if info is not None else {})

    def answer(self, question: str, stop_event: threading.Event, info: dict):
        with self.lock:
            self.started.append(question)
            self.running += 1
        finished = False
        try:
            if question == TOO_LONG:
                raise ValueError("The message is 9999 tokens long; the limit is 100 (MAX_INPUT_TOKENS)")
            if question == FAIL:
                raise RuntimeError("CUDA out of memory")
            pieces = self.script.get(question, ["Hello", "Hello there."])
            if question.startswith(HOLD):
                yield "held"
                while not (self.released.is_set() or stop_event.is_set()):
                    time.sleep(0.01)  # a generation polls its stop event between tokens
                if stop_event.is_set():
                    return
                pieces = ["held, then done."]
            for count, piece in enumerate(pieces, 1):
                if isinstance(piece, Exception):
                    raise piece
                info.update(completion_tokens=count)
                yield piece
            finished = True
        finally:  # like chat.generation.stream_reply: `info` once the generation has ended
            info.update(prompt_tokens=len(question), finish_reason=self.finish.get(question, "stop"))
            with self.lock:
                self.running -= 1
                self.unfinished += not finished


class ScriptedAPI:
    def __init__(self, concurrency: int = 1, queue_size: int = 3, **settings):
        self.settings = Settings(model_id="/models/scripted", concurrency=concurrency,
                                 queue_size=queue_size, **settings)
        self.pool = Pool(concurrency, queue_size)
        self.model = ScriptedModel()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.v1 = self.url + "v1"

    def __enter__(self) -> "ScriptedAPI":
        app = FastAPI()
        api.install(app, self.settings, self.model, self.pool)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="scripted-api", daemon=True)
        self.thread.start()
        self.wait_for(lambda: self.server.started, "the server to listen")
        return self

    def __exit__(self, *exc) -> None:
        self.model.release()
        self.server.should_exit = True
        self.thread.join(WAIT_S)

    def wait_for(self, condition, what: str, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}: pool {self.pool.snapshot()}"
            time.sleep(0.01)

    def idle(self) -> bool:
        """Every slot free, nobody in line, no generation left running."""
        return self.pool.snapshot() == {"running": 0, "waiting": 0} and self.model.running == 0
