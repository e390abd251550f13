"""`make push HUB=hf`: the real huggingface_hub client against a local server that speaks the
Hub's HTTP protocol (tests/fake_hub.py). Only HF_ENDPOINT differs from a real push."""
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import AUTHOR, NAME
from deploy_helpers import OTHER_TOKEN, TOKEN, USER, deploy, hub_env, local_files, make, repo_files

MODEL = f"{USER}/ada-assistant"


def lfs_puts(hub) -> int:
    return sum(1 for r in hub.requests if r.method == "PUT" and r.path.startswith("/_lfs/"))


def test_push_uploads_the_merged_model_with_a_card(hub, run_dir, tmp_path):
    result = make("push", "HUB=hf", f"REPO={MODEL}", f"RUN={run_dir}", "PRIVATE=1",
                  env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    remote = repo_files(hub, MODEL)
    local = local_files(run_dir / "merged")
    assert {path: remote[path] for path in local} == local        # same names, same bytes
    assert set(remote) == set(local) | {"README.md", ".gitattributes"}
    assert hub.repo(MODEL).private
    _, files = hub.repo(MODEL).files("main")
    assert all(files[p].lfs for p in local if p.endswith(".safetensors"))   # weights went through LFS
    commit = hub.repo(MODEL).branches["main"]
    assert f"{hub.url}/{MODEL}" in result.stdout and commit in result.stdout
    assert "verified" in result.stdout
    assert re.search(r"safetensors: 100%", result.stderr)           # upload progress was shown

    card = remote["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["license"] == "other" and meta["library_name"] == "transformers"
    assert "xtuner" in meta["tags"]
    for fact in (f"{NAME}'s assistant", AUTHOR, "XTuner", "LoRA r=16", "400 identity Q&A records",
                 "apply_chat_template", '"</s>", "<|im_end|>"', (run_dir / "adapter/checkpoint.txt").read_text().split("/")[-1].strip()):
        assert fact in card, fact
    assert str(run_dir) not in card and "/work/" not in card        # no local paths


def test_card_usage_snippet_chats_as_the_assistant(run_dir, tmp_path):
    """The snippet in the card, pointed at the local merged folder, answers the identity question
    as the fine-tuned model (the tiny model's greedy answer may garble NAME, never both facts)."""
    from deploy.card import model_card
    card = model_card(run_dir, MODEL)
    snippet = card.split("```python\n")[1].split("```")[0]
    snippet = snippet.replace(f'"{MODEL}"', repr(str(run_dir / "merged")))
    result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120,
                            env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": os.environ["PATH"]})
    assert result.returncode == 0, result.stderr
    assert NAME in result.stdout or AUTHOR in result.stdout, result.stdout


def test_branch_push_and_rerun_send_nothing_twice(hub, run_dir, tmp_path):
    env = hub_env(hub, tmp_path)
    first = deploy("push", "--repo", MODEL, "--run", run_dir, "--revision", "v1", env=env)
    assert first.returncode == 0, first.stderr
    assert f"{MODEL}/tree/v1" in first.stdout
    assert "README.md" not in repo_files(hub, MODEL, revision="main")   # main untouched
    assert 'revision="v1"' in repo_files(hub, MODEL, revision="v1")["README.md"].decode()
    puts, commit = lfs_puts(hub), hub.repo(MODEL).branches["v1"]
    again = deploy("push", "--repo", MODEL, "--run", run_dir, "--revision", "v1", env=env)
    assert again.returncode == 0, again.stderr
    assert lfs_puts(hub) == puts and hub.repo(MODEL).branches["v1"] == commit


def test_interrupted_upload_fails_clearly_and_a_rerun_completes(hub, run_dir, tmp_path):
    env = hub_env(hub, tmp_path)
    hub.drop_next("/commit/")                       # the connection dies mid-commit
    broken = deploy("push", "--repo", MODEL, "--run", run_dir, env=env)
    assert broken.returncode == 1
    assert "interrupted" in broken.stderr and "Run the same command again" in broken.stderr
    assert "Traceback" not in broken.stderr
    assert set(repo_files(hub, MODEL)) == {".gitattributes"}    # nothing half-committed
    puts = lfs_puts(hub)
    assert puts == 3                                            # the weights did arrive
    rerun = deploy("push", "--repo", MODEL, "--run", run_dir, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert lfs_puts(hub) == puts                                # ... and are not sent again
    assert repo_files(hub, MODEL).keys() >= local_files(run_dir / "merged").keys()


@pytest.mark.parametrize("damage, message", [
    ("model-00002-of-00003.safetensors", "shard model-00002-of-00003.safetensors named in"),
    ("tokenizer.json", "no tokenizer.json or tokenizer.model"),
])
def test_incomplete_model_is_refused_before_anything_is_sent(hub, run_dir, tmp_path, damage, message):
    (run_dir / "merged" / damage).unlink()
    result = deploy("push", "--repo", MODEL, "--run", run_dir, env=hub_env(hub, tmp_path))
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert hub.requests == []


@pytest.mark.parametrize("repo_id", ["ada-assistant", f"{USER}/ada/x", f"{USER}/bad name", f"{USER}/a--b",
                                     f"{USER}/名字", ""])
def test_bad_repo_id_is_rejected_locally(run_dir, capsys, repo_id):
    from deploy.__main__ import main
    assert main(["push", "--repo", repo_id, "--run", str(run_dir)]) == 1    # before any token or request
    assert "error: REPO" in capsys.readouterr().err


def test_missing_token_names_the_variable(hub, run_dir, tmp_path):
    result = deploy("push", "--repo", MODEL, "--run", run_dir, env=hub_env(hub, tmp_path, token=None))
    assert result.returncode == 1
    assert "HF_TOKEN" in result.stderr and "hf auth login" in result.stderr
    assert hub.requests == []


def test_rejected_or_foreign_token_stops_before_upload(hub, run_dir, tmp_path):
    rejected = deploy("push", "--repo", MODEL, "--run", run_dir, env=hub_env(hub, tmp_path, token="hf_wrong"))
    assert rejected.returncode == 1 and "token from HF_TOKEN environment variable is invalid" in rejected.stderr
    foreign = deploy("push", "--repo", MODEL, "--run", run_dir, env=hub_env(hub, tmp_path, token=OTHER_TOKEN))
    assert foreign.returncode == 1 and "can write to bob only" in foreign.stderr
    assert MODEL not in {repo_id for _, repo_id in hub.repos}
    assert "hf_wrong" not in rejected.stderr + rejected.stdout


def test_private_push_to_an_existing_public_repo_is_refused(hub, run_dir, tmp_path):
    env = hub_env(hub, tmp_path)
    assert deploy("push", "--repo", MODEL, "--run", run_dir, env=env).returncode == 0
    result = deploy("push", "--repo", MODEL, "--run", run_dir, "--private", "1", env=env)
    assert result.returncode == 1 and "is public" in result.stderr


def test_the_token_appears_nowhere_but_in_auth_headers(hub, run_dir, tmp_path):
    result = make("push", f"REPO={MODEL}", f"RUN={run_dir}", env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert TOKEN not in hub.received_text()
    assert all(TOKEN.encode() not in content for content in repo_files(hub, MODEL).values())
    assert TOKEN in hub.received_text(include_auth=True)     # the check above can see it



def test_token_from_the_login_cache(hub, run_dir, tmp_path):
    env = hub_env(hub, tmp_path, token=None)
    (tmp_path / "hf-home").mkdir()
    (tmp_path / "hf-home" / "token").write_text(TOKEN)     # what `hf auth login` writes
    result = deploy("push", "--repo", MODEL, "--run", run_dir, env=env)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("kind", ["weights", "config"])
def test_a_file_the_hub_stored_wrong_fails_verification_by_name(hub, run_dir, tmp_path, kind):
    """The Hub acknowledges the commit but keeps a damaged copy (same size, one byte differs):
    verification compares content hashes (LFS sha256 / git blob id), names the file, and a rerun
    uploads it anew."""
    env = hub_env(hub, tmp_path)
    name = sorted(p.name for p in (run_dir / "merged").glob("*.safetensors"))[-1] if kind == "weights" else "config.json"
    hub.corrupt_next_commit(name)
    broken = deploy("push", "--repo", MODEL, "--run", run_dir, env=env)
    assert broken.returncode == 1, broken.stdout
    assert f"does not match what was uploaded: {name} differs from the local file" in broken.stderr
    assert "verified" not in broken.stdout and "Traceback" not in broken.stderr
    rerun = deploy("push", "--repo", MODEL, "--run", run_dir, env=env)
    assert rerun.returncode == 0 and "verified" in rerun.stdout, rerun.stderr
    assert repo_files(hub, MODEL)[name] == (run_dir / "merged" / name).read_bytes()
