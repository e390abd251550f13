"""Hub repo ids (owner/name) as opposed to local paths. Light on purpose: training/ and deploy/
import it without torch."""
import re

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def looks_like_hub_id(text: str) -> bool:
    """owner/name, and nothing that reads as a relative or absolute path (./x, /x, ~/x)."""
    return bool(HUB_ID.match(text)) and not text.startswith((".", "/", "~"))
