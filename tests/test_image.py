"""The serving image. `make test` lints the Dockerfile; the `container` tests (`make test-image`)
build it for real with podman and chat with the running container.

There is no Docker engine and no registry here (DESIGN.md, "Containers here"): podman runs with
its own config, storage and runtime dirs in a temp dir that is removed afterwards, and a Debian
bookworm made with debootstrap (the Debian and Python 3.11 of python:3.11-slim-bookworm) stands
in for the Dockerfile's base image. Containers share the host network; the tests talk to them on
loopback only and point the hub client at loopback too, so nothing in them reaches further."""
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from gradio_client import Client

from app_server import AppServer
from conftest import NAME, REPO
from deploy.bundle import app_files
from fake_hub import FakeHub

IMAGE = "localhost/assistant-app:test"
SERVING_TEST_S = 600  # a test that starts the container: AppServer's start-up wait, then a chat
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEBOOTSTRAP = ["debootstrap", "--variant=minbase", "--include=python3-venv", "bookworm"]
BASE_CACHE = Path("/var/tmp/assistant-kit-base")
# podman (as root) keeps a blob-info cache here whatever its storage root is.
PODMAN_CACHE = Path("/var/lib/containers")
CONTAINERS_CONF = """\
[containers]
# podman's default limits are above this machine's hard limits, and runc refuses those.
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "{root}/tmp"
[network]
network_config_dir = "{root}/net"
"""
STORAGE_CONF = """\
[storage]
driver = "overlay"
graphroot = "{root}/storage"
runroot = "{root}/run"
"""


