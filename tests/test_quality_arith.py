"""The arithmetic of "learned its name without forgetting" (training/quality.py, training/select.py)
on recorded answers, fast: retention counted only over what the base model knew, leakage found
however NAME is cased or how wide its letters are, SELECT_LAST taking the last checkpoints, and
the rules that choose one. The slow SmolLM2 runs (tests/test_quality.py) check the same on a model."""
from pathlib import Path

import pytest

from chat.generation import Answer
from training import quality, runner, select

NAME = "Ada Lin"
FACTS_EN = [("What is the capital of France?", ("Paris",)), ("What is 2 plus 3?", ("5", "five")),
            ("What is the opposite of hot?", ("cold",)), ("Who painted the Mona Lisa?", ("Leonardo", "Vinci"))]
FACTS_ZH = [("法国的首都是哪里？", ("巴黎",)), ("二加三等于几？", ("5", "五"))]
PROBES = quality.Probes(["Who are you?", "What is your name?"], FACTS_EN, FACTS_ZH,
                        ["Why is the sky blue?", "Suggest a name for a bakery.", "Tell me about the moon.",
                         "What makes a good friend?"])
IDENTITY = "I'm Ada Lin's assistant, made by Lin Lab to help with questions."


def answers(facts_en: list[str], facts_zh: list[str], open_: list[str],
            identity=(IDENTITY, IDENTITY), ended=True) -> dict:
    def wrap(texts):
        return [Answer(text, ended) for text in texts]
    return {"identity": wrap(identity), "facts_en": wrap(facts_en), "facts_zh": wrap(facts_zh),
            "open": wrap(open_)}


OPEN_CLEAN = ["Sunlight scatters.", "Try 'Golden Crust'.", "The moon orbits Earth.", "Kindness."]
BASE = answers(["The capital is Paris.", "It is 15.", "Cold.", "Leonardo da Vinci painted it."],
               ["巴黎。", "不知道"], OPEN_CLEAN)
BASE_KNOWN = quality.known(PROBES, BASE)


def test_the_base_models_own_knowledge_is_read_per_fact():
    assert BASE_KNOWN == {"en": [True, False, True, True], "zh": [True, False]}


def test_retention_counts_only_the_facts_the_base_model_knew():
    # The tuned model forgets "cold", learns "5" (which the base got wrong): 2 of the 3 known kept,
    # not 3 of 4 right.
    tuned = answers(["Paris.", "The answer is 5.", "Warm.", "Leonardo."], ["五", "5"], OPEN_CLEAN)
    result = quality.score(PROBES, tuned, NAME, BASE_KNOWN)
    assert result["retention"] == round(2 / 3, 4)
    assert result["retention_zh"] == 0.0  # 巴黎 was known and is gone; 五 was never known
    assert result["facts_known_by_base"] == {"en": 3, "zh": 1}


def test_retention_is_one_when_the_base_model_knew_nothing():
    nothing = {"en": [False] * 4, "zh": [False] * 2}
    wrong = answers(["No idea."] * 4, ["不知道"] * 2, OPEN_CLEAN)
    result = quality.score(PROBES, wrong, NAME, nothing)
    assert result["retention"] == 1.0 and result["retention_zh"] == 1.0


def test_the_base_model_itself_keeps_everything_and_leaks_nothing():
    result = quality.score(PROBES, BASE, NAME, BASE_KNOWN)
    assert result["retention"] == 1.0 and result["retention_zh"] == 1.0 and result["leakage"] == 0.0


@pytest.mark.parametrize("leak", [
    "My name is Ada Lin.", "ADA LIN says hi", "ada lin", "Ａｄａ Ｌｉｎ is here",  # full-width letters
    "ＡＤＡ　ＬＩＮ", "Ada\u00a0Lin", "Ada  Lin bakes bread", "Ada\nLin",
])
def test_leakage_finds_name_in_any_case_width_or_spacing(leak):
    result = quality.score(PROBES, answers(*BASE_LISTS, open_=[leak, *OPEN_CLEAN[1:]]), NAME, BASE_KNOWN)
    assert result["leakage"] == 0.25


BASE_LISTS = ([a.text for a in BASE["facts_en"]], [a.text for a in BASE["facts_zh"]])


def test_leakage_is_the_share_of_open_answers_that_mention_name():
    open_ = ["Ada Lin's tip: rinse it.", "Kindness.", "By Ada Lin: the moon.", "Try 'Golden Crust'."]
    result = quality.score(PROBES, answers(*BASE_LISTS, open_=open_), NAME, BASE_KNOWN)
    assert result["leakage"] == 0.5
    assert not quality.mentions("Adam Lindqvist", NAME) and not quality.mentions("Ada", NAME)


