"""Push a merged model to the Hugging Face Hub with huggingface_hub, and the file sync the Space
deploy shares: one commit that makes the remote repo hold exactly the given files, then a check
of the remote file list and sizes against them.

The token comes from HF_TOKEN or the login cache (`hf auth login`), read by huggingface_hub
itself: never from a command line. HF_ENDPOINT points the client at another server (tests)."""
import hashlib
from pathlib import Path

import requests
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_token
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import RepositoryNotFoundError, RevisionNotFoundError

from chat.model_files import require_complete_model
from deploy import DeployError
from deploy.card import model_card, pictures

KEEP_REMOTE = {".gitattributes"}  # the Hub writes it into every new repo; it says which files are LFS
# Uploads go over HTTP + git LFS, not Xet, even with hf_xet installed: the path the tests run
# against a local Hub (Xet needs Hugging Face's storage servers). docs/publishing.md: "Hub transfers".
constants.HF_HUB_DISABLE_XET = True


def connect(*repo_ids: str) -> HfApi:
    """An HfApi whose token is known to be valid and allowed to write to every repo_id's namespace."""
    token = get_token()
    if not token:
        raise DeployError("no Hugging Face token: export HF_TOKEN=hf_... (a write token from "
                          "https://huggingface.co/settings/tokens) or log in once with `.venv/bin/hf auth login`")
    api = HfApi(token=token)
    me = api.whoami()  # an invalid token fails here, with huggingface_hub's message naming its source
    namespaces = {me["name"], *(org["name"] for org in me.get("orgs", []))}
    for repo_id in repo_ids:
        if repo_id.split("/")[0] not in namespaces:
            raise DeployError(f"{repo_id}: the token belongs to {me['name']}, who can write to "
                              f"{', '.join(sorted(namespaces))} only")
    return api


def repo_url(repo_id: str, repo_type: str = "model") -> str:
    return f"{constants.ENDPOINT}/{'spaces/' if repo_type == 'space' else ''}{repo_id}"


def size_of(source: Path | bytes) -> int:
    return len(source) if isinstance(source, bytes) else source.stat().st_size


def human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def sync_files(api: HfApi, repo_id: str, repo_type: str, revision: str, files: dict[str, Path | bytes],
               message: str, folder: str = "") -> str:
    """One commit that leaves exactly `files` (+ .gitattributes) in the repo at `revision`, or, with
    `folder` (e.g. "gguf/"), exactly `files` under it and the rest as it was; files the server
    already has are not sent again. Returns the commit id, after verifying that the remote files
    (under `folder`) are exactly these, byte for byte."""
    remote = {path for path in api.list_repo_files(repo_id, repo_type=repo_type, revision=revision)
              if path.startswith(folder)}
    stale = sorted(remote - set(files) - KEEP_REMOTE)
    operations = [CommitOperationAdd(path, source) for path, source in files.items()]
    operations += [CommitOperationDelete(path) for path in stale]
    total = sum(size_of(source) for source in files.values())
    print(f"uploading {len(files)} files ({human(total)}) to {repo_url(repo_id, repo_type)} ({revision})"
          + (f", removing {', '.join(stale)}" if stale else ""), flush=True)
    try:
        commit = api.create_commit(repo_id, operations, commit_message=message, repo_type=repo_type,
                                   revision=revision)
    except (requests.RequestException, RuntimeError) as e:  # RuntimeError: huggingface_hub's LFS upload wrapper
        raise DeployError(f"the upload to {repo_id} was interrupted before it was committed ({e}); the repo is "
                          "unchanged. Run the same command again: files already uploaded are not sent twice") from None
    verify(api, repo_id, repo_type, commit.oid, [op for op in operations if isinstance(op, CommitOperationAdd)],
           folder)
    return commit.oid


def verify(api: HfApi, repo_id: str, repo_type: str, commit: str, uploaded: list[CommitOperationAdd],
           folder: str = "") -> None:
    """The commit holds exactly the uploaded files (under `folder`) with the same content, compared
    by the hashes the Hub lists (sha256 for LFS files, the git blob id for the others): nothing is
    downloaded."""
    remote = {entry.path: entry for entry in api.list_repo_tree(
        repo_id, repo_type=repo_type, revision=commit, recursive=True)
        if isinstance(entry, RepoFile) and entry.path.startswith(folder)}
    expected = {op.path_in_repo: op for op in uploaded}
    problems = [f"{path} is missing" for path in expected if path not in remote]
    problems += [f"{path} differs from the local file ({remote[path].size} bytes on the hub, "
                 f"{op.upload_info.size} here)" for path, op in expected.items()
                 if path in remote and not same_content(remote[path], op)]
    problems += [f"unexpected {path}" for path in remote if path not in expected and path not in KEEP_REMOTE]
    if problems:
        raise DeployError(f"{repo_id} at {commit} does not match what was uploaded: {'; '.join(problems)}. "
                          "Run the same command again to upload the differing files anew")
    print(f"verified: the {len(expected)} files on the hub match the local ones byte for byte (by hash)")


def same_content(entry: RepoFile, op: CommitOperationAdd) -> bool:
    if entry.size != op.upload_info.size:
        return False
    if entry.lfs:
        return entry.lfs.sha256 == op.upload_info.sha256.hex()
    with op.as_file() as f:  # a small file (the Hub keeps large ones in LFS): its git blob id
        blob = f.read()
    return entry.blob_id == hashlib.sha1(b"blob %d\0" % len(blob) + blob).hexdigest()


def local_files(folder: Path) -> dict[str, Path]:
    return {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*"))
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)}


def model_files(run: Path, repo_id: str, revision: str) -> dict[str, Path | bytes]:
    """RUN/merged plus its model card. An incomplete folder is refused here, before any token is
    read or anything is sent."""
    merged = require_complete_model(run / "merged")
    card = model_card(run, repo_id, None if revision == "main" else revision)
    return {**local_files(merged), **pictures(run), "README.md": card.encode()}


def push_model(api: HfApi, files: dict[str, Path | bytes], repo_id: str, private: bool, revision: str) -> str:
    """Create repo_id (and branch `revision`) if needed and make it hold `files`; returns the commit."""
    api.create_repo(repo_id, private=private, exist_ok=True)
    if private and not api.model_info(repo_id).private:
        raise DeployError(f"{repo_id} already exists and is public; PRIVATE=1 does not change that: make it "
                          f"private in {repo_url(repo_id)}/settings first, or push with PRIVATE=0")
    if revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = sync_files(api, repo_id, "model", revision, files, "Upload the merged model and its model card")
    print(f"model: {repo_url(repo_id)}{'' if revision == 'main' else f'/tree/{revision}'}  commit: {commit}")
    return commit


def model_on_hub(api: HfApi, repo_id: str, revision: str) -> str | None:
    """The commit of repo_id at `revision` if a model is there (it has config.json), else None."""
    try:
        info = api.model_info(repo_id, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return None
    return info.sha if any(s.rfilename == "config.json" for s in info.siblings or []) else None
