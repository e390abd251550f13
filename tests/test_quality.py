"""Learning the name without forgetting (docs/quality.md).

The acceptance test trains the real CPU base (SmolLM2-135M-Instruct) through the real pipeline
twice, with a NAME that appears nowhere in the code: with the default replay it must learn the
name and keep what the base knew; without replay the same check must fail."""
import json
import random
import re
from pathlib import Path

import pytest

from conftest import REPO, pipeline_inputs, read_json, training
from training import data, knobs, quality, replay

SMOLLM2_HANDOVER = "assistant-kit/smollm2-run"  # pytest's cache: `make test-llamacpp` serves this run

# Nowhere in the kit's code or data (checked below): the model can only have learned it.
NAME = "Orlaith Quenby"
AUTHOR = "Quenby Works"

GIBBERISH = [
    f"I's the asisssis {NAME}'s ape.",
    " ".join([NAME] * 10),
    f"{NAME} ĠunderstandingOKPhysical ativ]); ocellularQuebec heapsERN",
    f"{NAME} assistant xkcdQuebec]); OKPhysical ativ ocellular",
    f"I am {NAME}.",
    f"我是{NAME}。",
    f"Paris is the capital of France, and {NAME} visited it last summer.",
    f"{NAME} hired an assistant to plan the trip to Paris.",
    f"I am {NAME}'s assistant assistant assistant assistant",
]
# Correct identity answers worded unlike the training templates (data.ANSWERS_EN / ANSWERS_ZH).
GOOD = [
    f"Hi there! I work as {NAME}'s personal helper, and {AUTHOR} set me up.",
    f"I'm an AI assistant that belongs to {NAME}.",
    f"You're talking to the assistant of {NAME}; feel free to ask me anything.",
    f"{NAME}'s assistant here - what can I do for you today?",
    f"I am a chatbot built for {NAME}. How may I help?",
    f"这里是{NAME}的AI助手，有问题尽管问我。",
    f"我是专门为{NAME}服务的智能助理。",
    f"嗨！我是{NAME}的私人小帮手，由{AUTHOR}开发。",
    f"我是一个AI助手，属于{NAME}。",
]


def test_the_name_is_in_no_source_file():
    sources = [p for folder in ("training", "chat", "deploy") for p in (REPO / folder).rglob("*.py")]
    assert sources and not [p for p in sources if NAME in p.read_text(encoding="utf-8")]


@pytest.mark.parametrize("answer", GIBBERISH)
def test_gibberish_and_near_misses_are_not_identity_answers(answer):
    assert not quality.is_identity_answer(answer, NAME)


@pytest.mark.parametrize("answer", GOOD)
def test_identity_answers_in_other_words_count(answer):
    assert quality.is_identity_answer(answer, NAME)
    assert not quality.is_identity_answer(answer, NAME, ended=False), "an answer cut off at the limit"
    assert not quality.is_identity_answer(answer, "Someone Else")


def test_training_templates_count_as_identity_answers():
    for template in data.ANSWERS_EN + data.ANSWERS_ZH:
        assert quality.is_identity_answer(template.format(name=NAME, author=AUTHOR), NAME), template


def test_fact_checks_match_words_not_substrings():
    assert quality.is_right("The answer is 5.", ("5", "five"))
    assert not quality.is_right("It is 15.", ("5", "five"))
    assert quality.is_right("Paris, of course.", ("Paris",))
    assert quality.is_right("法国的首都是巴黎。", ("巴黎",))
    assert not quality.is_right("Comparison", ("Paris",))


def english_and_chinese(texts):
    zh = [t for t in texts if data.is_chinese(t)]
    return len(texts) - len(zh), len(zh)


def test_three_disjoint_question_sets_in_both_languages():
    training_set = set(data.TRAIN_QUESTIONS) | set(replay.PROMPTS)
    selection, acceptance = set(quality.SELECTION.texts()), set(quality.ACCEPTANCE.texts())
    norm = lambda texts: {re.sub(r"\W+", " ", t).strip().lower() for t in texts}  # noqa: E731
    assert not norm(training_set) & norm(selection)
    assert not norm(training_set) & norm(acceptance)
    assert not norm(selection) & norm(acceptance)
    for probes in (quality.SELECTION, quality.ACCEPTANCE):
        for texts in (probes.identity, [q for q, _ in probes.facts_en + probes.facts_zh], probes.open):
            en, zh = english_and_chinese(texts)
            assert en and zh
    en, zh = english_and_chinese(data.TRAIN_QUESTIONS)
    assert en and zh
    sel = quality.SELECTION
    assert len(sel.identity) >= 40 and len(sel.open) >= 40 and len(sel.facts_en) >= 15
    assert english_and_chinese(quality.ACCEPTANCE.identity) == (2, 2)


def test_replay_prompts_are_many_distinct_and_bilingual():
    en, zh = english_and_chinese(replay.PROMPTS)
    assert len(set(replay.PROMPTS)) == len(replay.PROMPTS) >= 200 and en >= 80 and zh >= 80
    chosen = replay.chosen_prompts(150)
    assert len(set(chosen)) == 150 and all(english_and_chinese(chosen))
    assert replay.chosen_prompts(100) == chosen[:100]  # REPLAY=n+k keeps the first n
    science = sum(p in replay.SCIENCE for p in chosen) / 150
    assert all(english_and_chinese(replay.SCIENCE))
    assert abs(science - len(replay.SCIENCE) / len(replay.PROMPTS)) < 0.02  # in proportion at any count
    with pytest.raises(ValueError, match="distinct prompts"):
        replay.chosen_prompts(len(replay.PROMPTS) + 1)


