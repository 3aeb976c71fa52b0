"""Layer L2: putting patches back together: merge(), coverage() and Merger.

What lives here: :class:`Merger`, the public face over an accumulator strategy of
:mod:`patchgrid._accumulate` (add a batch; finish the rows that are complete through
:mod:`patchgrid._finish`), :class:`DiskMerger` (out= on disk), :func:`merge` (every patch
at once) and :func:`coverage`.

Imports: NumPy and the layers below (``_plan``, ``_accumulate``, ``_finish``, ``_compiled``,
``backends``, ``grid``, ``_checks``, ``settings``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, overload

import numpy as np
import numpy.typing as npt

from . import _checks, settings
from ._accumulate import RUN_BYTES, Direct, Rows, planes, row_runs, scatter, strategy
from ._checks import PatchgridError
from ._finish import REDUCES, Finisher, OutputSpec, check_fill, shaped, warn_uncovered
from ._plan import MergePlan, checked_window, merge_plan
from .backends import NUMPY, ArrayT, SupportsArray, backend_of, check_exact_sum
from .grid import PatchGrid, as_grid, with_leading_axis

__all__ = [
    "RUN_BYTES",
    "DiskMerger",
    "HostMerger",
    "Merger",
    "batch_indices",
    "coverage",
    "merge",
    "row_runs",
]

if TYPE_CHECKING:  # a default (PEP 696): pg.Merger(grid) unannotated is a Merger[Any]
    from typing_extensions import TypeVar

    MergedT = TypeVar("MergedT", bound=SupportsArray, default=Any)
else:
    from typing import TypeVar

    MergedT = TypeVar("MergedT", bound=SupportsArray)


class Merger(Generic[MergedT]):
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

    # Out-of-core work is bound by its files, and its budget is memory: there the kernels
    # serve only if the process has loaded them already (loading costs about 65 MiB).
    LOAD_KERNELS: ClassVar[bool] = True
    # result() says when voxels lie in no patch (tiles leave it to their caller).
    WARN_UNCOVERED: ClassVar[bool] = True

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
        self._window = checked_window(window, grid.size)
        if self.reduce in ("max", "min") and not self._window.uniform:
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
        self._window_arg = window if window is None or isinstance(window, str) else self._window
        self._dtype = dtype
        self._out = out
        self._seen = np.zeros(grid.counts, dtype=bool)
        self._plan: MergePlan | None = None
        self._acc: Rows | None = None
        self._finisher: Finisher | None = None
        self._done = 0  # padded rows before this one are finished
        self._result: MergedT | None = None
        self._overlap: int | None = None  # the most patches over a voxel, once needed

    @property
    def missing(self) -> np.ndarray:
        """Indices of the patches not added yet."""
        return np.flatnonzero(~self._seen.ravel())

    @property
    def complete(self) -> bool:
        """True once every patch of the grid has been added."""
        return bool(self._seen.all())

    @property
    def accumulator(self) -> Any:
        """The sums held now, or None: a slab of rows along the first tiled axis that rows
        leave as they finish (the output itself when nothing needs casting, cropping or
        reducing). For watching memory; do not write into it."""
        return None if self._acc is None else self._acc.acc

    def _start(self, patches: Any, patch_shape: tuple[int, ...]) -> Rows:
        """Check one patch's shape against the grid; plan and pick the strategy on first use."""
        grid = self.grid
        if self._result is not None:
            raise PatchgridError("result() was already called; make a new Merger to merge again")
        if self._acc is None and len(patch_shape) == grid.ndim + 1:
            # A model added a class (or channel) axis in front: the image had none.
            self.grid = grid = with_leading_axis(grid)
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
        if self._acc is not None:
            if patch_shape != self._acc.plan.spec.patch_shape:
                raise PatchgridError(
                    f"patches must all have one shape; the first had "
                    f"{self._acc.plan.spec.patch_shape}, these have {patch_shape}"
                )
            return self._acc
        xp = backend_of(patches)
        plan = merge_plan(grid, self.reduce, self._window_arg, xp, patch_shape, xp.dtype(patches),
                          self._dtype, None if self._out is None else self._out.dtype,
                          self.LOAD_KERNELS)  # fmt: skip
        spec = plan.spec
        if self._out is not None and tuple(self._out.shape) != spec.shape:
            raise PatchgridError(
                f"out must have shape {spec.shape} for these patches, got {tuple(self._out.shape)}"
            )
        check_fill(xp, self.fill, spec.dtype)
        self._plan = plan
        sink = self._out if self._out is not None else self._new_sink(plan)
        self._acc = strategy(plan, patches, sink)(plan, patches, sink)
        if not self._acc.direct:
            self._acc.lo = self._done  # rows before it are finished, or skipped
        self._finisher = Finisher(plan, self.fill, self._seen)
        return self._acc

    def _new_sink(self, plan: MergePlan) -> Any:
        """The output array where ``out=`` gives none: None, made beside the patches."""
        return None

    def skip(self, indices: npt.ArrayLike) -> None:
        """Count patches as added without their data, before any is added: for work split by
        rows (a resumed run, a shard). Rows that only skipped patches reach before the first
        patch added are never finished; rows that skipped patches share with added ones are
        finished with partial sums, which the caller does not keep."""
        if self._acc is not None or self._seen.any():
            raise PatchgridError("skip() comes before any patch is added")
        self._seen.ravel()[np.asarray(indices, dtype=np.intp)] = True
        rows = np.asarray(self._seen.reshape(self._seen.shape[0], -1).all(axis=1))
        n = rows.shape[0]
        r = int(np.argmin(rows)) if not rows.all() else n
        a0 = self.grid.axes[0]
        self._done = int(self.grid.axis_starts(0)[r]) if r < n else self.grid.padded_shape[a0]

    def output_spec(self, patches: Any) -> OutputSpec:
        """The output this Merger makes of patches like ``patches`` (a batch ``(B, *patch)``):
        shape, dtype, accumulator dtype and class axis, checked as :meth:`add` checks them.

        Plans the merge for patches of that shape and dtype; add them afterwards as usual.
        """
        arr = backend_of(patches).asarray(patches)
        return self._start(arr, tuple(arr.shape[1:])).plan.spec

    def _empty(self) -> Any:
        """The result of a grid without patches: the output, of the image's shape (one axis
        of length 0), in the output dtype where it is known (float64 where nothing says)."""
        if self._acc is not None:
            shape, dtype = self._acc.plan.spec.shape, self._acc.plan.spec.dtype
        else:
            shape = self.grid.shape
            dtype = self._dtype if self._dtype is not None else getattr(
                self._out, "dtype", np.float64)  # fmt: skip
        if self._out is not None:
            if tuple(self._out.shape) != tuple(shape):
                raise PatchgridError(
                    f"out must have shape {tuple(shape)}, got {tuple(self._out.shape)}"
                )
            return self._out
        if self._acc is not None:
            return self._acc.xp.empty(shape, dtype, self._acc.like)
        return np.empty(shape, dtype=np.dtype(dtype))

    def _check_sum(self, acc: Rows, arr: Any) -> None:
        """Integer patches: refuse values whose sums the accumulator cannot hold exactly."""
        spec, xp = acc.plan.spec, acc.xp
        if self.reduce in ("max", "min") or xp.kind(spec.patch_dtype) not in "iu":
            return
        if self._overlap is None:
            self._overlap = self.grid.overlap
        check_exact_sum(xp, arr, spec.acc_dtype, self._overlap, not self._window.uniform)

    def add(self, batch: MergedT, indices: npt.ArrayLike) -> None:
        """Add a batch of patches ``(B, *patch_shape)`` at grid indices ``indices``.

        ``indices`` holds ``B`` patch numbers, or ``(B, k)`` grid positions; a single patch
        with a single index works too. Adding a patch twice, an index out of range or a patch
        of the wrong shape raises :class:`ValueError`.
        """
        if self._result is not None:
            raise PatchgridError("result() was already called; make a new Merger to merge again")
        xp = backend_of(batch)
        arr, idx = batch_indices(self.grid, xp.asarray(batch), indices, self._seen)
        if not len(idx):
            return
        rows = np.unravel_index(idx, self.grid.counts)[0]
        direct = self._acc is not None and self._acc.direct
        if rows[0] != rows[-1] and not direct and (np.diff(rows) >= 0).all():
            # A batch in grid order that reaches into the next rows of patches: row by row,
            # so that a row finishes and leaves the accumulator before the next needs room
            # (the accumulator stays one patch thick instead of a patch and a step).
            for b0, b1 in itertools.pairwise([0, *(np.flatnonzero(np.diff(rows)) + 1), len(idx)]):
                self.add(arr[b0:b1], idx[b0:b1])
            return
        acc = self._start(arr, tuple(arr.shape[1:]))
        self._check_sum(acc, arr)
        acc.add(arr, idx, self._seen.ravel())
        self._flush()

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
        counts_first = n_lead == k and tuple(arr.shape[:k]) == grid.counts
        if n_lead == 2 and arr.shape[0] == len(grid) and not counts_first:
            n_lead = 1  # (N, C, *patch): a class or channel axis added in front of the image's
            self.grid = grid = with_leading_axis(grid)
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
        acc = self._start(arr, tuple(arr.shape[k:]))
        if not len(grid):
            return  # nothing to add: result() gives the empty image
        self._check_sum(acc, arr)
        small = scatter(acc.plan, arr)
        if small is not None:  # a small grid: gathered, summed and divided at once
            self._acc = small
            small.sink = self._out
            self._seen[...] = True
            self._flush()
            return
        out = planes(acc.plan, arr, self._out) if acc.kernels() else None
        if out is not None:
            # Finished as a direct merge: only the voxels no patch covers are left to fill.
            self._acc = acc = Direct(acc.plan, arr, out)
            acc.acc, acc.normalised = out, True
            self._seen[...] = True
            self._flush()
            return
        # The accumulator is not the output (a wider dtype, a crop, labels): rows of patches a
        # block at a time, each block's finished rows cast into the output and let go, so the
        # accumulator stays a slab however large the image.
        n0 = grid.counts[0]
        rows = n0 if acc.direct else self._block_rows(acc)
        for r0 in range(0, n0, rows):
            acc.add_rows(arr, r0, min(r0 + rows, n0), self._seen)
            self._flush()

    def _block_rows(self, acc: Rows) -> int:
        """Rows of patches (along the first tiled axis) per block of :meth:`add_all`: a slab
        of the accumulator of about ``TILE_BYTES``, at least one patch's worth of phases."""
        grid, a0, spec = self.grid, self.grid.axes[0], acc.plan.spec
        plane = math.prod(grid.padded_shape) // max(grid.padded_shape[a0], 1)
        for a in range(grid.ndim):
            if a not in grid.axes:
                plane = plane // max(grid.shape[a], 1) * spec.patch_shape[a]
        plane_bytes = plane * np.dtype(acc.xp.numpy_dtype(spec.acc_dtype)).itemsize
        phases = -(-grid.size[0] // grid.stride[0])
        rows = settings.TILE_BYTES // max(plane_bytes * grid.stride[0], 1)
        return max(int(rows), phases, 1)

    def _flush(self) -> None:
        """Finish the rows that no patch still to come can touch."""
        acc, finisher = self._acc, self._finisher
        assert acc is not None
        assert finisher is not None
        rows_done = np.asarray(self._seen.reshape(self._seen.shape[0], -1).all(axis=1))
        n_rows = rows_done.shape[0]
        r = int(np.argmin(rows_done)) if not rows_done.all() else n_rows
        a0 = self.grid.axes[0]
        upto = int(self.grid.axis_starts(0)[r]) if r < n_rows else self.grid.padded_shape[a0]
        if upto <= self._done:
            return
        acc.ensure(upto)
        # Finished rows a few MiB at a time: their normalised, cast copy stays that small.
        row = acc.xp.nbytes(acc.acc) // max(acc.acc.shape[a0], 1)
        # The device engine finishes what is done at once: its operations are launches.
        whole = acc.direct or acc.fused
        step = upto - self._done if whole else max(1, settings.FINISH_BYTES // max(row, 1))
        while self._done < upto:
            end = min(upto, self._done + step)
            finisher.finish(acc, self._done, end, complete=True)
            self._done = end

    def coverage(self) -> np.ndarray:
        """Sum of the weights of the patches added so far, per voxel of the image.

        Shaped like the image on the tiled axes and 1 on the others, so it broadcasts against
        the result. Zero where no patch covers (there the result holds ``fill``).
        """
        grid = self.grid
        ones = self.reduce in ("max", "min")
        end = grid.padded_shape[grid.axes[0]]
        plan = self._plan or merge_plan(grid, "sum", self._window_arg, NUMPY, grid.patch_shape,
                                        np.dtype(np.float32))  # fmt: skip
        finisher = Finisher(plan, self.fill, self._seen)
        kind, cov = finisher.coverage_block(None, 0, end, self.complete, ones)
        if kind == "profiles":
            out = np.ones([1] * grid.ndim)
            for a, prof in zip(grid.axes, cov):
                out = out * shaped(prof, a, grid.ndim)
            cov = out
        crop = tuple(
            slice(0, s) if a in grid.axes else slice(None) for a, s in enumerate(grid.shape)
        )
        return np.asarray(cov[crop])

    def result(self, *, allow_missing: bool = False) -> MergedT:
        """The merged image. Raises if a patch was never added, unless ``allow_missing``.

        Voxels that no added patch covers get ``fill``. Nothing can be added afterwards;
        calling ``result()`` again returns the same array (``out`` when one was given).
        """
        if self._result is not None:
            return self._result
        grid = self.grid
        if not len(grid):  # an empty axis: an empty image, not an error
            empty: MergedT = self._empty()
            self._result = empty
            return empty
        acc, finisher = self._acc, self._finisher
        if acc is None or finisher is None:
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
            acc.ensure(end)
            finisher.finish(acc, self._done, end, complete=not len(missing))
            self._done = end
        if self.WARN_UNCOVERED and not len(missing):
            warn_uncovered(grid, self.fill)
        result: MergedT = acc.sink
        self._result = result
        acc.release()
        return result


class DiskMerger(Merger):
    """A Merger for out-of-core work: the compiled kernels serve only if already loaded."""

    LOAD_KERNELS = False


class HostMerger(Merger):
    """A Merger whose result is a NumPy array in host memory wherever its patches are (the
    patches of a model on a GPU over an image in host memory: ``apply(..., device=)``): the
    device engine blends on the device, and finished rows come back as they finish."""

    def _new_sink(self, plan: MergePlan) -> Any:
        spec = plan.spec
        return np.empty(spec.shape, plan.xp.numpy_dtype(spec.dtype))


def batch_indices(grid: PatchGrid, arr: Any, indices: Any,
                  seen: np.ndarray) -> tuple[Any, np.ndarray]:  # fmt: skip
    """A batch and its indices checked against the grid and the patches ``seen``: flat patch
    numbers, each once, none added before; a single patch gets its leading axis."""
    idx = np.asarray(indices)
    if idx.size == 0 and idx.dtype.kind not in "iu":
        idx = idx.astype(np.intp)  # [] comes as float64: no index is an integer index
    k = len(grid.axes)
    if idx.ndim == 0 or (idx.shape == (k,) and k > 1 and arr.ndim == grid.ndim):
        arr, idx = arr[None], idx.reshape(1, -1) if idx.ndim else idx.reshape(1)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
    if idx.ndim == 2:
        if idx.shape[1] != k:
            raise PatchgridError(f"indices as positions must be shaped (B, {k}), got {idx.shape}")
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
    again = seen.ravel()[idx]
    if again.any():
        i = int(idx[again][0])
        raise PatchgridError(f"patch {i} (position {grid.position(i)}) was already added")
    return arr, idx


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


@overload
def merge(
    patches: np.ndarray,
    grid_or_shape: PatchGrid | int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    *,
    axes: int | Sequence[int] | None = None,
    edge: str | Sequence[str] = "shift",
    reduce: str = "mean",
    window: Any = None,
    fill: Any = 0,
    dtype: Any = None,
) -> np.ndarray: ...
@overload
def merge(
    patches: ArrayT,  # a tensor in, a tensor out
    grid_or_shape: PatchGrid | int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    *,
    axes: int | Sequence[int] | None = None,
    edge: str | Sequence[str] = "shift",
    reduce: str = "mean",
    window: Any = None,
    fill: Any = 0,
    dtype: Any = None,
) -> ArrayT: ...
@overload
def merge(
    patches: npt.ArrayLike,
    grid_or_shape: PatchGrid | int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    *,
    axes: int | Sequence[int] | None = None,
    edge: str | Sequence[str] = "shift",
    reduce: str = "mean",
    window: Any = None,
    fill: Any = 0,
    dtype: Any = None,
) -> np.ndarray: ...
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
        grid = as_grid(shape, tuple(patch[a] for a in axes_t), stride, axes=axes_t, edge=edge,
                       pad_mode="constant", pad_value=0)  # fmt: skip
    merger = Merger(grid, reduce=reduce, window=window, fill=fill, dtype=dtype)
    merger.add_all(arr)
    return merger.result()
