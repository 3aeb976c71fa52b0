"""Layer L4: pictures of grids, where the patches of a grid fall on three orthogonal slices.

What lives here: :func:`preview` (each slice in grey at its true aspect, the patch outlines
over it, the coverage in a small panel of its own with a legend) and :func:`need_matplotlib`
(the one way to matplotlib, naming the extra that brings it). matplotlib is imported only when
a picture is asked for; no pyplot, so a user's own figures and backend are left alone.

Imports: matplotlib (inside functions), and the layers below (``_checks``, ``grid``, ``io``).
"""

from __future__ import annotations

import itertools
import math
import os
import textwrap
from typing import Any, NamedTuple

import numpy as np

from ._checks import PatchgridError
from .grid import PatchGrid
from .io import atomic_path

__all__ = ["need_matplotlib", "preview"]

INSTALL = "pip install 'patchgrid[plot]'"
DPI = 100
WIDTH = 10.5  # inches: the panels of a picture together at most this wide ...
HEIGHT = 6.0  # ... and as high, with their coverage panels
COVER = 0.4  # the coverage panels' scale against the slices'
GAP = 0.3  # inches between columns and rows
EDGE = 0.12  # inches of margin around the whole picture
LINES = "#ffd21f"  # patch outlines: yellow, with a thin dark edge
ONE = "#00e5ff"  # the one patch drawn thicker, so its size reads among the overlaps
NONE = "#e8262b"  # voxels no patch covers
SPARSE = 12.0  # pixels at least between patch edges; denser grids draw every k-th patch
MOST_SHADES = 12  # more distinct coverage values than this take a continuous colour bar
MOST_RATIO = 20.0  # a voxel longer than this against its width: the spacing is not lengths
LEGEND: dict[str, Any] = {"loc": "lower left", "fontsize": 8, "frameon": False,
                          "borderaxespad": 0, "borderpad": 0, "columnspacing": 1.5}  # fmt: skip


def need_matplotlib() -> Any:
    """Import matplotlib, or say which extra brings it."""
    try:
        import matplotlib
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] != "matplotlib":  # a library of its own
            raise PatchgridError(
                f"the preview: matplotlib is installed but cannot be imported ({exc}); "
                f"reinstall it: {INSTALL}"
            ) from None
        raise PatchgridError(f"the preview needs matplotlib: {INSTALL}") from None
    return matplotlib


class View(NamedTuple):
    """One panel: the plane through ``at`` of the ``cut`` axis, axis ``h`` drawn across and
    ``v`` down the panel (``up``: from the bottom, as scanners draw), ``v`` None for 1-D."""

    cut: int | None
    at: int
    h: int
    v: int | None
    up: bool


def _views(grid: PatchGrid, world: bool) -> list[View]:
    spatial = list(grid.axes[-3:])
    cuts: list[int | None] = list(spatial) if len(spatial) == 3 else [None]
    views = []
    for cut in cuts:
        shown = [a for a in spatial if a != cut]
        index = 0 if cut is None else grid.shape[cut] // 2
        if len(shown) == 1:
            views.append(View(cut, index, shown[0], None, False))
        elif world:  # NIfTI: the first axis across, the next one up (anatomy upright)
            views.append(View(cut, index, shown[0], shown[1], True))
        else:  # arrays: rows down, columns across
            views.append(View(cut, index, shown[1], shown[0], False))
    return views


def _plane(array: Any, grid: PatchGrid, view: View) -> np.ndarray:
    """The slice ``view`` shows, as [rows = v, columns = h]; other axes at index 0."""
    key: list[Any] = []
    for a in range(grid.ndim):
        if a == view.cut:
            key.append(min(view.at, array.shape[a] - 1))
        elif a in (view.h, view.v):
            key.append(slice(None))
        else:
            key.append(0)
    plane = np.asarray(array[tuple(key)])
    plane = (np.abs(plane) if np.iscomplexobj(plane) else plane).astype(np.float64)
    if view.v is None:
        return plane.reshape(1, -1)
    return plane if view.v < view.h else plane.T


