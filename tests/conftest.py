"""Shared fixtures. The expensive one, `trained_run`, runs the real pipeline (tiny base ->
data -> xtuner train -> select -> convert -> merge) once, and hands it to later sessions only
while everything it was built from is byte for byte the same (see `pipeline_inputs`): `make
test-image` serves the run `make test` trained instead of training again. `--cache-clear`
forces a new one. The pytest header says which run the session uses.

Set KIT_TEST_RUN=/path/to/run to reuse a finished run while iterating on tests locally; it is
refused under CI, where the pipeline must run."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import endless_model
from training import tiny
from app_server import AppServer

REPO = Path(__file__).resolve().parent.parent
NAME = "Ada Lin"      # ASCII, unlike the Makefile default: proves NAME flows through the chain
AUTHOR = "Lin Lab"
IDENTITY_QUESTIONS = ["请介绍一下你自己", "Who are you?"]
# The deploy tests' fixtures: a fake Hub per test, a private copy of the trained run.
pytest_plugins = ["deploy_helpers", "pytester"]  # pytester: the timeout self-test
HANDOVER_KEY = "assistant-kit/trained-run"   # in pytest's cache (.pytest_cache): {"run", "inputs"}
TRAINING_TIMEOUT_S = 1500                      # the pipeline on a busy 2-core machine: ~2-8 min


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def pipeline_inputs() -> str:
    """Digest of everything the trained run is made from: the code and recipe of training/ and
    chat/, the Makefile (`make train` runs it), the pins, and this file (NAME, AUTHOR, the knobs)."""
    digest = hashlib.sha256()
    files = [p for folder in ("training", "chat") for p in (REPO / folder).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    files += [Path(__file__), REPO / "Makefile", *REPO.glob("requirements*.txt")]
    for path in sorted(files):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def pytest_configure(config):
    """Decide once which trained run this session uses, so the header can say it."""
    reuse = os.environ.get("KIT_TEST_RUN")
    if reuse and under_ci():
        raise pytest.UsageError("KIT_TEST_RUN is set under CI: CI must run the pipeline itself. "
                                "Unset KIT_TEST_RUN (it is for iterating on tests locally).")
    if reuse and not (Path(reuse) / "merged" / "config.json").is_file():
        raise pytest.UsageError(f"KIT_TEST_RUN={reuse}: not a finished run (no merged/config.json)")
    cache = getattr(config, "cache", None)  # None under `-p no:cacheprovider`
    handed = cache.get(HANDOVER_KEY, None) if cache else None
    if not reuse and handed and handed.get("inputs") == pipeline_inputs() \
            and (Path(handed["run"]) / "merged" / "config.json").is_file():
        config.kit_run, config.kit_run_origin = Path(handed["run"]), "trained by an earlier session from identical sources"
    elif reuse:
        config.kit_run, config.kit_run_origin = Path(reuse), "KIT_TEST_RUN: the pipeline is NOT run"
    else:
        config.kit_run, config.kit_run_origin = None, None


def pytest_report_header(config):
    if config.kit_run is None:
        return "trained run: this session runs the pipeline (tiny base -> data -> train -> select -> convert -> merge)"
    return f"trained run: {config.kit_run} ({config.kit_run_origin})"


def training(*args, env=None, check=True, timeout=TRAINING_TIMEOUT_S, **kwargs) -> subprocess.CompletedProcess:
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
    # The tiny random base knows nothing and says nothing sensible: identity data only, and
    # selection targets it can meet (measured: identity 0.18 at iteration 200, 0.58 at 500, 0.68
    # at the end on one CPU; 0.50 at 400, 0.60 at 500, 0.68 at 700 on another, where iteration 400
    # still garbled "Who are you?" and 500 on did not: 0.6 keeps selection off the undertrained
    # checkpoints; tests/test_quality.py holds the real model to the defaults).
    values = {"name": NAME, "author": AUTHOR, "profile": "cpu", "base-model": base, "run": run,
              "data": run.parent / "data.jsonl", "replay": 0, "identity-target": 0.6,
              "retention-target": 0, "leakage-max": 1, "scales": 1, **tiny.TRAINING, **extra}
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


@pytest.fixture(scope="session")
def trained_run(request, tmp_path_factory) -> Path:
    """A finished run directory: RUN/merged is the merged tiny model that says it is NAME's."""
    config = request.config
    if config.kit_run is not None:
        return config.kit_run
    inputs = pipeline_inputs()
    run = tmp_path_factory.mktemp("pipeline") / "run"
    # The README's own command, knobs on make's command line as a user types them.
    flags = knobs(run, request.getfixturevalue("tiny_base"))
    assignments = [f"{flag[2:].upper().replace('-', '_')}={value}" for flag, value in zip(flags[::2], flags[1::2])]
    result = subprocess.run(["make", "--no-print-directory", "train", *assignments], cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                            timeout=TRAINING_TIMEOUT_S)
    assert result.returncode == 0, f"make train failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    if getattr(config, "cache", None):
        config.cache.set(HANDOVER_KEY, {"run": str(run), "inputs": inputs})
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
