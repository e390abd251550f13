"""The chat page: a thin Gradio UI over chat/, configured by environment variables (README:
"Chatting and serving"). The page and GET /health answer at once; the model loads in the
background and /health says 503 until it is ready (or why it failed), so it fits a container
HEALTHCHECK.

    MODEL_ID=runs/assistant/merged python app.py
"""
import html
import ipaddress
import os
import sys
import threading
import time
import traceback
from contextlib import asynccontextmanager, closing, contextmanager

import anyio
import gradio as gr
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

import api
from chat import history
from chat.engine import EngineError, EngineModel, redact_url
from chat.generation import RANGES, STATS, Sampling, stream_reply
from chat.loading import ModelLoadError
from chat.pool import Pool, PoolFull
from chat.settings import Settings, SettingsError
from guards import BodyLimit, GuardAuth, Keys, Lockout, body_limit

DEFAULTS = Sampling()
MAX_NEW_TOKENS_SLIDER = 4096
EXAMPLES = ["请介绍一下你自己", "Who are you?", "你能帮我做什么？"]
# The system box's initial value when SYSTEM_PROMPT is set: a component's initial value is in every
# page (the login page included) and in the API's defaults, so the prompt itself reaches a browser
# only once the page has loaded (after the login, where there is one); this marker stands for it.
SYSTEM_PROMPT_MARKER = "(the server's SYSTEM_PROMPT)"
WAITING_NOTICE_S = 1.0  # while in line for a slot, the page's notice is refreshed this often
ENGINE_CHECK_S = 2.0    # /health asks the engine at most this often, however often it is called


