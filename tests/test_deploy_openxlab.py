"""`make push|deploy HUB=openxlab`: git + git-lfs pushes to a local bare repo standing in for
code.openxlab.org.cn (only OPENXLAB_GIT_ENDPOINT differs), read back by the app's own loader."""
import filecmp
import os
import subprocess

import pytest
import yaml

from deploy.bundle import app_files
from deploy.openxlab import CREDENTIALS
from deploy_helpers import USER, deploy, make

MODEL = f"{USER}/ada-assistant"
GIT_TOKEN = "oxGitToken0123456789secret"


@pytest.fixture
def remote(tmp_path):
    """An empty bare repo at ENDPOINT/alice/ada-assistant.git, like one made in OpenXLab's web UI."""
    root = tmp_path / "remote"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", root / f"{MODEL}.git"], check=True)
    return root


def env_for(remote, tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "OPENXLAB_"))}
    return {**env, "OPENXLAB_GIT_ENDPOINT": f"file://{remote}", "OPENXLAB_GIT_TOKEN": GIT_TOKEN,
            "XDG_CACHE_HOME": str(tmp_path / "cache"), "HOME": str(tmp_path), **extra}


def remote_git(remote, *args) -> str:
    return subprocess.run(["git", "-C", remote / f"{MODEL}.git", *args], check=True, capture_output=True,
                          text=True).stdout


def test_push_sends_weights_through_lfs_and_the_app_loader_reads_them_back(remote, run_dir, tmp_path,
                                                                            monkeypatch):
    env = env_for(remote, tmp_path)
    result = make("push", "HUB=openxlab", f"REPO={MODEL}", f"RUN={run_dir}", env=env)
    assert result.returncode == 0, result.stderr
    commit = remote_git(remote, "rev-parse", "main").strip()
    assert commit in result.stdout and f"openxlab.org.cn/models/detail/{MODEL}" in result.stdout

    tree = remote_git(remote, "ls-tree", "-r", "--name-only", "main").split()
    merged = sorted(p.name for p in (run_dir / "merged").iterdir())
    assert sorted(tree) == sorted(merged + ["README.md", "metafile.yml", ".gitattributes"])
    pointer = remote_git(remote, "show", "main:model-00001-of-00003.safetensors")
    assert pointer.startswith("version https://git-lfs")              # stored in LFS, not in git

    from chat.loading import openxlab_snapshot                        # what the app runs for MODEL_ID
    for key in ("OPENXLAB_GIT_ENDPOINT", "XDG_CACHE_HOME"):
        monkeypatch.setenv(key, env[key])
    folder = openxlab_snapshot(MODEL, None)
    same, different, errors = filecmp.cmpfiles(folder, run_dir / "merged", merged, shallow=False)
    assert same == merged, (different, errors)

    readme = remote_git(remote, "show", "main:README.md")
    assert f"git clone file://{remote}/{MODEL}.git" in readme and "Ada Lin" in readme
    assert GIT_TOKEN not in result.stdout + result.stderr + readme
    assert GIT_TOKEN not in (run_dir / "openxlab" / "model" / ".git" / "config").read_text()


def test_metafile_has_what_the_openxlab_sdk_requires(remote, run_dir, tmp_path):
    """The checks of openxlab 0.1.3's MetafileParser.validate, and weights that exist."""
    assert deploy("push", "--hub", "openxlab", "--repo", MODEL, "--run", run_dir,
                  env=env_for(remote, tmp_path)).returncode == 0
    meta = yaml.safe_load(remote_git(remote, "show", "main:metafile.yml"))
    for collection in meta["Collections"]:
        assert collection["Name"] and collection["License"] and collection["Code"]["URL"]
    weights = sorted(p.name for p in (run_dir / "merged").glob("*.safetensors"))
    assert sorted(model["Weights"] for model in meta["Models"]) == weights
    for model in meta["Models"]:
        assert model["Name"] and model["Results"]
        assert all(result["Task"] and result["Dataset"] for result in model["Results"])


def seed(remote, tmp_path) -> str:
    """The web UI's first commit: a README a push must replace, not be rejected by."""
    work = tmp_path / "seed"
    subprocess.run(["git", "init", "-q", "-b", "main", work], check=True)
    (work / "README.md").write_text("# made on the web\n")
    subprocess.run(["git", "-C", work, "add", "README.md"], check=True)
    subprocess.run(["git", "-C", work, "-c", "user.name=web", "-c", "user.email=web@x", "commit", "-qm", "init"], check=True)
    subprocess.run(["git", "-C", work, "push", "-q", remote_url(remote), "main"], check=True)
    return remote_git(remote, "rev-parse", "main").strip()


def remote_url(remote) -> str:
    return f"file://{remote}/{MODEL}.git"


