"""The README and docs/ document what the Makefile and the app actually take, and their links lead
somewhere: every knob, app setting and `make` target they name exists, and the other way round."""
import re
import subprocess

import pytest

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MAKEFILE = (REPO / "Makefile").read_text(encoding="utf-8")
# Knobs (`KNOB ?= default#  comment`), their defaults, and the targets (`name: ...`).
KNOBS = {name: default.split("#")[0].strip()
         for name, default in re.findall(r"^([A-Z_]+) \?=([^\n]*)", MAKEFILE, re.M)}
TARGETS = set(re.findall(r"^([a-z][a-z-]*):", MAKEFILE, re.M))
HELPED_TARGETS = set(re.findall(r"^([a-z][a-z-]*):.*## ", MAKEFILE, re.M))
# Variables the libraries the app uses read themselves (huggingface_hub).
READ_BY_LIBRARIES = {"HF_ENDPOINT"}


def text(doc) -> str:
    return doc.read_text(encoding="utf-8")


def prose(doc) -> str:
    """The document without its fenced code blocks (links and headings live outside them)."""
    return re.sub(r"^[ \t]*```.*?^[ \t]*```", "", text(doc), flags=re.M | re.S)


def code(doc) -> list[str]:
    """Every line of a fenced code block and every inline code span."""
    fenced = re.findall(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", text(doc), flags=re.M | re.S)
    spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose(doc))]  # may wrap lines
    return [line for block in fenced for line in block.splitlines()] + spans


def tables(doc) -> list[tuple[list[str], list[list[str]]]]:
    """(header cells, rows of cells) of each Markdown table."""
    found = []
    for block in re.findall(r"(?:^\|.*\|[ \t]*\n)+", prose(doc), re.M):
        rows = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
                for line in block.splitlines()]
        if len(rows) >= 2 and set("".join(rows[1])) <= set("-: "):
            found.append((rows[0], rows[2:]))
    return found


def rows_named(header: str) -> list[tuple[str, str, list[str]]]:
    """(doc name, the `NAME` in the first cell, the row) of every table whose first header is `header`."""
    return [(doc.name, re.fullmatch(r"`([A-Z_]+)`", row[0]).group(1), row)
            for doc in DOCS for head, rows in tables(doc) if head[0].lower() == header
            for row in rows if re.fullmatch(r"`([A-Z_]+)`", row[0])]


def app_settings() -> set[str]:
    """The environment variables chat/settings.py reads (every quoted NAME in it)."""
    return set(re.findall(r'"([A-Z][A-Z0-9_]{2,})"', (REPO / "chat" / "settings.py").read_text(encoding="utf-8")))


