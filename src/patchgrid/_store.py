"""L5: the patches of ``patchgrid extract``: written, opened, checked against themselves.

Two kinds, both taken by ``patchgrid merge``:

- a **store**, one zarr group: ``patches`` (N, *patch), ``starts`` (N, k) and a ``patchgrid``
  attribute with the grid and the source's metadata (:func:`io.describe`: dtype, spacing,
  affine, a NIfTI header), written last so that a store without it was never finished;
- a **folder** of one file per patch (``--format nii|tif|npy``), each where it sits (a NIfTI
  patch has the source's header moved to its corner), and a ``manifest.json`` holding the
  same as the store's attribute and the files' names and corners, written last (atomically)
  after the patches. The manifest is also the mark by which ``--overwrite`` knows the folder
  as patchgrid's (``_writes.check_target``).

:func:`open_store` refuses patches whose parts disagree (attributes, corners, patches lost
or added on disk) without reading the patches: a merge of them would be silently wrong.

Imports: ``_checks``, ``grid``, ``_progress``, ``io`` (zarr through ``io.need``).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from . import io
from ._checks import PatchgridError
from ._progress import Progress
from .grid import PatchGrid
from .io import need

MANIFEST = "manifest.json"
# The name of a patch file: its position in the grid, and the format's extension.
PATCH_FILE = re.compile(r"patch(_[0-9]+)+\.(npy|nii|nii\.gz|tif)")


def write_store(
    path: str, img: Any, grid: PatchGrid, reader: Any, batch: int, bar: Progress
) -> None:
    """One zarr group: patches (N, *patch), starts (N, k), and everything merge needs.

    Every patch is stored, even one that is all zeros, so that merge can tell a lost chunk
    from a patch of zeros; the attributes are written last, so that a store without them
    was never finished.
    """
    zarr = need("zarr", "writing .zarr")
    root = zarr.open_group(path, mode="w")
    n = len(grid)
    patches = root.create_array(
        "patches",
        shape=(n, *grid.patch_shape),
        dtype=img.dtype,
        chunks=(1, *grid.patch_shape),
        # One file per patch in one folder (c.I.0.0.0): merge lists it to find lost patches.
        chunk_key_encoding={"name": "default", "separator": "."},
        config={"write_empty_chunks": True},
    )
    root.create_array("starts", data=grid.starts().astype(np.int64))
    for lo in range(0, n, batch):
        ids = range(lo, min(lo + batch, n))
        patches[lo : lo + len(ids)] = np.stack([reader.read(i) for i in ids])
        bar.update(len(ids))
    root.attrs["patchgrid"] = {"version": 1, "grid": grid_values(grid), "source": io.describe(img)}


def grid_values(grid: PatchGrid) -> dict[str, Any]:
    """The grid as JSON values."""
    return {
        "shape": list(grid.shape),
        "size": list(grid.size),
        "stride": list(grid.stride),
        "axes": list(grid.axes),
        "edge": list(grid.edge),
        "pad_mode": grid.pad_mode,
        "pad_value": grid.pad_value,
    }


def patch_name(pos: Any, counts: Any) -> str:
    width = [max(3, len(str(c - 1))) for c in counts]
    return "patch_" + "_".join(f"{p:0{w}d}" for p, w in zip(pos, width))


def write_folder(
    path: str, img: Any, grid: PatchGrid, reader: Any, suffix: str, bar: Progress
) -> None:
    """One file per patch in the new folder ``path`` (named by its position in the grid,
    where it sits in the source), then the manifest, atomically."""
    os.makedirs(path)
    files = []
    for i in range(len(grid)):
        pos = grid.position(i)
        corner = [0] * len(grid.shape)
        for j, p in enumerate(pos):
            corner[grid.axes[j]] = int(grid.axis_starts(j)[p])
        files.append(patch_name(pos, grid.counts) + suffix)
        io.save_patch(os.path.join(path, files[-1]), reader.read(i), img, corner)
        bar.update(1)
    manifest = {
        "patchgrid": {
            "version": 1,
            "grid": grid_values(grid),
            "source": io.describe(img),
            "files": files,
            "starts": grid.starts().tolist(),
        }
    }
    part = os.path.join(path, f".{MANIFEST}.part")
    with open(part, "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, os.path.join(path, MANIFEST))


def open_store(path: str) -> tuple[Any, Any, dict[str, Any]]:
    """The grid, the patches and the source's metadata of a store or a folder from
    ``extract``, checked against themselves (attributes, corners, patches on disk) without
    reading the patches."""
    if is_folder(path):
        return open_folder(path)
    zarr = need("zarr", "reading .zarr")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such patch store: {path!r}")
    try:
        root = zarr.open_group(path, mode="r")
        names = set(root.array_keys())
        meta = root.attrs.get("patchgrid")
    except Exception:
        raise PatchgridError(
            f"{path!r} is not a patch store written by 'patchgrid extract': "
            f"it is not a zarr group (its zarr.json is missing or unreadable), nor a folder "
            f"of patch files"
        ) from None
    if meta is None:
        if {"patches", "starts"} <= names:
            raise PatchgridError(
                f"{path!r} is an unfinished patch store: it has no 'patchgrid' attribute, "
                f"which 'patchgrid extract' writes last; extract again"
            )
        raise PatchgridError(
            f"{path!r} is not a patch store written by 'patchgrid extract': "
            f"it has no 'patchgrid' attribute"
        )
    where = f"patch store {path!r}"
    try:
        source, patches, starts = meta["source"], root["patches"], root["starts"]
    except KeyError as exc:
        raise PatchgridError(f"{where} lacks {exc.args[0]!r}") from None
    grid = grid_from(meta, where, "its 'patchgrid' attribute")
    check_store(path, grid, patches, starts, source)
    return grid, patches, source


def is_folder(path: str) -> bool:
    """Whether ``path`` is a folder of patch files (finished or not), not a zarr store."""
    if not os.path.isdir(path) or any(
        os.path.exists(os.path.join(path, m)) for m in ("zarr.json", ".zgroup", ".zarray")
    ):
        return False
    names = os.listdir(path)
    return MANIFEST in names or any(PATCH_FILE.fullmatch(n) for n in names)


def source_like(path: str, source: dict[str, Any], ndim: int) -> io.Metadata:
    """The source's metadata as ``io.save`` and ``io.create_output`` take it for ``like``
    (spacing, affine, dtype, a NIfTI header)."""
    try:
        return io.Metadata.from_dict(source, ndim)
    except PatchgridError:
        raise
    except Exception as exc:  # base64's or nibabel's words about a header that was changed
        raise PatchgridError(
            f"{path!r}: the source's metadata it keeps is not valid: {type(exc).__name__}: {exc}"
        ) from None


def grid_from(meta: Any, where: str, what: str) -> PatchGrid:
    """The grid of a store's attribute or a folder's manifest."""
    try:
        g = meta["grid"]
        return PatchGrid(
            tuple(g["shape"]),
            tuple(g["size"]),
            tuple(g["stride"]),
            axes=tuple(g["axes"]),
            edge=tuple(g["edge"]),
            pad_mode=g["pad_mode"],
            pad_value=g["pad_value"],
        )
    except KeyError as exc:
        raise PatchgridError(f"{where} lacks {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise PatchgridError(f"{where}: the grid in {what} is not valid: {exc}") from None


def check_store(path: str, grid: Any, patches: Any, starts: Any, source: Any) -> None:
    """Refuse a store whose parts disagree: a merge of it would be silently wrong."""
    where = f"patch store {path!r}"
    want = (len(grid), *grid.patch_shape)
    if tuple(patches.shape) != want:
        raise PatchgridError(
            f"{where} holds patches {tuple(patches.shape)} but the grid in its attributes "
            f"({grid}) makes {want}; the attributes or the patches were changed"
        )
    dtype = check_source(where, grid, source)
    if patches.dtype.newbyteorder("=") != dtype.newbyteorder("="):  # zarr stores native order
        raise PatchgridError(
            f"{where} holds {patches.dtype} patches but its attributes say the source is "
            f"{dtype}; the attributes or the patches were changed"
        )
    check_starts(where, grid, starts, "the attributes or the starts were changed")
    lost = missing_chunks(os.path.join(path, "patches"), patches)
    if lost:
        raise PatchgridError(
            f"{where} lacks {len(lost)} of its {len(grid)} patches on disk (patches "
            f"{listed(lost)}); they would merge as zeros: extract again"
        )


def check_source(where: str, grid: Any, source: Any) -> np.dtype:
    """The source's dtype; refuse metadata that does not fit the grid."""
    try:
        dtype: np.dtype = np.dtype(source["dtype"])
    except (KeyError, TypeError):
        raise PatchgridError(
            f"{where}: its 'source' has no valid dtype, got {source.get('dtype')!r}"
        ) from None
    spacing = source.get("spacing")
    if spacing is not None and len(spacing) != grid.ndim:
        raise PatchgridError(
            f"{where}: its source spacing has {len(spacing)} entries but the image has "
            f"{grid.ndim} axes"
        )
    affine = source.get("affine")
    if affine is not None and np.shape(affine) != (4, 4):
        raise PatchgridError(
            f"{where}: its source affine must be 4 x 4, got shape {np.shape(affine)}"
        )
    return dtype


