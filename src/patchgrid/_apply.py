"""Layer L4: apply(), running a function over every patch and blending the outputs back.

What lives here: :func:`apply` and the choice it makes once per call: the geometry (the grid
of the patches' cores and their margins), in memory, in tiles across the plane
(:mod:`patchgrid._tiled`) or on Dask; the batches (:mod:`patchgrid._batches`) run into a
:class:`~patchgrid.Merger`.

Imports: NumPy and the layers below; ``dask`` (L3) only inside :func:`apply`, for a Dask image.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

import numpy as np

from . import _checks, _memory, _resume
from ._batches import Batches, check_output, core_of
from ._checks import PatchgridError
from ._device import Upload, model_device
from ._finish import OutputSpec, warn_uncovered
from ._mask import kept
from ._memory import shares_memory
from ._merge import DiskMerger, HostMerger, Merger
from ._progress import steps
from ._regions import INDEX_MODES, Reader
from ._tiled import TileMerger, apply_tiles
from ._tta import flip_sets, with_flips
from .backends import ArrayT, backend_of, in_memory, is_dask
from .grid import PatchGrid, check_unchosen_axes, tiled_axes, with_leading_axis

__all__ = ["apply"]

Progress = Callable[[int, int], Any]
#: Whatever ``out=`` is (ndarray, memmap, zarr, h5py, tensor): returned as it is.
OutT = TypeVar("OutT")


@overload
def apply(
    fn: Callable[[np.ndarray], Any],
    image: np.ndarray,
    size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    *,
    overlap: float | Sequence[float] | None = None,
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
    out: None = None,
    progress: bool | Progress | None = None,
    batched: bool = False,
    device: Any = None,
    tta: Any = None,
    mask: Any = None,
    resume: bool = False,
    shard: Any = None,
) -> np.ndarray: ...
@overload
def apply(
    fn: Callable[[ArrayT], ArrayT],
    image: ArrayT,  # a tensor in, a tensor out
    size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    *,
    overlap: float | Sequence[float] | None = None,
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
    out: None = None,
    progress: bool | Progress | None = None,
    batched: bool = False,
    device: Any = None,
    tta: Any = None,
    mask: Any = None,
    resume: bool = False,
    shard: Any = None,
) -> ArrayT: ...
@overload
def apply(
    fn: Callable[[np.ndarray], Any],
    image: Any,  # zarr, HDF5, memmap, pg.open images: batches and result in NumPy
    size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    *,
    overlap: float | Sequence[float] | None = None,
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
    out: None = None,
    progress: bool | Progress | None = None,
    batched: bool = False,
    device: Any = None,
    tta: Any = None,
    mask: Any = None,
    resume: bool = False,
    shard: Any = None,
) -> np.ndarray: ...
@overload
def apply(
    fn: Callable[[Any], Any],
    image: Any,
    size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    *,
    overlap: float | Sequence[float] | None = None,
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
    out: OutT,  # out= is returned
    progress: bool | Progress | None = None,
    batched: bool = False,
    device: Any = None,
    tta: Any = None,
    mask: Any = None,
    resume: bool = False,
    shard: Any = None,
) -> OutT: ...
def apply(
    fn: Callable[[Any], Any],
    image: Any,
    size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    *,
    overlap: float | Sequence[float] | None = None,
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
    batched: bool = False,
    device: Any = None,
    tta: Any = None,
    mask: Any = None,
    resume: bool = False,
    shard: Any = None,
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
    overlap : float or sequence of float, optional
        Instead of ``stride``, the share of a patch's core that its neighbours cover, in
        ``[0, 1)``: the stride is ``max(int(core * (1 - overlap)), 1)`` per axis, MONAI's
        ``overlap`` (with ``margin=0`` the core is the patch, and the patches sit where
        MONAI's ``sliding_window_inference`` puts them).
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
    batched : bool
        Axis 0 of the image is a batch of images, as MONAI's ``(B, C, *spatial)``: ``fn``
        sees batches ``(n, C, *patch)`` and the result is ``(B, C_out, *spatial)``, each image
        merged as if it were given alone. ``axes`` counts the image's axes (axis 0 is never
        tiled); without it, an int ``size`` tiles the spatial axes (2 and on, as in MONAI's
        layout), a sequence the last ones; ``size``, ``stride`` and the rest are per tiled
        axis as usual.
    device : str or torch.device, optional
        Run ``fn`` on this torch device (``"cuda"``) over an image in host memory or on disk
        (an ndarray, memmap, zarr or HDF5 array, ``pg.open`` image, CPU tensor): batches are
        read on the host into page-locked buffers and sent without blocking while the model
        runs on the previous one; ``fn`` takes and returns tensors on the device, where the
        outputs are blended; finished rows come back to the result (an array of the image's
        kind, in host memory) or to ``out=``, so a volume larger than host memory streams
        from disk to disk through the GPU. Needs torch (``pip install 'patchgrid[torch]'``).
    tta : None, "flips" or list of axis sets
        Test-time flips (nnU-Net's mirroring): ``"flips"`` averages ``fn``'s outputs over
        every mirroring of the tiled axes (8 for three), a list over the axis sets it names
        (the unflipped output always counts, once). The flipped copies go through ``fn`` in
        the same calls as other patches, never more than ``batch_size`` at a time; each output
        is flipped back and averaged (in float64) before blending. A model whose output flips
        with its input gives the plain result.
    mask : array-like or callable, optional
        Which patches to run: a boolean or weight map (foreground ``> 0``) at the image's shape
        along the tiled axes, or coarser by an integer factor per axis (a pyramid level;
        ``coarse_mask`` makes one from a lazy image without reading it whole), or a callable on
        one input patch. Patches with no foreground in their core are never given to ``fn``;
        voxels that no patch run covers get ``fill``. Foreground voxels get what they get
        without the mask: every patch over them runs. A Dask image takes an array mask.
    resume : bool
        With ``out=`` a zarr array in a folder: record in it, as rows of output chunks are
        written (after their data), how far the run got; a run with ``resume=True`` starts
        where the record says and computes only what was not finished, giving the voxels of one
        uninterrupted run bit for bit. A record made with other settings is refused.
    shard : (int, int), optional
        ``(i, n)``: this process writes only the ``i``-th of ``n`` ranges of whole rows of
        output chunks (along the first tiled axis) of ``out=``; ``n`` processes, at once or one
        after another, give the one-process result. Patches that reach two ranges run in both.
        With ``resume`` or ``shard``, a Dask image is read here region by region (each region
        computed by Dask), not run as a graph.

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
    accumulator. With a tensor image, ``fn`` runs under ``torch.no_grad()``; where it runs out of
    CUDA memory on a batch of more than one patch, the batch is halved (with a warning) and the
    run goes on, with the result the smaller batch gives.

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
    kw = dict(overlap=overlap, axes=axes, edge=edge, pad_mode=pad_mode, pad_value=pad_value,
              window=window, reduce=reduce, batch_size=batch_size, pad_batch=pad_batch,
              margin=margin, scale=scale, dtype=dtype, fill=fill, device=device,
              tta=tta, mask=mask, resume=resume, shard=shard)  # fmt: skip
    if batched:
        return _apply_batched(fn, image, size, stride, kw, out, progress)
    image, where, host = _placed(image, device, mask, resume or shard is not None)
    xp = backend_of(host)
    shape = tuple(int(s) for s in image.shape)
    if out is not None:
        _check_out(out, image)
    batch_size = _positive(batch_size, "batch_size")
    order, margins, grid = _layout(shape, size, stride, axes, edge, pad_mode, pad_value,
                                   margin, overlap)  # fmt: skip
    stride = tuple(grid.stride[grid.axes.index(a)] for a in order)  # overlap= made it too
    sets = flip_sets(tta, len(shape), grid.axes)
    fn = with_flips(fn, sets, grid.axes, batch_size) if len(sets) > 1 else fn  # their mean
    plain = type(scale) is int and scale == 1
    out_grid = grid if plain else grid.scaled(scale)
    if is_dask(image):
        warn_uncovered(out_grid, fill)
        return _apply_dask(fn, image, grid, out_grid, margins, size, stride, order,
                           dict(edge=edge, pad_mode=pad_mode, pad_value=pad_value, window=window,
                                reduce=reduce, batch_size=batch_size, margin=margin, scale=scale,
                                dtype=dtype, fill=fill, progress=progress), out,
                           None if mask is None else kept(mask, grid, margins))  # fmt: skip
    if not len(grid):  # an axis of length 0: fn is never called, the result is empty
        return _empty(image, out, out_grid, dict(reduce=reduce, window=window, fill=fill), dtype)
    upload = None if where is None else Upload(where)
    reader = Reader(host, grid, margins, xp)
    batches = Batches(fn, host, reader, grid, out_grid, batch_size, pad_batch, xp,
                      out is not None and not in_memory(out, plain=True), upload)  # fmt: skip
    merge_kw = dict(reduce=reduce, window=window, fill=fill, dtype=dtype)
    keep = None
    if mask is not None:
        keep = kept(mask, grid, margins, reader if callable(mask) else None)
        if not keep.any():  # no foreground: fn is never called
            return _all_fill(image, out, out_grid, fill, dtype, xp.dtype(host))
    if resume or shard is not None:
        return _resume.run_part(batches, out_grid, out, merge_kw, progress, keep,
                         dict(margin=margins, scale=str(scale), tta=repr(tta),
                              mask=mask is not None), resume, shard)  # fmt: skip
    result = _run(batches, out_grid, out, merge_kw, progress, keep)
    if out is None and host is not image:  # a CPU tensor read on the host: a tensor back
        result = backend_of(image).from_any(result)
    return result


def _positive(value: Any, name: str) -> int:
    """``value`` as an int of at least 1, or an error naming ``name``."""
    number = _checks.as_int(value, name)
    if number < 1:
        raise PatchgridError(f"{name} must be a positive integer, got {number}")
    return number


def _empty(image: Any, out: Any, out_grid: PatchGrid, merge_kw: dict[str, Any],
           dtype: Any) -> Any:  # fmt: skip
    """The result over a grid without patches: ``out`` as a Merger leaves it, or an empty
    array of the image's kind (its dtype unless ``dtype`` says)."""
    if out is not None:
        return Merger(out_grid, out=out, **merge_kw).result()
    xp = backend_of(image)
    return xp.empty(out_grid.shape, dtype if dtype is not None else xp.dtype(image), image)


