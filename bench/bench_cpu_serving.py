"""CPU serving backends side by side, in one run on the real small model (SmolLM2-135M):
transformers in the app's own process, vLLM's CPU build, llama.cpp on f16, q8_0 and q4_0 GGUFs
(`make gguf`, `make serve-engine SERVE_ENGINE=llamacpp`). Tokens/s and first-token latency at 1
and 4 users through the same OpenAI streaming client, peak resident memory of each server, and
whether each backend gives transformers' greedy answer to the identity question.

    python -m bench.bench_cpu_serving [RUN]   (RUN/merged; default: the SmolLM2 base, `make base`)

Speed is measured on an endless copy (bench_engine.endless_copy), so every answer is exactly
MAX_TOKENS long; the identity answer on the model itself."""
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.bench_engine import (MAX_TOKENS, REPO, endless_copy, group_rss_mb, levels,
                                openai_ask, rss_mb)
from engine_server import EngineServer  # bench_engine put tests/ on the path
from app_server import AppServer  # noqa: E402

USERS = (1, 4)
QUANTS = ("f16", "q8_0", "q4_0")
IDENTITY = "Who are you?"
IDENTITY_TOKENS = 48
GOAL = 2.0  # llama.cpp q8_0 vs transformers, single user


def gguf(run: Path, quant: str) -> None:
    result = subprocess.run(["make", "--no-print-directory", "gguf", f"RUN={run}", f"QUANT={quant}"],
                            cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"make gguf failed:\n{result.stderr[-3000:]}")


def run_dir(merged: Path, out: Path) -> Path:
    """A run directory of the bench's own whose merged/ links `merged`."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "merged").exists():
        (out / "merged").symlink_to(merged.resolve())
    return out


def identity_answer(base_url: str, model: str) -> str:
    from openai import OpenAI
    return OpenAI(base_url=base_url, api_key="none", timeout=600).chat.completions.create(
        model=model, messages=[{"role": "user", "content": IDENTITY}], temperature=0,
        max_tokens=IDENTITY_TOKENS).choices[0].message.content


def main() -> None:
    # The in-process app gets the same 2 threads llama.cpp and vLLM use on this CPU.
    threads = str(min(os.cpu_count() or 1, 2))
    source = Path(sys.argv[1]) / "merged" if len(sys.argv) > 1 else None
    if source is None:
        from training.base import default_base
        source = Path(default_base())
    work = REPO / "runs" / "bench" / f"cpu-serving-{source.resolve().name}"
    model_run = run_dir(source, work / "model")
    endless_run = run_dir(endless_copy(source, work / "endless-merged"), work / "endless")
    for run in (model_run, endless_run):
        for quant in QUANTS:
            gguf(run, quant)
    print(f"model: {source} ({MAX_TOKENS} tokens per answer, users {USERS})", flush=True)
    results, memory, answers = {}, {}, {}

    with AppServer({"MODEL_ID": str(source), "SERVED_MODEL_NAME": "bench"}) as app:
        answers["transformers"] = identity_answer(app.url + "v1", "bench")
    with AppServer({"MODEL_ID": str(endless_run / "merged"), "CONCURRENCY": str(max(USERS)),
                    "SERVED_MODEL_NAME": "bench", "OMP_NUM_THREADS": threads}) as app:
        results["transformers (in the app)"] = levels(openai_ask(app.url + "v1", "bench"), USERS)
        memory["transformers (in the app)"] = rss_mb(app.process.pid, "VmHWM")
    print("transformers done", flush=True)

    engines = [("vLLM CPU", {"SERVE_ENGINE": "vllm"}),
               *((f"llama.cpp {quant}", {"SERVE_ENGINE": "llamacpp", "QUANT": quant}) for quant in QUANTS)]
    for label, env in engines:
        with EngineServer(model_run / "merged", env=env) as engine:
            answers[label] = identity_answer(engine.v1, "assistant")
        with EngineServer(endless_run / "merged", env=env) as engine:
            results[label] = levels(openai_ask(engine.v1, "assistant"), USERS)
            memory[label] = group_rss_mb(engine.process.pid, "VmHWM")
        print(f"{label} done (started in {engine.start_s:.0f} s)", flush=True)
    run_json = source.parent / "run.json"  # a trained run's NAME; none for the base
    name = json.loads(run_json.read_text())["name"] if run_json.is_file() else None
    report(results, memory, answers, name)


def same_answer(answer: str, reference: str, name: str | None) -> str:
    """'yes' word for word; 'through NAME' when the two part only after the name."""
    if answer == reference:
        return "yes"
    if name and name in os.path.commonprefix([answer, reference]):
        return "through the name"
    return "no"


def report(results: dict, memory: dict, answers: dict, name: str | None) -> None:
    print("\n| backend | 1 user tok/s | first token (1 user) | 4 users tok/s | first token p95 (4) "
          "| peak RSS | identity answer = transformers' |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, by_users in results.items():
        print(f"| {label} | {by_users[1]['tok_s']:.1f} | {by_users[1]['p50'] * 1000:.0f} ms | "
              f"{by_users[4]['tok_s']:.1f} | {by_users[4]['p95'] * 1000:.0f} ms | "
              f"{memory[label]:.0f} MB | {same_answer(answers[label.split(' (')[0]], answers['transformers'], name)} |")
    print("\nidentity answers (greedy):")
    for label, text in answers.items():
        print(f"  {label}: {text!r}")
    base = results["transformers (in the app)"][1]["tok_s"]
    print("\nratios vs transformers, 1 user:", ", ".join(
        f"{label} {by_users[1]['tok_s'] / base:.2f}x" for label, by_users in results.items()))
    ratio = results["llama.cpp q8_0"][1]["tok_s"] / base
    print(f"goal llama.cpp q8_0 >= {GOAL}x transformers, 1 user: {ratio:.2f}x "
          f"({'met' if ratio >= GOAL else 'NOT met'})")


if __name__ == "__main__":
    main()