def check_starts(where: str, grid: Any, starts: Any, changed: str) -> None:
    """Refuse stored patch corners that are not the grid's."""
    expected = grid.starts()
    if tuple(np.shape(starts)) != expected.shape:
        raise PatchgridError(
            f"{where} holds starts {tuple(np.shape(starts))} but its grid has "
            f"{expected.shape}; {changed}"
        )
    stored = np.asarray(starts[...])
    differ = np.flatnonzero((stored != expected).any(axis=1))
    if len(differ):
        i = int(differ[0])
        raise PatchgridError(
            f"{where}: {len(differ)} stored patch corners differ from its grid's ({grid}), "
            f"first patch {i}: stored {tuple(stored[i].tolist())}, grid "
            f"{tuple(expected[i].tolist())}; {changed}"
        )


def listed(items: list[Any]) -> str:
    """The first few of ``items``, and how many more."""
    more = f" and {len(items) - 5} more" if len(items) > 5 else ""
    return ", ".join(map(str, items[:5])) + more


def open_folder(path: str) -> tuple[Any, Any, dict[str, Any]]:
    """The grid, the patches and the source's metadata of a folder from ``extract``: its
    manifest checked against itself and against the files in the folder."""
    where = f"patch folder {path!r}"
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise PatchgridError(
            f"{where} has no {MANIFEST}, which 'patchgrid extract' writes last, after the "
            f"patches: it is unfinished or not written by patchgrid; extract again"
        )
    try:
        with open(file) as f:
            meta = json.load(f)["patchgrid"]
        source, files, starts = meta["source"], list(meta["files"]), np.asarray(meta["starts"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        said = f"it lacks {exc}" if isinstance(exc, KeyError) else " ".join(str(exc).split())
        raise PatchgridError(f"{where}: its {MANIFEST} is not valid: {said}") from None
    grid = grid_from(meta, where, f"its {MANIFEST}")
    dtype = check_source(where, grid, source)
    changed = f"its {MANIFEST} was changed; extract again"
    check_starts(where, grid, starts, changed)
    suffix = str(files[0])[len(patch_name(grid.position(0), grid.counts)) :] if files else ""
    names = [patch_name(grid.position(i), grid.counts) + suffix for i in range(len(grid))]
    if files != names or not PATCH_FILE.fullmatch(names[0]):
        raise PatchgridError(
            f"{where}: the files its {MANIFEST} lists are not those of its grid ({grid}); {changed}"
        )
    present = {
        n for n in os.listdir(path) if PATCH_FILE.fullmatch(n) and os.path.isfile(f"{path}/{n}")
    }
    missing, extra = [n for n in files if n not in present], sorted(present - set(files))
    wrong = []
    if missing:
        wrong.append(
            f"{len(missing)} of its {len(files)} patch files are missing ({listed(missing)})"
        )
    if extra:
        wrong.append(f"it holds {len(extra)} patch files that it does not list ({listed(extra)})")
    if wrong:
        raise PatchgridError(
            f"{where} does not match its {MANIFEST}: {'; '.join(wrong)}; extract again"
        )
    return grid, FolderPatches(path, files, grid.patch_shape, dtype), source


class FolderPatches:
    """The patches of a folder as an array ``(N, *patch)``, read file by file: ``[lo:hi]``.
    A file whose shape or dtype is not the manifest's is refused."""

    def __init__(self, path: str, files: list[str], patch: tuple[int, ...], dtype: Any):
        self.path, self.files = path, files
        self.shape = (len(files), *patch)
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: slice) -> np.ndarray:
        names = self.files[key]
        out = np.empty((len(names), *self.shape[1:]), self.dtype)
        for k, name in enumerate(names):
            out[k] = self.read(name)
        return out

    def read(self, name: str) -> np.ndarray:
        file = os.path.join(self.path, name)
        if not os.path.isfile(file):
            raise PatchgridError(f"patch file {file!r} is gone (it was there when merge began)")
        with io.open(file) as img:
            data = np.asarray(img)
        if data.shape != self.shape[1:] or data.dtype.newbyteorder("=") != self.dtype.newbyteorder(
            "="
        ):
            raise PatchgridError(
                f"patch file {file!r} holds {data.shape} {data.dtype} but the folder's "
                f"{MANIFEST} says {self.shape[1:]} {self.dtype}; the file was changed: "
                f"extract again"
            )
        return data


def missing_chunks(folder: str, array: Any) -> list[int]:
    """Indices along axis 0 of the chunks of a zarr array with no object in ``folder``: zarr
    would read them as the fill value. Lists file names, reads no data."""
    per = getattr(array, "shards", None) or array.chunks
    counts = [-(-n // c) for n, c in zip(array.shape, per)]
    present = set()
    for root, _, files in os.walk(folder):
        rel = os.path.relpath(root, folder)
        for name in files:
            key = name if rel == "." else os.path.join(rel, name)
            present.add(key.replace(os.sep, "/"))
    encode = array.metadata.encode_chunk_key
    return sorted({int(c[0]) * per[0] for c in np.ndindex(*counts) if encode(c) not in present})
