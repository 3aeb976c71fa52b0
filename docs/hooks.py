"""MkDocs hooks: draw the pictures, run the examples into a gallery, link Sphinx roles.

- ``on_pre_build`` draws ``docs/img/generated/layers.svg`` (the design page's picture of the
  package: a band per layer, a box per module, an arrow per import, read from the source with
  :mod:`ast` and from ``LAYERS`` in ``tests/test_layers.py``; nothing is imported), runs
  ``docs/make_pictures.py`` into ``docs/img/generated/`` and every
  ``examples/*.py`` (two at a time) with ``PATCHGRID_EXAMPLES_OUT`` pointing into
  ``docs/img/generated/gallery/<name>/``; an example that fails stops the build.
- ``on_config`` adds one gallery page per example to the "Gallery" section of the nav;
  ``on_files`` generates those pages (docstring, source, output, pictures).
- ``on_page_markdown`` fills the benchmark page's ``<!-- peers -->`` with
  ``benchmarks/results/peers.md`` and ``peers.png`` when they exist (another script writes
  them), and with a note when they do not; ``on_files`` copies the PNG into the site.
- ``on_page_content`` turns the ``:func:`name``` roles of the numpydoc docstrings into links
  to the API reference.
- ``on_config`` stops the build where neither ruff nor black is installed: mkdocstrings
  formats the signatures with one of them, and without both only logs it and writes each
  signature on one line, cut at the page's edge.
- ``on_page_markdown`` runs the home page's Python blocks; one that fails stops the build.
"""

from __future__ import annotations

import ast
import html
import importlib.util
import os
import pathlib
import re
import runpy
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # the picture's functions are imported by tests/test_docs.py without mkdocs
    from mkdocs.structure.files import Files

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GENERATED = DOCS / "img" / "generated"
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
PEERS_MD = ROOT / "benchmarks" / "results" / "peers.md"
PEERS_PNG = ROOT / "benchmarks" / "results" / "peers.png"
_outputs: dict[str, str] = {}


SRC = ROOT / "src" / "patchgrid"
TEST_LAYERS = ROOT / "tests" / "test_layers.py"


class Import(NamedTuple):
    """One patchgrid module importing another: the names it takes, and whether every such
    import sits inside a function (a lazy gate) rather than at module level."""

    source: str
    target: str
    names: tuple[str, ...]
    lazy: bool


def read_layers(path: pathlib.Path = TEST_LAYERS) -> tuple[dict[str, int], dict[int, str]]:
    """``LAYERS`` of ``tests/test_layers.py`` (module -> layer) and the title of each layer,
    taken from the ``# L<n>: title`` comments inside it; read with :mod:`ast`, not imported."""
    source = path.read_text()
    for node in ast.parse(source).body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "LAYERS" for t in node.targets)
        ) or (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == "LAYERS"
            and node.value is not None
        ):
            assert node.value is not None
            layers = ast.literal_eval(node.value)
            text = ast.get_source_segment(source, node) or ""
            titles = {int(n): t.strip() for n, t in re.findall(r"#\s*L(\d+):\s*(.+)", text)}
            return layers, titles
    raise LookupError(f"no LAYERS dict in {path}")


def modules(src: pathlib.Path = SRC) -> list[str]:
    """The package's modules, by file name."""
    return sorted(p.stem for p in src.glob("*.py"))