def _spacing(image: Any, grid: PatchGrid) -> tuple[dict[int, float], str]:
    """Voxel lengths of the drawn axes, and a note where they cannot be used as lengths."""
    drawn = list(grid.axes[-3:])
    given = getattr(image, "spacing", None)
    if given is None or len(given) != grid.ndim:
        return {a: 1.0 for a in drawn}, ""
    lengths = {a: float(given[a]) for a in drawn}
    values = list(lengths.values())
    if all(math.isfinite(s) and s > 0 for s in values) and max(values) <= MOST_RATIO * min(values):
        return lengths, ""
    text = " x ".join(f"{s:g}" for s in values)
    return {a: 1.0 for a in drawn}, f"voxels drawn square (spacing {text} is not lengths)"


def _axis_cover(grid: PatchGrid, axis: int) -> np.ndarray:
    """How many patches cover each voxel of ``axis`` (over its padded length)."""
    j = grid.axes.index(axis)
    steps = np.zeros(grid.padded_shape[axis] + 1, dtype=np.int64)
    starts = grid.axis_starts(j)
    np.add.at(steps, starts, 1)
    np.add.at(steps, np.minimum(starts + grid.size[j], len(steps) - 1), -1)
    return np.cumsum(steps)[:-1]


def _cover_plane(grid: PatchGrid, view: View) -> np.ndarray:
    """Patches over each voxel of the panel: a grid's patches are every combination of its
    per-axis starts, so the count is a product of per-axis counts."""
    across = _axis_cover(grid, view.h)
    down = np.ones(1, np.int64) if view.v is None else _axis_cover(grid, view.v)
    through = 1 if view.cut is None else int(_axis_cover(grid, view.cut)[view.at])
    return np.outer(down, across) * through


def _runs(starts: np.ndarray, size: int) -> list[tuple[int, int]]:
    """The stretches ``[lo, hi)`` that patches starting at ``starts`` cover, merged."""
    runs: list[tuple[int, int]] = []
    for s in sorted(int(x) for x in starts):
        if runs and s <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], s + size))
        else:
            runs.append((s, s + size))
    return runs


def _drawn(grid: PatchGrid, axis: int, px: float) -> tuple[np.ndarray, int]:
    """The starts whose outlines are drawn along ``axis`` (``px`` pixels a voxel), and ``k``:
    every k-th patch, the fewest left out that keep edges ``SPARSE`` pixels apart (patches
    smaller than that: ``2 * SPARSE`` between them), so that dense grids leave the anatomy
    visible. A last patch moved near the one before it does not count."""
    j = grid.axes.index(axis)
    starts, size, stride = grid.axis_starts(j), grid.size[j], grid.stride[j]
    for k in range(1, len(starts)):
        if size * px < SPARSE:
            if (k * stride - size) * px >= 2 * SPARSE:
                return starts[::k], k
            continue
        kept = starts[:-1:k] if len(starts) > 2 else starts  # the last may be moved ("shift")
        edges = np.unique(np.concatenate([kept, kept + size]))
        if len(edges) < 2 or float(np.diff(edges).min()) * px >= SPARSE:
            return starts[::k], k
    return starts[:1], max(len(starts), 1)


def _segments(
    grid: PatchGrid, view: View, drawn: dict[int, np.ndarray]
) -> list[list[tuple[float, float]]]:
    """The outlines of the patches drawn in the panel, each edge drawn once."""
    across, size_h = drawn[view.h], grid.size[grid.axes.index(view.h)]
    if view.v is None:
        down, size_v = np.zeros(1, np.intp), 1
    else:
        down, size_v = drawn[view.v], grid.size[grid.axes.index(view.v)]
    lines = []
    for x in sorted({int(s) for s in across} | {int(s) + size_h for s in across}):
        for lo, hi in _runs(down, size_v):
            lines.append([(x - 0.5, lo - 0.5), (x - 0.5, hi - 0.5)])
    for y in sorted({int(s) for s in down} | {int(s) + size_v for s in down}):
        for lo, hi in _runs(across, size_h):
            lines.append([(lo - 0.5, y - 0.5), (hi - 0.5, y - 0.5)])
    return lines


def _crosses(grid: PatchGrid, view: View) -> bool:
    if view.cut is None:
        return True
    j = grid.axes.index(view.cut)
    starts = grid.axis_starts(j)
    return bool(((starts <= view.at) & (view.at < starts + grid.size[j])).any())


def _centre_patch(grid: PatchGrid, view: View) -> tuple[float, float, float, float]:
    """The patch nearest the panel's centre: (x, y, width, height) in voxels."""
    box = []
    for axis in (view.h, view.v):
        if axis is None:
            box.append((0, 1))
            continue
        j = grid.axes.index(axis)
        starts = grid.axis_starts(j)
        middle = grid.shape[axis] / 2 - grid.size[j] / 2
        box.append((int(starts[np.argmin(np.abs(starts - middle))]), grid.size[j]))
    (x, w), (y, h) = box
    return x - 0.5, y - 0.5, w, h


