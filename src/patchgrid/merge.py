"""Putting patches back together: overlap-add with weights, and reductions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _checks, _kernels, windows
from ._checks import PatchgridError
from .grid import PatchGrid

__all__ = ["Merger", "coverage", "merge"]

REDUCES = ("mean", "sum", "max", "min")


def _acc_dtype(dtype: np.dtype, reduce: str) -> np.dtype:
    if reduce in ("max", "min"):
        return dtype
    if dtype.kind == "f":
        return np.result_type(dtype, np.float32)
    if dtype.kind == "c":
        return np.result_type(dtype, np.complex64)
    return np.dtype(np.float64)


def _out_dtype(dtype: np.dtype, reduce: str) -> np.dtype:
    if reduce in ("max", "min") or dtype.kind in "fc":
        return dtype
    return np.dtype(np.float64)


def _identity(dtype: np.dtype, reduce: str) -> Any:
    """The starting value of an accumulator: what any patch value replaces."""
    if reduce in ("mean", "sum"):
        return 0
    big = reduce == "min"
    if dtype.kind == "b":
        return big
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return info.max if big else info.min
    if dtype.kind == "f":
        return np.inf if big else -np.inf
    raise TypeError(f"reduce={reduce!r} needs real patches, got dtype {dtype}")


def _profile_sum(starts: np.ndarray, weights: np.ndarray, length: int) -> np.ndarray:
    """Sum of a 1-D window placed at every start: one axis of the coverage."""
    out = np.zeros(length)
    for s in starts.tolist():
        out[s : s + len(weights)] += weights
    return out


def _divide_by_profiles(acc: np.ndarray, axes: Sequence[int], profs: list[np.ndarray]) -> None:
    """``acc /= outer(*profs)`` in one pass, chunk by chunk along the first tiled axis.

    Zeros in the profiles (voxels no patch covers) divide by 1; the caller fills them.
    """
    ndim = acc.ndim
    safe = [np.where(p > 0, p, 1) for p in profs]

    def shaped(p: np.ndarray, a: int) -> np.ndarray:
        shape = [1] * ndim
        shape[a] = len(p)
        return p.reshape(shape)

    rest = np.ones([1] * ndim)
    for a, p in zip(axes[1:], safe[1:]):
        rest = rest * shaped(p, a)
    a0 = axes[0]
    plane = acc.nbytes // max(acc.shape[a0], 1)
    step = max(1, _kernels.CHUNK_BYTES // max(plane, 1))
    for lo in range(0, acc.shape[a0], step):
        where: list[Any] = [slice(None)] * ndim
        where[a0] = slice(lo, lo + step)
        part = acc[tuple(where)]
        np.divide(part, (shaped(safe[0][lo : lo + step], a0) * rest).astype(acc.dtype), out=part)


class Merger:
    """Accumulates patches, in any order and in batches, into one image.

    Parameters
    ----------
    grid : PatchGrid
        Where the patches sit.
    reduce : {"mean", "sum", "max", "min"}
        How overlapping voxels combine. ``"mean"`` is the weighted average, ``"sum"`` the
        weighted sum; ``"max"`` and ``"min"`` take no window.
    window : None, {"uniform", "gaussian", "hann", "triangular"} or array
        Weight of each voxel of a patch (see :func:`window`); an array must have the patch's
        shape along the tiled axes.
    fill : scalar
        Value of the voxels no patch covers.
    dtype : dtype, optional
        Output dtype. By default the patches' dtype when it is floating (or complex) or when
        ``reduce`` is ``"max"``/``"min"``, else float64.

    Notes
    -----
    The accumulator is as large as the output (float32 at least for ``"mean"`` and ``"sum"``)
    and is created on the first :meth:`add`; patches may change the sizes of the axes that
    are not tiled (one channel in, five classes out). :meth:`result` normalises it in place.

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
                f"window applies to reduce='mean' and 'sum' only, got window={window!r} with "
                f"reduce={reduce!r}"
            )
        if not np.isscalar(fill):
            raise TypeError(f"fill must be a scalar, got {fill!r}")
        self.fill = fill
        self._dtype = None if dtype is None else np.dtype(dtype)
        self._seen = np.zeros(len(grid), dtype=bool)
        self._acc: np.ndarray | None = None
        self._patch_shape: tuple[int, ...] | None = None
        self._result: np.ndarray | None = None

    @property
    def missing(self) -> np.ndarray:
        """Indices of the patches not added yet."""
        return np.flatnonzero(~self._seen)

    @property
    def complete(self) -> bool:
        """True once every patch of the grid has been added."""
        return bool(self._seen.all())

    def _weight(self) -> np.ndarray | None:
        """The window shaped to broadcast against one patch, or None for a uniform one."""
        if self._uniform or self.reduce in ("max", "min"):
            return None
        shape = [1] * self.grid.ndim
        for a, p in zip(self.grid.axes, self.grid.size):
            shape[a] = p
        return self._window.reshape(shape)

    def _start(self, patch_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Check one patch's shape against the grid; create the accumulator on first use."""
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
        if self._acc is None:
            shape = list(grid.padded_shape)
            for a in range(grid.ndim):
                if a not in grid.axes:
                    shape[a] = patch_shape[a]
            acc_dtype = _acc_dtype(dtype, self.reduce)
            self._out = np.dtype(self._dtype or _out_dtype(dtype, self.reduce))
            self._check_fill()
            self._acc = np.full(shape, _identity(acc_dtype, self.reduce), dtype=acc_dtype)
            self._patch_shape = patch_shape
        elif patch_shape != self._patch_shape:
            raise PatchgridError(
                f"patches must all have one shape; the first had {self._patch_shape}, "
                f"these have {patch_shape}"
            )
        return self._acc

    def _op(self) -> Any:
        return {"max": np.maximum, "min": np.minimum}.get(self.reduce, np.add)

    def add(self, batch: Any, indices: Any) -> None:
        """Add a batch of patches ``(B, *patch_shape)`` at grid indices ``indices``.

        ``indices`` holds ``B`` patch numbers, or ``(B, k)`` grid positions; a single patch
        with a single index works too. Adding a patch twice, an index out of range or a patch
        of the wrong shape raises :class:`ValueError`.
        """
        arr = np.asarray(batch)
        idx = np.asarray(indices)
        grid = self.grid
        if idx.ndim == 0 or (
            idx.ndim == 1
            and len(grid.axes) > 1
            and arr.ndim == grid.ndim
            and idx.shape == (len(grid.axes),)
        ):
            arr, idx = arr[None], idx.reshape(1, -1) if idx.ndim else idx.reshape(1)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
        if idx.ndim == 2:
            if idx.shape[1] != len(grid.counts):
                raise PatchgridError(
                    f"indices as positions must be shaped (B, {len(grid.counts)}), got {idx.shape}"
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
        again = self._seen[idx]
        if again.any():
            i = int(idx[again][0])
            raise PatchgridError(f"patch {i} (position {grid.position(i)}) was already added")
        acc = self._start(arr.shape[1:], arr.dtype)
        op, weight = self._op(), self._weight()
        for i, patch in zip(idx.tolist(), arr):
            target = acc[grid.slices(i)]
            op(target, patch if weight is None else patch * weight, out=target)
        self._seen[idx] = True

    def add_all(self, patches: Any) -> None:
        """Add every patch of the grid at once, shaped ``(*counts, *patch)`` or ``(N, *patch)``.

        This is the fast path :func:`merge` takes: a few vectorised strided operations
        instead of one per patch.
        """
        arr = np.asarray(patches)
        grid = self.grid
        k = len(grid.axes)
        n_lead = arr.ndim - grid.ndim
        if n_lead == 1 and arr.shape[0] == len(grid):
            arr = arr.reshape(*grid.counts, *arr.shape[1:])
        elif n_lead != k or arr.shape[:k] != grid.counts:
            raise PatchgridError(
                f"patches must be shaped (*counts, *patch) = ({', '.join(map(str, grid.counts))},"
                f" ...) or (N, *patch) with N = {len(grid)} for this grid, got shape {arr.shape}"
            )
        if self._seen.any():
            raise PatchgridError("add_all needs a Merger that has no patches yet")
        acc = self._start(arr.shape[k:], arr.dtype)
        op, weight = self._op(), self._weight()
        for sub in _kernels.subgrids(grid):
            pick = tuple(slice(i0, i0 + n) for i0, n, _, _ in sub)
            _kernels.accumulate(
                acc,
                arr[pick],
                grid.axes,
                [f for _, _, f, _ in sub],
                [t for _, _, _, t in sub],
                op,
                weight,
            )
        self._seen[:] = True

    def _profile_coverage(self, ones: bool) -> list[np.ndarray]:
        """Coverage along each tiled axis, for a complete grid and a separable window."""
        grid = self.grid
        profs = (
            self._profiles
            if not ones and self._profiles is not None
            else [np.ones(p) for p in grid.size]
        )
        return [
            _profile_sum(grid.axis_starts(j), profs[j], grid.padded_shape[a])
            for j, a in enumerate(grid.axes)
        ]

    def _volume_coverage(self, ones: bool) -> np.ndarray:
        """Coverage as an array over the padded tiled axes (size 1 on the others)."""
        grid = self.grid
        shape = [1] * grid.ndim
        wshape = [1] * grid.ndim
        for a, p in zip(grid.axes, grid.size):
            shape[a] = grid.padded_shape[a]
            wshape[a] = p
        cov = np.zeros(shape)
        w = np.ones(wshape) if ones else self._window.reshape(wshape)
        seen = np.flatnonzero(self._seen)
        if len(seen) == len(grid):
            lead = np.broadcast_to(w, (*grid.counts, *wshape))
            for sub in _kernels.subgrids(grid):
                pick = tuple(slice(i0, i0 + n) for i0, n, _, _ in sub)
                _kernels.accumulate(
                    cov,
                    lead[pick],
                    grid.axes,
                    [f for _, _, f, _ in sub],
                    [t for _, _, _, t in sub],
                    np.add,
                )
        else:
            for i in seen.tolist():
                cov[tuple(slice(0, 1) if s == slice(None) else s for s in grid.slices(i))] += w
        return cov

    def coverage(self) -> np.ndarray:
        """Sum of the weights of the patches added so far, per voxel of the image.

        Shaped like the image on the tiled axes and 1 on the others, so it broadcasts against
        the result. Zero where no patch covers (there the result holds ``fill``).
        """
        grid = self.grid
        crop = tuple(slice(0, s) for s in grid.shape)
        if self.complete and self._profiles is not None:
            profs = self._profile_coverage(ones=self.reduce in ("max", "min"))
            out = np.ones([1] * grid.ndim)
            for a, prof in zip(grid.axes, profs):
                shape = [1] * grid.ndim
                shape[a] = len(prof)
                out = out * prof.reshape(shape)
            return out[
                tuple(
                    slice(0, s) if a in grid.axes else slice(None) for a, s in enumerate(grid.shape)
                )
            ]
        cov = self._volume_coverage(ones=self.reduce in ("max", "min"))
        return cov[tuple(c if a in grid.axes else slice(None) for a, c in enumerate(crop))]

    def result(self, *, allow_missing: bool = False) -> np.ndarray:
        """The merged image. Raises if a patch was never added, unless ``allow_missing``.

        Voxels that no added patch covers get ``fill``. The accumulator is normalised in place,
        so nothing can be added afterwards; calling ``result()`` again returns the same array.
        """
        if self._result is not None:
            return self._result
        grid = self.grid
        if self._acc is None:
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
        acc = self._acc
        ones = self.reduce != "mean"
        if not len(missing) and (self._profiles is not None or ones):
            profs = self._profile_coverage(ones)
            if not ones:
                _divide_by_profiles(acc, grid.axes, profs)
            for a, prof in zip(grid.axes, profs):
                empty = prof == 0
                if empty.any():
                    where: list[Any] = [slice(None)] * grid.ndim
                    where[a] = empty
                    acc[tuple(where)] = self.fill
        else:
            cov = self._volume_coverage(ones)
            if not ones:
                np.divide(acc, np.where(cov > 0, cov, 1), out=acc)
            np.copyto(acc, self.fill, where=cov == 0, casting="unsafe")
        crop = tuple(
            slice(0, s) if a in grid.axes else slice(None) for a, s in enumerate(grid.shape)
        )
        out = acc[crop]
        if out.dtype != self._out or out.shape != acc.shape:
            out = out.astype(self._out)
        self._acc = None
        self._result = out
        return out

    def _check_fill(self) -> None:
        with np.errstate(invalid="ignore", over="ignore"):
            cast = np.array(self.fill).astype(self._out)
        same = bool(cast == self.fill) or bool(np.isnan(cast) and np.isnan(self.fill))
        if not same:
            raise PatchgridError(
                f"fill={self.fill!r} cannot be stored in the output dtype {self._out}; give a "
                f"fill that fits or a dtype= that holds it"
            )


def coverage(grid: PatchGrid, window: Any = None) -> np.ndarray:
    """How much weight every voxel of the image gets from a complete grid of patches.

    Shaped like the image on the tiled axes and 1 on the others; zero where no patch covers.
    With the default uniform window it counts the patches over each voxel.

    Examples
    --------
    >>> import patchgrid as pg
    >>> pg.coverage(pg.PatchGrid(7, size=3, stride=2))
    array([1., 1., 2., 1., 2., 1., 1.])
    >>> pg.coverage(pg.PatchGrid(7, size=2, stride=3))
    array([1., 1., 0., 1., 1., 0., 0.])
    """
    merger = Merger(grid, window=window)
    merger._seen[:] = True
    return merger.coverage()


def merge(
    patches: Any,
    grid_or_shape: PatchGrid | int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    *,
    axes: int | Sequence[int] | None = None,
    edge: str | Sequence[str] = "drop",
    reduce: str = "mean",
    window: Any = None,
    fill: Any = 0,
    dtype: Any = None,
) -> np.ndarray:
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
    arr = np.asarray(patches)
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
