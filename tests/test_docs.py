"""The README documents what the Makefile and the app actually take."""
import re
import subprocess

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_every_make_knob_is_in_the_readme_and_in_make_help():
    knobs = re.findall(r"^([A-Z_]+) \?=", (REPO / "Makefile").read_text(encoding="utf-8"), re.M)
    assert len(knobs) > 20
    shown = subprocess.run(["make", "--no-print-directory", "help"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout
    for knob in knobs:
        assert f"| `{knob}` |" in README, f"README's knob table lacks {knob}"
        assert re.search(rf"^  {knob}\s", shown, re.M), f"make help lacks {knob}"


def test_every_app_setting_is_documented():
    settings = re.findall(r'text\("([A-Z_]+)"\)|number\("([A-Z_]+)"', (REPO / "chat" / "settings.py").read_text())
    names = {a or b for a, b in settings} | {"SYSTEM_PROMPT"}
    assert {"MODEL_ID", "HF_TOKEN", "APP_AUTH", "QUEUE_SIZE", "GRADIO_SERVER_PORT"} <= names
    for name in names:
        assert f"`{name}`" in README, f"README does not document {name}"
