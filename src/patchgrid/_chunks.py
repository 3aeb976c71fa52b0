"""The tasks of the Dask path: a block of output chunks, finished chunk by chunk (L3).

:func:`patchgrid.dask.apply_dask` plans the blocks and builds the graph; every task it makes
runs :func:`run` here over a :class:`Spec` (what all tasks share: the grids, the checked
window, the whole grid's coverage, the output dtype) and one :class:`Step` per chunk of its
block (made by :func:`make_step` while the graph is built). A chunk reads the input pieces its
patches need (:func:`assemble`, seen in the image's coordinates through :class:`PiecedImage`),
runs its patches in fixed batches through the model-output contract of :mod:`patchgrid._batches`
and sums them (:class:`Sums`), adds the partial sums the chunks before it passed on, finishes
(:func:`finish`: the coverage, then the one finishing step of :mod:`patchgrid._finish`) and
passes its own partial sums on to the next chunk along each axis of the block.

Imports from L2 (``_batches``, ``_finish``, ``_plan``) and below; never from
:mod:`patchgrid.dask`, the layer's planning side, which imports this module.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from ._batches import check_output, core_of, factors
from ._finish import (
    OutputSpec,
    cast_hint,
    fill_masks,
    finish_values,
    normalise,
    profile_sum,
    sum_dtype,
    weight_array,
)
from ._plan import Window, checked_window
from ._regions import Reader, pieces
from .backends import NUMPY, check_cast, check_exact_sum
from .grid import PatchGrid


class PiecedImage:
    """Pieces of a larger image, indexed with the larger image's coordinates: ``spans`` gives,
    per axis, the pieces ``(start, stop, local start)`` that ``data`` holds side by side."""

    def __init__(self, data: np.ndarray, spans: Sequence[Sequence[tuple[int, int, int]]],
                 shape: Sequence[int]) -> None:  # fmt: skip
        self.data, self.spans = data, spans
        self.shape, self.dtype, self.ndim = tuple(shape), data.dtype, len(shape)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        local = []
        for k, spans, n in zip(key, self.spans, self.shape):
            start, stop = k.start or 0, k.stop if k.stop is not None else n
            lo, _, at = next(p for p in spans if p[0] <= start and stop <= p[1])
            local.append(slice(start - lo + at, stop - lo + at))
        return self.data[tuple(local)]


class Spec(NamedTuple):
    """What every chunk's task shares."""

    grid: PatchGrid
    out_grid: PatchGrid
    margin: tuple[int, ...]
    shape: tuple[int, ...]
    window: Window  # checked once per call
    reduce: str
    batch_size: int
    fill: Any
    dtype: np.dtype
    probe_shape: tuple[int, ...]
    class_axis: int | None
    coverage: tuple[np.ndarray, ...] | None  # per tiled axis, the whole grid's; see coverage
    keep: np.ndarray | None = None  # per patch, whether it runs (a mask); None: every patch


def coverage(out_grid: PatchGrid, window: Window, reduce: str) -> tuple[np.ndarray, ...] | None:
    """Per tiled axis, the sum of the window's profile over every patch of the whole grid
    (ones for reductions that do not divide); None for a window that is not separable."""
    profs = window.profiles if reduce == "mean" else checked_window(None, out_grid.size).profiles
    if profs is None:
        return None
    # In the precision of the sums of float64 patches (extended where there is one), as the
    # weights of the tasks: float64 patches then come back exactly where they are equal.
    wide = sum_dtype(NUMPY, NUMPY.acc_dtype(np.float64, "mean"))
    return tuple(profile_sum(out_grid.axis_starts(j), prof, out_grid.padded_shape[a], wide)
                 for j, (a, prof) in enumerate(zip(out_grid.axes, profs)))  # fmt: skip


class AxisChunk(NamedTuple):
    """One chunk along one tiled axis, as the plan of its axis has it."""

    picks: range  # the patches the chunk runs (indices along the axis)
    core: tuple[int, int]  # the output voxels it finishes
    reach: int  # how far its sums reach
    send: bool  # whether a next chunk of its run takes the sums past its end


class Step(NamedTuple):
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