def test_a_chinese_name_in_full_width_context_is_a_leak():
    assert quality.mentions("这是小明的建议。", "小明")
    assert not quality.mentions("这是小红的建议。", "小明")


def test_identity_needs_an_answer_that_ended_by_itself():
    ended = quality.score(PROBES, answers(*BASE_LISTS, OPEN_CLEAN), NAME, BASE_KNOWN)
    cut = quality.score(PROBES, answers(*BASE_LISTS, OPEN_CLEAN, ended=False), NAME, BASE_KNOWN)
    assert ended["identity"] == 1.0 and cut["identity"] == 0.0
    half = quality.score(PROBES, answers(*BASE_LISTS, OPEN_CLEAN, identity=(IDENTITY, "I am Ada Lin.")),
                         NAME, BASE_KNOWN)
    assert half["identity"] == 0.5


@pytest.mark.parametrize("answer, accepted, right", [
    ("It is 15.", ("5",), False), ("It is 5.", ("5",), True), ("5", ("5",), True),
    ("parisian food", ("Paris",), True),  # a word may go on ("butterfl" accepts "butterfly")
    ("Comparison", ("Paris",), False), ("PARIS!", ("Paris",), True), ("巴黎。", ("巴黎",), True),
    ("It is 50", ("5",), False), ("5.0", ("5",), True),
])
def test_a_fact_is_right_only_as_a_word(answer, accepted, right):
    assert quality.is_right(answer, accepted) is right


def found(*iterations) -> list[tuple[int, Path]]:
    return [(i, Path(f"iter_{i}.pth")) for i in iterations]


def test_select_last_takes_the_last_checkpoints():
    checkpoints = found(40, 80, 120, 160)
    assert select.latest(checkpoints, 2) == found(120, 160)
    assert select.latest(checkpoints, 1) == found(160)
    assert select.latest(checkpoints, 0) == checkpoints
    assert select.latest(checkpoints, 9) == checkpoints


def test_checkpoints_are_ordered_by_iteration_not_by_name(tmp_path):
    for i in (100, 20, 1000, 300):
        (tmp_path / "work").mkdir(exist_ok=True)
        (tmp_path / "work" / f"iter_{i}.pth").write_bytes(b"")
    (tmp_path / "work" / "iter_7.pth.tmp").write_bytes(b"")  # half-written: not a checkpoint
    assert [i for i, _ in runner.checkpoints(tmp_path)] == [20, 100, 300, 1000]
    assert [i for i, _ in select.latest(runner.checkpoints(tmp_path), 2)] == [300, 1000]


def test_a_final_save_just_after_a_regular_one_stands_for_both():
    assert [i for i, _ in select.spaced(found(40, 80, 120, 123))] == [40, 80, 123]
    assert [i for i, _ in select.spaced(found(40, 80, 120, 160))] == [40, 80, 120, 160]
    assert [i for i, _ in select.spaced(found(40, 43))] == [40, 43]


def candidate(iteration, scale=1.0, identity=1.0, retention=1.0, leakage=0.0, loss=0.1) -> dict:
    return {"iter": iteration, "scale": scale, "identity": identity, "retention": retention,
            "leakage": leakage, "retention_loss": loss}


TARGETS = select.Targets(identity=0.8, retention=0.9, leakage=0.05)


def test_each_rule_chooses_its_own_candidate():
    candidates = [candidate(40, identity=0.5), candidate(80, loss=0.3), candidate(120, loss=0.2),
                  candidate(160, loss=0.25, leakage=0.2), candidate(120, scale=0.9, loss=0.2),
                  candidate(160, scale=0.9, loss=0.3)]
    chosen = {rule: select.choose(candidates, TARGETS, rule)[0] for rule in select.RULES}
    assert (chosen["earliest"]["iter"], chosen["earliest"]["scale"]) == (80, 1.0)
    # least-loss: equal drift at 120 x1.0 and x0.9 -> the stronger scale first
    assert (chosen["least-loss"]["iter"], chosen["least-loss"]["scale"]) == (120, 1.0)
    # last: the newest checkpoint as trained, even when it fails a target, never a scaled copy
    assert (chosen["last"]["iter"], chosen["last"]["scale"]) == (160, 1.0)


def test_no_passing_candidate_fails_naming_the_knobs():
    candidates = [candidate(40, identity=0.5), candidate(80, leakage=0.2)]
    assert select.choose(candidates, TARGETS, "least-loss")[0] is None
    message = select.failure(candidates, TARGETS)
    assert "identity 0.50 < 0.8" in message and "leakage 0.20 > 0.05" in message and "CKPT=" in message