def test_push_builds_on_the_remote_history_and_a_rerun_changes_nothing(remote, run_dir, tmp_path):
    seed_commit = seed(remote, tmp_path)
    env = env_for(remote, tmp_path)
    first = deploy("push", "--hub", "openxlab", "--repo", MODEL, "--run", run_dir, env=env)
    assert first.returncode == 0, first.stderr
    assert remote_git(remote, "rev-parse", "main~1").strip() == seed_commit
    assert "made on the web" not in remote_git(remote, "show", "main:README.md")
    head = remote_git(remote, "rev-parse", "main").strip()
    again = deploy("push", "--hub", "openxlab", "--repo", MODEL, "--run", run_dir, env=env)
    assert again.returncode == 0, again.stderr
    assert remote_git(remote, "rev-parse", "main").strip() == head


def test_missing_token_missing_repo_and_incomplete_model_fail_clearly(remote, run_dir, tmp_path):
    no_token = deploy("push", "--hub", "openxlab", "--repo", MODEL, "--run", run_dir,
                      env={**env_for(remote, tmp_path), "OPENXLAB_GIT_TOKEN": ""})
    assert no_token.returncode == 1 and "OPENXLAB_GIT_TOKEN" in no_token.stderr
    no_repo = deploy("push", "--hub", "openxlab", "--repo", f"{USER}/missing", "--run", run_dir,
                     env=env_for(remote, tmp_path))
    assert no_repo.returncode == 1 and "Create the model repository" in no_repo.stderr
    (run_dir / "merged" / "config.json").unlink()
    incomplete = deploy("push", "--hub", "openxlab", "--repo", MODEL, "--run", run_dir, env=env_for(remote, tmp_path))
    assert incomplete.returncode == 1 and "config.json is missing" in incomplete.stderr
    assert not (run_dir / "openxlab").exists()                       # refused before staging anything
    for result in (no_token, no_repo, incomplete):
        assert "Traceback" not in result.stderr


def test_git_gets_the_token_from_the_environment_only():
    """The credential helper git and git-lfs use over https answers with OPENXLAB_GIT_TOKEN."""
    result = subprocess.run(["git", "-c", "credential.helper=", "-c", f"credential.helper={CREDENTIALS}",
                             "credential", "fill"], input="protocol=https\nhost=code.openxlab.org.cn\n\n",
                            env={**os.environ, "OPENXLAB_GIT_USER": USER, "OPENXLAB_GIT_TOKEN": GIT_TOKEN,
                                 "GIT_TERMINAL_PROMPT": "0"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"username={USER}\n" in result.stdout and f"password={GIT_TOKEN}\n" in result.stdout
    assert GIT_TOKEN not in CREDENTIALS


def test_deploy_writes_the_app_bundle_repo_and_the_next_steps(remote, run_dir, tmp_path):
    result = make("deploy", "HUB=openxlab", f"REPO={MODEL}", f"RUN={run_dir}", env=env_for(remote, tmp_path))
    assert result.returncode == 0, result.stderr
    assert remote_git(remote, "rev-parse", "main").strip()           # the model was pushed first
    app = run_dir / "openxlab" / "app"
    tracked = subprocess.run(["git", "-C", app, "ls-files"], capture_output=True, text=True).stdout.split()
    assert set(tracked) == set(app_files(dockerfile=False)) | {"packages.txt", "README.md"}
    assert subprocess.run(["git", "-C", app, "status", "--porcelain"], capture_output=True, text=True).stdout == ""
    assert "git-lfs" in (app / "packages.txt").read_text().split()
    for step in (f"git -C {app} push -u origin main", "Gradio", f"MODEL_ID={MODEL}", "MODEL_SOURCE=openxlab"):
        assert step in result.stdout, step
    again = deploy("deploy", "--hub", "openxlab", "--repo", MODEL, "--run", run_dir, env=env_for(remote, tmp_path))
    assert again.returncode == 0 and "model already on OpenXLab" in again.stdout


def test_a_push_the_remote_does_not_keep_fails_the_head_check(remote, run_dir, tmp_path):
    """The server accepts the push, then its branch ends up elsewhere (a hook moves it back, as a
    lost or rewritten push would): the push must not report success."""
    seed(remote, tmp_path)
    hook = remote / f"{MODEL}.git" / "hooks" / "post-receive"
    hook.write_text("#!/bin/sh\ngit update-ref refs/heads/main refs/heads/main~1\n")
    hook.chmod(0o755)
    result = deploy("push", "--hub", "openxlab", "--repo", MODEL, "--run", run_dir, env=env_for(remote, tmp_path))
    assert result.returncode == 1, result.stdout
    assert f"git push reported success but {remote_url(remote)} main is not at" in result.stderr
    assert "model: " not in result.stdout and "Traceback" not in result.stderr
