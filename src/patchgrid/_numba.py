"""The compiled kernels themselves (numba), imported only by :func:`patchgrid._compiled.kernels`.

L0: plain functions over arrays that know no other part of patchgrid; loaded only when numba
is installed and a job is large enough (:mod:`patchgrid._compiled` decides, once per job).
Module-level functions, so that numba's on-disk cache finds them again in the next process
(kernels made inside a function, calling other kernels, are compiled again every time).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba.extending import intrinsic

# Two LLVM intrinsics: a 16-byte copy whose store bypasses the caches (a non-temporal store, as
# large ``memcpy`` calls make: the line is written without being read first, which cuts the
# memory traffic of a copy by a third), and a full fence.


@intrinsic  # type: ignore[untyped-decorator]
def stream16(typingctx: Any, dst: Any, i: Any, src: Any, j: Any) -> Any:
    sig = numba.types.void(dst, numba.types.intp, src, numba.types.intp)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        dty, _, sty, _ = signature.args
        d = context.make_array(dty)(context, builder, args[0])
        s = context.make_array(sty)(context, builder, args[2])
        elt = context.get_data_type(dty.dtype)
        size = context.get_abi_sizeof(elt)
        vec = ir.VectorType(elt, 16 // size)
        source = builder.bitcast(builder.gep(s.data, [args[3]]), vec.as_pointer())
        target = builder.bitcast(builder.gep(d.data, [args[1]]), vec.as_pointer())
        store = builder.store(builder.load(source, align=size), target, align=16)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic  # type: ignore[untyped-decorator]
def fence(typingctx: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return numba.types.void(), codegen


@numba.njit(inline="always", cache=True, nogil=True)  # type: ignore[untyped-decorator]
def add_plane(  # pragma: no cover - compiled
    plane: Any, src: Any, y0: Any, z0: Any, weight: Any, weighted: bool
) -> None:
    """One patch plane ``src`` into ``plane`` at ``(y0, z0)``, times ``weight``'s plane."""
    p2 = src.shape[1]
    for a in range(src.shape[0]):
        # A row as a slice: the loops below then vectorise.
        row = plane[y0 + a, z0 : z0 + p2]
        s = src[a]
        if weighted:
            w = weight[a]
            for i in range(p2):
                row[i] += s[i] * w[i]
        else:
            for i in range(p2):
                row[i] += s[i]


@numba.njit(inline="always", cache=True, nogil=True)  # type: ignore[untyped-decorator]
def divide_plane(  # pragma: no cover - compiled
    plane: Any, p0: Any, prof1: Any, prof2: Any, divisor: Any
) -> None:
    """``plane /= p0 * outer(prof1, prof2)``, with the NumPy path's rounding: the float64
    product of the profiles, cast to the plane's dtype, then one division."""
    n_z = plane.shape[1]
    for y in range(plane.shape[0]):
        for z in range(n_z):
            divisor[z] = p0 * (prof1[y] * prof2[z])
        row = plane[y]
        for z in range(n_z):
            row[z] = row[z] / divisor[z]


@numba.njit(inline="always", cache=True, nogil=True)  # type: ignore[untyped-decorator]
def sum_plane(  # pragma: no cover - compiled
    plane: Any, x: Any, patches: Any, starts0: Any, starts1: Any, starts2: Any, lo0: Any,
    hi0: Any, weight: Any, weighted: bool,
) -> None:  # fmt: skip
    """Every patch plane that lands on output plane ``x``, added into ``plane``."""
    for i0 in range(lo0[x], hi0[x]):
        r = x - starts0[i0]
        for i1 in range(patches.shape[1]):
            for i2 in range(patches.shape[2]):
                add_plane(plane, patches[i0, i1, i2, r], starts1[i1], starts2[i2],
                          weight[r if weighted else 0], weighted)  # fmt: skip


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
    n_z = acc.shape[2]
    for x in numba.prange(n_x):
        plane = acc[x]
        if init:
            plane[:, :] = 0
        sum_plane(plane, x, patches, starts0, starts1, starts2, lo0, hi0, weight, weighted)
        if normalise:
            divide_plane(plane, prof0[x], prof1, prof2, np.empty(n_z, dtype=acc.dtype))


