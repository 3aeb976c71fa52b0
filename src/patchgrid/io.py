"""Files: lazy reading of regions and atomic writing, with voxel spacing and affine.

Formats, by extension: ``.npy`` (memory-mapped), ``.nii``/``.nii.gz`` (nibabel), ``.tif``/
``.tiff`` (tifffile, memory-mapped where the file allows), ``.zarr`` (zarr), ``.h5``/``.hdf5``
(h5py; ``file.h5:dataset``). Each library is imported only when its format is used.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import functools
import gzip
import json
import os
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from ._checks import PatchgridError
from ._memory import tune_allocator

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
        said = " ".join(str(exc).split()) or type(exc).__name__  # one line
        raise PatchgridError(f"cannot read {file!r} as {fmt}: {said}") from None


def _open_npy(file: str, dataset: str | None) -> Image:
    try:
        data = np.load(file, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise PatchgridError(f"cannot read {file!r} as npy: {_npy_problem(file, exc)}") from None
    return Image(data, file, "npy", (1.0,) * data.ndim, None, {})


def _npy_problem(file: str, exc: Exception) -> str:
    """What is wrong with a ``.npy`` file that NumPy refused, in one line: NumPy's own words
    name a tokenizer or a mmap, not the file's header or length."""
    import ast
    import math

    magic = b"\x93NUMPY"
    with builtins.open(file, "rb") as f:
        prefix = f.read(12)
        if not prefix.startswith(magic):
            return f"it does not start with the .npy signature {magic!r} (got {prefix[:8]!r})"
        major = prefix[6] if len(prefix) > 6 else -1
        if major not in (1, 2, 3) or len(prefix) < 10:
            return f"unknown .npy format version {major} (NumPy writes 1, 2 and 3)"
        width = 2 if major == 1 else 4
        length = int.from_bytes(prefix[8 : 8 + width], "little")
        f.seek(8 + width)
        text = f.read(length)
        data_bytes = os.fstat(f.fileno()).st_size - (8 + width + length)
    if len(text) < length:
        return f"its header should be {length} bytes long but the file ends after {len(text)}"
    if length > 10_000:
        return f"its header is {length:,} bytes long, more than the 10,000 NumPy accepts"
    shown = text.decode("latin1").strip()
    try:
        header = ast.literal_eval(shown)
        ok = isinstance(header, dict) and {"descr", "fortran_order", "shape"} <= set(header)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        ok = False
    if not ok:
        cut = shown if len(shown) <= 80 else shown[:77] + "..."
        return (
            f"its header is not a .npy header, a dict like {{'descr': '<f4', "
            f"'fortran_order': False, 'shape': (2, 3)}}: got {cut!r}"
        )
    try:
        dtype = np.dtype(header["descr"])
        need = math.prod(header["shape"]) * dtype.itemsize
    except Exception:
        return f"its header describes no array NumPy knows: {' '.join(str(exc).split())}"
    if data_bytes < need:
        return (
            f"its header says shape {tuple(header['shape'])} {dtype}, {need:,} bytes of data, "
            f"but the file holds {max(data_bytes, 0):,} (truncated?)"
        )
    return " ".join(str(exc).split()) or type(exc).__name__


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


# Temporary outputs sit beside their target as ".NAME.patchgrid-HOST-PID-RANDOM.tmp": the host
# and the process id tell a later run which are left over from a process that was killed.
_SCRATCH = re.compile(r"\..+\.patchgrid-(?P<host>[A-Za-z0-9]*)-(?P<pid>[0-9]+)-[A-Za-z0-9_]+\.tmp")
# What a patch folder written by 'patchgrid extract' holds.
_PATCH_FILE = re.compile(r"patch(_[0-9]+)+\.(npy|nii|nii\.gz|tif)|\.patchgrid|manifest\.json")
_LABELS = {"npy": ".npy", "nifti": "NIfTI", "tiff": "TIFF", "hdf5": "HDF5", "zarr": "zarr"}
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_SETTLE_S = 30.0  # the longest wait for writes already on their way (a slab's chunks)
_swept: set[str] = set()
# Outputs moved into place by this process, so that the command line can say truthfully
# what an interrupted command left behind.
_written: list[str] = []


