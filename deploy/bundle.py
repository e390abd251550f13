"""The files a hosted chat app is made of, taken from the kit itself: app.py and api.py, the chat/ runtime
(Python files only: no caches, no tests), requirements.txt and, for Docker hosts, the Dockerfile.
Both hubs serve exactly these, so what runs there is what the tests ran here."""
from pathlib import Path

from deploy import DeployError

ROOT = Path(__file__).resolve().parent.parent


def app_files(root: Path = ROOT, dockerfile: bool = True) -> dict[str, Path]:
    """{path in the app repo: local file}."""
    names = ["app.py", "api.py", "guards.py", "requirements.txt"] + (["Dockerfile"] if dockerfile else [])
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
        raise DeployError(f"{', '.join(missing)} missing in {root}: the app bundle needs them")
    files = {name: root / name for name in names}
    files.update({path.relative_to(root).as_posix(): path
                  for path in sorted((root / "chat").rglob("*.py")) if "__pycache__" not in path.parts})
    return files
