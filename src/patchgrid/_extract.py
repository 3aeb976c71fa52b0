"""Layer L4: extract(), cutting an image into patches, the path picked once per call.

What lives here: :func:`extract` and the choice it makes: a read-only strided view for a
regular grid, a fast copy (the compiled kernel, or strided copies of regular sub-grids) for
the others and for ``copy=True`` / ``out=``, a patch-by-patch read for a lazy array, and the
one gate to the Dask path. The checked geometry is a plan cached per layout (the array's shape,
strides and dtype and the grid's arguments, as einops caches its recipes): a repeat call of the
same layout makes its view straight from the plan.

Imports: NumPy and the layers below (``_checks``, ``grid``, ``backends``, ``_regions``,
``_strided``, ``_compiled``); ``dask`` (L3) only inside :func:`extract`, for a Dask image.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any, NamedTuple, overload

import numpy as np
import numpy.typing as npt

from . import _compiled, _strided
from ._checks import PatchgridError
from ._regions import Reader, padded
from .backends import NUMPY, ArrayT, Backend, backend_of, check_cast, in_memory, is_dask
from .grid import PatchGrid, as_grid, grid_key

__all__ = ["extract"]


class _Plan(NamedTuple):
    """What a call of one layout needs again: the checked grid and, where the result is a view
    of the image itself, its shape and strides, and the image's backend that makes it."""

    grid: PatchGrid
    view: tuple[tuple[int, ...], tuple[int, ...]] | None
    xp: Backend


#: Plans by layout, oldest first; at most ``_PLANS_KEPT`` of them.
_PLANS: dict[Any, _Plan] = {}
_PLANS_KEPT = 256


def _layout(image: Any, *args: Any) -> tuple[Any, ...] | None:
    """The plan's key: the array's type, shape, strides and dtype, and the typed arguments
    (None for an array or arguments whose result cannot be planned)."""
    layout = backend_of(image).layout(image)  # None but for a plain ndarray or a tensor
    if layout is None:
        return None
    rest = grid_key(*args)
    return None if rest is None else ((type(image), *layout), rest)


def _remember(key: Any, grid: PatchGrid, arr: Any, result: Any, xp: Backend) -> None:
    """Keep the plan of ``key``; the result's geometry too where it is a view of ``arr``."""
    view = None
    if xp.size(result) and xp.address(result) == xp.address(arr):
        view = (xp.shape(result), xp.strides(result))
    if len(_PLANS) >= _PLANS_KEPT:
        with contextlib.suppress(RuntimeError, StopIteration, KeyError):  # another thread's
            del _PLANS[next(iter(_PLANS))]
    _PLANS[key] = _Plan(grid, view, xp)


def _is_lazy(image: Any) -> bool:
    """An array-like that reads on slicing (zarr, h5py, pg.open): never turned into one array."""
    return (
        not isinstance(image, (list, tuple))
        and not in_memory(image)
        and hasattr(image, "shape")
        and hasattr(image, "dtype")
        and hasattr(image, "__getitem__")
    )


def _extract_lazy(
    image: Any, size: Any, stride: Any, axes: Any, edge: Any, pad_mode: str, pad_value: Any,
    flatten: bool, out: Any,
) -> Any:  # fmt: skip
    """Patches of a lazy array, read patch by patch: only the regions the patches cover."""
    grid = as_grid(tuple(int(n) for n in image.shape), size, stride, axes=axes, edge=edge,
                   pad_mode=pad_mode, pad_value=pad_value)  # fmt: skip
    shape = (*grid.counts, *grid.patch_shape)
    flat_shape = (len(grid), *grid.patch_shape)
    dtype = np.dtype(image.dtype)
    if out is not None:
        check_out(out, NUMPY, dtype, shape, flat_shape, "a NumPy array (the image is read "
                  "into NumPy)")  # fmt: skip
    reader = Reader(image, grid, [0] * len(grid.axes), NUMPY)
    if out is None:
        target = np.empty(flat_shape, dtype=dtype)
        for i in range(len(grid)):
            target[i] = reader.read(i)
        return target if flatten else target.reshape(shape)
    # Patch by patch into out itself: a reshape of a non-contiguous out would be a copy.
    flat = tuple(out.shape) == flat_shape
    for i in range(len(grid)):
        patch = reader.read(i)
        check_cast(NUMPY, patch, out.dtype, what=f"patch {i} of the image")
        out[i if flat else grid.position(i)] = patch
    return out


