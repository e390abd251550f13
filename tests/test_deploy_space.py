"""`make deploy HUB=hf`: a Docker Space on the fake Hub, asserted on what the server received."""
import json
import subprocess
import sys

import yaml

from conftest import REPO
from deploy.bundle import app_files
from deploy_helpers import OTHER_TOKEN, TOKEN, USER, deploy, hub_env, make, repo_files

MODEL, SPACE = f"{USER}/ada-assistant", f"{USER}/ada-chat"
READ_TOKEN = "hf_readOnlyForTheSpace0123456789"


def space_files(hub) -> dict[str, bytes]:
    return repo_files(hub, SPACE, "space")


def assert_the_image_builds_from(files: dict[str, bytes]) -> None:
    """Every file the Space's Dockerfile COPYs is in the Space, and the module its CMD runs is copied."""
    lines = files["Dockerfile"].decode().splitlines()
    sources = [word for line in lines if line.startswith("COPY") for word in line.split()[1:-1]
               if not word.startswith("--")]
    copied = {source: {path for path in files if path == source or source.endswith("/") and path.startswith(source)}
              for source in sources}
    assert sources and all(copied.values()), copied
    command = json.loads(next(line for line in lines if line.startswith("CMD"))[len("CMD"):])
    started = command[2].replace(".", "/") + ".py" if command[1] == "-m" else command[1]
    assert started in set().union(*copied.values()), command


def make_gguf(run, quant="q8_0") -> bytes:
    """Stands in for `make gguf` (its own tests convert real models): what deploy uploads."""
    gguf = b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 64
    (run / "gguf").mkdir(exist_ok=True)
    (run / "gguf" / f"model-{quant}.gguf").write_bytes(gguf)
    (run / "gguf" / "chat_family.json").write_text('{"chat_family": "internlm2"}\n')
    return gguf


