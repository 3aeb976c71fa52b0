"""Out-of-core merging across the plane: tiles, each merged by its own :class:`Merger` (L3).

An output on disk whose plane is too large for one slab (:data:`patchgrid.settings.TILE_BYTES`)
is cut into tiles across the tiled axes after the first; each tile merges the patches that reach
it, streaming along the first axis, and writes only its own voxels.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from . import _memory, settings
from ._merge import DiskMerger, Merger
from .backends import in_memory
from .grid import PatchGrid, sub_grid


class Cropped:
    """A sink seen through a sub-image: writes keep only the tile's own voxels."""

    def __init__(
        self, sink: Any, shape: tuple[int, ...], origin: list[int], keep: list[slice]
    ) -> None:
        self.shape, self.dtype = shape, sink.dtype
        self._sink, self._origin, self._keep = sink, origin, keep

    def __setitem__(self, where: tuple[slice, ...], block: Any) -> None:
        src: list[slice] = []
        dst: list[slice] = []
        for a, (w, k) in enumerate(zip(where, self._keep)):
            first, last, _ = w.indices(self.shape[a])
            lo, hi = max(first, k.start), min(last, k.stop)
            if hi <= lo:
                return
            src.append(slice(lo - first, hi - first))
            dst.append(slice(self._origin[a] + lo, self._origin[a] + hi))
        self._sink[tuple(dst)] = np.asarray(block)[tuple(src)]
        _memory.release_memory()  # what the writer's threads freed


class TileMerger(DiskMerger):
    """The Merger of one tile: out of core, and silent about voxels no patch covers (the
    caller says it once for the whole image)."""

    WARN_UNCOVERED = False


def tile_ranges(
    grid: PatchGrid, acc_itemsize: int, budget: int, chunks: Sequence[int] | None = None
) -> list[list[tuple[int, int]]]:
    """Ranges of the image along the tiled axes after the first, one list per tile.

    A tile's sub-image (the tile and the patches that reach into it) holds about ``budget``
    bytes in a slab of patch + stride rows. Tiles are whole multiples of the stride, and of
    the output's ``chunks`` (one per tiled axis) where given, so that no chunk is written
    in parts by two tiles.
    """
    k = len(grid.axes)
    steps = np.diff(grid.axis_starts(0))
    rows = grid.size[0] + (int(steps.max()) if len(steps) else 0)
    # Share the budget out evenly among the axes.
    room = budget / max(rows * acc_itemsize, 1)
    extent = room ** (1 / max(k - 1, 1))
    ranges: list[list[tuple[int, int]]] = []
    for j in range(1, k):
        n, p, s = grid.shape[grid.axes[j]], grid.size[j], grid.stride[j]
        # Patches reach into a tile from either side by at most size - stride.
        t = int(extent) - 2 * max(p - s, 0)
        t = max(t - t % s, s, 1)
        c = 1 if chunks is None else max(int(chunks[j]), 1)
        t = max(c, t - t % c)
        ranges.append([(lo, min(lo + t, n)) for lo in range(0, n, t)])
    return [list(r) for r in itertools.product(*ranges)]


class Tile:
    """One tile of :func:`merge_tiled`: a sub-grid over a sub-image, and where it writes."""

    def __init__(self, grid: PatchGrid, out_shape: tuple[int, ...], out_axis: list[int],
                 tile: list[tuple[int, int]]) -> None:  # fmt: skip
        k = len(grid.axes)
        starts = [grid.axis_starts(j) for j in range(k)]
        a0 = grid.axes[0]
        self.picks: list[range] = [range(len(starts[0]))]
        self.shape = list(out_shape)
        self.origin = [0] * len(out_shape)
        self.keep = [slice(0, n) for n in out_shape]
        self.where: list[slice] = [slice(None)] * len(out_shape)
        sub_shape = list(grid.shape)
        sub_starts = [starts[0]]
        pads = [grid.padded_shape[a0] - grid.shape[a0]]
        self.empty = False
        for j, (t_lo, t_hi) in enumerate(tile, start=1):
            a, st, p = grid.axes[j], starts[j], grid.size[j]
            self.where[out_axis[a]] = slice(t_lo, t_hi)
            i_lo = int(np.searchsorted(st + p, t_lo, side="right"))
            i_hi = int(np.searchsorted(st, t_hi, side="left"))
            if i_hi <= i_lo:
                self.empty = True
                continue
            # The sub-image spans the tile and every patch that reaches it.
            r_lo, r_hi = min(int(st[i_lo]), t_lo), int(st[i_hi - 1]) + p
            end = max(min(r_hi, grid.shape[a]), t_hi)
            sub_starts.append(st[i_lo:i_hi] - r_lo)
            self.picks.append(range(i_lo, i_hi))
            sub_shape[a] = end - r_lo
            pads.append(max(r_hi - end, 0))
            self.shape[out_axis[a]] = end - r_lo
            self.origin[out_axis[a]] = r_lo
            self.keep[out_axis[a]] = slice(t_lo - r_lo, t_hi - r_lo)
        self.reads = 0 if self.empty else math.prod(len(p) for p in self.picks)
        self._counts = grid.counts
        self.out_axis = out_axis
        self.grid = None if self.empty else sub_grid(grid, sub_starts, sub_shape, pads)

    def runs(self) -> Iterator[tuple[int, int, int]]:
        """The tile's patches as runs contiguous in grid order, in grid order: (first patch
        of the whole grid, first patch of the tile's sub-grid, count)."""
        assert self.grid is not None
        last = self.picks[-1]
        for row in itertools.product(*self.picks[:-1]):
            lo = int(np.ravel_multi_index((*row, last.start), self._counts))
            local = (*[r - pk.start for r, pk in zip(row, self.picks[:-1])], 0)
            yield lo, int(np.ravel_multi_index(local, self.grid.counts)), len(last)

    def ids(self) -> tuple[np.ndarray, np.ndarray]:
        """Every patch of the tile: its number in the whole grid and in the sub-grid."""
        runs = list(self.runs())
        glob = np.concatenate([np.arange(g, g + n) for g, _, n in runs])
        local = np.concatenate([np.arange(s, s + n) for _, s, n in runs])
        return glob, local

    def fill(self, out: Any, a: int, step: int, value: Any, dtype: Any) -> None:
        """Write ``value`` over the whole tile, ``step`` rows along out's axis ``a`` at a time."""
        where = list(self.where)
        n = out.shape[a]
        for lo in range(0, n, max(step, 1)):
            where[a] = slice(lo, min(lo + step, n))
            extent = [len(range(*w.indices(m))) for w, m in zip(where, out.shape)]
            out[tuple(where)] = np.full(extent, value, dtype)

    def sink(self, out: Any) -> Cropped:
        """``out`` as the sub-grid's output: writes land in the tile's own voxels only."""
        assert self.grid is not None  # whole chunks along the axis the tile streams on
        sink = _memory.staged(out, self.out_axis[self.grid.axes[0]])
        return Cropped(sink, tuple(self.shape), self.origin, self.keep)


