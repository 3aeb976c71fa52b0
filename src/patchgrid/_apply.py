"""Sliding-window apply: run a function over every patch and blend the outputs back."""

from __future__ import annotations

import contextlib
import math
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from . import _checks, _compiled, _memory, _strided
from ._checks import PatchgridError
from ._finish import warn_uncovered
from ._merge import RUN_BYTES, DiskMerger, Merger, row_runs
from ._regions import INDEX_MODES, Reader
from ._tiled import TileMerger, apply_tiles
from .backends import NUMPY, Backend, backend_of, is_dask, is_tensor, shares_memory
from .grid import PatchGrid

__all__ = ["apply"]

Progress = Callable[[int, int], Any]


class _Pool:
    """Batch buffers used again once nothing holds them, so that the heap does not fragment.

    Many short-lived batches of a few MiB each leave the C heap fragmented (glibc stops
    handing such sizes back to the system), which shows as tens of MiB of peak memory. A
    buffer is reused only when its reference count shows that neither ``fn`` nor any view
    or tensor made from it is still alive, so a model that keeps its inputs keeps them
    intact. CPU only: CUDA memory has its own caching allocator.
    """

    LIMIT = 4

    def __init__(self, shape: tuple[int, ...], dtype: Any, xp: Backend, like: Any) -> None:
        self._shape, self._xp, self._dtype = shape, xp, dtype
        self._on = xp is NUMPY or (xp.name == "torch" and like.device.type == "cpu")
        if self._on and xp.name == "torch":
            try:
                self._dtype = np.dtype(str(dtype).replace("torch.", ""))
            except TypeError:  # a dtype NumPy does not have (bfloat16)
                self._on = False
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
        self._bufs.append(np.empty(self._shape, self._dtype))
        return self._wrap(self._bufs[-1])

    def _wrap(self, buf: np.ndarray) -> Any:
        return self._xp.torch.from_numpy(buf) if self._xp.name == "torch" else buf[...]  # type: ignore[attr-defined]


def _progress(progress: Any, total: int) -> tuple[Callable[[int], None], Callable[[], None]]:
    """A step function and a close function for the progress option."""
    if callable(progress):
        done = [0]

        def step(n: int) -> None:
            done[0] += n
            progress(done[0], total)

        return step, lambda: None
    show = sys.stderr.isatty() if progress is None else bool(progress)
    if not show:
        return (lambda n: None), (lambda: None)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="patch", desc="patchgrid.apply", leave=False)
    return bar.update, bar.close


def _copy_patch(dst: Any, src: Any, xp: Backend) -> None:
    """One patch into its place in a batch (NumPy: rows moved as opaque items, which is fast)."""
    torch = sys.modules.get("torch")
    if xp is NUMPY and torch is not None and src.dtype == dst.dtype and src.flags.writeable:
        try:
            # Loaded already by the caller: torch copies a strided patch on all cores.
            torch.from_numpy(dst).copy_(torch.from_numpy(src))
            return
        except TypeError:  # a dtype torch does not have
            pass
    if xp is NUMPY and src.ndim:
        _strided.copy(dst[None], src[None], 1)
    else:
        xp.assign(dst, src)


def _prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
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


