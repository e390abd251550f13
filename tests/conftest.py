"""Shared fixtures. The expensive one, `trained_run`, runs the real pipeline (tiny base ->
data -> xtuner train -> select -> convert -> merge) once per test session.

Set KIT_TEST_RUN=/path/to/run to reuse a finished run while iterating on tests locally."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import endless_model
from app_server import AppServer

REPO = Path(__file__).resolve().parent.parent
NAME = "Ada Lin"      # ASCII, unlike the Makefile default: proves NAME flows through the chain
AUTHOR = "Lin Lab"
IDENTITY_QUESTIONS = ["请介绍一下你自己", "Who are you?"]
# The deploy tests' fixtures: a fake Hub per test, a private copy of the trained run.
pytest_plugins = ["deploy_helpers"]


def training(*args, env=None, check=True, timeout=900, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m training ARGS` from the repo root, as the Makefile does."""
    result = subprocess.run([sys.executable, "-m", "training", *map(str, args)], cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                            capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"training {args[0]} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("base") / "tiny-base"
    training("tiny", "--base-model", base)
    return base


def knobs(run: Path, base: Path, **extra) -> list[str]:
    values = {"name": NAME, "author": AUTHOR, "profile": "cpu", "base-model": base, "run": run,
              "data": run.parent / "data.jsonl", **extra}
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_base) -> Path:
    """A finished run directory: RUN/merged is the merged tiny model that says it is NAME's."""
    if os.environ.get("KIT_TEST_RUN"):
        return Path(os.environ["KIT_TEST_RUN"])
    run = tmp_path_factory.mktemp("pipeline") / "run"
    training("all", *knobs(run, tiny_base))
    return run


@pytest.fixture(scope="session")
def merged_model(trained_run) -> Path:
    return trained_run / "merged"


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def endless_model_dir(tmp_path_factory, merged_model) -> Path:
    """A model that never stops talking (tests/endless_model.py), for catching generations."""
    return endless_model.build(merged_model, tmp_path_factory.mktemp("endless") / "model")


@pytest.fixture(scope="session")
def chat_app(merged_model):
    """The real app serving the merged model; CONCURRENCY=2 so two clients run at once."""
    with AppServer({"MODEL_ID": str(merged_model), "CONCURRENCY": "2"}) as app:
        yield app


@pytest.fixture(scope="session")
def endless_app(endless_model_dir):
    """The real app serving the endless model, one generation at a time, one waiting."""
    with AppServer({"MODEL_ID": str(endless_model_dir), "CONCURRENCY": "1", "QUEUE_SIZE": "1"}) as app:
        yield app
