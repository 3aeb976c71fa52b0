"""The documentation site covers the public API and the gallery covers every example."""

import ast
import pathlib

import pytest

import patchgrid as pg

ROOT = pathlib.Path(__file__).parent.parent
REFERENCE = (ROOT / "docs" / "reference.md").read_text()
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("name", pg.__all__)
def test_reference_documents_public_name(name: str) -> None:
    documented = {line.split()[1].rsplit(".", 1)[-1] for line in REFERENCE.splitlines()
                  if line.startswith("::: ")}  # fmt: skip
    assert name in documented


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_has_docstring_for_gallery(path: pathlib.Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc
    assert doc.splitlines()[0].strip()
