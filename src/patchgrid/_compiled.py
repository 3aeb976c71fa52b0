"""Layer L1: optional compiled kernels (numba), when numba is installed; NumPy stays the reference.

NumPy's overlap-add of large patches runs one short strided row at a time, at a fraction of
the memory bandwidth. The kernel here walks the output plane by plane along the first tiled
axis, one plane per thread: each plane sits in cache while every patch that reaches it is added,
then is normalised in place and left alone. Patches are read once, the output written once.

Loading them costs a process about 0.26 s and 100 MiB (numba's imports, each kernel's types
from numba's on-disk cache, its threads; compiling them, in the first process of an install,
about 18 s on 2 cores), which a one-shot job of a few hundred MiB never wins back: a process
loads them only once a job, or the work done without them so far, reaches :data:`LOAD_BYTES`
(:func:`ready`); loaded, they serve every job of ``MIN_BYTES`` or more.
``benchmarks/bench_oneshot.py`` measures both sides. Set ``PATCHGRID_NUMBA=0`` to turn the
kernels off (the NumPy path gives the same numbers), ``PATCHGRID_NUMBA=1`` to load them for the
first job they serve.

Imports: NumPy and the L0 modules ``_memory``, ``backends`` and, when the kernels are first
asked for, ``_numba`` (which imports numba).
"""

from __future__ import annotations

import math
import os
import warnings
from functools import cache
from types import SimpleNamespace
from typing import Any

import numpy as np

from . import _memory
from .backends import backend_of

# The least patch data (bytes) worth a call into the loaded kernels.
MIN_BYTES = 1 << 25
# The least work (bytes of patches merged) worth loading the kernels for: loading costs a
# process about 0.26 s (numba's imports 0.13 s; each kernel's types from numba's cache and its
# threads, 0.16 s) and 100 MiB; a merge saves 0.22-0.38 ms a MiB of patches on 2 cores, so
# loading pays from 0.7-1.2 GiB (benchmarks/bench_oneshot.py). The jobs of a process count
# together: once those it did without the kernels reach this much, the next one loads them,
# so a process that merges often pays for the load once and a one-shot job never pays it.
LOAD_BYTES = 1 << 30
# extract's copies save about a quarter as much a byte (0.08 ms a MiB; loading pays from
# 3.4 GiB of them): they count a quarter.
COPY_SHARE = 4
# The least bytes per patch for the batch kernels (apply, Merger.add): smaller patches go by
# NumPy's strided stretches of a grid row, which are quick for them.
MIN_PATCH = 1 << 16
# The least bytes of output rows worth dividing by the coverage in the kernel.
MIN_DIVIDE = 1 << 20
# The shortest patch row (voxels along the last tiled axis) the kernels serve; shorter rows
# are NumPy's fast path (rows copied as opaque items). Rows of 4 (128^3, 4^3 patches) merge
# about 1.7x (uniform) and 2.4x (gaussian) faster in the kernel than in NumPy.
MIN_ROW = 4


@cache
def kernels() -> Any:
    """Load the kernels (compiled once, then from numba's on-disk cache); None when numba
    cannot be had."""
    if os.environ.get("PATCHGRID_NUMBA", "1") == "0":
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from . import _numba
    except ImportError:
        return None
    return SimpleNamespace(
        overlap_add3=_numba.overlap_add3,
        merge_planes3=_numba.merge_planes3,
        add_batch3=_numba.add_batch3,
        divide3=_numba.divide3,
        gather3=_numba.gather3,
    )


def available() -> bool:
    """Whether the compiled kernels can run here (loads them)."""
    return kernels() is not None


# Bytes of work the kernels would have taken, done without them in this process so far.
done_without = [0]


def ready(job: int, call: int) -> bool:
    """Whether the kernels serve a call of ``call`` bytes of a job of ``job`` bytes, where all
    else about it suits them: loaded already, or worth loading now (the job alone, or the work
    done without them so far, reaches :data:`LOAD_BYTES`). A call they do not serve is counted
    as done without them. Loads the kernels where it says yes.

    A job under ``LOAD_BYTES`` in a fresh process never loads them, whatever its calls; jobs
    after it load them once those before have done ``LOAD_BYTES`` without (a merge's first
    call decides for the whole grid, with ``call`` 0: its rows, if refused, count)."""
    if loaded():
        return True
    eager = os.environ.get("PATCHGRID_NUMBA") == "1"
    if not eager and max(job, done_without[0]) < LOAD_BYTES:
        done_without[0] += call
        return False
    return available()


# Outputs this large that a kernel will write are given their pages up front.
PREFAULT_BYTES = 1 << 22
_MADV_POPULATE_WRITE = 23  # Linux 5.14 and newer


