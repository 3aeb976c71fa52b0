"""The distributed path: extract and apply on Dask arrays, equal to the in-memory results.

Each output chunk of :func:`apply` is one task: it reads the input region that the patches
touching the chunk need, runs ``fn`` on them in fixed-shape batches, blends them and keeps the
chunk. Every voxel of the chunk sees every patch that covers it, so its weights sum to the same
as in memory and the chunk equals the in-memory result (to float rounding). Patches that touch
several chunks are computed once per chunk: that redundant work is the price of independent
tasks, and :func:`redundancy` measures it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._checks import PatchgridError
from .backends import is_dask
from .grid import PatchGrid, _restore

__all__ = ["apply_dask", "extract_dask", "is_dask", "redundancy"]


def _sub_grid(grid: PatchGrid, picks: Sequence[range], shape: Sequence[int],
              origin: Sequence[int]) -> PatchGrid:  # fmt: skip
    """The patches ``picks`` (index ranges per tiled axis) of ``grid`` on a region of the image
    whose corner is ``origin`` (per tiled axis) and whose shape is ``shape`` (all axes)."""
    starts = [
        tuple(int(s) - o for s in grid.axis_starts(j)[r.start : r.stop])
        for j, (r, o) in enumerate(zip(picks, origin))
    ]
    return _restore(tuple(shape), grid.size, grid.stride, grid.axes, grid.edge, grid.pad_mode,
                    grid.pad_value, starts, [0] * len(grid.axes))  # fmt: skip


def extract_dask(image: Any, grid: PatchGrid, flatten: bool = False) -> Any:
    """Patches of a Dask array as a Dask array ``(*counts, *patch)``: one task per patch row.

    Each task reads the slab of the (lazily padded) image that one row of patches along the
    first tiled axis needs, and cuts it with the in-memory :func:`extract`.
    """
    import dask
    import dask.array as da

    from .extract import extract

    if any(after for _, after in grid.pad_width):
        width = [tuple(p) for p in grid.pad_width]
        if grid.pad_mode == "constant":
            image = da.pad(image, width, mode="constant", constant_values=grid.pad_value)
        else:
            image = da.pad(image, width, mode=grid.pad_mode)
    a0, p0 = grid.axes[0], grid.size[0]
    rows = []
    for i0, start in enumerate(grid.axis_starts(0).tolist()):
        region = [slice(None)] * grid.ndim
        region[a0] = slice(start, start + p0)
        shape = list(grid.padded_shape)
        shape[a0] = p0
        picks = [range(i0, i0 + 1)] + [range(c) for c in grid.counts[1:]]
        sub = _sub_grid(grid, picks, shape, [start] + [0] * (len(grid.axes) - 1))
        block = dask.delayed(_extract_block)(image[tuple(region)], sub, extract)
        rows.append(da.from_delayed(block, (1, *grid.counts[1:], *grid.patch_shape), image.dtype))
    patches = da.concatenate(rows, axis=0)
    return patches.reshape(len(grid), *grid.patch_shape) if flatten else patches


def _extract_block(region: np.ndarray, grid: PatchGrid, extract: Callable[..., Any]) -> Any:
    return extract(np.asarray(region), grid, copy=True)


def _touching(starts: np.ndarray, size: int, lo: int, hi: int) -> range:
    """Indices of the patches (sorted ``starts``, length ``size``) that overlap ``[lo, hi)``."""
    first = int(np.searchsorted(starts + size, lo, side="right"))
    last = int(np.searchsorted(starts, hi, side="left"))
    return range(first, max(first, last))


def redundancy(grid: PatchGrid, chunks: Sequence[Sequence[int]]) -> float:
    """How much more often ``fn`` runs on a chunked image than in memory, minus one.

    ``chunks`` are the output chunks along each axis (Dask's ``.chunks``). A patch is computed
    once for every chunk it touches, so the work is ``sum over chunks of the patches touching
    it`` over ``len(grid)``. Per axis, with chunks of ``c`` and patches of ``p`` every ``s``,
    about ``(c + p - s) / c`` times the patches run: chunks several times the patch size keep
    it low.
    """
    total = 1.0
    for j, a in enumerate(grid.axes):
        starts = grid.axis_starts(j)
        edges = np.cumsum([0, *chunks[a]])
        n = sum(
            len(_touching(starts, grid.size[j], lo, hi)) for lo, hi in itertools.pairwise(edges)
        )
        total *= n / max(grid.counts[j], 1)
    return total - 1.0


class _Window:
    """A NumPy region of a larger image, indexed with the larger image's coordinates."""

    def __init__(self, data: np.ndarray, origin: Sequence[int], shape: Sequence[int]) -> None:
        self.data, self.origin = data, list(origin)
        self.shape, self.dtype, self.ndim = tuple(shape), data.dtype, len(shape)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        local = tuple(
            slice((k.start or 0) - o, (k.stop if k.stop is not None else n) - o)
            for k, o, n in zip(key, self.origin, self.shape)
        )
        return self.data[local]


def apply_dask(
    fn: Callable[[Any], Any],
    image: Any,
    grid: PatchGrid,
    out_grid: PatchGrid,
    margin: Sequence[int],
    *,
    window: Any,
    reduce: str,
    batch_size: int,
    dtype: Any,
    fill: Any,
    probe: np.ndarray,
) -> Any:
    """The lazy result of :func:`apply` on a Dask array: one task per output chunk.

    ``probe`` is ``fn``'s merged output over one patch (its dtype and free axes' sizes).
    """
    import dask
    import dask.array as da

    from .extract import index_map

    factors = [po / pi for po, pi in zip(out_grid.size, grid.size)]
    out_chunks: list[tuple[int, ...]] = []
    for a in range(grid.ndim):
        if a in grid.axes:
            f = factors[grid.axes.index(a)]
            edges = np.round(np.cumsum([0, *image.chunks[a]]) * f).astype(int)
            out_chunks.append(tuple(int(e) for e in np.diff(edges)))
        else:
            out_chunks.append((out_grid.shape[a],))
    # Padded index maps: which input voxel each padded position reads (-1: a constant).
    maps = []
    for j, a in enumerate(grid.axes):
        before, after = margin[j], margin[j] + grid.pad_width[a][1]
        maps.append(index_map(image.shape[a], before, after, grid.pad_mode))
    free = [a for a in range(grid.ndim) if a not in grid.axes]
    class_axis = free[-1] if reduce == "argmax" else None
    probe_shape = list(probe.shape)
    if class_axis is not None:
        probe_shape.insert(class_axis, 1)
    blocks: dict[tuple[int, ...], Any] = {}
    block_ids = [range(len(c)) if a in grid.axes else range(1) for a, c in enumerate(out_chunks)]
    for bid in itertools.product(*block_ids):
        lo = [int(sum(out_chunks[a][: bid[a]])) for a in range(grid.ndim)]
        hi = [lo[a] + out_chunks[a][bid[a]] for a in range(grid.ndim)]
        picks = [_touching(out_grid.axis_starts(j), out_grid.size[j], lo[a], hi[a])
                 for j, a in enumerate(grid.axes)]  # fmt: skip
        out_shape = [hi[a] - lo[a] for a in range(grid.ndim)]
        for a in free:
            out_shape[a] = probe_shape[a]
        if class_axis is not None:
            out_shape.pop(class_axis)
        if any(len(r) == 0 for r in picks):
            value = np.full(out_shape, fill, dtype=probe.dtype)
            blocks[bid] = da.from_array(value, chunks=value.shape)
            continue
        # The input the touching patches read, as the index maps say, clipped to the image.
        region = [slice(None)] * grid.ndim
        origin = [0] * grid.ndim
        for j, a in enumerate(grid.axes):
            s = grid.axis_starts(j)
            first, last = (
                int(s[picks[j].start]),
                int(s[picks[j].stop - 1]) + grid.size[j] + 2 * margin[j],
            )
            ids = maps[j][first:last]
            ids = ids[ids >= 0]
            src_lo, src_hi = (int(ids.min()), int(ids.max()) + 1) if len(ids) else (0, 0)
            region[a] = slice(src_lo, src_hi)
            origin[a] = src_lo
        task = dask.delayed(_apply_block, pure=True)(
            fn,
            image[tuple(region)],
            origin,
            tuple(image.shape),
            grid,
            out_grid,
            picks,
            lo,
            hi,
            margin,
            window,
            reduce,
            batch_size,
            dtype,
            fill,
        )
        blocks[bid] = da.from_delayed(task, tuple(out_shape), probe.dtype)
    nested = _nest(blocks, [len(r) for r in block_ids], class_axis)
    return da.block(nested)


def _nest(blocks: dict[tuple[int, ...], Any], counts: Sequence[int], drop: int | None) -> Any:
    """``blocks`` keyed by block index as the nested lists ``da.block`` takes."""
    axes = [a for a in range(len(counts)) if a != drop]

    def level(prefix: tuple[int, ...], depth: int) -> Any:
        if depth == len(axes):
            key = list(prefix)
            if drop is not None:
                key.insert(drop, 0)
            return blocks[tuple(key)]
        return [level((*prefix, i), depth + 1) for i in range(counts[axes[depth]])]

    return level((), 0)


def _apply_block(
    fn: Callable[[Any], Any], data: Any, origin: Sequence[int], shape: Sequence[int],
    grid: PatchGrid, out_grid: PatchGrid, picks: Sequence[range], lo: Sequence[int],
    hi: Sequence[int], margin: Sequence[int], window: Any, reduce: str, batch_size: int,
    dtype: Any, fill: Any,
) -> np.ndarray:  # fmt: skip
    """One output chunk: the touching patches, read, run in fixed batches, blended, cropped."""
    from .apply import _core, _Reader
    from .backends import NUMPY
    from .merge import Merger

    source = _Window(np.asarray(data), origin, shape)
    reader = _Reader(source, grid, margin, NUMPY)
    # The touching patches on the region they cover, in output coordinates.
    # The region the touching patches and the chunk cover together, in output coordinates
    # (with gaps between patches, the chunk may reach past them).
    axes = grid.axes
    union_lo = [min(int(out_grid.axis_starts(j)[r.start]), lo[a])
                for j, (r, a) in enumerate(zip(picks, axes))]  # fmt: skip
    union_hi = [max(int(out_grid.axis_starts(j)[r.stop - 1]) + out_grid.size[j], hi[a])
                for j, (r, a) in enumerate(zip(picks, axes))]  # fmt: skip
    local_shape = list(out_grid.shape)
    for j, a in enumerate(grid.axes):
        local_shape[a] = union_hi[j] - union_lo[j]
    local = _sub_grid(out_grid, picks, local_shape, union_lo)
    merger = Merger(local, reduce=reduce, window=window, fill=fill, dtype=dtype)
    index = [np.arange(r.start, r.stop) for r in picks]
    positions = np.stack([m.ravel() for m in np.meshgrid(*index, indexing="ij")], axis=-1)
    full = [
        p * f for p, f in zip(reader.size, [po / pi for po, pi in zip(out_grid.size, grid.size)])
    ]
    in_shape = reader.patch_shape(shape)
    for first in range(0, len(positions), batch_size):
        chunk = positions[first : first + batch_size]
        rows = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
        batch = np.empty((batch_size, *in_shape), dtype=source.dtype)
        for b, pos in enumerate(rows):
            batch[b] = reader.read(grid.index(pos))
        result = np.asarray(fn(batch))
        if result.shape[0] != batch_size:
            raise PatchgridError(
                f"fn returned shape {result.shape} for a batch of shape {batch.shape}"
            )
        local_ids = np.ravel_multi_index(tuple((chunk - [r.start for r in picks]).T), local.counts)
        merger.add(_core(result[: len(chunk)], out_grid, full), local_ids)
    merged = merger.result()
    crop: list[Any] = []
    for a in range(grid.ndim):
        if a in grid.axes:
            j = grid.axes.index(a)
            crop.append(slice(lo[a] - union_lo[j], hi[a] - union_lo[j]))
        elif not (
            reduce == "argmax" and a == [b for b in range(grid.ndim) if b not in grid.axes][-1]
        ):
            crop.append(slice(None))
    return np.ascontiguousarray(merged[tuple(crop)])
