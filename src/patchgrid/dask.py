"""The distributed path: extract and apply on Dask arrays, equal to the in-memory results.

:func:`apply` runs in two layers of tasks. Every patch belongs to the output chunk where it
starts; one task per chunk reads the input its patches need, runs ``fn`` on them once, in
fixed-shape batches, and adds up their weighted outputs over the chunk and the halo the patches
reach past it. A second task per chunk adds the halos that its neighbours' patches spilled into
it, divides by the weights (per-axis profiles of the whole grid, as in memory), reduces and
casts. So ``fn`` runs exactly once per patch, and each chunk equals the in-memory result to
float rounding. The halos are the only extra work; :func:`redundancy` measures them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._checks import PatchgridError
from .backends import NUMPY, is_dask
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

    # Pad through index maps, as in memory: da.pad gets reflect and wrap wrong when the padding
    # is longer than the axis.
    from .extract import INDEX_MODES, extract, index_map

    for a, (_, after) in enumerate(grid.pad_width):
        if not after:
            continue
        if grid.pad_mode == "constant":
            shape = list(image.shape)
            shape[a] = after
            fill = da.full(shape, grid.pad_value, dtype=image.dtype, chunks=image.chunksize)
            image = da.concatenate([image, fill], axis=a)
        elif grid.pad_mode in INDEX_MODES:
            image = da.take(image, index_map(image.shape[a], 0, after, grid.pad_mode), axis=a)
        else:
            raise PatchgridError(
                f"pad_mode={grid.pad_mode!r} needs the whole image; with a Dask image use one of "
                f"{INDEX_MODES}"
            )
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


def _owned(starts: np.ndarray, edges: np.ndarray, b: int) -> range:
    """Indices of the patches (sorted ``starts``) that start in chunk ``b`` (``edges``)."""
    first = int(np.searchsorted(starts, edges[b], side="left"))
    last = int(np.searchsorted(starts, edges[b + 1], side="left"))
    return range(first, last)


def _halo(grid: PatchGrid, chunks: Sequence[Sequence[int]]) -> list[list[tuple[int, int]]]:
    """Per tiled axis and chunk, the region ``[lo, hi)`` its own patches cover (empty: 0, 0)."""
    out = []
    for j, a in enumerate(grid.axes):
        starts = grid.axis_starts(j)
        edges = np.cumsum([0, *chunks[a]])
        spans = []
        for b in range(len(chunks[a])):
            own = _owned(starts, edges, b)
            if len(own):
                spans.append((int(starts[own.start]), int(starts[own.stop - 1]) + grid.size[j]))
            else:
                spans.append((0, 0))
        out.append(spans)
    return out


def redundancy(grid: PatchGrid, chunks: Sequence[Sequence[int]]) -> float:
    """Extra work of the Dask path over the in-memory one: the halos, as a share of the output.

    ``fn`` runs once per patch, as in memory. What the chunking adds is that each chunk's
    patches reach past it: the partial sums over those halos are computed, sent to the
    neighbouring chunks and added there. This returns the voxels of all partial sums over the
    voxels of the output, minus one. Per axis, with chunks of ``c``, patches of ``p`` and
    stride ``s``, a chunk's patches cover about ``c + p - s``; the factors multiply over the
    chunked axes. ``chunks`` are the output's chunks along each axis (Dask's ``.chunks``).
    """
    total = 1.0
    for a, spans in zip(grid.axes, _halo(grid, chunks)):
        total *= sum(hi - lo for lo, hi in spans) / max(sum(chunks[a]), 1)
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
    """The lazy result of :func:`apply` on a Dask array (see the module's notes).

    ``probe`` is the result over one patch: it gives the output's dtype and free axes' sizes.
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
    maps = []
    for j, a in enumerate(grid.axes):
        before, after = margin[j], margin[j] + grid.pad_width[a][1]
        maps.append(index_map(image.shape[a], before, after, grid.pad_mode))
    free = [a for a in range(grid.ndim) if a not in grid.axes]
    class_axis = free[-1] if reduce == "argmax" else None
    probe_shape = list(probe.shape)
    if class_axis is not None:
        probe_shape.insert(class_axis, 1)
    bounds = {a: np.cumsum([0, *out_chunks[a]]) for a in grid.axes}
    halos = _halo(out_grid, out_chunks)
    counts = [len(out_chunks[a]) for a in grid.axes]
    # Layer 1: each chunk's own patches, run once, summed over the chunk and its halo.
    parts: dict[tuple[int, ...], list[Any]] = {}
    for bid in itertools.product(*[range(c) for c in counts]):
        own = [_owned(out_grid.axis_starts(j), bounds[a], b) for j, (a, b) in
               enumerate(zip(grid.axes, bid))]  # fmt: skip
        if any(len(r) == 0 for r in own):
            continue
        region = [slice(None)] * grid.ndim
        origin = [0] * grid.ndim
        for j, a in enumerate(grid.axes):
            s = grid.axis_starts(j)
            first = int(s[own[j].start])
            last = int(s[own[j].stop - 1]) + grid.size[j] + 2 * margin[j]
            ids = maps[j][first:last]
            ids = ids[ids >= 0]
            src_lo, src_hi = (int(ids.min()), int(ids.max()) + 1) if len(ids) else (0, 0)
            region[a] = slice(src_lo, src_hi)
            origin[a] = src_lo
        # The chunks this chunk's patches spill into, and the piece of the sums for each:
        # separate results, so a neighbour holds only its small piece until it is done.
        near = [[n for n, (s, e) in enumerate(zip(bounds[a][:-1], bounds[a][1:]))
                 if s < halos[j][bid[j]][1] and e > halos[j][bid[j]][0]]
                for j, a in enumerate(grid.axes)]  # fmt: skip
        targets = list(itertools.product(*near))
        cuts = []
        for t in targets:
            cut = []
            for j, a in enumerate(grid.axes):
                first = max(int(bounds[a][t[j]]), halos[j][bid[j]][0])
                stop = min(int(bounds[a][t[j] + 1]), halos[j][bid[j]][1])
                cut.append((first, stop))
            cuts.append(cut)
        pieces = dask.delayed(_partial, pure=True, nout=len(targets))(
            fn, image[tuple(region)], origin, tuple(image.shape), grid, out_grid, own, margin,
            window, reduce, batch_size, cuts,
        )  # fmt: skip
        for t, cut, piece in zip(targets, cuts, pieces):
            parts.setdefault(t, []).append((piece, [c[0] for c in cut]))
    # Layer 2: each chunk adds what its own and its neighbours' patches put in it, and finishes.
    blocks: dict[tuple[int, ...], Any] = {}
    for bid in itertools.product(*[range(c) for c in counts]):
        lo = [int(bounds[a][b]) for a, b in zip(grid.axes, bid)]
        hi = [int(bounds[a][b + 1]) for a, b in zip(grid.axes, bid)]
        sources = parts.get(bid, [])
        shape = list(probe_shape)
        for a, l_, h in zip(grid.axes, lo, hi):
            shape[a] = h - l_
        if class_axis is not None:
            shape.pop(class_axis)
        task = dask.delayed(_finish, pure=True)(
            sources,
            lo,
            hi,
            out_grid,
            window,
            reduce,
            fill,
            probe.dtype,
            probe_shape,
            class_axis,
        )
        key = list(bid)
        full_key = [0] * grid.ndim
        for a, b in zip(grid.axes, key):
            full_key[a] = b
        blocks[tuple(full_key)] = da.from_delayed(task, tuple(shape), probe.dtype)
    nested = _nest(blocks, [len(c) for c in out_chunks], class_axis)
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


def _partial(
    fn: Callable[[Any], Any], data: Any, origin: Sequence[int], shape: Sequence[int],
    grid: PatchGrid, out_grid: PatchGrid, own: Sequence[range], margin: Sequence[int],
    window: Any, reduce: str, batch_size: int, cuts: Sequence[Sequence[tuple[int, int]]],
) -> tuple[tuple[np.ndarray, np.ndarray | None], ...]:  # fmt: skip
    """A chunk's own patches, run once in fixed batches, summed (weighted) over their region.

    Returns, for each ``cuts`` entry (a ``[start, stop)`` per tiled axis, in output
    coordinates), a copy of the sums over it and, for an array window, of the summed weights
    (None otherwise).
    """
    from . import windows
    from .apply import _core, _Reader

    source = _Window(np.asarray(data), origin, shape)
    reader = _Reader(source, grid, margin, NUMPY)
    axes = grid.axes
    base = [int(out_grid.axis_starts(j)[r.start]) for j, r in enumerate(own)]
    ext = [int(out_grid.axis_starts(j)[r.stop - 1]) + out_grid.size[j] - b
           for j, (r, b) in enumerate(zip(own, base))]  # fmt: skip
    op = {"max": np.maximum, "min": np.minimum}.get(reduce, np.add)
    weighted = reduce in ("mean", "sum", "argmax")
    wshape = [1] * grid.ndim
    for a, p in zip(axes, out_grid.size):
        wshape[a] = p
    w = windows.as_window_array(window, out_grid.size).reshape(wshape) if weighted else None
    array_window = weighted and windows.profiles(window, out_grid.size) is None
    full = [
        p * f for p, f in zip(reader.size, [po / pi for po, pi in zip(out_grid.size, grid.size)])
    ]
    in_shape = reader.patch_shape(shape)
    positions = np.stack([m.ravel() for m in np.meshgrid(*[np.arange(r.start, r.stop) for r in own],
                                                           indexing="ij")], axis=-1)  # fmt: skip
    acc: np.ndarray | None = None
    wacc: np.ndarray | None = None
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
        result = _core(result[: len(chunk)], out_grid, full)
        if acc is None:
            acc_shape = list(result.shape[1:])
            for a, e in zip(axes, ext):
                acc_shape[a] = e
            kind = result.dtype.kind
            acc_dtype = (result.dtype if reduce in ("max", "min")
                         else np.result_type(result.dtype, np.float32) if kind in "fc"
                         else np.dtype(np.float64))  # fmt: skip
            start = 0 if reduce not in ("max", "min") else NUMPY.extreme(acc_dtype, reduce == "min")
            acc = np.full(acc_shape, start, dtype=acc_dtype)
            if array_window:
                wacc = np.zeros([ext[axes.index(a)] if a in axes else 1 for a in range(grid.ndim)])
        for patch, pos in zip(result, chunk):
            sl: list[Any] = [slice(None)] * grid.ndim
            for j, a in enumerate(axes):
                s = int(out_grid.axis_starts(j)[pos[j]]) - base[j]
                sl[a] = slice(s, s + out_grid.size[j])
            target = acc[tuple(sl)]
            op(target, patch if w is None else patch * w, out=target)
            if wacc is not None and w is not None:
                wacc[tuple(sl)] += w
    assert acc is not None
    out = []
    for cut in cuts:
        piece: list[Any] = [slice(None)] * grid.ndim
        for j, a in enumerate(axes):
            piece[a] = slice(cut[j][0] - base[j], cut[j][1] - base[j])
        wsl = tuple(p if a in axes else slice(None) for a, p in enumerate(piece))
        out.append((acc[tuple(piece)].copy(), None if wacc is None else wacc[wsl].copy()))
    return tuple(out)


def _finish(
    sources: Sequence[tuple[tuple[np.ndarray, np.ndarray | None], Sequence[int]]],
    lo: Sequence[int], hi: Sequence[int], out_grid: PatchGrid, window: Any, reduce: str,
    fill: Any, dtype: Any, probe_shape: Sequence[int], class_axis: int | None,
) -> np.ndarray:  # fmt: skip
    """One output chunk: the partial sums that reach it, added, normalised, reduced, cast."""
    from . import windows
    from .merge import _divide_by_profiles, _profile_sum

    axes = out_grid.axes
    free_shape = list(probe_shape)
    if not sources:
        shape = list(free_shape)
        for a, l_, h in zip(axes, lo, hi):
            shape[a] = h - l_
        if class_axis is not None:
            shape.pop(class_axis)
        return np.full(shape, fill, dtype=dtype)
    acc0 = sources[0][0][0]
    shape = list(acc0.shape)
    for a, l_, h in zip(axes, lo, hi):
        shape[a] = h - l_
    start = 0 if reduce not in ("max", "min") else NUMPY.extreme(acc0.dtype, reduce == "min")
    acc = np.full(shape, start, acc0.dtype)
    wacc = None
    for (part, wpart), base in sources:
        dst: list[Any] = [slice(None)] * out_grid.ndim
        src: list[Any] = [slice(None)] * out_grid.ndim
        for j, a in enumerate(axes):
            s, e = max(lo[j], base[j]), min(hi[j], base[j] + part.shape[a])
            dst[a], src[a] = slice(s - lo[j], e - lo[j]), slice(s - base[j], e - base[j])
        piece = part[tuple(src)]
        op = {"max": np.maximum, "min": np.minimum}.get(reduce, np.add)
        op(acc[tuple(dst)], piece, out=acc[tuple(dst)])
        if wpart is not None:
            if wacc is None:
                wacc = np.zeros([s if a in axes else 1 for a, s in enumerate(shape)])
            wacc[tuple(dst)] += wpart[tuple(src)]
    ones = reduce != "mean"
    profs = windows.profiles(None if ones else window, out_grid.size)
    uncovered: list[Any] = []
    if wacc is not None and not ones:
        cov = wacc
        np.divide(acc, np.where(cov > 0, cov, 1), out=acc, casting="unsafe")
        uncovered.append(np.broadcast_to(cov == 0, acc.shape))
    else:
        assert profs is not None
        sliced = []
        for j, a in enumerate(axes):
            prof = _profile_sum(out_grid.axis_starts(j), profs[j], out_grid.padded_shape[a])
            sliced.append(prof[lo[j] : hi[j]])
        if not ones:
            _divide_by_profiles(acc, axes, sliced)
        for a, prof in zip(axes, sliced):
            if (prof == 0).any():
                shape1 = [1] * acc.ndim
                shape1[a] = len(prof)
                uncovered.append(np.broadcast_to((prof == 0).reshape(shape1), acc.shape))
    mask = np.logical_or.reduce(uncovered) if uncovered else None
    if class_axis is not None:
        result = np.argmax(acc, axis=class_axis)
        if mask is not None:
            mask = mask.take(0, axis=class_axis)
    else:
        result = acc
        if (
            np.dtype(dtype).kind in "iub"
            and result.dtype.kind in "fc"
            and reduce in ("mean", "sum")
        ):
            result = np.rint(result)
    result = result.astype(dtype, copy=False)
    if mask is not None:
        result = np.where(mask, np.array(fill, dtype=dtype), result)
    return np.ascontiguousarray(result)