def fresh(shape: Any, dtype: Any) -> np.ndarray:
    """``np.empty``, with its pages mapped before the kernels' threads write them.

    Fresh pages are faulted in on first touch; when both threads of a kernel touch them at
    once, the faults contend (on a 2-core VM a 64 MiB merge took 89-143 ms instead of 34).
    ``madvise(MADV_POPULATE_WRITE)`` maps them in one call on Linux, a few ms for 64 MiB;
    elsewhere, or on older kernels, this is ``np.empty``.
    """
    out = np.empty(shape, dtype)
    if out.nbytes >= PREFAULT_BYTES:
        libc = _memory.libc()
        if libc is not None and hasattr(libc, "madvise"):
            import ctypes

            start = out.ctypes.data & ~4095  # madvise takes whole pages
            libc.madvise(
                ctypes.c_void_p(start),
                ctypes.c_size_t(out.ctypes.data + out.nbytes - start),
                ctypes.c_int(_MADV_POPULATE_WRITE),
            )  # a failure leaves the pages to be faulted in later: the same result
    return out


def host(x: Any) -> np.ndarray | None:
    """The kernels' view of ``x``: an ndarray itself; a CPU float tensor that needs no grad
    seen through NumPy (the tensor's own memory, no copy: the kernels write into it); else
    None."""
    xb = backend_of(x)
    view = xb.host(x)
    # Of another backend's memory (a tensor's), float views only, as the kernels always took.
    if view is None or xb.host_loops or view.dtype in (np.float32, np.float64):
        return view
    return None


