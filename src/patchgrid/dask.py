"""The distributed path: extract and apply on Dask arrays, equal to the in-memory results (L3).

What lives here: the public face of the path (:func:`extract_dask`, :func:`apply_dask`,
:func:`redundancy`) and the planning of blocks of chunks (``plan_blocks``, ``_Axis``) with the graph
built over them; the tasks themselves (read, run, sum, finish a chunk) live in
:mod:`patchgrid._chunks`. Imports from its own layer (``_chunks``) and below; dask and
dask.array only inside the functions that use them (an optional dependency). The public
functions above reach it through the one lazy gate.

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

from . import _chunks, _progress
from ._batches import factors
from ._checks import PatchgridError
from ._finish import check_fill
from ._plan import checked_window
from ._regions import INDEX_MODES, index_map
from .backends import NUMPY, is_dask
from .grid import PatchGrid, sub_grid

#: Most chunks along the second chained axis of a task's block (``out=``): the task keeps the
#: partial sums for the next row of its block, one chunk's face each.
SECOND = 4

__all__ = ["Redundancy", "apply_dask", "extract_dask", "is_dask", "redundancy"]


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
        starts = [grid.axis_starts(0)[i0 : i0 + 1] - start]
        starts += [grid.axis_starts(j) for j in range(1, len(grid.axes))]
        sub = sub_grid(grid, starts, shape, [0] * len(grid.axes))
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

    def at(self, b: int) -> _chunks.AxisChunk:
        """Chunk ``b`` along this axis, as its task sees it."""
        return _chunks.AxisChunk(range(self.first[b], self.last[b]), self.core(b), self.reach[b],
                                 b < self.tail[b])  # fmt: skip


def worker_threads() -> int:
    """Threads of the Dask client in use, else this machine's cores."""
    client = _client()
    if client is not None:
        return max(1, int(sum(client.nthreads().values())))
    return os.cpu_count() or 1


def plan_blocks(grid: PatchGrid, chunks: Sequence[Sequence[int]], threads: int,
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
    plan = plan_blocks(grid, [chunks[a] for a in grid.axes], threads or worker_threads(), out)
    runs = np.prod([sum(last - first for first, last in zip(ax.first, ax.last)) for ax in plan])
    sums = 1.0
    for ax in plan:
        sums *= sum(r - lo for r, lo in zip(ax.reach, ax.edges)) / max(ax.edges[-1], 1)
    return Redundancy(float(runs) / max(len(grid), 1) - 1.0 if k else 0.0, sums - 1.0)


def store_of(image: Any) -> Any:
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
    keep: np.ndarray | None = None,
) -> Any:
    """The result of :func:`apply` on a Dask array (see the module's notes): lazy, or written
    into ``out`` (a zarr array) by the tasks themselves and ``out`` returned.

    ``probe`` is the result over one patch: it gives the output's dtype and free axes' sizes.
    ``keep`` (one bool per patch, from a mask) says which patches run; voxels that no patch
    run covers get ``fill``.
    """
    import dask
    import dask.array as da

    free = [a for a in range(grid.ndim) if a not in grid.axes]
    class_axis = free[-1] if reduce == "argmax" else None
    probe_shape = list(probe.shape)
    if class_axis is not None:
        probe_shape.insert(class_axis, 1)
    out_chunks = _out_chunks(image.chunks, grid, out_grid, probe_shape)
    maps = []
    for j, a in enumerate(grid.axes):
        before, after = margin[j], margin[j] + grid.pad_width[a][1]
        maps.append(index_map(image.shape[a], before, after, grid.pad_mode))
    if out is not None:
        _check_out(out, out_chunks, class_axis)
    check_fill(NUMPY, fill, np.dtype(dtype))
    plan = plan_blocks(
        out_grid, [out_chunks[a] for a in grid.axes], worker_threads(), out is not None
    )
    store = store_of(image)
    name = f"patchgrid-apply-{uuid.uuid4().hex}"
    fn_key = dask.delayed(fn, name=f"{name}-fn", traverse=False)
    source = None if store is None else dask.delayed(store, name=f"{name}-source", traverse=False)
    target = None if out is None else dask.delayed(out, name=f"{name}-out", traverse=False)
    checked = checked_window(window, out_grid.size)  # once per call, carried to every task
    spec = _chunks.Spec(grid, out_grid, tuple(margin), tuple(image.shape), checked, reduce,
                        batch_size, fill, np.dtype(dtype), tuple(probe_shape), class_axis,
                        _chunks.coverage(out_grid, checked, reduce), keep)  # fmt: skip
    blocks: dict[tuple[int, ...], Any] = {}
    tasks, patches = [], []
    for block in itertools.product(*[sorted(set(zip(ax.head, ax.tail))) for ax in plan]):
        ids = _block_order(block)
        chunk_steps = [_chunks.make_step(grid, [ax.at(b) for ax, b in zip(plan, bid)], maps,
                                         margin, bid, class_axis) for bid in ids]  # fmt: skip
        datas = [None if any(not len(r) for r in st.picks) or source is not None
                 else [image[region] for region, _ in st.reads] for st in chunk_steps]  # fmt: skip
        nout = None if out is not None else len(chunk_steps)
        task = dask.delayed(_chunks.run, pure=False, nout=nout)(
            fn_key, source, datas, chunk_steps, spec, target, dask_key_name=(name, *ids[0]),
        )  # fmt: skip
        tasks.append(task)
        patches.append(sum(int(np.prod([len(r) for r in st.picks])) for st in chunk_steps))
        if out is None:
            for i, st in enumerate(chunk_steps):
                key, shape = _block_of(st, grid, probe_shape, class_axis)
                blocks[key] = da.from_delayed(task[i], shape, np.dtype(dtype))
    if out is None:
        return da.block(_nest(blocks, [len(c) for c in out_chunks], class_axis))
    _compute(tasks, patches, progress)
    return out


