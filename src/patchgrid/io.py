"""L1: files: lazy reading of regions, writing with voxel spacing and affine, creating outputs.

Formats, by extension: ``.npy`` (memory-mapped), ``.nii``/``.nii.gz`` (nibabel), ``.tif``/
``.tiff`` (tifffile, memory-mapped where the file allows), ``.zarr`` (zarr), ``.h5``/``.hdf5``
(h5py; ``file.h5:dataset``). Each library is imported only when its format is used
(:func:`need`).

What lives here: :class:`Image` and :func:`open`; :func:`save`; :func:`create_output`, the
one place an output array is created in a file (a ``.npy`` memmap, a zarr array, an HDF5
dataset) for ``save`` and the command line alike; :func:`check_output`, which adds an HDF5
file's datasets to ``_writes.check_target``'s rules; :func:`atomic_path` over ``_writes``'.

Imports from L0 only: ``_checks``, ``_memory``, ``_writes`` (the format of a path, what an
output may replace, the atomic move).
"""

from __future__ import annotations

import functools
import importlib
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import numpy as np

from . import _formats, _writes
from ._checks import PatchgridError, PatchgridWarning
from ._memory import tune_allocator
from ._writes import FORMATS as FORMATS  # the formats, by extension
from ._writes import check_target as check_target  # what an output may replace
from ._writes import split_path as split_path  # (file, format, dataset) of a path

__all__ = ["Image", "open", "save", "tune_allocator"]

# The extra of pyproject.toml that brings each optional library.
EXTRAS = {
    "nibabel": "io",
    "tifffile": "io",
    "zarr": "io",
    "h5py": "io",
    "matplotlib": "plot",
    "torch": "torch",
    "dask": "dask",
    "numba": "fast",
}


def need(module: str, what: str | None = None) -> Any:
    """Import an optional library, or say what needs it and which extra brings it.

    ``what`` is the work that needs it, as the message starts ("writing .zarr").
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = EXTRAS.get(top)
        hint = f"pip install 'patchgrid[{extra}]'" if extra else f"pip install {top}"
        said = f"{what} needs {top}" if what else f"{top} is not installed"
        if exc.name is not None and exc.name.split(".")[0] != top:  # a library of its own
            raise PatchgridError(
                f"{what + ': ' if what else ''}{top} is installed but cannot be imported "
                f"({exc}); reinstall it: {hint}"
            ) from None
        raise PatchgridError(f"{said}: {hint}") from None


class Image:
    """A lazy image in a file: shape, dtype, slicing that reads only the region asked for.

    Made by :func:`open`. ``np.asarray(img)`` reads the whole image. ``spacing`` is the voxel
    size per axis (1.0 where the file says nothing), ``affine`` the 4 x 4 voxel-to-world
    matrix of a NIfTI file (None for the other formats unless one was saved with them).
    ``source`` is what it reads from: the format library's own array (a memmap, a zarr array,
    an h5py dataset, a NIfTI proxy, a TIFF reader).
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
        self.source = data
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
            return np.asarray(self.source[key], dtype=self.dtype)
        except (IndexError, TypeError):
            raise
        except Exception as exc:  # a truncated or corrupt file, in whichever library's words
            raise PatchgridError(
                f"cannot read {self.path!r} as {self.format}: {type(exc).__name__}: {exc}"
            ) from None

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[(slice(None),) * self.ndim] if self.ndim else np.asarray(self.source[()])
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
        said = " ".join(str(exc).split()) or type(exc).__name__  # one line
        raise PatchgridError(f"cannot read {file!r} as {fmt}: {said}") from None