def plan_tiles(
    grid: PatchGrid,
    out_shape: tuple[int, ...],
    out_axis: list[int],
    itemsize: int,
    budget: int,
    out: Any = None,
) -> list[Tile]:
    """The tiles that cover the output, each holding about ``budget`` bytes, aligned with the
    chunks of ``out`` when it has any (zarr, HDF5)."""
    chunks = getattr(out, "chunks", None)
    per_axis = None
    if isinstance(chunks, tuple) and len(chunks) == len(out_shape):
        per_axis = [int(chunks[out_axis[a]]) for a in grid.axes]
    return [
        Tile(grid, out_shape, out_axis, t) for t in tile_ranges(grid, itemsize, budget, per_axis)
    ]


def apply_tiles(out: Any, grid: PatchGrid, reduce: str) -> list[Tile]:
    """Tiles across the plane for an ``out`` on disk whose plane is too large for one slab.

    Patches that reach two tiles run twice, so an in-memory ``out`` (or none) is never
    tiled; a file-backed one is, only when one slab across the whole plane would exceed
    :data:`patchgrid.settings.TILE_BYTES`.
    """
    if out is None or in_memory(out, plain=True):  # a memmap is on disk
        return []
    ndim = grid.ndim
    free = [a for a in range(ndim) if a not in grid.axes]
    drop = free[-1] if reduce == "argmax" and free and len(out.shape) == ndim - 1 else None
    out_axis = [a if drop is None or a < drop else a - 1 for a in range(ndim)]
    carried = 1
    for a in free:
        if a != drop and len(out.shape) == ndim - (drop is not None):
            carried *= int(out.shape[out_axis[a]])
    itemsize = max(4, np.dtype(out.dtype).itemsize) * carried
    if len(out.shape) != ndim - (drop is not None):
        return []  # the Merger reports the shape mismatch
    tiles = plan_tiles(grid, tuple(out.shape), out_axis, itemsize, settings.TILE_BYTES, out)
    return tiles if len(tiles) > 1 or _memory.chunked(out) else []  # chunks: written whole


@_memory.bound()
def merge_tiled(
    read: Any,
    grid: PatchGrid,
    out: Any,
    *,
    reduce: str = "mean",
    window: Any = None,
    fill: Any = 0,
    dtype: Any = None,
    batch: int = 16,
    budget: int | None = None,
    progress: Any = None,
) -> None:
    """Merge patches read on demand into ``out``, tile by tile, in memory that the image's
    size does not set.

    ``read(lo, hi)`` returns patches ``lo`` to ``hi`` (flat grid order) as an array. The image
    is cut into tiles across the tiled axes after the first; each tile merges the patches
    that reach it, streaming along the first tiled axis, and writes only its own voxels. A
    patch that reaches several tiles is read once for each. ``progress(done, total)`` counts
    the patches read.
    """
    a0 = grid.axes[0]
    first = np.asarray(read(0, 1))
    spec = Merger(grid, reduce=reduce, window=window, dtype=dtype).output_spec(first)
    carried = math.prod(first.shape[1 + a] for a in range(grid.ndim) if a not in grid.axes)
    itemsize = np.dtype(spec.acc_dtype).itemsize * carried
    class_axis = spec.class_axis
    out_axis = [a if class_axis is None or a < class_axis else a - 1 for a in range(grid.ndim)]
    out_shape = spec.shape
    budget = settings.TILE_BYTES if budget is None else budget
    tiles = plan_tiles(grid, out_shape, out_axis, itemsize, budget, out)
    total = sum(t.reads for t in tiles)
    done = 0
    for tile in tiles:
        if tile.empty:  # no patch reaches this tile: it is all fill
            tile.fill(out, out_axis[a0], grid.stride[0], fill, spec.dtype)
            continue
        assert tile.grid is not None
        merger = TileMerger(tile.grid, reduce=reduce, window=window, fill=fill,
                        dtype=spec.dtype, out=tile.sink(out))  # fmt: skip
        # Runs of patches contiguous in grid order, read a batch at most at a time.
        for lo, first_id, count in tile.runs():
            for c in range(0, count, batch):
                n = min(batch, count - c)
                merger.add(np.asarray(read(lo + c, lo + c + n)), np.arange(n) + first_id + c)
                done += n
                if progress is not None:
                    progress(done, total)
        merger.result()
        _memory.release_memory()
