"""README's compatibility table is what `python -m tools.conformance_table` renders, and every row cites tests
that exist in the conformance suite (read from its source: this layer imports no Ray and serves no app)."""

from __future__ import annotations

import ast
from pathlib import Path

from tools import conformance_table

ROOT = Path(__file__).resolve().parents[2]


def test_every_row_cites_tests_of_the_conformance_suite():
    suite = ast.parse((ROOT / conformance_table.SUITE).read_text())
    tests = {node.name for node in suite.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
    cited = conformance_table.proving_tests()
    assert cited, "the table cites no test"
    assert cited <= tests, f"rows cite tests the suite lacks: {sorted(cited - tests)}"


def test_readme_holds_the_tools_table():
    table = conformance_table.readme_table((ROOT / "README.md").read_text())
    assert table is not None, "README.md lacks the compatibility table markers"
    assert table == conformance_table.compatibility_table() + "\n", (
        "README's compatibility table differs from the tool's; regenerate it: python -m tools.conformance_table --write")


def test_the_tool_writes_exactly_the_table_between_the_markers(tmp_path):
    # On a copy: the tool replaces a stale table and nothing else, and a second write changes nothing.
    readme = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text()
    stale = text.replace(conformance_table.readme_table(text), "| stale |\n")
    readme.write_text(stale)
    assert conformance_table.write_readme(readme) is True
    assert readme.read_text() == text
    assert conformance_table.write_readme(readme) is False