def _out_chunks(chunks: Sequence[Sequence[int]], grid: PatchGrid, out_grid: PatchGrid,
                probe_shape: Sequence[int]) -> list[tuple[int, ...]]:  # fmt: skip
    """The output's chunks: the image's ``chunks`` scaled along the tiled axes, fn's size
    along the free ones (a class axis: 1, dropped later)."""
    scale = factors(out_grid, grid)
    out_chunks: list[tuple[int, ...]] = []
    for a in range(grid.ndim):
        if a in grid.axes:
            f = scale[grid.axes.index(a)]
            edges = np.round(np.cumsum([0, *chunks[a]]) * f).astype(int)
            out_chunks.append(tuple(int(e) for e in np.diff(edges)))
        else:
            out_chunks.append((probe_shape[a],))
    return out_chunks


def _block_order(block: Sequence[tuple[int, int]]) -> list[tuple[int, ...]]:
    """The chunks of a block (a run ``(first, last)`` per tiled axis) in the order its task
    goes through them.

    The longest run outermost: a chunk's partial sums wait for the next one along each axis
    only while the inner axes' runs go by (at most SECOND chunks), not a whole run.
    """
    outer = sorted(range(len(block)), key=lambda j: block[j][0] - block[j][1])
    return sorted(itertools.product(*[range(g0, g1 + 1) for g0, g1 in block]),
                  key=lambda bid: tuple(bid[j] for j in outer))  # fmt: skip


def _block_of(step: _chunks.Step, grid: PatchGrid, probe_shape: Sequence[int],
              class_axis: int | None) -> tuple[tuple[int, ...], tuple[int, ...]]:  # fmt: skip
    """Where a chunk's result sits among the lazy result's blocks (a block index over every
    axis, the class axis included) and its shape (without the class axis)."""
    shape = list(probe_shape)
    for a, (lo, hi) in zip(grid.axes, step.cores):
        shape[a] = hi - lo
    if class_axis is not None:
        shape.pop(class_axis)
    full_key = [0] * grid.ndim
    for a, b in zip(grid.axes, step.bid):
        full_key[a] = b
    return tuple(full_key), tuple(shape)


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

    step, close = _progress.steps(progress, sum(patches), "patchgrid.apply")
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