def _open_npy(file: str, dataset: str | None) -> Image:
    try:
        data = np.load(file, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise PatchgridError(
            f"cannot read {file!r} as npy: {_formats.npy_problem(file, exc)}"
        ) from None
    return Image(data, file, "npy", (1.0,) * data.ndim, None, {})


def _open_nifti(file: str, dataset: str | None) -> Image:
    proxy, spacing, affine, meta = _formats.read(need("nibabel", "reading .nii/.nii.gz"), file)
    return Image(proxy, file, "nifti", spacing, affine, meta)


def _open_tiff(file: str, dataset: str | None) -> Image:
    tifffile = need("tifffile", "reading .tif/.tiff")
    with tifffile.TiffFile(file) as tif:
        series = tif.series[0]
        shape, dtype = tuple(series.shape), series.dtype
        meta = (tif.shaped_metadata or [{}])[0] if tif.is_shaped else {}
        spacing = _formats.tiff_spacing(tif, series, meta, len(shape))
    try:
        data: Any = tifffile.memmap(file, mode="r")
        closer = None
    except (ValueError, OSError):
        zarr = need("zarr", "reading a compressed .tif")
        store = tifffile.imread(file, aszarr=True)
        data = zarr.open_array(store, mode="r")
        closer = store.close
    if tuple(data.shape) != shape:
        data = data.reshape(shape) if hasattr(data, "reshape") else data
    affine = _affine_attr(meta)
    return Image(data, file, "tiff", spacing, affine, {"dtype": dtype}, closer)


def _open_zarr(file: str, dataset: str | None) -> Image:
    zarr = need("zarr", "reading .zarr")
    metadata = ("zarr.json", ".zarray", ".zgroup")
    if os.path.isdir(file) and not any(os.path.exists(os.path.join(file, m)) for m in metadata):
        raise PatchgridError(
            f"{file!r} is not a zarr store: it holds no zarr.json (zarr v3) nor .zarray or "
            f".zgroup (zarr v2), the metadata every zarr array or group has"
        )
    try:
        node = zarr.open(file, mode="r")
    except FileNotFoundError as exc:  # zarr's words name its store, not the path
        raise PatchgridError(f"cannot read {file!r} as zarr: {exc}") from None
    attrs = dict(node.attrs)
    if dataset is not None and hasattr(node, "shape"):
        raise PatchgridError(f"{file!r} is a zarr array, not a group: open it as {file!r}")
    if not hasattr(node, "shape"):
        names = sorted(n for n, a in node.members(max_depth=None) if hasattr(a, "shape"))
        if dataset is None and len(names) == 1:
            dataset = names[0]
        if dataset is None or dataset.strip("/") not in names:
            raise PatchgridError(
                f"{file!r} is a zarr group"
                + ("" if dataset is None else f" with no array {dataset!r}")
                + f"; name one of its arrays as {file}/ARRAY (arrays: {names})"
            )
        node = node[dataset.strip("/")]
        attrs.update(node.attrs)
    return Image(
        node, file, "zarr", _spacing_attr(attrs, node.ndim), _affine_attr(attrs), {"attrs": attrs}
    )


def _open_hdf5(file: str, dataset: str | None) -> Image:
    h5py = need("h5py", "reading .h5/.hdf5")
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


def atomic_path(
    target: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    directory: bool = False,
    kind: str | None = None,
    inputs: Iterable[Any] = (),
    dataset: str | None = None,
) -> AbstractContextManager[str]:
    """A temporary path beside ``target`` that becomes ``target`` only if the block succeeds.

    A failed or interrupted write leaves nothing behind, and an existing ``target`` is kept
    unless ``overwrite``, which replaces only an output patchgrid recognises as its own
    (``kind``, ``inputs`` and ``dataset`` as for :func:`check_target`). An output that
    appears at ``target`` while the block runs is kept (an error) unless ``overwrite``.
    """
    check = functools.partial(check_target, kind=kind, inputs=list(inputs), dataset=dataset)
    return _writes.atomic_path(os.fspath(target), overwrite=overwrite, check=check)


def check_output(
    path: str | os.PathLike[str], *, overwrite: bool = False, inputs: Iterable[Any] = ()
) -> None:
    """Refuse, before any work, an output that :func:`save` or :func:`create_output` would
    refuse. A dataset added to an existing HDF5 file leaves its other datasets: the file is
    replaced (it must be an HDF5 file), the dataset only with ``overwrite``."""
    file, fmt, dataset = output_path(path)
    if fmt == "hdf5" and os.path.lexists(file):
        check_target(file, overwrite=True, kind=fmt, inputs=inputs, dataset=dataset or "data")
        check_dataset(file, dataset, overwrite)
    else:
        check_target(file, overwrite=overwrite, kind=fmt, inputs=inputs)


def output_path(path: str | os.PathLike[str]) -> tuple[str, str, str | None]:
    """``(file, format, dataset)`` of an output: an array inside a zarr group is refused
    (patchgrid writes a whole ``.zarr``, which would silently drop the name)."""
    file, fmt, dataset = split_path(path)
    if fmt == "zarr" and dataset is not None:
        raise PatchgridError(
            f"cannot write {os.fspath(path)!r}: patchgrid writes a whole zarr store, not an "
            f"array inside a group; give a path that ends in .zarr"
        )
    return file, fmt, dataset


def npy_loses(spacing: Sequence[float], affine: Any) -> str | None:
    """What a ``.npy`` file would lose of this metadata, in words (None: nothing)."""
    lost = []
    if any(float(s) != 1.0 for s in spacing):
        lost.append(f"the spacing ({', '.join(f'{float(s):.6g}' for s in spacing)})")
    if affine is not None and not np.allclose(np.asarray(affine, dtype=np.float64), np.eye(4)):
        lost.append("the affine")
    if not lost:
        return None
    return (
        f"a .npy file holds no spacing or affine: {' and '.join(lost)} "
        f"{'are' if len(lost) > 1 else 'is'} not saved (.nii.gz, .tif, .zarr and .h5 keep them)"
    )


def _warn_npy(path: Any, spacing: Sequence[float], affine: Any, stacklevel: int) -> None:
    said = npy_loses(spacing, affine)
    if said is not None:
        name = os.path.basename(os.fspath(path))
        warnings.warn(f"{name}: {said}", PatchgridWarning, stacklevel=stacklevel + 1)


@contextmanager
def _output_file(path: str | os.PathLike[str], overwrite: bool, inputs: list[str]) -> Iterator[str]:
    """The temporary path that becomes the file of ``path``; an existing HDF5 file is copied
    there first, so that its other datasets stay."""
    file, fmt, dataset = output_path(path)
    keep = fmt == "hdf5" and os.path.lexists(file)
    if keep:
        check_output(path, overwrite=overwrite, inputs=inputs)
    name = (dataset or "data") if fmt == "hdf5" else None
    with atomic_path(file, overwrite=overwrite or keep, inputs=inputs, dataset=name) as tmp:
        if keep:
            shutil.copy2(file, tmp)
        yield tmp


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
        Replace an existing file. Without it an existing file raises :class:`FileExistsError`;
        with it too where the file is not of the format ``path`` names (a folder, say). The
        file an input is read from is never replaced, nor written through a symbolic link.
    chunks : tuple, optional
        Chunk shape for zarr and HDF5.

    Notes
    -----
    The file is written under a temporary name beside ``path`` and moved into place at the
    end: a failed or interrupted write leaves nothing, and never half a file.
    """
    _, fmt, dataset = output_path(path)
    ndim = len(array.shape)
    spacing_t, affine_a = _meta_from(like, ndim, spacing, affine)
    if fmt == "npy":
        _warn_npy(path, spacing_t, affine_a, stacklevel=2)
    inputs = _sources(array, like)
    # Into an existing HDF5 file: another dataset of the file stays (written into a copy).
    with _output_file(path, overwrite, inputs) as tmp:
        WRITERS[fmt](tmp, array, spacing_t, affine_a, like, dataset, chunks)


def _sources(*arrays: Any) -> list[str]:
    """The files ``arrays`` are read from (an :class:`Image`, a memmap, an h5py dataset)."""
    found = []
    for a in arrays:
        if isinstance(a, Image):
            inner = a.meta.get("dataset") if a.format == "hdf5" else None
            found.append(a.path if inner is None else f"{a.path}:{inner}")
        elif isinstance(a, np.memmap) and isinstance(a.filename, (str, os.PathLike)):
            found.append(os.fspath(a.filename))
        elif isinstance(getattr(getattr(a, "file", None), "filename", None), str):
            found.append(f"{a.file.filename}:{a.name}")
    return found


def check_dataset(file: str, dataset: str | None, overwrite: bool) -> None:
    """An existing HDF5 dataset is replaced only with ``overwrite``."""
    h5py = need("h5py", "writing .h5/.hdf5")
    name = (dataset or "data").lstrip("/")
    with h5py.File(file, "r") as f:
        exists = name in f
    if exists and not overwrite:
        raise FileExistsError(
            f"{file}:{name} exists; pass overwrite=True (--overwrite) to replace it"
        )


@contextmanager
def create_output(
    path: str | os.PathLike[str],
    shape: tuple[int, ...],
    dtype: Any,
    spacing: Any,
    affine: Any,
    overwrite: bool = False,
    like: Any = None,
) -> Iterator[Any]:
    """An array to write into that becomes the file ``path`` when the block succeeds: on
    disk where the format allows (npy, zarr, HDF5: bounded memory), in memory for NIfTI and
    TIFF (saved at the end). Nothing is left of it if the block fails. ``like`` (an
    :class:`Image` or :class:`Metadata`) gives a NIfTI output the source's header. A
    ``.npy`` file keeps no spacing or affine: the caller says so (:func:`npy_loses`)."""
    _, fmt, dataset = output_path(path)
    dtype = np.dtype(dtype)
    with _output_file(path, overwrite, []) as tmp:
        if fmt in _ON_DISK:
            with _new_array(tmp, fmt, dataset, shape, dtype, spacing, affine) as out:
                yield out
        else:
            out = np.empty(shape, dtype)
            yield out
            save(tmp, out, spacing=spacing, affine=affine, like=like)


_ON_DISK = ("npy", "zarr", "hdf5")


@contextmanager
def _new_array(
    tmp: str,
    fmt: str,
    dataset: str | None,
    shape: tuple[int, ...],
    dtype: np.dtype,
    spacing: Any,
    affine: Any,
    chunks: Any = None,
) -> Iterator[Any]:
    """A new array in the file ``tmp``: a ``.npy`` memmap, a zarr array or an HDF5 dataset
    (replacing one of that name); spacing and affine are written when the block succeeds."""
    if fmt == "npy":
        mapped = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        yield mapped
        mapped.flush()
        del mapped
    elif fmt == "zarr":
        zarr = need("zarr", "writing .zarr")
        out = zarr.open_array(
            tmp, mode="w", shape=shape, dtype=dtype, chunks=chunks or chunks_for(shape, dtype)
        )
        yield out
        out.attrs.update(meta_attrs(spacing, affine))
    else:
        h5py = need("h5py", "writing .h5/.hdf5")
        with h5py.File(tmp, "a") as f:
            name = (dataset or "data").lstrip("/")
            if name in f:
                del f[name]
            ds = f.create_dataset(
                name,
                shape=shape,
                dtype=dtype,
                chunks=chunks or (chunks_for(shape, dtype) if shape else None),
            )
            yield ds
            for key, value in meta_attrs(spacing, affine).items():
                ds.attrs[key] = value


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


def _write_array(
    fmt: str,
    tmp: str,
    array: Any,
    spacing: Any,
    affine: Any,
    like: Any,
    dataset: Any,
    chunks: Any,
) -> None:
    """``array`` into a new ``.npy``, zarr or HDF5 file, about 64 MiB at a time."""
    shape = tuple(array.shape)
    with _new_array(
        tmp, fmt, dataset, shape, np.dtype(array.dtype), spacing, affine, chunks
    ) as out:
        if not shape:
            out[()] = np.asarray(array)
            return
        rows = 0
        if fmt == "zarr":  # whole chunks along axis 0
            per_row = out.nbytes // max(shape[0], 1)
            rows = out.chunks[0] * max(1, (64 << 20) // max(1, per_row * out.chunks[0]))
        for sl, slab in _slabs(array, rows):
            out[sl] = slab


def _write_nifti(
    tmp: str,
    array: Any,
    spacing: Any,
    affine: Any,
    like: Any,
    dataset: Any,
    chunks: Any,
    corner: Sequence[int] | None = None,
) -> None:
    nib = need("nibabel", "writing .nii/.nii.gz")
    _formats.write(nib, tmp, np.asarray(array), spacing, affine, like, corner)


def _write_tiff(
    tmp: str, array: Any, spacing: Any, affine: Any, like: Any, dataset: Any, chunks: Any
) -> None:
    tifffile = need("tifffile", "writing .tif/.tiff")
    data = np.asarray(array)
    meta: dict[str, Any] = {"spacing": list(spacing)}
    if affine is not None:
        meta["affine"] = np.asarray(affine).tolist()
    kwargs: dict[str, Any] = {}
    if data.ndim >= 2 and spacing[-1] > 0 and spacing[-2] > 0:
        kwargs["resolution"] = (1.0 / spacing[-1], 1.0 / spacing[-2])
    tifffile.imwrite(tmp, data, metadata=meta, photometric="minisblack", **kwargs)


def meta_attrs(spacing: Any, affine: Any) -> dict[str, Any]:
    """The attributes that keep spacing and affine in a zarr array or HDF5 dataset."""
    attrs: dict[str, Any] = {"spacing": list(spacing)}
    if affine is not None:
        attrs["affine"] = np.asarray(affine).tolist()
    return attrs


def chunks_for(shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    """Chunks of about 1 MiB, cubic-ish in the trailing axes."""
    if not shape:
        return ()
    target = max(1, (1 << 20) // dtype.itemsize)
    chunks = list(shape)
    side = max(1, round(target ** (1 / min(3, len(shape)))))
    for a in range(len(shape)):
        chunks[a] = min(shape[a], side if a >= len(shape) - 3 else 1)
    return tuple(max(1, c) for c in chunks)


# The writer of each format, looked up at each save.
WRITERS: dict[str, Callable[..., None]] = {
    "npy": functools.partial(_write_array, "npy"),
    "nifti": _write_nifti,
    "tiff": _write_tiff,
    "zarr": functools.partial(_write_array, "zarr"),
    "hdf5": functools.partial(_write_array, "hdf5"),
}


def describe(img: Any) -> dict[str, Any]:
    """An image's metadata as JSON values (for patch stores and folders): its file's name
    and format, the dtype of its values, spacing, affine and a NIfTI file's header."""
    affine = getattr(img, "affine", None)
    header = img.meta.get("header") if getattr(img, "format", None) == "nifti" else None
    return {
        "path": os.path.basename(getattr(img, "path", "")),
        "format": getattr(img, "format", None),
        "dtype": str(np.dtype(img.dtype)),
        "spacing": list(getattr(img, "spacing", (1.0,) * len(img.shape))),
        "affine": None if affine is None else np.asarray(affine).tolist(),
        "nifti_header": None if header is None else _formats.to_text(header),
    }


class Metadata:
    """An image's metadata without its data, as :func:`save` takes it for ``like``: spacing,
    affine, the dtype of its values, and a NIfTI file's header (``format`` is then
    ``"nifti"``). Made from :func:`describe`'s values by :meth:`from_dict`."""

    def __init__(self, spacing: Any, affine: Any, dtype: Any, header: Any = None) -> None:
        self.spacing = tuple(float(s) for s in spacing)
        self.affine = None if affine is None else np.asarray(affine, dtype=np.float64)
        self.dtype = np.dtype(dtype)
        self.format = None if header is None else "nifti"
        self.meta = {} if header is None else {"header": header}

    @classmethod
    def from_dict(cls, values: dict[str, Any], ndim: int) -> Metadata:
        header = values.get("nifti_header")
        if header is not None:
            header = _formats.from_text(need("nibabel", "reading a NIfTI header"), header)
        spacing = values.get("spacing") or (1.0,) * ndim
        return cls(spacing, values.get("affine"), values["dtype"], header)


def save_patch(path: str, patch: Any, source: Any, corner: Sequence[int]) -> None:
    """A patch of ``source`` whose first voxel is ``corner`` (one per axis of the source) in
    a file that knows where it sits: the affine moved to the corner, with the source's
    spacing (NIfTI, TIFF) and header (NIfTI). A ``.npy`` file keeps neither: a patch
    folder's manifest does."""
    _, fmt, _ = output_path(path)
    if fmt == "npy":
        save(path, patch)
        return
    affine = None if source.affine is None else np.array(source.affine, dtype=np.float64)
    if affine is not None:
        offset = np.zeros(3)
        offset[: min(3, len(corner))] = corner[:3]
        affine[:3, 3] += affine[:3, :3] @ offset
    with _output_file(path, False, []) as tmp:
        if fmt == "nifti":
            _write_nifti(tmp, patch, source.spacing, affine, source, None, None, corner)
        else:
            WRITERS[fmt](tmp, patch, source.spacing, affine, source, None, None)