def read_imports(src: pathlib.Path = SRC) -> list[Import]:
    """Every import of one patchgrid module by another, one entry per (importer, imported)."""
    names = set(modules(src))
    found: dict[tuple[str, str], tuple[set[str], bool]] = {}

    def add(source: str, target: str, taken: list[str], lazy: bool) -> None:
        if source == target:
            return
        before, was_lazy = found.get((source, target), (set(), True))
        found[source, target] = before | set(taken), was_lazy and lazy

    for source in sorted(names):
        tree = ast.parse((src / f"{source}.py").read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            lazy = id(node) not in top
            if isinstance(node, ast.ImportFrom):
                taken = [a.name for a in node.names]
                parts = (node.module or "").split(".")
                if (node.level == 1 and node.module is None) or (
                    node.level == 0 and parts == ["patchgrid"]
                ):  # from . import x / from patchgrid import x: modules, or names of __init__
                    for name in taken:
                        if name in names:
                            add(source, name, [], lazy)
                        else:
                            add(source, "__init__", [name], lazy)
                elif node.level == 1:
                    add(source, parts[0], taken, lazy)
                elif node.level == 0 and parts[0] == "patchgrid":
                    add(source, parts[1], taken, lazy)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == "patchgrid":
                        add(source, parts[1] if len(parts) > 1 else "__init__", [], lazy)
    return [
        Import(source, target, tuple(sorted(taken)), lazy)
        for (source, target), (taken, lazy) in sorted(found.items())
    ]


_DOWN, _SAME, _UP = "#9e9e9e", "#1e88e5", "#e53935"
_BAND_H, _BOX_H, _GAP, _LEFT, _CHAR = 104, 30, 16, 24, 7.4


def layers_svg(src: pathlib.Path = SRC, layers_path: pathlib.Path = TEST_LAYERS) -> str:
    """The picture of the package: one band per layer (highest on top), one box per module,
    one arrow per import. Downward imports are grey; one within a layer is blue, one that
    looks up is red, and so is a module that has no layer: a violation shows at a glance.
    Dashed arrows are imports inside a function (the lazy gates)."""
    layers, titles = read_layers(layers_path)
    names = modules(src)
    imports = read_imports(src)
    unplaced = [n for n in names if n not in layers]
    top = max([*layers.values(), 0])
    bands: list[tuple[str, str, list[str]]] = [
        (f"L{n}", titles.get(n, ""), [m for m in names if layers.get(m) == n])
        for n in range(top, -1, -1)
    ]
    if unplaced:
        bands.insert(0, ("L?", "no layer in tests/test_layers.py: a violation", unplaced))

    def width(name: str) -> float:
        return max(84.0, len(name) * _CHAR + 20)

    row_w = max(sum(width(m) + _GAP for m in ms) - _GAP for _, _, ms in bands if ms)
    total_w = max(row_w, 640.0) + 2 * _LEFT
    boxes: dict[str, tuple[float, float, float]] = {}  # module -> x, y, width
    band_of: dict[str, int] = {}
    for row, (_, _, ms) in enumerate(bands):
        x = (total_w - (sum(width(m) + _GAP for m in ms) - _GAP)) / 2
        for m in ms:
            boxes[m] = (x, row * _BAND_H + 40, width(m))
            band_of[m] = row
            x += width(m) + _GAP
    legend: list[tuple[float, float, str, str, str]] = []  # x, y, colour, dash, text
    lx, ly = float(_LEFT), len(bands) * _BAND_H + 20
    for c, dash, text in [
        (_DOWN, "", "imports a lower layer"),
        (_SAME, "", "imports its own layer"),
        (_UP, "", "imports a higher layer: a violation"),
        (_DOWN, ' stroke-dasharray="5,3"', "inside a function: a lazy gate"),
        ("", "", "italic: a private implementation module"),
    ]:
        span = (36 if c else 0) + len(text) * _CHAR + 28
        if lx + span > total_w:
            lx, ly = float(_LEFT), ly + 22
        legend.append((lx, ly, c, dash, text))
        lx += span
    height = ly + 20

    def colour(imp: Import) -> str:
        if imp.source in unplaced or imp.target in unplaced:
            return _UP
        lower, upper = layers[imp.target], layers[imp.source]
        return _DOWN if lower < upper else _SAME if lower == upper else _UP

    # Anchors spread along a box's edge, ordered by where the other end sits.
    out_anchor: dict[tuple[str, str], float] = {}
    in_anchor: dict[tuple[str, str], float] = {}
    for m, (x, _, w) in boxes.items():
        outgoing = sorted((i for i in imports if i.source == m), key=lambda i: boxes[i.target])
        incoming = sorted((i for i in imports if i.target == m), key=lambda i: boxes[i.source])
        for k, imp in enumerate(outgoing):
            out_anchor[imp.source, imp.target] = x + w * (k + 1) / (len(outgoing) + 1)
        for k, imp in enumerate(incoming):
            in_anchor[imp.source, imp.target] = x + w * (k + 1) / (len(incoming) + 1)

    e = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {total_w:.0f} {height:.0f}" '
        f'width="{total_w:.0f}" height="{height:.0f}" font-family="monospace" font-size="12">',
        "<title>patchgrid's modules by layer, and the imports between them</title>",
        "<defs>",
    ]
    for key, c in (("down", _DOWN), ("same", _SAME), ("up", _UP)):
        parts.append(
            f'<marker id="arrow-{key}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
            f'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
            f'fill="{c}"/></marker>'
        )
    parts.append("</defs>")
    for row, (label, title, _) in enumerate(bands):
        y = row * _BAND_H
        fill = "#fdecea" if label == "L?" else "#f5f7fa" if row % 2 else "#e9eef3"
        parts.append(
            f'<rect x="0" y="{y}" width="{total_w:.0f}" height="{_BAND_H}" fill="{fill}"/>'
        )
        parts.append(
            f'<text x="8" y="{y + 20}" font-weight="bold" fill="#263238">{e(label)}</text>'
            f'<text x="40" y="{y + 20}" fill="#546e7a">{e(title)}</text>'
        )
    for imp in imports:
        c = colour(imp)
        key = {_DOWN: "down", _SAME: "same", _UP: "up"}[c]
        sy, ty = boxes[imp.source][1], boxes[imp.target][1]
        x1, x2 = out_anchor[imp.source, imp.target], in_anchor[imp.source, imp.target]
        if band_of[imp.source] < band_of[imp.target]:  # down the page
            y1, y2 = sy + _BOX_H, ty
            bend1 = bend2 = (y1 + y2) / 2
        elif band_of[imp.source] > band_of[imp.target]:  # up the page
            y1, y2 = sy, ty + _BOX_H
            bend1 = bend2 = (y1 + y2) / 2
        else:  # within a band: an arc below the boxes
            y1 = y2 = sy + _BOX_H
            bend1 = bend2 = y1 + 18 + min(abs(x2 - x1) / 12, 14)
        path = f"M{x1:.1f},{y1} C{x1:.1f},{bend1:.1f} {x2:.1f},{bend2:.1f} {x2:.1f},{y2}"
        dash = ' stroke-dasharray="5,3"' if imp.lazy else ""
        what = f"{imp.source} imports {imp.target}" + (" inside a function" if imp.lazy else "")
        if imp.names:
            what += ": " + ", ".join(imp.names)
        parts.append(
            f'<path d="{path}" fill="none" stroke="{c}" stroke-width="1.2" '
            f'stroke-opacity="{0.55 if c == _DOWN else 0.95}"{dash} '
            f'marker-end="url(#arrow-{key})"><title>{e(what)}</title></path>'
        )
    bad = {i.source for i in imports if colour(i) == _UP} | set(unplaced)
    for m, (x, y, w) in boxes.items():
        public = not m.startswith("_") or m in ("__init__", "__main__")
        stroke = _UP if m in bad else "#37474f"
        parts.append(
            f"<g><title>{e(m)}.py, L{layers.get(m, '?')}</title>"
            f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{_BOX_H}" rx="4" '
            f'fill="{"#ffffff" if public else "#eceff1"}" stroke="{stroke}" '
            f'stroke-width="{2 if m in bad else 1}"/>'
            f'<text x="{x + w / 2:.1f}" y="{y + 19}" text-anchor="middle" fill="#263238"'
            f"{'' if public else ' font-style=' + chr(34) + 'italic' + chr(34)}>{e(m)}</text></g>"
        )
    for lx, ly, c, dash, text in legend:
        if c:
            parts.append(
                f'<line x1="{lx:.0f}" y1="{ly}" x2="{lx + 30:.0f}" y2="{ly}" '
                f'stroke="{c}" stroke-width="2"{dash}/>'
            )
            lx += 36
        style = "" if c else ' font-style="italic"'
        parts.append(f'<text x="{lx:.0f}" y="{ly + 4}" fill="#37474f"{style}>{e(text)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_if_changed(path: pathlib.Path, text: str) -> None:
    """Write only on a change, so that ``mkdocs serve`` does not rebuild forever."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _title(path: pathlib.Path) -> tuple[str, str, str]:
    """The example's first docstring line, the rest of the docstring, and the code after it."""
    source = path.read_text()
    module = ast.parse(source)
    doc = ast.get_docstring(module) or path.stem
    first, _, rest = doc.partition("\n")
    body = module.body[0]
    has_doc = isinstance(body, ast.Expr) and isinstance(body.value, ast.Constant)
    code = "\n".join(source.splitlines()[body.end_lineno :]) if has_doc else source
    return first.strip(), rest.strip(), code.strip("\n")


def _run(path: pathlib.Path) -> str:
    """Run one example; copy the pictures it wrote, only where their bytes changed.

    (Writing into ``docs/`` only on a change keeps ``mkdocs serve`` from rebuilding forever.)
    """
    target = GENERATED / "gallery" / path.stem
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as outdir:
        env = {**os.environ, "PATCHGRID_EXAMPLES_OUT": outdir, "MPLBACKEND": "Agg"}
        command = [sys.executable, str(path)]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{path.name} failed:\n{done.stdout}\n{done.stderr}")
        made = {f.name: f.read_bytes() for f in pathlib.Path(outdir).iterdir() if f.is_file()}
    for old in target.iterdir():
        if old.name not in made:
            old.unlink()
    for name, data in made.items():
        if not (target / name).exists() or (target / name).read_bytes() != data:
            (target / name).write_bytes(data)
    return done.stdout.replace(outdir, "$PATCHGRID_EXAMPLES_OUT")


def on_config(config: Any) -> Any:
    if all(importlib.util.find_spec(name) is None for name in ("ruff", "black")):
        from mkdocs.exceptions import PluginError

        raise PluginError(
            "mkdocstrings formats the API's signatures with ruff or black, and neither is "
            "installed: pip install -e '.[docs]'"
        )
    for item in config["nav"] or []:
        if isinstance(item, dict) and "Gallery" in item:
            item["Gallery"] = ["gallery/index.md"] + [
                {p.name: f"gallery/{p.stem}.md"} for p in EXAMPLES
            ]
    return config


def on_pre_build(config: Any) -> None:
    write_if_changed(GENERATED / "layers.svg", layers_svg())
    runpy.run_path(str(DOCS / "make_pictures.py"))["main"](GENERATED)
    with ThreadPoolExecutor(max_workers=2) as pool:
        for path, out in zip(EXAMPLES, pool.map(_run, EXAMPLES)):
            _outputs[path.stem] = out


def _page(path: pathlib.Path) -> str:
    first, rest, code = _title(path)
    lines = [f"# {path.name}", "", f"**{first}**", "", rest, "", "```python", code, "```", ""]
    lines += ["Output:", "", "```text", _outputs.get(path.stem, "").rstrip(), "```", ""]
    for png in sorted((GENERATED / "gallery" / path.stem).glob("*.png")):
        lines += [f"![{png.stem}](../img/generated/gallery/{path.stem}/{png.name})", ""]
    return "\n".join(lines)


def _index() -> str:
    lines = [
        "# Gallery",
        "",
        "Every script in `examples/` runs during the site build and in the test suite; each",
        "checks its own result with asserts. Below: what each one shows, its code, what it",
        "printed and the pictures it drew.",
        "",
    ]
    for path in EXAMPLES:
        lines.append(f"- [`{path.name}`]({path.stem}.md): {_title(path)[0]}")
    return "\n".join(lines) + "\n"


def on_files(files: Files, config: Any) -> Files:
    from mkdocs.structure.files import File

    if PEERS_PNG.exists():
        files.append(File.generated(config, "img/peers.png", abs_src_path=str(PEERS_PNG)))
    files.append(File.generated(config, "gallery/index.md", content=_index()))
    for path in EXAMPLES:
        files.append(File.generated(config, f"gallery/{path.stem}.md", content=_page(path)))
    return files


def run_blocks(markdown: str, name: str) -> None:
    """Run the page's Python blocks in order, in one namespace (their asserts are its claims)."""
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    for i, code in enumerate(re.findall(r"^```python\n(.*?)^```", markdown, re.S | re.M)):
        exec(compile(code, f"{name}, python block {i + 1}", "exec"), namespace)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri == "index.md":
        run_blocks(markdown, page.file.src_uri)
    if "<!-- peers -->" not in markdown:
        return markdown
    parts = []
    if PEERS_PNG.exists():
        parts.append("![patchgrid against the other patch libraries](img/peers.png)")
    if PEERS_MD.exists():
        # Its own headings go below this page's "Against other patch libraries".
        text = re.sub(r"^(#+) ", r"##\1 ", PEERS_MD.read_text(), flags=re.MULTILINE)
        if "](peers.png)" in text:  # it shows the chart itself
            parts = [text.replace("](peers.png)", "](img/peers.png)")]
        else:
            parts.append(text)
    if not parts:
        parts.append("*`benchmarks/results/peers.md` has not been written yet.*")
    return markdown.replace("<!-- peers -->", "\n\n".join(parts))


_ROLE = re.compile(r":(?:class|func|meth|attr|exc|mod|data):<code>([^<]+)</code>")
_TARGETS = {
    "PatchDataset": "patchgrid.datasets.PatchDataset",
    "RandomPatchDataset": "patchgrid.datasets.RandomPatchDataset",
    "redundancy": "patchgrid.dask.redundancy",
    "position": "patchgrid.PatchGrid.position",
}


def _link(match: re.Match[str]) -> str:
    name = html.unescape(match.group(1)).removeprefix("patchgrid.").removeprefix("~")
    import patchgrid

    target = _TARGETS.get(name)
    if target is None and name.split(".")[0] in patchgrid.__all__:
        target = f"patchgrid.{name}"
    code = f"<code>{match.group(1)}</code>"
    return f'<autoref identifier="{target}" optional>{code}</autoref>' if target else code


def on_page_content(html_text: str, **kwargs: Any) -> str:
    return _ROLE.sub(_link, html_text)