def check_target(
    target: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    kind: str | None = None,
    inputs: Iterable[Any] = (),
    dataset: str | None = None,
) -> None:
    """Refuse an output patchgrid must not write, before any work.

    A link is never written through; an input (or a folder that holds one) is never written
    over; an existing output is replaced only with ``overwrite``, and only where patchgrid
    recognises it as its own kind of output: ``kind`` is a format of :data:`FORMATS` (a file
    of that format, or for zarr an array or a patch store), ``"patches"`` (a folder of patch
    files from ``patchgrid extract``) or ``"file"`` (any regular file); by default the
    format the extension names. ``dataset`` is the HDF5 dataset written, so that another
    dataset of the same file may be an input.
    """
    text = os.fspath(target)
    path = os.path.abspath(text)
    if os.path.islink(path):
        raise PatchgridError(
            f"{text!r} is a symbolic link; patchgrid writes no output through a link: "
            f"give the path it points to, or another output"
        )
    if not os.path.lexists(path):
        return
    for source in inputs:
        how = _input_relation(path, dataset, source)
        if how is not None:
            raise PatchgridError(
                f"{text!r} {how} the input {os.fspath(source)!r}; patchgrid never writes over "
                f"its input: choose another output"
            )
    if not overwrite:
        raise FileExistsError(f"{text!r} exists; pass overwrite=True (--overwrite) to replace it")
    why = _not_ours(path, _kind_of(path) if kind is None else kind)
    if why is not None:
        raise FileExistsError(
            f"{text!r} {why}; overwrite=True (--overwrite) replaces only an output that "
            f"patchgrid wrote: move it away or choose another output"
        )


def _kind_of(path: str) -> str:
    try:
        return split_path(path)[1]
    except PatchgridError:
        return "file"


def _input_relation(path: str, dataset: str | None, source: Any) -> str | None:
    """``"is"`` or ``"holds"`` where the output ``path`` is the input ``source`` or a folder
    that holds it, else None."""
    text = os.fspath(source)
    try:
        file, _, inner = split_path(text)
    except PatchgridError:
        file, inner = text, None
    if not os.path.lexists(file):
        return None
    try:
        same = os.path.samefile(path, file)
    except OSError:
        same = False
    if same or os.path.realpath(path) == os.path.realpath(file):
        if dataset is not None and inner is not None and dataset.strip("/") != inner.strip("/"):
            return None  # another dataset of the same HDF5 file
        return "is"
    if os.path.isdir(path) and not os.path.islink(path):
        folder = os.path.join(os.path.realpath(path), "")
        if os.path.realpath(file).startswith(folder):
            return "holds"
    return None


def _not_ours(path: str, kind: str) -> str | None:
    """Why the existing ``path`` is not an output of ``kind`` that patchgrid may replace."""
    if kind == "patches":
        if not os.path.isdir(path):
            return "is not a folder of patches"
        strange = sorted(n for n in os.listdir(path) if not _PATCH_FILE.fullmatch(n))
        if strange or any(not os.path.isfile(os.path.join(path, n)) for n in os.listdir(path)):
            first = strange[0] if strange else "a folder"
            return f"holds files patchgrid did not write (such as {first!r})"
        return None
    if kind == "zarr":
        if not os.path.isdir(path):
            return "is not a zarr store"
        return None if _is_our_zarr(path) else "is not a zarr array or a patch store"
    label = _LABELS.get(kind, "regular")
    if os.path.isdir(path):
        return f"is a folder, not a {label} file"
    if not os.path.isfile(path):
        return "is not a regular file"
    if kind in _LABELS and not _looks_like(path, kind):
        return f"is not a {label} file"
    return None


def _is_our_zarr(path: str) -> bool:
    """A zarr array (as :func:`save` and merge write) or a patch store (as extract writes)."""
    try:
        if os.path.isfile(os.path.join(path, "zarr.json")):
            with builtins.open(os.path.join(path, "zarr.json")) as f:
                meta = json.load(f)
            return meta.get("node_type") == "array" or "patchgrid" in meta.get("attributes", {})
        if os.path.isfile(os.path.join(path, ".zarray")):
            return True
        if os.path.isfile(os.path.join(path, ".zattrs")):
            with builtins.open(os.path.join(path, ".zattrs")) as f:
                return "patchgrid" in json.load(f)
    except (OSError, ValueError, AttributeError):
        return False
    return False