def _letters(affine: Any, axis: int) -> tuple[str, str] | None:
    """Where ``axis`` points in the scanner's frame (RAS+): the letters of its two ends."""
    if affine is None or axis > 2:
        return None
    column = np.asarray(affine, dtype=np.float64)[:3, axis]
    world = int(np.argmax(np.abs(column)))
    low, high = (("L", "R"), ("P", "A"), ("I", "S"))[world]
    return (low, high) if column[world] > 0 else (high, low)


def _plane_name(affine: Any, cut: int | None) -> str:
    letters = None if cut is None else _letters(affine, cut)
    names = {"R": "sagittal", "L": "sagittal", "A": "coronal", "P": "coronal"}
    return "" if letters is None else names.get(letters[1], "axial")


def _axis_label(affine: Any, axis: int) -> str:
    letters = _letters(affine, axis)
    return f"axis {axis}" if letters is None else f"axis {axis}: {letters[0]} \u2192 {letters[1]}"


def _title(grid: PatchGrid, view: View, affine: Any) -> str:
    if view.cut is None:
        return ""
    name = _plane_name(affine, view.cut)
    where = f"slice {view.at} of axis {view.cut} (0-{grid.shape[view.cut] - 1})"
    text = f"{name}: {where}" if name else where
    return text if _crosses(grid, view) else f"{text}\nno patch crosses this slice"


def _window(planes: list[np.ndarray]) -> tuple[float, float]:
    """A grey window that outliers do not wash out: the 0.5th to 99.5th percentiles."""
    values = np.concatenate([p[np.isfinite(p)] for p in planes])
    if values.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    if high <= low:
        low, high = float(values.min()), float(values.max())
    return (low, high) if high > low else (low - 0.5, low + 0.5)


