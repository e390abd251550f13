"""The pipeline's knobs. They arrive through the environment (the Makefile exports them; see its
top), never pasted into a shell line, so any NAME reaches the data verbatim and nothing in it
runs. Standard library only: `make` runs `python3 -m training.knobs` to refuse a bad value
before it installs anything.

    python -m training.knobs      # exit 2 with a message naming the knob, else print nothing
"""
import math
import os
import re
import sys
import unicodedata

# Environment variable -> default; the Makefile holds the same defaults for `make help`.
DEFAULTS = {
    "NAME": "伍鲜同志", "AUTHOR": "", "PROFILE": "auto", "BASE_MODEL": "", "TEMPLATE": "",
    "RUN": "runs/assistant", "DATA": "data/assistant.jsonl", "DATA_SIZE": "400", "MIX": "",
    "RATIO": "0.25", "REPLAY": "166", "EPOCHS": "", "LR": "", "SAVE_STEPS": "", "RESUME": "",
    "DEEPSPEED": "", "CKPT": "", "IDENTITY_TARGET": "0.8", "SELECT_RULE": "least-loss",
    "RETENTION_TARGET": "0.9", "LEAKAGE_MAX": "0.05", "SCALES": "1,0.9,0.75", "SELECT_LAST": "0",
    "FORCE": "0", "SHARD_SIZE": "",
}
PROFILES = ("auto", "gpu", "cpu")
# xtuner 0.2.0's configs/deepspeed/*.json (a test compares with the installed package); listed
# here so that a typo is refused before pip installs DeepSpeed.
DEEPSPEED_CONFIGS = ("deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero2_offload",
                     "deepspeed_zero3", "deepspeed_zero3_offload")


class KnobError(ValueError):
    pass


def from_env(env=os.environ) -> dict:
    """Every knob's text, from the environment or its default."""
    return {knob: env.get(knob, default) for knob, default in DEFAULTS.items()}


def number(kind, knob: str, text: str):
    """A knob's value as `kind` (int or float), or an error naming the knob."""
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise KnobError(f"{knob}={text!r} is not a {'whole ' if kind is int else ''}number") from None
    if kind is float and not math.isfinite(value):
        raise KnobError(f"{knob}={text!r} is not a finite number")
    return value


def positive(kind, knob: str, text: str):
    value = number(kind, knob, text)
    if not value > 0:
        raise KnobError(f"{knob}={text} must be > 0")
    return value


def scales(text: str) -> list[float]:
    """SCALES: comma-separated adapter scales in (0, 1] that selection tries, e.g. 1,0.75,0.5."""
    values = [number(float, "SCALES", part) for part in text.split(",") if part.strip()]
    if not values or not all(0 < v <= 1 for v in values):
        raise KnobError(f"SCALES={text!r}: comma-separated numbers in (0, 1], e.g. 1,0.75,0.5")
    return values


# Zero-width joiners hold emoji sequences (👩‍💻) and Persian / Indic names together: allowed
# between two visible characters. Every other invisible character (zero-width space, bidi
# overrides that can make one name look like another, line separators) is refused.
JOINERS = "\u200c\u200d"


def check_text(knob: str, text: str) -> str:
    """Names go into JSON, a model card and a web page verbatim: any printable character is
    fine (quotes, backticks, `$`, `%s`, `{name}`, emoji, CJK); line breaks, invisible and
    direction-changing characters are not, and neither is a name that is only spaces."""
    if not text.strip():
        raise KnobError(f"{knob} is empty: say whose assistant this is, e.g. make train {knob}=小明")
    bad = sorted({f"U+{ord(ch):04X} {unicodedata.name(ch, 'control character')}"
                  for i, ch in enumerate(text) if invisible(text, i)})
    if bad:
        raise KnobError(f"{knob}={text!r} contains invisible or control characters ({', '.join(bad)}): "
                        "use printable characters on one line")
    return text.strip()


def invisible(text: str, i: int) -> bool:
    if unicodedata.category(text[i]) not in ("Cc", "Cf", "Zl", "Zp"):
        return False
    if text[i] not in JOINERS or i == 0 or i == len(text) - 1:
        return True
    return any(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")
               for ch in (text[i - 1], text[i + 1]))


def check(knobs: dict) -> dict:
    """Refuse a bad knob with a message that names it; returns the knobs unchanged."""
    check_text("NAME", knobs["NAME"])
    if knobs["AUTHOR"]:
        check_text("AUTHOR", knobs["AUTHOR"])
    if knobs["PROFILE"] not in PROFILES:
        raise KnobError(f"PROFILE={knobs['PROFILE']!r}: use one of {', '.join(PROFILES)}")
    if knobs["DEEPSPEED"] and knobs["DEEPSPEED"] not in DEEPSPEED_CONFIGS:
        raise KnobError(f"DEEPSPEED={knobs['DEEPSPEED']!r}: use one of {', '.join(DEEPSPEED_CONFIGS)} "
                        "(or leave it empty)")
    positive(int, "DATA_SIZE", knobs["DATA_SIZE"])
    ratio = number(float, "RATIO", knobs["RATIO"])
    if not 0 < ratio <= 1:
        raise KnobError(f"RATIO={knobs['RATIO']} must be in (0, 1]: the share of identity records")
    if number(int, "REPLAY", knobs["REPLAY"]) < 0:
        raise KnobError(f"REPLAY={knobs['REPLAY']} must be >= 0")
    for knob, kind in (("EPOCHS", int), ("LR", float), ("SAVE_STEPS", int)):
        if knobs[knob]:
            positive(kind, knob, knobs[knob])
    for knob in ("IDENTITY_TARGET", "RETENTION_TARGET", "LEAKAGE_MAX"):
        if not 0 <= number(float, knob, knobs[knob]) <= 1:
            raise KnobError(f"{knob}={knobs[knob]} must be in [0, 1]")
    scales(knobs["SCALES"])
    if number(int, "SELECT_LAST", knobs["SELECT_LAST"]) < 0:
        raise KnobError(f"SELECT_LAST={knobs['SELECT_LAST']} must be >= 0 (0 = every checkpoint)")
    size = re.fullmatch(r"(\d+(?:\.\d+)?)[KMG]B", knobs["SHARD_SIZE"])
    if knobs["SHARD_SIZE"] and not (size and float(size[1]) > 0):
        raise KnobError(f"SHARD_SIZE={knobs['SHARD_SIZE']!r}: a size above 0 like 300MB, 2GB or 400KB")
    if knobs["FORCE"] not in ("0", "1"):
        raise KnobError(f"FORCE={knobs['FORCE']!r}: use 1 or 0")
    return knobs


def main() -> int:
    try:
        check(from_env())
    except KnobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
