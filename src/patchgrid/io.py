"""Files: lazy reading of regions and atomic writing, with voxel spacing and affine.

Formats, by extension: ``.npy`` (memory-mapped), ``.nii``/``.nii.gz`` (nibabel), ``.tif``/
``.tiff`` (tifffile, memory-mapped where the file allows), ``.zarr`` (zarr), ``.h5``/``.hdf5``
(h5py; ``file.h5:dataset``). Each library is imported only when its format is used.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from ._checks import PatchgridError

__all__ = ["Image", "open", "save", "tune_allocator"]

FORMATS = {
    ".npy": "npy",
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".zarr": "zarr",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
}
EXTRA = {"nifti": "nibabel", "tiff": "tifffile", "zarr": "zarr", "hdf5": "h5py"}


def _need(module: str) -> Any:
    """Import an optional library, or say which extra brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise PatchgridError(
            f"this file format needs {module}, which is not installed: pip install "
            f"'patchgrid[io]' (or pip install {module})"
        ) from None


def split_path(path: str | os.PathLike[str]) -> tuple[str, str, str | None]:
    """``(file, format, dataset)`` for a path such as ``scan.nii.gz`` or ``data.h5:/raw``."""
    text = os.fspath(path)
    dataset = None
    lower = text.lower()
    for ext in (".h5:", ".hdf5:"):
        at = lower.rfind(ext)
        if at >= 0:
            dataset = text[at + len(ext) :]
            text = text[: at + len(ext) - 1]
            lower = text.lower()
            break
    stripped = lower.rstrip("/\\")
    for ext in sorted(FORMATS, key=len, reverse=True):
        if stripped.endswith(ext):
            return text.rstrip("/\\") if ext == ".zarr" else text, FORMATS[ext], dataset
    known = ", ".join(sorted(FORMATS))
    raise PatchgridError(
        f"cannot tell the format of {os.fspath(path)!r}: known extensions are {known}"
    )


class Image:
    """A lazy image in a file: shape, dtype, slicing that reads only the region asked for.

    Made by :func:`open`. ``np.asarray(img)`` reads the whole image. ``spacing`` is the voxel
    size per axis (1.0 where the file says nothing), ``affine`` the 4 x 4 voxel-to-world
    matrix of a NIfTI file (None for the other formats unless one was saved with them).
    """

    def __init__(
        self,
        data: Any,
        path: str,
        fmt: str,
        spacing: Sequence[float],
        affine: np.ndarray | None,
        meta: dict[str, Any],
        closer: Any = None,
    ) -> None:
        self._data = data
        self.path = path
        self.format = fmt
        self.shape = tuple(int(s) for s in data.shape)
        self.dtype = np.dtype(meta.pop("dtype", None) or data.dtype)
        self.spacing = tuple(float(s) for s in spacing)
        self.affine = None if affine is None else np.asarray(affine, dtype=np.float64)
        self.meta = meta
        self._closer = closer

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return int(self.size * self.dtype.itemsize)

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return np.asarray(self._data[key], dtype=self.dtype)
        except (IndexError, TypeError):
            raise
        except Exception as exc:  # a truncated or corrupt file, in whichever library's words
            raise PatchgridError(
                f"cannot read {self.path!r} as {self.format}: {type(exc).__name__}: {exc}"
            ) from None

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[(slice(None),) * self.ndim] if self.ndim else np.asarray(self._data[()])
        return whole if dtype is None else whole.astype(dtype)

    def __repr__(self) -> str:
        return (
            f"Image({self.path!r}, format={self.format!r}, shape={self.shape}, "
            f"dtype={self.dtype}, spacing={self.spacing})"
        )

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _spacing_attr(attrs: Any, ndim: int) -> tuple[float, ...]:
    spacing = attrs.get("spacing") if attrs is not None else None
    if spacing is None or len(spacing) != ndim:
        return (1.0,) * ndim
    return tuple(float(s) for s in spacing)