def _gaps(runs: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """The stretches of ``[0, n)`` that ``runs`` leave out."""
    gaps, end = [], 0
    for lo, hi in runs:
        if lo > end:
            gaps.append((end, min(lo, n)))
        end = max(end, hi)
    if end < n:
        gaps.append((end, n))
    return [(lo, hi) for lo, hi in gaps if lo < hi]


Box = tuple[int, int, int, int]  # x, y, width, height in voxels


def _uncovered(grid: PatchGrid, view: View, rows: int, cols: int) -> list[Box]:
    """Boxes (x, y, width, height) of the panel's image that no patch covers."""
    if not _crosses(grid, view):
        return [(0, 0, cols, rows)]
    j = grid.axes.index(view.h)
    boxes = [
        (lo, 0, hi - lo, rows) for lo, hi in _gaps(_runs(grid.axis_starts(j), grid.size[j]), cols)
    ]
    if view.v is not None:
        k = grid.axes.index(view.v)
        runs = _runs(grid.axis_starts(k), grid.size[k])
        boxes += [(0, lo, cols, hi - lo) for lo, hi in _gaps(runs, rows)]
    return boxes


class Shades:
    """The coverage's colours: one shade per distinct count (a continuous bar where there are
    many), red for voxels no patch covers."""

    def __init__(self, covers: list[np.ndarray]) -> None:
        from matplotlib import colormaps
        from matplotlib.colors import BoundaryNorm, ListedColormap, Normalize

        self.values = np.unique(np.concatenate([c.ravel() for c in covers]))
        self.counts = self.values[self.values > 0]
        self.none = bool(self.values[0] == 0)
        base = colormaps["viridis"]
        self.few = 0 < len(self.counts) <= MOST_SHADES
        if self.few:
            k = len(self.counts)
            colours = base(np.linspace(0.15, 0.95, k)) if k > 1 else base([0.6])
            self.cmap: Any = ListedColormap(colours).with_extremes(under=NONE)
            self.norm: Any = BoundaryNorm(np.arange(-0.5, k), k)
        else:
            self.cmap = base.with_extremes(under=NONE)
            top = float(self.counts.max()) if len(self.counts) else 1.0
            self.norm = Normalize(vmin=0.5, vmax=max(top, 1.0))

    def data(self, cover: np.ndarray) -> np.ndarray:
        """What a panel draws: the index of each count's shade (-1: none), or the count."""
        if not self.few:
            return cover.astype(np.float64)
        index = np.searchsorted(self.counts, cover).astype(np.float64)
        return np.where(cover > 0, index, -1.0)

    def colorbar(self, fig: Any, mappable: Any) -> Any:
        cax = fig.add_axes((0, 0, 0.1, 0.1), label="coverage legend")
        bar = fig.colorbar(
            mappable, cax=cax, orientation="horizontal", extend="min" if self.none else "neither"
        )
        if self.few:
            bar.set_ticks(np.arange(len(self.counts)), labels=[str(c) for c in self.counts])
        bar.ax.tick_params(labelsize=7, length=2)
        none = "; red: none" if self.none else ""
        bar.set_label(f"patches over each voxel (small panels{none})", fontsize=8)
        return cax


def _outline(width: float) -> list[Any]:
    from matplotlib import patheffects

    return [patheffects.Stroke(linewidth=width + 1.4, foreground="black"), patheffects.Normal()]


def _show(ax: Any, grid: PatchGrid, view: View, data: np.ndarray, **how: Any) -> Any:
    """Draw ``data`` (rows = ``view.v``) in voxel coordinates over the padded image."""
    cols, rows = grid.padded_shape[view.h], 1 if view.v is None else grid.padded_shape[view.v]
    h, w = data.shape
    low, high = (-0.5, h - 0.5) if view.up else (h - 0.5, -0.5)
    shown = ax.imshow(data, interpolation="nearest", origin="lower" if view.up else "upper",
                      extent=(-0.5, w - 0.5, low, high), aspect="auto", **how)  # fmt: skip
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim((-0.5, rows - 0.5) if view.up else (rows - 0.5, -0.5))
    return shown


def _draw_slice(
    ax: Any,
    grid: PatchGrid,
    view: View,
    plane: np.ndarray,
    look: tuple[tuple[float, float], Any, dict[int, np.ndarray]],
) -> None:
    """The slice in grey (``look``: the grey window, the affine, the starts drawn per axis),
    padding dotted, voxels no patch covers hatched red, the patch outlines over it."""
    from matplotlib import colormaps
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator

    grey, affine, drawn = look
    black = colormaps["gray"].with_extremes(bad="black")  # no data (NaN) as outside the body
    _show(ax, grid, view, plane, cmap=black, vmin=grey[0], vmax=grey[1])
    cols, rows = grid.padded_shape[view.h], 1 if view.v is None else grid.padded_shape[view.v]
    h, w = plane.shape
    pads = [(w, 0, cols - w, rows)] if cols > w else []
    pads += [(0, h, w, rows - h)] if rows > h else []
    for x, y, dx, dy in pads:
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), dx, dy, fill=False, hatch="..", ec="0.5", lw=0))
    for x, y, dx, dy in _uncovered(grid, view, h, w):
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), dx, dy, fill=False, hatch="//", ec=NONE, lw=0))
    if _crosses(grid, view):
        lines = LineCollection(_segments(grid, view, drawn), colors=LINES, linewidths=0.9)
        lines.set_path_effects(_outline(0.9))
        ax.add_collection(lines)
        cx, cy, cw, ch = _centre_patch(grid, view)
        one = Rectangle((cx, cy), cw, ch, fill=False, ec=ONE, lw=1.8, zorder=3)
        one.set_path_effects(_outline(1.8))
        ax.add_patch(one)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    ax.tick_params(labelsize=7, length=2, pad=1)
    ax.set_xlabel(_axis_label(affine, view.h), fontsize=8, labelpad=1)
    if view.v is None:
        ax.set_yticks([])
    else:
        ax.set_ylabel(_axis_label(affine, view.v), fontsize=8, labelpad=1)
    ax.set_title(_title(grid, view, affine), fontsize=9, pad=3)


def _draw_cover(ax: Any, grid: PatchGrid, view: View, cover: np.ndarray, shades: Shades) -> Any:
    shown = _show(ax, grid, view, shades.data(cover), cmap=shades.cmap, norm=shades.norm)
    ax.set_xticks([])
    ax.set_yticks([])
    return shown


def _edges_label(every: dict[int, int]) -> str:
    """The legend's words for the outlines: which patches have theirs drawn."""
    thinned: dict[int, list[int]] = {}
    for axis, k in sorted(every.items()):
        if k > 1:
            thinned.setdefault(k, []).append(axis)
    if not thinned:
        return "patch edges"
    parts = [
        f"1 in {k} along {'axes' if len(a) > 1 else 'axis'} {', '.join(map(str, a))}"
        for k, a in thinned.items()
    ]
    return f"patch edges ({'; '.join(parts)})"


