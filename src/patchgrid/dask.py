"""The distributed path: extract and apply on Dask arrays, equal to the in-memory results.

:func:`apply` on a Dask array runs tasks that share nothing. A task takes a block of chunks and
goes through them in order: each chunk runs the patches that start in it, in fixed-shape
batches, sums their weighted outputs over the chunk and the part they reach past it, adds what
the chunks before it in the block passed on, finishes (divides by the weights of the whole
grid, reduces, casts) and passes its own spill on. At a block's borders the patches that reach
in from outside run again, summed only over the chunk: that is the repeated work, measured by
:func:`redundancy`, and the price of tasks that never wait for one another, so a worker's
memory is bounded by the chunks its running task holds, never by the volume. A lazy result
takes blocks of one chunk (Dask stores finished chunks late: blocks of 2 or 4 chunks left
270-1070 MiB of them waiting per worker); ``out=`` a zarr array takes a whole run along the
axis with the most chunks and up to ``SECOND`` along the next, and the tasks write their chunks
themselves. Tasks read their input regions straight from the array behind ``da.from_zarr`` (or
``da.from_array`` of a lazy array).
"""

from __future__ import annotations

import itertools
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from ._batches import check_output, core_of
from ._checks import PatchgridError
from ._progress import steps
from ._regions import INDEX_MODES, Reader, index_map
from .backends import NUMPY, WIDE, check_cast, check_exact_sum, is_dask, lossless
from .grid import PatchGrid, restore

#: Most chunks along the second chained axis of a task's block (``out=``): the task keeps the
#: partial sums for the next row of its block, one chunk's face each.
SECOND = 4

__all__ = ["Redundancy", "apply_dask", "extract_dask", "is_dask", "redundancy"]


def _sub_grid(grid: PatchGrid, picks: Sequence[range], shape: Sequence[int],
              origin: Sequence[int]) -> PatchGrid:  # fmt: skip
    """The patches ``picks`` (index ranges per tiled axis) of ``grid`` on a region of the image
    whose corner is ``origin`` (per tiled axis) and whose shape is ``shape`` (all axes)."""
    starts = [
        tuple(int(s) - o for s in grid.axis_starts(j)[r.start : r.stop])
        for j, (r, o) in enumerate(zip(picks, origin))
    ]
    return restore(tuple(shape), grid.size, grid.stride, grid.axes, grid.edge, grid.pad_mode,
                    grid.pad_value, starts, [0] * len(grid.axes))  # fmt: skip


def extract_dask(
    image: Any, grid: PatchGrid, extract: Callable[..., Any], flatten: bool = False
) -> Any:
    """Patches of a Dask array as a Dask array ``(*counts, *patch)``: one task per patch row.

    Each task reads the slab of the (lazily padded) image that one row of patches along the
    first tiled axis needs, and cuts it with ``extract``, the in-memory extract its caller
    hands down (the Dask path never imports the layer above it).
    """
    import dask
    import dask.array as da

    # Pad through index maps, as in memory: da.pad gets reflect and wrap wrong when the padding
    # is longer than the axis.
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


class Redundancy(NamedTuple):
    """The Dask path's extra work over the in-memory one (shares, 0.25 is 25%)."""

    calls: float
    """Extra ``fn`` calls: patches run again because they reach into another block of chunks."""
    sums: float
    """Extra voxels summed: the partial sums each chunk keeps past its end and passes on."""