def _looks_like(path: str, kind: str) -> bool:
    """Whether the file at ``path`` starts as a file of format ``kind`` does."""
    try:
        with builtins.open(path, "rb") as f:
            head = f.read(8)
            if kind == "npy":
                return head.startswith(b"\x93NUMPY")
            if kind == "tiff":
                return head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
            if kind == "hdf5":
                # The superblock is at 0, or after a user block of 512, 1024, 2048... bytes.
                offset, size = 0, os.fstat(f.fileno()).st_size
                while offset + 8 <= size:
                    f.seek(offset)
                    if f.read(8) == _HDF5_SIGNATURE:
                        return True
                    offset = 512 if offset == 0 else 2 * offset
                return False
            if kind == "nifti":
                if head.startswith(b"\x1f\x8b"):
                    with gzip.open(path, "rb") as g:
                        head = g.read(4)
                sizes = struct.unpack("<i", head[:4]) + struct.unpack(">i", head[:4])
                return bool({348, 540} & set(sizes))  # the header sizes of NIfTI-1 and -2
    except (OSError, EOFError, struct.error, zlib.error):
        return False
    return True


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":  # Windows: os.kill(pid, 0) is a Ctrl-C
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # a process of another user
    return True


@functools.cache
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:40]


def _sweep(parent: str) -> None:
    """Remove temporary outputs left in ``parent`` by a process of this host that was killed
    (SIGKILL, a power cut), once per folder and process. Only names patchgrid makes are
    touched, and only where their process is gone."""
    if parent in _swept:
        return
    _swept.add(parent)
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        found = _SCRATCH.fullmatch(entry.name)
        if (
            found is not None
            and found["host"] == _host()
            and not _alive(int(found["pid"]))
            and entry.is_dir(follow_symlinks=False)
        ):
            _remove(entry.path)


def _remove(folder: str) -> None:
    """Remove ``folder``, again while anything still writing into it brings it back."""
    for _ in range(100):
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.lexists(folder):
            return
        time.sleep(0.01)


def _settle_writers(timeout: float = _SETTLE_S) -> None:
    """Wait until writes already handed to zarr's own threads have finished.

    zarr (v3) writes chunks from an event loop on a thread of its own; an interrupt stops
    the caller, not those writes, which would go on creating files in a folder being removed.
    """
    import asyncio  # zarr has loaded it already

    sync = sys.modules.get("zarr.core.sync")
    loop = getattr(sync, "loop", [None])[0] if sync is not None else None
    if not isinstance(loop, asyncio.AbstractEventLoop) or loop.is_closed():
        return
    if not loop.is_running():
        return

    async def idle() -> None:
        me = asyncio.current_task()
        while others := [t for t in asyncio.all_tasks() if t is not me]:
            await asyncio.wait(others)

    future = asyncio.run_coroutine_threadsafe(idle(), loop)
    try:
        future.result(timeout)
    except Exception:
        future.cancel()