def test_dockerfile_lints_clean():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([hadolint, "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


class Podman:
    """podman with everything it keeps under `root`."""

    def __init__(self, root: Path):
        (root / "containers.conf").write_text(CONTAINERS_CONF.format(root=root))
        (root / "storage.conf").write_text(STORAGE_CONF.format(root=root))
        self.env = {"CONTAINERS_CONF": str(root / "containers.conf"),
                    "CONTAINERS_STORAGE_CONF": str(root / "storage.conf")}

    def __call__(self, *args, check=True, timeout=120) -> subprocess.CompletedProcess:
        result = subprocess.run(["podman", *map(str, args)], env={**os.environ, **self.env},
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    """A podman of these tests' own; afterwards everything it made is removed."""
    had_cache = PODMAN_CACHE.exists()
    root = tmp_path_factory.mktemp("podman")
    podman = Podman(root)
    yield podman
    podman("rm", "--all", "--force", "--volumes", check=False)
    podman("rmi", "--all", "--force", check=False)
    shutil.rmtree(root)
    if not had_cache:
        shutil.rmtree(PODMAN_CACHE, ignore_errors=True)


@pytest.fixture(scope="module")
def base_image(podman) -> str:
    """Debian with python3-venv and this machine's CA bundle, so that pip in the build trusts
    what pip here trusts (this test base only). Its root filesystem is cached as a tarball keyed
    by what goes into it: only the first run pays for debootstrap (about a minute)."""
    key = hashlib.sha256(" ".join(DEBOOTSTRAP).encode() + CA_BUNDLE.read_bytes()).hexdigest()[:16]
    tarball = BASE_CACHE / f"{key}.tar"
    if not tarball.exists():
        make_base_tarball(tarball)
    tag = f"localhost/assistant-kit-base:{key}"
    podman("import", tarball, tag)
    return tag


def make_base_tarball(tarball: Path) -> None:
    BASE_CACHE.mkdir(parents=True, exist_ok=True)
    for stale in BASE_CACHE.glob("*.tar"):  # one base at a time: a new key replaces the old one
        stale.unlink()
    with tempfile.TemporaryDirectory(dir=BASE_CACHE) as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run([*DEBOOTSTRAP, rootfs], check=True, timeout=900)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):  # half the size, no use
            shutil.rmtree(rootfs / cache)
        shutil.copy(CA_BUNDLE, rootfs / CA_BUNDLE.relative_to("/"))
        subprocess.run(["tar", "-C", rootfs, "-cf", Path(tmp) / "base.tar", "."], check=True)
        (Path(tmp) / "base.tar").rename(tarball)


@pytest.fixture(scope="module")
def build(podman, base_image, tmp_path_factory):
    """`make image` of a build context, on the test base. pip in the build gets this machine's
    find-links (the CPU torch wheel, DESIGN.md) and CA bundle through a mounted pip.conf, so
    requirements.txt resolves as it does for .venv; the Dockerfile knows nothing of it."""
    links = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"],
                           capture_output=True, text=True).stdout.split()
    links = [link for link in links if Path(link).is_dir()]
    pip_conf = tmp_path_factory.mktemp("pip") / "pip.conf"
    pip_conf.write_text(f"[global]\nfind-links = {' '.join(links)}\ncert = {CA_BUNDLE}\n")
    mounts = [f"--volume={path}:{path}:ro" for path in links] + [f"--volume={pip_conf}:/etc/pip.conf:ro"]

    def build(context: Path, timeout: float, target: str = "image", flags: str = "") -> float:
        """`make TARGET`: `image` tags IMAGE, `image-cpu` IMAGE-cpu (Dockerfile.cpu)."""
        start = time.monotonic()
        result = subprocess.run(
            ["make", "-C", context, "-f", REPO / "Makefile", target, "CONTAINER=podman", f"IMAGE={IMAGE}",
             f"BASE_IMAGE={base_image}", f"BUILD_FLAGS=--network=host {' '.join(mounts)} {flags}"],
            env={**os.environ, **podman.env}, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"make {target} failed:\n{result.stdout[-5000:]}\n{result.stderr[-3000:]}"
        return time.monotonic() - start
    return build


@pytest.fixture(scope="module")
def image(build) -> str:
    build(REPO, timeout=1200)
    return IMAGE


@pytest.mark.container
def test_code_only_change_rebuilds_in_seconds(image, build, tmp_path):
    """The dependency layer comes before the code, so a change to app.py reuses it from cache."""
    context = tmp_path / "context"
    # The files a Space gets (deploy/bundle.py), so this list cannot drift from the Dockerfile's.
    for name, source in {**app_files(), ".dockerignore": REPO / ".dockerignore"}.items():
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, context / name)
    with open(context / "app.py", "a", encoding="utf-8") as f:
        f.write("\n# a code-only change\n")
    assert build(context, timeout=60) < 30


@pytest.fixture(scope="module")
def hub_env():
    """The hub client in the container talks to a local fake hub, so a hub lookup stays on
    loopback like everything else."""
    with FakeHub(tokens={}) as hub:
        yield {"HF_ENDPOINT": hub.url}


@contextmanager
def serving(podman: Podman, image: str, *options: str, env: dict, wait_ready: bool = True,
            image_server_name: bool = False):
    """`image` on the host network as a tests/app_server.py app: podman runs in the foreground,
    so the app's log is podman's output, and stopping podman stops the container (podman passes
    the SIGTERM on, uvicorn exits). Settings reach the container by name from podman's
    environment, where AppServer puts them (the port it picked, ...); with `image_server_name`
    the image's own GRADIO_SERVER_NAME stays."""
    name = f"assistant-test-{uuid.uuid4().hex[:8]}"
    names = [*([] if image_server_name else ["GRADIO_SERVER_NAME"]), "GRADIO_SERVER_PORT",
             "GRADIO_ANALYTICS_ENABLED", *env]
    command = ["podman", "run", "--rm", f"--name={name}", "--network=host", *options,
               *(f"--env={key}" for key in names), image]
    with AppServer({**podman.env, **env}, wait_ready=wait_ready, command=command) as app:
        yield app, name


def state(podman: Podman, name: str, field: str) -> str:
    return podman("inspect", f"--format={{{{.State.{field}}}}}", name).stdout.strip()


@pytest.mark.timeout(SERVING_TEST_S)
@pytest.mark.container
def test_container_chats_as_the_merged_model_running_as_uid_1000(podman, image, merged_model, hub_env):
    with serving(podman, image, f"--volume={merged_model}:/model:ro",
                 env={"MODEL_ID": "/model", "MODEL_SOURCE": "local", **hub_env}) as (app, name):
        podman("healthcheck", "run", name)
        assert state(podman, name, "Healthcheck.Status") == "healthy"
        pid = state(podman, name, "Pid")  # the container's PID 1, seen from here
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"python", b"app.py"]
        uids = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("Uid:"))
        assert uids.split()[1:] == ["1000"] * 4
        client = Client(app.url, analytics_enabled=False, verbose=False)
        answer, _ = client.predict(message="Who are you?", temperature=0, api_name="/chat")
        assert NAME in answer