def check_out(out: Any, xp: Backend, dtype: Any, shape: tuple[int, ...],
              flat_shape: tuple[int, ...], kind: str) -> None:  # fmt: skip
    """extract's ``out=``: of the image's kind, the result's shape, writeable, and of a dtype
    of the same kind (a float image is never truncated into integers); values are checked
    against its range where the dtypes do not settle it (see :func:`check_cast`)."""
    if not xp.owns(out):
        raise TypeError(f"out must be {kind}, got {type(out).__name__}")
    if tuple(out.shape) not in (shape, flat_shape):
        raise PatchgridError(
            f"out must have shape {shape} (or {flat_shape} flattened), got {tuple(out.shape)}"
        )
    if not xp.writeable(out):
        raise PatchgridError("out must be writeable")
    src, dst = xp.numpy_dtype(dtype), xp.numpy_dtype(xp.dtype(out))
    if not np.can_cast(src, dst, casting="same_kind"):
        raise TypeError(
            f"out has dtype {dst}, which the image's {src} cannot be cast to under the "
            f"'same_kind' rule (a float image is not truncated into integers)"
        )


def _as_ndarray(image: Any) -> Any:
    if in_memory(image):
        return image
    if not (
        hasattr(image, "__array__") or hasattr(image, "shape") or isinstance(image, (list, tuple))
    ):
        raise TypeError(
            f"image must be an array (a NumPy array or anything np.asarray accepts), "
            f"got {type(image).__name__}"
        )
    return np.asarray(image)