@contextmanager
def _signals_held(resend: bool = True) -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (a move into place and its clean-up
    are not cut in half). One that came meanwhile is then delivered, with ``resend``, unless
    the block ends with an exception (an interrupt already on its way, say)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous: dict[int, Any] = {}

    def hold(signum: int, frame: Any) -> None:
        held.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is not None:  # None: a handler not set from Python, which cannot be restored
            previous[sig] = signal.signal(sig, hold)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    try:
        yield
    except BaseException:
        restore()
        raise
    restore()
    if held and resend and held[0] in previous:
        handler = previous[held[0]]
        if callable(handler):
            handler(held[0], None)
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), held[0])


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """Linux's renameat2, which can refuse to replace (or swap with) an existing name."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


def _rename2(source: str, target: str, flags: int) -> bool:
    """renameat2; False where the system or the file system does not have it."""
    fn = _renameat2()
    if fn is None:
        return False
    import ctypes

    if fn(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), target)


def _appeared(target: str) -> FileExistsError:
    return FileExistsError(
        f"{target!r} appeared while patchgrid was writing it (another run?): it is kept and "
        f"this output dropped; pass overwrite=True (--overwrite) to replace it"
    )


def _move_new(tmp: str, target: str) -> None:
    """Move ``tmp`` to ``target``, which must not exist, even if it appears meanwhile."""
    try:
        if _rename2(tmp, target, _RENAME_NOREPLACE):
            return
        if os.path.isdir(tmp):
            # rename() replaces an empty folder: make it ourselves, exclusively, first.
            os.mkdir(target)
            try:
                os.rename(tmp, target)
            except OSError:
                with contextlib.suppress(OSError):
                    os.rmdir(target)
                raise
            return
        try:
            os.link(tmp, target)  # fails on an existing name, where rename() would replace
            os.unlink(tmp)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: claim the name exclusively
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            os.replace(tmp, target)
    except FileExistsError:
        raise _appeared(target) from None


def _move_over(tmp: str, target: str, scratch: str) -> None:
    """Replace the existing ``target`` by ``tmp``; the old one ends in ``scratch``."""
    if not os.path.isdir(tmp):
        os.replace(tmp, target)
        return
    if _rename2(tmp, target, _RENAME_EXCHANGE):
        return
    old = os.path.join(scratch, ".old")
    os.replace(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        with contextlib.suppress(OSError):
            os.rename(old, target)
        raise _appeared(target) from None


@contextmanager
def atomic_path(
    target: str,
    *,
    overwrite: bool = False,
    directory: bool = False,
    kind: str | None = None,
    inputs: Iterable[Any] = (),
    dataset: str | None = None,
) -> Iterator[str]:
    """A temporary path beside ``target`` that becomes ``target`` only if the block succeeds.

    A failed or interrupted write leaves nothing behind, and an existing ``target`` is kept
    unless ``overwrite``, which replaces only an output patchgrid recognises as its own
    (``kind``, ``inputs`` and ``dataset`` as for :func:`check_target`). An output that
    appears at ``target`` while the block runs is kept (an error) unless ``overwrite``.
    """
    target = os.path.abspath(target)
    check_target(target, overwrite=overwrite, kind=kind, inputs=inputs, dataset=dataset)
    parent = os.path.dirname(target) or "."
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"the folder {parent!r} does not exist")
    _sweep(parent)
    name = os.path.basename(target)
    scratch = tempfile.mkdtemp(
        prefix=f".{name[:80]}.patchgrid-{_host()}-{os.getpid()}-", suffix=".tmp", dir=parent
    )
    tmp = os.path.join(scratch, name)
    try:
        yield tmp
        with _signals_held():
            try:
                if overwrite and os.path.lexists(target):
                    check_target(target, overwrite=True, kind=kind, inputs=inputs, dataset=dataset)
                    _move_over(tmp, target, scratch)
                else:
                    _move_new(tmp, target)
                _written.append(target)
            finally:
                _remove(scratch)
    except BaseException:
        with _signals_held(resend=False):
            _settle_writers()
            _remove(scratch)
        raise


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
    file, fmt, dataset = split_path(path)
    ndim = len(array.shape)
    spacing_t, affine_a = _meta_from(like, ndim, spacing, affine)
    inputs = _sources(array, like)
    if fmt == "hdf5" and os.path.lexists(file):
        # Another dataset of the file stays: write into a copy of the file, then swap it in.
        name = dataset or "data"
        check_target(file, overwrite=True, kind=fmt, inputs=inputs, dataset=name)
        check_dataset(file, dataset, overwrite)
        with atomic_path(file, overwrite=True, inputs=inputs, dataset=name) as tmp:
            shutil.copy2(file, tmp)
            _write_hdf5(tmp, array, spacing_t, affine_a, like, dataset, chunks)
        return
    with atomic_path(file, overwrite=overwrite, inputs=inputs) as tmp:
        _WRITERS[fmt](tmp, array, spacing_t, affine_a, like, dataset, chunks)


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