class _Axis:
    """The plan along one tiled axis (output coordinates).

    The chunks form runs of consecutive chunks. Inside a run a chunk runs the patches that start
    in it, sums them over ``[lo, reach)`` and passes the part past its end to the next chunk of
    the run. The first chunk of a run also runs the patches that start before the run and reach
    into it (they are run again there: the repeated work); no sum leaves its run.
    """

    def __init__(self, starts: np.ndarray, size: int, chunks: Sequence[int],
                 runs: Sequence[tuple[int, int]]) -> None:  # fmt: skip
        self.edges = [int(e) for e in np.cumsum([0, *chunks])]
        self.head: list[int] = []
        self.tail: list[int] = []
        self.first: list[int] = []
        self.last: list[int] = []
        self.reach: list[int] = []
        for g0, g1 in runs:
            for b in range(g0, g1 + 1):
                lo, hi = self.edges[b], self.edges[b + 1]
                if b == g0:
                    first = int(np.searchsorted(starts, lo - size, side="right"))
                else:
                    first = int(np.searchsorted(starts, lo, side="left"))
                last = max(first, int(np.searchsorted(starts, hi, side="left")))
                reach = max(hi, int(starts[last - 1]) + size if last > first else hi)
                if b > g0:
                    reach = max(reach, self.reach[-1])
                self.head.append(g0)
                self.tail.append(g1)
                self.first.append(first)
                self.last.append(last)
                self.reach.append(min(reach, self.edges[g1 + 1]))

    def core(self, b: int) -> tuple[int, int]:
        return self.edges[b], self.edges[b + 1]


def _threads() -> int:
    """Threads of the Dask client in use, else this machine's cores."""
    client = _client()
    if client is not None:
        return max(1, int(sum(client.nthreads().values())))
    return os.cpu_count() or 1