def _affine_attr(attrs: Any) -> np.ndarray | None:
    affine = attrs.get("affine") if attrs is not None else None
    return None if affine is None else np.asarray(affine, dtype=np.float64)


def open(path: str | os.PathLike[str]) -> Image:
    """Open an image file lazily.

    Parameters
    ----------
    path : str or path-like
        ``.npy``, ``.nii``, ``.nii.gz``, ``.tif``, ``.tiff``, ``.zarr``, ``.h5`` or ``.hdf5``
        (``file.h5:dataset``; the dataset may be left out when the file holds just one).

    Returns
    -------
    Image
        Reads only the regions sliced out of it, so ``extract``, ``merge`` and ``apply``
        never load the whole file.

    Examples
    --------
    >>> import numpy as np, os, tempfile
    >>> import patchgrid as pg
    >>> path = os.path.join(tempfile.mkdtemp(), "volume.npy")
    >>> pg.save(path, np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    >>> img = pg.open(path)
    >>> img.shape, img.dtype, img.spacing
    ((2, 3, 4), dtype('int16'), (1.0, 1.0, 1.0))
    >>> img[1, :2, 1:3]
    array([[13, 14],
           [17, 18]], dtype=int16)
    """
    file, fmt, dataset = split_path(path)
    if not os.path.exists(file):
        raise FileNotFoundError(f"no such file: {file!r}")
    try:
        return _OPENERS[fmt](file, dataset)
    except (PatchgridError, FileNotFoundError):
        raise
    except Exception as exc:  # a library's own error about an unreadable file
        raise PatchgridError(f"cannot read {file!r} as {fmt}: {exc}") from None


def _open_npy(file: str, dataset: str | None) -> Image:
    data = np.load(file, mmap_mode="r", allow_pickle=False)
    return Image(data, file, "npy", (1.0,) * data.ndim, None, {})


def _open_nifti(file: str, dataset: str | None) -> Image:
    nib = _need("nibabel")
    img = nib.load(file)
    proxy = img.dataobj
    dtype = (
        img.get_data_dtype() if not _scaled(img) else np.asarray(proxy[(0,) * len(img.shape)]).dtype
    )
    zooms = img.header.get_zooms()
    spacing = [float(z) for z in zooms] + [1.0] * (len(img.shape) - len(zooms))
    return Image(proxy, file, "nifti", spacing, img.affine, {"dtype": dtype, "header": img.header})


def _scaled(img: Any) -> bool:
    slope, inter = img.header.get_slope_inter()
    return not (slope in (None, 1.0) or np.isnan(slope)) or not (
        inter in (None, 0.0) or np.isnan(inter)
    )


def _open_tiff(file: str, dataset: str | None) -> Image:
    tifffile = _need("tifffile")
    with tifffile.TiffFile(file) as tif:
        series = tif.series[0]
        shape, dtype = tuple(series.shape), series.dtype
        meta = (tif.shaped_metadata or [{}])[0] if tif.is_shaped else {}
        spacing = _tiff_spacing(tif, series, meta, len(shape))
    try:
        data: Any = tifffile.memmap(file, mode="r")
        closer = None
    except (ValueError, OSError):
        store = tifffile.imread(file, aszarr=True)
        zarr = _need("zarr")
        data = zarr.open_array(store, mode="r")
        closer = store.close
    if tuple(data.shape) != shape:
        data = data.reshape(shape) if hasattr(data, "reshape") else data
    affine = _affine_attr(meta)
    return Image(data, file, "tiff", spacing, affine, {"dtype": dtype}, closer)


def _tiff_spacing(tif: Any, series: Any, meta: dict[str, Any], ndim: int) -> tuple[float, ...]:
    """Spacing from our own metadata, else ImageJ's z spacing and the x/y resolution tags."""
    if "spacing" in meta and len(meta["spacing"]) == ndim:
        return tuple(float(s) for s in meta["spacing"])
    spacing = [1.0] * ndim
    page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
    tags = page.tags
    for name, axis in (("XResolution", ndim - 1), ("YResolution", ndim - 2)):
        if name in tags and axis >= 0:
            num, den = tags[name].value
            if num:
                spacing[axis] = den / num
    ij = tif.imagej_metadata or {}
    if "spacing" in ij and ndim >= 3:
        spacing[ndim - 3] = float(ij["spacing"])
    return tuple(spacing)


