"""Layer L1: reading any region of any array, padded through index maps.

What lives here: padding as a gather (:func:`index_map`, :func:`gather`, :func:`pad_array`,
:func:`padded`, the pad value's check), the one rule that splits far-apart source indices into
separate reads (:func:`pieces`), reading a region through it (:func:`read_region`), and the two
readers built on that: :class:`Reader` (the input patch of every core of a grid, with a margin:
extract of lazy arrays, apply, the CLI, each Dask task) and :func:`read_patch` (one patch at any
corner, reaching past either end: sample and the datasets).

Only the region a patch needs is read, so a lazy array (memmap, zarr, HDF5, ``pg.open``) is
never read whole; a wrapped border is read as two pieces, never as the whole axis between them.

Imports: NumPy and the L0 modules (``_checks``, ``grid``, ``backends``) only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._checks import PatchgridError
from .backends import NUMPY, Backend
from .grid import PatchGrid

__all__ = [
    "INDEX_MODES",
    "Reader",
    "check_pad_value",
    "gather",
    "index_map",
    "pad_array",
    "padded",
    "pieces",
    "read_patch",
    "read_region",
]

#: The ``numpy.pad`` modes that a gather over an index map reproduces, region by region.
INDEX_MODES = ("constant", "edge", "reflect", "symmetric", "wrap")


def index_map(length: int, before: int, after: int, mode: str) -> np.ndarray:
    """Source index of every position of an axis padded by ``(before, after)``; -1 for constants.

    For the modes that copy voxels (``edge``, ``reflect``, ``symmetric``, ``wrap``), padding
    is a gather, which any backend and any lazy array can do region by region.
    """
    base = np.arange(length)
    if mode == "constant":
        return np.pad(base, (before, after), mode="constant", constant_values=-1)
    return np.pad(base, (before, after), mode=mode)  # type: ignore[call-overload, no-any-return]


def pad_array(x: Any, pad_width: Any, mode: str, value: Any, xp: Backend) -> Any:
    """``numpy.pad`` for any backend (torch takes the modes that copy voxels)."""
    if not any(b or a for b, a in pad_width):
        return x
    check_pad_value(value, mode, xp.dtype(x), xp)
    whole = xp.pad(x, pad_width, mode, value)  # None: pad through index maps (torch)
    if whole is not None:
        return whole
    if mode not in INDEX_MODES:
        raise PatchgridError(
            f"pad_mode={mode!r} is not available for {xp.name} arrays; use one of {INDEX_MODES}"
        )
    for axis, (before, after) in enumerate(pad_width):
        if before or after:
            x = gather(x, axis, index_map(x.shape[axis], before, after, mode), value, xp)
    return x


def check_pad_value(value: Any, mode: str, dtype: Any, xp: Backend) -> None:
    """A constant pad must be storable in the image's dtype (-1 would wrap to 255 in uint8)."""
    kind = xp.kind(dtype)
    if kind not in "biufc":
        raise PatchgridError(
            f"the image's dtype {dtype} is not numeric, and these patches need padding "
            f"(pad_mode={mode!r}); use edge='drop' or 'shift' with patches that fit, or a "
            f"numeric image"
        )
    if mode == "constant" and not xp.fits(value, dtype):
        raise PatchgridError(
            f"pad_value={value!r} cannot be stored in the image's dtype {dtype}; give a "
            f"pad_value that fits"
        )


def gather(x: Any, axis: int, index: np.ndarray, value: Any, xp: Backend) -> Any:
    """``x`` taken at ``index`` along ``axis``, with ``value`` where the index is -1."""
    out = xp.take(x, np.maximum(index, 0), axis) if x.shape[axis] else None
    if out is None or (index < 0).any():
        shape = list(x.shape)
        shape[axis] = len(index)
        if out is None:
            return xp.full(shape, value, xp.dtype(x), x)
        where: list[Any] = [slice(None)] * x.ndim
        where[axis] = xp.index(np.flatnonzero(index < 0), x)
        out[tuple(where)] = value
    return out


def padded(image: Any, grid: PatchGrid, xp: Backend = NUMPY) -> Any:
    """The image padded as the grid needs (the image itself when it needs nothing)."""
    return pad_array(image, grid.pad_width, grid.pad_mode, grid.pad_value, xp)


def pieces(ids: np.ndarray, gap: int) -> list[tuple[int, int, int]]:
    """The source ranges that hold the valid (non-negative) indices of ``ids``.

    Sorted indices more than ``gap`` apart (the two sides of a wrapped or reflected border)
    start a new piece, so that no read spans the whole axis between them. Each piece is
    ``(lo, hi, at)``: source indices ``[lo, hi)``, and where it begins when the pieces are
    read side by side. No valid index gives no piece.
    """
    valid = ids[ids >= 0]
    if not len(valid):
        return []
    lo, hi = int(valid.min()), int(valid.max()) + 1
    if hi - lo <= gap + 1:  # no two indices can be further apart than gap
        return [(lo, hi, 0)]
    valid = np.unique(valid)
    cuts = np.flatnonzero(np.diff(valid) > gap) + 1
    out, at = [], 0
    for part in np.split(valid, cuts):
        lo, hi = int(part[0]), int(part[-1]) + 1
        out.append((lo, hi, at))
        at += hi - lo
    return out


