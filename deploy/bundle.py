"""The files a hosted chat app is made of, taken from the kit itself: app.py and api.py, the chat/ runtime
(Python files only: no caches, no tests), requirements.txt and, for Docker hosts, the Dockerfile.
The CPU variant (a Space on CPU hardware) is the app on llama.cpp: Dockerfile.cpu as its Dockerfile,
plus what that image starts. Both hubs serve exactly these, so what runs there is what the tests ran here."""
from pathlib import Path

from deploy import DeployError

ROOT = Path(__file__).resolve().parent.parent
# Dockerfile.cpu's extra files: its start module fetches the GGUF and starts llama.cpp's front.
CPU_FILES = ["requirements-engine-llamacpp.txt", "deploy/__init__.py", "deploy/llamacpp_server.py",
             "deploy/start_cpu.py"]


def app_files(root: Path = ROOT, dockerfile: bool = True, cpu: bool = False) -> dict[str, Path]:
    """{path in the app repo: local file}; cpu: the llama.cpp image's files (needs dockerfile)."""
    sources = {name: name for name in ["app.py", "api.py", "guards.py", "requirements.txt"]}
    if dockerfile:
        sources["Dockerfile"] = "Dockerfile.cpu" if cpu else "Dockerfile"
    if cpu:
        sources.update({name: name for name in CPU_FILES})
    missing = [source for source in sources.values() if not (root / source).is_file()]
    if missing:
        raise DeployError(f"{', '.join(missing)} missing in {root}: the app bundle needs them")
    files = {name: root / source for name, source in sources.items()}
    files.update({path.relative_to(root).as_posix(): path
                  for path in sorted((root / "chat").rglob("*.py")) if "__pycache__" not in path.parts})
    return files