def _placed(image: Any, device: Any, mask: Any, part: bool) -> tuple[Any, Any, Any]:
    """The image as apply reads it (a Dask image run in parts: region by region here), the
    model's device (None: the image's), and the image as a host array to read batches from."""
    if is_dask(image) and part:
        image = _Computed(image)  # read region by region here, each computed by Dask
    where, host = model_device(image, device)
    if is_dask(image):
        _dask_takes(mask, where, device)
    return image, where, host


class _Computed:
    """A Dask image read as a lazy one, region by region, each region computed by Dask:
    ``resume=`` and ``shard=`` run in this process, over the rows their part needs."""

    def __init__(self, image: Any) -> None:
        self.image, self.shape, self.dtype = image, tuple(image.shape), image.dtype
        self.chunks = tuple(c[0] for c in image.chunks)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.image[key])


def _dask_takes(mask: Any, where: Any, device: Any) -> None:
    """Refuse what a Dask image does not take: a callable ``mask=``, ``device=`` for a host
    image."""
    if callable(mask):
        raise PatchgridError(
            "a callable mask= reads every patch; with a Dask image give the mask as an array "
            "(pg.coarse_mask(image, factor, threshold) makes one chunk by chunk)"
        )
    if where is not None:
        raise PatchgridError(
            f"device={device!r} reads a host image in batches for a model on the device; a Dask "
            f"image runs fn in its tasks: move each batch to the device inside fn instead"
        )


