"""The loops behind extract and merge, in NumPy, arranged for long inner loops and warm caches.

Every grid is a product of per-axis start lists. Each list splits into runs of equal steps, so
the grid splits into a few regular sub-grids, and a regular sub-grid is a strided view.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .grid import PatchGrid

# Bytes of output a single NumPy call should touch: about half of a core's L2 cache, so that
# the several passes over one chunk find it in cache.
CHUNK_BYTES = 1 << 19

Run = tuple[int, int, int, int]  # first patch index, number of patches, first start, step


def runs(starts: Sequence[int], size: int) -> list[Run]:
    """Split one axis' starts into maximal runs of equal steps."""
    out: list[Run] = []
    i, n = 0, len(starts)
    while i < n:
        if i + 1 == n:
            out.append((i, 1, starts[i], size))
            break
        step = starts[i + 1] - starts[i]
        j = i + 1
        while j + 1 < n and starts[j + 1] - starts[j] == step:
            j += 1
        out.append((i, j - i + 1, starts[i], step))
        i = j + 1
    return out


def subgrids(grid: PatchGrid) -> Iterator[tuple[Run, ...]]:
    """The regular sub-grids that make up ``grid``: one run per tiled axis."""
    per_axis = [runs(grid.axis_starts(j).tolist(), p) for j, p in enumerate(grid.size)]
    return itertools.product(*per_axis)


def window_view(
    src: np.ndarray,
    axes: Sequence[int],
    first: Sequence[int],
    step: Sequence[int],
    count: Sequence[int],
    extent: Sequence[int],
) -> np.ndarray:
    """Strided view ``(*count, *patch)`` of patches of ``extent`` starting at ``first + i * step``.

    Axes of ``src`` that are not in ``axes`` are carried whole. No copy; writeable as ``src``.
    """
    corner = [slice(None)] * src.ndim
    shape = list(src.shape)
    for a, f, e in zip(axes, first, extent):
        corner[a] = slice(f, f + e)
        shape[a] = e
    base = src[tuple(corner)]
    strides = [src.strides[a] * s for a, s in zip(axes, step)]
    if not base.size:
        return np.empty((*count, *shape), dtype=src.dtype)
    return as_strided(
        base, (*count, *shape), (*strides, *src.strides), writeable=src.flags.writeable
    )


class _Interface:
    def __init__(self, interface: dict[str, Any], base: np.ndarray) -> None:
        self.__array_interface__ = interface
        self.base = base


def _as_rows(arr: np.ndarray) -> np.ndarray | None:
    """``arr`` with its contiguous last axis seen as one opaque item, or None if it can't be.

    Copying rows as items makes NumPy's inner loop run over the grid instead of over a short
    patch row: that is what makes small patches fast.
    """
    if arr.ndim < 2 or arr.dtype.hasobject or arr.strides[-1] != arr.itemsize or not arr.size:
        return None
    nbytes = arr.shape[-1] * arr.itemsize
    interface = dict(arr.__array_interface__)
    interface.update(
        shape=arr.shape[:-1],
        strides=arr.strides[:-1],
        typestr=f"|V{nbytes}",
        descr=[("", f"|V{nbytes}")],
    )
    interface.pop("mask", None)
    return np.asarray(_Interface(interface, arr))


def _chunks(shape: Sequence[int], item_bytes: int, k: int) -> Iterator[tuple[slice, ...]]:
    """Split the first ``k`` axes of ``shape`` into blocks of about ``CHUNK_BYTES`` each."""
    inner = item_bytes * math.prod(shape[k:])
    loop: list[Sequence[slice]] = []
    for d in range(k):
        rest = inner * math.prod(shape[d + 1 : k])
        if rest >= CHUNK_BYTES and d + 1 < k:
            loop.append([slice(i, i + 1) for i in range(shape[d])])
            continue
        step = max(1, CHUNK_BYTES // max(rest, 1))
        loop.append([slice(i, i + step) for i in range(0, shape[d], step)])
        break
    yield from itertools.product(*loop)


def copy(dst: np.ndarray, src: np.ndarray, k: int) -> None:
    """``dst[...] = src`` for arrays shaped ``(*counts, *patch)``, ``k`` grid axes in front."""
    if dst.dtype == src.dtype:
        d, s = _as_rows(dst), _as_rows(src)
        if d is not None and s is not None:
            for chunk in _chunks(d.shape, d.itemsize, k):
                d[chunk] = s[chunk]
            return
    for chunk in _chunks(dst.shape, dst.itemsize, k):
        np.copyto(dst[chunk], src[chunk], casting="same_kind")


def accumulate(
    acc: np.ndarray,
    patches: np.ndarray,
    axes: Sequence[int],
    first: Sequence[int],
    step: Sequence[int],
    op: Any,
    weight: np.ndarray | None = None,
) -> None:
    """``op`` every patch of a regular sub-grid into ``acc`` at ``first + i * step``, in place.

    ``patches`` is ``(*counts, *patch)``; ``op`` is a ufunc such as ``np.add`` or
    ``np.maximum``; ``weight``, broadcastable to one patch, multiplies each patch first.

    Patches are cut along the first tiled axis into pieces of one step, so that a chunk of
    output blocks along it gathers every piece that lands there while it sits in cache; along
    the other axes, patches ``ceil(size / step)`` apart never overlap, so each phase of them
    is one strided operation.
    """
    k = len(axes)
    counts = patches.shape[:k]
    patch = patches.shape[k:]
    size = [patch[a] for a in axes]
    m = [1 if s >= p else -(-p // s) for s, p in zip(step, size)]
    a0, t0, n0 = axes[0], step[0], counts[0]
    plane = acc.itemsize * math.prod(acc.shape) // max(acc.shape[a0], 1)
    per_block = max(1, min(t0, size[0]) * plane)
    blocks = max(1, CHUNK_BYTES // per_block)
    for b_lo in range(0, n0 + m[0] - 1, blocks):
        b_hi = b_lo + blocks
        for r0 in range(m[0]):
            i_lo, i_hi = max(b_lo - r0, 0), min(b_hi - r0, n0)
            if i_lo >= i_hi:
                continue
            e0 = min(t0, size[0] - r0 * t0)
            for phase in itertools.product(*[range(mj) for mj in m[1:]]):
                cnt = [i_hi - i_lo] + [
                    len(range(q, n, mj)) for q, n, mj in zip(phase, counts[1:], m[1:])
                ]
                if 0 in cnt:
                    continue
                f = [first[0] + (i_lo + r0) * t0] + [
                    fj + q * sj for fj, q, sj in zip(first[1:], phase, step[1:])
                ]
                st = [t0] + [mj * sj for mj, sj in zip(m[1:], step[1:])]
                ext = [e0, *size[1:]]
                target = window_view(acc, axes, f, st, cnt, ext)
                pick: list[slice] = [slice(i_lo, i_hi)]
                pick += [slice(q, None, mj) for q, mj in zip(phase, m[1:])]
                inner = [slice(None)] * len(patch)
                inner[a0] = slice(r0 * t0, r0 * t0 + e0)
                source = patches[tuple(pick + inner)]
                if weight is not None:
                    source = source * weight[tuple(inner)]
                op(target, source, out=target)
