"""Layer L4: pictures of grids, where the patches of a grid fall on three orthogonal slices.

What lives here: :func:`preview` (the image in grey, patch outlines, the coverage as an
overlay, uncovered voxels in red), drawn with matplotlib, which is imported only when a
picture is asked for.

Imports: matplotlib (inside :func:`preview`), and the layers below (``grid``, ``io``, ``_merge``).
"""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np

from ._merge import coverage
from .grid import PatchGrid
from .io import atomic_path

__all__ = ["preview"]

Panel = tuple[int | None, list[int]]  # the axis cut through (None: no cut), the axes shown


def _panels(grid: PatchGrid) -> list[Panel]:
    spatial = list(grid.axes[-3:])
    if len(spatial) < 3:
        return [(None, spatial)]
    return [(cut, [a for a in spatial if a != cut]) for cut in spatial]


def _plane(array: Any, grid: PatchGrid, cut: int | None, shown: list[int]) -> np.ndarray:
    """The 2-D plane of ``array`` through the centre of ``cut``; other axes at index 0."""
    key: list[Any] = []
    for a in range(grid.ndim):
        if a == cut:
            key.append(min(grid.shape[a] // 2, array.shape[a] - 1))
        elif a in shown:
            key.append(slice(None))
        else:
            key.append(0)
    plane = np.asarray(array[tuple(key)], dtype=np.float64)
    return plane.reshape(1, -1) if plane.ndim == 1 else plane


def preview(image: Any, grid: PatchGrid, path: str | None = None, *, title: str = "") -> Any:
    """Draw the grid over three orthogonal slices through the centre of ``image``.

    Each panel shows the slice in grey, the outline of every patch that crosses it, and the
    number of patches over each voxel as a coloured overlay; voxels no patch covers are red.
    The last three tiled axes are drawn (one panel for 1-D and 2-D grids); other axes are shown
    at index 0. Returns the matplotlib figure; with ``path``, also saves it as a PNG, written
    atomically.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cover = coverage(grid)
    peak = max(float(cover.max()), 1.0)
    panels = _panels(grid)
    fig, axs = plt.subplots(1, len(panels), figsize=(max(7, 5 * len(panels)), 5), squeeze=False)
    for ax, (cut, shown) in zip(axs[0], panels):
        img = _plane(image, grid, cut, shown)
        cov = _plane(cover, grid, cut, shown)
        ax.imshow(img, cmap="gray", interpolation="nearest")
        shade = ax.imshow(np.ma.masked_equal(cov, 0), cmap="viridis", alpha=0.35, vmin=0,
                          vmax=peak, interpolation="nearest")  # fmt: skip
        ax.imshow(np.ma.masked_not_equal(cov, 0), cmap="autumn", alpha=0.6, interpolation="nearest")
        js = [grid.axes.index(a) for a in shown]
        crossing = True
        if cut is not None:
            j = grid.axes.index(cut)
            starts, centre = grid.axis_starts(j), grid.shape[cut] // 2
            crossing = bool(((starts <= centre) & (centre < starts + grid.size[j])).any())
        if crossing:
            for pos in np.ndindex(*[grid.counts[j] for j in js]):
                corner = [int(grid.axis_starts(j)[p]) for j, p in zip(js, pos)]
                extent = [grid.size[j] for j in js]
                if len(corner) == 1:
                    corner, extent = [0, *corner], [1, *extent]
                ax.add_patch(Rectangle((corner[1] - 0.5, corner[0] - 0.5), extent[1], extent[0],
                                       fill=False, lw=0.7, ec="orange"))  # fmt: skip
        where = "" if cut is None else f"slice {grid.shape[cut] // 2} of axis {cut}; "
        ax.set_title(f"{where}axes {shown}" + ("" if crossing else " (no patch crosses)"),
                     fontsize=9)  # fmt: skip
        rows = grid.padded_shape[shown[0]] if len(shown) == 2 else 1
        ax.set_xlim(-0.5, grid.padded_shape[shown[-1]] - 0.5)
        ax.set_ylim(rows - 0.5, -0.5)
    fig.colorbar(shade, ax=axs[0].tolist(), shrink=0.6, label="patches per voxel (red: none)")
    fig.suptitle(textwrap.fill(title or str(grid), 90), fontsize=9)
    if path is not None:
        with atomic_path(path, overwrite=True) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
    return fig