def _open_zarr(file: str, dataset: str | None) -> Image:
    zarr = _need("zarr")
    node = zarr.open(file, mode="r")
    if not hasattr(node, "shape"):
        names = sorted(node.array_keys())
        if dataset is None and len(names) == 1:
            dataset = names[0]
        if dataset is None or dataset not in names:
            raise PatchgridError(f"{file!r} is a zarr group; name one of its arrays: {names}")
        attrs = dict(node.attrs)
        node = node[dataset]
        attrs.update(node.attrs)
    else:
        attrs = dict(node.attrs)
    return Image(
        node, file, "zarr", _spacing_attr(attrs, node.ndim), _affine_attr(attrs), {"attrs": attrs}
    )


def _open_hdf5(file: str, dataset: str | None) -> Image:
    h5py = _need("h5py")
    handle = h5py.File(file, "r")
    names: list[str] = []
    handle.visititems(
        lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None
    )
    if dataset is None:
        if len(names) != 1:
            handle.close()
            raise PatchgridError(
                f"{file!r} holds {len(names)} datasets; name one as {file}:DATASET "
                f"(datasets: {names})"
            )
        dataset = names[0]
    key = dataset.lstrip("/")
    if key not in names:
        handle.close()
        raise PatchgridError(f"{file!r} has no dataset {dataset!r}; it has {names}")
    data = handle[key]
    attrs = dict(data.attrs)
    spacing = _spacing_attr(attrs, data.ndim)
    if (
        "element_size_um" in attrs
        and "spacing" not in attrs
        and len(attrs["element_size_um"]) == data.ndim
    ):
        spacing = tuple(float(s) for s in attrs["element_size_um"])
    return Image(data, file, "hdf5", spacing, _affine_attr(attrs), {"dataset": key}, handle.close)


_OPENERS = {
    "npy": _open_npy,
    "nifti": _open_nifti,
    "tiff": _open_tiff,
    "zarr": _open_zarr,
    "hdf5": _open_hdf5,
}


@contextmanager
def atomic_path(target: str, *, overwrite: bool = False, directory: bool = False) -> Iterator[str]:
    """A temporary path beside ``target`` that becomes ``target`` only if the block succeeds.

    A failed or interrupted write leaves nothing behind, and an existing ``target`` is kept
    unless ``overwrite``.
    """
    target = os.path.abspath(target)
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target!r} exists; pass overwrite=True (--overwrite) to replace it")
    parent = os.path.dirname(target) or "."
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"the folder {parent!r} does not exist")
    name = os.path.basename(target)
    scratch = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    tmp = os.path.join(scratch, name)
    try:
        yield tmp
        if os.path.isdir(target) and not os.path.islink(target):
            old = os.path.join(scratch, ".old")
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _meta_from(like: Any, ndim: int, spacing: Any, affine: Any) -> tuple[tuple[float, ...], Any]:
    if spacing is None and like is not None:
        spacing = getattr(like, "spacing", None)
    if affine is None and like is not None:
        affine = getattr(like, "affine", None)
    if spacing is None and affine is not None:
        # The voxel size along each of the first three axes is the length of its affine column.
        columns = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
        spacing = [*columns[: min(3, ndim)], *([1.0] * max(0, ndim - 3))]
    spacing = (1.0,) * ndim if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise PatchgridError(f"spacing must have one entry per axis ({ndim}), got {spacing}")
    if affine is not None:
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise PatchgridError(f"affine must be 4 x 4, got shape {affine.shape}")
    return spacing, affine