class ModelHolder:
    """The model, loaded in a background thread; `status` is loading | ready | failed."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.loaded = None
        self.error = None
        self.checked = (0.0, None)  # (when, problem) of the last engine check
        self.check_lock = threading.Lock()

    def load(self) -> None:
        try:
            self.loaded = self.settings.load()
            print(f"model ready: {self.settings.model_id} on {self.loaded.device} "
                  f"({self.loaded.dtype})", file=sys.stderr)
        except ModelLoadError as e:
            self.error = str(e)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: report it, keep serving /health
            traceback.print_exc()
            self.error = f"{type(e).__name__}: {e}"
        if self.error:
            print(f"error: the model could not be loaded: {self.error}", file=sys.stderr)

    @property
    def status(self) -> str:
        return "ready" if self.loaded else "failed" if self.error else "loading"

    def status_text(self) -> str:
        if self.error:
            return f"**The model could not be loaded:** {self.public(self.error)}"
        return "" if self.loaded else "*Loading the model...*"

    def public(self, text: str) -> str:
        """`text` for public eyes (/health, the page): local model paths and the engine's
        credentials replaced; the full text goes to the log only."""
        model_id = self.settings.model_id
        if model_id and os.path.exists(os.path.expanduser(model_id)):
            for path in sorted({os.path.abspath(os.path.expanduser(model_id)), model_id}, key=len,
                               reverse=True):
                text = text.replace(path, f"<{self.settings.public_model}>")
        if self.settings.engine_url:
            text = text.replace(self.settings.engine_url, redact_url(self.settings.engine_url))
        return text

    def engine_problem(self) -> str | None:
        """With ENGINE_URL: why the engine cannot answer now, asked at most every
        ENGINE_CHECK_S (however often /health is called), so the app recovers by itself once
        the engine is back."""
        if not isinstance(self.loaded, EngineModel):
            return None
        with self.check_lock:
            when, problem = self.checked
            if time.monotonic() - when > ENGINE_CHECK_S:
                self.checked = (time.monotonic(), self.loaded.check())
            return self.checked[1]

    def stream(self, *args, **kwargs):
        """The loaded model's answer stream (chat.generation.stream_reply's contract), for the
        page and /v1 alike."""
        return stream_reply(self.loaded, *args, **kwargs)

    def require(self):
        if self.loaded:
            return self.loaded
        if self.error:
            raise gr.Error(f"The model could not be loaded: {self.error}")
        raise gr.Error("The model is still loading; try again in a moment (GET /health says "
                       "when it is ready).")


class TabAnswers:
    """The answers in flight of each browser session. Closing the tab ends the session (Gradio's
    unload, on the page's heartbeat), which stops its answers and frees their slots: a backstop
    to Gradio closing the answer's generator, which can miss a tab closed after a Stop."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_session: dict[str, list] = {}

    @contextmanager
    def track(self, session: str, ticket):
        """The stop event of one answer that holds (or waits for) `ticket`."""
        answer = (threading.Event(), ticket)
        with self.lock:
            self.by_session.setdefault(session, []).append(answer)
        try:
            yield answer[0]
        finally:
            with self.lock:
                answers = self.by_session[session]
                answers.remove(answer)
                if not answers:
                    del self.by_session[session]

    def end(self, session: str) -> None:
        with self.lock:
            answers = list(self.by_session.get(session, ()))
        for stop, ticket in answers:
            stop.set()  # the generating thread ends within a token
            ticket.leave()


def text_of(content) -> str:
    """Gradio 6 gives message content as a string (API) or a list of blocks (browser)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(text_of(block) for block in content)
    if isinstance(content, dict):
        return text_of(content.get("text", ""))
    return ""  # files and other components carry no text for this model


def to_messages(history: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": text_of(m["content"])} for m in history
            if m.get("role") in ("user", "assistant")]


def served(settings: Settings) -> str:
    """What the start-up line names: the engine (without credentials) when answers come from one."""
    return f"{redact_url(settings.engine_url)} (serving engine)" if settings.engine_url else settings.model_id


def loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def build_demo(settings: Settings, holder: ModelHolder, pool: Pool) -> gr.Blocks:
    tabs = TabAnswers()

    def respond(message, chat_history, system, max_new_tokens, temperature, top_p, top_k,
                repetition_penalty, request: gr.Request):
        """Stream the answer to `message`, with a notice (history trimmed, ...), once a slot of
        the pool is free. Stop and a closed tab make Gradio close this generator, which ends the
        generating thread (or gives up the place in line); a closed tab also ends it (TabAnswers)."""
        holder.require()
        notices = []
        system = settings.system_prompt if system == SYSTEM_PROMPT_MARKER else system
        try:
            sampling = Sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
            messages = to_messages(chat_history) + [{"role": "user", "content": text_of(message)}]
            # Sizes before a slot: a huge message is refused here, untokenized (chat/history.py).
            history.check_sizes(messages[-1]["content"], system, settings.max_input_tokens)
            ticket = pool.join()
        except (ValueError, PoolFull) as e:
            raise gr.Error(str(e)) from None
        try:
            with tabs.track(request.session_hash, ticket) as tab_closed:
                while not ticket.wait(0):
                    if tab_closed.is_set():
                        return
                    yield "", f"Waiting for a free slot: number {ticket.place()} in line."
                    ticket.wait(WAITING_NOTICE_S)
                # closing(): the generation has ended before the slot is given back.
                with closing(holder.stream(messages, system, sampling, tab_closed,
                                           notify=notices.append,
                                           max_input_tokens=settings.max_input_tokens)) as texts:
                    for text in texts:
                        yield text, "\n\n".join(notices)
        except (ValueError, EngineError) as e:  # EngineError: e.g. the engine is down
            raise gr.Error(str(e)) from None
        finally:
            ticket.leave()

    def refresh_status():
        return heading(), holder.status_text(), gr.Timer(active=holder.status == "loading")

    def heading() -> str:
        # The name is the user's text: escaped, so quotes, <tags> and `code` show as typed.
        name = holder.loaded.assistant.get("name") if holder.loaded else None
        title = f"{name}'s assistant" if name else "Personal assistant"
        return f"<h1>{html.escape(title)}</h1><p>Model: <code>{html.escape(settings.public_model)}</code></p>"

    def slider(name: str, label: str, step: float, maximum: float | None = None) -> gr.Slider:
        low, high = RANGES[name]
        return gr.Slider(low, maximum or high, value=getattr(DEFAULTS, name), step=step,
                         label=label, render=False)

    with gr.Blocks(title="Personal assistant", analytics_enabled=False) as demo:
        title = gr.HTML(heading(), elem_id="title")
        status = gr.Markdown()
        timer = gr.Timer(2)  # refreshes the status line until the model is ready (or failed)
        for event in (demo.load, timer.tick):
            event(refresh_status, outputs=[title, status, timer], queue=False, api_visibility="private")
        notice = gr.Markdown(label="notice", elem_id="notice", render=False)
        system_box = gr.Textbox(SYSTEM_PROMPT_MARKER if settings.system_prompt else "",
                                label="System prompt", lines=2, render=False)
        demo.load(lambda: settings.system_prompt, outputs=[system_box], queue=False,
                  api_visibility="private")
        gr.ChatInterface(
            respond,
            additional_inputs=[
                system_box,
                slider("max_new_tokens", "Max new tokens", 1, MAX_NEW_TOKENS_SLIDER),
                slider("temperature", "Temperature (0 = greedy)", 0.01),
                slider("top_p", "Top p", 0.01),
                slider("top_k", "Top k (0 = off)", 1),
                slider("repetition_penalty", "Repetition penalty", 0.005),
            ],
            additional_inputs_accordion=gr.Accordion("Settings", open=False, render=False),
            additional_outputs=[notice],
            examples=[[question] for question in EXAMPLES],
            api_name="chat",
            api_description="Send a message, get the streamed answer and a notice (empty unless "
                            "the history was trimmed or max_new_tokens lowered). The history "
                            "is kept per session.",
            save_history=True,  # past conversations stay in the browser, across reloads
            analytics_enabled=False,
        )
        notice.render()

        def end_tab_answers(request: gr.Request):
            tabs.end(request.session_hash)
        demo.unload(end_tab_answers)
    # No limits of Gradio's own: the page and /v1 wait in one line for the same slots (the pool).
    return demo.queue(default_concurrency_limit=None, max_size=None)


def build_app(settings: Settings, holder: ModelHolder) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        # Each answer in flight (the page's, /v1's) and each page request in line holds a thread
        # of anyio's default pool (40), which /health shares: room for all of them.
        threads = anyio.to_thread.current_default_thread_limiter()
        threads.total_tokens = max(threads.total_tokens,
                                   2 * settings.concurrency + settings.queue_size + 8)
        yield

    app = FastAPI(lifespan=lifespan)
    pool = Pool(settings.concurrency, settings.queue_size)
    # The last added runs first: a locked-out client or an oversized body never reaches a route.
    app.add_middleware(BodyLimit, limit=body_limit(history.char_limit(settings.max_input_tokens)))
    app.add_middleware(GuardAuth, lockout=Lockout())

    @app.get("/health")
    def health():
        """200 once the model is ready, 503 while loading or after a failed load; the counters
        show generations in flight and tokens generated."""
        body = {"status": holder.status, "model": settings.public_model, **STATS.snapshot(),
                **pool.snapshot()}
        if holder.error:
            body["error"] = holder.public(holder.error)
        problem = holder.engine_problem()
        if problem:
            body.update(status="engine unavailable", error=holder.public(problem))
        return JSONResponse(body, status_code=200 if holder.loaded and not problem else 503)

    api.install(app, settings, holder, pool)  # before the page: "/" would take /v1 too
    keys = Keys(settings.api_key, settings.app_auth)  # one rule for both doors (guards.py)
    return gr.mount_gradio_app(app, build_demo(settings, holder, pool), path="/",
                               auth=keys.login_ok if keys.required else None, show_error=True)


def main() -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    holder = ModelHolder(settings)
    threading.Thread(target=holder.load, name="load-model", daemon=True).start()
    app = build_app(settings, holder)
    print(f"serving {served(settings) or '(no MODEL_ID set)'} at http://{settings.server_name}:{settings.server_port}",
          file=sys.stderr)
    if not Keys(settings.api_key, settings.app_auth).required and not loopback(settings.server_name):
        print(f"warning: listening on {settings.server_name} with neither API_KEY nor APP_AUTH: "
              "anyone who reaches this port can use the page and /v1 (docs/security.md)",
              file=sys.stderr)
    # Open streams (browser tabs, API clients) must not hold up a stop (docker stop, Ctrl-C).
    uvicorn.run(app, host=settings.server_name, port=settings.server_port, log_level="warning",
                timeout_graceful_shutdown=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
