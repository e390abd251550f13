"""OpenXLab through git + git-lfs: its model repos are git repos at
https://code.openxlab.org.cn/USER/NAME.git with weights in LFS (what its apps clone), so a push
is a plain `git push`, whose failures git reports with an exit status (the openxlab SDK swallows
its errors and cannot share our venv: see DESIGN.md).

A model push stages RUN/merged (hard links, no copies), the model card and the OpenXLab metafile
in RUN/openxlab/model, commits on top of the remote branch and pushes. An app deploy writes the
app bundle as a git repo in RUN/openxlab/app; OpenXLab builds apps from a GitHub repo, so the
last steps happen in its web UI and are printed.

Credentials: OPENXLAB_GIT_TOKEN (a Git access token from the OpenXLab account settings), read by
a git credential helper from the environment, so it never appears on a command line, in
.git/config or in git's output. OPENXLAB_GIT_ENDPOINT points git at another server (tests)."""
import os
import shutil
import subprocess
from pathlib import Path

import yaml

from chat.model_files import require_complete_model
from chat.openxlab import repo_url
from deploy import DeployError
from deploy.bundle import app_files
from deploy.card import model_card, pictures, read_run
from deploy.hf import local_files

WEB = "https://openxlab.org.cn"
LFS_PATTERNS = ["*.safetensors", "*.bin", "*.model", "*.pth", "*.pt", "*.gguf"]
CREDENTIALS = '!f() { test "$1" = get && echo "username=$OPENXLAB_GIT_USER" && echo "password=$OPENXLAB_GIT_TOKEN"; }; f'
APT_PACKAGES = ["git", "git-lfs"]  # packages.txt: the app clones the model repo with git-lfs


def git(repo: Path, *args: str, show: bool = False) -> str:
    """Run git in `repo`; `show` lets its progress reach the terminal. Raises DeployError with
    git's own last line on failure."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    command = ["git", "-c", "credential.helper=", "-c", f"credential.helper={CREDENTIALS}", *args]
    result = subprocess.run(command, cwd=repo, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=None if show else subprocess.PIPE)
    if result.returncode:
        cause = (result.stderr or "").strip().splitlines()[-1:] or ["see git's message above"]
        raise DeployError(f"git {args[0]} failed: {cause[0]}")
    return result.stdout.strip()


def check_tools() -> None:
    if not shutil.which("git") or subprocess.run(["git", "lfs", "version"], capture_output=True).returncode:
        raise DeployError("git and git-lfs are needed for OpenXLab: `make push HUB=openxlab` installs "
                          "them (or: apt-get install git git-lfs)")


def check_credentials(repo_id: str) -> None:
    if not os.environ.get("OPENXLAB_GIT_TOKEN"):
        raise DeployError("no OpenXLab token: export OPENXLAB_GIT_TOKEN=... (a Git access token from your "
                          f"account settings on {WEB}); OPENXLAB_GIT_USER if your login differs from the repo's namespace")
    os.environ.setdefault("OPENXLAB_GIT_USER", repo_id.split("/")[0])  # for the credential helper and commits


def metafile(run: Path, repo_id: str, weights: list[str]) -> str:
    """The metafile OpenXLab's model center (and `openxlab model create/upload -s`) reads: the
    collection, and one model entry per weight file with the task it was trained for."""
    info = read_run(run)
    data = f"{info['name']} identity data ({info.get('data_records', '?')} records)"
    collection = {"Name": repo_id.split("/")[1], "License": "other (the base model's license)",
                  "Code": {"URL": "https://github.com/InternLM/xtuner"},
                  "README": "README.md"}
    models = [{"Name": Path(weight).stem, "In Collection": collection["Name"], "Weights": weight,
               "Results": [{"Task": "Text Generation", "Dataset": data}]} for weight in weights]
    return yaml.safe_dump({"Collections": [collection], "Models": models}, allow_unicode=True, sort_keys=False)


def stage(folder: Path, files: dict[str, Path | bytes]) -> None:
    """Make `folder` (a git repo) hold exactly `files`; large files are hard links, not copies."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / ".git").is_dir():
        git(folder, "init", "-q", "-b", "main")
    for old in folder.iterdir():
        if old.name != ".git":
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    for name, source in files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            try:
                os.link(source, target)
            except OSError:  # another file system
                shutil.copy2(source, target)