def _run(batches: Batches, out_grid: PatchGrid, out: Any, merge_kw: dict[str, Any],
         progress: Any, keep: np.ndarray | None = None) -> Any:  # fmt: skip
    """Every batch through the model into one Merger, or tile by tile across the plane for an
    ``out`` on disk too wide for one slab; only the patches ``keep`` says (a mask), if given."""
    tiles = apply_tiles(out, out_grid, merge_kw["reduce"])
    on_disk = out is not None and not in_memory(out, plain=True)  # a memmap is on disk
    every = np.arange(len(out_grid))
    none = every[:0]
    runs = [(none, none) if t.empty else t.ids() for t in tiles] if tiles else [(every, every)]
    if keep is not None:
        runs = [(ids[keep[ids]], local[keep[ids]]) for ids, local in runs]
    step, close = steps(progress, sum(len(ids) for ids, _ in runs), "patchgrid.apply")
    partial = keep is not None  # voxels no patch run covers get fill
    image = batches.image
    try:
        with batches.model_xp.no_grad(), (_memory.bound(image, out) if on_disk else
                                           contextlib.nullcontext()):  # fmt: skip
            if not tiles:
                host = batches.upload is not None and out is None
                kind = DiskMerger if on_disk else HostMerger if host else Merger
                ids, local = runs[0]
                return batches.run(kind(out_grid, out=out, **merge_kw), ids, local, step, partial)
            a0 = out_grid.axes[0]
            warn_uncovered(out_grid, merge_kw["fill"], stacklevel=5)
            for tile, (ids, local) in zip(tiles, runs):
                if tile.empty or not len(ids):  # no patch reaches (or runs in) this tile
                    axis = tile.out_axis[a0]
                    tile.fill(out, axis, out_grid.stride[0], merge_kw["fill"],
                              merge_kw["dtype"] or out.dtype)  # fmt: skip
                    continue
                assert tile.grid is not None
                batches.run(TileMerger(tile.grid, out=tile.sink(out), **merge_kw), ids, local,
                            step, partial)  # fmt: skip
                _memory.release_memory()
            return out
    finally:
        close()