def find_gguf(env: dict) -> subprocess.CompletedProcess:
    """The CPU image's start module, up to the point where it has the GGUF."""
    return subprocess.run([sys.executable, "-c", "from deploy.start_cpu import find_gguf; print(find_gguf())"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_deploy_pushes_the_model_then_a_space_for_a_private_model(hub, run_dir, tmp_path):
    result = make("deploy", "HUB=hf", f"REPO={MODEL}", f"SPACE={SPACE}", f"RUN={run_dir}", "PRIVATE=1",
                  "HARDWARE=t4-small", "REVISION=v1", env=hub_env(hub, tmp_path, SPACE_HF_TOKEN=READ_TOKEN))
    assert result.returncode == 0, result.stderr
    assert "config.json" in repo_files(hub, MODEL, revision="v1")     # pushed first, to the branch
    assert hub.repo(MODEL).private

    bundle = app_files()
    files = space_files(hub)
    assert set(files) == set(bundle) | {"README.md", ".gitattributes"}  # exactly the bundle
    assert {"app.py", "api.py", "Dockerfile", "requirements.txt", "chat/formats.py"} <= set(files)
    assert all(files[path] == source.read_bytes() for path, source in bundle.items())
    assert files["Dockerfile"] == (REPO / "Dockerfile").read_bytes()  # GPU hardware: the CUDA image
    assert_the_image_builds_from(files)
    front = yaml.safe_load(files["README.md"].decode().split("---")[1])
    assert front["sdk"] == "docker" and front["app_port"] == 7860 and front["models"] == [MODEL]
    assert front["suggested_hardware"] == "t4-small" and front["title"] and front["emoji"]

    space = hub.repo(SPACE, "space")
    assert space.sdk == "docker"
    assert {k: v["value"] for k, v in space.variables.items()} == {"MODEL_ID": MODEL, "MODEL_REVISION": "v1"}
    assert {k: v["value"] for k, v in space.secrets.items()} == {"HF_TOKEN": READ_TOKEN}
    assert space.hardware == "t4-small"
    assert f"{hub.url}/spaces/{SPACE}" in result.stdout

    # Tokens went to the secrets endpoint and auth headers only: not into logs or files.
    received = [r for r in hub.requests if not r.path.endswith("/secrets")]
    for secret in (TOKEN, READ_TOKEN):
        assert secret not in result.stdout + result.stderr
        assert all(secret.encode() not in content
                   for content in [*files.values(), *repo_files(hub, MODEL, revision="v1").values()])
        assert all(secret.encode() not in r.body and secret not in r.path for r in received)
        assert all(secret not in v for r in received for k, v in r.headers.items() if k.lower() != "authorization")


def test_public_model_gets_no_secret_and_is_not_pushed_again(hub, run_dir, tmp_path):
    env = hub_env(hub, tmp_path)
    assert deploy("push", "--repo", MODEL, "--run", run_dir, env=env).returncode == 0
    model_commit = hub.repo(MODEL).branches["main"]
    result = deploy("deploy", "--repo", MODEL, "--space", SPACE, "--run", run_dir, env=env)
    assert result.returncode == 0, result.stderr
    assert "model already on the hub" in result.stdout
    assert hub.repo(MODEL).branches["main"] == model_commit
    space = hub.repo(SPACE, "space")
    assert space.secrets == {} and space.hardware is None
    assert space.variables["MODEL_REVISION"]["value"] == "main"


def test_redeploy_removes_files_the_bundle_no_longer_has(hub, run_dir, tmp_path):
    env = hub_env(hub, tmp_path)
    assert deploy("deploy", "--repo", MODEL, "--space", SPACE, "--run", run_dir, env=env).returncode == 0
    space = hub.repo(SPACE, "space")
    head = space.branches["main"]
    space.commits[head] = {**space.commits[head], "old_app.py": space.commits[head]["app.py"]}
    result = deploy("deploy", "--repo", MODEL, "--space", SPACE, "--run", run_dir, env=env)
    assert result.returncode == 0, result.stderr
    assert "removing old_app.py" in result.stdout and "old_app.py" not in space_files(hub)
    assert set(space_files(hub)) == set(app_files()) | {"README.md", ".gitattributes"}


def test_space_with_another_sdk_is_refused(hub, run_dir, tmp_path):
    env = hub_env(hub, tmp_path)
    from fake_hub import Repo
    hub.repos[("space", SPACE)] = Repo("space", SPACE, False, "gradio", branches={"main": "0" * 40},
                                       commits={"0" * 40: {}})
    result = deploy("deploy", "--repo", MODEL, "--space", SPACE, "--run", run_dir, env=env)
    assert result.returncode == 1 and "Docker Space" in result.stderr


def test_bad_space_settings_are_rejected_locally(hub, run_dir, tmp_path):
    env = hub_env(hub, tmp_path)
    bad_space = deploy("deploy", "--repo", MODEL, "--space", "ada-chat", "--run", run_dir, env=env)
    assert bad_space.returncode == 1 and "SPACE=" in bad_space.stderr
    bad_hardware = deploy("deploy", "--repo", MODEL, "--space", SPACE, "--hardware", "h100-max", "--run", run_dir,
                          env=env)
    assert bad_hardware.returncode == 1 and "t4-small" in bad_hardware.stderr
    foreign = deploy("deploy", "--repo", MODEL, "--space", f"{USER}/x", "--run", run_dir,
                     env=hub_env(hub, tmp_path, token=OTHER_TOKEN))
    assert foreign.returncode == 1 and "can write to bob only" in foreign.stderr
    assert [r.path for r in hub.requests] == ["/api/whoami-v2"]


def test_api_key_becomes_a_space_secret_and_small_models_get_free_cpu_hardware(hub, run_dir, tmp_path):
    api_key = "sk-space-api-key-0123456789"
    result = make("deploy", "HUB=hf", f"REPO={MODEL}", f"SPACE={SPACE}", f"RUN={run_dir}",
                  env=hub_env(hub, tmp_path, API_KEY=api_key))
    assert result.returncode == 0, result.stderr
    space = hub.repo(SPACE, "space")
    assert {k: v["value"] for k, v in space.secrets.items()} == {"API_KEY": api_key}
    assert api_key not in result.stdout + result.stderr
    assert all(api_key.encode() not in content for content in space_files(hub).values())
    front = yaml.safe_load(space_files(hub)["README.md"].decode().split("---")[1])
    assert front["suggested_hardware"] == "cpu-basic"  # the tiny model; SmolLM2-135M too


def test_cpu_hardware_serves_the_gguf_through_llamacpp(hub, run_dir, tmp_path):
    gguf = make_gguf(run_dir)
    env = hub_env(hub, tmp_path)
    result = make("deploy", "HUB=hf", f"REPO={MODEL}", f"SPACE={SPACE}", f"RUN={run_dir}", "HARDWARE=cpu-basic",
                  env=env)
    assert result.returncode == 0, result.stderr
    model = repo_files(hub, MODEL)
    assert "config.json" in model and model["gguf/model-q8_0.gguf"] == gguf  # beside the model, not instead
    assert json.loads(model["gguf/chat_family.json"]) == {"chat_family": "internlm2"}

    files = space_files(hub)
    bundle = app_files(cpu=True)
    assert set(files) == set(bundle) | {"README.md", ".gitattributes"}
    assert all(files[path] == source.read_bytes() for path, source in bundle.items())
    assert files["Dockerfile"] == (REPO / "Dockerfile.cpu").read_bytes()
    assert_the_image_builds_from(files)
    space = hub.repo(SPACE, "space")
    assert space.hardware == "cpu-basic" and space.variables["GGUF"]["value"] == "/model/model-q8_0.gguf"

    # The Space's start: nothing mounted at GGUF, so it fetches the GGUF from the model repo.
    variables = {k: v["value"] for k, v in space.variables.items()}
    started = find_gguf(hub_env(hub, tmp_path, token=None, **variables))
    assert started.returncode == 0, started.stderr
    fetched = started.stdout.strip().splitlines()[-1]
    from deploy.llamacpp_server import chat_format
    with open(fetched, "rb") as f:
        assert f.read() == gguf
    assert chat_format(fetched).name == "internlm2"     # chat_family.json came beside it


def test_cpu_hardware_without_a_gguf_says_how_to_make_it(hub, run_dir, tmp_path):
    result = make("deploy", "HUB=hf", f"REPO={MODEL}", f"SPACE={SPACE}", f"RUN={run_dir}", "HARDWARE=cpu-upgrade",
                  "QUANT=q4_0", env=hub_env(hub, tmp_path))
    assert result.returncode != 0 and "error: " in result.stderr and "Traceback" not in result.stderr
    assert f"make gguf RUN={run_dir} QUANT=q4_0" in result.stderr and "model-q4_0.gguf" in result.stderr
    assert [r.path for r in hub.requests] == ["/api/whoami-v2"]         # refused before anything was sent


def test_the_cpu_start_refuses_a_repo_without_a_gguf_and_prefers_a_mounted_one(hub, tmp_path):
    hub.add_repo(MODEL, {"config.json": b"{}"})
    env = hub_env(hub, tmp_path, token=None, MODEL_ID=MODEL, GGUF=str(tmp_path / "model" / "model-q8_0.gguf"))
    refused = find_gguf(env)
    assert refused.returncode == 1
    assert f"{MODEL} (main) has no gguf/model-q8_0.gguf" in refused.stderr
    assert "make deploy HARDWARE=cpu-basic" in refused.stderr and "Traceback" not in refused.stderr

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model-q8_0.gguf").write_bytes(b"GGUF")                # `docker run -v RUN/gguf:/model`
    requests = len(hub.requests)
    mounted = find_gguf(env)
    assert mounted.returncode == 0 and mounted.stdout.strip() == env["GGUF"]
    assert len(hub.requests) == requests
