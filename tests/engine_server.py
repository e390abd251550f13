"""Run `make serve-engine` for a test or a benchmark, as a user does: in the foreground of its own
process group, stopped like Ctrl-C (SIGINT to the group), SIGKILL after a deadline.

    with EngineServer(merged_model) as engine:
        AppServer({"ENGINE_URL": engine.v1}) ...
"""
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from app_server import REPO, free_port

START_TIMEOUT_S = 600  # measured 40 s on a quiet machine, over 2 min with others training beside it
STOP_TIMEOUT_S = 30


class EngineServer:
    def __init__(self, model: Path, port: int | None = None, env: dict | None = None):
        self.model = Path(model)
        self.port = port or free_port()
        self.v1 = f"http://127.0.0.1:{self.port}/v1"
        self.root = f"http://127.0.0.1:{self.port}"
        self.env = env or {}
        self.process = None
        self.start_s = None  # seconds from launch to /health answering

    def __enter__(self) -> "EngineServer":
        self.log_path = Path(tempfile.mkstemp(prefix="engine-", suffix=".log")[1])
        env = {**os.environ, "MODEL_ID": str(self.model), "ENGINE_PORT": str(self.port),
               "SERVE_ENGINE": "vllm", **self.env}
        started = time.monotonic()
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(["make", "--no-print-directory", "serve-engine"],
                                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        try:
            self.wait_healthy(START_TIMEOUT_S)
        except BaseException:
            self.__exit__()
            raise
        self.start_s = time.monotonic() - started
        return self

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.process.poll() is not None:
                raise AssertionError(self.failure(f"the engine exited ({self.process.returncode})"))
            if time.monotonic() > deadline:
                raise AssertionError(self.failure(f"the engine did not answer /health in {timeout} s"))
            time.sleep(0.5)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.root}/health", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self, sig: int = signal.SIGINT) -> float:
        """Signal the whole process group (make, the engine, its workers); seconds until all
        of it is gone. SIGKILL when it outlives STOP_TIMEOUT_S."""
        started = time.monotonic()
        if self.process is None:
            return 0.0
        try:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=STOP_TIMEOUT_S)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while group_alive(self.process.pid) and time.monotonic() < deadline:
                time.sleep(0.2)  # the engine's worker processes end after make does
        except subprocess.TimeoutExpired:
            pass
        if group_alive(self.process.pid):
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise AssertionError(self.failure(f"the engine ignored signal {sig} for "
                                              f"{STOP_TIMEOUT_S} s"))
        return time.monotonic() - started

    def __exit__(self, *exc) -> None:
        if self.process and (self.process.poll() is None or group_alive(self.process.pid)):
            self.stop()

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"{self.root}/{path}", timeout=30) as response:
            return response.read().decode()

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(f"{self.root}/{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)

    def running_requests(self) -> float:
        """vLLM's own count of requests it is generating for (GET /metrics)."""
        for line in self.get("metrics").splitlines():
            if line.startswith("vllm:num_requests_running"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError("no vllm:num_requests_running in /metrics")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def failure(self, message: str) -> str:
        return f"{message}; engine log:\n{self.log()[-4000:]}"


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