def make_step(grid: PatchGrid, along: Sequence[AxisChunk], maps: Sequence[np.ndarray],
              margin: Sequence[int], bid: Sequence[int],
              class_axis: int | None) -> Step:  # fmt: skip
    """The :class:`Step` of chunk ``bid`` (a chunk index per tiled axis), ``along`` each axis.

    The input the chunk's patches need is read in pieces: along an axis, source indices far
    apart (a wrapped border) are separate pieces, so no read spans the whole axis.
    """
    picks = [c.picks for c in along]
    spans: list[list[tuple[int, int, int]]] = [[(0, n, 0)] for n in grid.shape]
    for j, (a, r) in enumerate(zip(grid.axes, picks)):
        if not len(r):
            continue
        s = grid.axis_starts(j)
        reach = grid.size[j] + 2 * margin[j]
        ids = maps[j][int(s[r.start]) : int(s[r.stop - 1]) + reach]
        spans[a] = pieces(ids, reach) or [(0, 0, 0)]
    reads = []
    for combo in itertools.product(*spans):
        reads.append((tuple(slice(lo, hi) for lo, hi, _ in combo),
                      tuple(slice(at, at + hi - lo) for lo, hi, at in combo)))  # fmt: skip
    local_shape = tuple(sum(hi - lo for lo, hi, _ in axis) for axis in spans)
    cores = [c.core for c in along]
    target: list[slice] = [slice(None)] * grid.ndim
    for a, (lo, hi) in zip(grid.axes, cores):
        target[a] = slice(lo, hi)
    if class_axis is not None:
        target.pop(class_axis)
    return Step(tuple(bid), picks, reads, local_shape, spans, cores, [c.reach for c in along],
                [c.send for c in along], tuple(target))  # fmt: skip


def assemble(parts: Sequence[Any], step: Step) -> np.ndarray:
    """The pieces a chunk reads, side by side in one array (one piece: as it is)."""
    first = np.asarray(parts[0])
    if len(parts) == 1:
        return first
    data = np.empty(step.local_shape, dtype=first.dtype)
    for (_, local), part in zip(step.reads, parts):
        data[local] = part
    return data


Carry = tuple[np.ndarray, "np.ndarray | None"] | None


def run(fn: Callable[[Any], Any], source: Any, datas: Sequence[Any], steps: Sequence[Step],
        spec: Spec, out: Any) -> Any:  # fmt: skip
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
            data = assemble(data, step)
        core, *carries = chunk(fn, data, step, spec, pending.pop(step.bid, [None] * k))
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