def apply(
    fn: Callable[[Any], Any],
    image: Any,
    size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    *,
    axes: int | Sequence[int] | None = None,
    edge: str | Sequence[str] = "shift",
    pad_mode: str = "constant",
    pad_value: Any = 0,
    window: Any = None,
    reduce: str = "mean",
    batch_size: int = 4,
    pad_batch: bool = False,
    margin: int | Sequence[int] = 0,
    scale: Any = 1,
    dtype: Any = None,
    fill: Any = 0,
    out: Any = None,
    progress: bool | Progress | None = None,
) -> Any:
    """Run ``fn`` over every patch of ``image`` and blend its outputs into one image.

    Parameters
    ----------
    fn : callable
        Takes a batch ``(B, *patch_shape)`` and returns ``(B, *out_patch_shape)`` of the same
        kind (a NumPy array for a NumPy image, a tensor for a tensor). It may change the sizes
        of the axes that are not tiled (one channel in, five classes out), and, with
        ``margin`` and ``scale``, the tiled ones.
    image : array_like, torch.Tensor or dask.array.Array
        NumPy array, memmap, zarr array, h5py dataset or tensor (CPU or CUDA; batches stay on
        its device). Only the regions the patches need are read. A Dask array gives a lazy
        Dask array with the same chunks (see :mod:`patchgrid.dask`).
    size : int or sequence of int
        Input patch size per tiled axis (the size ``fn`` sees).
    stride : int or sequence of int, optional
        Step between patches; defaults to the core size, ``size - 2 * margin``.
    axes, edge, pad_mode, pad_value
        As for :class:`PatchGrid`; ``edge`` defaults to ``"shift"`` (no padding, full
        coverage).
    window, reduce, dtype, fill
        As for :class:`Merger`, with the same defaults: a uniform window (every patch counts
        fully, as MONAI's ``mode="constant"``); ``window="gaussian"`` weighs the centre of each
        patch more, which hides the seams of a model whose borders are worse than its centre.
        ``reduce="argmax"`` stores labels and never holds the classes x volume scores.
    batch_size : int
        Patches per call of ``fn``.
    pad_batch : bool
        Pad the last batch up to ``batch_size`` (repeating its last patch), for models
        compiled for one batch shape; the extra outputs are dropped.
    margin : int or sequence of int
        For a model that returns only the core of each patch (valid convolutions): the core
        is the patch less ``margin`` voxels on each side, and only cores are merged, so there
        are no seams. The image is padded by ``margin`` (with ``pad_mode``) so that the cores
        tile all of it. ``fn`` may return the core alone or the whole patch (then its core is
        kept).
    scale : number or sequence of numbers
        Output voxels per input voxel along each tiled axis: 2 for super-resolution x2, 1/4
        for an encoder that downsamples by 4. The output and every position are scaled.
    out : array-like, optional
        Where to write the result (ndarray, ``np.memmap``, zarr array, h5py dataset, tensor).
        For a Dask image, a zarr array whose chunks divide the Dask chunks: the tasks write
        into it, on the client in use, and it is returned once written.
    progress : bool, callable or None
        A tqdm bar over patches: shown by default when stderr is a terminal, never with
        ``False``, always with ``True``. A callable gets ``(done, total)`` instead.

    Returns
    -------
    array
        ``out`` if given, else an array of the image's kind: shaped like the image times
        ``scale`` on the tiled axes, with ``fn``'s sizes on the others (the class axis dropped
        for ``"argmax"``).

    Notes
    -----
    Patches are read, batched and blended in grid order, so the accumulator holds only the
    rows of the output that patches are still being added to, about one patch thick along
    the first tiled axis; finished rows are normalised, reduced, cast and written to the
    output at once. Memory: the output (none with ``out=`` on disk), one batch, and that
    accumulator. With a tensor image, ``fn`` runs under ``torch.no_grad()``.

    Examples
    --------
    >>> import numpy as np
    >>> import patchgrid as pg
    >>> image = np.random.default_rng(0).random((1, 40, 50), dtype=np.float32)
    >>> double = pg.apply(lambda b: 2 * b, image, size=16, stride=8, axes=(1, 2))
    >>> bool(np.allclose(double, 2 * image))
    True
    >>> classes = pg.apply(lambda b: np.concatenate([b, 1 - b], axis=1), image, size=16,
    ...                    axes=(1, 2), reduce="argmax")
    >>> classes.shape, classes.dtype
    ((40, 50), dtype('uint8'))
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not hasattr(image, "shape") or not hasattr(image, "__getitem__"):
        image = np.asarray(image)
    xp = backend_of(image)
    shape = tuple(int(s) for s in image.shape)
    if out is not None:
        _check_out(out, image)
    batch_size = _checks.as_int(batch_size, "batch_size")
    if batch_size < 1:
        raise PatchgridError(f"batch_size must be a positive integer, got {batch_size}")
    probe = PatchGrid(shape, size, axes=axes, edge="pad")
    k = len(probe.axes)
    # size, stride, margin and edge follow the order of axes= as given (the grid sorts them).
    order = probe.axes if axes is None else _checks.axes_tuple(axes, len(shape))
    sizes = _checks.per_axis(size, k, "size")
    margins = _checks.per_axis(margin, k, "margin", positive=False)
    core = []
    for a, p, m in zip(order, sizes, margins):
        if m < 0:
            raise PatchgridError(f"margin must be non-negative integers, got {margins}")
        if p - 2 * m < 1:
            raise PatchgridError(
                f"margin {m} leaves no core in a patch of size {p} on axis {a}; the core is "
                f"size - 2 * margin and must be at least 1"
            )
        core.append(p - 2 * m)
    grid = PatchGrid(shape, core, stride, axes=order, edge=edge, pad_mode=pad_mode,
                     pad_value=pad_value)  # fmt: skip
    margins = tuple(margins[order.index(a)] for a in grid.axes)  # in the grid's order
    plain = type(scale) is int and scale == 1
    out_grid = grid if plain else grid.scaled(scale)
    if is_dask(image):
        warn_uncovered(out_grid, fill)
        return _apply_dask(fn, image, grid, out_grid, margins, size, stride, order,
                           dict(edge=edge, pad_mode=pad_mode, pad_value=pad_value, window=window,
                                reduce=reduce, batch_size=batch_size, margin=margin, scale=scale,
                                dtype=dtype, fill=fill, progress=progress), out)  # fmt: skip
    if not len(grid):  # an axis of length 0: fn is never called, the result is empty
        if out is not None:
            return Merger(out_grid, reduce=reduce, window=window, fill=fill, out=out).result()
        dtype_empty = dtype if dtype is not None else xp.dtype(image)
        return xp.empty(out_grid.shape, dtype_empty, image)
    reader = Reader(image, grid, margins, xp)
    tiles = apply_tiles(out, out_grid, reduce)
    on_disk = out is not None and type(out) is not np.ndarray and not is_tensor(out)
    in_shape = reader.patch_shape(shape)
    full = [p * f for p, f in zip(reader.size, _factors(out_grid, grid))]
    step, close = _progress(progress, sum(t.reads for t in tiles) if tiles else len(grid))
    grad: Any = contextlib.nullcontext()
    if xp.name == "torch":
        import torch

        grad = torch.no_grad()
    dtype_in = xp.dtype(image) if xp.name == "torch" else image.dtype

    pool = _Pool((batch_size, *in_shape), dtype_in, xp, image)
    source = _compiled.host(reader.image)
    each = math.prod(in_shape) * source.itemsize if source is not None else 0
    # Large patches of an image in memory (an ndarray, a CPU tensor), cut by the compiled
    # kernel on all cores; padding is read by the gathers below.
    compiled = (
        all(m is None for m in reader.maps)
        and (not on_disk or _compiled.loaded())  # out of core: not worth loading them (Merger)
        and _compiled.takes(source, grid.axes, each, len(grid))
    )
    corners = grid.starts() if compiled else None

    def load(ids: np.ndarray) -> tuple[np.ndarray, Any]:
        rows = (
            ids if not pad_batch else np.concatenate([ids, np.full(batch_size - len(ids), ids[-1])])
        )
        batch = pool.take() if len(rows) == batch_size else None
        if batch is None:
            batch = xp.empty((len(rows), *in_shape), dtype_in, image)
        if corners is not None and source is not None:
            into = _compiled.host(batch)
            if into is not None and _compiled.gather(into, source, corners[rows]):
                return ids, batch
        done = np.zeros(len(rows), dtype=bool)
        last = grid.axes[-1]
        # A stretch of a row in one read: for small patches (no Python step per patch), and for
        # lazy images (a file's chunks decoded once for the stretch, not once per patch).
        small = xp.nbytes(batch) // max(len(rows), 1) < RUN_BYTES
        stretch = small or not (isinstance(reader.image, np.ndarray) or is_tensor(reader.image))
        for b0, b1 in row_runs(rows, grid.counts[-1]) if stretch else []:
            # A stretch of one row: one read, cut into patches as strided views.
            block, offsets = reader.read_run(int(rows[b0]), b1 - b0)
            for r0, count, start, step in _strided.runs(offsets.tolist(), reader.size[-1]):
                view = _strided.window_view(block, [last], [start], [step], [count],
                                            [reader.size[-1]], xp)  # fmt: skip
                _strided.copy(batch[b0 + r0 : b0 + r0 + count], view, 1, xp)
            done[b0:b1] = True
        for i in np.flatnonzero(~done).tolist():
            _copy_patch(batch[i], reader.read(int(rows[i])), xp)
        return ids, batch

    def run(merger: Merger, ids: np.ndarray, local: np.ndarray) -> Any:
        batches = map(load, (ids[i : i + batch_size] for i in range(0, len(ids), batch_size)))
        # A reader thread helps NumPy; once torch is loaded, its fused adds already use the
        # cores, and the thread only costs memory.
        ahead = xp is NUMPY and sys.modules.get("torch") is None and not compiled
        at = 0
        for ids_, batch in _prefetch(batches) if ahead else batches:
            result = fn(batch)
            result = _check_output(result, batch, xp, out_grid, full, fn)
            merger.add(_core(result[: len(ids_)], out_grid, full), local[at : at + len(ids_)])
            at += len(ids_)
            step(len(ids_))
        return merger.result()

    try:
        with grad, _memory.bound(image, out) if on_disk else contextlib.nullcontext():
            if not tiles:
                everything = np.arange(len(grid))
                kind = DiskMerger if on_disk else Merger
                merger = kind(out_grid, reduce=reduce, window=window, fill=fill, dtype=dtype,
                              out=out)  # fmt: skip
                return run(merger, everything, everything)
            a0 = out_grid.axes[0]
            warn_uncovered(out_grid, fill, stacklevel=4)
            for tile in tiles:
                if tile.empty:  # no patch reaches this tile
                    axis = tile.out_axis[a0]
                    tile.fill(out, axis, out_grid.stride[0], fill, dtype or out.dtype)
                    continue
                assert tile.grid is not None
                merger = TileMerger(tile.grid, reduce=reduce, window=window, fill=fill,
                                    dtype=dtype, out=tile.sink(out))  # fmt: skip
                run(merger, *tile.ids())
                _memory.release_memory()
            return out
    finally:
        close()


def _check_out(out: Any, image: Any) -> None:
    """``out=`` before any work: an array that takes slice assignment, writeable, and apart
    from the image (writing into the image while reading it would corrupt both)."""
    if not all(hasattr(out, n) for n in ("shape", "dtype", "__setitem__")) or isinstance(
        out, (list, tuple)
    ):
        raise TypeError(
            f"out must be an array with shape, dtype and slice assignment (an ndarray, memmap, "
            f"zarr array, h5py dataset or tensor), got {type(out).__name__}"
        )
    if (isinstance(out, np.ndarray) and not out.flags.writeable) or getattr(
        out, "read_only", False
    ):
        raise PatchgridError(
            f"out is read-only ({type(out).__name__}); give a writeable array (for a file, "
            f"open it for writing)"
        )
    if out is image or shares_memory(out, image):
        raise PatchgridError(
            "out shares memory with the image: apply reads the image while it writes the "
            "result, so the two must be apart; give a new array (or a copy of the image)"
        )


def _apply_dask(
    fn: Callable[[Any], Any], image: Any, grid: PatchGrid, out_grid: PatchGrid,
    margins: Sequence[int], size: Any, stride: Any, axes: Sequence[int], kw: dict[str, Any],
    out: Any,
) -> Any:  # fmt: skip
    """apply on a Dask array: a lazy Dask array, or the result written into ``out`` (zarr)."""
    from .dask import apply_dask

    padded = any(m for m in margins) or any(after for _, after in grid.pad_width)
    if padded and grid.pad_mode not in INDEX_MODES:
        raise PatchgridError(
            f"pad_mode={grid.pad_mode!r} needs the whole image; with a Dask image use one of "
            f"{INDEX_MODES}"
        )
    # fn's output over one corner patch tells the result's dtype and the sizes of free axes.
    corner = [slice(None)] * grid.ndim
    for a, p in zip(grid.axes, PatchGrid(grid.shape, size, axes=axes, edge="pad").size):
        corner[a] = slice(0, min(p, grid.shape[a]))
    sample = np.asarray(image[tuple(corner)])
    edge = "pad" if sample.shape != grid.shape else kw["edge"]
    probe = apply(fn, sample, size, stride, axes=axes, pad_batch=True,
                  **{**kw, "edge": edge, "progress": False})  # fmt: skip
    # As in memory: the result takes dtype=, else out's dtype, else fn's (cast by rounding).
    dtype = kw["dtype"] if kw["dtype"] is not None else getattr(out, "dtype", probe.dtype)
    return apply_dask(fn, image, grid, out_grid, margins, window=kw["window"],
                      reduce=kw["reduce"], batch_size=kw["batch_size"], dtype=dtype,
                      fill=kw["fill"], probe=probe, out=out, progress=kw["progress"])  # fmt: skip


def _factors(out_grid: PatchGrid, grid: PatchGrid) -> list[float]:
    return [po / pi for po, pi in zip(out_grid.size, grid.size)]


def _core(result: Any, out_grid: PatchGrid, full: Sequence[float]) -> Any:
    """The core of whole patches (a model that returns the margin too)."""
    crop: list[Any] = [slice(None)] * result.ndim
    cut = False
    for a, p, f in zip(out_grid.axes, out_grid.size, full):
        if result.shape[a + 1] != p:
            m = (int(f) - p) // 2
            crop[a + 1] = slice(m, m + p)
            cut = True
    return result[tuple(crop)] if cut else result


def _check_output(
    result: Any, batch: Any, xp: Backend, out_grid: PatchGrid, full: Sequence[float], fn: Any
) -> Any:
    """fn's output as an array of the right kind and shape, or a ValueError that shows both."""
    name = getattr(fn, "__name__", type(fn).__name__)
    if xp.name == "torch":
        if not is_tensor(result):
            raise PatchgridError(
                f"fn ({name}) must return a tensor for a tensor image, got {type(result).__name__}"
            )
    else:
        if not (isinstance(result, np.ndarray) or hasattr(result, "__array__")):
            raise PatchgridError(f"fn ({name}) must return an array, got {type(result).__name__}")
        result = np.asarray(result)
    kind = xp.kind(result.dtype) if xp.name == "torch" else result.dtype.kind
    if kind not in "biufc":
        raise PatchgridError(
            f"fn ({name}) returned an array of dtype {result.dtype}; it must return numbers "
            f"(bool, integer, float or complex)"
        )
    if xp.name == "torch" and result.requires_grad:
        raise PatchgridError(
            f"fn ({name}) returned a tensor that requires grad; apply runs fn under "
            f"torch.no_grad(): return result.detach(), or do not enable grad inside fn"
        )
    shape = tuple(result.shape)
    core = list(out_grid.size)
    ok = len(shape) == batch.ndim and shape[0] == batch.shape[0]
    if ok:
        for a, p, f in zip(out_grid.axes, core, full):
            whole = float(f).is_integer() and shape[a + 1] == int(f)
            ok = ok and (shape[a + 1] == p or whole)
    if not ok:
        spatial = {a: p for a, p in zip(out_grid.axes, core)}
        expected = (batch.shape[0], *[spatial.get(a, "*") for a in range(batch.ndim - 1)])
        whole = ""
        if any(int(f) != p for p, f in zip(core, full)):
            whole = f", or the whole patch {tuple(int(f) for f in full)} on the tiled axes"
        raise PatchgridError(
            f"fn ({name}) returned shape {shape} for a batch of shape {tuple(batch.shape)}; "
            f"expected {expected} (* is free){whole}"
        )
    return result
