"""docs/reliability.md, the reliability tables and their tests stay one thing.

The tables live in tests/integration/test_reliability_*.py (`TABLE`); the
document is generated from them by scripts/reliability-doc.  Here, without
systemd: every case names a test that exists, every test of those modules is a
case, and the committed document lists exactly the cases of the tables.
"""

from __future__ import annotations

import importlib
import inspect
import textwrap
from pathlib import Path

import pytest

from tests.reliability_cases import (
    DOC_PATH,
    TABLE_MODULES,
    Case,
    Result,
    Table,
    check_tables,
    documented_case_ids,
    load_tables,
    parse_junit,
    render_markdown,
)


@pytest.fixture(scope="module")
def tables() -> list[Table]:
    return load_tables()


def _param_ids(function: object) -> list[str]:
    ids: list[str] = []
    for mark in getattr(function, "pytestmark", []):
        if mark.name == "parametrize":
            ids += list(mark.kwargs.get("ids") or [])
    return ids


def test_tables_are_well_formed(tables: list[Table]) -> None:
    assert [t.module for t in tables] == list(TABLE_MODULES)
    assert check_tables(tables) == []
    bad_input = next(t for t in tables if t.key == "bad-input")
    assert len(bad_input.cases) >= 35


def test_every_case_names_a_test_that_exists(tables: list[Table]) -> None:
    for table in tables:
        for case in table.cases:
            node = table.node_of(case)
            path, _, name = node.partition("::")
            module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
            function, _, param = name.partition("[")
            assert callable(getattr(module, function, None)), f"{case.id}: no {node}"
            if param:
                assert param.rstrip("]") in _param_ids(getattr(module, function)), node


def test_every_test_of_the_table_modules_is_a_case(tables: list[Table]) -> None:
    for table in tables:
        module = importlib.import_module(table.module)
        nodes = {table.node_of(c).split("::")[1].split("[")[0] for c in table.cases}
        tests = {name for name, fn in inspect.getmembers(module, inspect.isfunction)
                 if name.startswith("test_") and fn.__module__ == module.__name__}
        assert tests <= nodes, f"{table.module}: tests without a row: {sorted(tests - nodes)}"


def test_the_document_lists_every_case(tables: list[Table]) -> None:
    want = {case.id for table in tables for case in table.cases}
    have = documented_case_ids(DOC_PATH.read_text())
    assert not want - have, f"run scripts/reliability-doc: missing {sorted(want - have)}"
    assert not have - want, f"run scripts/reliability-doc: stale {sorted(have - want)}"


def test_render_from_junit(tmp_path: Path) -> None:
    table = Table("t", "T", "intro", "tests.integration.test_reliability_x", (
        Case("one", "what 1", "expected 1"),
        Case("two", "what | 2", "expected 2", test="tests/integration/test_y.py::test_z"),
        Case("three", "what 3", "expected 3"),
        Case("four", "what 4", "expected 4",
             test="tests/integration/test_reliability_x.py::test_many[four]"),
    ))
    junit = tmp_path / "junit.xml"
    junit.write_text(textwrap.dedent("""\
        <?xml version="1.0" encoding="utf-8"?>
        <testsuites><testsuite name="pytest">
          <testcase classname="tests.integration.test_reliability_x" name="test_one" time="1.25">
            <system-out>noise
        [reliability] pard RSS: 41 MiB
        </system-out>
          </testcase>
          <testcase classname="tests.integration.test_y" name="test_z" time="0.5">
            <skipped message="no memory controller"/>
          </testcase>
          <testcase classname="tests.integration.test_reliability_x" name="test_many[four]"
                    time="2"><failure message="assert 1 == 2&#10;more">trace</failure></testcase>
        </testsuite></testsuites>
        """))
    results = parse_junit(junit)
    assert results["tests/integration/test_reliability_x.py::test_one"] == Result(
        "passed", 1.25, "", (("pard RSS", "41 MiB"),))
    assert results["tests/integration/test_y.py::test_z"].outcome == "skipped"
    text = render_markdown([table], results, "a test run")
    assert documented_case_ids(text) == {"one", "two", "three", "four"}
    assert "| `one` | what 1 | expected 1 | pass (1.2 s) |" in text
    assert "what \\| 2" in text and "skipped: no memory controller" in text
    assert "| `three` | what 3 | expected 3 | not run |" in text
    assert "**FAIL**: assert 1 == 2" in text
    assert "- pard RSS: 41 MiB" in text
    assert "4 cases: 1 passed, 1 failed, 1 skipped, 1 not run" in text