class _Advance:
    """A ``progress`` callable for one image of a batch of images: it advances the bar of the
    whole batch by what that image's run has done since its last call."""

    def __init__(self, step: Callable[[int], Any]) -> None:
        self.step, self.done = step, 0

    def __call__(self, done: int, total: int) -> None:
        self.step(done - self.done)
        self.done = done


class _Item:
    """Image ``i`` of an array that cannot be sliced into a view (zarr, HDF5, ``pg.open``
    images): what ``apply`` reads comes from ``array[i, ...]`` region by region, and what it
    writes goes there."""

    def __init__(self, out: Any, i: int) -> None:
        self.out, self.i = out, i
        self.shape = tuple(out.shape[1:])
        self.dtype = out.dtype
        chunks = getattr(out, "chunks", None)
        if isinstance(chunks, tuple) and len(chunks) == len(out.shape):
            self.chunks = chunks[1:]

    def _key(self, key: Any) -> tuple[Any, ...]:
        return (self.i, *(key if isinstance(key, tuple) else (key,)))

    def __getitem__(self, key: Any) -> Any:
        return self.out[self._key(key)]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.out[self._key(key)] = value


def _apply_batched(fn: Callable[[Any], Any], image: Any, size: Any, stride: Any,
                   kw: dict[str, Any], out: Any, progress: Any) -> Any:  # fmt: skip
    """apply with ``batched=True``: each image of axis 0 through :func:`apply` with the same
    arguments, into one result ``(B, ...)`` (or ``out[i]``), one progress bar for all."""
    shape = tuple(int(n) for n in image.shape)
    if len(shape) < 2:
        raise PatchgridError(
            f"batched=True takes axis 0 of the image as a batch of images and needs at least "
            f"one more axis; got an image of shape {shape}"
        )
    if kw["axes"] is not None:
        axes = _checks.axes_tuple(kw["axes"], len(shape))
        if 0 in axes:
            raise PatchgridError(
                f"batched=True takes axis 0 as the batch of images, never tiled; axes="
                f"{kw['axes']!r} names it (count the image's axes, the batch axis included)"
            )
        kw["axes"] = tuple(a - 1 for a in axes)
    elif not isinstance(size, (Sequence, np.ndarray)):  # MONAI's layout: the spatial axes
        if len(shape) < 3:
            raise PatchgridError(
                f"batched=True with an int size tiles the axes after (B, C); an image of shape "
                f"{shape} has none: give size per axis, or axes="
            )
        kw["axes"] = tuple(range(1, len(shape) - 1))
    if out is not None:
        if len(getattr(out, "shape", ())) < 1 or out.shape[0] != shape[0]:
            raise PatchgridError(
                f"out must have the batch of {shape[0]} images on axis 0, got shape "
                f"{tuple(getattr(out, 'shape', ()))}"
            )
        if is_dask(image):
            raise PatchgridError(
                "batched=True with a Dask image gives a lazy array; store it yourself "
                "(result.to_zarr(...)) rather than passing out="
            )
    one = _layout(shape[1:], size, stride, kw["axes"], kw["edge"], kw["pad_mode"],
                  kw["pad_value"], kw["margin"], kw["overlap"])[2]  # fmt: skip
    scale = kw["scale"]
    out_one = one if type(scale) is int and scale == 1 else one.scaled(scale)
    if not shape[0]:  # no image: fn is never called, as for an empty grid
        return _no_images(image, out, out_one.shape, kw["dtype"])
    per_image = len(one)
    if out is not None:  # written tile by tile: patches at tile borders are read twice
        tiles = apply_tiles(out[0] if in_memory(out) else _Item(out, 0), out_one, kw["reduce"])
        per_image = sum(t.reads for t in tiles) if tiles else per_image
    step, close = steps(progress, shape[0] * per_image, "patchgrid.apply")
    results: list[Any] = []
    whole: Any = out
    lazy = not in_memory(image) and not is_dask(image)  # read per image, region by region
    try:
        for i in range(shape[0]):
            into: Any = None
            if whole is not None:
                into = whole[i] if in_memory(whole) else _Item(whole, i)
            source = _Item(image, i) if lazy else image[i]
            mask = kw["mask"]  # a mask per image, unless a callable
            each = kw if mask is None or callable(mask) else {**kw, "mask": mask[i]}
            done: Any = apply(fn, source, size, stride, out=into, progress=_Advance(step),
                              **each)  # fmt: skip
            if whole is None and not is_dask(image):  # the first result says shape and dtype
                xr = backend_of(done)
                whole = xr.empty((shape[0], *done.shape), xr.dtype(done), done)
                xr.assign(whole[0], done)
            if is_dask(image):
                results.append(done)
    finally:
        close()
    if is_dask(image):
        import dask.array as da

        return da.stack(results)
    return whole


