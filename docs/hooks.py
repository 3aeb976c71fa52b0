"""MkDocs hooks: draw the pictures, run the examples into a gallery, link Sphinx roles.

- ``on_pre_build`` runs ``docs/make_pictures.py`` into ``docs/img/generated/`` and every
  ``examples/*.py`` (two at a time) with ``PATCHGRID_EXAMPLES_OUT`` pointing into
  ``docs/img/generated/gallery/<name>/``; an example that fails stops the build.
- ``on_config`` adds one gallery page per example to the "Gallery" section of the nav;
  ``on_files`` generates those pages (docstring, source, output, pictures).
- ``on_page_markdown`` fills the benchmark page's ``<!-- peers -->`` with
  ``benchmarks/results/peers.md`` and ``peers.png`` when they exist (another script writes
  them), and with a note when they do not; ``on_files`` copies the PNG into the site.
- ``on_page_content`` turns the ``:func:`name``` roles of the numpydoc docstrings into links
  to the API reference.
"""

from __future__ import annotations

import ast
import html
import os
import pathlib
import re
import runpy
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GENERATED = DOCS / "img" / "generated"
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
PEERS_MD = ROOT / "benchmarks" / "results" / "peers.md"
PEERS_PNG = ROOT / "benchmarks" / "results" / "peers.png"
_outputs: dict[str, str] = {}


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
    for item in config["nav"] or []:
        if isinstance(item, dict) and "Gallery" in item:
            item["Gallery"] = ["gallery/index.md"] + [
                {p.name: f"gallery/{p.stem}.md"} for p in EXAMPLES
            ]
    return config


def on_pre_build(config: Any) -> None:
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
    if PEERS_PNG.exists():
        files.append(File.generated(config, "img/peers.png", abs_src_path=str(PEERS_PNG)))
    files.append(File.generated(config, "gallery/index.md", content=_index()))
    for path in EXAMPLES:
        files.append(File.generated(config, f"gallery/{path.stem}.md", content=_page(path)))
    return files


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
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
