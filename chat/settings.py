"""Settings of the app and the terminal chat, read from environment variables (README:
"Chatting and serving" lists them). A bad value stops start-up with a message naming the
variable."""
import os
from dataclasses import dataclass
from pathlib import Path

from chat.engine import CHUNK_TIMEOUT_S, EngineModel, redact_url
from chat.loading import LoadedModel, load_model
from chat.repo_ids import looks_like_hub_id


ENGINE_CONCURRENCY = 64  # default CONCURRENCY with ENGINE_URL


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class Settings:
    model_id: str
    model_source: str = "auto"
    model_revision: str | None = None
    hf_token: str | None = None
    device: str | None = None
    dtype: str | None = None
    system_prompt: str = ""               # training used none: the model answers the same without
    max_input_tokens: int = 4096          # prompt budget; eager attention memory grows with its square
    concurrency: int = 1                  # generations at once (each one more KV cache)
    queue_size: int = 16                  # waiting requests before new ones are refused
    app_auth: tuple[str, str] | None = None
    server_name: str = "127.0.0.1"
    server_port: int = 7860
    api_key: str | None = None            # Bearer key of /v1 (README: "OpenAI-compatible API")
    served_model_name: str | None = None  # the model id /v1 shows; default: model_name
    engine_url: str | None = None         # OpenAI-compatible base URL (…/v1): stream from it, load no weights
    engine_api_key: str | None = None
    engine_model: str | None = None       # the engine's model id (default: the first it serves)
    engine_read_timeout: float = CHUNK_TIMEOUT_S  # seconds an engine answer may wait for its next chunk

    @property
    def model_name(self) -> str:
        """The model's id on /v1: SERVED_MODEL_NAME, else a readable name from MODEL_ID (a hub
        id as it is; a folder or git URL by its last part, a run's `merged` folder by the run's
        name), never a local path, which would tell clients about the server's disk."""
        if self.served_model_name:
            return self.served_model_name
        path = Path(self.model_id.rstrip("/"))
        if looks_like_hub_id(self.model_id) and not path.expanduser().is_dir():
            return self.model_id
        if path.name == "merged" and path.parent.name not in ("", ".", ".."):
            return path.parent.name
        return path.name.removesuffix(".git") or "model"

    @property
    def public_model(self) -> str:
        """What public pages (the heading, /health) may name: never a local path or an engine's
        address."""
        return self.engine_model or self.served_model_name or self.model_name \
            if self.engine_url else self.model_name

    @classmethod
    def from_env(cls, env=os.environ) -> "Settings":
        def text(name: str) -> str | None:
            return env.get(name, "").strip() or None

        for key in ("API_KEY", "APP_AUTH"):  # unset is no key; set and blank is a mistake
            if key in env and not env[key].strip():
                raise SettingsError(f"{key} is set but blank: give it a value, or unset it")

        def number(name: str, default: int, low: int) -> int:
            raw = text(name)
            if raw is None:
                return default
            if not raw.isdigit() or int(raw) < low:
                raise SettingsError(f"{name}={raw!r:.50}: must be a whole number >= {low}")
            return int(raw)

        engine_url = text("ENGINE_URL")
        if engine_url and not (engine_url.startswith(("http://", "https://"))
                               and engine_url.rstrip("/").endswith("/v1")):
            raise SettingsError(f"ENGINE_URL={redact_url(engine_url)!r}: must be an http(s) base URL ending "
                                "in /v1, e.g. http://127.0.0.1:8000/v1")
        auth = text("APP_AUTH")
        if auth is not None and (":" not in auth or auth.startswith(":") or auth.endswith(":")):
            raise SettingsError("APP_AUTH must be user:password")
        return cls(
            model_id=text("MODEL_ID") or "",
            model_source=text("MODEL_SOURCE") or "auto",
            model_revision=text("MODEL_REVISION"),
            hf_token=text("HF_TOKEN"),
            device=text("DEVICE"),
            dtype=text("DTYPE"),
            system_prompt=env.get("SYSTEM_PROMPT", ""),
            max_input_tokens=number("MAX_INPUT_TOKENS", cls.max_input_tokens, 16),
            # On an engine the engine batches: the app lets many answers run at once.
            concurrency=number("CONCURRENCY", ENGINE_CONCURRENCY if engine_url else cls.concurrency, 1),
            queue_size=number("QUEUE_SIZE", cls.queue_size, 1),
            app_auth=tuple(auth.split(":", 1)) if auth else None,
            server_name=text("GRADIO_SERVER_NAME") or cls.server_name,
            server_port=number("GRADIO_SERVER_PORT", cls.server_port, 1),
            api_key=text("API_KEY"),
            served_model_name=text("SERVED_MODEL_NAME"),
            engine_url=engine_url,
            engine_api_key=text("ENGINE_API_KEY"),
            engine_model=text("ENGINE_MODEL"),
            engine_read_timeout=number("ENGINE_READ_TIMEOUT", int(cls.engine_read_timeout), 1))

    def load(self) -> LoadedModel | EngineModel:
        """The model these settings name (with ENGINE_URL: the engine serving it)."""
        if self.engine_url:
            return EngineModel(self.engine_url, self.engine_api_key, self.engine_model,
                               self.engine_read_timeout)
        return load_model(self.model_id, self.model_source, self.model_revision, self.hf_token,
                          self.device, self.dtype)
