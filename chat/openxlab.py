"""Where OpenXLab model repos live. Light on purpose: deploy/ imports it without torch."""
import os


def repo_url(repo_id: str) -> str:
    """Every OpenXLab model repo is a git + git-lfs repo; OPENXLAB_GIT_ENDPOINT points elsewhere
    (tests use a local one)."""
    endpoint = os.environ.get("OPENXLAB_GIT_ENDPOINT", "https://code.openxlab.org.cn").rstrip("/")
    return f"{endpoint}/{repo_id}.git"
