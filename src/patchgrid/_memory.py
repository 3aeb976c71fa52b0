"""The memory of out-of-core work: the C allocator's knobs, zarr's concurrency, whole chunks (L0).

An out-of-core job (``apply`` with ``out=`` on disk, the tiled merge) holds little of its own:
a slab of accumulator, a batch, the rows it is writing. What made a 512^3 job peak at 700 MiB
was around it, and the job bounds it itself while it runs (:class:`bound`):

- glibc keeps freed blocks for later, per thread, under a threshold that rises with the
  largest block freed (up to 32 MiB): zarr decodes and encodes chunks on a pool of threads,
  and each thread's heap kept its own chunks' worth. Blocks of :data:`MMAP_BYTES` and more
  get pages of their own while the job runs, handed back when freed.
- zarr reads and writes up to ``async.concurrency`` (10) chunks at once, each compressed and
  decoded in memory together: ten 16 MiB chunks are 300 MiB. The job lowers it so that the
  chunks in flight hold about :data:`ZARR_BYTES`.
- A write that covers part of a chunk makes zarr read the chunk back, decode it, copy it,
  patch it and encode it again: four times the chunk, for every part. The tiles' writes go
  through :func:`staged`, which holds the rows until they fill the output's chunks along the
  axis the merge streams on and writes them whole.

What it costs: blocks of 4 MiB and more are fresh pages each time. A source in chunks that
large, read a batch of patches at a time, has each chunk decoded a dozen times, and each time
into pages the kernel must fault in: 512^3 in 16 MiB chunks takes about 1.5 to 2 times the
CPU time it took unbounded. Sources in small chunks (64^3) pay nothing measurable.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from typing import Any

import numpy as np

from .backends import is_tensor

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# While a job runs: blocks of this size or more get pages of their own, returned when freed
# (the accumulator, the rows written, zarr's chunk buffers).
MMAP_BYTES = 4 << 20
# While a job runs: free memory at the top of a heap beyond this goes back to the system.
# Much lower, the heap hands back and faults in again the blocks a job frees and allocates
# over and over (at 1 MiB, twice the CPU time for a source in 64^3 chunks); higher, it keeps
# more (at 8 MiB, 25 MiB more peak).
TRIM_BYTES = 4 << 20
# After a job: where glibc's own rule takes the thresholds once a large block is freed (the
# mmap threshold rises to the block, at most 32 MiB on 64-bit; trimming to twice that).
_GLIBC_MMAP_MAX = 32 << 20
_GLIBC_TRIM_DEFAULT = 128 << 10
# zarr chunks in flight at once during a job, compressed and decoded: about this many bytes.
ZARR_BYTES = 64 << 20


@functools.cache
def libc() -> Any:
    """glibc, when this process runs on it (for its allocator's knobs), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        lib = ctypes.CDLL("libc.so.6")
        return lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


class _State:
    """What the jobs running now have changed, so that the last one to end puts it back."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.jobs = 0
        self.tuned: int | None = None  # the threshold of tune_allocator(), once called
        self.zarr: Any = None  # zarr's config context while jobs run


state = _State()


def tune_allocator(threshold: int = 4 << 20) -> bool:
    """Keep resident memory flat for the whole process (Linux, glibc): give blocks of
    ``threshold`` bytes or more pages of their own, handed back to the system when freed.

    glibc raises this threshold to the largest block freed so far; blocks under it stay in
    the heap once freed, per thread. Code that encodes chunks on threads (a zarr writer) then
    makes resident memory grow with the chunks written, though nothing is still in use.
    patchgrid's own out-of-core work (:func:`patchgrid.apply` with ``out=`` on disk, the
    ``patchgrid`` command) needs no call: it sets a threshold of its own while it runs and
    puts back glibc's usual one after. Call this for a script that streams large arrays to
    disk with code of its own; the setting stays for the rest of the process.

    Parameters
    ----------
    threshold : int
        Bytes; blocks at least this large get their own pages.

    Returns
    -------
    bool
        Whether the setting was made (False where there is no glibc).

    Examples
    --------
    >>> import patchgrid as pg
    >>> pg.tune_allocator() in (True, False)
    True
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise TypeError(f"threshold must be a positive int of bytes, got {threshold!r}")
    glibc = libc()
    if glibc is None or not glibc.mallopt(_M_MMAP_THRESHOLD, threshold):
        return False
    with state.lock:
        state.tuned = threshold
    return True