def takes(image: np.ndarray | None, axes: tuple[int, ...], patch_bytes: int, n: int) -> bool:
    """Whether the batch kernels take ``n`` patches of ``patch_bytes`` cut from ``image`` (a
    :func:`host` view) along ``axes``: the tiled axes last, large patches, a large job, the
    kernels :func:`ready` (a copy counts a ``COPY_SHARE``-th of its bytes)."""
    k = len(axes)
    return (
        image is not None
        and axes == tuple(range(image.ndim - k, image.ndim))
        and patch_bytes >= MIN_PATCH
        and patch_bytes * n >= MIN_BYTES
        and ready(patch_bytes * n // COPY_SHARE, patch_bytes * n // COPY_SHARE)
    )


def loaded() -> bool:
    """Whether the kernels are loaded already (asking never loads them)."""
    return kernels.cache_info().currsize > 0 and kernels() is not None


def _pair(acc: np.dtype, patches: np.dtype) -> bool:
    """The dtypes the kernels take: float32 or float64 patches into an accumulator of their
    own dtype or float64 (float32 patches sum in float64, see backends.acc_dtype)."""
    return acc in (np.float32, np.float64) and patches in (acc, np.float32)


def serves(acc: Any, patches: Any, grid_ndim: int, axes: tuple[int, ...]) -> bool:
    """Whether :func:`overlap_add` takes this job (plain float arrays of one dtype, big rows,
    the kernels :func:`ready`)."""
    if not isinstance(acc, np.ndarray) or not isinstance(patches, np.ndarray):
        return False
    k = len(axes)
    return (
        _pair(acc.dtype, patches.dtype)
        and 1 <= k <= 3
        and axes == tuple(range(grid_ndim - k, grid_ndim))
        and patches.shape[-1] >= MIN_ROW
        and patches.nbytes >= MIN_BYTES
        and acc.flags.writeable
        and ready(patches.nbytes, patches.nbytes)
    )


def _whole_grid(
    out: np.ndarray,
    patches: np.ndarray,
    starts: list[np.ndarray],
    size: tuple[int, ...],
    weight: np.ndarray | None,
    profiles: list[np.ndarray] | None,
    wdtype: Any,
) -> tuple[list[Any], Any]:
    """What the whole-grid kernels share: their arguments seen in three tiled axes (the
    starts, the patches reaching each plane, the weight, the profiles), and an iterator over
    the lead axes of ``out`` and ``patches`` as 3-D views (always views: the kernels write
    into ``out``)."""
    k = len(size)
    pad = 3 - k
    n_lead = out.ndim - k
    starts3 = [np.zeros(1, np.intp)] * pad + [np.asarray(s, np.intp) for s in starts]
    size3 = (1,) * pad + tuple(size)
    profs = (
        [np.ones(1)] * pad + [np.asarray(p, np.float64) for p in profiles]
        if profiles is not None
        else [np.ones(1)] * 3
    )
    x = np.arange(out.shape[n_lead] if pad == 0 else 1)
    lo0 = np.searchsorted(starts3[0] + size3[0], x, side="right").astype(np.intp)
    hi0 = np.searchsorted(starts3[0], x, side="right").astype(np.intp)
    if weight is None:
        w = np.ones((1, 1, 1), wdtype)
    else:
        w = np.ascontiguousarray(np.broadcast_to(weight, size).reshape(size3), dtype=wdtype)
    # Patches as (*counts, *lead, *size): move the lead axes to the front to loop over them.
    moved = np.moveaxis(patches, list(range(k, k + n_lead)), list(range(n_lead)))
    views = (
        (np.expand_dims(out[lead], tuple(range(pad))),
         np.expand_dims(moved[lead], tuple(range(pad)) + tuple(range(3, 3 + pad))))
        for lead in np.ndindex(*out.shape[:n_lead])
    )  # fmt: skip
    return [*starts3, lo0, hi0, w, weight is not None, profs], views


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
    kernel = kernels().overlap_add3
    args, views = _whole_grid(acc, patches, starts, size, weight, profiles, acc.dtype)
    *grid_args, profs = args
    for a3, p3 in views:
        kernel(a3, p3, *grid_args, init, *profs, profiles is not None)


def merge_planes(
    out: np.ndarray,
    patches: np.ndarray,
    starts: list[np.ndarray],
    size: tuple[int, ...],
    weight: np.ndarray | None,
    profiles: list[np.ndarray] | None,
) -> None:
    """Merge patches ``(*counts, *lead, *size)`` into ``out`` ``(*lead, *shape)``, every plane
    summed in float64 and normalised by ``profiles`` (zeros already ones) on its own, then
    written in ``out``'s dtype (float32 or float64): the wide accumulator of float32 patches
    without a volume of it. The tiled axes are the last ``k`` (1 to 3) of ``out``."""
    kernel = kernels().merge_planes3
    args, views = _whole_grid(out, patches, starts, size, weight, profiles, np.float64)
    *grid_args, profs = args
    for o3, p3 in views:
        kernel(o3, p3, *grid_args, *profs, profiles is not None)


def serves_planes(out: Any, patches: Any, grid_ndim: int, axes: tuple[int, ...]) -> bool:
    """Whether :func:`merge_planes` takes this job: float32 or float64 patches and output, the
    tiled axes last, rows and a job large enough for the kernels, and the kernels
    :func:`ready` for it."""
    if not isinstance(out, np.ndarray) or not isinstance(patches, np.ndarray):
        return False
    k = len(axes)
    return (
        out.dtype in (np.float32, np.float64)
        and patches.dtype in (np.float32, np.float64)
        and 1 <= k <= 3
        and axes == tuple(range(grid_ndim - k, grid_ndim))
        and patches.shape[-1] >= MIN_ROW
        and patches.nbytes >= MIN_BYTES
        and out.flags.writeable
        # Counted by serves() on the rows path if this refuses, not twice.
        and ready(patches.nbytes, 0)
    )


def _as3(arr: np.ndarray, k: int, lead_at: int) -> np.ndarray | None:
    """A view of ``arr`` with its lead axes (before the ``k`` tiled ones, from ``lead_at``)
    as one, and unit axes so that three are tiled; None where a view cannot be had."""
    lead = arr.shape[lead_at : arr.ndim - k]
    shape = (*arr.shape[:lead_at], math.prod(lead), *(1,) * (3 - k), *arr.shape[arr.ndim - k :])
    return reshaped(arr, shape)


def reshaped(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """``arr`` reshaped as a view, or None where that would take a copy."""
    try:
        return np.reshape(arr, shape, copy=False)  # raises rather than copying
    except ValueError:
        return None
    except TypeError:  # NumPy < 2.1: no copy=
        view = arr.reshape(shape)
        return view if np.may_share_memory(view, arr) else None


def serves_batch(acc: Any, batch: Any, axes: tuple[int, ...], n_patches: int) -> bool:
    """Whether :func:`add_batch` takes this batch: float arrays of one dtype, the tiled axes
    last, patches of ``MIN_PATCH`` bytes and rows of ``MIN_ROW`` voxels or more,
    ``MIN_BYTES`` of patches in the whole merge of ``n_patches``, the kernels :func:`ready`
    for it."""
    if not isinstance(acc, np.ndarray) or not isinstance(batch, np.ndarray) or not len(batch):
        return False
    each = batch.nbytes // len(batch)
    k = len(axes)
    ndim = acc.ndim
    return (
        _pair(acc.dtype, batch.dtype)
        and 1 <= k <= 3
        and axes == tuple(range(ndim - k, ndim))
        and batch.ndim == ndim + 1
        and batch.shape[-1] >= MIN_ROW
        and each >= MIN_PATCH
        and each * n_patches >= MIN_BYTES
        and acc.flags.writeable
        and ready(each * n_patches, batch.nbytes)
    )


def add_batch(
    acc: np.ndarray, batch: np.ndarray, starts: np.ndarray, weight: np.ndarray | None
) -> bool:
    """``acc[patch i's place] += batch[i] * weight`` for a batch ``(B, *lead, *size)`` whose
    patches start at ``starts`` ``(B, k)`` (in ``acc``'s coordinates), plane by plane on all
    cores. Patches of one batch may overlap. False (nothing done) where the arrays cannot be
    seen as the kernel's (lead axes that do not flatten into a view)."""
    k = starts.shape[1]
    acc4 = _as3(acc, k, 0)
    patches5 = _as3(batch, k, 1)
    if acc4 is None or patches5 is None:
        return False
    cols = [np.zeros(len(starts), np.intp)] * (3 - k)
    s0, s1, s2 = cols + [np.ascontiguousarray(starts[:, j], np.intp) for j in range(k)]
    size3 = patches5.shape[2:]
    if weight is None:
        w = np.ones((1, 1, 1), acc.dtype)
    else:
        w = np.ascontiguousarray(np.asarray(weight).reshape(size3), dtype=acc.dtype)
    kernels().add_batch3(acc4, patches5, s0, s1, s2, w, weight is not None)
    return True


def divide(acc: np.ndarray, k: int, profiles: list[np.ndarray]) -> bool:
    """``acc /= outer(*profiles)`` over its last ``k`` axes (zeros already made ones), on all
    cores; False (nothing done) where ``acc`` cannot be seen as the kernel's array."""
    acc4 = _as3(acc, k, 0)
    if acc4 is None:
        return False
    profs = [np.ones(1)] * (3 - k) + [np.asarray(p, np.float64) for p in profiles]
    kernels().divide3(acc4, *profs)
    return True


def gather(out: np.ndarray, image: np.ndarray, starts: np.ndarray, stream: bool = False) -> bool:
    """``out[i] = image[patch i's place]`` for patches ``(B, *lead, *size)`` starting at
    ``starts`` ``(B, k)``, on all cores; False (nothing done) where the arrays cannot be seen
    as the kernel's.

    ``stream`` writes ``out`` past the caches (non-temporal stores): for an ``out`` much larger
    than the cache that nothing reads soon; taken where ``out`` is C-contiguous, 16-byte
    aligned, with rows of a multiple of 16 bytes, and the image's rows are contiguous.
    """
    k = starts.shape[1]
    if not (
        isinstance(image, np.ndarray)
        and image.dtype == out.dtype
        and out.dtype in (np.float32, np.float64)
        and out.shape[-1] >= MIN_ROW
    ):
        return False
    image4 = _as3(image, k, 0)
    out5 = _as3(out, k, 1)
    if image4 is None or out5 is None:
        return False
    stream = (
        stream
        and out5.flags.c_contiguous
        and out5.ctypes.data % 16 == 0
        and out5.shape[-1] * out5.itemsize % 16 == 0
        and image4.strides[-1] == image4.itemsize
    )
    cols = [np.zeros(len(starts), np.intp)] * (3 - k)
    s0, s1, s2 = cols + [np.ascontiguousarray(starts[:, j], np.intp) for j in range(k)]
    kernels().gather3(out5, image4, s0, s1, s2, bool(stream))
    return True


def warm() -> bool:
    """Load the kernels and their float32/float64 versions now, on tiny arrays, so that the
    first large call does not pay for it (a process pays it once: the benchmarks do this
    before measuring, as they import the modules a case needs). False without numba."""
    if not available():
        return False
    for dtype in (np.float32, np.float64):
        acc = np.zeros((1, 2, 2, MIN_ROW), dtype)
        batch = np.ones((1, 1, 1, 1, MIN_ROW), dtype)
        starts = np.zeros((1, 3), np.intp)
        add_batch(acc, batch, starts, np.ones((1, 1, MIN_ROW), dtype))
        if dtype == np.float32:  # float32 patches into their float64 accumulator
            wide = acc.astype(np.float64)
            add_batch(wide, batch, starts, np.ones((1, 1, MIN_ROW), np.float64))
        for into in (np.float32, np.float64):  # planes summed in float64, written in `into`
            out = np.zeros((1, 2, MIN_ROW), into)
            merge_planes(out, batch, [np.zeros(1, np.intp)] * 2, (1, MIN_ROW),
                         np.ones((1, MIN_ROW)), [np.ones(2), np.ones(MIN_ROW)])  # fmt: skip
        divide(acc, 3, [np.ones(2), np.ones(2), np.ones(MIN_ROW)])
        gather(batch, acc, starts)
        gather(batch, acc, starts, stream=True)
    return True