def save(
    path: str | os.PathLike[str],
    array: Any,
    *,
    like: Any = None,
    spacing: Sequence[float] | None = None,
    affine: Any = None,
    overwrite: bool = False,
    chunks: Any = None,
) -> None:
    """Write ``array`` to ``path``, in the format its extension names, with its metadata.

    Parameters
    ----------
    path : str or path-like
        As for :func:`open`.
    array : array_like
        The data; a lazy :class:`Image` is copied slab by slab where the format allows.
    like : Image, optional
        Take ``spacing``, ``affine`` (and a NIfTI header) from this image.
    spacing, affine : optional
        Voxel size per axis and the 4 x 4 voxel-to-world matrix; override ``like``'s.
    overwrite : bool
        Replace an existing file. Without it an existing file raises :class:`FileExistsError`.
    chunks : tuple, optional
        Chunk shape for zarr and HDF5.

    Notes
    -----
    The file is written under a temporary name beside ``path`` and moved into place at the
    end: a failed or interrupted write leaves nothing, and never half a file.
    """
    file, fmt, dataset = split_path(path)
    ndim = len(array.shape)
    spacing_t, affine_a = _meta_from(like, ndim, spacing, affine)
    if fmt == "hdf5" and os.path.exists(file):
        # Another dataset of the file stays: write into a copy of the file, then swap it in.
        check_dataset(file, dataset, overwrite)
        with atomic_path(file, overwrite=True) as tmp:
            shutil.copy2(file, tmp)
            _write_hdf5(tmp, array, spacing_t, affine_a, like, dataset, chunks)
        return
    with atomic_path(file, overwrite=overwrite) as tmp:
        _WRITERS[fmt](tmp, array, spacing_t, affine_a, like, dataset, chunks)


def check_dataset(file: str, dataset: str | None, overwrite: bool) -> None:
    """An existing HDF5 dataset is replaced only with ``overwrite``."""
    h5py = _need("h5py")
    name = (dataset or "data").lstrip("/")
    with h5py.File(file, "r") as f:
        exists = name in f
    if exists and not overwrite:
        raise FileExistsError(
            f"{file}:{name} exists; pass overwrite=True (--overwrite) to replace it"
        )


def _slabs(array: Any, rows: int = 0) -> Iterator[tuple[slice, np.ndarray]]:
    """The array in slabs along axis 0 of about 64 MiB each."""
    n = array.shape[0] if len(array.shape) else 1
    per = max(
        1,
        rows
        or (64 << 20) // max(1, int(np.prod(array.shape[1:])) * np.dtype(array.dtype).itemsize),
    )
    for lo in range(0, n, per):
        yield slice(lo, lo + per), np.asarray(array[lo : lo + per])


def _write_npy(
    tmp: str, array: Any, spacing: Any, affine: Any, like: Any, dataset: Any, chunks: Any
) -> None:
    out = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.dtype(array.dtype), shape=tuple(array.shape)
    )
    if out.ndim == 0:
        out[()] = np.asarray(array)
    else:
        for sl, slab in _slabs(array):
            out[sl] = slab
    out.flush()
    del out


def _write_nifti(
    tmp: str, array: Any, spacing: Any, affine: Any, like: Any, dataset: Any, chunks: Any
) -> None:
    nib = _need("nibabel")
    data = np.asarray(array)
    header = None
    if like is not None and getattr(like, "format", None) == "nifti":
        header = like.meta.get("header")
        header = header.copy() if header is not None else None
    if affine is None:
        affine = np.diag([*spacing[:3], *([1.0] * (3 - min(3, len(spacing)))), 1.0])
    img = nib.Nifti1Image(data, affine, header=header)
    img.set_data_dtype(data.dtype)
    img.header.set_zooms(tuple(spacing[: len(data.shape)]))
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, tmp)