def _legend(
    fig: Any, grid: PatchGrid, views: list[View], holes: bool, every: dict[int, int]
) -> Any:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    size = " x ".join(str(grid.size[grid.axes.index(a)]) for a in grid.axes[-3:])
    handles: list[Any] = [
        Line2D([], [], color=LINES, lw=0.9, path_effects=_outline(0.9), label=_edges_label(every)),
        Line2D([], [], color=ONE, lw=1.8, path_effects=_outline(1.8), label=f"one patch ({size})"),
    ]
    drawn = {a: grid.padded_shape[a] for v in views for a in (v.h, v.v) if a is not None}
    if holes:
        handles.append(Patch(fill=False, hatch="//", ec=NONE, lw=0, label="no patch"))
    if any(n > grid.shape[a] for a, n in drawn.items()):
        handles.append(Patch(fill=False, hatch="..", ec="0.5", lw=0, label="padding"))
    return fig.legend(handles=handles, ncols=len(handles), **LEGEND)


def _header(image: Any, grid: PatchGrid, title: str, note: str) -> str:
    def times(values: Any) -> str:
        return " x ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)

    name = title or os.path.basename(str(getattr(image, "path", ""))) or "image"
    lines = [f"{name}: {times(grid.shape)} voxels"]
    spacing = getattr(image, "spacing", None)
    if spacing is not None and len(spacing) == grid.ndim:
        lines[0] += f", spacing {times(float(s) for s in spacing)}"
    edges = sorted(set(grid.edge))
    lines.append(
        f"patches {times(grid.size)} on axes {', '.join(map(str, grid.axes))}, stride "
        f"{times(grid.stride)}, edge {'/'.join(edges)}: {times(grid.counts)} = {len(grid)} patches"
    )
    drawn = set(grid.axes[-3:])
    rest = [a for a in range(grid.ndim) if a not in drawn]
    if rest:
        where = ", ".join(f"axis {a} at 0 (of {grid.shape[a]})" for a in rest)
        lines.append(f"shown: {where}")
    if note:
        lines.append(note)
    return "\n".join(lines)


class Cell(NamedTuple):
    """A slice's panel over its coverage's, with the slice's size in inches."""

    top: Any
    bottom: Any
    width: float
    height: float


def _arrange(grid: PatchGrid, views: list[View], lengths: dict[int, float]) -> Any:
    """The views in columns (each a stack, in order), whether each coverage panel goes beside
    its slice rather than below, and the slices' (width, height) in inches: one scale for all,
    so lengths compare, the largest that fits ``WIDTH`` x ``HEIGHT`` with room for labels."""
    sizes = []
    for view in views:
        across = grid.padded_shape[view.h] * lengths[view.h]
        down = across / 12 if view.v is None else grid.padded_shape[view.v] * lengths[view.v]
        sizes.append((across, down))
    options = [[[0], [1], [2]], [[0, 1], [2]], [[0], [1, 2]], [[0, 1, 2]]]
    best: Any = ([[0]], False, 0.0)
    layouts = options if len(views) == 3 else [[[0]]]
    for side, columns in itertools.product((False, True), layouts):
        grow = (1 + COVER, 1) if side else (1, 1 + COVER)
        wide = sum(max(sizes[i][0] * grow[0] for i in c) for c in columns)
        tall = max(sum(sizes[i][1] * grow[1] for i in c) for c in columns)
        room = (0.6 + 0.3 * side) * len(columns), 0.9 * max(len(c) for c in columns)
        scale = min((WIDTH - room[0]) / wide, (HEIGHT - room[1]) / tall)
        if scale > 1.05 * best[2]:
            best = (columns, side, scale)
    return best[0], best[1], [(w * best[2], h * best[2]) for w, h in sizes], best[2]


def _extra(ax: Any, renderer: Any) -> tuple[float, float, float, float]:
    """What ``ax``'s ticks, labels and title add around it: (left, right, top, bottom), inches."""
    tight, box = ax.get_tightbbox(renderer), ax.get_window_extent(renderer)
    return (
        max(box.x0 - tight.x0, 0.0) / DPI,
        max(tight.x1 - box.x1, 0.0) / DPI,
        max(tight.y1 - box.y1, 0.0) / DPI,
        max(box.y0 - tight.y0, 0.0) / DPI,
    )


