"""`make deploy HUB=hf`: a Docker Space on the fake Hub, asserted on what the server received."""
import yaml

from deploy.bundle import app_files
from deploy_helpers import OTHER_TOKEN, TOKEN, USER, deploy, hub_env, make, repo_files

MODEL, SPACE = f"{USER}/ada-assistant", f"{USER}/ada-chat"
READ_TOKEN = "hf_readOnlyForTheSpace0123456789"


def space_files(hub) -> dict[str, bytes]:
    return repo_files(hub, SPACE, "space")


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
