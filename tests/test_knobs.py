"""Knobs at their edges (training/knobs.py): invisible characters in names, sizes with junk after
them, adapter scales of 0 or below, and threshold knobs at their exact boundaries. Limits are
inclusive: IDENTITY_TARGET and RETENTION_TARGET are "at least", LEAKAGE_MAX is "at most", and a
score exactly at the limit passes (training/select.py)."""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from training import knobs, select


def check(**values) -> dict:
    return knobs.check({**knobs.DEFAULTS, **values})


@pytest.mark.parametrize("name, shown", [
    ("Ada\u200bLin", "U+200B ZERO WIDTH SPACE"),
    ("\u202eniL adA", "U+202E RIGHT-TO-LEFT OVERRIDE"),       # shows as "Ada Lin" reversed
    ("Ada \u2066Lin\u2069", "U+2066 LEFT-TO-RIGHT ISOLATE"),
    ("Ada\u2028Lin", "U+2028 LINE SEPARATOR"),
    ("Ada\u2029Lin", "U+2029 PARAGRAPH SEPARATOR"),
    ("\ufeffAda Lin", "U+FEFF ZERO WIDTH NO-BREAK SPACE"),
    ("Ada Lin\u200d", "U+200D ZERO WIDTH JOINER"),           # a joiner joining nothing
    ("Ada \u200d Lin", "U+200D ZERO WIDTH JOINER"),
    ("Ada\u200d\u200dLin", "U+200D ZERO WIDTH JOINER"),
    ("Ada\nLin", "U+000A"),
    ("\u200b", "U+200B"),
])
def test_names_with_invisible_or_direction_changing_characters_are_refused_by_name(name, shown):
    with pytest.raises(knobs.KnobError, match=f"NAME=.*invisible or control characters.*{re.escape(shown)}"):
        check(NAME=name)
    with pytest.raises(knobs.KnobError, match=f"AUTHOR=.*{re.escape(shown)}"):
        check(AUTHOR=name)


@pytest.mark.parametrize("name", [
    "👩\u200d💻 Ada",            # an emoji sequence held together by a zero-width joiner
    "مهدی\u200cزاده",            # a Persian name with a zero-width non-joiner
    "O'Brien \"Bob\" `id` $(x) {name} %s 小明 🤖",
])
def test_names_that_need_joiners_or_odd_printables_are_kept(name):
    assert check(NAME=name)["NAME"] == name


def test_the_knob_check_exits_2_naming_the_character():
    result = subprocess.run([sys.executable, "-m", "training.knobs"], cwd=REPO, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "NAME": "Ada\u202eLin"})
    assert result.returncode == 2 and "U+202E RIGHT-TO-LEFT OVERRIDE" in result.stderr


@pytest.mark.parametrize("size", ["300MBx", "300 MB", "300mb", "MB", "300", "-1MB", "0MB", "0.0GB", "1e3MB",
                                  "300MB\n", " 300MB"])
def test_shard_sizes_with_junk_or_nothing_in_them_are_refused(size):
    with pytest.raises(knobs.KnobError, match="SHARD_SIZE=.*like 300MB"):
        check(SHARD_SIZE=size)


@pytest.mark.parametrize("size", ["300MB", "2GB", "400KB", "1.5GB", "0.5MB"])
def test_shard_sizes_are_accepted(size):
    assert check(SHARD_SIZE=size)["SHARD_SIZE"] == size


@pytest.mark.parametrize("text", ["0", "-1", "1,0", "1,-0.5", "1.01", "nan", "inf", "", ",", "1,x"])
def test_scales_of_zero_below_or_above_one_are_refused(text):
    with pytest.raises(knobs.KnobError, match="SCALES="):
        check(SCALES=text)


def test_scales_keep_their_order_and_one_is_allowed():
    assert knobs.scales("1, 0.9,,0.75") == [1.0, 0.9, 0.75]
    assert knobs.scales("0.001") == [0.001]


@pytest.mark.parametrize("knob", ["IDENTITY_TARGET", "RETENTION_TARGET", "LEAKAGE_MAX"])
def test_threshold_knobs_accept_both_ends_and_refuse_beyond(knob):
    for edge in ("0", "1", "0.0", "1.0"):
        check(**{knob: edge})
    for beyond in ("-0.01", "1.01", "nan", "x"):
        with pytest.raises(knobs.KnobError, match=knob):
            check(**{knob: beyond})


def scores(identity=1.0, retention=1.0, leakage=0.0) -> dict:
    return {"identity": identity, "retention": retention, "leakage": leakage}


def test_a_score_exactly_at_each_limit_passes_and_one_step_beyond_fails():
    targets = select.Targets(identity=0.8, retention=0.9, leakage=0.05)
    # Shares as quality.score computes them: 32 of 40, 9 of 10, 2 of 40.
    assert targets.misses(scores(32 / 40, 9 / 10, 2 / 40)) == []
    assert [m.split()[0] for m in targets.misses(scores(31 / 40, 9 / 10, 2 / 40))] == ["identity"]
    assert [m.split()[0] for m in targets.misses(scores(32 / 40, 8 / 10, 2 / 40))] == ["retention"]
    assert [m.split()[0] for m in targets.misses(scores(32 / 40, 9 / 10, 3 / 40))] == ["leakage"]


def test_leakage_max_zero_allows_no_leak_at_all():
    targets = select.Targets(identity=0, retention=0, leakage=0)
    assert targets.misses(scores(leakage=0.0)) == []
    assert targets.misses(scores(leakage=1 / 40)) and "LEAKAGE" not in targets.misses(scores(leakage=1 / 40))[0]
    assert "leakage 0.03 > 0" in targets.misses(scores(leakage=1 / 40))[0]


def test_select_last_and_thresholds_refuse_negatives():
    with pytest.raises(knobs.KnobError, match="SELECT_LAST=-1 must be >= 0"):
        check(SELECT_LAST="-1")
    with pytest.raises(knobs.KnobError, match="SELECT_LAST"):
        check(SELECT_LAST="2.5")


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "1e999"])
def test_learning_rates_that_are_not_finite_are_refused(value):
    with pytest.raises(knobs.KnobError, match="LR=.*finite"):
        check(LR=value)