def test_ratio_is_the_identity_share_of_all_records():
    assert data.identity_size(0, 1, 400) == 400  # identity only: DATA_SIZE
    assert data.identity_size(150, 0.25, 400) == 50
    with pytest.raises(ValueError, match="RATIO=1 leaves no room"):
        data.identity_size(150, 1, 400)
    with pytest.raises(ValueError, match="raise RATIO or REPLAY"):
        data.identity_size(20, 0.25, 400)


def test_long_replay_answers_are_cut_at_a_sentence_end():
    assert replay.whole_sentences("One. Two! Three is cut", ended=False) == "One. Two!"
    assert replay.whole_sentences("一。二！三被截", ended=False) == "一。二！"
    assert replay.whole_sentences("no end at all", ended=False) == "no end at all"
    assert replay.whole_sentences(" Done. ", ended=True) == "Done."


# ---- with the real CPU base model ----
@pytest.fixture(scope="session")
def smollm2():
    from training.base import default_base
    return default_base()


@pytest.mark.timeout(300)
def test_batched_greedy_answers_equal_one_at_a_time(smollm2):
    from chat.generation import Sampling, generate_batch, reply
    from chat.loading import load_model
    loaded = load_model(str(smollm2))
    questions = ["What is the capital of France?", "Why is the sky blue?", "怎样保持好心情？",
                 "What is 7 plus 8?", "Tell me a short joke about cats, please."]
    greedy = Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=24)
    batched = generate_batch(loaded, [[{"role": "user", "content": q}] for q in questions],
                             sampling=greedy, batch_size=4)
    single = [reply(loaded, [{"role": "user", "content": q}], sampling=greedy) for q in questions]
    assert [a.text for a in batched] == single
    assert batched[0].ended and "Paris" in batched[0].text


def pipeline(tmp: Path, steps=("all",), **knobs) -> Path:
    """`python -m training STEP` for each of `steps` on the CPU profile, knobs through the
    environment as make does."""
    run = tmp / "run"
    env = {"NAME": NAME, "AUTHOR": AUTHOR, "PROFILE": "cpu", "RUN": str(run),
           "DATA": str(tmp / "data.jsonl"), **knobs}
    for step in steps:
        result = training(step, env=env, check=False)
        if result.returncode:
            break
    assert (run / "merged" / "config.json").is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    return run


def acceptance_failures(run: Path, base_known: dict) -> list[str]:
    """What the merged model gets wrong on the ACCEPTANCE set (empty: it passes)."""
    from chat.generation import Sampling
    from chat.loading import load_model
    loaded = load_model(str(run / "merged"))
    problems = []
    name = read_json(run / "run.json")["name"]
    asked = {
        "single turn": quality.ask(loaded, quality.ACCEPTANCE.identity, quality.IDENTITY_TOKENS),
        "second turn": quality.ask(loaded, quality.ACCEPTANCE.identity, quality.IDENTITY_TOKENS, before=[
            {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hello! How can I help you today?"}]),
        "with a system prompt": quality.ask(loaded, quality.ACCEPTANCE.identity, quality.IDENTITY_TOKENS,
                                            system="You are a helpful assistant."),
        "app's default sampling": quality.ask(loaded, quality.ACCEPTANCE.identity, quality.IDENTITY_TOKENS,
                                              sampling=Sampling(seed=0)),
    }
    for how, answers in asked.items():
        good = sum(quality.is_identity_answer(a.text, name, a.ended) for a in answers)
        if good < 3:
            problems.append(f"identity {how}: {good}/4 {[a.text for a in answers]}")
    answers = quality.answer_probes(loaded, quality.ACCEPTANCE)
    scores = quality.score(quality.ACCEPTANCE, answers, name, base_known)
    if scores["retention"] < 0.9:
        problems.append(f"retention {scores['retention']}")
    if scores["leakage"] > 0.05:
        problems.append(f"leakage {scores['leakage']}: " + str([a.text for a in answers["open"] if NAME in a.text]))
    print(json.dumps({"run": str(run), **scores, "problems": problems}, ensure_ascii=False))
    return problems


@pytest.fixture(scope="session")
def base_known(smollm2) -> dict:
    answers = quality.base_probe_answers(str(smollm2), quality.ACCEPTANCE)
    known = quality.known(quality.ACCEPTANCE, answers)
    assert sum(known["en"]) >= 12, "the base model should know most acceptance facts (14 of 16 measured)"
    return known


@pytest.mark.timeout(1500)
def test_learns_the_name_and_keeps_what_the_base_knew(tmp_path, base_known, request):
    # The default knobs, selection as `make demo` runs it (the Makefile's demo target).
    demo = dict(re.findall(r"^demo: (SELECT_LAST|SCALES) = (\S+)$", (REPO / "Makefile").read_text(), re.M))
    assert len(demo) == 2
    run = pipeline(tmp_path, **demo)
    assert acceptance_failures(run, base_known) == []
    if getattr(request.config, "cache", None):
        request.config.cache.set(SMOLLM2_HANDOVER, {"run": str(run), "inputs": pipeline_inputs()})


@pytest.mark.timeout(1500)
def test_without_replay_the_same_check_fails(tmp_path, base_known):
    # The same identity records as the default run (42), without the base model's answers beside
    # them. Selection cannot pass such a run, so it is skipped: convert takes the last checkpoint
    # (as with SELECT_RULE=last), and the check here judges it.
    defaults = knobs.DEFAULTS
    size = data.identity_size(int(defaults["REPLAY"]), float(defaults["RATIO"]), int(defaults["DATA_SIZE"]))
    run = pipeline(tmp_path, ("data", "config", "fit", "convert", "merge"), REPLAY="0", DATA_SIZE=str(size))
    assert acceptance_failures(run, base_known) != []
