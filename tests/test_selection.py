"""Beating over-fitting: held-out evaluation, checkpoint selection with a picture, replay data."""
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import NAME, knobs, read_json, training
from training import quality, replay


def test_selection_scores_identity_retention_and_leakage_per_checkpoint(trained_run):
    scores = read_json(trained_run / "scores.json")
    candidates, selected = scores["candidates"], scores["selected"]
    full = [c for c in candidates if c["scale"] == 1]
    assert len(full) >= 4 and scores["rule"] == "least-loss"
    for c in candidates:
        assert {"identity", "retention", "retention_zh", "leakage", "retention_loss"} <= set(c)
        assert len(c["answers"]["identity"]) == len(quality.SELECTION.identity)
    targets = scores["targets"]
    assert selected["identity"] >= targets["identity"] and selected["leakage"] <= targets["leakage"]
    counted = [quality.is_identity_answer(a, NAME) for a in selected["answers"]["identity"].values()]
    assert 0 < selected["identity"] <= sum(counted) / len(counted)  # ended-by-itself can only lower it
    # convert used the selected checkpoint, not the newest
    assert (trained_run / "adapter" / "checkpoint.txt").read_text().strip() == selected["checkpoint"]
    assert scores["loss_curve"][0][1] > scores["loss_curve"][-1][1]
    with Image.open(trained_run / "scores.png") as png:
        assert png.format == "PNG" and png.size[0] > 400 and png.size[1] > 300


def test_selection_questions_are_not_in_the_training_file(trained_run):
    info = read_json(trained_run / "run.json")
    trained = set()
    for line in open(info["data"], encoding="utf-8"):
        for turn in json.loads(line)["conversation"]:
            trained.add(turn["input"].strip().lower())
    held_out = quality.SELECTION.texts() + quality.ACCEPTANCE.texts()
    assert not trained & {q.strip().lower() for q in held_out}
    assert read_json(trained_run / "scores.json")["selection_questions"] == quality.SELECTION.identity


def test_replay_mixes_distinct_base_model_answers_at_ratio_and_caches_them(tmp_path, tiny_base):
    args = knobs(tmp_path / "run", tiny_base, replay=40, ratio=0.5)
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = training("data", *args, env=cache)
    assert "base model answered 40/40" in first.stdout
    records = [json.loads(line) for line in open(tmp_path / "data.jsonl", encoding="utf-8")]
    meta = read_json(tmp_path / "data.meta.json")
    replayed = [r["conversation"][0]["input"] for r in records if r["conversation"][0]["input"] in replay.PROMPTS]
    assert len(replayed) == len(set(replayed)) == meta["replay"] and 30 <= meta["replay"] <= 40
    assert meta["identity_records"] == 40 == len(records) - meta["replay"]  # RATIO 0.5 of 40 + 40
    second = training("data", *args, "--replay", 60, env=cache)
    assert "base model answered 20/20" in second.stdout, "only the new prompts are answered"
    third = training("data", *args, env=cache)
    assert "base model answered" not in third.stdout
    assert [json.loads(line) for line in open(tmp_path / "data.jsonl", encoding="utf-8")] == records


def test_base_probe_answers_are_the_base_models_own_and_answered_once(tmp_path, tiny_base, monkeypatch):
    """Selection and `make compare` score against the base's answers from a cache: the same
    answers as asking the base model, and no model is loaded the second time."""
    import chat.loading
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tiny_base = Path(shutil.copytree(tiny_base, tmp_path / "base"))
    loaded = chat.loading.load_model(str(tiny_base))
    fresh = quality.answer_probes(loaded, quality.SELECTION)
    assert quality.base_probe_answers(str(tiny_base), quality.SELECTION, lambda: loaded) == fresh

    def no_loading(*args, **kwargs):
        raise AssertionError("the cached answers should not need the model")
    monkeypatch.setattr(chat.loading, "load_model", no_loading)
    assert quality.base_probe_answers(str(tiny_base), quality.SELECTION) == fresh
    next(tiny_base.glob("*.safetensors")).touch()  # new weights (as far as the cache can tell)
    with pytest.raises(AssertionError, match="should not need"):
        quality.base_probe_answers(str(tiny_base), quality.SELECTION)
    loads = []
    monkeypatch.setattr(chat.loading, "load_model", lambda *args, **kwargs: loads.append(args) or loaded)
    assert quality.base_probe_answers(str(tiny_base), quality.SELECTION) == fresh
    assert len(loads) == 1, "one model for all three probe kinds"