def read_region(
    image: Any,
    region: Sequence[slice],
    gathers: Sequence[tuple[int, np.ndarray]],
    value: Any,
    xp: Backend = NUMPY,
) -> Any:
    """``image[region]``, gathered along each axis of ``gathers`` at its source indices.

    ``gathers`` holds ``(axis, ids)`` pairs: along ``axis`` the result takes ``image`` at
    ``ids``, and ``value`` where an index is -1. Of a lazy array, indices far apart (see
    :func:`pieces`) are read as separate pieces. A NumPy read comes back as an ndarray.
    """
    if not gathers:
        block = image[tuple(region)]
        return xp.asarray(block)
    (a, ids), rest = gathers[0], gathers[1:]
    # In memory a region is a view, taken from at no cost for its span: one piece. A lazy
    # array reads all it is asked for: indices far apart are read as separate pieces.
    found = pieces(ids, image.shape[a] if xp.owns(image) else len(ids))
    if len(found) == 1 and ids.min() >= 0:  # one read holds every index
        lo, hi, _ = found[0]
        sub = list(region)
        sub[a] = slice(lo, hi)
        return xp.take(read_region(image, sub, rest, value, xp), ids - lo, a)
    parts = []
    for lo, hi, _ in found:
        sub = list(region)
        sub[a] = slice(lo, hi)
        where = np.flatnonzero((ids >= lo) & (ids < hi))
        parts.append((where, lo, read_region(image, sub, rest, value, xp)))
    if parts:
        shape, dtype = list(parts[0][2].shape), xp.dtype(parts[0][2])
    else:
        shape = [len(range(*r.indices(n))) for n, r in zip(image.shape, region)]
        for b, other in rest:
            shape[b] = len(other)
        dtype = image.dtype
    shape[a] = len(ids)
    out = xp.full(shape, value, dtype, image)
    for where, lo, block in parts:
        index: list[Any] = [slice(None)] * len(shape)
        index[a] = xp.index(where, block)
        out[tuple(index)] = xp.take(block, ids[where] - lo, a)
    return out


class Reader:
    """Reads the input patch of every core of ``grid``: the core plus ``margin`` on each side,
    padded as the grid says.

    Padding that copies voxels (``edge``, ``reflect``, ``symmetric``, ``wrap``) or a constant
    is a gather over per-axis index maps (``maps``, None on an axis that needs none); the
    other ``numpy.pad`` modes depend on the whole image, so for them an in-memory NumPy image
    is padded once (``image`` is then the padded copy).
    """

    def __init__(self, image: Any, grid: PatchGrid, margin: Sequence[int], xp: Backend) -> None:
        self.image, self.grid, self.xp = image, grid, xp
        self.margin = tuple(margin)
        self.size = tuple(p + 2 * m for p, m in zip(grid.size, margin))
        pads = [(m, m + after) for m, (_, after) in
                zip(margin, (grid.pad_width[a] for a in grid.axes))]  # fmt: skip
        self.maps: list[np.ndarray | None] = []
        if any(b or a for b, a in pads) and grid.pad_mode not in INDEX_MODES:
            if not xp.pads_whole(image):
                raise PatchgridError(
                    f"pad_mode={grid.pad_mode!r} needs the whole image in memory as a NumPy "
                    f"array; use one of {INDEX_MODES} for {type(image).__name__}"
                )
            width = [(0, 0)] * grid.ndim
            for a, pad in zip(grid.axes, pads):
                width[a] = pad
            self.image = pad_array(image, width, grid.pad_mode, grid.pad_value, xp)
            pads = [(0, 0)] * len(pads)
        if any(b or a for b, a in pads):
            check_pad_value(grid.pad_value, grid.pad_mode, image.dtype, xp)
        for a, (before, after) in zip(grid.axes, pads):
            length = image.shape[a]
            plain = not (before or after)
            self.maps.append(None if plain else index_map(length, before, after, grid.pad_mode))

    def patch_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        shape = list(image_shape)
        for a, p in zip(self.grid.axes, self.size):
            shape[a] = p
        return tuple(shape)

    def read(self, index: int) -> Any:
        """The input patch of core ``index``, read region by region."""
        return self.read_run(index, 1)[0]

    def read_run(self, first: int, n: int) -> tuple[Any, np.ndarray]:
        """The input region of cores ``first`` to ``first + n`` (one row of the grid, along its
        last tiled axis), and where each patch starts in it along that axis."""
        grid = self.grid
        k = len(grid.axes)
        pos = grid.position(first)
        region: list[slice] = [slice(None)] * grid.ndim
        gathers: list[tuple[int, np.ndarray]] = []
        offsets = np.zeros(n, dtype=np.intp)
        for j, a in enumerate(grid.axes):
            starts = grid.axis_starts(j)
            start = int(starts[pos[j]])
            stop = start + self.size[j]
            if j == k - 1:
                offsets = starts[pos[j] : pos[j] + n] - start
                stop = int(starts[pos[j] + n - 1]) + self.size[j]
            amap = self.maps[j]
            if amap is None:
                region[a] = slice(start, stop)
                continue
            ids = amap[start:stop]
            if ids[0] >= 0 and np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids))):
                region[a] = slice(int(ids[0]), int(ids[0]) + len(ids))
            else:
                gathers.append((a, ids))
        return read_region(self.image, region, gathers, grid.pad_value, self.xp), offsets


def read_patch(image: Any, grid: PatchGrid, start: Sequence[int] | np.ndarray) -> np.ndarray:
    """One patch of ``grid.size`` at ``start`` (a corner per tiled axis, which may reach past
    either end of the image), padded as the grid says, read into a NumPy array."""
    region: list[slice] = [slice(None)] * grid.ndim
    gathers = []
    for j, (a, p) in enumerate(zip(grid.axes, grid.size)):
        s, length = int(start[j]), grid.shape[a]
        if s >= 0 and s + p <= length:
            region[a] = slice(s, s + p)
            continue
        before, after = max(0, -s), max(0, s + p - length)
        ids = index_map(length, before, after, grid.pad_mode)[s + before : s + before + p]
        gathers.append((a, ids))
    return read_region(image, region, gathers, grid.pad_value, NUMPY)  # type: ignore[no-any-return]
