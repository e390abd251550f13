"""Rules the suite keeps about itself: no test waits a fixed time for something to happen. A
sleep is only the pause between two checks of a condition (inside a `while` loop with a
deadline); a browser test waits on what the page shows, never `wait_for_timeout`."""
import ast

from conftest import REPO

SUITE = sorted((REPO / "tests").glob("*.py"))


def fixed_waits(source: str) -> list[int]:
    """Lines of sleep calls outside any while loop, and of every page.wait_for_timeout call."""
    found = []

    def visit(node, in_loop):
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            if name == "wait_for_timeout" or (name == "sleep" and not in_loop):
                found.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, in_loop or isinstance(node, ast.While))

    visit(ast.parse(source), False)
    return found


def test_the_rule_finds_a_fixed_sleep_and_spares_a_polling_loop():
    assert fixed_waits("import time\ntime.sleep(2)\nassert done()") == [2]
    assert fixed_waits("page.wait_for_timeout(500)") == [1]
    assert fixed_waits("while not done():\n    time.sleep(0.1)") == []


def test_no_test_waits_a_fixed_time():
    offenders = {path.name: lines for path in SUITE if (lines := fixed_waits(path.read_text(encoding="utf-8")))}
    assert not offenders, f"fixed waits (poll a condition instead): {offenders}"