def make_commands(doc) -> list[tuple[list[str], list[str]]]:
    """(targets, KNOB names set on the command line) of every `make ...` in the doc's code."""
    found = []
    for line in code(doc):
        tokens = re.findall(r"[^\s();]+", line)  # commas stay: a knob value may list items
        for i, token in enumerate(tokens):
            if token != "make":
                continue
            targets, knobs = [], []
            for word in tokens[i + 1:]:
                if word == "make":
                    break
                if re.fullmatch(r"[a-z][a-z0-9-]*", word):
                    targets.append(word)
                elif re.match(r"[A-Z][A-Z0-9_]*=", word):
                    knobs.append(word.split("=")[0])
                elif not word.startswith("-"):
                    break
            found.append((targets, knobs))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_make_knob_is_documented_and_in_make_help():
    assert len(KNOBS) > 20
    documented = "".join(text(doc) for doc in DOCS)
    shown = subprocess.run(["make", "--no-print-directory", "help"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout
    for knob in KNOBS:
        assert f"| `{knob}` |" in documented, f"no table row in README.md or docs/ documents {knob}"
        assert re.search(rf"^  {knob}\s", shown, re.M), f"make help lacks {knob}"


def test_knob_tables_name_real_knobs_with_the_makefile_defaults():
    rows = rows_named("knob")
    assert len(rows) > 40, "the knob tables (first header cell: knob) were not found"
    for doc, knob, row in rows:
        assert knob in KNOBS, f"{doc} documents a knob the Makefile lacks: {knob}"
        default = KNOBS[knob]
        if len(row) > 2 and default and "$(" not in default:  # a remark may follow the value
            assert re.match(rf"{re.escape(default)}(\s|$)", row[1].strip("`")), \
                f"{doc}: {knob} defaults to {default!r}, not {row[1]!r}"


def test_each_knob_and_setting_has_one_table_row():
    rows = [(doc, name) for doc, name, _ in rows_named("knob") + rows_named("variable")]
    seen = {}
    for doc, name in rows:
        assert name not in seen, f"{name} has a row in {seen[name]} and in {doc}: document it once"
        seen[name] = doc


def test_every_app_setting_is_documented():
    names = app_settings()
    assert {"MODEL_ID", "HF_TOKEN", "APP_AUTH", "QUEUE_SIZE", "GRADIO_SERVER_PORT"} <= names
    documented = "".join(text(doc) for doc in DOCS)
    for name in names:
        assert f"`{name}`" in documented, f"README.md and docs/ do not document {name}"


def test_settings_tables_name_variables_the_kit_reads():
    source = "".join(path.read_text(encoding="utf-8") for path in
                     [REPO / "app.py", REPO / "api.py", *REPO.glob("chat/*.py"), *REPO.glob("deploy/*.py"),
                      *REPO.glob("training/*.py")])
    rows = rows_named("variable")
    assert len(rows) > 15
    for doc, name, _ in rows:
        assert f'"{name}"' in source or name in KNOBS or name in READ_BY_LIBRARIES, \
            f"{doc} documents {name}, which nothing reads"


def test_every_documented_make_command_exists():
    allowed = set(KNOBS) | app_settings() | {name for _, name, _ in rows_named("variable")}
    commands = [(doc.name, command) for doc in DOCS for command in make_commands(doc)]
    assert len(commands) > 30
    for doc, (targets, knobs) in commands:
        for target in targets:
            assert target in TARGETS, f"{doc}: `make {target}`: the Makefile has no such target"
        for knob in knobs:
            assert knob in allowed, f"{doc}: `make ... {knob}=`: no such knob or app setting"


def test_every_make_target_is_documented():
    documented = {target for doc in DOCS for targets, _ in make_commands(doc) for target in targets}
    assert not HELPED_TARGETS - documented, f"targets no page shows as `make TARGET`: {HELPED_TARGETS - documented}"


def test_documented_files_and_modules_exist():
    for doc in DOCS:
        for span in code(doc):
            if re.fullmatch(r"(training|chat|deploy|bench|tests|docs|\.ci)/[\w./*-]*|requirements[\w-]*\.txt", span):
                assert list(REPO.glob(span.rstrip("/"))), f"{doc.name} names `{span}`, which does not exist"
            for module in re.findall(r"-m ([\w.]+)", span):
                path = REPO / module.replace(".", "/")
                if path.parts[len(REPO.parts)] not in ("training", "chat", "deploy", "bench"):
                    continue  # pytest, vllm, ...: not the kit's
                assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), \
                    f"{doc.name} runs `python -m {module}`, which does not exist"


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name if doc.parent == REPO else f"docs/{doc.name}")
def test_relative_links_resolve(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(doc)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check offline
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        assert linked.exists(), f"{doc.name}: link to {target}: no such file"
        if anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", prose(linked), re.M)
            assert anchor in {slug(h) for h in headings}, f"{doc.name}: link to {target}: no such heading"


def figures(row: list[str]) -> list[str]:
    return re.findall(r"\d+(?:\.\d+)?", " ".join(row[1:]))


def test_no_document_repeats_another_documents_table_rows():
    """A measured row lives in one document: the same label with the same figures (or the same
    figures and more columns) in a second document is a copy that will drift from the first."""
    rows = [(doc.name, row[0].replace("*", "").strip(), figures(row))
            for doc in DOCS for _, body in tables(doc) for row in body if len(figures(row)) >= 3]
    for i, (doc, label, numbers) in enumerate(rows):
        for other, other_label, other_numbers in rows[i + 1:]:
            shorter = min(len(numbers), len(other_numbers))
            assert not (doc != other and label == other_label
                        and numbers[:shorter] == other_numbers[:shorter]), \
                f"{doc} and {other} both have the row {label!r} with {numbers[:shorter]}: keep it in one"
