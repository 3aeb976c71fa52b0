"""Accumulators: where a merge sums its patches, one class per strategy (L2).

The protocol a :class:`~patchgrid.Merger` drives, whatever the strategy:

- ``add(batch, idx, seen)``: add a batch of patches at grid indices, marking each in ``seen``
  once it is in;
- ``add_rows(patches, r0, r1, seen)``: add every patch of grid rows ``[r0, r1)``;
- ``ensure(hi)`` / ``rows(start, upto)`` / ``drop(n)``: make the accumulator reach a row, look
  at finished rows (sums and, for an array window, summed weights), let them go.

Strategies:

- :class:`Rows`: a slab of rows along the first tiled axis that rolls forward as rows finish
  (CPU NumPy and torch): strided operations per phase of patches that do not overlap, the
  compiled batch kernels where they serve;
- :class:`Direct`: the accumulator is the output itself (nothing to cast, crop or reduce);
- :func:`scatter`: a small merge in a few operations over index tables the plan keeps (sums in
  float64 by :func:`numpy.bincount`; in extended precision and for max/min, a gather sorted
  by output voxel and one ``reduceat``; then a division): the cost of a repeated small merge
  is its data, not its geometry;
- :func:`planes`: every patch at once through the compiled kernel, each output plane summed in
  a float64 plane of its own and written normalised.

- :class:`Device` (and :class:`DeviceDirect`): the device engine, for tensors on an accelerator
  (:func:`fused` says where): every batch in a few strided operations whatever its patches'
  size, the window and the coverage made on the device once, finished rows divided there
  without a host array or a synchronisation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _compiled, _strided, settings
from ._checks import PatchgridError
from ._plan import MergePlan
from .backends import Backend

# Patches smaller than this (bytes) go in stretches of a grid row rather than one by one.
RUN_BYTES = 1 << 16


def row_runs(idx: np.ndarray, row: int) -> list[tuple[int, int]]:
    """Stretches ``[b0, b1)`` of a batch whose indices go up by one within one row of the grid
    (``row`` patches along its last tiled axis), two patches or more."""
    if len(idx) < 2:
        return []
    joined = (np.diff(idx) == 1) & ((idx[1:] // row) == (idx[:-1] // row))
    edges = [0, *(np.flatnonzero(~joined) + 1).tolist(), len(idx)]
    return [(b0, b1) for b0, b1 in itertools.pairwise(edges) if b1 - b0 >= 2]


class Rows:
    """A slab of accumulator rows along the first tiled axis, rolling forward as rows finish.

    ``lo`` is the padded row where the slab begins; ``acc`` holds the sums (``None`` until a
    patch arrives and after every row is let go), ``wacc`` the summed weights of an array
    window.
    """

    direct = False  # the accumulator is the output
    normalised = False  # the sums are divided by the coverage already
    fused = False  # the device engine: a batch in a few operations, nothing through the host
    # Patches smaller than this (bytes) go in stretches of a grid row, larger ones one by one.
    runs_below: float = RUN_BYTES

    def __init__(self, plan: MergePlan, like: Any, sink: Any = None) -> None:
        self.plan, self.xp, self.like, self.sink = plan, plan.xp, like, sink
        self.grid = plan.grid
        self.acc: Any = None
        self.wacc: Any = None
        self.lo = 0
        self._weight: Any = None
        self._starts0 = self.grid.axis_starts(0)
        self._starts_all: np.ndarray | None = None

    def weight(self) -> Any:
        """The window shaped to broadcast against one patch, on the backend, or None."""
        if self.plan.weight is None:
            return None
        if self._weight is None:
            self._weight = self.xp.constant(self.plan.weight, self.plan.spec.real_dtype(self.xp),
                                            self.like)  # fmt: skip
        return self._weight

    def reach(self, rows: np.ndarray) -> int:
        """The padded row past the last patch of grid rows ``rows``."""
        return int(self._starts0[rows].max()) + self.grid.size[0]

    def ensure(self, hi: int) -> None:
        """Make the accumulator reach padded row ``hi`` along the first tiled axis."""
        grid, xp, a0, spec = self.grid, self.xp, self.grid.axes[0], self.plan.spec
        rows = hi - self.lo
        have = 0 if self.acc is None else self.acc.shape[a0]
        if rows <= have:
            return
        if have == 0:
            # Room for one patch: batches in grid order come row by row (see Merger.add).
            rows = max(rows, min(grid.size[0], grid.padded_shape[a0] - self.lo))
        shape = list(grid.padded_shape)
        for a in range(grid.ndim):
            if a not in grid.axes:
                shape[a] = spec.patch_shape[a]
        shape[a0] = rows
        acc = self.alloc(shape, spec.identity, spec.acc_dtype)
        wacc = None
        if self.plan.array_window:
            wshape = [1 if a not in grid.axes else n for a, n in enumerate(shape)]
            wacc = self.alloc(wshape, 0, spec.real_dtype(xp))
        if have:
            head: list[Any] = [slice(None)] * grid.ndim
            head[a0] = slice(0, have)
            xp.assign(acc[tuple(head)], self.acc)
            if wacc is not None:
                xp.assign(wacc[tuple(head)], self.wacc)
        self.acc, self.wacc = acc, wacc

    def alloc(self, shape: Sequence[int], value: Any, dtype: Any) -> Any:
        """A new accumulator array beside the patches, filled with ``value``."""
        return self.xp.full(shape, value, dtype, self.like)

    def local(self, index: int) -> tuple[slice, ...]:
        """Slices of patch ``index`` in the accumulator, whose first row is ``lo``."""
        sl = list(self.grid.slices(index))
        a0 = self.grid.axes[0]
        sl[a0] = slice(sl[a0].start - self.lo, sl[a0].stop - self.lo)
        return tuple(sl)

    def add(self, arr: Any, idx: np.ndarray, seen: np.ndarray) -> None:
        """Add patches ``arr`` at flat grid indices ``idx``; mark each in ``seen`` (flat)."""
        grid, xp, op = self.grid, self.xp, self.plan.op
        self.ensure(self.reach(np.unravel_index(idx, grid.counts)[0]))
        weight = self.weight()
        if self._add_compiled(arr, idx, weight):
            seen[idx] = True
            return
        scratch: list[Any] = []
        done = np.zeros(len(idx), dtype=bool)
        # Small patches cost a Python step each; large ones are better one by one (torch's
        # in-place ops, when loaded, are faster on one patch than on a strided stretch).
        small = xp.nbytes(arr) // max(len(idx), 1) < self.runs_below
        for b0, b1 in row_runs(idx, grid.counts[-1]) if small else []:
            self._add_run(arr[b0:b1], int(idx[b0]), weight, scratch, seen)
            done[b0:b1] = True
        for b in np.flatnonzero(~done).tolist():
            i, patch = int(idx[b]), arr[b]
            sl = self.local(i)
            target = self.acc[sl]
            if weight is None:
                xp.inplace(op, target, patch)
            else:
                xp.add_product(target, patch, weight, scratch)
            if self.wacc is not None:
                wsl = tuple(s if a in grid.axes else slice(None) for a, s in enumerate(sl))
                xp.inplace("add", self.wacc[wsl], weight)
            # Marked one by one: if a later patch of the batch fails, those already added are
            # known as added, and adding them again raises instead of counting them twice.
            seen[i] = True

    def kernels(self) -> bool:
        """Whether the compiled kernels may serve this merge: the plan allows loading them, or
        the process has them loaded already."""
        return self.plan.kernels or _compiled.loaded()

    def _add_compiled(self, arr: Any, idx: np.ndarray, weight: Any) -> bool:
        """A batch of large patches through the compiled kernel, if it serves: NumPy floats,
        an adding reduction, a separable window (no weight volume to keep), a large job."""
        grid = self.grid
        if self.fused or not (self.plan.op == "add" and self.wacc is None and self.kernels()):
            return False
        acc, patches = _compiled.host(self.acc), _compiled.host(arr)
        w = None if weight is None else _compiled.host(weight)
        if acc is None or patches is None or (weight is not None and w is None):
            return False
        if not _compiled.serves_batch(acc, patches, grid.axes, len(grid)):
            return False
        if self._starts_all is None:
            self._starts_all = grid.starts()
        starts = self._starts_all[idx]
        starts[:, 0] -= self.lo
        return _compiled.add_batch(acc, patches, starts, w)

    def _add_run(self, patches: Any, first: int, weight: Any, scratch: list[Any],
                 seen: np.ndarray) -> None:  # fmt: skip
        """Patches ``first``, ``first + 1``, ... of one row of the grid (along its last tiled
        axis), in a few strided operations: one per phase of patches that do not overlap.

        Each operation adds whole patches, which are marked as added as soon as it is done.
        """
        grid, xp, op = self.grid, self.xp, self.plan.op
        k = len(grid.axes)
        pos = grid.position(first)
        n = patches.shape[0]
        last = grid.axis_starts(k - 1)[pos[-1] : pos[-1] + n]
        lead = [int(grid.axis_starts(j)[pos[j]]) for j in range(k - 1)]
        if k > 1:
            lead[0] -= self.lo
        else:
            last = last - self.lo
        for r0, count, start, step in _strided.runs(last.tolist(), grid.size[-1]):
            phases = 1 if step >= grid.size[-1] else -(-grid.size[-1] // step)
            for q in range(min(phases, count)):
                sel = range(r0 + q, r0 + count, phases)
                where = [*lead, start + q * step]
                extent = [*grid.size[:-1], phases * step]
                counts = [1] * (k - 1) + [len(sel)]
                target = _strided.window_view(self.acc, grid.axes, where, extent, counts,
                                              grid.size, xp)  # fmt: skip
                source = patches[sel.start : sel.stop : sel.step]
                source = source.reshape((1,) * (k - 1) + tuple(source.shape))
                if weight is None:
                    xp.inplace(op, target, source)
                else:
                    xp.add_product(target, source, weight, scratch)
                if self.wacc is not None:
                    wtarget = _strided.window_view(self.wacc, grid.axes, where, extent, counts,
                                                   grid.size, xp)  # fmt: skip
                    xp.inplace("add", wtarget, weight)
                seen[first + sel.start : first + sel.stop : sel.step] = True

    def add_rows(self, arr: Any, r0: int, r1: int, seen: np.ndarray) -> None:
        """Add the patches of grid rows ``[r0, r1)`` (along the first tiled axis) of ``arr``
        (shaped ``(*counts, *patch)``): one strided operation per regular sub-grid, through
        the compiled kernel where it serves; ``seen`` is shaped like the counts."""
        grid, xp, k = self.grid, self.xp, len(self.grid.axes)
        self.ensure(int(self._starts0[r1 - 1]) + grid.size[0])
        op, weight = self.plan.op, self.weight()
        block = arr[r0:r1]
        if not self._add_rows_compiled(block, r0, r1, weight):
            for sub in _strided.subgrids(grid):
                i0, n, f0, t0 = sub[0]
                lo, hi = max(i0, r0), min(i0 + n, r1)
                if hi <= lo:
                    continue
                pick = (slice(lo - r0, hi - r0), *(slice(i, i + m) for i, m, _, _ in sub[1:]))
                first = [f0 + (lo - i0) * t0 - self.lo, *(f for _, _, f, _ in sub[1:])]
                step = [t for _, _, _, t in sub]
                _strided.accumulate(self.acc, block[pick], grid.axes, first, step, op, weight, xp)
                if self.wacc is not None:
                    counts = [hi - lo, *(m for _, m, _, _ in sub[1:])]
                    lead = weight.reshape((1,) * k + tuple(weight.shape))
                    lead = xp.broadcast_to(lead, (*counts, *weight.shape))
                    _strided.accumulate(self.wacc, lead, grid.axes, first, step, "add", None, xp)
        seen[r0:r1] = True

    def _add_rows_compiled(self, block: Any, r0: int, r1: int, weight: Any) -> bool:
        """Grid rows ``[r0, r1)`` through the compiled kernel, if it serves (NumPy floats, an
        adding reduction, a separable window, no padding)."""
        grid = self.grid
        acc = self.acc
        if not (
            self.xp.host_loops  # the kernels take NumPy arrays
            and self.plan.op == "add"
            and self.wacc is None
            and grid.padded_shape == grid.shape
            and self.kernels()
            and _compiled.serves(acc, block, grid.ndim, grid.axes)
        ):
            return False
        starts = [grid.axis_starts(0)[r0:r1] - self.lo] + [
            grid.axis_starts(j) for j in range(1, len(grid.axes))
        ]
        w = None if weight is None else np.asarray(weight).reshape(grid.size)
        _compiled.overlap_add(acc, block, starts, grid.size, w, False, None)
        return True

    def rows(self, start: int, upto: int) -> tuple[Any, Any]:
        """The sums of padded rows ``[start, upto)`` and their summed weights (or None)."""
        grid, a0 = self.grid, self.grid.axes[0]
        head: list[Any] = [slice(None)] * grid.ndim
        head[a0] = slice(start - self.lo, upto - self.lo)
        wrows = None if self.wacc is None else self.wacc[tuple(head)]
        return self.acc[tuple(head)], wrows

    def drop(self, n: int) -> None:
        """Let go of the first ``n`` accumulator rows: shift the rest to the front."""
        grid, xp, a0 = self.grid, self.xp, self.grid.axes[0]
        rows = self.acc.shape[a0]
        keep = rows - n
        if keep <= 0:  # nothing left to keep: a later row makes a fresh accumulator
            self.acc = self.wacc = None
            self.lo += n
            return
        for acc, value in ((self.acc, self.plan.spec.identity), (self.wacc, 0)):
            if acc is None:
                continue
            # Forward, in pieces no longer than the shift, so no piece overlaps its source and
            # no temporary copy is needed.
            for lo in range(0, max(keep, 0), max(n, 1)):
                hi = min(lo + n, keep)
                dst: list[Any] = [slice(None)] * grid.ndim
                src: list[Any] = [slice(None)] * grid.ndim
                dst[a0], src[a0] = slice(lo, hi), slice(lo + n, hi + n)
                xp.assign(acc[tuple(dst)], acc[tuple(src)])
            tail: list[Any] = [slice(None)] * grid.ndim
            tail[a0] = slice(max(keep, 0), rows)
            xp.assign(acc[tuple(tail)], value)
        self.lo += n

    def release(self) -> None:
        """Let go of everything (after the result)."""
        self.acc = self.wacc = None


class Direct(Rows):
    """The accumulator is the output itself: nothing to reduce, cast or crop."""

    direct = True

    def ensure(self, hi: int) -> None:
        if self.acc is not None:
            return
        spec, xp = self.plan.spec, self.xp
        if self.sink is None:
            self.sink = xp.full(spec.shape, spec.identity, spec.acc_dtype, self.like)
        else:
            xp.assign(self.sink, spec.identity)
        self.acc = self.sink
        if self.plan.array_window and self.wacc is None:
            grid = self.grid
            wshape = [n if a in grid.axes else 1 for a, n in enumerate(grid.shape)]
            self.wacc = xp.full(wshape, 0, spec.real_dtype(xp), self.like)

    def drop(self, n: int) -> None:
        pass  # the output keeps every row


class Device(Rows):
    """The device engine: a slab of rows on the accelerator that never sends the host a
    question (issue 15's profile of the rows engine on CUDA: 1,457 kernel launches and 257
    synchronous host-to-device copies for 343 patches).

    - a batch is added in a few strided operations (one per phase of patches of a grid row
      that do not overlap), whatever its patches' size, never patch by patch;
    - the window is put on the device once (:meth:`Rows.weight`), and so are the coverage's
      per-axis profiles, whose slices divide finished rows (:meth:`normalise`);
    - finished rows are divided, reduced and cast in one pass a flush (see ``Merger._flush``),
      and the slab is allocated by the device's own fill, never through a host array.
    """

    fused = True
    runs_below = math.inf  # stretches of a row for patches of every size

    def __init__(self, plan: MergePlan, like: Any, sink: Any = None) -> None:
        super().__init__(plan, like, sink)
        self._divisors: dict[bool, tuple[Any, Any, list[tuple[int, np.ndarray]]]] = {}

    def alloc(self, shape: Sequence[int], value: Any, dtype: Any) -> Any:
        xp = self.xp
        acc = xp.empty(shape, dtype, self.like)
        xp.assign(acc, value)
        return acc

    def _profiles(self, ones: bool) -> tuple[Any, Any, list[tuple[int, np.ndarray]]]:
        """The coverage of a complete grid as per-axis profiles on the device (zeros made
        ones): the first axis's profile, the product of the others, and the host masks of the
        voxels no patch covers (``(axis, mask)`` pairs, only axes that have some)."""
        if ones not in self._divisors:
            grid, xp, plan = self.grid, self.xp, self.plan
            profs = plan.profile_coverage(ones)
            dtype = plan.spec.real_dtype(xp)
            shaped = []
            for a, p in zip(grid.axes, profs):
                shape = [1] * grid.ndim
                shape[a] = len(p)
                shaped.append(xp.constant(np.where(p > 0, p, 1).reshape(shape), dtype,
                                          self.like))  # fmt: skip
            rest = None
            for p in shaped[1:]:
                rest = p if rest is None else rest * p
            masks = [(a, p == 0) for a, p in zip(grid.axes, profs) if (p == 0).any()]
            self._divisors[ones] = (shaped[0], rest, masks)
        return self._divisors[ones]

    def normalise(self, block: Any, wrows: Any, start: int, upto: int, complete: bool,
                  ones: bool, divide: bool) -> list[tuple[int, Any]] | None:  # fmt: skip
        """Divide the finished rows ``block`` (padded rows ``[start, upto)``) by their coverage
        on the device. Returns where no patch covers, as :func:`~patchgrid._finish.fill_masks`
        takes it, or None where patches are missing (their weights are then added up on the
        host, as the rows engine does)."""
        plan, xp, grid = self.plan, self.xp, self.grid
        if not complete:
            return None
        if ones or plan.window.profiles is not None:
            first, rest, masks = self._profiles(ones)
            a0 = grid.axes[0]
            if divide:
                where: list[Any] = [slice(None)] * grid.ndim
                where[a0] = slice(start, upto)
                column = first[tuple(where)]
                xp.divide(block, column if rest is None else column * rest)
            return [(a, m[start:upto] if a == a0 else m) for a, m in masks]
        if wrows is None:
            return None
        if divide:
            xp.divide(block, wrows + (wrows == 0))  # no weight: divide by one, fill below
        return [(-1, wrows == 0)]


class DeviceDirect(Device, Direct):
    """The device engine where the output is the accumulator (nothing to reduce, cast or
    crop)."""


def fused(xp: Backend, like: Any) -> bool:
    """Whether the device engine merges (and reads) arrays like ``like``: tensors on an
    accelerator, or every tensor, as :data:`patchgrid.settings.DEVICE_ENGINE` says."""
    mode = settings.DEVICE_ENGINE
    if mode not in ("auto", "always", "never"):
        raise PatchgridError(
            f"patchgrid.settings.DEVICE_ENGINE must be 'auto', 'always' or 'never', got {mode!r}"
        )
    if xp.host_loops or mode == "never":
        return False
    return mode == "always" or xp.on_device(like)


def strategy(plan: MergePlan, like: Any, sink: Any) -> type[Rows]:
    """The accumulator of a merge of patches like ``like`` into ``sink`` (None: a new array)."""
    # An output on another device than the patches (a CPU tensor for a GPU model's outputs)
    # takes finished rows; it cannot be the accumulator.
    here = getattr(sink, "device", None) == getattr(like, "device", None)
    direct = is_direct(plan, sink) and (sink is None or here)
    if fused(plan.xp, like):
        return DeviceDirect if direct else Device
    return Direct if direct else Rows


def is_direct(plan: MergePlan, sink: Any) -> bool:
    """Whether the output can be the accumulator: nothing to reduce, cast or crop, and an
    output (if given) of the backend's own kind, in the accumulator's dtype, writeable."""
    grid, spec, xp = plan.grid, plan.spec, plan.xp
    return (
        spec.class_axis is None
        and grid.padded_shape == grid.shape
        and spec.dtype == spec.acc_dtype
        and (sink is None or (
            xp.owns(sink) and xp.dtype(sink) == spec.acc_dtype and xp.writeable(sink)))
    )  # fmt: skip


def planes(plan: MergePlan, arr: Any, sink: Any) -> Any:
    """Every patch at once through the compiled kernel, if it serves: each output plane is
    summed in a float64 plane of its own, normalised and written in the output's dtype, so
    the wide accumulator never holds more than a plane per thread. Returns the output, or
    None where the kernel does not serve.

    Only for a mean (or a sum whose output is the accumulator's dtype), a separable window,
    no labels, no padding to crop, NumPy arrays.
    """
    grid, spec = plan.grid, plan.spec
    if not (
        plan.xp.host_loops  # the kernels take NumPy arrays
        and plan.op == "add"
        and not plan.array_window
        and spec.class_axis is None
        and grid.padded_shape == grid.shape
        and np.dtype(spec.acc_dtype) == np.float64  # the kernel sums in float64
        and (spec.reduce == "mean" or spec.dtype == spec.acc_dtype)
    ):
        return None
    out = sink
    if out is not None and (not plan.xp.owns(out) or out.dtype != spec.dtype):
        return None
    probe = out if out is not None else np.empty(0, spec.dtype)
    if not _compiled.serves_planes(probe, arr, grid.ndim, grid.axes):
        return None
    if out is None:
        out = _compiled.fresh(spec.shape, spec.dtype)
    profiles = None
    if spec.reduce == "mean":
        profiles = [np.where(p > 0, p, 1) for p in plan.profile_coverage(False)]
    weight = None
    if not plan.window.uniform:
        weight = np.asarray(plan.window.array, np.float64).reshape(grid.size)
    starts = [grid.axis_starts(j) for j in range(len(grid.axes))]
    _compiled.merge_planes(out, arr, starts, grid.size, weight, profiles)
    return out


# The most patch elements a merge gathers whole (index tables: 24 bytes an element, cached).
SCATTER_ELEMENTS = 1 << 16


def scatter(plan: MergePlan, arr: Any) -> Rows | None:
    """Every patch of a small grid at once: summed per voxel in the accumulator's dtype (by
    :func:`numpy.bincount` in patch order where that is float64, else gathered in the order of
    the voxels they land on and summed by :meth:`numpy.ufunc.reduceat`) and divided by the
    coverage; returned as an accumulator of finished, normalised rows, or
    None where the strategy does not serve (a plan not kept between calls, as an array
    window's; large or padded grids, free axes, labels, an accumulator that is the output,
    backends other than NumPy, jobs the compiled kernels take)."""
    grid, spec = plan.grid, plan.spec
    if not (
        plan.xp.host_loops  # NumPy's ufuncs over index tables
        and plan.kept  # tables made for one call cost more than the rows strategy
        and arr.size <= SCATTER_ELEMENTS
        and arr.nbytes < _compiled.MIN_BYTES  # a job the compiled kernels would take
        and len(grid.axes) == grid.ndim
        and grid.padded_shape == grid.shape
        and spec.class_axis is None
        and not is_direct(plan, None)
    ):
        return None
    tables = plan.scatter()
    acc = Rows(plan, arr)
    if tables.weight_sums is not None:  # the finishing step's coverage (a copy: rows shift)
        acc.wacc = tables.weight_sums.copy()
    flat = arr.reshape(-1)
    if tables.by_index:  # sums in float64, in patch order within each voxel
        values = flat if tables.weights is None else np.multiply(flat, tables.weights,
                                                                 dtype=np.float64)  # fmt: skip
        sums = np.bincount(tables.voxel_of, weights=values, minlength=math.prod(grid.shape))
        if tables.coverage is not None:
            np.divide(sums, tables.coverage, out=sums)
        acc.acc = sums.reshape(grid.shape)
        acc.normalised = True
        return acc
    assert tables.order is not None
    assert tables.starts is not None
    values = np.take(flat, tables.order)
    ufunc = {"add": np.add, "max": np.maximum, "min": np.minimum}[plan.op]
    if tables.weights is not None:
        values = np.multiply(values, tables.weights, dtype=spec.acc_dtype)
    sums = ufunc.reduceat(values, tables.starts, dtype=spec.acc_dtype)
    if tables.coverage is not None:
        np.divide(sums, tables.coverage, out=sums)
    if len(sums) == math.prod(grid.shape):
        acc.acc = sums.reshape(grid.shape)  # every voxel covered: the sums are the image
    else:
        acc.acc = np.full(grid.shape, spec.identity, spec.acc_dtype)
        acc.acc.reshape(-1)[tables.voxels] = sums
    acc.normalised = True
    return acc
