"""The CPU image's start (Dockerfile.cpu's CMD): find the GGUF, start llama.cpp's front on loopback
(ENGINE_URL) in the background, then become the app.

The GGUF is $GGUF (a RUN/gguf folder from `make gguf` mounted at /model for `docker run`). When it
is not there and MODEL_ID names a hub repo, as on a Space deployed with a CPU HARDWARE,
gguf/<its file name> and gguf/chat_family.json are fetched from MODEL_ID at MODEL_REVISION (with
HF_TOKEN for a private repo): `make deploy` put them there (deploy/space.py)."""
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from deploy.llamacpp_server import FAMILY_FILE

HUB_FOLDER = "gguf"                              # the GGUF's folder in the model repo
LLAMACPP_PYTHON = "/opt/llamacpp/bin/python"     # the image's llama.cpp venv (Dockerfile.cpu)
CONTEXT, USERS = "1024", "4"                     # tokens per user, users served at once


def find_gguf() -> Path:
    local = Path(os.environ.get("GGUF") or "/model/model-q8_0.gguf")
    if local.is_file():
        return local
    repo_id = os.environ.get("MODEL_ID", "").strip()
    if not repo_id:
        raise SystemExit(f"error: no GGUF at {local}: mount a RUN/gguf folder from `make gguf` at "
                         f"{local.parent}, or set MODEL_ID to a model repo holding {HUB_FOLDER}/{local.name}")
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    constants.HF_HUB_DISABLE_XET = True  # plain HTTP, as the app's own downloads (chat/loading.py)
    revision = os.environ.get("MODEL_REVISION", "").strip() or None
    where = f"{repo_id} ({revision or 'main'})"
    try:
        paths = [hf_hub_download(repo_id, f"{HUB_FOLDER}/{name}", revision=revision,
                                 token=os.environ.get("HF_TOKEN") or None)
                 for name in (FAMILY_FILE, local.name)]
    except EntryNotFoundError:
        raise SystemExit(f"error: {where} has no {HUB_FOLDER}/{local.name} with its {FAMILY_FILE}: "
                         f"deploy with `make deploy HARDWARE=cpu-basic`, which uploads RUN/gguf "
                         "from `make gguf`") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise SystemExit(f"error: {where} cannot be read: check MODEL_ID and MODEL_REVISION, and "
                         "HF_TOKEN for a private repo") from None
    print(f"fetched {HUB_FOLDER}/{local.name} from {where}", file=sys.stderr, flush=True)
    return Path(paths[-1])


def main() -> None:
    gguf = find_gguf()
    engine = urlsplit(os.environ["ENGINE_URL"])  # the front listens where the app looks for it
    subprocess.Popen([LLAMACPP_PYTHON, "-m", "deploy.llamacpp_server", str(gguf), "assistant",
                      engine.hostname, str(engine.port), CONTEXT, USERS])
    os.execv(sys.executable, [sys.executable, "app.py"])  # the app stays this process (PID 1)


if __name__ == "__main__":
    main()