def _plan(grid: PatchGrid, chunks: Sequence[Sequence[int]], threads: int,
          chained: bool) -> list[_Axis]:  # fmt: skip
    """Runs of chunks along each tiled axis (``chunks``: the chunks of the tiled axes).

    Not ``chained`` (a lazy result): every chunk is a run of its own, a task of its own. Chained
    (``out=``): a task takes a block of chunks, a whole run along the axis with the most chunks
    and up to ``SECOND`` along the next, and passes partial sums on inside it, so their patches
    run once; the rest of the axes take runs of one. Runs are halved, the second axis's first,
    while there are fewer than two tasks per thread.
    """
    counts = [len(c) for c in chunks]
    lengths = [1] * len(counts)
    order = sorted(range(len(counts)), key=lambda j: -counts[j])
    if chained and counts:
        lengths[order[0]] = counts[order[0]]
        if len(order) > 1:
            lengths[order[1]] = min(counts[order[1]], SECOND)

    def tasks() -> int:
        return int(np.prod([-(-n // max(length, 1)) for n, length in zip(counts, lengths)]))

    while tasks() < 2 * threads and any(length > 1 for length in lengths):
        j = order[1] if len(order) > 1 and lengths[order[1]] > 1 else order[0]
        lengths[j] = -(-lengths[j] // 2)
    plan = []
    for j, (n, length) in enumerate(zip(counts, lengths)):
        pieces = -(-n // length)
        cuts = np.linspace(0, n, pieces + 1).round().astype(int)
        runs = [(int(lo), int(hi) - 1) for lo, hi in itertools.pairwise(cuts) if hi > lo]
        plan.append(_Axis(grid.axis_starts(j), grid.size[j], chunks[j], runs))
    return plan


def redundancy(
    grid: PatchGrid, chunks: Sequence[Sequence[int]], threads: int | None = None,
    out: bool = False,
) -> Redundancy:  # fmt: skip
    """Extra work of :func:`apply` on a Dask array chunked as ``chunks`` (Dask's ``.chunks``).

    ``calls``: patches run more than once over patches. With chunks of ``c`` along an axis that
    is not chained, patches of ``p`` at stride ``s``, a chunk runs about ``(c + p - s) / s``
    patches where ``c / s`` start in it: ``1 + (p - s) / c`` per such axis; the factors multiply.
    ``sums``: voxels summed over voxels of the output, minus one (the chained axis keeps
    ``p - s`` voxels past each chunk). ``threads``: of the cluster (by default the client's);
    ``out``: for ``apply(..., out=zarr_array)``, whose tasks take blocks of chunks.

    ``grid`` and ``chunks`` are the output's: with ``scale`` other than 1, pass
    ``grid.scaled(scale)`` and the result's ``.chunks`` (rounded chunk edges move patches
    between chunks). The padding of each task's last batch to ``batch_size`` is not counted.
    """
    k = len(grid.axes)
    plan = _plan(grid, [chunks[a] for a in grid.axes], threads or _threads(), out)
    runs = np.prod([sum(last - first for first, last in zip(ax.first, ax.last)) for ax in plan])
    sums = 1.0
    for ax in plan:
        sums *= sum(r - lo for r, lo in zip(ax.reach, ax.edges)) / max(ax.edges[-1], 1)
    return Redundancy(float(runs) / max(len(grid), 1) - 1.0 if k else 0.0, sums - 1.0)


def _store(image: Any) -> Any:
    """The array a Dask array reads its chunks from, if reading is all its graph does.

    ``da.from_zarr`` and ``da.from_array`` of a lazy array build one read per chunk. Tasks
    that read their own regions from that array hold no input chunk that another task waits
    for; None when the graph computes anything else.
    """
    from dask.array.core import getter

    try:
        graph = image.__dask_graph__()
        layers = dict(graph.layers)
        if set(layers) - {image.name} - {n for n in layers if n.startswith("original-")}:
            return None
        task = graph[(image.name,) + (0,) * image.ndim]
        if getattr(task, "func", None) is not getter:
            return None
        lock = task.kwargs.get("lock", task.args[3] if len(task.args) > 3 else None)
        if getattr(lock, "value", lock):
            return None  # reads that need a lock (HDF5) go through Dask's own tasks
        source = task.args[0]
        if hasattr(source, "key"):
            source = graph[source.key]
        source = getattr(source, "value", source)
        if tuple(source.shape) != tuple(image.shape) or np.dtype(source.dtype) != image.dtype:
            return None
        if isinstance(source, np.ndarray) or not hasattr(source, "__getitem__"):
            return None
        return source
    except Exception:  # any graph this does not recognise is computed as Dask builds it
        return None


class _Window:
    """Pieces of a larger image, indexed with the larger image's coordinates: ``spans`` gives,
    per axis, the pieces ``(start, stop, local start)`` that ``data`` holds side by side."""

    def __init__(self, data: np.ndarray, spans: Sequence[Sequence[tuple[int, int, int]]],
                 shape: Sequence[int]) -> None:  # fmt: skip
        self.data, self.spans = data, spans
        self.shape, self.dtype, self.ndim = tuple(shape), data.dtype, len(shape)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        local = []
        for k, pieces, n in zip(key, self.spans, self.shape):
            start, stop = k.start or 0, k.stop if k.stop is not None else n
            lo, _, at = next(p for p in pieces if p[0] <= start and stop <= p[1])
            local.append(slice(start - lo + at, stop - lo + at))
        return self.data[tuple(local)]


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
    out: Any = None,
    progress: Any = None,
) -> Any:
    """The result of :func:`apply` on a Dask array (see the module's notes): lazy, or written
    into ``out`` (a zarr array) by the tasks themselves and ``out`` returned.

    ``probe`` is the result over one patch: it gives the output's dtype and free axes' sizes.
    """
    import dask
    import dask.array as da

    free = [a for a in range(grid.ndim) if a not in grid.axes]
    class_axis = free[-1] if reduce == "argmax" else None
    probe_shape = list(probe.shape)
    if class_axis is not None:
        probe_shape.insert(class_axis, 1)
    factors = [po / pi for po, pi in zip(out_grid.size, grid.size)]
    out_chunks: list[tuple[int, ...]] = []
    for a in range(grid.ndim):
        if a in grid.axes:
            f = factors[grid.axes.index(a)]
            edges = np.round(np.cumsum([0, *image.chunks[a]]) * f).astype(int)
            out_chunks.append(tuple(int(e) for e in np.diff(edges)))
        else:
            out_chunks.append((probe_shape[a],))  # fn's size (a class axis: 1, dropped later)
    maps = []
    for j, a in enumerate(grid.axes):
        before, after = margin[j], margin[j] + grid.pad_width[a][1]
        maps.append(index_map(image.shape[a], before, after, grid.pad_mode))
    if out is not None:
        _check_out(out, out_chunks, class_axis)
    if not NUMPY.fits(fill, np.dtype(dtype)):
        raise PatchgridError(
            f"fill={fill!r} cannot be stored in the output dtype {np.dtype(dtype)}; give a fill "
            f"that fits or a dtype= that holds it"
        )
    plan = _plan(out_grid, [out_chunks[a] for a in grid.axes], _threads(), out is not None)
    store = _store(image)
    name = f"patchgrid-apply-{uuid.uuid4().hex}"
    fn_key = dask.delayed(fn, name=f"{name}-fn", traverse=False)
    source = None if store is None else dask.delayed(store, name=f"{name}-source", traverse=False)
    target = None if out is None else dask.delayed(out, name=f"{name}-out", traverse=False)
    spec = _Spec(grid, out_grid, tuple(margin), tuple(image.shape), window, reduce, batch_size,
                 fill, np.dtype(dtype), tuple(probe_shape), class_axis,
                 _coverage(out_grid, window, reduce))  # fmt: skip
    blocks: dict[tuple[int, ...], Any] = {}
    tasks, patches = [], []
    for block in itertools.product(*[sorted(set(zip(ax.head, ax.tail))) for ax in plan]):
        # The longest run outermost: a chunk's partial sums wait for the next one along each
        # axis only while the inner axes' runs go by (at most SECOND chunks), not a whole run.
        outer = sorted(range(len(block)), key=lambda j: block[j][0] - block[j][1])
        ids = sorted(itertools.product(*[range(g0, g1 + 1) for g0, g1 in block]),
                     key=lambda bid: tuple(bid[j] for j in outer))  # fmt: skip
        steps = [_step(grid, plan, maps, margin, bid, class_axis) for bid in ids]
        datas = [None if any(not len(r) for r in step.picks) or source is not None
                 else [image[region] for region, _ in step.reads] for step in steps]  # fmt: skip
        task = dask.delayed(_run, pure=False, nout=None if out is not None else len(steps))(
            fn_key, source, datas, steps, spec, target, dask_key_name=(name, *ids[0]),
        )  # fmt: skip
        tasks.append(task)
        patches.append(sum(int(np.prod([len(r) for r in s.picks])) for s in steps))
        if out is not None:
            continue
        for i, step in enumerate(steps):
            shape = list(probe_shape)
            for a, (lo, hi) in zip(grid.axes, step.cores):
                shape[a] = hi - lo
            if class_axis is not None:
                shape.pop(class_axis)
            full_key = [0] * grid.ndim
            for a, b in zip(grid.axes, step.bid):
                full_key[a] = b
            blocks[tuple(full_key)] = da.from_delayed(task[i], tuple(shape), np.dtype(dtype))
    if out is None:
        return da.block(_nest(blocks, [len(c) for c in out_chunks], class_axis))
    _compute(tasks, patches, progress)
    return out


def _check_out(out: Any, out_chunks: Sequence[Sequence[int]], class_axis: int | None) -> None:
    """``out`` must be a zarr array of the result's shape, whose chunks (shards, if sharded) no
    two tasks share, in a store that the workers reach."""
    if not type(out).__module__.startswith("zarr"):
        raise TypeError(
            f"out= with a Dask image takes a zarr array that the workers write into, got "
            f"{type(out).__name__}; or leave out= out and store the lazy result with .to_zarr()"
        )
    chunks = [c for a, c in enumerate(out_chunks) if a != class_axis]
    shape = tuple(sum(c) for c in chunks)
    if tuple(out.shape) != shape:
        raise PatchgridError(f"out has shape {tuple(out.shape)}; the result's shape is {shape}")
    shards = getattr(out, "shards", None)
    units = tuple(shards if shards is not None else out.chunks)
    what = "shards" if shards is not None else "chunks"
    for a, (mine, theirs) in enumerate(zip(chunks, units)):
        edges = [int(e) for e in np.cumsum(mine)[:-1]]
        if any(e % int(theirs) for e in edges):
            fits = tuple(int(np.gcd.reduce(np.cumsum(c)[:-1])) if len(c) > 1 else int(c[0])
                         for c in chunks)  # fmt: skip
            raise PatchgridError(
                f"out's {what} {units} cut across the Dask chunks {tuple(mine)} of axis {a}: "
                f"two tasks would write one zarr {what[:-1]}; give out {what} that divide the "
                f"Dask chunks (e.g. {what}={fits})"
            )
    if type(getattr(out, "store", None)).__name__ == "MemoryStore" and _client() is not None:
        raise PatchgridError(
            "out is a zarr array in this process's memory (MemoryStore): the workers would "
            "write into their own copies of it; give out a store on disk or shared storage"
        )


def _client() -> Any:
    """The dask.distributed client that computes, unless Dask's config names a scheduler."""
    import dask

    if "distributed" not in sys.modules:
        return None
    if dask.config.get("scheduler", None) not in (None, "dask.distributed", "distributed"):
        return None
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        return None


def _compute(tasks: Sequence[Any], patches: Sequence[int], progress: Any) -> None:
    """Run the tasks that write ``out``: on the Dask client in use unless a scheduler is set in
    Dask's config, else on Dask's scheduler."""
    import dask

    step, close = steps(progress, sum(patches), "patchgrid.apply")
    try:
        client = _client()
        if client is not None:
            from distributed import as_completed

            futures = client.compute(list(tasks))
            count = {f.key: n for f, n in zip(futures, patches)}
            for future in as_completed(futures):
                future.result()  # raises the task's error here
                step(count[future.key])
            return
        from dask.callbacks import Callback

        count = {t.key: n for t, n in zip(tasks, patches)}

        class _Count(Callback):  # type: ignore[misc]
            def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:
                if key in count:
                    step(count[key])

        with _Count():
            dask.compute(*tasks)
    finally:
        close()


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


class _Spec(NamedTuple):
    """What every chunk's task shares."""

    grid: PatchGrid
    out_grid: PatchGrid
    margin: tuple[int, ...]
    shape: tuple[int, ...]
    window: Any
    reduce: str
    batch_size: int
    fill: Any
    dtype: np.dtype
    probe_shape: tuple[int, ...]
    class_axis: int | None
    coverage: tuple[np.ndarray, ...] | None  # per tiled axis, the whole grid's; see _coverage


def _coverage(out_grid: PatchGrid, window: Any, reduce: str) -> tuple[np.ndarray, ...] | None:
    """Per tiled axis, the sum of the window's profile over every patch of the whole grid
    (ones for reductions that do not divide); None for a window that is not separable."""
    from . import windows
    from ._finish import profile_sum

    profs = windows.profiles(None if reduce != "mean" else window, out_grid.size)
    if profs is None:
        return None
    # In extended precision where there is one, as the weights of the tasks: float64 patches
    # summed in longdouble then come back exactly where they are equal.
    wide = np.longdouble if WIDE else np.float64
    return tuple(profile_sum(out_grid.axis_starts(j), prof, out_grid.padded_shape[a], wide)
                 for j, (a, prof) in enumerate(zip(out_grid.axes, profs)))  # fmt: skip


class _Step(NamedTuple):
    """One chunk of a block: its patches, its input region, its core and how far its sums reach."""

    bid: tuple[int, ...]
    picks: list[range]
    reads: list[tuple[tuple[slice, ...], tuple[slice, ...]]]
    local_shape: tuple[int, ...]
    spans: list[list[tuple[int, int, int]]]
    cores: list[tuple[int, int]]
    reach: list[int]
    send: list[bool]
    target: tuple[slice, ...]


def _step(grid: PatchGrid, plan: Sequence[_Axis], maps: Sequence[np.ndarray],
          margin: Sequence[int], bid: Sequence[int], class_axis: int | None) -> _Step:  # fmt: skip
    """The :class:`_Step` of chunk ``bid`` (a chunk index per tiled axis).

    The input the chunk's patches need is read in pieces: along an axis, source indices far
    apart (a wrapped border) are separate pieces, so no read spans the whole axis.
    """
    picks = [range(ax.first[b], ax.last[b]) for ax, b in zip(plan, bid)]
    spans: list[list[tuple[int, int, int]]] = [[(0, n, 0)] for n in grid.shape]
    for j, (a, r) in enumerate(zip(grid.axes, picks)):
        if not len(r):
            continue
        s = grid.axis_starts(j)
        reach = grid.size[j] + 2 * margin[j]
        ids = maps[j][int(s[r.start]) : int(s[r.stop - 1]) + reach]
        ids = np.unique(ids[ids >= 0])
        if not len(ids):
            spans[a] = [(0, 0, 0)]
            continue
        cuts = np.flatnonzero(np.diff(ids) > reach) + 1
        pieces, at = [], 0
        for part in np.split(ids, cuts):
            lo, hi = int(part[0]), int(part[-1]) + 1
            pieces.append((lo, hi, at))
            at += hi - lo
        spans[a] = pieces
    reads = []
    for combo in itertools.product(*spans):
        reads.append((tuple(slice(lo, hi) for lo, hi, _ in combo),
                      tuple(slice(at, at + hi - lo) for lo, hi, at in combo)))  # fmt: skip
    local_shape = tuple(sum(hi - lo for lo, hi, _ in pieces) for pieces in spans)
    cores = [ax.core(b) for ax, b in zip(plan, bid)]
    target: list[slice] = [slice(None)] * grid.ndim
    for a, (lo, hi) in zip(grid.axes, cores):
        target[a] = slice(lo, hi)
    if class_axis is not None:
        target.pop(class_axis)
    return _Step(tuple(bid), picks, reads, local_shape, spans, cores,
                 [ax.reach[b] for ax, b in zip(plan, bid)],
                 [b < ax.tail[b] for ax, b in zip(plan, bid)], tuple(target))  # fmt: skip


def _assemble(parts: Sequence[Any], step: _Step) -> np.ndarray:
    """The pieces a chunk reads, side by side in one array (one piece: as it is)."""
    first = np.asarray(parts[0])
    if len(parts) == 1:
        return first
    data = np.empty(step.local_shape, dtype=first.dtype)
    for (_, local), part in zip(step.reads, parts):
        data[local] = part
    return data


Carry = tuple[np.ndarray, "np.ndarray | None"] | None


def _run(fn: Callable[[Any], Any], source: Any, datas: Sequence[Any], steps: Sequence[_Step],
         spec: _Spec, out: Any) -> Any:  # fmt: skip
    """A block of chunks in C order, each passing its partial sums past its end on to the next
    chunk along each axis of the block. Returns the finished chunks, or writes them into
    ``out`` (and returns how many it wrote)."""
    k = len(spec.grid.axes)
    pending: dict[tuple[int, ...], list[Carry]] = {}
    done = []
    for step, data in zip(steps, datas):
        if all(len(r) for r in step.picks):
            if data is None:  # this chunk's region of the store, nothing else
                data = [source[region] for region, _ in step.reads]
            data = _assemble(data, step)
        core, *carries = _chunk(fn, data, step, spec, pending.pop(step.bid, [None] * k))
        data = None
        for j, carry in enumerate(carries):
            if carry is not None:
                nxt = (*step.bid[:j], step.bid[j] + 1, *step.bid[j + 1 :])
                pending.setdefault(nxt, [None] * k)[j] = carry
        if out is not None:
            out[step.target] = core
            del core  # a view of the chunk's sums: let them go before the next chunk's
        else:
            done.append(np.ascontiguousarray(core))
    return len(steps) if out is not None else tuple(done)


def _chunk(
    fn: Callable[[Any], Any],
    data: Any,
    step: _Step,
    spec: _Spec,
    incoming: Sequence[Carry],
) -> tuple[Any, ...]:
    """One output chunk: its patches run in fixed batches and summed over ``[lo, reach)``, the
    partial sums its run's earlier chunks passed on added, the chunk finished (normalised,
    reduced, cast), and the sums past its end cut out for the next chunk along each axis.

    Returns the finished chunk and, per tiled axis, the partial sums for the next chunk (None
    when there is no next chunk in the run or nothing to pass on).
    """
    from . import windows
    from ._finish import weight_array

    grid, out_grid, axes = spec.grid, spec.out_grid, spec.grid.axes
    picks, cores, reach, send = step.picks, step.cores, step.reach, step.send
    lo = [c[0] for c in cores]
    ext = [r - c[0] for r, c in zip(reach, cores)]
    op = {"max": np.maximum, "min": np.minimum}.get(spec.reduce, np.add)
    weighted = spec.reduce in ("mean", "sum", "argmax")
    array_window = weighted and windows.profiles(spec.window, out_grid.size) is None
    acc: np.ndarray | None = None
    patch_dtype: np.dtype | None = None  # fn's output dtype, once seen
    wacc: np.ndarray | None = None  # the weights summed, for a window that is not separable
    wshape_acc = [ext[axes.index(a)] if a in axes else 1 for a in range(grid.ndim)]

    def start(like: np.ndarray, kind_dtype: np.dtype) -> None:
        nonlocal acc, wacc
        shape = list(like.shape)
        for a, e in zip(axes, ext):
            shape[a] = e
        first = (0 if spec.reduce not in ("max", "min")
                 else NUMPY.extreme(kind_dtype, spec.reduce == "min"))  # fmt: skip
        acc = np.full(shape, first, dtype=kind_dtype)
        if array_window:
            wacc = np.zeros(wshape_acc, dtype=np.finfo(kind_dtype).dtype)

    if data is not None:
        source = _Window(np.asarray(data), step.spans, spec.shape)
        reader = Reader(source, grid, spec.margin, NUMPY)
        w = (
            weight_array(
                windows.as_window_array(spec.window, out_grid.size),
                windows.profiles(spec.window, out_grid.size),
                out_grid,
                np.longdouble if WIDE else np.float64,
            )
            if weighted
            else None
        )
        factors = [po / pi for po, pi in zip(out_grid.size, grid.size)]
        full = [p * f for p, f in zip(reader.size, factors)]
        in_shape = reader.patch_shape(spec.shape)
        positions = np.stack(
            [m.ravel() for m in np.meshgrid(*[np.arange(r.start, r.stop) for r in picks],
                                            indexing="ij")], axis=-1)  # fmt: skip
        out_starts = [out_grid.axis_starts(j) for j in range(len(axes))]
        size = spec.batch_size
        for at in range(0, len(positions), size):
            chunk = positions[at : at + size]
            rows = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])
            batch = np.empty((size, *in_shape), dtype=source.dtype)
            for b, pos in enumerate(rows):
                batch[b] = reader.read(grid.index(pos))
            result = check_output(fn(batch), batch, NUMPY, out_grid, full, fn)
            result = core_of(result[: len(chunk)], out_grid, full)
            if acc is None:
                patch_dtype = result.dtype
                start(result[0], NUMPY.acc_dtype(result.dtype, "mean" if spec.reduce == "argmax"
                                                 else spec.reduce))  # fmt: skip
            assert acc is not None
            if spec.reduce not in ("max", "min") and result.dtype.kind in "iu":
                uniform = spec.window is None or (
                    isinstance(spec.window, str) and spec.window == "uniform")  # fmt: skip
                check_exact_sum(NUMPY, result, acc.dtype, out_grid.overlap, not uniform)
            if w is not None:
                if w.dtype != np.finfo(acc.dtype).dtype:  # the accumulator's precision
                    w = w.astype(np.finfo(acc.dtype).dtype)
                result = result * w  # the whole batch weighted at once, not patch by patch
            for patch, pos in zip(result, chunk):
                dst: list[Any] = [slice(None)] * grid.ndim
                src: list[Any] = [slice(None)] * grid.ndim
                for j, a in enumerate(axes):
                    s = int(out_starts[j][pos[j]]) - lo[j]
                    d0, d1 = max(s, 0), min(s + out_grid.size[j], ext[j])
                    dst[a], src[a] = slice(d0, d1), slice(d0 - s, d1 - s)
                target = acc[tuple(dst)]
                op(target, patch[tuple(src)], out=target)
                if wacc is not None and w is not None:
                    wacc[tuple(dst)] += w[tuple(src)]
    for carry in incoming:
        if carry is None:
            continue
        part, wpart = carry
        if acc is None:
            start(part, part.dtype)
        assert acc is not None
        into = tuple(slice(0, part.shape[a]) if a in axes else slice(None)
                     for a in range(grid.ndim))  # fmt: skip
        op(acc[into], part, out=acc[into])
        if wpart is not None:
            if wacc is None:
                wacc = np.zeros(wshape_acc, dtype=wpart.dtype)
            wacc[into] += wpart
    carries: list[Carry] = []
    for j, go in enumerate(send):
        size_j = cores[j][1] - cores[j][0]
        if not go or acc is None or ext[j] <= size_j:
            carries.append(None)
            continue
        cut: list[Any] = [slice(None)] * grid.ndim
        for i, a in enumerate(axes):
            if i == j:
                cut[a] = slice(size_j, ext[i])
            elif i > j:
                cut[a] = slice(0, cores[i][1] - cores[i][0])
        wcut = tuple(c if a in axes else slice(None) for a, c in enumerate(cut))
        carries.append((acc[tuple(cut)].copy(), None if wacc is None else wacc[wcut].copy()))
    return (_finish(acc, wacc, cores, spec, patch_dtype), *carries)


def _finish(acc: np.ndarray | None, wacc: np.ndarray | None,
            cores: Sequence[tuple[int, int]], spec: _Spec,
            patch_dtype: np.dtype | None = None) -> np.ndarray:  # fmt: skip
    """A chunk's complete sums (the corner of ``acc``) normalised, reduced and cast.

    ``patch_dtype`` is fn's output dtype where this task saw one (else the sums' own)."""
    from ._finish import cast_hint, divide_by_profiles

    axes = spec.out_grid.axes
    if acc is None:  # no patch touches this chunk
        shape = list(spec.probe_shape)
        for a, (lo, hi) in zip(axes, cores):
            shape[a] = hi - lo
        if spec.class_axis is not None:
            shape.pop(spec.class_axis)
        return np.full(shape, spec.fill, dtype=spec.dtype)
    spans = _per_axis(cores, axes, acc.ndim)
    core = tuple(
        slice(0, hi - lo) if a in axes else slice(None) for a, (lo, hi) in enumerate(spans)
    )
    acc = acc[core]
    ones = spec.reduce != "mean"
    uncovered: list[Any] = []
    if wacc is not None and not ones:
        cov = wacc[core]
        np.divide(acc, np.where(cov > 0, cov, 1), out=acc, casting="unsafe")
        uncovered.append(np.broadcast_to(cov == 0, acc.shape))
    else:
        assert spec.coverage is not None
        sliced = [prof[lo:hi] for prof, (lo, hi) in zip(spec.coverage, cores)]
        if not ones:
            divide_by_profiles(acc, axes, sliced)
        for a, prof in zip(axes, sliced):
            if (prof == 0).any():
                shape1 = [1] * acc.ndim
                shape1[a] = len(prof)
                uncovered.append(np.broadcast_to((prof == 0).reshape(shape1), acc.shape))
    mask = np.logical_or.reduce(uncovered) if uncovered else None
    if spec.class_axis is not None:
        result = np.argmax(acc, axis=spec.class_axis)
        check_cast(NUMPY, np.arange(acc.shape[spec.class_axis]), spec.dtype,
                   what=f"class numbers of {acc.shape[spec.class_axis]} classes",
                   hint=cast_hint("argmax"))  # fmt: skip
        if mask is not None:
            mask = mask.take(0, axis=spec.class_axis)
    else:
        result = acc
        if np.dtype(spec.dtype).kind in "iub" and result.dtype.kind == "f":
            result = np.rint(result)
        seen = result.dtype if patch_dtype is None else np.dtype(patch_dtype)
        src = seen if seen.kind in "iub" else result.dtype
        force = spec.reduce == "sum" or patch_dtype is None
        if force or not lossless(seen, np.dtype(spec.dtype)):
            check_cast(NUMPY, result, spec.dtype, src=src, force=force,
                       what=f"the merged result (reduce={spec.reduce!r})",
                       hint=cast_hint(spec.reduce))  # fmt: skip
    result = result.astype(spec.dtype, copy=False)
    if mask is not None:
        result = np.where(mask, np.array(spec.fill, dtype=spec.dtype), result)
    return np.asarray(result)  # may be a view of the sums: a zarr write needs no copy


def _per_axis(cores: Sequence[tuple[int, int]], axes: Sequence[int],
              ndim: int) -> list[tuple[int, int]]:  # fmt: skip
    """``cores`` (per tiled axis) spread over all ``ndim`` axes, ``(0, 0)`` on free ones."""
    out = [(0, 0)] * ndim
    for a, c in zip(axes, cores):
        out[a] = c
    return out
