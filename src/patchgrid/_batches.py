"""Batches for a model: reading them, prefetching, and the contract of the model's output (L2).

:class:`Batches` cuts the patches of a run (a list of grid indices) into batches, reads each
through a :class:`~patchgrid._regions.Reader` (stretches of a grid row in one read, large
patches of an image in memory by the compiled gather), reuses batch buffers (:class:`Pool`),
reads ahead in a thread where that helps (:func:`prefetch`), calls the model, checks what it
returns (:func:`check_output`), keeps the core of whole patches (:func:`core_of`) and hands
the result to a Merger. The same contract serves apply in memory, in tiles and on Dask.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from . import _compiled, _strided
from ._accumulate import RUN_BYTES, fused, row_runs
from ._checks import PatchgridError, PatchgridWarning
from ._device import Upload
from ._regions import Reader
from .backends import Backend, in_memory
from .grid import PatchGrid


class Pool:
    """Batch buffers used again once nothing holds them, so that the heap does not fragment.

    Many short-lived batches of a few MiB each leave the C heap fragmented (glibc stops
    handing such sizes back to the system), which shows as tens of MiB of peak memory. A
    buffer is reused only when its reference count shows that neither ``fn`` nor any view
    or tensor made from it is still alive, so a model that keeps its inputs keeps them
    intact. CPU only: CUDA memory has its own caching allocator.
    """

    LIMIT = 4

    def __init__(self, shape: tuple[int, ...], dtype: Any, xp: Backend, like: Any,
                 alloc: Callable[..., np.ndarray] = np.empty) -> None:  # fmt: skip
        self._shape, self._xp, self._alloc = shape, xp, alloc
        # None off the CPU, or for a dtype NumPy does not have (bfloat16); the device engine
        # on the CPU runs as it does on CUDA, without host buffers.
        host = xp.host_dtype(dtype, like)
        self._on = host is not None and not fused(xp, like)
        self._dtype = host
        self._bufs: list[np.ndarray] = []

    def take(self) -> Any:
        """A free buffer (a tensor over it for torch), or None when all are in use."""
        if not self._on:
            return None
        for i in range(len(self._bufs)):
            # 2: the list's reference and getrefcount's own argument; any view or tensor of
            # the buffer (a torch storage holds one) makes it more.
            if sys.getrefcount(self._bufs[i]) == 2:
                return self._wrap(self._bufs[i])
        if len(self._bufs) >= self.LIMIT:
            return None
        self._bufs.append(self._alloc(self._shape, self._dtype))
        return self._wrap(self._bufs[-1])

    def _wrap(self, buf: np.ndarray) -> Any:
        return self._xp.from_host(buf)


def copy_patch(dst: Any, src: Any, xp: Backend) -> None:
    """One patch into its place in a batch (NumPy: rows moved as opaque items, which is fast)."""
    if xp.copy_fast(dst, src):  # torch's threads, where the caller has loaded torch
        return
    if src.ndim and xp.host_loops:
        _strided.copy(dst[None], src[None], 1)
    else:
        xp.assign(dst, src)


def prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Produce ``items`` in a background thread, ``depth`` ahead of the consumer.

    Reading the next batch overlaps with ``fn`` and the merge of the current one (NumPy and
    torch let go of the GIL while they copy). An error in the reader reaches the consumer.
    """
    done = object()
    box: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                box.put((True, item))
        except BaseException as exc:  # handed to the consumer, raised there
            box.put((False, exc))
            return
        box.put((True, done))

    worker = threading.Thread(target=produce, name="patchgrid-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            ok, item = box.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                box.get_nowait()
            except queue.Empty:
                worker.join(0.01)


class Batches:
    """The patches of a grid read in batches of ``batch_size`` and run through ``fn``.

    ``load(ids)`` reads the patches ``ids`` into one batch (padded to ``batch_size`` with its
    last patch when ``pad_batch``); ``run(merger, ids, local, step)`` runs them all, adding
    each output's core to ``merger`` at ``local`` and calling ``step(n)`` as batches finish.
    With ``upload``, batches read on the host go to the model's device (in the reader thread).
    """

    def __init__(self, fn: Callable[[Any], Any], image: Any, reader: Reader, grid: PatchGrid,
                 out_grid: PatchGrid, batch_size: int, pad_batch: bool, xp: Backend,
                 on_disk: bool, upload: Upload | None = None) -> None:  # fmt: skip
        self.fn, self.image, self.reader, self.grid, self.out_grid = (
            fn,
            image,
            reader,
            grid,
            out_grid,
        )
        self.batch_size, self.pad_batch, self.xp = batch_size, pad_batch, xp
        self.upload = upload
        self.model_xp = xp if upload is None else upload.xp  # what the model takes and gives
        self.in_shape = reader.patch_shape(tuple(int(s) for s in image.shape))
        self.full = [p * f for p, f in zip(reader.size, factors(out_grid, grid))]
        self.dtype = xp.dtype(image)
        if isinstance(self.dtype, np.dtype):  # batches in the machine's byte order (torch's)
            self.dtype = self.dtype.newbyteorder("=")
        self.pool = self._pool()
        source = _compiled.host(reader.image)
        each = math.prod(self.in_shape) * source.itemsize if source is not None else 0
        # Large patches of an image in memory (an ndarray, a CPU tensor), cut by the compiled
        # kernel on all cores; padding is read by the gathers of load().
        self.compiled = (
            all(m is None for m in reader.maps)
            and (not on_disk or _compiled.loaded())  # out of core: not worth loading them
            and _compiled.takes(source, grid.axes, each, len(grid))
        )
        self.source = source
        self.corners = grid.starts() if self.compiled else None
        # The device engine reads a stretch of a row in one copy whatever the patches' size.
        self.fused = fused(xp, image)

    def _pool(self) -> Pool:
        alloc = np.empty if self.upload is None else self.upload.host_buffer
        return Pool((self.batch_size, *self.in_shape), self.dtype, self.xp, self.image, alloc)

    def fetch(self, ids: np.ndarray) -> tuple[np.ndarray, Any, Any]:
        """The patches ``ids`` read into one batch, and sent to the model's device where it
        is another: ``(ids, batch, sent)``."""
        if self.upload is not None:
            self.upload.prune()  # pinned buffers whose copies are done go back to the pool
        ids, batch = self.load(ids)
        return ids, batch, None if self.upload is None else self.upload.send(batch)

    def load(self, ids: np.ndarray) -> tuple[np.ndarray, Any]:
        """The patches ``ids`` as one batch: ``(ids, batch)``."""
        xp, reader, grid, size = self.xp, self.reader, self.grid, self.batch_size
        pad = size - len(ids)
        rows = ids if not self.pad_batch else np.concatenate([ids, np.full(pad, ids[-1])])
        batch = self.pool.take() if len(rows) == size else None
        if batch is None:
            batch = xp.empty((len(rows), *self.in_shape), self.dtype, self.image)
        if self.corners is not None and self.source is not None:
            into = _compiled.host(batch)
            if into is not None and _compiled.gather(into, self.source, self.corners[rows]):
                return ids, batch
        done = np.zeros(len(rows), dtype=bool)
        last = grid.axes[-1]
        # A stretch of a row in one read: for small patches (no Python step per patch), and for
        # lazy images (a file's chunks decoded once for the stretch, not once per patch).
        small = xp.nbytes(batch) // max(len(rows), 1) < RUN_BYTES
        stretch = small or self.fused or not in_memory(reader.image)
        for b0, b1 in row_runs(rows, grid.counts[-1]) if stretch else []:
            block, offsets = reader.read_run(int(rows[b0]), b1 - b0)
            for r0, count, start, step in _strided.runs(offsets.tolist(), reader.size[-1]):
                view = _strided.window_view(block, [last], [start], [step], [count],
                                            [reader.size[-1]], xp)  # fmt: skip
                _strided.copy(batch[b0 + r0 : b0 + r0 + count], view, 1, xp)
            done[b0:b1] = True
        for i in np.flatnonzero(~done).tolist():
            copy_patch(batch[i], reader.read(int(rows[i])), xp)
        return ids, batch

    def run(self, merger: Any, ids: np.ndarray, local: np.ndarray,
            step: Callable[[int], Any], partial: bool = False) -> Any:  # fmt: skip
        """Run every patch of ``ids`` through ``fn`` into ``merger``; its result.

        Where ``fn`` runs out of device memory (``Backend.out_of_memory``) on a batch of more
        than one patch, the batch size is halved and the run goes on from that batch, as if it
        had had the smaller size from the start (patches are merged in the same order)."""
        at = 0
        while at < len(ids):
            at = self._run_from(merger, ids, local, step, at)
        return merger.result(allow_missing=partial)  # partial: a mask ran some patches only

    def _run_from(self, merger: Any, ids: np.ndarray, local: np.ndarray,
                  step: Callable[[int], Any], at: int) -> int:  # fmt: skip
        """Run the patches from ``ids[at]`` on in batches of the current size; where one
        batch runs out of memory, halve the size and return where to go on."""
        size, xp, rest = self.batch_size, self.model_xp, ids[at:]
        batches = map(self.fetch, (rest[i : i + size] for i in range(0, len(rest), size)))
        # A reader thread helps NumPy; once torch is loaded, its fused adds already use the
        # cores, and the thread only costs memory. Batches for a device are read and sent
        # while the model runs.
        ahead = (self.xp.one_thread() and not self.compiled) or self.upload is not None
        source = prefetch(batches) if ahead else batches
        items = iter(source)
        try:
            while True:
                batch = None
                try:  # reading a batch may run out of device memory too (its upload)
                    ids_, batch, sent = next(items)
                    if self.upload is not None:
                        batch = self.upload.ready(sent)
                    out = self.fn(batch)
                except StopIteration:
                    break
                except Exception as exc:
                    failed = size if batch is None else len(batch)
                    if failed < 2 or not xp.out_of_memory(exc):
                        raise
                    self.halve(failed)
                    return at
                result = check_output(out, batch, xp, self.out_grid, self.full, self.fn)
                merger.add(core_of(result[: len(ids_)], self.out_grid, self.full),
                           local[at : at + len(ids_)])  # fmt: skip
                at += len(ids_)
                step(len(ids_))
        finally:
            if hasattr(source, "close"):
                source.close()  # the reader thread stops
        return at

    def halve(self, failed: int) -> None:
        """Half the batches, after ``fn`` ran out of device memory on ``failed`` patches."""
        self.batch_size = max(1, failed // 2)
        self.pool = self._pool()
        name = getattr(self.fn, "__name__", type(self.fn).__name__)
        warnings.warn(
            f"fn ({name}) ran out of device memory on a batch of {failed} patches; going on "
            f"with batches of {self.batch_size} (the result is the one that batch size gives)",
            PatchgridWarning,
            stacklevel=2,
        )


def factors(out_grid: PatchGrid, grid: PatchGrid) -> list[float]:
    return [po / pi for po, pi in zip(out_grid.size, grid.size)]


def core_of(result: Any, out_grid: PatchGrid, full: Sequence[float]) -> Any:
    """The core of whole patches (a model that returns the margin too)."""
    crop: list[Any] = [slice(None)] * result.ndim
    cut = False
    at = 1 + (result.ndim == out_grid.ndim + 2)  # after the batch axis, and an added axis
    for a, p, f in zip(out_grid.axes, out_grid.size, full):
        if result.shape[a + at] != p:
            m = (int(f) - p) // 2
            crop[a + at] = slice(m, m + p)
            cut = True
    return result[tuple(crop)] if cut else result


def check_output(
    result: Any, batch: Any, xp: Backend, out_grid: PatchGrid, full: Sequence[float], fn: Any
) -> Any:
    """fn's output as an array of the right kind and shape, or a ValueError that shows both."""
    name = getattr(fn, "__name__", type(fn).__name__)
    got = xp.as_output(result)
    if got is None:
        raise PatchgridError(
            f"fn ({name}) must return {xp.output_kind}, got {type(result).__name__}"
        )
    result = got
    kind = xp.kind(xp.dtype(result))
    if kind not in "biufc":
        raise PatchgridError(
            f"fn ({name}) returned an array of dtype {result.dtype}; it must return numbers "
            f"(bool, integer, float or complex)"
        )
    if xp.needs_grad(result):
        raise PatchgridError(
            f"fn ({name}) returned a tensor that requires grad; apply runs fn under "
            f"torch.no_grad(): return result.detach(), or do not enable grad inside fn"
        )
    shape = tuple(result.shape)
    core = list(out_grid.size)
    # One axis more than the batch: a class (or channel) axis the model added in front.
    at = 2 if len(shape) == batch.ndim + 1 else 1
    ok = len(shape) in (batch.ndim, batch.ndim + 1) and shape[0] == batch.shape[0]
    if ok:
        for a, p, f in zip(out_grid.axes, core, full):
            whole = float(f).is_integer() and shape[a + at] == int(f)
            ok = ok and (shape[a + at] == p or whole)
    if not ok:
        spatial = {a: p for a, p in zip(out_grid.axes, core)}
        expected = (batch.shape[0], *[spatial.get(a, "*") for a in range(batch.ndim - 1)])
        whole = ""
        if any(int(f) != p for p, f in zip(core, full)):
            whole = f", or the whole patch {tuple(int(f) for f in full)} on the tiled axes"
        added = (batch.shape[0], "C", *expected[1:])
        raise PatchgridError(
            f"fn ({name}) returned shape {shape} for a batch of shape {tuple(batch.shape)}; "
            f"expected {expected} (* is free), or {added} with a class or channel axis C in "
            f"front{whole}".replace("'", "")
        )
    return result
