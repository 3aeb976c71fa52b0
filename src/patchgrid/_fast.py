"""Optional compiled kernels (numba), used when numba is installed; NumPy stays the reference.

NumPy's overlap-add of large patches runs one short strided row at a time, at a fraction of
the memory bandwidth. The kernel here walks the output plane by plane along the first tiled
axis, one plane per thread: each plane sits in cache while every patch that reaches it is added,
then is normalised in place and left alone. Patches are read once, the output written once.

Set ``PATCHGRID_NUMBA=0`` to turn the kernels off (the NumPy path gives the same numbers).
"""

from __future__ import annotations

import os
import warnings
from functools import cache
from typing import Any

import numpy as np

# The least patch data (bytes) worth a call into the compiled kernel. Loading it costs a
# process about 0.5 s and 65 MiB once (compiling it, the first time ever, a few seconds; numba
# caches the result on disk), so small merges stay with NumPy and never load numba.
MIN_BYTES = 1 << 25
# The shortest patch row (voxels along the last tiled axis) the kernel serves; shorter rows
# are NumPy's fast path (rows copied as opaque items).
MIN_ROW = 16


@cache
def _kernels() -> Any:
    """Compile (or load from numba's cache) the kernels; None when numba cannot be had."""
    if os.environ.get("PATCHGRID_NUMBA", "1") == "0":
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import numba
    except ImportError:
        return None

    @numba.njit(parallel=True, cache=True, nogil=True)  # type: ignore[untyped-decorator]
    def overlap_add3(  # pragma: no cover - compiled
        acc: Any,
        patches: Any,
        starts0: Any,
        starts1: Any,
        starts2: Any,
        lo0: Any,
        hi0: Any,
        weight: Any,
        weighted: bool,
        init: bool,
        prof0: Any,
        prof1: Any,
        prof2: Any,
        normalise: bool,
    ) -> None:
        n_x = acc.shape[0]
        n_y = acc.shape[1]
        n_z = acc.shape[2]
        p1 = patches.shape[4]
        p2 = patches.shape[5]
        c1 = patches.shape[1]
        c2 = patches.shape[2]
        for x in numba.prange(n_x):
            plane = acc[x]
            if init:
                plane[:, :] = 0
            for i0 in range(lo0[x], hi0[x]):
                r = x - starts0[i0]
                for i1 in range(c1):
                    y0 = starts1[i1]
                    for i2 in range(c2):
                        z0 = starts2[i2]
                        src = patches[i0, i1, i2, r]
                        for a in range(p1):
                            row = plane[y0 + a]
                            s = src[a]
                            if weighted:
                                w = weight[r, a]
                                for b in range(p2):
                                    row[z0 + b] += s[b] * w[b]
                            else:
                                for b in range(p2):
                                    row[z0 + b] += s[b]
            if normalise:
                divisor = np.empty(n_z, dtype=acc.dtype)
                for y in range(n_y):
                    # The same rounding as the NumPy path: the float64 product of the
                    # profiles, cast to the accumulator's dtype, then one division.
                    for z in range(n_z):
                        divisor[z] = prof0[x] * (prof1[y] * prof2[z])
                    row = plane[y]
                    for z in range(n_z):
                        row[z] = row[z] / divisor[z]

    return overlap_add3


def available() -> bool:
    """Whether the compiled kernels can run here."""
    return _kernels() is not None


def serves(acc: Any, patches: Any, grid_ndim: int, axes: tuple[int, ...]) -> bool:
    """Whether :func:`overlap_add` takes this job (plain float arrays of one dtype, big rows)."""
    if not isinstance(acc, np.ndarray) or not isinstance(patches, np.ndarray):
        return False
    k = len(axes)
    return (
        acc.dtype == patches.dtype
        and acc.dtype in (np.float32, np.float64)
        and 1 <= k <= 3
        and axes == tuple(range(grid_ndim - k, grid_ndim))
        and patches.shape[-1] >= MIN_ROW
        and patches.nbytes >= MIN_BYTES
        and acc.flags.writeable
        and available()
    )


def overlap_add(
    acc: np.ndarray,
    patches: np.ndarray,
    starts: list[np.ndarray],
    size: tuple[int, ...],
    weight: np.ndarray | None,
    init: bool,
    profiles: list[np.ndarray] | None,
) -> None:
    """Add patches ``(*counts, *lead, *size)`` into ``acc`` ``(*lead, *shape)`` at ``starts``.

    The tiled axes are the last ``k`` (1 to 3) of ``acc``; ``lead`` axes are carried whole.
    ``init`` zeroes ``acc`` as it goes (so it may come uninitialised); ``profiles``, when given,
    are the per-axis coverages to divide by (zeros already replaced by ones) once each plane
    is complete. ``weight`` broadcasts against one patch's tiled axes.
    """
    kernel = _kernels()
    k = len(size)
    pad = 3 - k
    n_lead = acc.ndim - k
    dtype = acc.dtype
    starts3 = [np.zeros(1, np.intp)] * pad + [np.asarray(s, np.intp) for s in starts]
    size3 = (1,) * pad + tuple(size)
    profs = (
        [np.ones(1)] * pad + [np.asarray(p, np.float64) for p in profiles]
        if profiles is not None
        else [np.ones(1)] * 3
    )
    n0 = acc.shape[n_lead] if pad == 0 else 1
    x = np.arange(n0)
    lo0 = np.searchsorted(starts3[0] + size3[0], x, side="right").astype(np.intp)
    hi0 = np.searchsorted(starts3[0], x, side="right").astype(np.intp)
    if weight is None:
        w = np.ones((1, 1, 1), dtype)
    else:
        w = np.ascontiguousarray(np.broadcast_to(weight, size).reshape(size3), dtype=dtype)
    # Patches as (*counts, *lead, *size): move the lead axes to the front to loop over them.
    lead_shape = acc.shape[:n_lead]
    moved = np.moveaxis(patches, list(range(k, k + n_lead)), list(range(n_lead)))
    for lead in np.ndindex(*lead_shape):
        # Unit axes in front of the tiled ones: always views, so the kernel writes into acc.
        a3 = np.expand_dims(acc[lead], tuple(range(pad)))
        p3 = np.expand_dims(moved[lead], tuple(range(pad)) + tuple(range(3, 3 + pad)))
        kernel(
            a3, p3, *starts3, lo0, hi0, w, weight is not None, init, *profs,
            profiles is not None,
        )  # fmt: skip
