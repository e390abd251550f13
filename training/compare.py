"""`make compare`: the base model and the tuned model (RUN/merged) answer the same prompts, side
by side, greedy, through chat/ as the app serves them. By default the prompts are the ACCEPTANCE
set (never used to choose a checkpoint), and the three scores are printed for both models;
PROMPTS=file asks your own prompts instead (one per line). Then the public benchmarks of `make
eval` (BENCHMARKS, EVAL_SIZE), from RUN/eval.json when it scored the merged model as it is now.

    make compare                      # RUN=runs/assistant
    make compare PROMPTS=my-questions.txt
"""
import argparse
import json
import os
import sys
from pathlib import Path

from training import eval as evaluation
from training import quality
from training.atomic import write_text_atomic


def read_prompts(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"PROMPTS={path}: no such file (one prompt per line)")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"PROMPTS={path} has no prompts (one per line)")
    return prompts


def answers(model_dir: str, prompts: list[str] | None, base: bool = False) -> tuple[list[str], dict | None, dict | None]:
    """(answers to the prompts, probe answers, what the model knows); the probe set by default,
    for the base model from the base-answer cache."""
    from chat.loading import load_model
    if base and not prompts:
        probe = quality.base_probe_answers(model_dir, quality.ACCEPTANCE)
    else:
        loaded = load_model(model_dir)
        if prompts:
            return [a.text for a in quality.ask(loaded, prompts, quality.SHORT_TOKENS * 2)], None, None
        probe = quality.answer_probes(loaded, quality.ACCEPTANCE)
    texts = [a.text for key in ("identity", "facts_en", "facts_zh", "open") for a in probe[key]]
    return texts, probe, quality.known(quality.ACCEPTANCE, probe)


def side_by_side(prompts: list[str], base: list[str], tuned: list[str]) -> str:
    one_line = lambda text: " ".join(text.split()) or "(empty)"  # noqa: E731
    return "\n".join(f"Q: {p}\n  base : {one_line(b)}\n  tuned: {one_line(t)}\n"
                     for p, b, t in zip(prompts, base, tuned))


def run(run_dir: Path, prompts_file: str = "", bench_knobs: tuple | None = None) -> str:
    info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    merged = run_dir / "merged"
    if not (merged / "config.json").is_file():
        raise ValueError(f"no merged model in {merged}: run `make train` first")
    prompts = read_prompts(prompts_file) if prompts_file else None
    base, base_probe, base_known = answers(info["base_model"], prompts, base=True)
    tuned, tuned_probe, _ = answers(str(merged), prompts)
    shown = prompts or quality.ACCEPTANCE.texts()
    text = side_by_side(shown, base, tuned)
    if base_probe:
        name = info["name"]
        rows = [("base", quality.score(quality.ACCEPTANCE, base_probe, name, base_known)),
                ("tuned", quality.score(quality.ACCEPTANCE, tuned_probe, name, base_known))]
        text += "\nAcceptance set (never used for selection):\n" + "\n".join(
            f"  {label:<5}  identity {s['identity']:.2f}  retention {s['retention']:.2f} "
            f"(zh {s['retention_zh']:.2f})  leakage {s['leakage']:.2f}" for label, s in rows) + "\n"
    if bench_knobs:
        result = evaluation.current(run_dir, *bench_knobs[:2]) or evaluation.report(run_dir, str(merged), *bench_knobs)
        text += f"\nPublic benchmarks ({run_dir / 'eval.json'}, {run_dir / 'eval.png'}):\n"
        text += evaluation.table(result["benchmarks"]) + "\n"
    write_text_atomic(run_dir / "compare.txt", text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=os.environ.get("RUN", "runs/assistant"))
    parser.add_argument("--prompts", default=os.environ.get("PROMPTS", ""))
    evaluation.arguments(parser)
    args = parser.parse_args(argv)
    try:
        print(run(Path(args.run), args.prompts, evaluation.knob_values(args)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"(also in {Path(args.run) / 'compare.txt'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
