"""Cutting an image into patches: strided views for regular grids, fast copies and gathers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _kernels
from ._checks import PatchgridError
from .grid import PatchGrid

__all__ = ["extract"]


def as_grid(
    shape: tuple[int, ...],
    size: int | Sequence[int] | PatchGrid,
    stride: int | Sequence[int] | None,
    *,
    axes: int | Sequence[int] | None,
    edge: str | Sequence[str],
    pad_mode: str,
    pad_value: Any,
    name: str = "image",
) -> PatchGrid:
    """Take a grid as given (checking it fits ``shape``) or build one from the arguments."""
    if isinstance(size, PatchGrid):
        if size.shape != tuple(shape):
            raise PatchgridError(
                f"the grid was made for shape {size.shape} but {name} has shape {tuple(shape)}"
            )
        return size
    return PatchGrid(
        shape, size, stride, axes=axes, edge=edge, pad_mode=pad_mode, pad_value=pad_value
    )


def padded(image: np.ndarray, grid: PatchGrid) -> np.ndarray:
    """The image padded as the grid needs (the image itself when it needs nothing)."""
    if not any(after for _, after in grid.pad_width):
        return image
    if grid.pad_mode == "constant":
        return np.pad(image, grid.pad_width, mode="constant", constant_values=grid.pad_value)
    out: np.ndarray = np.pad(image, grid.pad_width, mode=grid.pad_mode)  # type: ignore[call-overload]
    return out


def _as_ndarray(image: Any) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    if not (
        hasattr(image, "__array__") or hasattr(image, "shape") or isinstance(image, (list, tuple))
    ):
        raise TypeError(
            f"image must be an array (a NumPy array or anything np.asarray accepts), "
            f"got {type(image).__name__}"
        )
    return np.asarray(image)


def extract(
    image: Any,
    size: int | Sequence[int] | PatchGrid,
    stride: int | Sequence[int] | None = None,
    *,
    axes: int | Sequence[int] | None = None,
    edge: str | Sequence[str] = "drop",
    pad_mode: str = "constant",
    pad_value: Any = 0,
    flatten: bool = False,
    copy: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Cut ``image`` into patches of ``size`` every ``stride`` voxels.

    Parameters
    ----------
    image : array_like
        The image, of any number of dimensions and any dtype.
    size : int, sequence of int or PatchGrid
        Patch size per tiled axis, or a ready :class:`PatchGrid` (then ``stride``, ``axes``,
        ``edge``, ``pad_mode`` and ``pad_value`` come from it).
    stride : int or sequence of int, optional
        Step between neighbouring patches; defaults to ``size``.
    axes, edge, pad_mode, pad_value
        As for :class:`PatchGrid`.
    flatten : bool
        Return ``(N, *patch_shape)`` in grid order instead of ``(*counts, *patch_shape)``.
    copy : bool
        Return a C-contiguous copy instead of a view.
    out : numpy.ndarray, optional
        Write the patches into this array (shaped like the result) and return it.

    Returns
    -------
    numpy.ndarray
        ``patches[pos]`` equals ``image[grid.slices(pos)]`` (of the padded image where a patch
        reaches into the padding).

    Notes
    -----
    For a regular grid (``edge="drop"``, or any edge where the stride reaches the border
    exactly) the result is a read-only strided view of ``image``: no copy, made in constant
    time. Writing through overlapping views would corrupt data, so it is not writeable. With
    ``edge="pad"`` it is a view of a padded copy of the image. ``"shift"`` and ``"even"``
    grids are not strided, so their patches are gathered into a new array. ``copy=True`` and
    ``out=`` copy at close to memory bandwidth, whatever the patch size. ``flatten=True`` on a
    view with more than one tiled axis has to copy: the counts axes cannot share one stride.

    Examples
    --------
    >>> import numpy as np
    >>> import patchgrid as pg
    >>> volume = np.arange(10 * 20 * 30).reshape(10, 20, 30)
    >>> patches = pg.extract(volume, size=4, stride=2)
    >>> patches.shape
    (4, 9, 14, 4, 4, 4)
    >>> np.shares_memory(patches, volume), patches.flags.writeable
    (True, False)
    >>> grid = pg.PatchGrid(volume.shape, size=4, stride=2)
    >>> bool((patches[1, 2, 3] == volume[grid.slices((1, 2, 3))]).all())
    True

    A stride that does not divide the shape, with the last patch shifted back to the border:

    >>> pg.extract(np.arange(10), size=4, stride=3, edge="shift")
    array([[0, 1, 2, 3],
           [3, 4, 5, 6],
           [6, 7, 8, 9]])
    """
    arr = _as_ndarray(image)
    grid = as_grid(
        arr.shape, size, stride, axes=axes, edge=edge, pad_mode=pad_mode, pad_value=pad_value
    )
    k = len(grid.axes)
    shape = (*grid.counts, *grid.patch_shape)
    flat_shape = (len(grid), *grid.patch_shape)
    if out is not None:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
        if out.shape not in (shape, flat_shape):
            raise PatchgridError(
                f"out must have shape {shape} (or {flat_shape} flattened), got {out.shape}"
            )
        if not out.flags.writeable:
            raise PatchgridError("out must be writeable")
        if not np.can_cast(arr.dtype, out.dtype, casting="same_kind"):
            raise TypeError(
                f"out has dtype {out.dtype}, which the image's {arr.dtype} cannot be cast to "
                f"under the 'same_kind' rule"
            )
    src = padded(arr, grid)
    if out is None and not copy and grid.is_regular:
        view = _kernels.window_view(src, grid.axes, [0] * k, grid.stride, grid.counts, grid.size)
        view.flags.writeable = False
        return view.reshape(flat_shape) if flatten else view
    target = np.empty(shape, dtype=arr.dtype) if out is None else out.reshape(shape)
    if out is not None and not np.shares_memory(target, out):
        raise PatchgridError("out must be reshapeable without a copy (C-contiguous is safest)")
    for sub in _kernels.subgrids(grid):
        pick = tuple(slice(i0, i0 + n) for i0, n, _, _ in sub)
        view = _kernels.window_view(
            src,
            grid.axes,
            [f for _, _, f, _ in sub],
            [t for _, _, _, t in sub],
            [n for _, n, _, _ in sub],
            grid.size,
        )
        _kernels.copy(target[pick], view, k)
    if out is not None:
        return out
    return target.reshape(flat_shape) if flatten else target