@overload
def extract(
    image: np.ndarray,
    size: int | Sequence[int] | PatchGrid,
    stride: int | Sequence[int] | None = None,
    *,
    axes: int | Sequence[int] | None = None,
    edge: str | Sequence[str] = "shift",
    pad_mode: str = "constant",
    pad_value: Any = 0,
    flatten: bool = False,
    copy: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray: ...
@overload
def extract(
    image: ArrayT,  # a tensor in, a tensor out
    size: int | Sequence[int] | PatchGrid,
    stride: int | Sequence[int] | None = None,
    *,
    axes: int | Sequence[int] | None = None,
    edge: str | Sequence[str] = "shift",
    pad_mode: str = "constant",
    pad_value: Any = 0,
    flatten: bool = False,
    copy: bool = False,
    out: ArrayT | None = None,
) -> ArrayT: ...
@overload
def extract(
    image: npt.ArrayLike | Any,  # lists, zarr, HDF5, pg.open images: read into NumPy
    size: int | Sequence[int] | PatchGrid,
    stride: int | Sequence[int] | None = None,
    *,
    axes: int | Sequence[int] | None = None,
    edge: str | Sequence[str] = "shift",
    pad_mode: str = "constant",
    pad_value: Any = 0,
    flatten: bool = False,
    copy: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray: ...
def extract(
    image: Any,
    size: int | Sequence[int] | PatchGrid,
    stride: int | Sequence[int] | None = None,
    *,
    axes: int | Sequence[int] | None = None,
    edge: str | Sequence[str] = "shift",
    pad_mode: str = "constant",
    pad_value: Any = 0,
    flatten: bool = False,
    copy: bool = False,
    out: Any = None,
) -> Any:
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

    torch has no read-only tensors, so the view of a tensor is writeable: its patches share
    the image's memory and overlap one another, and an in-place operation on them
    (``patches.sub_(1)``, ``patches[0] = 0``) changes the image, several times over where
    patches overlap. Take ``copy=True`` before working on tensor patches in place.

    ``out=`` obeys the cast rule of merges: a float image is never truncated into integers,
    and a narrower dtype is taken only if it holds every value (checked before any copy).

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
    key = None
    if out is None:
        key = _layout(image, size, stride, axes, edge, pad_mode, pad_value, flatten, copy)
    plan = _PLANS.get(key) if key is not None else None
    if plan is not None and plan.view is not None:
        # Read-only for NumPy (torch has no read-only tensors).
        return plan.xp.as_strided(image, *plan.view, writeable=False)
    if is_dask(image):
        from .dask import extract_dask

        grid = as_grid(tuple(image.shape), size, stride, axes=axes, edge=edge, pad_mode=pad_mode,
                       pad_value=pad_value)  # fmt: skip
        if out is not None:
            raise PatchgridError(
                "out= is not taken with a Dask image; store the patches with .to_zarr()"
            )
        return extract_dask(image, grid, extract, flatten)
    if _is_lazy(image):
        return _extract_lazy(image, size, stride, axes, edge, pad_mode, pad_value, flatten, out)
    arr = _as_ndarray(image)
    xp = backend_of(arr)
    if plan is not None:
        grid = plan.grid
    else:
        grid = as_grid(tuple(arr.shape), size, stride, axes=axes, edge=edge, pad_mode=pad_mode,
                       pad_value=pad_value)  # fmt: skip
    result = _extract_array(arr, grid, xp, flatten, copy, out)
    if key is not None and plan is None:
        _remember(key, grid, arr, result, xp)
    return result


def _extract_array(arr: Any, grid: PatchGrid, xp: Backend, flatten: bool, copy: bool,
                   out: Any) -> Any:  # fmt: skip
    """extract of an array in memory (NumPy or torch): a view, or the patches copied."""
    k = len(grid.axes)
    shape = (*grid.counts, *grid.patch_shape)
    flat_shape = (len(grid), *grid.patch_shape)
    if out is not None:
        check_out(out, xp, xp.dtype(arr), shape, flat_shape,
                  f"an array of the image's kind ({type(arr).__name__})")  # fmt: skip
    src = padded(arr, grid, xp)
    if out is not None:
        # One look at the values (padding included) where out's dtype may not hold them.
        check_cast(xp, src, xp.dtype(out), what="the image")
    if out is None and not copy and grid.is_regular:
        view = _strided.window_view(
            src, grid.axes, [0] * k, grid.stride, grid.counts, grid.size, xp
        )
        view = xp.readonly(view)
        return view.reshape(flat_shape) if flatten else view
    compiled = _compiled_takes(src, grid)
    if out is None:
        # Left to be faulted in by the copy (mapping them up front measured slower here).
        target = xp.empty(shape, xp.dtype(arr), arr)
    else:
        # Splitting the leading axis of a flat out into the counts is always a view.
        target = xp.reshape(out, shape)
    if compiled and _compiled_copy(src, target, grid, stream=out is not None):
        return out if out is not None else (target.reshape(flat_shape) if flatten else target)
    for sub in _strided.subgrids(grid):
        pick = tuple(slice(i0, i0 + n) for i0, n, _, _ in sub)
        view = _strided.window_view(
            src,
            grid.axes,
            [f for _, _, f, _ in sub],
            [t for _, _, _, t in sub],
            [n for _, n, _, _ in sub],
            grid.size,
            xp,
        )
        _strided.copy(target[pick], view, k, xp)
    if out is not None:
        return out
    return target.reshape(flat_shape) if flatten else target


def _compiled_takes(src: Any, grid: PatchGrid) -> bool:
    """Whether the compiled kernel copies these patches (see :func:`_compiled.takes`)."""
    image = _compiled.host(src)
    each = math.prod(grid.patch_shape) * image.itemsize if image is not None else 0
    return _compiled.takes(image, grid.axes, each, len(grid))


def _compiled_copy(src: Any, target: Any, grid: PatchGrid, stream: bool) -> bool:
    """The patches copied by the compiled kernel on all cores; into a caller's buffer
    (``stream``), past the caches. False (nothing done) where the arrays do not serve."""
    k = len(grid.axes)
    image, into = _compiled.host(src), _compiled.host(target)
    if image is None or into is None or image.dtype != into.dtype:
        return False
    flat = _compiled.reshaped(into, (len(grid), *into.shape[k:]))
    return flat is not None and _compiled.gather(flat, image, grid.starts(), stream=stream)
