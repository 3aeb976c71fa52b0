"""L5: the patch store of ``patchgrid extract``: written, opened, checked against itself.

A store is one zarr group: ``patches`` (N, *patch), ``starts`` (N, k) and a ``patchgrid``
attribute with the grid and the source's dtype, spacing and affine, written last so that a
store without it was never finished. :func:`open_store` refuses a store whose parts disagree
(attributes, corners, patches lost on disk) without reading the patches: a merge of it would
be silently wrong.

Imports: ``_checks``, ``grid``, ``io`` (zarr through ``io.need``, when a store is used).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ._checks import PatchgridError
from ._progress import Progress
from .grid import PatchGrid
from .io import need


def write_store(
    path: str, img: Any, grid: PatchGrid, reader: Any, batch: int, bar: Progress
) -> None:
    """One zarr group: patches (N, *patch), starts (N, k), and everything merge needs.

    Every patch is stored, even one that is all zeros, so that merge can tell a lost chunk
    from a patch of zeros; the attributes are written last, so that a store without them
    was never finished.
    """
    zarr = need("zarr")
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
    root.attrs["patchgrid"] = {
        "version": 1,
        "grid": {
            "shape": list(grid.shape),
            "size": list(grid.size),
            "stride": list(grid.stride),
            "axes": list(grid.axes),
            "edge": list(grid.edge),
            "pad_mode": grid.pad_mode,
            "pad_value": grid.pad_value,
        },
        "source": {
            "path": os.path.basename(img.path),
            "format": img.format,
            "dtype": str(img.dtype),
            "spacing": list(img.spacing),
            "affine": None if img.affine is None else np.asarray(img.affine).tolist(),
        },
    }


def open_store(path: str) -> tuple[Any, Any, dict[str, Any]]:
    """The grid, the patches and the source's metadata of a store from ``extract``, checked
    against themselves (attributes, corners, chunks on disk) without reading the patches."""
    zarr = need("zarr")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such patch store: {path!r}")
    try:
        root = zarr.open_group(path, mode="r")
        names = set(root.array_keys())
        meta = root.attrs.get("patchgrid")
    except Exception:
        raise PatchgridError(
            f"{path!r} is not a patch store written by 'patchgrid extract': "
            f"it is not a zarr group (its zarr.json is missing or unreadable)"
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
    try:
        g, source = meta["grid"], meta["source"]
        patches, starts = root["patches"], root["starts"]
        grid = PatchGrid(
            tuple(g["shape"]),
            tuple(g["size"]),
            tuple(g["stride"]),
            axes=tuple(g["axes"]),
            edge=tuple(g["edge"]),
            pad_mode=g["pad_mode"],
            pad_value=g["pad_value"],
        )
    except KeyError as exc:
        raise PatchgridError(f"patch store {path!r} lacks {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise PatchgridError(
            f"patch store {path!r}: the grid in its 'patchgrid' attribute is not valid: {exc}"
        ) from None
    check_store(path, grid, patches, starts, source)
    return grid, patches, source


def check_store(path: str, grid: Any, patches: Any, starts: Any, source: Any) -> None:
    """Refuse a store whose parts disagree: a merge of it would be silently wrong."""
    where = f"patch store {path!r}"
    want = (len(grid), *grid.patch_shape)
    if tuple(patches.shape) != want:
        raise PatchgridError(
            f"{where} holds patches {tuple(patches.shape)} but the grid in its attributes "
            f"({grid}) makes {want}; the attributes or the patches were changed"
        )
    try:
        dtype = np.dtype(source["dtype"])
    except (KeyError, TypeError):
        raise PatchgridError(
            f"{where}: its 'source' attribute has no valid dtype, got {source.get('dtype')!r}"
        ) from None
    if patches.dtype.newbyteorder("=") != dtype.newbyteorder("="):  # zarr stores native order
        raise PatchgridError(
            f"{where} holds {patches.dtype} patches but its attributes say the source is "
            f"{dtype}; the attributes or the patches were changed"
        )
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
    expected = grid.starts()
    if tuple(starts.shape) != expected.shape:
        raise PatchgridError(
            f"{where} holds starts {tuple(starts.shape)} but its grid has {expected.shape}; "
            f"the attributes or the starts were changed"
        )
    stored = np.asarray(starts[...])
    differ = np.flatnonzero((stored != expected).any(axis=1))
    if len(differ):
        i = int(differ[0])
        raise PatchgridError(
            f"{where}: {len(differ)} stored patch corners differ from its grid's ({grid}), "
            f"first patch {i}: stored {tuple(stored[i].tolist())}, grid "
            f"{tuple(expected[i].tolist())}; the attributes or the starts were changed"
        )
    lost = missing_chunks(os.path.join(path, "patches"), patches)
    if lost:
        shown = ", ".join(map(str, lost[:5])) + (
            f" and {len(lost) - 5} more" if len(lost) > 5 else ""
        )
        raise PatchgridError(
            f"{where} lacks {len(lost)} of its {len(grid)} patches on disk (patches {shown}); "
            f"they would merge as zeros: extract again"
        )


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