@numba.njit(parallel=True, cache=True, nogil=True)  # type: ignore[untyped-decorator]
def merge_planes3(  # pragma: no cover - compiled
    out: Any,
    patches: Any,
    starts0: Any,
    starts1: Any,
    starts2: Any,
    lo0: Any,
    hi0: Any,
    weight: Any,
    weighted: bool,
    prof0: Any,
    prof1: Any,
    prof2: Any,
    normalise: bool,
) -> None:
    """Every output plane summed in a float64 plane of its own (one per thread at a time),
    divided by the coverage, and written into ``out`` in its dtype: a float64 accumulator that
    never holds more than a plane, so ``out`` may be float32 and the merge still exact."""
    n_x = out.shape[0]
    n_y = out.shape[1]
    n_z = out.shape[2]
    for x in numba.prange(n_x):
        plane = np.zeros((n_y, n_z), dtype=np.float64)
        sum_plane(plane, x, patches, starts0, starts1, starts2, lo0, hi0, weight, weighted)
        if normalise:
            divide_plane(plane, prof0[x], prof1, prof2, np.empty(n_z, dtype=np.float64))
        dst = out[x]
        for y in range(n_y):
            row = dst[y]
            src = plane[y]
            for z in range(n_z):
                row[z] = src[z]


@numba.njit(parallel=True, cache=True, nogil=True)  # type: ignore[untyped-decorator]
def add_batch3(  # pragma: no cover - compiled
    acc: Any, patches: Any, s0: Any, s1: Any, s2: Any, weight: Any, weighted: bool
) -> None:
    n_lead = acc.shape[0]
    n_b = patches.shape[0]
    p0 = patches.shape[2]
    for x in numba.prange(s0.min(), s0.max() + p0):
        for b in range(n_b):
            r = x - s0[b]
            if r < 0 or r >= p0:
                continue
            for c in range(n_lead):
                add_plane(acc[c, x], patches[b, c, r], s1[b], s2[b],
                          weight[r if weighted else 0], weighted)  # fmt: skip


@numba.njit(parallel=True, cache=True, nogil=True)  # type: ignore[untyped-decorator]
def divide3(  # pragma: no cover - compiled
    acc: Any, prof0: Any, prof1: Any, prof2: Any
) -> None:
    for x in numba.prange(acc.shape[1]):
        divisor = np.empty(acc.shape[3], dtype=acc.dtype)
        for c in range(acc.shape[0]):
            divide_plane(acc[c, x], prof0[x], prof1, prof2, divisor)


@numba.njit(parallel=True, cache=True, nogil=True)  # type: ignore[untyped-decorator]
def gather3(  # pragma: no cover - compiled
    out: Any, image: Any, s0: Any, s1: Any, s2: Any, stream: bool
) -> None:
    n_lead = out.shape[1]
    p0 = out.shape[2]
    p1 = out.shape[3]
    p2 = out.shape[4]
    step = 16 // out.itemsize
    for t in numba.prange(out.shape[0] * p0):
        b = t // p0
        r = t - b * p0
        y0 = s1[b]
        z0 = s2[b]
        for c in range(n_lead):
            src = image[c, s0[b] + r]
            dst = out[b, c, r]
            for a in range(p1):
                d = dst[a]
                row = src[y0 + a, z0 : z0 + p2]
                if stream:
                    for i in range(0, p2, step):
                        stream16(d, i, row, i)
                else:
                    for i in range(p2):
                        d[i] = row[i]
        if stream:
            fence()  # streamed stores are weakly ordered: done before the caller reads
