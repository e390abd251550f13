"""Shared by the deploy tests: a fake Hub per test, a private copy of the trained run, and
`python -m deploy` / `make push|deploy` run as the user runs them, with only the endpoints
pointed at 127.0.0.1."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from fake_hub import FakeHub

USER, TOKEN = "alice", "hf_kitTestToken0123456789secret"   # TOKEN must never appear in logs or files
OTHER_USER, OTHER_TOKEN = "bob", "hf_bobToken9876543210secret"
ISOLATED = ("HF_", "HUGGING_FACE_", "OPENXLAB_", "SPACE_HF_TOKEN")


@pytest.fixture
def hub():
    with FakeHub({TOKEN: USER, OTHER_TOKEN: OTHER_USER}) as server:
        yield server


@pytest.fixture
def run_dir(trained_run, tmp_path) -> Path:
    """A copy of the trained run (what push reads; OpenXLab pushes also write RUN/openxlab)."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("run.json", "scores.json", "adapter/checkpoint.txt"):
        if (trained_run / name).is_file():
            (run / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(trained_run / name, run / name)
    shutil.copytree(trained_run / "merged", run / "merged")
    return run


def hub_env(hub: FakeHub, tmp_path: Path, token: str | None = TOKEN, **extra) -> dict:
    """The user's environment minus any real hub settings or tokens, pointed at the fake hub.
    HF_HOME is private to the test, so no login cache of the machine is used."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ISOLATED)}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), **extra)
    if token:
        env["HF_TOKEN"] = token
    return env


def deploy(*args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def make(*args, env: dict) -> subprocess.CompletedProcess:
    """`make ARGS` without re-checking the venv (the suite already runs inside it)."""
    return subprocess.run(["make", "--no-print-directory", "-o", ".venv/.train-installed", *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def repo_files(hub: FakeHub, repo_id: str, kind: str = "model", revision: str = "main") -> dict[str, bytes]:
    sha, files = hub.repo(repo_id, kind).files(revision)
    return {path: file.content for path, file in files.items()}


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