def commit(folder: Path, message: str) -> str:
    git(folder, "add", "-A")
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=folder).returncode:
        user = os.environ["OPENXLAB_GIT_USER"]
        identity = [] if subprocess.run(["git", "config", "user.email"], cwd=folder, capture_output=True).returncode == 0 \
            else ["-c", f"user.name={user}", "-c", f"user.email={user}@users.noreply.openxlab.org.cn"]
        git(folder, *identity, "commit", "-q", "-m", message)
    return git(folder, "rev-parse", "HEAD")


def remote_head(cwd: Path, url: str, branch: str) -> str | None:
    try:
        out = git(cwd, "ls-remote", url, f"refs/heads/{branch}")
    except DeployError as e:
        raise DeployError(f"cannot reach {url} ({e}). Create the model repository on {WEB} first "
                          "(Models -> Create), and check OPENXLAB_GIT_TOKEN") from None
    return out.split()[0] if out else None


def push_model(run: Path, repo_id: str, revision: str) -> str:
    """Push RUN/merged + card + metafile to the OpenXLab model repo; returns the commit."""
    merged = require_complete_model(run / "merged")
    check_tools()
    check_credentials(repo_id)
    url = repo_url(repo_id)
    folder = run / "openxlab" / "model"
    weights = local_files(merged)
    download = f"git lfs install && git clone {url}" + (
        f" -b {revision}" if revision != "main" else "")
    head = remote_head(run, url, revision)  # a missing repo or a bad token stops here
    stage(folder, {**weights, **pictures(run),
                   "README.md": model_card(run, repo_id, download=download).encode(),
                   "metafile.yml": metafile(run, repo_id, [w for w in weights if w.endswith(".safetensors")]).encode(),
                   ".gitattributes": "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()})
    git(folder, "lfs", "install", "--local")
    if head:  # build on what the repo has (e.g. the README its web UI made), so the push fast-forwards
        git(folder, "fetch", "-q", url, f"refs/heads/{revision}")
        git(folder, "reset", "-q", "--soft", "FETCH_HEAD")
    sha = commit(folder, f"Upload {read_run(run)['name']}'s assistant")
    print(f"pushing {len(weights) + 3} files from {folder} to {url} ({revision})", flush=True)
    git(folder, "push", url, f"HEAD:refs/heads/{revision}", show=True)
    if remote_head(folder, url, revision) != sha:
        raise DeployError(f"git push reported success but {url} {revision} is not at {sha}")
    print(f"model: {WEB}/models/detail/{repo_id}  commit: {sha}")
    return sha


def deploy_app(run: Path, repo_id: str, name: str, revision: str) -> Path:
    """Push the model if the repo has none, then write the app bundle repo; returns its folder."""
    bundle = app_files(dockerfile=False)
    check_tools()
    check_credentials(repo_id)
    existing = remote_head(run, repo_url(repo_id), revision)
    if existing:
        print(f"model already on OpenXLab: {repo_id} ({revision}, commit {existing}); `make push HUB=openxlab` updates it")
    else:
        push_model(run, repo_id, revision)
    folder = run / "openxlab" / "app"
    settings = {"MODEL_ID": repo_id, "MODEL_SOURCE": "openxlab", "MODEL_REVISION": revision}
    readme = f"# {name}'s assistant\n\nA streaming chat with the OpenXLab model `{repo_id}` ({revision}).\n\n" \
             "Environment variables (set in the app's settings):\n\n" + \
             "".join(f"- `{key}={value}`\n" for key, value in settings.items())
    stage(folder, {**bundle, "packages.txt": "".join(f"{p}\n" for p in APT_PACKAGES).encode(),
                   "README.md": readme.encode()})
    sha = commit(folder, f"Chat app for {repo_id}")
    print(f"""
OpenXLab app bundle ready: {folder} (git repo, branch main, commit {sha[:12]})
OpenXLab builds apps from a GitHub repository; the remaining steps happen on the web:
  1. Create an empty GitHub repository (e.g. github.com/YOU/{repo_id.split('/')[1]}-app) and push the bundle:
       git -C {folder} remote add origin https://github.com/YOU/{repo_id.split('/')[1]}-app.git
       git -C {folder} push -u origin main
  2. On {WEB}/apps choose "Create app" -> Gradio, enter that GitHub repository, branch main, start file app.py.
  3. Choose the hardware (a GPU for InternLM2-Chat-1.8B) and add these environment variables:
       {'  '.join(f'{key}={value}' for key, value in settings.items())}
  4. Create the app; OpenXLab installs packages.txt and requirements.txt, then starts app.py.""")
    return folder
