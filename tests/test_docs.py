"""The documentation covers the public API, the gallery covers every example, the dotted names
the pages give resolve, and the design page and its picture match the package's modules."""

import ast
import importlib
import importlib.util
import pathlib
import re
import xml.etree.ElementTree as ET
from types import ModuleType

import pytest

import patchgrid as pg

ROOT = pathlib.Path(__file__).parent.parent
SRC = ROOT / "src" / "patchgrid"
REFERENCE = (ROOT / "docs" / "reference.md").read_text()
DESIGN = (ROOT / "docs" / "design.md").read_text()
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
MODULES = sorted(p.stem for p in SRC.glob("*.py"))
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
PAGES = [p for p in PAGES if "generated" not in p.parts]


def _documented() -> list[str]:
    """The objects the API reference renders, as written after ``::: ``."""
    return [line.split()[1] for line in REFERENCE.splitlines() if line.startswith("::: ")]


@pytest.mark.parametrize("name", pg.__all__)
def test_reference_documents_public_name(name: str) -> None:
    assert name in {path.rsplit(".", 1)[-1] for path in _documented()}


def test_reference_lists_only_the_public_api() -> None:
    others = {
        "patchgrid.dask.redundancy",
        "patchgrid.dask.Redundancy",
        "patchgrid.datasets.PatchDataset",
        "patchgrid.datasets.RandomPatchDataset",
    }
    public = {f"patchgrid.{name}" for name in pg.__all__}
    assert [path for path in _documented() if path not in public | others] == []


def test_reference_lists_each_name_once() -> None:
    names = [path.rsplit(".", 1)[-1] for path in _documented()]
    assert sorted({n for n in names if names.count(n) > 1}) == []


@pytest.mark.parametrize("name", pg.settings.__all__)
def test_reference_documents_setting(name: str) -> None:
    settings = REFERENCE[REFERENCE.index("## Settings") :]
    assert f"`patchgrid.settings.{name}`" in settings


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_has_docstring_for_gallery(path: pathlib.Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc
    assert doc.splitlines()[0].strip()


# `patchgrid.<module>.<NAME>` (or `pg.<module>.<NAME>`) written in the README and the docs.
_DOTTED = re.compile(r"\b(?:patchgrid|pg)\.([a-z_][a-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")
DOTTED = sorted(
    {
        (page.relative_to(ROOT).as_posix(), module, name)
        for page in PAGES
        for module, name in _DOTTED.findall(page.read_text())
    }
)


@pytest.mark.parametrize(
    ("page", "module", "name"), DOTTED, ids=[f"{p}:{m}.{n}" for p, m, n in DOTTED]
)
def test_dotted_name_in_docs_resolves(page: str, module: str, name: str) -> None:
    assert module in MODULES, f"{page}: patchgrid.{module} is not a module of patchgrid"
    try:
        imported = importlib.import_module(f"patchgrid.{module}")
    except ModuleNotFoundError as error:  # an optional dependency (torch, dask)
        if (error.name or "").startswith("patchgrid"):
            raise
        pytest.skip(f"patchgrid.{module} needs {error.name}")
    assert hasattr(imported, name), f"{page}: patchgrid.{module} has no {name}"


def test_settings_reachable_from_the_package() -> None:
    assert pg.settings is importlib.import_module("patchgrid.settings")
    assert isinstance(pg.settings.TILE_BYTES, int)


def _design_section(title: str) -> str:
    start = DESIGN.index(f"## {title}")
    end = DESIGN.find("\n## ", start + 1)
    return DESIGN[start : end if end >= 0 else None]


def _named(text: str) -> set[str]:
    """Module names written in code spans: `_plan`, `__init__.py`."""
    spans = re.findall(r"`([A-Za-z_][A-Za-z0-9_]*(?:\.py)?)`", text)
    return {span.removesuffix(".py") for span in spans}


def _layers_table() -> dict[str, int]:
    found = {}
    for row in _design_section("The layers").splitlines():
        match = re.match(r"\|\s*L(\d+)\s*\|([^|]*)\|", row)
        if match:
            for module in _named(match.group(2)):
                found[module] = int(match.group(1))
    return found


def _homes() -> set[str]:
    """The modules of the last column of "Where each behaviour lives"."""
    table = _design_section("Where each behaviour lives")
    cells = [row.rsplit("|", 2)[-2] for row in table.splitlines() if row.startswith("|")]
    return set().union(*(_named(cell) for cell in cells[2:]))


@pytest.mark.parametrize("module", MODULES)
def test_design_says_where_each_module_belongs(module: str) -> None:
    assert module in _homes()


def test_design_names_only_modules_that_exist() -> None:
    assert sorted((_homes() | set(_layers_table())) - set(MODULES)) == []


@pytest.mark.parametrize("module", MODULES)
def test_readme_layout_lists_each_module(module: str) -> None:
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    assert f"{module}.py" in layout[: layout.index("```", layout.index("```") + 3)]


def _hooks() -> ModuleType:
    """``docs/hooks.py``, loaded without mkdocs (its picture needs only the standard library)."""
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HOOKS = _hooks()


def test_design_layers_match_the_layer_map() -> None:
    layers, _ = HOOKS.read_layers()
    table = {m: n for m, n in _layers_table().items() if m in MODULES}
    assert table == {m: layers[m] for m in MODULES if m in layers}


def _direct_imports() -> set[tuple[str, str]]:
    """(importer, imported) for every patchgrid module importing another, its relative imports
    resolved by importlib's own rule (every module sits directly in the package)."""
    pairs = set()
    for source in MODULES:
        for node in ast.walk(ast.parse((SRC / f"{source}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                relative = "." * node.level + (node.module or "")
                base = importlib.util.resolve_name(relative, "patchgrid")
                targets = [
                    f"{base}.{a.name}"
                    if base == "patchgrid" and (SRC / f"{a.name}.py").exists()
                    else base
                    for a in node.names
                ]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                module = parts[1] if len(parts) > 1 else "__init__"
                if parts[0] == "patchgrid" and module != source:
                    pairs.add((source, module))
    return pairs


def test_hook_reads_the_imports_the_package_has() -> None:
    found = {(i.source, i.target) for i in HOOKS.read_imports()}
    assert found == _direct_imports()


def test_picture_shows_every_module_and_import() -> None:
    svg = HOOKS.layers_svg()
    root = ET.fromstring(svg)  # well-formed
    texts = {el.text for el in root.iter("{http://www.w3.org/2000/svg}text")}
    assert set(MODULES) <= texts
    titles = [el.text or "" for el in root.iter("{http://www.w3.org/2000/svg}title")]
    drawn = {tuple(t.split(":")[0].split(" inside")[0].split(" imports ")) for t in titles}
    assert _direct_imports() <= drawn
