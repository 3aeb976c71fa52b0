"""Putting patches back together: overlap-add with weights, and reductions."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _checks, _compiled, _strided, settings, windows
from ._checks import PatchgridError
from ._finish import (
    REDUCES,
    cast_hint,
    divide_by_profiles,
    profile_sum,
    shaped,
    sum_dtype,
    warn_uncovered,
    weight_array,
)
from .backends import NUMPY, Backend, backend_of, check_cast, check_exact_sum, lossless
from .grid import PatchGrid

__all__ = ["Merger", "coverage", "merge"]


# Patches smaller than this (bytes) go in stretches of a grid row rather than one by one.
RUN_BYTES = 1 << 16


def _runs(idx: np.ndarray, row: int) -> list[tuple[int, int]]:
    """Stretches ``[b0, b1)`` of a batch whose indices go up by one within one row of the grid
    (``row`` patches along its last tiled axis), two patches or more."""
    if len(idx) < 2:
        return []
    joined = (np.diff(idx) == 1) & ((idx[1:] // row) == (idx[:-1] // row))
    edges = [0, *(np.flatnonzero(~joined) + 1).tolist(), len(idx)]
    return [(b0, b1) for b0, b1 in itertools.pairwise(edges) if b1 - b0 >= 2]


class Merger:
    """Accumulates patches, in any order and in batches, into one image.

    Parameters
    ----------
    grid : PatchGrid
        Where the patches sit.
    reduce : {"mean", "sum", "max", "min", "argmax"}
        How overlapping voxels combine. ``"mean"`` is the weighted average, ``"sum"`` the
        weighted sum; ``"max"`` and ``"min"`` take no window. ``"argmax"`` blends class scores
        like ``"mean"`` and keeps, per voxel, the index of the largest along the class axis
        (the last axis that is not tiled), which the output drops: labels of the smallest
        unsigned dtype that holds them, without ever holding the classes x volume scores.
    window : None, {"uniform", "gaussian", "hann", "triangular"} or array
        Weight of each voxel of a patch (see :func:`window`); an array must have the patch's
        shape along the tiled axes.
    fill : scalar
        Value of the voxels no patch covers.
    dtype : dtype, optional
        Output dtype. By default the patches' dtype when it is floating (or complex) or when
        ``reduce`` is ``"max"``/``"min"``, else float64.
    out : array-like, optional
        Where to write the result: a NumPy array, a ``np.memmap``, a zarr array, an h5py
        dataset, a tensor; anything with ``shape``, ``dtype`` and slice assignment. Its dtype
        is the output dtype unless ``dtype`` says otherwise.

    Notes
    -----
    Output rows along the first tiled axis are finished as soon as every patch that touches
    them has been added: they are normalised, reduced, cast and written to the output, and the
    accumulator lets go of them. Patches added in grid order (as :func:`apply` adds them) so
    keep the accumulator to about one patch thick along that axis, whatever the image's size;
    patches added in any other order keep more of it until their rows complete. The
    accumulator is float32 or wider for ``"mean"``, ``"sum"`` and ``"argmax"``.

    Examples
    --------
    >>> import numpy as np
    >>> import patchgrid as pg
    >>> image = np.arange(36.0).reshape(6, 6)
    >>> grid = pg.PatchGrid(image.shape, size=4, stride=2)
    >>> merger = pg.Merger(grid, window="hann")
    >>> patches = pg.extract(image, grid, flatten=True)
    >>> merger.add(patches[:2], [0, 1])
    >>> merger.add(patches[2:], [2, 3])
    >>> bool(np.allclose(merger.result(), image))
    True
    """

    def __init__(
        self,
        grid: PatchGrid,
        *,
        reduce: str = "mean",
        window: Any = None,
        fill: Any = 0,
        dtype: Any = None,
        out: Any = None,
    ) -> None:
        if not isinstance(grid, PatchGrid):
            raise TypeError(f"grid must be a PatchGrid, got {type(grid).__name__}")
        self.grid = grid
        self.reduce = _checks.choice(reduce, REDUCES, "reduce")
        self._profiles = windows.profiles(window, grid.size)
        self._window = windows.as_window_array(window, grid.size)
        self._uniform = window is None or (isinstance(window, str) and window == "uniform")
        if self.reduce in ("max", "min") and not self._uniform:
            raise PatchgridError(
                f"window applies to reduce='mean', 'sum' and 'argmax' only, got "
                f"window={window!r} with reduce={reduce!r}"
            )
        if not np.isscalar(fill):
            raise TypeError(f"fill must be a scalar, got {fill!r}")
        if out is not None and not all(hasattr(out, n) for n in ("shape", "dtype", "__setitem__")):
            raise TypeError(
                f"out must be an array with shape, dtype and slice assignment (an ndarray, "
                f"memmap, zarr array, h5py dataset or tensor), got {type(out).__name__}"
            )
        self.fill = fill
        self._dtype = dtype
        self._sink = out
        self._seen = np.zeros(grid.counts, dtype=bool)
        self._acc: Any = None
        self._wacc: Any = None
        self._lo = 0  # the padded row where the accumulator begins
        self._done = 0  # rows before this one are finished
        self._direct = False  # the accumulator is the output itself
        self._normalised = False  # the compiled kernel divided by the coverage already
        self._weight_cache: Any = None
        self._xp: Backend = NUMPY
        self._patch_shape: tuple[int, ...] | None = None
        self._result: Any = None
        self._starts0 = grid.axis_starts(0)
        self._starts_all: np.ndarray | None = None  # every patch's corner, once needed
        self._overlap: int | None = None  # the most patches over a voxel, once needed
        self._warn = (
            True  # result() says when voxels lie in no patch (tiles leave it to the caller)
        )
        # Out-of-core work is bound by its files, and its budget is memory: there the kernels
        # serve only if the process has loaded them already (loading costs about 65 MiB).
        self._load_kernels = True

    @property
    def missing(self) -> np.ndarray:
        """Indices of the patches not added yet."""
        return np.flatnonzero(~self._seen.ravel())

    @property
    def complete(self) -> bool:
        """True once every patch of the grid has been added."""
        return bool(self._seen.all())

    def _weight(self) -> Any:
        """The window shaped to broadcast against one patch, or None for a uniform one."""
        if self._uniform or self.reduce in ("max", "min"):
            return None
        if self._weight_cache is None:
            window = weight_array(self._window, self._profiles, self.grid,
                                  sum_dtype(self._xp, self._acc_dtype))  # fmt: skip
            self._weight_cache = self._xp.constant(window, self._real_dtype(), self._like)
        return self._weight_cache

    def _wshape(self) -> list[int]:
        shape = [1] * self.grid.ndim
        for a, p in zip(self.grid.axes, self.grid.size):
            shape[a] = p
        return shape

    def _op(self) -> str:
        return {"max": "max", "min": "min"}.get(self.reduce, "add")

    def _start(self, patches: Any, patch_shape: tuple[int, ...]) -> None:
        """Check one patch's shape against the grid; settle dtypes and the output on first use."""
        grid = self.grid
        if self._result is not None:
            raise PatchgridError("result() was already called; make a new Merger to merge again")
        if len(patch_shape) != grid.ndim or any(
            patch_shape[a] != p for a, p in zip(grid.axes, grid.size)
        ):
            expected = tuple(
                "*" if a not in grid.axes else p for a, p in enumerate(grid.patch_shape)
            )
            raise PatchgridError(
                f"patches must have shape {expected} (the patch size {grid.size} on the tiled "
                f"axes {grid.axes}; * is free), got patches of shape {patch_shape}"
            )
        if self._patch_shape is not None:
            if patch_shape != self._patch_shape:
                raise PatchgridError(
                    f"patches must all have one shape; the first had {self._patch_shape}, "
                    f"these have {patch_shape}"
                )
            return
        xp = self._xp = backend_of(patches)
        self._like = patches
        dtype = xp.dtype(patches)
        self._patch_shape = patch_shape
        out_shape = list(grid.shape)
        for a in range(grid.ndim):
            if a not in grid.axes:
                out_shape[a] = patch_shape[a]
        self._class_axis = None
        if self.reduce == "argmax":
            free = [a for a in range(grid.ndim) if a not in grid.axes]
            if not free:
                raise PatchgridError(
                    "reduce='argmax' needs a class axis that is not tiled (patches shaped "
                    "(classes, *spatial)); every axis of these patches is tiled"
                )
            self._class_axis = free[-1]
            n_classes = out_shape.pop(self._class_axis)
            self._acc_dtype = xp.acc_dtype(dtype, "mean")
            default = xp.label_dtype(n_classes)
        else:
            self._acc_dtype = xp.acc_dtype(dtype, self.reduce)
            default = xp.out_dtype(dtype, self.reduce)
        self._out_shape = tuple(out_shape)
        self._patch_dtype = dtype
        self._n_classes = n_classes if self.reduce == "argmax" else 0
        if self._dtype is not None:
            default = self._dtype
        elif self._sink is not None:
            default = self._sink.dtype
            if xp.name != "torch" and not isinstance(default, np.dtype):
                default = np.dtype(str(default).replace("torch.", ""))  # a tensor out=
        self._out_dtype = xp.as_dtype(default) if xp.name == "torch" else np.dtype(default)
        if self._sink is not None and tuple(self._sink.shape) != self._out_shape:
            raise PatchgridError(
                f"out must have shape {self._out_shape} for these patches, got "
                f"{tuple(self._sink.shape)}"
            )
        self._check_fill()
        if self.reduce == "argmax":
            # The labels are known before any work: check them against the output now.
            check_cast(NUMPY, np.arange(max(self._n_classes, 1)), xp.numpy_dtype(self._out_dtype),
                       what=f"class numbers of {self._n_classes} classes",
                       hint=cast_hint("argmax"))  # fmt: skip
        self._identity = (
            0 if self.reduce not in ("max", "min")
            else xp.extreme(self._acc_dtype, self.reduce == "min")
        )  # fmt: skip
        self._array_window = self._profiles is None and self.reduce in ("mean", "argmax")
        # Accumulate straight into the output when nothing needs reducing, casting or cropping.
        sink = self._sink
        self._direct = (
            self._class_axis is None
            and grid.padded_shape == grid.shape
            and self._out_dtype == self._acc_dtype
            and (sink is None or (
                backend_of(sink) is xp and (isinstance(sink, np.ndarray) or xp.name == "torch")
                and xp.dtype(sink) == self._acc_dtype and xp.writeable(sink)))
        )  # fmt: skip

    def _real_dtype(self) -> Any:
        """The weights' dtype: the accumulator's, or its real part's for complex patches."""
        if self._xp.kind(self._acc_dtype) != "c":
            return self._acc_dtype
        if self._xp.name == "torch":
            return self._xp.torch.float64  # type: ignore[attr-defined]
        return np.finfo(self._acc_dtype).dtype

    def _empty(self) -> Any:
        """The result of a grid without patches: the output, of the image's shape (one axis
        of length 0), in the output dtype where it is known (float64 where nothing says)."""
        if self._patch_shape is not None:
            shape, dtype = self._out_shape, self._out_dtype
        else:
            shape = self.grid.shape
            dtype = self._dtype if self._dtype is not None else getattr(
                self._sink, "dtype", np.float64)  # fmt: skip
        if self._sink is not None:
            if tuple(self._sink.shape) != tuple(shape):
                raise PatchgridError(
                    f"out must have shape {tuple(shape)}, got {tuple(self._sink.shape)}"
                )
            return self._sink
        if self._patch_shape is not None:
            return self._xp.empty(shape, dtype, self._like)
        return np.empty(shape, dtype=np.dtype(dtype))

    def _check_sum(self, arr: Any) -> None:
        """Integer patches: refuse values whose sums the accumulator cannot hold exactly."""
        if self.reduce in ("max", "min") or self._xp.kind(self._patch_dtype) not in "iu":
            return
        if self._overlap is None:
            self._overlap = self.grid.overlap
        check_exact_sum(self._xp, arr, self._acc_dtype, self._overlap, not self._uniform)

    def _check_fill(self) -> None:
        if not self._xp.fits(self.fill, self._out_dtype):
            raise PatchgridError(
                f"fill={self.fill!r} cannot be stored in the output dtype {self._out_dtype}; "
                f"give a fill that fits or a dtype= that holds it"
            )

    def _ensure(self, hi: int) -> None:
        """Make the accumulator reach padded row ``hi`` along the first tiled axis."""
        grid, xp, a0 = self.grid, self._xp, self.grid.axes[0]
        if self._direct:
            if self._acc is None:
                if self._sink is None:
                    self._sink = xp.full(
                        self._out_shape, self._identity, self._acc_dtype, self._like
                    )
                else:
                    xp.assign(self._sink, self._identity)
                self._acc = self._sink
                self._ensure_weights()
            return
        rows = hi - self._lo
        have = 0 if self._acc is None else self._acc.shape[a0]
        if rows <= have:
            return
        if have == 0:
            # Room for one patch: batches in grid order come row by row (see add).
            rows = max(rows, min(grid.size[0], grid.padded_shape[a0] - self._lo))
        shape = list(grid.padded_shape)
        for a in range(grid.ndim):
            if a not in grid.axes:
                shape[a] = self._patch_shape[a]  # type: ignore[index]
        shape[a0] = rows
        acc = xp.full(shape, self._identity, self._acc_dtype, self._like)
        wacc = None
        if self._array_window:
            wshape = [1 if a not in grid.axes else n for a, n in enumerate(shape)]
            wacc = xp.full(wshape, 0, self._real_dtype(), self._like)
        if have:
            head: list[Any] = [slice(None)] * grid.ndim
            head[a0] = slice(0, have)
            xp.assign(acc[tuple(head)], self._acc)
            if wacc is not None:
                xp.assign(wacc[tuple(head)], self._wacc)
        self._acc, self._wacc = acc, wacc

    def _ensure_weights(self) -> None:
        """A full-size weight accumulator, for an array window in direct mode."""
        if self._array_window and self._wacc is None:
            grid = self.grid
            wshape = [n if a in grid.axes else 1 for a, n in enumerate(grid.shape)]
            self._wacc = self._xp.full(wshape, 0, self._real_dtype(), self._like)

    def _local(self, index: int) -> tuple[slice, ...]:
        """Slices of patch ``index`` in the accumulator, whose first row is ``self._lo``."""
        sl = list(self.grid.slices(index))
        a0 = self.grid.axes[0]
        sl[a0] = slice(sl[a0].start - self._lo, sl[a0].stop - self._lo)
        return tuple(sl)

    def add(self, batch: Any, indices: Any) -> None:
        """Add a batch of patches ``(B, *patch_shape)`` at grid indices ``indices``.

        ``indices`` holds ``B`` patch numbers, or ``(B, k)`` grid positions; a single patch
        with a single index works too. Adding a patch twice, an index out of range or a patch
        of the wrong shape raises :class:`ValueError`.
        """
        if self._result is not None:
            raise PatchgridError("result() was already called; make a new Merger to merge again")
        xp = backend_of(batch)
        arr = xp.asarray(batch)
        idx = np.asarray(indices)
        if idx.size == 0 and idx.dtype.kind not in "iu":
            idx = idx.astype(np.intp)  # [] comes as float64: no index is an integer index
        grid = self.grid
        k = len(grid.axes)
        if idx.ndim == 0 or (idx.shape == (k,) and k > 1 and arr.ndim == grid.ndim):
            arr, idx = arr[None], idx.reshape(1, -1) if idx.ndim else idx.reshape(1)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
        if idx.ndim == 2:
            if idx.shape[1] != k:
                raise PatchgridError(
                    f"indices as positions must be shaped (B, {k}), got {idx.shape}"
                )
            bad = (idx < 0) | (idx >= np.array(grid.counts))
            if bad.any():
                raise PatchgridError(
                    f"indices has position {tuple(idx[bad.any(axis=1)][0].tolist())} outside "
                    f"the grid's counts {grid.counts}"
                )
            idx = np.ravel_multi_index(tuple(idx.T), grid.counts)
        elif idx.ndim != 1:
            raise PatchgridError(
                f"indices must be 1-D (patch numbers) or 2-D (positions), got shape {idx.shape}"
            )
        if arr.ndim < 1 or arr.shape[0] != len(idx):
            raise PatchgridError(
                f"batch has {arr.shape[0] if arr.ndim else 0} patches but indices has {len(idx)}"
            )
        n = len(grid)
        out_of_range = (idx < -n) | (idx >= n)
        if out_of_range.any():
            raise PatchgridError(
                f"indices has {int(idx[out_of_range][0])}, out of range for a grid of {n} patches"
            )
        idx = idx % n
        uniq, counts = np.unique(idx, return_counts=True)
        if (counts > 1).any():
            raise PatchgridError(f"indices repeats patch {int(uniq[counts > 1][0])} in one batch")
        seen = self._seen.ravel()
        again = seen[idx]
        if again.any():
            i = int(idx[again][0])
            raise PatchgridError(f"patch {i} (position {grid.position(i)}) was already added")
        if not len(idx):
            return
        rows = np.unravel_index(idx, grid.counts)[0]
        if rows[0] != rows[-1] and not self._direct and (np.diff(rows) >= 0).all():
            # A batch in grid order that reaches into the next rows of patches: row by row,
            # so that a row finishes and leaves the accumulator before the next needs room
            # (the accumulator stays one patch thick instead of a patch and a step).
            for b0, b1 in itertools.pairwise([0, *(np.flatnonzero(np.diff(rows)) + 1), len(idx)]):
                self.add(arr[b0:b1], idx[b0:b1])
            return
        self._start(arr, tuple(arr.shape[1:]))
        self._check_sum(arr)
        self._ensure(int(self._starts0[rows].max()) + grid.size[0])
        xp, op, weight = self._xp, self._op(), self._weight()
        if self._add_compiled(arr, idx, op, weight):
            seen[idx] = True
            self._flush()
            return
        scratch: list[Any] = []
        done = np.zeros(len(idx), dtype=bool)
        # Small patches cost a Python step each; large ones are better one by one (torch's
        # in-place ops, when loaded, are faster on one patch than on a strided stretch).
        small = xp.nbytes(arr) // max(len(idx), 1) < RUN_BYTES
        for b0, b1 in _runs(idx, grid.counts[-1]) if small else []:
            self._add_run(arr[b0:b1], int(idx[b0]), op, weight, scratch, seen)
            done[b0:b1] = True
        for b in np.flatnonzero(~done).tolist():
            i, patch = int(idx[b]), arr[b]
            sl = self._local(i)
            target = self._acc[sl]
            if weight is None:
                xp.inplace(op, target, patch)
            else:
                xp.add_product(target, patch, weight, scratch)
            if self._wacc is not None:
                wsl = tuple(s if a in grid.axes else slice(None) for a, s in enumerate(sl))
                xp.inplace("add", self._wacc[wsl], weight)
            # Marked one by one: if a later patch of the batch fails, those already added are
            # known as added, and adding them again raises instead of counting them twice.
            seen[i] = True
        self._flush()

    def _add_compiled(self, arr: Any, idx: np.ndarray, op: str, weight: Any) -> bool:
        """A batch of large patches through the compiled kernel, if it serves: NumPy floats,
        an adding reduction, a separable window (no weight volume to keep), a large job."""
        grid = self.grid
        if not (op == "add" and self._wacc is None):
            return False
        if not (self._load_kernels or _compiled.loaded()):
            return False
        acc, patches = _compiled.host(self._acc), _compiled.host(arr)
        w = None if weight is None else _compiled.host(weight)
        if acc is None or patches is None or (weight is not None and w is None):
            return False
        if not _compiled.serves_batch(acc, patches, grid.axes, len(grid)):
            return False
        if self._starts_all is None:
            self._starts_all = grid.starts()
        starts = self._starts_all[idx]
        starts[:, 0] -= self._lo
        return _compiled.add_batch(acc, patches, starts, w)

    def _add_run(
        self, patches: Any, first: int, op: str, weight: Any, scratch: list[Any], seen: Any
    ) -> None:
        """Patches ``first``, ``first + 1``, ... of one row of the grid (along its last tiled
        axis), in a few strided operations: one per phase of patches that do not overlap.

        Each operation adds whole patches, which are marked as added as soon as it is done.
        """
        grid, xp = self.grid, self._xp
        k = len(grid.axes)
        pos = grid.position(first)
        n = patches.shape[0]
        last = grid.axis_starts(k - 1)[pos[-1] : pos[-1] + n]
        lead = [int(grid.axis_starts(j)[pos[j]]) for j in range(k - 1)]
        if k > 1:
            lead[0] -= self._lo
        else:
            last = last - self._lo
        for r0, count, start, step in _strided.runs(last.tolist(), grid.size[-1]):
            phases = 1 if step >= grid.size[-1] else -(-grid.size[-1] // step)
            for q in range(min(phases, count)):
                sel = range(r0 + q, r0 + count, phases)
                where = [*lead, start + q * step]
                target = _strided.window_view(
                    self._acc, grid.axes, where, [*grid.size[:-1], phases * step],
                    [1] * (k - 1) + [len(sel)], grid.size, xp,
                )  # fmt: skip
                source = patches[sel.start : sel.stop : sel.step]
                source = source.reshape((1,) * (k - 1) + tuple(source.shape))
                if weight is None:
                    xp.inplace(op, target, source)
                else:
                    xp.add_product(target, source, weight, scratch)
                if self._wacc is not None:
                    wtarget = _strided.window_view(
                        self._wacc, grid.axes, where, [*grid.size[:-1], phases * step],
                        [1] * (k - 1) + [len(sel)], grid.size, xp,
                    )  # fmt: skip
                    xp.inplace("add", wtarget, weight)
                seen[first + sel.start : first + sel.stop : sel.step] = True

    def add_all(self, patches: Any) -> None:
        """Add every patch of the grid at once, shaped ``(*counts, *patch)`` or ``(N, *patch)``.

        This is the fast path :func:`merge` takes: a few vectorised strided operations
        instead of one per patch.
        """
        xp = backend_of(patches)
        arr = xp.asarray(patches)
        grid = self.grid
        k = len(grid.axes)
        n_lead = arr.ndim - grid.ndim
        if n_lead == 1 and arr.shape[0] == len(grid):
            arr = arr.reshape(*grid.counts, *arr.shape[1:])
        elif n_lead != k or tuple(arr.shape[:k]) != grid.counts:
            raise PatchgridError(
                f"patches must be shaped (*counts, *patch) = ({', '.join(map(str, grid.counts))},"
                f" ...) or (N, *patch) with N = {len(grid)} for this grid, got shape "
                f"{tuple(arr.shape)}; if they were cut with another edge policy, stride or "
                f"axes (grid here: edge {grid.edge}, stride {grid.stride}), pass the same, or "
                f"pass the PatchGrid itself"
            )
        if self._seen.any():
            raise PatchgridError("add_all needs a Merger that has no patches yet")
        self._start(arr, tuple(arr.shape[k:]))
        if not len(grid):
            return  # nothing to add: result() gives the empty image
        self._check_sum(arr)
        if self._add_all_compiled(arr):
            return
        if self._direct:
            self._add_rows(arr, 0, grid.counts[0])
            return
        # The accumulator is not the output (a wider dtype, a crop, labels): rows of patches a
        # block at a time, each block's finished rows cast into the output and let go, so the
        # accumulator stays a slab however large the image.
        n0, rows = grid.counts[0], self._block_rows(arr)
        for r0 in range(0, n0, rows):
            self._add_rows(arr, r0, min(r0 + rows, n0))

    def _block_rows(self, arr: Any) -> int:
        """Rows of patches (along the first tiled axis) per block of :meth:`add_all`: a slab
        of the accumulator of about ``TILE_BYTES``, at least one patch's worth of phases."""
        grid, a0 = self.grid, self.grid.axes[0]
        plane = math.prod(grid.padded_shape) // max(grid.padded_shape[a0], 1)
        for a in range(grid.ndim):
            if a not in grid.axes:
                plane = plane // max(grid.shape[a], 1) * self._patch_shape[a]  # type: ignore[index]
        plane_bytes = plane * np.dtype(self._xp.numpy_dtype(self._acc_dtype)).itemsize
        phases = -(-grid.size[0] // grid.stride[0])
        rows = settings.TILE_BYTES // max(plane_bytes * grid.stride[0], 1)
        return max(int(rows), phases, 1)

    def _add_rows(self, arr: Any, r0: int, r1: int) -> None:
        """Add the patches of grid rows ``[r0, r1)`` (along the first tiled axis): one strided
        operation per regular sub-grid, through the compiled kernel where it serves."""
        grid, xp, k = self.grid, self._xp, len(self.grid.axes)
        self._ensure(int(self._starts0[r1 - 1]) + grid.size[0])
        op, weight = self._op(), self._weight()
        block = arr[r0:r1]
        if not self._add_rows_compiled(block, r0, r1, op, weight):
            for sub in _strided.subgrids(grid):
                i0, n, f0, t0 = sub[0]
                lo, hi = max(i0, r0), min(i0 + n, r1)
                if hi <= lo:
                    continue
                pick = (slice(lo - r0, hi - r0), *(slice(i, i + m) for i, m, _, _ in sub[1:]))
                first = [f0 + (lo - i0) * t0 - self._lo, *(f for _, _, f, _ in sub[1:])]
                step = [t for _, _, _, t in sub]
                _strided.accumulate(self._acc, block[pick], grid.axes, first, step, op, weight, xp)
                if self._wacc is not None:
                    counts = [hi - lo, *(m for _, m, _, _ in sub[1:])]
                    lead = weight.reshape((1,) * k + tuple(weight.shape))
                    lead = lead.expand(*counts, *weight.shape) if xp.name == "torch" else (
                        np.broadcast_to(lead, (*counts, *weight.shape)))  # fmt: skip
                    _strided.accumulate(self._wacc, lead, grid.axes, first, step, "add", None, xp)
        self._seen[r0:r1] = True
        self._flush()

    def _add_rows_compiled(self, block: Any, r0: int, r1: int, op: str, weight: Any) -> bool:
        """Grid rows ``[r0, r1)`` through the compiled kernel, if it serves (NumPy floats, an
        adding reduction, a separable window, no padding)."""
        grid = self.grid
        if not (
            self._xp is NUMPY
            and op == "add"
            and self._wacc is None
            and grid.padded_shape == grid.shape
            and (self._load_kernels or _compiled.loaded())
            and _compiled.serves(self._acc, block, grid.ndim, grid.axes)
        ):
            return False
        starts = [grid.axis_starts(0)[r0:r1] - self._lo] + [
            grid.axis_starts(j) for j in range(1, len(grid.axes))
        ]
        w = None if weight is None else np.asarray(weight).reshape(grid.size)
        _compiled.overlap_add(self._acc, block, starts, grid.size, w, False, None)
        return True

    def _add_all_compiled(self, arr: Any) -> bool:
        """Every patch at once through the compiled kernel, if it serves: each output plane is
        summed in a float64 plane of its own, normalised and written in the output's dtype, so
        the wide accumulator never holds more than a plane per thread.

        Only for a mean (or a sum whose output is the accumulator's dtype), a separable window,
        no labels, no padding to crop, NumPy arrays.
        """
        grid = self.grid
        if not (
            self._xp is NUMPY
            and self._op() == "add"
            and not self._array_window
            and self._class_axis is None
            and grid.padded_shape == grid.shape
            and np.dtype(self._acc_dtype) == np.float64  # the kernel sums in float64
            and (self.reduce == "mean" or self._out_dtype == self._acc_dtype)
        ):
            return False
        out = self._sink
        if out is not None and (not isinstance(out, np.ndarray) or out.dtype != self._out_dtype):
            return False
        probe = out if out is not None else np.empty(0, self._out_dtype)
        if not _compiled.serves_planes(probe, arr, grid.ndim, grid.axes):
            return False
        if out is None:
            out = _compiled.fresh(self._out_shape, self._out_dtype)
        profiles = None
        if self.reduce == "mean":
            profiles = [np.where(p > 0, p, 1) for p in self._profile_coverage(False)]
        weight = None if self._uniform else np.asarray(self._window, np.float64).reshape(grid.size)
        starts = [grid.axis_starts(j) for j in range(len(grid.axes))]
        _compiled.merge_planes(out, arr, starts, grid.size, weight, profiles)
        # Finished as a direct merge: only the voxels no patch covers are left to fill.
        self._sink = self._acc = out
        self._direct = self._normalised = True
        self._seen[...] = True
        self._flush()
        return True

    def _flush(self) -> None:
        """Finish the rows that no patch still to come can touch."""
        rows_done = np.asarray(self._seen.reshape(self._seen.shape[0], -1).all(axis=1))
        n_rows = rows_done.shape[0]
        r = int(np.argmin(rows_done)) if not rows_done.all() else n_rows
        a0 = self.grid.axes[0]
        upto = int(self._starts0[r]) if r < n_rows else self.grid.padded_shape[a0]
        if upto <= self._done:
            return
        self._ensure(upto)
        # Finished rows a few MiB at a time: their normalised, cast copy stays that small.
        row = self._xp.nbytes(self._acc) // max(self._acc.shape[a0], 1)
        step = upto - self._done if self._direct else max(1, settings.FINISH_BYTES // max(row, 1))
        while self._done < upto:
            self._finish(min(upto, self._done + step), complete=True)

    def _coverage_block(
        self, start: int, upto: int, complete: bool, ones: bool, running: bool = True
    ) -> tuple[str, Any]:
        """Weights over padded rows ``[start, upto)``: per-axis profiles, or a volume."""
        grid, a0 = self.grid, self.grid.axes[0]
        if complete and (ones or self._profiles is not None):
            profs = self._profile_coverage(ones)
            profs[0] = profs[0][start:upto]
            return "profiles", profs
        if complete and not ones and running and self._wacc is not None:
            head: list[Any] = [slice(None)] * grid.ndim
            head[a0] = slice(start - self._lo, upto - self._lo)
            wide = sum_dtype(self._xp, self._acc_dtype)  # the weights' own precision
            return "volume", self._xp.to_numpy(self._wacc[tuple(head)]).astype(wide)
        # Some patches are missing: add up the weights of those present, one by one.
        shape = [1] * grid.ndim
        for a in grid.axes:
            shape[a] = grid.padded_shape[a]
        shape[a0] = upto - start
        cov = np.zeros(shape)
        w = np.ones(self._wshape()) if ones else self._window.reshape(self._wshape())
        for i in np.flatnonzero(self._seen.ravel()).tolist():
            sl = list(grid.slices(i))
            first, last = sl[a0].start - start, sl[a0].stop - start
            if last <= 0 or first >= shape[a0]:
                continue
            lo, hi = max(first, 0), min(last, shape[a0])
            target = [s if a in grid.axes else slice(None) for a, s in enumerate(sl)]
            target[a0] = slice(lo, hi)
            wsl: list[Any] = [slice(None)] * grid.ndim
            wsl[a0] = slice(lo - first, hi - first)
            cov[tuple(target)] += w[tuple(wsl)]
        return "volume", cov

    def _finish(self, upto: int, complete: bool) -> None:
        """Normalise, reduce, cast and write padded rows ``[done, upto)``; let them go."""
        grid, xp, a0 = self.grid, self._xp, self.grid.axes[0]
        start = self._done
        head: list[Any] = [slice(None)] * grid.ndim
        head[a0] = slice(start - self._lo, upto - self._lo)
        block = self._acc[tuple(head)]
        ones = self.reduce != "mean"
        kind, cov = self._coverage_block(start, upto, complete, ones)
        if kind == "profiles":
            if not ones and not self._normalised:
                divide_by_profiles(block, grid.axes, cov, xp)
            empty = [(a, p == 0) for a, p in zip(grid.axes, cov) if (p == 0).any()]
        else:
            if not ones:
                xp.divide(block, xp.constant(np.where(cov > 0, cov, 1), xp.dtype(block), block))
            empty = [(-1, cov == 0)] if (cov == 0).any() else []
        # Crop to the image (padding and rows past its end), and reduce.
        stop = max(min(upto, grid.shape[a0]) - start, 0)
        crop = [slice(0, s) if a in grid.axes else slice(None) for a, s in enumerate(grid.shape)]
        crop[a0] = slice(0, stop)
        result = block[tuple(crop)]
        masks = []
        for a, mask in empty:
            if a == -1:
                masks.append((a, mask[tuple(crop)]))
            else:
                masks.append((a, mask[crop[a]] if a != a0 else mask[:stop]))
        self._done = upto
        if self._direct:
            self._fill(result, masks)
            return
        if self._class_axis is not None:
            result = self._labels(result)
        else:
            if xp.kind(self._out_dtype) in "iub" and xp.kind(xp.dtype(result)) == "f":
                result = xp.round(result)  # an integer output takes the nearest value
            self._check_cast(result)
        result = xp.astype(result, self._out_dtype)
        self._fill(result, masks)
        if stop > 0:
            self._write(result, start, start + stop)
        self._drop(upto - self._lo)

    def _labels(self, scores: Any) -> Any:
        """Argmax over the class axis, a few rows at a time, straight into the label dtype.

        Whole, NumPy's argmax over a leading axis copies the scores and returns int64 labels:
        twice the block and eight bytes a voxel, where these are one.
        """
        xp, ca, a0 = self._xp, self._class_axis, self.grid.axes[0]
        assert ca is not None
        shape = list(scores.shape)
        shape.pop(ca)
        labels = xp.empty(shape, self._out_dtype, scores)
        at = a0 if a0 < ca else a0 - 1
        n = scores.shape[a0]
        step = max(1, _strided.CHUNK_BYTES // max(xp.nbytes(scores) // max(n, 1), 1))
        for lo in range(0, n, step):
            src: list[Any] = [slice(None)] * scores.ndim
            dst: list[Any] = [slice(None)] * len(shape)
            src[a0] = dst[at] = slice(lo, lo + step)
            xp.assign(labels[tuple(dst)], xp.astype(xp.argmax(scores[tuple(src)], ca),
                                                   self._out_dtype))  # fmt: skip
        return labels

    def _check_cast(self, values: Any, dtype: Any = None) -> None:
        """The cast rule for finished values going to the output dtype (or ``dtype``).

        A mean, max or min stays within the range of the patches, so only an output that
        cannot hold the patches' dtype needs a look at the values; a sum always does.
        """
        xp = self._xp
        dtype = self._out_dtype if dtype is None else dtype
        src = self._patch_dtype if xp.kind(self._patch_dtype) in "iub" else xp.dtype(values)
        force = self.reduce == "sum"
        if not force and lossless(xp.numpy_dtype(self._patch_dtype), xp.numpy_dtype(dtype)):
            return
        hint = cast_hint(self.reduce)
        if xp.kind(self._patch_dtype) in "iu" and xp.kind(dtype) == "f":
            plain = str(self._patch_dtype).replace("torch.", "")
            hint = (
                f"pass dtype={plain} to keep integers (a mean is rounded to the nearest), or "
                f"reduce='max' or 'min' for labels and IDs (exact)"
            )
        check_cast(xp, values, dtype, src=src, force=force, what=f"the merged result "
                   f"(reduce={self.reduce!r})", hint=hint)  # fmt: skip

    def _fill(self, result: Any, masks: list[tuple[int, Any]]) -> None:
        """Set ``fill`` where no patch covers."""
        nd = result.ndim
        ca = self._class_axis
        for a, mask in masks:
            if a == -1:
                m = mask
                if ca is not None:
                    m = m.reshape(m.shape[:ca] + m.shape[ca + 1 :])
                self._xp.fill_where(result, self._xp.constant(m, bool, result), self.fill)
                continue
            axis = a if ca is None or a < ca else a - 1
            where: list[Any] = [slice(None)] * nd
            where[axis] = np.flatnonzero(mask)
            if self._xp.name == "torch":
                where[axis] = self._xp.constant(where[axis], np.int64, result)
            result[tuple(where)] = self.fill

    def _write(self, block: Any, lo: int, hi: int) -> None:
        """Put finished rows ``[lo, hi)`` of the image into the output."""
        if self._sink is None:
            self._sink = self._xp.empty(self._out_shape, self._out_dtype, self._acc)
        a0 = self.grid.axes[0]
        ca = self._class_axis
        axis = a0 if ca is None or a0 < ca else a0 - 1
        where: list[Any] = [slice(None)] * len(self._out_shape)
        where[axis] = slice(lo, hi)
        sink_xp = backend_of(self._sink)
        into = sink_xp.numpy_dtype(self._sink.dtype) if sink_xp.name == "torch" else np.dtype(
            self._sink.dtype)  # fmt: skip
        if into != self._xp.numpy_dtype(self._out_dtype):
            check_cast(self._xp, block, into, what=f"the merged result (dtype {self._out_dtype})",
                       hint=f"out= has dtype {into}; " + cast_hint(self.reduce))  # fmt: skip
        if sink_xp.name == "torch":
            if sink_xp is not self._xp:
                block = sink_xp.torch.from_numpy(np.ascontiguousarray(block))  # type: ignore[attr-defined]
            self._sink[tuple(where)] = block
        else:
            self._sink[tuple(where)] = self._xp.to_numpy(block)

    def _drop(self, n: int) -> None:
        """Let go of the first ``n`` accumulator rows: shift the rest to the front."""
        grid, xp, a0 = self.grid, self._xp, self.grid.axes[0]
        rows = self._acc.shape[a0]
        keep = rows - n
        if keep <= 0:  # nothing left to keep: a later row makes a fresh accumulator
            self._acc = self._wacc = None
            self._lo += n
            return
        for name in ("_acc", "_wacc"):
            acc = getattr(self, name)
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
            xp.assign(acc[tuple(tail)], self._identity if name == "_acc" else 0)
        self._lo += n

    def _profile_coverage(self, ones: bool) -> list[np.ndarray]:
        """Coverage along each tiled axis, for a complete grid and a separable window."""
        grid = self.grid
        profs = (
            self._profiles
            if not ones and self._profiles is not None
            else [np.ones(p) for p in grid.size]
        )
        dtype = sum_dtype(self._xp, self._acc_dtype) if self._patch_shape else np.float64
        return [
            profile_sum(grid.axis_starts(j), profs[j], grid.padded_shape[a], dtype)
            for j, a in enumerate(grid.axes)
        ]

    def coverage(self) -> np.ndarray:
        """Sum of the weights of the patches added so far, per voxel of the image.

        Shaped like the image on the tiled axes and 1 on the others, so it broadcasts against
        the result. Zero where no patch covers (there the result holds ``fill``).
        """
        grid = self.grid
        ones = self.reduce in ("max", "min")
        end = grid.padded_shape[grid.axes[0]]
        kind, cov = self._coverage_block(0, end, self.complete, ones, running=False)
        if kind == "profiles":
            out = np.ones([1] * grid.ndim)
            for a, prof in zip(grid.axes, cov):
                out = out * shaped(prof, a, grid.ndim)
            cov = out
        crop = tuple(
            slice(0, s) if a in grid.axes else slice(None) for a, s in enumerate(grid.shape)
        )
        return np.asarray(cov[crop])

    def result(self, *, allow_missing: bool = False) -> Any:
        """The merged image. Raises if a patch was never added, unless ``allow_missing``.

        Voxels that no added patch covers get ``fill``. Nothing can be added afterwards;
        calling ``result()`` again returns the same array (``out`` when one was given).
        """
        if self._result is not None:
            return self._result
        grid = self.grid
        if not len(grid):  # an empty axis: an empty image, not an error
            self._result = self._empty()
            return self._result
        if self._patch_shape is None:
            raise PatchgridError("no patches were added; nothing to merge")
        missing = self.missing
        if len(missing) and not allow_missing:
            shown = ", ".join(str(grid.position(int(i))) for i in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise PatchgridError(
                f"{len(missing)} of {len(grid)} patches were never added (positions {shown}"
                f"{more}); add them, or pass allow_missing=True to fill their voxels with "
                f"fill={self.fill!r}"
            )
        end = grid.padded_shape[grid.axes[0]]
        if end > self._done:
            self._ensure(end)
            self._finish(end, complete=not len(missing))
        if self._warn and not len(missing):
            warn_uncovered(grid, self.fill)
        self._result = self._sink
        self._acc = self._wacc = None
        return self._result


def coverage(grid: PatchGrid, window: Any = None) -> np.ndarray:
    """How much weight every voxel of the image gets from a complete grid of patches.

    Shaped like the image on the tiled axes and 1 on the others; zero where no patch covers.
    With the default uniform window it counts the patches over each voxel.

    Examples
    --------
    >>> import patchgrid as pg
    >>> pg.coverage(pg.PatchGrid(7, size=3, stride=2))
    array([1., 1., 2., 1., 2., 1., 1.])
    >>> pg.coverage(pg.PatchGrid(7, size=2, stride=3, edge="drop"))
    array([1., 1., 0., 1., 1., 0., 0.])
    """
    merger = Merger(grid, window=window)
    merger._seen[...] = True
    return merger.coverage()


def merge(
    patches: Any,
    grid_or_shape: PatchGrid | int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    *,
    axes: int | Sequence[int] | None = None,
    edge: str | Sequence[str] = "shift",
    reduce: str = "mean",
    window: Any = None,
    fill: Any = 0,
    dtype: Any = None,
) -> Any:
    """Put patches back together into one image.

    Parameters
    ----------
    patches : array_like
        Shaped ``(*counts, *patch_shape)`` as :func:`extract` gives them, or ``(N,
        *patch_shape)`` in grid order. Axes that are not tiled may have other sizes than the
        image's (a model that turns one channel into five classes).
    grid_or_shape : PatchGrid or sequence of int
        The grid the patches came from, or the image's shape; with a shape, the patch size is
        read from ``patches`` and ``stride``, ``axes`` and ``edge`` build the grid (the tiled
        axes default to the last ``k`` when patches come as ``(*counts, ...)`` with ``k``
        counts axes, else as for :class:`PatchGrid`).
    stride, axes, edge
        As for :class:`PatchGrid`, when ``grid_or_shape`` is a shape.
    reduce, window, fill, dtype
        As for :class:`Merger`.

    Returns
    -------
    numpy.ndarray
        The image's shape (on the tiled axes) and the patches' sizes on the other axes.

    Notes
    -----
    ``merge(extract(x, ...), ...)`` gives ``x`` back, to float rounding, for every edge policy
    that covers the image. Patches whose grid positions differ by ``ceil(size / stride)`` never
    overlap, so the overlap-add is a few strided additions over cache-sized blocks, not a loop
    over patches. With a separable window and every patch present, the weights sum to a
    product of per-axis profiles: no weight volume is ever made. Memory: the output (and an
    accumulator of float32 or wider when the output is narrower).

    Examples
    --------
    >>> import numpy as np
    >>> import patchgrid as pg
    >>> volume = np.random.default_rng(0).random((10, 20, 30))
    >>> patches = pg.extract(volume, size=4, stride=2)
    >>> restored = pg.merge(patches, volume.shape, stride=2)
    >>> bool(np.allclose(restored, volume))
    True
    >>> blended = pg.merge(patches, volume.shape, stride=2, window="gaussian")
    >>> bool(np.allclose(blended, volume))
    True
    """
    arr = backend_of(patches).asarray(patches)
    if isinstance(grid_or_shape, PatchGrid):
        grid = grid_or_shape
    else:
        shape = _checks.shape_tuple(grid_or_shape, "grid_or_shape")
        ndim = len(shape)
        if arr.ndim <= ndim:
            raise PatchgridError(
                f"patches must have more dimensions than the image (shape {shape}): one or more "
                f"leading axes for the patch index; got patches of shape {arr.shape}"
            )
        lead = arr.ndim - ndim
        if axes is None and lead > 1:
            axes = tuple(range(ndim - lead, ndim))
        if axes is None and isinstance(stride, (Sequence, np.ndarray)):
            axes = tuple(range(ndim - len(stride), ndim))
        axes_t = tuple(range(ndim)) if axes is None else _checks.axes_tuple(axes, ndim)
        patch = arr.shape[lead:]
        grid = PatchGrid(shape, [patch[a] for a in axes_t], stride, axes=axes_t, edge=edge)
    merger = Merger(grid, reduce=reduce, window=window, fill=fill, dtype=dtype)
    merger.add_all(arr)
    return merger.result()