def _all_fill(image: Any, out: Any, out_grid: PatchGrid, fill: Any, dtype: Any,
              image_dtype: Any) -> Any:  # fmt: skip
    """The result where a mask runs no patch: ``fill`` everywhere, in ``out`` or a new array of
    the image's kind (its shape, and its dtype unless ``dtype`` says)."""
    if out is not None:
        out[...] = fill
        return out
    xp = backend_of(image)
    result = xp.empty(out_grid.shape, dtype if dtype is not None else image_dtype, image)
    xp.assign(result, fill)
    return result


def _no_images(image: Any, out: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """The result of ``batched=True`` over a batch of no images: ``out``, or an empty array of
    the image's kind (in the image's dtype unless ``dtype`` says)."""
    if out is not None:
        return out
    if is_dask(image):
        import dask.array as da

        return da.empty((0, *shape), dtype=dtype or image.dtype)
    xp = backend_of(image)
    return xp.empty((0, *shape), dtype if dtype is not None else xp.dtype(image), image)


def _layout(shape: tuple[int, ...], size: Any, stride: Any, axes: Any, edge: Any, pad_mode: Any,
            pad_value: Any, margin: Any, overlap: Any = None) -> tuple[tuple[int, ...],
                                                                    tuple[int, ...],
                                                                    PatchGrid]:  # fmt: skip
    """The tiled axes in the order given, the margins in the grid's order, and the grid of
    the patches' cores."""
    # size, stride, margin and edge follow the order of axes= as given (the grid sorts them).
    order = tiled_axes(shape, size, None, axes)
    k = len(order)
    sizes = _checks.per_axis(size, k, "size")
    if axes is None and not isinstance(size, (Sequence, np.ndarray)):
        check_unchosen_axes(shape, sizes[0], order, ("pad",) * k)
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
    if overlap is not None:
        stride = _stride_of(overlap, core, stride)
    grid = PatchGrid(shape, core, stride, axes=order, edge=edge, pad_mode=pad_mode,
                     pad_value=pad_value)  # fmt: skip
    return order, tuple(margins[order.index(a)] for a in grid.axes), grid


def _stride_of(overlap: Any, core: Sequence[int], stride: Any) -> tuple[int, ...]:
    """The stride that ``overlap`` (a share of each core, in [0, 1)) means: MONAI's
    ``int(roi * (1 - overlap))``, at least 1."""
    if stride is not None:
        raise PatchgridError(
            f"give stride or overlap, not both (got stride={stride!r}, overlap={overlap!r})"
        )
    k = len(core)
    many = isinstance(overlap, (Sequence, np.ndarray)) and not isinstance(overlap, str)
    values = list(overlap) if many else [overlap] * k
    if len(values) != k:
        raise PatchgridError(f"overlap has {len(values)} entries for {k} tiled axes")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"overlap must be a number in [0, 1), got {v!r}")
        if not 0 <= float(v) < 1:
            raise PatchgridError(f"overlap must be in [0, 1), got {v!r}")
    return tuple(max(int(c * (1 - float(v))), 1) for c, v in zip(core, values))


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
    xo = backend_of(out)
    if (xo.owns(out) and not xo.writeable(out)) or getattr(out, "read_only", False):
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
    out: Any, keep: np.ndarray | None = None,
) -> Any:  # fmt: skip
    """apply on a Dask array: a lazy Dask array, or the result written into ``out`` (zarr);
    ``keep`` (from a mask) says which patches run."""
    from .dask import apply_dask

    padded = any(m for m in margins) or any(after for _, after in grid.pad_width)
    if padded and grid.pad_mode not in INDEX_MODES:
        raise PatchgridError(
            f"pad_mode={grid.pad_mode!r} needs the whole image; with a Dask image use one of "
            f"{INDEX_MODES}"
        )
    sample = probe(fn, image, size, stride, axes=axes, pad_batch=True, **kw)
    labels_of_added = kw["reduce"] == "argmax" and len(grid.axes) == image.ndim
    if sample.ndim == image.ndim + 1 or labels_of_added:
        # The model adds a class or channel axis in front: the tasks see the image with an
        # axis of length 1 there, which fn never sees, and fn's axis takes its place.
        image, grid, out_grid = image[None], with_leading_axis(grid), with_leading_axis(out_grid)
        fn = _behind_axis(fn)
    # As in memory: the result takes dtype=, else out's dtype, else fn's (cast by rounding).
    dtype = kw["dtype"] if kw["dtype"] is not None else getattr(out, "dtype", sample.dtype)
    return apply_dask(fn, image, grid, out_grid, margins, window=kw["window"],
                      reduce=kw["reduce"], batch_size=kw["batch_size"], dtype=dtype,
                      fill=kw["fill"], probe=sample, out=out, progress=kw["progress"],
                      keep=keep)  # fmt: skip


