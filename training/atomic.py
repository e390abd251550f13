"""Step outputs appear whole or not at all: an interrupted step never leaves a half-written
directory that a later step would pick up."""
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(final: str | Path):
    """Yield an empty temporary sibling of `final`; when the block succeeds, swap it into
    place (replacing any old `final`); when it fails, delete it."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier interrupted step
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    share(tmp)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a file whole or not at all: a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def share(folder: Path) -> None:
    """Give files the modes the umask allows. safetensors writes weights 0600 whatever the umask,
    which a container running as another user (uid 1000) cannot read from a mounted folder."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
