"""L0: where an output may be written, and writing it atomically.

What an output may replace, decided before any work (:func:`check_target`): never a link,
never an input or a folder that holds one, an existing output only with ``overwrite`` and only
where patchgrid recognises it as its own (told by the extension, :func:`split_path` over
:data:`FORMATS`, and by the file's signature). Then a failed or interrupted write leaves
nothing behind, and never half a file:

- :func:`atomic_path` gives a temporary path in a folder of its own beside the target and
  moves it into place only when the block succeeds, with renameat2 where the system has it
  (:func:`move_new` never replaces a name that appeared meanwhile; a folder is swapped in);
- SIGINT and SIGTERM wait while an output is moved into place (:func:`signals_held`);
- zarr's writer threads finish their chunks before a failed output is removed
  (:func:`settle_writers`);
- temporary folders left by a killed process of this host are swept away (once per folder);
- :data:`written` lists the outputs moved into place, so that the CLI can say what an
  interrupted command left behind.

Reading and writing the formats themselves is ``io``'s (L1). Imports only ``_checks`` and the
standard library.
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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from ._checks import PatchgridError

# Temporary outputs sit beside their target as ".NAME.patchgrid-HOST-PID-RANDOM.tmp": the host
# and the process id tell a later run which are left over from a process that was killed.
SCRATCH = re.compile(r"\..+\.patchgrid-(?P<host>[A-Za-z0-9]*)-(?P<pid>[0-9]+)-[A-Za-z0-9_]+\.tmp")
SETTLE_S = 30.0  # the longest wait for writes already on their way (a slab's chunks)
_swept: set[str] = set()
# Outputs moved into place by this process, so that the command line can say truthfully
# what an interrupted command left behind.
written: list[str] = []


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


def split_path(path: str | os.PathLike[str]) -> tuple[str, str, str | None]:
    """``(file, format, dataset)`` for a path such as ``scan.nii.gz``, ``data.h5:/raw`` or
    ``store.zarr/patches`` (also ``store.zarr:patches``)."""
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
    # An array inside a zarr group: group.zarr/NAME or group.zarr:NAME.
    at = max(lower.rfind(f".zarr{sep}") for sep in ":/\\")
    if dataset is None and at >= 0 and text[at + 6 :].strip("/\\"):
        return text[: at + 5], "zarr", text[at + 6 :].strip("/\\").replace("\\", "/")
    known = ", ".join(sorted(FORMATS))
    raise PatchgridError(
        f"cannot tell the format of {os.fspath(path)!r}: known extensions are {known} "
        f"(an array inside a zarr group: group.zarr/ARRAY; an HDF5 dataset: file.h5:DATASET)"
    )


# What a patch folder written by 'patchgrid extract' holds: patch files and its manifest, the
# mark of a folder patchgrid wrote.
_PATCH_FILE = re.compile(r"patch(_[0-9]+)+\.(npy|nii|nii\.gz|tif)|manifest\.json")
MANIFEST = "manifest.json"
_LABELS = {"npy": ".npy", "nifti": "NIfTI", "tiff": "TIFF", "hdf5": "HDF5", "zarr": "zarr"}
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


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
    """``"is"``, ``"holds"`` or ``"lies inside"`` where the output ``path`` is the input
    ``source``, a folder that holds it, or a file inside it (a patch folder, a zarr store);
    else None."""
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
    if os.path.isdir(file) and not os.path.islink(file):  # a folder of patches, a zarr store
        folder = os.path.join(os.path.realpath(file), "")
        if os.path.realpath(path).startswith(folder):
            return "lies inside"
    return None


def _not_ours(path: str, kind: str) -> str | None:
    """Why the existing ``path`` is not an output of ``kind`` that patchgrid may replace."""
    if kind == "patches":
        if not os.path.isdir(path):
            return "is not a folder of patches"
        names = os.listdir(path)
        strange = sorted(n for n in names if not _PATCH_FILE.fullmatch(n))
        if strange or any(not os.path.isfile(os.path.join(path, n)) for n in names):
            first = strange[0] if strange else "a folder"
            return f"holds files patchgrid did not write (such as {first!r})"
        if names and not _is_manifest(os.path.join(path, MANIFEST)):
            return (
                f"has no {MANIFEST} from 'patchgrid extract', the mark of a patch folder "
                f"patchgrid wrote"
            )
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


def _is_manifest(path: str) -> bool:
    """Whether ``path`` is the manifest of a patch folder from 'patchgrid extract'."""
    try:
        with builtins.open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("patchgrid"), dict)


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
def host() -> str:
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
        found = SCRATCH.fullmatch(entry.name)
        if (
            found is not None
            and found["host"] == host()
            and not _alive(int(found["pid"]))
            and entry.is_dir(follow_symlinks=False)
        ):
            remove(entry.path)


def remove(folder: str) -> None:
    """Remove ``folder``, again while anything still writing into it brings it back."""
    for _ in range(100):
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.lexists(folder):
            return
        time.sleep(0.01)


def settle_writers(timeout: float = SETTLE_S) -> None:
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
def signals_held(resend: bool = True) -> Iterator[None]:
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


def rename2(source: str, target: str, flags: int) -> bool:
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


def move_new(tmp: str, target: str) -> None:
    """Move ``tmp`` to ``target``, which must not exist, even if it appears meanwhile."""
    try:
        if rename2(tmp, target, _RENAME_NOREPLACE):
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
    if rename2(tmp, target, _RENAME_EXCHANGE):
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
    target: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    check: Callable[..., None] | None = None,
) -> Iterator[str]:
    """A temporary path beside ``target`` that becomes ``target`` only if the block succeeds.

    ``check(target, overwrite=...)`` refuses an output that must not be written: called
    before any work with ``overwrite``, and again with ``overwrite=True`` just before an
    existing ``target`` is replaced. An output that appears at ``target`` while the block
    runs is kept (an error) unless ``overwrite``.
    """
    target = os.path.abspath(target)
    if check is not None:
        check(target, overwrite=overwrite)
    parent = os.path.dirname(target) or "."
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"the folder {parent!r} does not exist")
    _sweep(parent)
    name = os.path.basename(target)
    scratch = tempfile.mkdtemp(
        prefix=f".{name[:80]}.patchgrid-{host()}-{os.getpid()}-", suffix=".tmp", dir=parent
    )
    tmp = os.path.join(scratch, name)
    try:
        yield tmp
        with signals_held():
            try:
                if overwrite and os.path.lexists(target):
                    if check is not None:
                        check(target, overwrite=True)
                    _move_over(tmp, target, scratch)
                else:
                    move_new(tmp, target)
                written.append(target)
            finally:
                remove(scratch)
    except BaseException:
        with signals_held(resend=False):
            settle_writers()
            remove(scratch)
        raise
