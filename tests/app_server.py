"""Run the real app (`python app.py`) for a test: on a free loopback port, with its own temp
dir (removed afterwards), stopped by PID. Reusable by deploy and container tests.

    with AppServer({"MODEL_ID": str(merged_model)}) as app:
        client = gradio_client.Client(app.url)
        app.wait_for(lambda health: health["generating"] == 0, "generation to end")
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 300  # importing gradio + torch on a busy 2-core machine takes a while


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    def __init__(self, env: dict, wait_ready: bool = True, command: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.env = env
        self.wait_ready = wait_ready
        self.command = command or [sys.executable, "app.py"]
        self.process = None
        self.last_log = ""

    def __enter__(self) -> "AppServer":
        self.tmp = Path(tempfile.mkdtemp(prefix="app-server-"))
        self.log_path = self.tmp / "app.log"
        env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(self.port),
               "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(self.tmp / "gradio"),
               "XDG_CACHE_HOME": str(self.tmp / "cache"), "HF_HUB_OFFLINE": "1", **self.env}
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(self.command, cwd=REPO, env=env, stdout=log,
                                            stderr=subprocess.STDOUT)
        try:
            self.wait_for(lambda health: True, "the server to answer /health")
            if self.wait_ready:
                self.wait_for(lambda health: health["status"] != "loading", "the model to load")
                assert self.health()[1]["status"] == "ready", self.failure("model not ready")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.last_log = self.log()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def health(self) -> tuple[int, dict]:
        """(HTTP status, body) of GET /health."""
        try:
            with urllib.request.urlopen(self.url + "health", timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def wait_for(self, predicate, what: str, timeout: float = START_TIMEOUT_S) -> dict:
        """Poll /health until predicate(body) holds; fail with the app's log if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(self.failure(f"app exited ({self.process.returncode}) "
                                                  f"while waiting for {what}"))
            try:
                body = self.health()[1]
                if predicate(body):
                    return body
            except (urllib.error.URLError, ConnectionError):
                pass  # not listening yet
            time.sleep(0.1)
        raise AssertionError(self.failure(f"timed out waiting for {what}"))

    def log(self) -> str:
        """The app's output so far (after the exit: all of it)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else self.last_log

    def failure(self, message: str) -> str:
        return f"{message}; app log:\n{self.log()[-4000:]}"
