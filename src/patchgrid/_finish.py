"""The output spec and the one finishing step of every merge (L2).

Weights and coverages in the accumulator's precision, the division by the coverage, the hint of
the cast rule, and the warning for voxels no patch covers: shared by :class:`Merger` (in memory
and tiled) and by the Dask path, so that a rule holds on every path or on none.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _compiled, _strided
from ._checks import PatchgridWarning
from .backends import NUMPY, Backend
from .grid import PatchGrid

REDUCES = ("mean", "sum", "max", "min", "argmax")


def profile_sum(
    starts: np.ndarray, weights: np.ndarray, length: int, dtype: Any = np.float64
) -> np.ndarray:
    """Sum of a 1-D window placed at every start: one axis of the coverage, summed in ``dtype``
    (the accumulator's precision, so that a weighted mean of equal values is that value)."""
    out = np.zeros(length, dtype=dtype)
    w = np.asarray(weights, dtype=dtype)
    for s in starts.tolist():
        out[s : s + len(w)] += w
    return out


def weight_array(
    window: np.ndarray, profiles: list[np.ndarray] | None, grid: PatchGrid, dtype: Any
) -> np.ndarray:
    """The window shaped to broadcast against one patch (1 on the free axes), in ``dtype``.

    A separable window is the outer product of its profiles made in ``dtype``, as the coverage
    it is divided by is summed: equal values then come back exactly."""
    shape = [1] * grid.ndim
    for a, p in zip(grid.axes, grid.size):
        shape[a] = p
    if profiles is None or np.dtype(dtype) == np.float64:
        return np.asarray(window, dtype=dtype).reshape(shape)
    out = np.ones(shape, dtype=dtype)
    for a, prof in zip(grid.axes, profiles):
        out = out * shaped(np.asarray(prof, dtype=dtype), a, grid.ndim)
    return out


def sum_dtype(xp: Backend, acc_dtype: Any) -> np.dtype:
    """The real NumPy dtype in which weights and coverages are made for an accumulator: its
    own precision where NumPy has it (extended precision for longdouble), float64 else."""
    if xp is NUMPY:
        real = np.finfo(np.dtype(acc_dtype)).dtype if np.dtype(acc_dtype).kind in "fc" else None
        if real is not None and real.itemsize > 8:
            wide: np.dtype = np.dtype(real)
            return wide
    return np.dtype(np.float64)


def warn_uncovered(grid: PatchGrid, fill: Any, stacklevel: int = 3) -> None:
    """Say, once per result, that voxels no patch covers hold ``fill`` (never silently)."""
    n = grid.uncovered
    if n:
        edges = grid.edge[0] if len(set(grid.edge)) == 1 else grid.edge
        warnings.warn(
            f"{n} of {math.prod(grid.shape)} voxels lie in no patch (edge={edges!r}, stride "
            f"{grid.stride}, size {grid.size}) and hold fill={fill!r}; edge='shift' covers "
            f"every voxel",
            PatchgridWarning,
            stacklevel=stacklevel,
        )


def cast_hint(reduce: str) -> str:
    """What to do instead, for an error of the cast rule in a merge."""
    if reduce == "argmax":
        return "give an out= or dtype= that holds every class number"
    return (
        "give a dtype= (or an out=) that holds the merged values, e.g. a wider integer or a float"
    )


def shaped(p: Any, a: int, ndim: int) -> Any:
    shape = [1] * ndim
    shape[a] = len(p)
    return p.reshape(shape)


def divide_by_profiles(
    acc: Any, axes: Sequence[int], profs: list[np.ndarray], xp: Backend = NUMPY
) -> None:
    """``acc /= outer(*profs)`` in one pass, chunk by chunk along the first tiled axis.

    Zeros in the profiles (voxels no patch covers) divide by 1; the caller fills them.
    """
    ndim = acc.ndim
    safe = [np.where(p > 0, p, 1) for p in profs]
    k = len(axes)
    host = _compiled.host(acc) if _compiled.loaded() else None
    if (
        host is not None
        and host.nbytes >= _compiled.MIN_DIVIDE
        and host.dtype in (np.float32, np.float64)
        and tuple(axes) == tuple(range(ndim - k, ndim))
        and host.flags.writeable
        and _compiled.divide(host, k, safe)
    ):
        return  # a large merge has the compiled kernels loaded: divide on all cores
    rest = np.ones([1] * ndim)
    for a, p in zip(axes[1:], safe[1:]):
        rest = rest * shaped(p, a, ndim)
    a0 = axes[0]
    n0 = acc.shape[a0]
    plane = xp.nbytes(acc) // max(n0, 1)
    # Small outputs go a row at a time: the temporaries stay small beside them.
    room = _strided.CHUNK_BYTES // 2 if xp.nbytes(acc) >= 1 << 20 else 0
    step = max(1, room // max(plane, 1))
    buf = None
    cpu_torch = xp.name == "torch" and acc.device.type == "cpu" and acc.dtype.is_floating_point
    if (xp is NUMPY or cpu_torch) and xp.nbytes(acc) >= 1 << 20:
        # The float64 product cast straight into one small buffer of the output's dtype (a
        # single rounding, as below), reused for every block of rows.
        shape = list(rest.shape)
        shape[a0] = min(step, n0)
        dtype = str(acc.dtype).replace("torch.", "")
        buf = np.empty(shape, dtype=np.dtype(dtype) if dtype != "bfloat16" else np.float32)
        if cpu_torch and dtype not in ("float32", "float64"):
            buf = None
    for lo in range(0, n0, step):
        hi = min(lo + step, n0)
        where: list[Any] = [slice(None)] * ndim
        where[a0] = slice(lo, hi)
        part = acc[tuple(where)]
        column = shaped(safe[0][lo:hi], a0, ndim)
        if buf is not None:
            cut: list[Any] = [slice(None)] * ndim
            cut[a0] = slice(0, hi - lo)
            divisor = buf[tuple(cut)]
            np.multiply(column, rest, out=divisor, casting="same_kind")
            if cpu_torch:
                part.div_(xp.torch.from_numpy(divisor))  # type: ignore[attr-defined]
            else:
                np.divide(part, divisor, out=part)
        else:
            xp.divide(part, xp.constant(column * rest, xp.dtype(acc), acc))
