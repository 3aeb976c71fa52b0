"""Layer L2: skipping empty space: which patches of a grid hold foreground.

What lives here: :func:`kept` (one bool per patch of a grid, from a mask at the image's
resolution or at a coarser one, or from a callable on each input patch) and
:func:`coarse_mask` (a boolean mask at ``ceil(shape / factor)`` from a lazy image, read slab by
slab). A mask on disk (zarr, HDF5, memmap, ``pg.open``) is read a slab of planes at a time
along its first tiled axis, each plane once, never whole.

Imports: NumPy and the layers below (``_checks``, ``backends``, ``grid``, ``_regions``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import _checks
from ._checks import PatchgridError
from ._regions import Reader
from .backends import backend_of
from .grid import PatchGrid

__all__ = ["SLAB_BYTES", "coarse_mask", "kept"]

SLAB_BYTES = 1 << 24  # how much of a mask or an image is read at a time


def kept(
    mask: Any,
    grid: PatchGrid,
    margins: int | Sequence[int],
    reader: Reader | None = None,
    *,
    factor: int | Sequence[int] | None = None,
) -> np.ndarray:
    """Which patches of ``grid`` hold foreground: one bool per patch, in grid order.

    Parameters
    ----------
    mask : array-like or callable
        An array (bool, or numeric weights: foreground is ``> 0``; NaN is background) whose
        tiled axes are the image's or coarser, ``ceil(image / f)`` for an integer factor ``f``
        per axis (a pyramid level). It has either one axis per image axis, those not tiled of
        length 1 or the image's length (foreground on any of them counts), or one axis per
        tiled axis only. A lazy array (zarr, HDF5, memmap, ``pg.open``) is read in slabs.
        Or a callable on one input patch (as ``reader`` reads it, margins included) that
        returns a truth value.
    grid : PatchGrid
        The grid of the patches' cores over the image.
    margins : int or sequence of int
        Per tiled axis: the input patch is the core plus ``margin`` on each side. An array
        mask is looked at over the core only (the voxels a patch writes).
    reader : _regions.Reader, optional
        Needed with a callable mask: it reads every patch once (the cost of a pass over the
        image without the model).
    factor : int or sequence of int, optional
        The coarse mask's factor per tiled axis, checked against the shapes. By default it is
        inferred; where several factors give the mask's length (``ceil(1000 / f) = 16`` for
        ``f`` from 63 to 66) a patch is kept if any of them puts foreground in its core, so
        an inferred factor may keep more patches, never fewer.

    Notes
    -----
    In the mask's grid a core ``[start, stop)`` (cut at the image's end) covers the voxels
    ``floor(start / f)`` to ``ceil(stop / f)``. Each row of patches along the first tiled axis
    costs one lookup per patch in a summed-area table of its planes; no loop over patches.

    Examples
    --------
    >>> import numpy as np, patchgrid as pg
    >>> from patchgrid._mask import coarse_mask, kept
    >>> mask = np.zeros((8, 8), bool)
    >>> mask[5, 6] = True
    >>> kept(mask, pg.PatchGrid((8, 8), size=4), 0)
    array([False, False, False,  True])
    >>> coarse_mask(mask, 2).shape  # a coarse mask, factor 2
    (4, 4)
    >>> kept(coarse_mask(mask, 2), pg.PatchGrid((8, 8), size=4), 0)
    array([False, False, False,  True])
    """
    k = len(grid.axes)
    margin = _checks.per_axis(margins, k, "margin", positive=False)
    if min(margin, default=0) < 0:
        raise PatchgridError(f"margin must not be negative, got {margin}")
    if callable(mask):
        return _kept_by_call(mask, grid, margin, reader)
    if not hasattr(mask, "shape") or not hasattr(mask, "__getitem__"):
        mask = np.asarray(mask)
    shape = tuple(int(n) for n in mask.shape)
    tiled = _tiled_axes(shape, grid)
    given = None if factor is None else _checks.per_axis(factor, k, "factor")
    bounds = [_factors(shape[t], grid.shape[a], a, None if given is None else given[j])
              for j, (t, a) in enumerate(zip(tiled, grid.axes))]  # fmt: skip
    los, his = [], []
    for j, (t, (fmin, fmax)) in enumerate(zip(tiled, bounds)):
        starts = grid.axis_starts(j)
        stops = np.minimum(starts + grid.size[j], grid.shape[grid.axes[j]])
        los.append(starts // fmax)
        his.append(np.maximum(np.minimum(-(-stops // fmin), shape[t]), starts // fmax))
    found: np.ndarray = _rows(mask, tiled, los, his)
    return found.ravel()


def _tiled_axes(shape: tuple[int, ...], grid: PatchGrid) -> tuple[int, ...]:
    """The mask's axes that stand for the grid's tiled axes, in order."""
    k = len(grid.axes)
    if len(shape) == grid.ndim:
        for a in range(grid.ndim):
            if a not in grid.axes and shape[a] not in (1, grid.shape[a]):
                raise PatchgridError(
                    f"mask has shape {shape} with {shape[a]} along axis {a}, which is not "
                    f"tiled: give it length 1 or the image's {grid.shape[a]}"
                )
        return grid.axes
    if len(shape) == k:
        return tuple(range(k))
    raise PatchgridError(
        f"mask has shape {shape}: give it one axis per image axis (image {grid.shape}) or one "
        f"per tiled axis ({k})"
    )


def _factors(m: int, n: int, axis: int, given: int | None) -> tuple[int, int]:
    """The smallest and largest integer ``f`` with ``ceil(n / f) == m`` (the mask's length
    ``m`` along an image axis of length ``n``); only ``given`` where it is given."""
    if given is not None:
        if -(-n // given) != m:
            raise PatchgridError(
                f"mask has {m} voxels along axis {axis} where the image has {n}: factor "
                f"{given} gives ceil({n} / {given}) = {-(-n // given)}"
            )
        return given, given
    if n == 0 or m == n:
        return 1, 1
    fmin = -(-n // m) if m else 0
    if not 0 < m < n or -(-n // fmin) != m:
        raise PatchgridError(
            f"mask has {m} voxels along axis {axis} where the image has {n}: no integer "
            f"factor f gives ceil({n} / f) = {m}"
        )
    fmax = n if m == 1 else -(-n // (m - 1)) - 1
    return fmin, fmax


def _rows(mask: Any, tiled: tuple[int, ...], los: list[np.ndarray], his: list[np.ndarray]) -> Any:
    """For each patch, whether the mask's box ``[lo, hi)`` per tiled axis holds foreground.

    Along the first tiled axis the boxes' ends cut the planes into segments; each segment is
    read once and reduced to one plane (any), kept while a later row of patches still needs
    it. Each row is then one summed-area lookup per patch over its OR of segments.
    """
    counts = tuple(len(lo) for lo in los)
    out = np.zeros(counts, dtype=bool)
    cuts = np.unique(np.concatenate([los[0], his[0]]))
    found: dict[int, np.ndarray] = {}
    for i, (lo, hi) in enumerate(zip(los[0], his[0])):
        a, b = int(np.searchsorted(cuts, lo)), int(np.searchsorted(cuts, hi))
        for s in [s for s in found if s < a]:
            del found[s]
        for s in range(a, b):
            if s not in found:
                found[s] = _any_planes(mask, tiled, int(cuts[s]), int(cuts[s + 1]))
        if b > a:
            plane = np.logical_or.reduce([found[s] for s in range(a, b)])
            if plane.any():
                out[i] = _box_any(plane, los[1:], his[1:])
    return out


def _host(block: Any, name: str) -> np.ndarray:
    array = backend_of(block).to_numpy(block)
    if array.dtype.kind not in "biuf":
        raise PatchgridError(f"{name} must be boolean or numeric, got dtype {array.dtype}")
    return array


def _any_planes(mask: Any, tiled: tuple[int, ...], lo: int, hi: int) -> np.ndarray:
    """Whether any plane ``lo`` to ``hi`` of the mask's first tiled axis is foreground, over
    the tiled axes after it: read in slabs of at most ``SLAB_BYTES``."""
    t0 = tiled[0]
    rest = [n for ax, n in enumerate(mask.shape) if ax != t0]
    plane_bytes = max(1, math.prod(rest) * _itemsize(mask))
    step = max(1, SLAB_BYTES // plane_bytes)
    drop = tuple(ax for ax in range(len(mask.shape)) if ax == t0 or ax not in tiled)
    acc = np.zeros([mask.shape[t] for t in tiled[1:]], dtype=bool)
    for p in range(lo, hi, step):
        region: list[slice] = [slice(None)] * len(mask.shape)
        region[t0] = slice(p, min(p + step, hi))
        block = _host(mask[tuple(region)], "mask")
        acc |= (block > 0).any(axis=drop)
    return acc


def _box_any(plane: np.ndarray, los: list[np.ndarray], his: list[np.ndarray]) -> Any:
    """For each box of the open mesh of ``[lo, hi)`` per axis: whether ``plane`` holds a
    True voxel in it, by inclusion and exclusion over a summed-area table."""
    if plane.ndim == 0:
        return bool(plane)
    table = np.zeros([n + 1 for n in plane.shape], dtype=np.int64)
    table[(slice(1, None),) * plane.ndim] = plane
    for ax in range(plane.ndim):
        np.cumsum(table, axis=ax, out=table)
    total = np.zeros([len(lo) for lo in los], dtype=np.int64)
    for corner in itertools.product((0, 1), repeat=plane.ndim):
        index = np.ix_(*[h if c else lo for lo, h, c in zip(los, his, corner)])
        sign = -1 if (plane.ndim - sum(corner)) % 2 else 1
        total += sign * table[index]
    return total > 0


def _kept_by_call(
    fn: Callable[[Any], Any], grid: PatchGrid, margin: tuple[int, ...], reader: Reader | None
) -> np.ndarray:
    """``fn(patch)`` for every input patch, read a row of patches at a time."""
    if reader is None:
        raise PatchgridError(
            f"mask is a callable ({fn!r}): kept() needs reader= to read each patch"
        )
    if reader.grid != grid or reader.margin != margin:
        raise PatchgridError(
            f"reader= reads {reader.grid} with margin {reader.margin}; the mask is asked "
            f"about {grid} with margin {margin}"
        )
    out = np.zeros(len(grid), dtype=bool)
    row = grid.counts[-1] if len(grid) else 1
    last, size = grid.axes[-1], reader.size[-1]
    for first in range(0, len(grid), row):
        block, offsets = reader.read_run(first, row)
        for i, off in enumerate(offsets):
            cut: list[slice] = [slice(None)] * len(grid.shape)
            cut[last] = slice(int(off), int(off) + size)
            value = fn(block[tuple(cut)])
            try:
                out[first + i] = bool(value)
            except (TypeError, ValueError, RuntimeError):
                raise PatchgridError(
                    f"mask(patch) must return one truth value; for patch {first + i} it "
                    f"returned {type(value).__name__} of shape {getattr(value, 'shape', None)}"
                ) from None
    return out


def _itemsize(x: Any) -> int:
    try:
        return int(np.dtype(x.dtype).itemsize)
    except TypeError:  # a torch dtype
        return 8


def coarse_mask(image: Any, factor: int | Sequence[int], threshold: Any = 0) -> np.ndarray:
    """A boolean mask at ``ceil(image.shape / factor)``: whether each block of ``factor``
    voxels holds a value above ``threshold`` (its maximum ``> threshold``).

    Parameters
    ----------
    image : array-like
        An ndarray or a lazy array (zarr, HDF5, memmap, ``pg.open``, a CPU tensor), read in
        slabs along its first axis of whole blocks (``factor[0]`` planes or a multiple, at
        most about ``SLAB_BYTES``, one block of planes when a block is larger), never whole.
    factor : int or sequence of int
        The block's length per axis of the image (1 on an axis kept at full resolution).
    threshold : scalar
        Foreground is ``> threshold``; NaN is background.

    Notes
    -----
    The maximum over each block, not a strided sample (``image[::f] > threshold``): a thin
    structure between the sampled planes is never missed. Memory: one slab of the image and
    its boolean copy, plus the result.

    Examples
    --------
    >>> import numpy as np
    >>> from patchgrid._mask import coarse_mask
    >>> image = np.zeros((5, 6))
    >>> image[3, 1] = 7.0
    >>> coarse_mask(image, 2, threshold=1.0)
    array([[False, False, False],
           [ True, False, False],
           [False, False, False]])
    """
    shape = tuple(int(n) for n in image.shape)
    if not shape:
        raise PatchgridError("image must have at least one axis, got a 0-d array")
    f = _checks.per_axis(factor, len(shape), "factor")
    if not np.isscalar(threshold):
        raise TypeError(f"threshold must be a scalar, got {threshold!r}")
    out = np.zeros([-(-n // fa) for n, fa in zip(shape, f)], dtype=bool)
    block_bytes = max(1, f[0] * math.prod(shape[1:]) * _itemsize(image))
    step = max(1, SLAB_BYTES // block_bytes) * f[0]
    for p in range(0, shape[0], step):
        fg = _host(image[p : p + step], "image") > threshold
        for ax, fa in enumerate(f):
            if fa > 1 and fg.shape[ax]:
                fg = np.logical_or.reduceat(fg, np.arange(0, fg.shape[ax], fa), axis=ax)
        out[p // f[0] : p // f[0] + fg.shape[0]] = fg
    return out
