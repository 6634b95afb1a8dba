"""The suite stays free of flaky timing checks: no upper bound on wall-clock time, no comparison of
measured intervals, no fixed sleep followed by a check. Checked on the AST of every file in tests/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

# Calls that read a clock: a value computed from one is "measured time".
CLOCKS = {"monotonic", "time", "perf_counter", "monotonic_ns", "perf_counter_ns", "time_ns"}
# A fixed sleep outside a polling loop must say why on its line: it may only wait for something
# NOT to happen (a duplicate, a second tick), never for something to happen.
QUIET_MARK = "quiet period"
# Names that hold measured time wherever they come from (a fake engine's call times, say).
MEASURED_NAMES = re.compile(r"\b(elapsed|took|gaps?|durations?)\b|\.times\b")

ADVICE_BOUND = ("asserts an upper bound on measured time or compares measured intervals: on a loaded machine "
                "it fails. Assert the schedule instead (inject the clock or the backoff), or wait on the "
                "condition and let pytest-timeout catch a hang")
ADVICE_SLEEP = ("sleeps a fixed time outside a polling loop: wait on the condition instead (poll until it "
                f"holds). If the sleep only gives something unwanted a chance to happen, say so on its line "
                f"with a `# {QUIET_MARK}: …` comment")


def _reads_clock(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            func = sub.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in CLOCKS and not sub.args:
                return True
    return False


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _measured(function: ast.AST) -> set[str]:
    """Names in `function` that hold measured time: assigned (or appended/stored) from an
    expression that reads a clock or uses another measured name, to a fixed point."""
    tainted: set[str] = set()
    changed = True
    while changed:
        changed = False
        for node in ast.walk(function):
            targets: list[ast.AST] = []
            value = None
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                value = node.value
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("append", "add"):
                targets, value = [node.func.value], ast.Tuple(elts=list(node.args), ctx=ast.Load())
            if value is None:
                continue
            if not (_reads_clock(value) or _names(value) & tainted):
                continue
            for target in targets:
                for name in _target_names(target):
                    # A deadline (clock + timeout) is a bound for waiting, not a measurement.
                    if name not in tainted and "deadline" not in name:
                        tainted.add(name)
                        changed = True
    return tainted


def _target_names(target: ast.AST) -> set[str]:
    if isinstance(target, ast.Name):
        return {target.id}
    if isinstance(target, (ast.Subscript, ast.Attribute)):
        return _target_names(target.value)
    if isinstance(target, (ast.Tuple, ast.List)):
        return set().union(*(_target_names(e) for e in target.elts))
    return set()


def _is_measured(node: ast.AST, tainted: set[str]) -> bool:
    if isinstance(node, ast.Constant):
        return False
    if "deadline" in ast.unparse(node):
        return False
    return _reads_clock(node) or bool(_names(node) & tainted) or bool(MEASURED_NAMES.search(ast.unparse(node)))


def _bound_violations(function: ast.AST, tainted: set[str]) -> list[int]:
    lines = []
    for node in ast.walk(function):
        if not isinstance(node, ast.Assert):
            continue
        for compare in (n for n in ast.walk(node.test) if isinstance(n, ast.Compare)):
            operands = [compare.left, *compare.comparators]
            for op, left, right in zip(compare.ops, operands, operands[1:]):
                small = left if isinstance(op, (ast.Lt, ast.LtE)) else right if isinstance(op, (ast.Gt, ast.GtE)) else None
                if small is None:
                    continue
                big = right if small is left else left
                # `now < deadline` in a polling loop bounds a wait (a hang fails clearly); it is not a
                # claim about how long something took.
                if "deadline" in ast.unparse(big):
                    continue
                # measured < anything: an upper bound on time, or two measured intervals compared.
                if _is_measured(small, tainted):
                    lines.append(node.lineno)
    return lines


def _sleep_violations(tree: ast.Module, source: list[str]) -> list[int]:
    lines = []

    def visit(node: ast.AST, in_loop: bool) -> None:
        for field in ("body", "orelse", "finalbody", "handlers"):
            block = getattr(node, field, None)
            if not isinstance(block, list) or in_loop:
                continue
            for i, statement in enumerate(block):
                # A sleep with a check after it in the same block; a sleep that stands for work
                # (a handler's) has none.
                if isinstance(statement, ast.Expr) and _fixed_sleep(statement.value) \
                        and any(isinstance(n, ast.Assert) for later in block[i + 1:] for n in ast.walk(later)) \
                        and QUIET_MARK not in source[statement.lineno - 1]:
                    lines.append(statement.lineno)
        for child in ast.iter_child_nodes(node):
            loop = in_loop or isinstance(child, (ast.While, ast.For, ast.AsyncFor))
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                loop = False
            visit(child, loop)

    visit(tree, False)
    return lines


def _fixed_sleep(node: ast.AST) -> bool:
    if isinstance(node, ast.Await):
        node = node.value
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "sleep"):
        return False
    return bool(node.args) and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, (int, float)) \
        and node.args[0].value > 0


def violations(path: Path, root: Path = TESTS.parent) -> list[str]:
    text = path.read_text()
    tree = ast.parse(text)
    found = []
    for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        for line in _bound_violations(function, _measured(function)):
            found.append(f"{path.relative_to(root)}:{line} {ADVICE_BOUND}")
    for line in _sleep_violations(tree, text.splitlines()):
        found.append(f"{path.relative_to(root)}:{line} {ADVICE_SLEEP}")
    return sorted(set(found))


def test_no_wall_clock_upper_bounds_or_sleep_then_assert():
    found = [v for path in sorted(TESTS.rglob("*.py")) for v in violations(path)]
    assert not found, "\n".join(found)


def test_the_check_catches_each_pattern(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text(
        "import asyncio, time\n"
        "async def test_a():\n"
        "    started = time.monotonic()\n"
        "    elapsed = time.monotonic() - started\n"
        "    assert elapsed < 2\n"                                    # 5: upper bound
        "async def test_b(loop):\n"
        "    gaps = []\n"
        "    gaps.append(loop.time())\n"
        "    assert gaps[0] <= gaps[1]\n"                              # 9: intervals compared
        "async def test_c():\n"
        "    await asyncio.sleep(0.5)\n"                               # 11: sleep then assert
        "    assert True\n"
        "async def test_d():\n"
        "    await asyncio.sleep(0.5)  # quiet period: nothing else may run\n"
        "    deadline = time.monotonic() + 5\n"
        "    while time.monotonic() < deadline:\n"
        "        assert time.monotonic() < deadline, 'a wait bound, allowed'\n"
        "        await asyncio.sleep(0.1)\n"
        "    started = time.monotonic()\n"
        "    assert time.monotonic() - started >= 1\n")                # lower bound: fine
    assert {int(v.split()[0].rsplit(":", 1)[1]) for v in violations(bad, root=tmp_path)} == {5, 9, 11}