def release_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc); a no-op elsewhere."""
    glibc = libc()
    if glibc is not None:
        glibc.malloc_trim(0)


def _chunk_bytes(array: Any) -> int:
    """Bytes of one chunk of a chunked array (zarr, HDF5), else 0."""
    chunks = getattr(array, "chunks", None)
    if not isinstance(chunks, tuple) or not all(isinstance(c, (int, np.integer)) for c in chunks):
        return 0
    try:
        itemsize = int(np.dtype(array.dtype).itemsize)
    except TypeError:
        return 0
    n = itemsize
    for c in chunks:
        n *= int(c)
    return n


def zarr_concurrency(*arrays: Any, now: int = 10) -> int:
    """Chunks zarr should have in flight so that they hold about :data:`ZARR_BYTES`: each is
    there compressed and decoded, so two chunks' bytes each, and never more than ``now``.

    >>> import numpy as np
    >>> class Chunked:
    ...     dtype, chunks = np.dtype("float32"), (64, 256, 256)
    >>> zarr_concurrency(Chunked(), now=10)
    2
    """
    largest = max((_chunk_bytes(a) for a in arrays), default=0)
    return max(1, min(now, ZARR_BYTES // max(2 * largest, 1)))


class bound(contextlib.ContextDecorator):
    """Hold an out-of-core job's memory to what it uses, while it runs.

    On entering, the first job running sets glibc's mmap threshold to :data:`MMAP_BYTES` and
    its trim threshold to :data:`TRIM_BYTES`, and lowers zarr's ``async.concurrency`` (see
    :func:`zarr_concurrency`) for ``arrays`` (the job's input and output). On leaving, the
    last one puts zarr's setting back and the thresholds where glibc's own rule takes them
    after a large block is freed (or to the threshold of :func:`tune_allocator`, when the
    process asked for one), and hands the free pages back. Both settings belong to the whole
    process: other threads see them while a job runs.
    """

    def __init__(self, *arrays: Any) -> None:
        self._arrays = arrays

    def __enter__(self) -> bound:
        with state.lock:
            state.jobs += 1
            if state.jobs == 1:
                _set_allocator(MMAP_BYTES, TRIM_BYTES)
                state.zarr = _limit_zarr(self._arrays)
        return self

    def __exit__(self, *exc: object) -> None:
        with state.lock:
            state.jobs -= 1
            if state.jobs == 0:
                if state.zarr is not None:
                    state.zarr.__exit__(None, None, None)
                    state.zarr = None
                if state.tuned is not None:
                    _set_allocator(state.tuned, _GLIBC_TRIM_DEFAULT)
                else:
                    _set_allocator(_GLIBC_MMAP_MAX, 2 * _GLIBC_MMAP_MAX)
        release_memory()


def _set_allocator(mmap_bytes: int, trim_bytes: int) -> None:
    glibc = libc()
    if glibc is not None:
        glibc.mallopt(_M_MMAP_THRESHOLD, mmap_bytes)
        glibc.mallopt(_M_TRIM_THRESHOLD, trim_bytes)


def _limit_zarr(arrays: tuple[Any, ...]) -> Any:
    """zarr's config set to fewer chunks in flight, as a context to leave later; or None."""
    zarr = sys.modules.get("zarr")
    if zarr is None:
        return None
    try:
        now = int(zarr.config.get("async.concurrency"))
        want = zarr_concurrency(*arrays, now=now)
        if want >= now:
            return None
        limit = zarr.config.set({"async.concurrency": want})
        limit.__enter__()
    except Exception:  # an older or newer zarr without this setting: leave it be
        return None
    return limit


def staged(out: Any, axis: int) -> Any:
    """``out`` for a writer that finishes rows in order along ``axis``, over one box of the
    other axes: rows wait until they fill the output's chunks along ``axis`` and go out whole.

    A chunked array (zarr, HDF5) that receives part of a chunk reads the chunk back, decodes
    it, patches it and encodes it again, each time. Held here, the rows cost one chunk row of
    the box (the chunks along ``axis`` times the box), and every chunk is encoded once. An
    array without chunks, or with chunks one row thick, is returned as it is.
    """
    rows = int(out.chunks[axis]) if chunked(out) else 1
    return out if rows <= 1 else _Staged(out, axis, rows)


def chunked(out: Any) -> bool:
    """Whether ``out`` is stored in chunks (a zarr array, a chunked HDF5 dataset)."""
    chunks = getattr(out, "chunks", None)
    return (
        isinstance(chunks, tuple)
        and len(chunks) == len(getattr(out, "shape", ()))
        and all(isinstance(c, (int, np.integer)) for c in chunks)
    )


class _Staged:
    """Writes held until they fill whole chunk rows along one axis (see :func:`staged`)."""

    def __init__(self, out: Any, axis: int, rows: int) -> None:
        self.shape = tuple(int(n) for n in out.shape)
        self.dtype = out.dtype
        self._out, self._axis, self._rows = out, axis, rows
        self._buf: np.ndarray | None = None  # one chunk row of the box, rows [first, first + rows)
        self._box: list[tuple[int, int]] = []
        self._first = self._lo = self._hi = 0  # rows [lo, hi) wait in the buffer

    def __setitem__(self, where: Any, block: Any) -> None:
        ax, n = self._axis, self.shape[self._axis]
        spans = _spans(where, self.shape)
        if spans is None:  # not a box of plain slices: no holding
            self.flush()
            self._out[where] = block
            return
        lo, hi = spans[ax]
        box = spans[:ax] + spans[ax + 1 :]
        if self._lo < self._hi and (box != self._box or lo != self._hi):
            self.flush()
        block = np.broadcast_to(np.asarray(block), [b - a for a, b in spans])
        at = lo
        while at < hi:
            first = at - at % self._rows
            last = min(first + self._rows, n)
            take = min(hi, last) - at
            part = block[(slice(None),) * ax + (slice(at - lo, at - lo + take),)]
            if at == first and at + take == last:  # whole chunk rows: out as they are
                self._out[self._where(box, at, at + take)] = part
            else:
                if self._lo == self._hi:
                    self._start(box, first, last, at)
                into = (slice(None),) * ax + (slice(at - first, at - first + take),)
                assert self._buf is not None
                self._buf[into] = part
                self._hi = at + take
                if self._hi == last:
                    self.flush()
            at += take
        if hi >= n and self._lo == self._hi:
            self._buf = None  # the axis is done: nothing more comes to this box

    def _start(self, box: list[tuple[int, int]], first: int, last: int, at: int) -> None:
        shape = [b - a for a, b in box]
        shape.insert(self._axis, last - first)
        if self._buf is None or list(self._buf.shape) != shape:
            self._buf = np.empty(shape, self.dtype)
        self._box, self._first, self._lo, self._hi = box, first, at, at

    def _where(self, box: list[tuple[int, int]], lo: int, hi: int) -> tuple[slice, ...]:
        spans = list(box)
        spans.insert(self._axis, (lo, hi))
        return tuple(slice(a, b) for a, b in spans)

    def flush(self) -> None:
        """Write the rows held, whole chunks or not."""
        if self._lo == self._hi:
            return
        assert self._buf is not None
        held = (slice(None),) * self._axis + (slice(self._lo - self._first,
                                                    self._hi - self._first),)  # fmt: skip
        self._out[self._where(self._box, self._lo, self._hi)] = self._buf[held]
        self._lo = self._hi


def _spans(where: Any, shape: tuple[int, ...]) -> list[tuple[int, int]] | None:
    """``where`` as (start, stop) per axis, if it is a box of step-1 slices over every axis."""
    if not isinstance(where, tuple) or len(where) != len(shape):
        return None
    spans = []
    for w, n in zip(where, shape):
        if not isinstance(w, slice) or w.step not in (None, 1):
            return None
        start, stop, _ = w.indices(n)
        spans.append((start, max(start, stop)))
    return spans


TOO_HARD = getattr(np, "exceptions", np).TooHardError  # NumPy 1.24 has it at the top


def shares_memory(a: object, b: object) -> bool:
    """Whether two arrays may hold the same data: NumPy's exact test where it is quick (else
    its bounds), the byte ranges of tensors and of a tensor beside a NumPy array, and for
    arrays backed by files (memmaps, zarr, HDF5, ``pg.open`` images) the same file and array
    in it, however many handles or mappings there are."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        try:
            if np.shares_memory(a, b, max_work=1 << 20):  # type: ignore[arg-type]
                return True
        except TOO_HARD:
            return True if np.may_share_memory(a, b) else _same_file(a, b)
        return _same_file(a, b)
    ra, rb = _byte_range(a), _byte_range(b)
    if ra is not None and rb is not None:
        return ra[0] == rb[0] and ra[1] < rb[2] and rb[1] < ra[2]
    return _same_file(a, b)


def _byte_range(x: Any) -> tuple[str, int, int] | None:
    """``(device, lo, hi)``: the addresses of a NumPy array's bytes or a tensor's storage
    (host memory is device "cpu"); None for anything else."""
    if is_tensor(x):
        storage = x.untyped_storage()
        return str(x.device), storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    if isinstance(x, np.ndarray):
        lo, hi = _BYTE_BOUNDS(x)
        return "cpu", int(lo), int(hi)
    return None


try:  # NumPy 2 keeps byte_bounds in np.lib.array_utils, NumPy 1 at the top
    from numpy.lib.array_utils import byte_bounds as _BYTE_BOUNDS
except ImportError:  # pragma: no cover - NumPy 1
    from numpy import byte_bounds as _BYTE_BOUNDS  # type: ignore[attr-defined,no-redef]


def _file_of(x: Any) -> tuple[str, str] | None:
    """The file (and the array inside it) behind a memmap, zarr array, h5py dataset or
    ``pg.open`` image; None for an array in memory."""
    name = getattr(x, "filename", None)  # np.memmap
    if isinstance(x, np.ndarray) and isinstance(name, (str, os.PathLike)):
        return os.path.realpath(name), ""
    base = getattr(x, "base", None)  # a view of a memmap (np.load gives one)
    if isinstance(x, np.ndarray) and isinstance(base, np.ndarray):
        return _file_of(base)
    store = getattr(x, "store", None)
    root = getattr(store, "root", None)  # zarr's LocalStore
    if root is not None:
        return os.path.realpath(str(root)), str(getattr(x, "path", ""))
    h5 = getattr(getattr(x, "file", None), "filename", None)  # h5py
    if isinstance(h5, str):
        return os.path.realpath(h5), str(getattr(x, "name", ""))
    inner = getattr(x, "source", None)  # a pg.open image: the array it reads
    if inner is not None and inner is not x:
        return _file_of(inner)
    return None


def _same_file(a: Any, b: Any) -> bool:
    fa, fb = _file_of(a), _file_of(b)
    if fa is None or fb is None or fa[0] != fb[0]:
        return False
    pa, pb = fa[1].strip("/"), fb[1].strip("/")
    return not pa or not pb or pa == pb or pa.startswith(pb + "/") or pb.startswith(pa + "/")
