"""Draw the user guide's pictures from the real library: edge policies, windows, the CLI.

Run: python docs/make_pictures.py [OUTDIR] (default docs/img/generated). The site build runs it
from docs/hooks.py. A file is rewritten only when its bytes change, so ``mkdocs serve`` does
not rebuild in a loop.
"""

from __future__ import annotations

import io
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

import patchgrid as pg

HERE = pathlib.Path(__file__).parent
EDGES = ("drop", "pad", "shift", "even")
WINDOWS = ("uniform", "gaussian", "hann", "triangular")
SHAPE, SIZE, STRIDE = (11, 15), 4, 3


def _write(fig: Figure | bytes, path: pathlib.Path) -> None:
    if isinstance(fig, Figure):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
        fig = buffer.getvalue()
    if not path.exists() or path.read_bytes() != fig:
        path.write_bytes(fig)


def edge_picture(edge: str) -> Figure:
    """The patches of ``edge`` over an 11 x 15 image, size 4, stride 3: the padding shaded."""
    grid = pg.PatchGrid(SHAPE, size=SIZE, stride=STRIDE, edge=edge)
    rows, cols = grid.padded_shape
    fig = Figure(figsize=(4.6, 3.8), layout="constrained")
    ax = fig.add_subplot()
    if grid.padded_shape != SHAPE:
        ax.add_patch(Rectangle((0, 0), cols, rows, facecolor="none", edgecolor="0.4", hatch="///"))
    ax.add_patch(Rectangle((0, 0), SHAPE[1], SHAPE[0], facecolor="white", edgecolor="black"))
    uncovered = pg.coverage(grid) == 0
    for y, x in zip(*np.nonzero(uncovered)):
        ax.add_patch(Rectangle((x, y), 1, 1, facecolor="#f4a3a3", edgecolor="none"))
    for i, start in enumerate(grid.starts()):
        y, x = (int(s) for s in start)
        inset = 0.12 + 0.1 * (i % 3)
        colour = f"C{i % 10}"
        ax.add_patch(
            Rectangle(
                (x + inset, y + inset),
                SIZE - 2 * inset,
                SIZE - 2 * inset,
                facecolor=to_rgba(colour, 0.06),
                edgecolor=colour,
                linewidth=1.6,
            )
        )
        ax.plot(x + SIZE // 2, y + SIZE // 2, ".", color=colour, markersize=5)
    ax.set_xlim(-0.5, cols + 0.5)
    ax.set_ylim(rows + 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_xticks(range(0, cols + 1, 3))
    ax.set_yticks(range(0, rows + 1, 3))
    ax.tick_params(labelsize=8)
    note = f"pad_width {grid.pad_width}" if grid.padded_shape != SHAPE else "no padding"
    if uncovered.any():
        note = f"{int(uncovered.sum())} voxels uncovered"
    ax.set_title(f'edge="{edge}": counts {grid.counts}, {note}', fontsize=9)
    return fig


def windows_picture() -> Figure:
    """Each window: its 1-D profile for a patch of 32 and the 2-D window of a 32 x 32 patch."""
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    axes = fig.subplots(2, len(WINDOWS), height_ratios=(1, 1.4))
    for j, name in enumerate(WINDOWS):
        profile = pg.window(name, 32)
        top, bottom = axes[0, j], axes[1, j]
        top.plot(profile, ".-", color=f"C{j}")
        top.set_ylim(0, 1.08)
        top.set_title(f'"{name}"', fontsize=10)
        top.tick_params(labelsize=8)
        bottom.imshow(pg.window(name, (32, 32)), vmin=0, vmax=1, cmap="viridis")
        bottom.set_xticks([])
        bottom.set_yticks([])
        bottom.set_xlabel(f"min {profile.min():.3f}, max {profile.max():.3f}", fontsize=8)
    return fig


def command_line(outdir: pathlib.Path) -> list[pathlib.Path]:
    """``patchgrid info`` on a small NIfTI file, and ``patchgrid preview`` on a small volume."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:

        def cli(*args: str) -> str:
            command = [sys.executable, "-m", "patchgrid", *args]
            return subprocess.run(
                command, cwd=folder, capture_output=True, text=True, check=True
            ).stdout

        pg.save(pathlib.Path(folder) / "scan.nii.gz", rng.random((24, 32, 40), dtype=np.float32))
        info = cli("info", "scan.nii.gz", "--size", "8", "--stride", "6", "--edge", "shift")
        z, y, x = np.mgrid[0:48, 0:64, 0:80]
        blob = np.exp(-((z - 24) ** 2 + (y - 30) ** 2 + (x - 45) ** 2) / 300.0)
        np.save(
            pathlib.Path(folder) / "volume.npy",
            (blob + 0.1 * rng.random(blob.shape)).astype(np.float32),
        )
        cli(
            "preview",
            "volume.npy",
            "--size",
            "24",
            "--stride",
            "20",
            "--edge",
            "shift",
            "-o",
            "grid.png",
        )
        picture = (pathlib.Path(folder) / "grid.png").read_bytes()
    _write(info.encode(), outdir / "info.txt")
    _write(picture, outdir / "preview.png")
    return [outdir / "info.txt", outdir / "preview.png"]


def main(outdir: pathlib.Path) -> list[pathlib.Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for edge in EDGES:
        written.append(outdir / f"edge_{edge}.png")
        _write(edge_picture(edge), written[-1])
    written.append(outdir / "windows.png")
    _write(windows_picture(), written[-1])
    return written + command_line(outdir)


if __name__ == "__main__":
    target = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "img" / "generated"
    for path in main(target):
        print(path)
