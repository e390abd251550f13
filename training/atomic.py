"""Step outputs appear whole or not at all: an interrupted step never leaves a half-written
directory that a later step would pick up."""
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
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
