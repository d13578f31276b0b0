"""docs/reliability.md names the test behind each row: every name it gives must be a test that exists.

The test files are parsed with ``ast``, not imported (no Ray, no torch: this runs in about a second). The forms
read in a table's "Test" column: `tests/test_x.py`, `test_x.py::test_name`, `::test_name` (the file named
before it in the same cell), `test_name[id]` and `[id]` / `[a,b]` (parametrize ids of the test named before
it), and "same test" (the row above's); in the bad-input table's "Test id" column: a ``Case`` id of ``tests/test_bad_input.py``'s ``CASES``, or
a test function of that file.
"""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
BAD_INPUT = "test_bad_input.py"

FILE_REF = re.compile(r"(?:tests/)?(test_\w+\.py)(?:::(\w+(?:::\w+)*))?(?:\[([^\]]+)\])?")
NAME_REF = re.compile(r"::(\w+(?:::\w+)*)(?:\[([^\]]+)\])?")
PARAM_REF = re.compile(r"\[([^\]]+)\]")


@functools.cache
def parsed(file: str) -> ast.Module:
    path = REPO / "tests" / file
    assert path.is_file(), f"docs/reliability.md names tests/{file}, which does not exist"
    return ast.parse(path.read_text(), filename=str(path))


@functools.cache
def known_tests(file: str) -> dict[str, set[str] | None]:
    """Each test of ``file`` (``name``, or ``Class::name``) and its parametrize ids where they are literal
    strings (None where they are computed, or the test is not parametrized)."""
    found: dict[str, set[str] | None] = {}
    for node in parsed(file).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.name] = param_ids(node, file)
        elif isinstance(node, ast.ClassDef):
            found.update({f"{node.name}::{f.name}": param_ids(f, file) for f in node.body
                          if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))})
    return found


def param_ids(function: ast.FunctionDef | ast.AsyncFunctionDef, file: str) -> set[str] | None:
    marks = [d for d in function.decorator_list
             if isinstance(d, ast.Call) and ast.unparse(d.func).endswith("mark.parametrize")]
    if len(marks) != 1:  # none, or stacked ones whose ids combine: not checked
        return None
    mark = marks[0]
    if file == BAD_INPUT and len(mark.args) > 1 and ast.unparse(mark.args[1]) == "CASES":
        return bad_input_case_ids()  # parametrized over CASES with ids=lambda case: case.id
    ids = next((k.value for k in mark.keywords if k.arg == "ids"), None)
    if ids is None and len(mark.args) > 1:
        ids = mark.args[1]  # the values themselves are the ids when they are plain strings
    try:
        values = ast.literal_eval(ids) if ids is not None else None
    except ValueError:
        return None
    return set(values) if isinstance(values, (list, tuple)) and all(isinstance(v, str) for v in values) else None


@functools.cache
def bad_input_case_ids() -> set[str]:
    """The first argument of every ``Case(...)`` in the ``CASES = [...]`` of test_bad_input.py."""
    cases = next(node.value for node in parsed(BAD_INPUT).body if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "CASES" for t in node.targets))
    return {call.args[0].value for call in ast.walk(cases) if isinstance(call, ast.Call)
            and ast.unparse(call.func) == "Case" and call.args and isinstance(call.args[0], ast.Constant)}


def table_cells(text: str, column: str) -> list[tuple[int, str]]:
    """(line number, cell) for every body row of every table whose header has ``column``."""
    cells, index = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.startswith("|"):
            index = None
            continue
        row = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if index is None:
            # A header; the column is counted from the end, as earlier cells may hold a | in their text.
            index = row.index(column) - len(row) if column in row else False
        elif index is not False and not set(line) <= set("|-: "):
            cells.append((number, row[index]))
    return cells


def references(cell: str) -> list[tuple[str, str | None, str | None]]:
    """(file, test, ids) for each test a "Test" cell names; test and ids are None where it names less."""
    found: list[tuple[str, str | None, str | None]] = []
    for span in re.findall(r"`([^`]+)`", cell):
        if match := FILE_REF.fullmatch(span):
            found.append(match.groups())
        elif match := NAME_REF.fullmatch(span):
            assert found, f"`{span}` continues no file named before it in its cell"
            found.append((found[-1][0], *match.groups()))
        elif match := PARAM_REF.fullmatch(span):
            assert found and found[-1][1], f"`{span}` follows no test named before it in its cell"
            found.append((found[-1][0], found[-1][1], match.group(1)))
        else:
            assert "test_" not in span and "::" not in span, f"`{span}` is not a test reference this check reads"
    return found


def test_every_test_named_in_the_reliability_tables_exists():
    rows = table_cells(DOC.read_text(), "Test")
    assert len(rows) > 20, "the tables of docs/reliability.md were not found"
    missing, named = [], []
    for line, cell in rows:
        named = named if cell.startswith("same test") else references(cell)
        assert named, f"docs/reliability.md:{line}: the Test cell names no test: {cell!r}"
        for file, test, ids in named:
            known = known_tests(file)
            if test is not None and test not in known:
                missing.append(f"docs/reliability.md:{line}: {file}::{test} does not exist")
            elif ids is not None and known[test] is not None:
                missing += [f"docs/reliability.md:{line}: {file}::{test} has no parameter id [{one}]"
                            for one in ids.split(",") if one.strip() not in known[test]]
    assert not missing, "\n".join(missing)


def test_every_bad_input_test_id_is_a_case_or_a_test():
    rows = table_cells(DOC.read_text(), "Test id")
    assert len(rows) > 20, "the bad-input table of docs/reliability.md was not found"
    missing = [f"docs/reliability.md:{line}: {cell!r} is neither a Case id in {BAD_INPUT}'s CASES nor a test there"
               for line, cell in rows if cell.strip("`") not in bad_input_case_ids() | set(known_tests(BAD_INPUT))]
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("cell, error", [
    ("`::test_a`", "continues no file"),
    ("`[x]`", "follows no test"),
    ("`tests/test_faults.py:test_typo`", "is not a test reference"),
])
def test_a_reference_this_check_cannot_place_fails_it(cell, error):
    with pytest.raises(AssertionError, match=error):
        references(cell)


def test_a_renamed_test_or_case_would_be_caught():
    assert references("`tests/test_cli.py::test_x[sample]`, `[evaluate]`, `::test_y`") == [
        ("test_cli.py", "test_x", "sample"), ("test_cli.py", "test_x", "evaluate"), ("test_cli.py", "test_y", None)]
    assert "test_no_such_test" not in known_tests("test_faults.py")
    assert known_tests(BAD_INPUT)["test_bad_input_is_one_clear_line_and_changes_nothing"] == bad_input_case_ids()
    assert "wrong-type" in bad_input_case_ids() and "no-such-case" not in bad_input_case_ids()
    assert known_tests("test_steps.py")["test_an_edited_source_file_changes_the_preprocess_key"] == {
        "images", "parquet", "idx"}