class Sums:
    """A chunk's sums over ``[lo, reach)`` along each tiled axis.

    ``acc`` is made by the first patches or partial sums that come; ``wacc`` sums the weights of
    a window that is not separable; ``patch_dtype`` is fn's output dtype, once seen.
    """

    def __init__(self, spec: Spec, step: Step) -> None:
        self.spec, self.step = spec, step
        axes = spec.grid.axes
        self.lo = [c[0] for c in step.cores]
        self.ext = [r - c[0] for r, c in zip(step.reach, step.cores)]
        self.op = {"max": np.maximum, "min": np.minimum}.get(spec.reduce, np.add)
        self.weighted = spec.reduce in ("mean", "sum", "argmax")
        # A volume of summed weights where the window is not separable, or where a mask leaves
        # patches out (the coverage of the patches that ran; ones for max and min).
        self.array_window = spec.keep is not None or (
            self.weighted and spec.window.profiles is None
        )
        self.wshape = [self.ext[axes.index(a)] if a in axes else 1 for a in range(spec.grid.ndim)]
        self.acc: np.ndarray | None = None
        self.wacc: np.ndarray | None = None
        self.weights: np.ndarray | None = None
        self.patch_dtype: np.dtype | None = None

    def start(self, like: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """Make the sums, shaped like ``like`` on the free axes, in ``dtype``."""
        reduce = self.spec.reduce
        shape = list(like.shape)
        for a, e in zip(self.spec.grid.axes, self.ext):
            shape[a] = e
        first = 0 if reduce not in ("max", "min") else NUMPY.extreme(dtype, reduce == "min")
        self.acc = np.full(shape, first, dtype=dtype)
        if self.array_window:
            self.wacc = np.zeros(self.wshape, dtype=sum_dtype(NUMPY, dtype))
        return self.acc

    def add(self, result: np.ndarray, positions: np.ndarray) -> None:
        """Add the cores of patch outputs ``result``, the patches at grid ``positions``."""
        spec, out_grid, axes = self.spec, self.spec.out_grid, self.spec.grid.axes
        acc = self.acc
        if acc is None:
            self.patch_dtype = result.dtype
            reduce = "mean" if spec.reduce == "argmax" else spec.reduce
            acc = self.start(result[0], NUMPY.acc_dtype(result.dtype, reduce))
            if self.weighted:  # in the accumulator's precision
                window = spec.window
                self.weights = weight_array(window.array, window.profiles, out_grid,
                                            sum_dtype(NUMPY, acc.dtype))  # fmt: skip
        if spec.reduce not in ("max", "min") and result.dtype.kind in "iu":
            check_exact_sum(NUMPY, result, acc.dtype, out_grid.overlap, not spec.window.uniform)
        w = self.weights
        if w is not None:
            result = result * w  # the whole batch weighted at once, not patch by patch
        out_starts = [out_grid.axis_starts(j) for j in range(len(axes))]
        for patch, pos in zip(result, positions):
            dst: list[Any] = [slice(None)] * spec.grid.ndim
            src: list[Any] = [slice(None)] * spec.grid.ndim
            for j, a in enumerate(axes):
                s = int(out_starts[j][pos[j]]) - self.lo[j]
                d0, d1 = max(s, 0), min(s + out_grid.size[j], self.ext[j])
                dst[a], src[a] = slice(d0, d1), slice(d0 - s, d1 - s)
            target = acc[tuple(dst)]
            self.op(target, patch[tuple(src)], out=target)
            if self.wacc is not None:
                self.wacc[tuple(dst)] += w[tuple(src)] if w is not None else 1

    def take(self, incoming: Sequence[Carry]) -> None:
        """Add the partial sums the chunks before this one passed on."""
        axes = self.spec.grid.axes
        for carry in incoming:
            if carry is None:
                continue
            part, wpart = carry
            acc = self.acc if self.acc is not None else self.start(part, part.dtype)
            into = tuple(slice(0, part.shape[a]) if a in axes else slice(None)
                         for a in range(self.spec.grid.ndim))  # fmt: skip
            self.op(acc[into], part, out=acc[into])
            if wpart is not None:
                if self.wacc is None:
                    self.wacc = np.zeros(self.wshape, dtype=wpart.dtype)
                self.wacc[into] += wpart

    def carries(self) -> list[Carry]:
        """Per tiled axis, the sums past the chunk's end for the next chunk (None when there is
        no next chunk in the run or nothing to pass on)."""
        axes, cores, acc, wacc = self.spec.grid.axes, self.step.cores, self.acc, self.wacc
        out: list[Carry] = []
        for j, go in enumerate(self.step.send):
            size_j = cores[j][1] - cores[j][0]
            if not go or acc is None or self.ext[j] <= size_j:
                out.append(None)
                continue
            cut: list[Any] = [slice(None)] * self.spec.grid.ndim
            for i, a in enumerate(axes):
                if i == j:
                    cut[a] = slice(size_j, self.ext[i])
                elif i > j:
                    cut[a] = slice(0, cores[i][1] - cores[i][0])
            wcut = tuple(c if a in axes else slice(None) for a, c in enumerate(cut))
            out.append((acc[tuple(cut)].copy(), None if wacc is None else wacc[wcut].copy()))
        return out


def sum_patches(fn: Callable[[Any], Any], data: Any, step: Step, spec: Spec, sums: Sums) -> None:
    """Run the chunk's patches in batches of ``spec.batch_size`` (the last one padded with its
    last patch) through ``fn`` and the model-output contract, and add them to ``sums``."""
    grid, out_grid = spec.grid, spec.out_grid
    source = PiecedImage(np.asarray(data), step.spans, spec.shape)
    reader = Reader(source, grid, spec.margin, NUMPY)
    full = [p * f for p, f in zip(reader.size, factors(out_grid, grid))]
    in_shape = reader.patch_shape(spec.shape)
    positions = np.stack(
        [m.ravel() for m in np.meshgrid(*[np.arange(r.start, r.stop) for r in step.picks],
                                        indexing="ij")], axis=-1)  # fmt: skip
    if spec.keep is not None:  # a mask: only the patches that hold foreground
        positions = positions[spec.keep[np.ravel_multi_index(tuple(positions.T), grid.counts)]]
    size = spec.batch_size
    for at in range(0, len(positions), size):
        part = positions[at : at + size]
        rows = np.concatenate([part, np.repeat(part[-1:], size - len(part), axis=0)])
        batch = np.empty((size, *in_shape), dtype=source.dtype)
        for b, pos in enumerate(rows):
            batch[b] = reader.read(grid.index(pos))
        result = check_output(fn(batch), batch, NUMPY, out_grid, full, fn)
        sums.add(core_of(result[: len(part)], out_grid, full), part)


def chunk(fn: Callable[[Any], Any], data: Any, step: Step, spec: Spec,
          incoming: Sequence[Carry]) -> tuple[Any, ...]:  # fmt: skip
    """One output chunk: its patches run in fixed batches and summed over ``[lo, reach)``, the
    partial sums its run's earlier chunks passed on added, the chunk finished (normalised,
    reduced, cast), and the sums past its end cut out for the next chunk along each axis.

    Returns the finished chunk and, per tiled axis, the partial sums for the next chunk (None
    when there is no next chunk in the run or nothing to pass on).
    """
    sums = Sums(spec, step)
    if data is not None:
        sum_patches(fn, data, step, spec, sums)
    sums.take(incoming)
    carries = sums.carries()
    return (finish(sums.acc, sums.wacc, step.cores, spec, sums.patch_dtype), *carries)


def chunk_spec(spec: Spec, acc: np.ndarray, patch_dtype: np.dtype | None) -> OutputSpec:
    """The output spec of one chunk's sums ``acc``, for the shared finishing step."""
    grid, ca = spec.out_grid, spec.class_axis
    shape = list(acc.shape)
    n_classes = shape.pop(ca) if ca is not None else 0
    patch_shape = tuple(grid.size[grid.axes.index(a)] if a in grid.axes else n
                        for a, n in enumerate(acc.shape))  # fmt: skip
    identity = 0
    if spec.reduce in ("max", "min"):
        identity = NUMPY.extreme(acc.dtype, spec.reduce == "min")
    return OutputSpec(tuple(shape), spec.dtype, acc.dtype, patch_shape, patch_dtype, spec.reduce,
                      ca, n_classes, identity)  # fmt: skip


def finish(acc: np.ndarray | None, wacc: np.ndarray | None, cores: Sequence[tuple[int, int]],
           spec: Spec, patch_dtype: np.dtype | None = None) -> np.ndarray:  # fmt: skip
    """A chunk's complete sums (the corner of ``acc``) normalised, reduced and cast.

    ``patch_dtype`` is fn's output dtype where this task saw one (else the sums' own are
    checked, whatever the cast)."""
    axes = spec.out_grid.axes
    if acc is None:  # no patch touches this chunk
        shape = list(spec.probe_shape)
        for a, (lo, hi) in zip(axes, cores):
            shape[a] = hi - lo
        if spec.class_axis is not None:
            shape.pop(spec.class_axis)
        return np.full(shape, spec.fill, dtype=spec.dtype)
    spans = per_axis(cores, axes, acc.ndim)
    core = tuple(
        slice(0, hi - lo) if a in axes else slice(None) for a, (lo, hi) in enumerate(spans)
    )
    acc = acc[core]
    ones = spec.reduce != "mean"
    if wacc is not None and (not ones or spec.keep is not None):
        empty = normalise(NUMPY, acc, axes, "volume", wacc[core], divide=not ones)
    else:
        assert spec.coverage is not None
        sliced = [prof[lo:hi] for prof, (lo, hi) in zip(spec.coverage, cores)]
        empty = normalise(NUMPY, acc, axes, "profiles", sliced, divide=not ones)
    if spec.class_axis is not None:
        n = acc.shape[spec.class_axis]
        check_cast(NUMPY, np.arange(n), spec.dtype, what=f"class numbers of {n} classes",
                   hint=cast_hint("argmax"))  # fmt: skip
    out_spec = chunk_spec(spec, acc, patch_dtype)
    seen = None if patch_dtype is not None else False  # False: the values decide the cast
    result = finish_values(NUMPY, acc, out_spec, axes[0], patch_dtype=seen)
    fill_masks(NUMPY, result, empty, spec.fill, spec.class_axis)
    return np.asarray(result)  # may be a view of the sums: a zarr write needs no copy


def per_axis(cores: Sequence[tuple[int, int]], axes: Sequence[int],
             ndim: int) -> list[tuple[int, int]]:  # fmt: skip
    """``cores`` (per tiled axis) spread over all ``ndim`` axes, ``(0, 0)`` on free ones."""
    out = [(0, 0)] * ndim
    for a, c in zip(axes, cores):
        out[a] = c
    return out