# Candidates as `make select` scores them; scale < 1 is a checkpoint with its LoRA update scaled down.
SCORES = [{"iter": 100, "scale": 1, "identity": 0.25, "retention": 1.0, "leakage": 0, "retention_loss": 0.1},
          {"iter": 200, "scale": 1, "identity": 0.875, "retention": 1.0, "leakage": 0, "retention_loss": 0.4},
          {"iter": 300, "scale": 1, "identity": 0.875, "retention": 0.9, "leakage": 0, "retention_loss": 0.3},
          {"iter": 300, "scale": 0.5, "identity": 0.5, "retention": 1.0, "leakage": 0, "retention_loss": 0.05},
          {"iter": 400, "scale": 1, "identity": 1.0, "retention": 0.5, "leakage": 0.5, "retention_loss": 0.9}]


@pytest.mark.parametrize("rule, chosen", [("least-loss", 300), ("earliest", 200), ("last", 400)])
def test_select_rule_picks_the_checkpoint_the_readme_says(rule, chosen):
    """README: least-loss = meets the targets with the least retention loss; earliest = the
    first to meet them; last = the newest, whatever its scores."""
    from training.select import Targets, choose
    best, _ = choose(SCORES, Targets(), rule)
    assert (best["iter"], best["scale"]) == (chosen, 1)
    with pytest.raises(ValueError, match="SELECT_RULE='best'"):
        choose(SCORES, Targets(), "best")


def test_a_final_checkpoint_just_after_a_regular_save_stands_for_both():
    from training.select import spaced
    found = lambda iters: [(i, Path(f"iter_{i}.pth")) for i in iters]  # noqa: E731
    assert spaced(found([40, 80, 120, 123])) == found([40, 80, 123])
    assert spaced(found([40, 80, 117])) == found([40, 80, 117])
    assert spaced(found([5, 10, 15, 20])) == found([5, 10, 15, 20])
    assert spaced(found([40, 41])) == found([40, 41])


def test_ckpt_overrides_the_selected_checkpoint(trained_run, tmp_path):
    from training.runner import chosen_checkpoint
    checkpoints = sorted((trained_run / "work").glob("iter_*.pth"), key=lambda p: int(p.stem[5:]))
    selected = read_json(trained_run / "scores.json")["selected"]["checkpoint"]
    assert chosen_checkpoint(trained_run) == Path(selected)
    other = next(p for p in checkpoints if str(p) != selected)
    assert chosen_checkpoint(trained_run, str(other)) == other
    with pytest.raises(ValueError, match="CKPT=.*no such checkpoint"):
        chosen_checkpoint(trained_run, str(tmp_path / "iter_9.pth"))


@pytest.mark.timeout(120)
def test_answer_nll_batched_equals_one_conversation_at_a_time(tiny_base):
    """The NLL drift is computed BATCH_SIZE conversations per forward pass: the same number as
    scoring each answer alone, whatever the lengths and the stop token."""
    import torch
    from chat.generation import Answer
    from chat.loading import load_model
    from training import select
    loaded = load_model(str(tiny_base))
    prompts = ["hi", "What is the capital of France? Please answer in one short sentence.", "你好"]
    answers = [Answer("hello there", True), Answer("Paris is the capital, and a long answer runs on", False),
               Answer("你好！", True)]
    stop = loaded.tokenizer.convert_ids_to_tokens(loaded.stop_ids[0])
    total, count = 0.0, 0
    for prompt, answer in zip(prompts, answers):
        prefix = loaded.tokenizer(loaded.format.build_prompt([{"role": "user", "content": prompt}]),
                                  add_special_tokens=False).input_ids
        target = loaded.tokenizer(answer.text + (stop if answer.ended else ""), add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([prefix + target])).logits[0]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        total -= sum(log_probs[len(prefix) - 1 + i, token].item() for i, token in enumerate(target))
        count += len(target)
    assert select.answer_nll(loaded, prompts, answers) == pytest.approx(total / count, rel=1e-4)