def _behind_axis(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``fn`` over batches of an image given an axis of length 1 in front, which it never
    sees (its output puts its own axis there)."""

    @functools.wraps(fn)
    def call(batch: Any) -> Any:
        return fn(batch[:, 0])

    return call


class Replay:
    """``fn``, except that its first call on one given batch returns an output already
    computed for that batch: the command line sizes its output from the first batch and then
    runs the whole image without calling the model on that batch twice. Any other batch (or
    the same one a second time) goes to ``fn``."""

    def __init__(self, fn: Callable[[Any], Any], batch: Any, output: Any) -> None:
        self.fn, self.__name__ = fn, getattr(fn, "__name__", type(fn).__name__)
        self._kept: tuple[Any, Any] | None = (batch, output)

    def __call__(self, batch: Any) -> Any:
        kept, self._kept = self._kept, None
        if kept is not None and _same(kept[0], batch):
            return kept[1]
        return self.fn(batch)


def _same(a: Any, b: Any) -> bool:
    """Whether two batches hold the same values (NaN equal to NaN), of one kind and shape."""
    if type(a) is not type(b) or tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
        return False
    x, y = backend_of(a).to_numpy(a), backend_of(b).to_numpy(b)
    return bool(np.array_equal(x, y, equal_nan=x.dtype.kind in "fc"))


def first_batch(fn: Callable[[Any], Any], image: Any, size: Any, stride: Any = None, *,
                axes: Any = None, **kw: Any) -> tuple[OutputSpec, Replay]:  # fmt: skip
    """What :func:`apply` with these arguments makes, told by ``fn``'s output on the first
    batch (its shape and dtypes, as the merge will make them: the output spec), and ``fn``
    wrapped so that apply's own first call on that batch is not run twice (:class:`Replay`).

    The batch is read from ``image`` as apply reads it (only the region it needs).
    """
    shape = tuple(int(n) for n in image.shape)
    _, margins, grid = _layout(shape, size, stride, axes, kw.get("edge", "shift"),
                               kw.get("pad_mode", "constant"), kw.get("pad_value", 0),
                               kw.get("margin", 0), kw.get("overlap"))  # fmt: skip
    scale = kw.get("scale", 1)
    out_grid = grid if type(scale) is int and scale == 1 else grid.scaled(scale)
    xp = backend_of(image)
    batches = Batches(fn, image, Reader(image, grid, margins, xp), grid, out_grid,
                      kw.get("batch_size", 4), kw.get("pad_batch", False), xp, True)  # fmt: skip
    ids, batch = batches.load(np.arange(min(batches.batch_size, len(grid))))
    batch = xp.copy(batch)  # the batch buffers are used again
    with xp.no_grad():
        output = fn(batch)
    result = check_output(output, batch, xp, out_grid, batches.full, fn)
    merger = Merger(out_grid, reduce=kw.get("reduce", "mean"), window=kw.get("window"),
                    fill=kw.get("fill", 0), dtype=kw.get("dtype"))  # fmt: skip
    spec = merger.output_spec(core_of(result[: len(ids)], out_grid, batches.full))
    return spec, Replay(fn, batch, output)


def probe(fn: Callable[[Any], Any], image: Any, size: Any, stride: Any = None, *,
          axes: Any = None, **kw: Any) -> Any:  # fmt: skip
    """``fn``'s result over one patch-sized corner of ``image`` (read into memory), by
    :func:`apply` with the same arguments: it tells the output's dtype and the sizes ``fn``
    gives the axes it does not tile, before any work on the whole image (apply on Dask, the
    command line).

    A corner cut from a larger image is padded, never shifted, where ``fn`` needs more.
    """
    shape = tuple(int(n) for n in image.shape)
    order = tiled_axes(shape, size, None, axes)
    corner: list[slice] = [slice(None)] * len(shape)
    for a, p in zip(order, _checks.per_axis(size, len(order), "size")):
        corner[a] = slice(0, min(p, shape[a]))
    sample = np.asarray(image[tuple(corner)])
    cut = {"edge": "pad"} if sample.shape != shape else {}
    return apply(fn, sample, size, stride, axes=order, **{**kw, **cut, "progress": False})