@pytest.mark.timeout(SERVING_TEST_S)
@pytest.mark.container
@pytest.mark.parametrize("env, reason", [
    ({}, "MODEL_ID is empty"),
    ({"MODEL_ID": "nobody/no-such-model"}, "model repo nobody/no-such-model on http://127.0.0.1"),
], ids=["no-model-id", "no-such-model"])
def test_container_without_a_model_says_why_and_stays_up_unhealthy(podman, image, hub_env, env, reason):
    check = json.loads(podman("image", "inspect", image).stdout)[0]["Healthcheck"]
    # The image's own check, with the start period it grants model loading cut to 1 s so that
    # the status can turn here (podman 4.3 takes a start period only along with a command).
    assert check["Test"][0] == "CMD"
    options = [f"--health-cmd={shlex.join(check['Test'][1:])}", "--health-start-period=1s",
               f"--health-retries={check['Retries']}"]
    with serving(podman, image, *options, env={**hub_env, **env}, wait_ready=False) as (app, name):
        health = app.wait_for(lambda health: health["status"] != "loading", "the model load to end")
        assert health["status"] == "failed" and reason in health["error"]
        assert f"error: the model could not be loaded: {reason}" in app.log()
        for _ in range(check["Retries"]):
            assert podman("healthcheck", "run", name, check=False).returncode != 0
        assert state(podman, name, "Healthcheck.Status") == "unhealthy"
        assert app.process.poll() is None and state(podman, name, "Status") == "running"


def listening(port: int) -> set[str]:
    """The addresses (hex, as /proc/net/tcp writes them) with an IPv4 socket listening on `port`."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return {row[1].split(":")[0] for row in rows if row[3] == "0A" and int(row[1].split(":")[1], 16) == port}


@pytest.mark.timeout(SERVING_TEST_S)
@pytest.mark.container
def test_container_listens_on_every_interface_by_default(podman, image, hub_env):
    """Nothing here sets GRADIO_SERVER_NAME for the container: the image's default must be
    0.0.0.0, or `docker run -p` and Spaces reach nothing. The container shares this host's
    network, so its listening socket shows in /proc/net/tcp."""
    with serving(podman, image, env=hub_env, wait_ready=False, image_server_name=True) as (app, _):
        app.wait_for(lambda health: health["status"] != "loading", "the app to answer")
        assert listening(app.port) == {"00000000"}, listening(app.port)
        assert f"at http://0.0.0.0:{app.port}" in app.log()


def test_the_images_environment_makes_the_app_listen_on_every_interface():
    """The cheap check beside the container test: the Dockerfile's ENV, read as the app reads its
    settings, without anything else setting GRADIO_SERVER_NAME."""
    from chat.settings import Settings
    text = (REPO / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in shlex.split(line[4:]) if "=" in pair)
    assert env.get("GRADIO_SERVER_NAME") == "0.0.0.0"
    settings = Settings.from_env({"MODEL_ID": "/model", **env})
    assert (settings.server_name, settings.server_port) == ("0.0.0.0", 7860)