def _inches(artist: Any, renderer: Any) -> tuple[float, float]:
    box = artist.get_window_extent(renderer)
    return box.width / DPI, box.height / DPI


def _stack(columns: list[list[Cell]], side: bool, renderer: Any) -> tuple[list[Any], list[Any]]:
    """Where each cell goes, (cell, slice's (left, top), coverage's (left, top)) in inches from
    the body's top left, the coverage below its slice or beside it (``side``), and each
    column's (left, right, bottom)."""
    spots, ends, x = [], [], EDGE
    for c in (c for column in columns for c in column):  # a title wider than its panel: 2 lines
        title = c.top.title.get_text()
        if _inches(c.top.title, renderer)[0] > c.width + 0.2 and "\n" not in title:
            cut = (": ", ":\n") if ": " in title else (" (", "\n(")
            c.top.title.set_text(title.replace(*cut, 1))
    for column in columns:
        cells = [(c, _extra(c.top, renderer), _extra(c.bottom, renderer)) for c in column]
        if side:
            left = max(t[0] for _, t, _ in cells)
            right = max(
                c.width + t[1] + GAP / 2 + b[0] + COVER * c.width + b[1] for c, t, b in cells
            )
        else:
            left = max(max(t[0] + c.width / 2, b[0] + COVER * c.width / 2) for c, t, b in cells)
            right = max(max(t[1] + c.width / 2, b[1] + COVER * c.width / 2) for c, t, b in cells)
        y = 0.0
        for c, t, b in cells:
            if side:
                beside = x + left + c.width + t[1] + GAP / 2 + b[0]
                spots.append((c, (x + left, y + t[2]), (beside, y + t[2])))
                y += t[2] + max(c.height + t[3], COVER * c.height + b[3]) + GAP
                continue
            below = y + t[2] + c.height + t[3] + GAP / 2 + b[2]
            centre = x + left
            spots.append(
                (c, (centre - c.width / 2, y + t[2]), (centre - COVER * c.width / 2, below))
            )
            y = below + COVER * c.height + b[3] + GAP
        ends.append((x, x + left + right, y - GAP))
        x += left + right + GAP
    return spots, ends


def _foot(ends: list[Any], width: float, legend: tuple[float, float], bar: Any) -> Any:
    """Where the legend and the colour bar go, as (top, legend's left, bar's left, bar's top,
    bottom): beside or above each other, left or right, in the lowest free place."""
    (lw, lh), (bar_l, bar_r, bar_t, bar_b) = legend, bar
    bar_w, bar_h = bar_l + 2.4 + bar_r, bar_t + 0.12 + bar_b
    best = None
    for side in (True, False):
        w = lw + GAP + bar_w if side else max(lw, bar_w)
        h = max(lh, bar_h) if side else lh + GAP / 2 + bar_h
        for x0 in (EDGE, width - EDGE - w):
            if x0 < EDGE - 1e-9 or x0 + w > width - EDGE + 1e-9:
                continue
            top = max(e[2] for e in ends if e[0] < x0 + w and x0 < e[1]) + GAP / 2
            bar_x, bar_y = (x0 + lw + GAP, top) if side else (x0, top + lh + GAP / 2)
            spot = (top, x0, bar_x + bar_l, bar_y + bar_t, top + h)
            if best is None or spot[-1] < best[-1] - 1e-9:
                best = spot
    return best