def _write_tiff(
    tmp: str, array: Any, spacing: Any, affine: Any, like: Any, dataset: Any, chunks: Any
) -> None:
    tifffile = _need("tifffile")
    data = np.asarray(array)
    meta: dict[str, Any] = {"spacing": list(spacing)}
    if affine is not None:
        meta["affine"] = np.asarray(affine).tolist()
    kwargs: dict[str, Any] = {}
    if data.ndim >= 2 and spacing[-1] > 0 and spacing[-2] > 0:
        kwargs["resolution"] = (1.0 / spacing[-1], 1.0 / spacing[-2])
    tifffile.imwrite(tmp, data, metadata=meta, photometric="minisblack", **kwargs)


def _write_zarr(
    tmp: str, array: Any, spacing: Any, affine: Any, like: Any, dataset: Any, chunks: Any
) -> None:
    zarr = _need("zarr")
    shape = tuple(array.shape)
    out = zarr.open_array(
        tmp,
        mode="w",
        shape=shape,
        dtype=np.dtype(array.dtype),
        chunks=chunks or _chunks_for(shape, np.dtype(array.dtype)),
    )
    if shape:
        rows = out.chunks[0] * max(
            1, (64 << 20) // max(1, out.nbytes // max(shape[0], 1) * out.chunks[0])
        )
        for sl, slab in _slabs(array, rows):
            out[sl] = slab
    else:
        out[()] = np.asarray(array)
    out.attrs.update(_attrs(spacing, affine))


def _write_hdf5(
    tmp: str, array: Any, spacing: Any, affine: Any, like: Any, dataset: Any, chunks: Any
) -> None:
    h5py = _need("h5py")
    shape = tuple(array.shape)
    with h5py.File(tmp, "a") as f:
        name = (dataset or "data").lstrip("/")
        if name in f:
            del f[name]
        ds = f.create_dataset(
            name,
            shape=shape,
            dtype=np.dtype(array.dtype),
            chunks=chunks or (_chunks_for(shape, np.dtype(array.dtype)) if shape else None),
        )
        if shape:
            for sl, slab in _slabs(array):
                ds[sl] = slab
        else:
            ds[()] = np.asarray(array)
        for key, value in _attrs(spacing, affine).items():
            ds.attrs[key] = value


def _attrs(spacing: Any, affine: Any) -> dict[str, Any]:
    attrs: dict[str, Any] = {"spacing": list(spacing)}
    if affine is not None:
        attrs["affine"] = np.asarray(affine).tolist()
    return attrs


def _chunks_for(shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    """Chunks of about 1 MiB, cubic-ish in the trailing axes."""
    if not shape:
        return ()
    target = max(1, (1 << 20) // dtype.itemsize)
    chunks = list(shape)
    side = max(1, round(target ** (1 / min(3, len(shape)))))
    for a in range(len(shape)):
        chunks[a] = min(shape[a], side if a >= len(shape) - 3 else 1)
    return tuple(max(1, c) for c in chunks)


_WRITERS = {
    "npy": _write_npy,
    "nifti": _write_nifti,
    "tiff": _write_tiff,
    "zarr": _write_zarr,
    "hdf5": _write_hdf5,
}


def metadata_json(img: Any) -> str:
    """The metadata of an image as JSON (for attributes of patch stores)."""
    affine = getattr(img, "affine", None)
    return json.dumps(
        {
            "spacing": list(getattr(img, "spacing", (1.0,) * len(img.shape))),
            "affine": None if affine is None else np.asarray(affine).tolist(),
        }
    )


def tune_allocator(threshold: int = 4 << 20) -> bool:
    """Keep resident memory flat over a long out-of-core job (Linux, glibc): give blocks of
    ``threshold`` bytes or more pages of their own, handed back to the system when freed.

    glibc raises this threshold to the largest block freed so far; blocks under it stay in
    the heap once freed, per thread. A zarr writer that encodes chunks on threads then makes
    resident memory grow with the number of chunks written, though nothing is still in use.
    This setting is for the whole process and cannot be undone, so patchgrid never makes it
    by itself: call it at the start of a script that streams a large image to disk. The
    ``patchgrid`` command does.

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
    libc = _libc()
    return libc is not None and bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD


@functools.cache
def _libc() -> Any:
    """glibc, when this process runs on it (for its allocator's knobs), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None
