"""Layer L1: the loops behind extract and merge, in NumPy, for long inner loops and warm caches.

Every grid is a product of per-axis start lists. Each list splits into runs of equal steps, so
the grid splits into a few regular sub-grids, and a regular sub-grid is a strided view.
Backends without host loops (torch) get one whole-array operation instead.

Imports: NumPy and the L0 modules ``backends`` and ``grid`` only.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from .backends import NUMPY, Backend
from .grid import PatchGrid

# Bytes of output a single NumPy call should touch: about half of a core's L2 cache, so that
# the several passes over one chunk find it in cache.
CHUNK_BYTES = 1 << 19

# Threads for the overlap-add, and the least work (bytes of patches) worth starting them for.
THREADS = min(4, os.cpu_count() or 1)
THREADED_BYTES = 1 << 24
# The least patch data worth copying short rows into a buffer laid out like the output.
THROUGH_BUFFER_BYTES = 1 << 20

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
    return iter(_subgrids(grid))


@functools.lru_cache(maxsize=64)
def _subgrids(grid: PatchGrid) -> list[tuple[Run, ...]]:
    per_axis = [runs(grid.axis_starts(j).tolist(), p) for j, p in enumerate(grid.size)]
    return list(itertools.product(*per_axis))


def window_view(
    src: Any,
    axes: Sequence[int],
    first: Sequence[int],
    step: Sequence[int],
    count: Sequence[int],
    extent: Sequence[int],
    xp: Backend = NUMPY,
) -> Any:
    """Strided view ``(*count, *patch)`` of patches of ``extent`` starting at ``first + i * step``.

    Axes of ``src`` that are not in ``axes`` are carried whole. No copy; writeable as ``src``.
    """
    corner = [slice(None)] * src.ndim
    shape = list(src.shape)
    for a, f, e in zip(axes, first, extent):
        corner[a] = slice(f, f + e)
        shape[a] = e
    src_strides = xp.strides(src)
    strides = [src_strides[a] * s for a, s in zip(axes, step)]
    if 0 in shape or 0 in count:
        return xp.empty((*count, *shape), xp.dtype(src), src)
    return xp.as_strided(src, (*count, *shape), (*strides, *src_strides), xp.writeable(src),
                         at=tuple(corner))  # fmt: skip


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


def copy(dst: Any, src: Any, k: int, xp: Backend = NUMPY) -> None:
    """``dst[...] = src`` for arrays shaped ``(*counts, *patch)``, ``k`` grid axes in front."""
    if not xp.host_loops:  # torch copies on its own threads, or on the device
        xp.assign(dst, src)
        return
    if dst.dtype == src.dtype:
        d, s = _as_rows(dst), _as_rows(src)
        if d is not None and s is not None:
            if d.nbytes <= CHUNK_BYTES:
                d[...] = s
                return
            for chunk in _chunks(d.shape, d.itemsize, k):
                d[chunk] = s[chunk]
            return
    for chunk in _chunks(dst.shape, dst.itemsize, k):
        np.copyto(dst[chunk], src[chunk], casting="same_kind")


class _Walk(NamedTuple):
    """How :func:`accumulate` walks one sub-grid: phases, chunks and the loop layout."""

    k: int
    counts: tuple[int, ...]
    size: list[int]
    m: list[int]  # phases per tiled axis: patches this many apart never overlap
    per_chunk: list[int]  # patches per chunk along each chunked axis
    ranges: list[range]  # chunk starts along each chunked axis
    through_buffer: bool
    inner_grid: bool
    interleave: list[int]
    budget: int
    threaded: bool


def _walk(acc: Any, patches: Any, axes: Sequence[int], step: Sequence[int], weight: Any,
          xp: Backend) -> _Walk:  # fmt: skip
    k = len(axes)
    counts = tuple(patches.shape[:k])
    patch = patches.shape[k:]
    size = [patch[a] for a in axes]
    m = [1 if s >= p else -(-p // s) for s, p in zip(step, size)]
    blocks = [c + mj - 1 for c, mj in zip(counts, m)]
    # The chunked axes: axis 0 only (cutting more axes into pieces shortens NumPy's loops more
    # than the cache repays), in blocks of about CHUNK_BYTES.
    span_all = xp.itemsize(acc) * math.prod(acc.shape)
    span = span_all // max(acc.shape[axes[0]], 1) * max(min(step[0], size[0]), 1)
    per_chunk = [max(1, min(blocks[0], CHUNK_BYTES // max(span, 1)))]
    if xp.on_device(acc):  # no cache to keep warm: one launch per phase, not per chunk
        per_chunk = [max(blocks[0], 1)]
    d = len(per_chunk)
    # Tiny patch rows make NumPy's inner loop short; then iterate with the grid axes innermost.
    small = xp.host_loops and size[-1] * xp.itemsize(patches) < 256 and counts[-1] > 1 and k > d
    # Short patch rows make NumPy's inner loop short. When patches of one phase touch end to
    # end along the last tiled axis, copy them (rows as opaque items, which is fast) into a
    # buffer laid out like the output, so the addition runs along whole output rows.
    through_buffer = (
        small
        and m[-1] * step[-1] == size[-1]
        and axes[-1] == len(patch) - 1
        and xp.nbytes(patches) >= THROUGH_BUFFER_BYTES  # below it, the buffer costs more
    )
    inner_grid = (
        small
        and not through_buffer
        and size[-1] * xp.itemsize(patches) < 64
        and xp.nbytes(patches) >= THROUGH_BUFFER_BYTES
    )
    interleave: list[int] = []
    for a in range(len(patch)):
        if a in axes:
            interleave.append(list(axes).index(a))
        interleave.append(k + a)
    # NumPy runs strided in-place operations through buffers of up to 8192 items per operand;
    # beside a small output, smaller calls keep those (and ours) small too.
    budget = min(CHUNK_BYTES, max(span_all // 4, 1 << 12))
    if xp.on_device(acc):
        budget = span_all * 2 + xp.nbytes(patches)  # never split
    # Threads pay for large patches and for weighted tiny ones; unweighted tiny ones are
    # bound by the memory already, and each thread would only hold its own buffers.
    threaded = not (small and weight is None)
    ranges = [range(0, blocks[j], per_chunk[j]) for j in range(d)]
    return _Walk(k, counts, size, m, per_chunk, ranges, through_buffer, inner_grid, interleave,
                 budget, threaded)  # fmt: skip


def _add_part(walk: _Walk, acc: Any, tgt: Any, src: Any, w: Any, op: str, xp: Backend,
              scratch: list[Any]) -> None:  # fmt: skip
    """One strided operation: ``src`` (weighted by ``w``) into ``tgt``."""
    k = walk.k
    if walk.through_buffer:
        tgt, src = tgt.transpose(walk.interleave), src.transpose(walk.interleave)
        n = src.size
        if not scratch or scratch[0].size < n:
            scratch[:] = [np.empty(n, dtype=np.result_type(src, acc))]
        buf = scratch[0][:n].reshape(src.shape)
        copy(buf, src, 0)
        if w is not None:
            ww = w.reshape((1,) * k + tuple(w.shape)).transpose(walk.interleave)
            np.multiply(buf, ww, out=buf)
        xp.inplace(op, tgt, buf)
        return
    if w is not None:
        xp.add_product(tgt, src, w, scratch)
        return
    if walk.inner_grid:
        perm = (*range(k, tgt.ndim), *range(k))
        tgt, src = tgt.transpose(perm), src.transpose(perm)
    xp.inplace(op, tgt, src, "C" if walk.inner_grid else "K")


def _add_chunk(walk: _Walk, chunk: tuple[int, ...], acc: Any, patches: Any, axes: Sequence[int],
               first: Sequence[int], step: Sequence[int], op: str, weight: Any,
               xp: Backend) -> None:  # fmt: skip
    """Every piece of every patch that lands in one chunk of the output."""
    k, counts, size, m, per_chunk = walk.k, walk.counts, walk.size, walk.m, walk.per_chunk
    d = len(per_chunk)
    ndim = patches.ndim - k
    scratch: list[Any] = []
    for pieces in itertools.product(*[range(m[j]) for j in range(d)]):
        lo = [max(chunk[j] - r, 0) for j, r in enumerate(pieces)]
        hi = [min(chunk[j] + per_chunk[j] - r, counts[j]) for j, r in enumerate(pieces)]
        if any(h <= lo_ for lo_, h in zip(lo, hi)):
            continue
        ext = [min(step[j], size[j] - r * step[j]) for j, r in enumerate(pieces)]
        for phase in itertools.product(*[range(mj) for mj in m[d:]]):
            cnt = [h - lo_ for lo_, h in zip(lo, hi)]
            cnt += [len(range(q, n, mj)) for q, n, mj in zip(phase, counts[d:], m[d:])]
            if 0 in cnt:
                continue
            f = [first[j] + (lo[j] + r) * step[j] for j, r in enumerate(pieces)]
            f += [fj + q * sj for fj, q, sj in zip(first[d:], phase, step[d:])]
            st = list(step[:d]) + [mj * sj for mj, sj in zip(m[d:], step[d:])]
            target = window_view(acc, axes, f, st, cnt, ext + size[d:], xp)
            pick = [slice(lo_, h) for lo_, h in zip(lo, hi)]
            pick += [slice(q, None, mj) for q, mj in zip(phase, m[d:])]
            inner: list[slice] = [slice(None)] * ndim
            for j, r in enumerate(pieces):
                inner[axes[j]] = slice(r * step[j], r * step[j] + ext[j])
            source = patches[tuple(pick + inner)]
            w = None if weight is None else weight[tuple(inner)]
            # Split calls whose patches would not fit in cache along one grid axis (and,
            # through a buffer, whose buffer would be large beside a small output).
            cut = 1 if k > 1 else 0
            n_cut = source.shape[cut]
            per = max(1, n_cut * walk.budget // max(xp.nbytes(source), 1))
            for c0 in range(0, n_cut, per):
                part = (slice(None),) * cut + (slice(c0, c0 + per),)
                _add_part(walk, acc, target[part], source[part], w, op, xp, scratch)


def accumulate(
    acc: Any,
    patches: Any,
    axes: Sequence[int],
    first: Sequence[int],
    step: Sequence[int],
    op: str,
    weight: Any = None,
    xp: Backend = NUMPY,
) -> None:
    """``op`` every patch of a regular sub-grid into ``acc`` at ``first + i * step``, in place.

    ``patches`` is ``(*counts, *patch)``; ``op`` is ``"add"``, ``"max"`` or ``"min"``;
    ``weight``, broadcastable to one patch, multiplies each patch first (``"add"`` only).

    The output is walked in chunks of about ``CHUNK_BYTES``, cut along the first tiled axis
    at multiples of the step. Along it, patches are cut into pieces one step long, so a chunk
    gathers every piece that lands in it while it sits in cache. Along the other axes, patches
    ``ceil(size / step)`` apart never overlap, so each phase of them is one strided operation.
    """
    walk = _walk(acc, patches, axes, step, weight, xp)

    def run(chunk: tuple[int, ...]) -> None:
        _add_chunk(walk, chunk, acc, patches, axes, first, step, op, weight, xp)

    chunks = list(itertools.product(*walk.ranges))
    if (
        walk.threaded
        and xp.host_loops
        and THREADS > 1
        and len(chunks) > 1
        and patches.nbytes >= THREADED_BYTES
    ):
        # Chunks write to disjoint blocks of the output, and NumPy lets go of the GIL in its
        # loops, so threads share the work safely.
        with ThreadPoolExecutor(min(THREADS, len(chunks))) as pool:
            list(pool.map(run, chunks))
    else:
        for chunk in chunks:
            run(chunk)