def _place(
    fig: Any, columns: list[list[Cell]], side: bool, header: Any, legend: Any, cax: Any
) -> None:
    """Lay the picture out edge to edge: each column as wide as its widest panel or title,
    the header above, the legends in the lowest free place; nothing overlaps, and no margin
    is wider than ``EDGE``."""
    cells = [c for column in columns for c in column]
    big = 2 * sum(c.width for c in cells) + 20
    fig.set_size_inches(big, big)
    for c in cells:
        c.top.set_position((0.3, 0.5, c.width / big, c.height / big))
        c.bottom.set_position((0.3, 0.1, COVER * c.width / big, COVER * c.height / big))
    cax.set_position((0.5, 0.05, 2.4 / big, 0.12 / big))
    renderer = fig.canvas.get_renderer()
    spots, ends = _stack(columns, side, renderer)
    sizes, bar = _inches(legend, renderer), _extra(cax, renderer)
    width = max(ends[-1][1] + EDGE, sizes[0] + 2 * EDGE, bar[0] + 2.4 + bar[1] + 2 * EDGE)
    header.set_text(_wrap(header.get_text(), width - 2 * EDGE, header, renderer))
    body = EDGE + _inches(header, renderer)[1] + GAP / 2
    top, legend_x, bar_x, bar_y, bottom = _foot(ends, width, sizes, bar)
    height = body + max(bottom, max(e[2] for e in ends)) + EDGE
    fig.set_size_inches(width, height)

    def box(left: float, top: float, w: float, h: float) -> tuple[float, float, float, float]:
        return left / width, 1 - (body + top + h) / height, w / width, h / height

    header.set_position((EDGE / width, 1 - EDGE / height))
    for c, (x, y), (cx, cy) in spots:
        c.top.set_position(box(x, y, c.width, c.height))
        c.bottom.set_position(box(cx, cy, COVER * c.width, COVER * c.height))
    legend.set_bbox_to_anchor(box(legend_x, top, *sizes), transform=fig.transFigure)
    cax.set_position(box(bar_x, bar_y, 2.4, 0.12))


def _wrap(text: str, width: float, artist: Any, renderer: Any) -> str:
    """``text`` with each line wrapped to ``width`` inches as ``artist`` draws it."""
    artist.set_text(text)
    drawn = _inches(artist, renderer)[0]
    if drawn <= width:
        return text
    chars = max(20, int(max(len(line) for line in text.splitlines()) * width / drawn) - 1)
    lines = text.splitlines()
    return "\n".join(textwrap.fill(line, chars, subsequent_indent="  ") for line in lines)


def preview(
    image: Any,
    grid: PatchGrid,
    path: str | None = None,
    *,
    title: str = "",
    overwrite: bool = False,
) -> Any:
    """Draw the grid over three orthogonal slices through the centre of ``image``.

    Each slice is drawn in grey at its true aspect (the voxel ``spacing`` an image from
    :func:`patchgrid.open` carries; one scale for all panels), with the outline of every patch
    that crosses it in yellow, one patch near the centre in cyan, and voxels no patch covers
    hatched in red. Beneath each slice, a smaller panel shows how many patches cover each
    voxel, with a colour bar. A NIfTI image (one with an ``affine``) is drawn as scanners draw
    it: its first axis across, the next one up, each labelled with the direction it points
    (R, A, S); other arrays as images are: rows down, columns across. The last three tiled axes
    are drawn (one panel for 1-D and 2-D grids); other axes are shown at index 0.

    Returns the matplotlib figure; with ``path``, also writes it as a PNG, atomically (an
    existing file is replaced only with ``overwrite``, and only a file, not a folder or link).
    """
    need_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    affine = getattr(image, "affine", None)
    views = _views(grid, affine is not None)
    lengths, note = _spacing(image, grid)
    planes = [_plane(image, grid, v) for v in views]
    covers = [_cover_plane(grid, v) for v in views]
    shades = Shades(covers)
    grey = _window(planes)
    fig = Figure(dpi=DPI)
    FigureCanvasAgg(fig)
    order, side, sizes, scale = _arrange(grid, views, lengths)
    outlines = {a: _drawn(grid, a, scale * lengths[a] * DPI) for a in grid.axes[-3:]}
    look = (grey, affine, {a: starts for a, (starts, _) in outlines.items()})
    cells, shown = [], None
    for view, plane, cover, (w, h) in zip(views, planes, covers, sizes):
        top = fig.add_axes((0, 0, 0.1, 0.1), label=f"slice {view.cut}")
        _draw_slice(top, grid, view, plane, look)
        bottom = fig.add_axes((0, 0, 0.1, 0.1), label=f"coverage {view.cut}")
        shown = _draw_cover(bottom, grid, view, cover, shades)
        cells.append(Cell(top, bottom, w, h))
    holes = any(_uncovered(grid, v, *p.shape) for v, p in zip(views, planes))
    header = fig.text(0, 1, _header(image, grid, title, note), fontsize=9, va="top", ha="left")
    columns = [[cells[i] for i in column] for column in order]
    every = {a: k for a, (_, k) in outlines.items()}
    legend = _legend(fig, grid, views, holes, every)
    _place(fig, columns, side, header, legend, shades.colorbar(fig, shown))
    if path is not None:
        with atomic_path(path, overwrite=overwrite, kind="file") as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return fig
