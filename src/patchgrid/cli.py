"""The command line: info, extract, merge, apply, preview and demo."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from ._checks import PatchgridError

SUFFIX = {"nii": ".nii.gz", "tif": ".tif", "npy": ".npy"}


def _ints(text: str) -> tuple[int, ...] | int:
    """``64`` or ``64,64,32``."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer or comma-separated integers like 64,64,32, got {text!r}"
        ) from None
    return parts[0] if len(parts) == 1 else tuple(parts)


def _positive_int(text: str) -> int:
    """A count such as ``--batch 16``: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _positive_ints(text: str) -> tuple[int, ...] | int:
    """A shape such as ``--shape 64,64,32``: every length at least 1."""
    value = _ints(text)
    if any(v < 1 for v in (value if isinstance(value, tuple) else (value,))):
        raise argparse.ArgumentTypeError(
            f"expected lengths of at least 1 like 64 or 64,64,32, got {text!r}"
        )
    return value


def _numbers(text: str) -> Any:
    """``2``, ``0.25``, ``1/4`` or ``2,2,1``."""
    try:
        parts = [Fraction(p) for p in text.split(",")]
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"expected numbers like 2, 0.25 or 1/4, got {text!r}"
        ) from None
    values = [int(p) if p.denominator == 1 else p for p in parts]
    return values[0] if len(values) == 1 else tuple(values)


def _edges(text: str) -> str | tuple[str, ...]:
    parts = text.split(",")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def _size(nbytes: float) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30)):
        if nbytes >= 1 << shift:
            return f"{nbytes / 2**shift:,.1f} {unit}"
    return _mib(nbytes)


def _memory_available() -> int | None:
    """Bytes of memory this process may still take: Linux's MemAvailable (or the free
    physical pages where there is no /proc/meminfo), within a cgroup's limit; None where the
    system does not say."""
    have = None
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                have = int(line.split()[1]) * 1024
                break
    if have is None:
        try:
            have = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return None
    with contextlib.suppress(OSError, ValueError):
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            have = min(have, int(limit) - used)
    return max(int(have), 0)


def _check_memory(need: int, what: str, hint: str) -> None:
    """Refuse, before any work, a job whose arrays would not fit in memory."""
    have = _memory_available()
    if have is not None and need > have:
        raise PatchgridError(
            f"{what} needs {_size(need)} of memory, more than the {_size(have)} available "
            f"here; {hint}"
        )


def _progress(total: int, desc: str) -> Any:
    """A tqdm bar on a terminal, nothing elsewhere."""
    if not sys.stderr.isatty():
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="patch", desc=desc, leave=False)


def _grid_args(p: argparse.ArgumentParser, *, size_required: bool = True) -> None:
    p.add_argument("--size", type=_ints, required=size_required, help="patch size: 64 or 64,64,32")
    p.add_argument(
        "--stride", type=_ints, default=None, help="step between patches (default: size)"
    )
    p.add_argument(
        "--edge",
        type=_edges,
        default="shift",
        help="drop, pad, shift or even, or one per axis: shift,shift,pad (default: shift, "
        "the last patch moved back to end at the border)",
    )
    p.add_argument(
        "--axes",
        type=_ints,
        default=None,
        help="tiled axes, e.g. 0,1,2 (default: a NIfTI file's spatial axes, the first three "
        "or the first len(size); for other images every axis, or the last len(size))",
    )
    p.add_argument(
        "--pad-mode", default="constant", help="a numpy.pad mode for edge=pad (default: constant)"
    )
    p.add_argument(
        "--pad-value", type=float, default=0, help="value of pad-mode constant (default: 0)"
    )


def _axes(ndim: int, fmt: str | None, args: argparse.Namespace) -> Any:
    """The tiled axes: ``--axes`` where given, else a NIfTI file's spatial axes (the first
    three: a fourth is time, a fifth holds components), else the library's choice."""
    if args.axes is not None or fmt != "nifti":
        return args.axes
    k = 3
    for value in (args.size, args.stride):
        if isinstance(value, tuple):
            k = len(value)
            break
    return tuple(range(k)) if k <= ndim else None


def _grid(shape: tuple[int, ...], args: argparse.Namespace, fmt: str | None = None) -> Any:
    import patchgrid as pg

    value = int(args.pad_value) if float(args.pad_value).is_integer() else args.pad_value
    return pg.PatchGrid(
        shape,
        args.size,
        args.stride,
        axes=_axes(len(shape), fmt, args),
        edge=args.edge,
        pad_mode=args.pad_mode,
        pad_value=value,
    )


# ---------------------------------------------------------------------------------------- info


def _info(args: argparse.Namespace) -> int:
    import patchgrid as pg

    if args.image is None and args.shape is None:
        raise PatchgridError("give an IMAGE file or --shape")
    if args.image is not None:
        with pg.open(args.image) as img:
            shape, dtype, spacing = img.shape, img.dtype, img.spacing
            source, fmt = f"{args.image} ({img.format})", img.format
    else:
        shape = args.shape if isinstance(args.shape, tuple) else (args.shape,)
        dtype, spacing, source, fmt = np.dtype(args.dtype), (1.0,) * len(shape), "--shape", None
    grid = _grid(shape, args, fmt)
    patch_bytes = len(grid) * math.prod(grid.patch_shape) * dtype.itemsize
    image_bytes = math.prod(shape) * dtype.itemsize
    print(f"image:    {source}: shape {shape}, {dtype}, {_size(image_bytes)}, spacing {spacing}")
    print(f"grid:     size {grid.size}, stride {grid.stride}, axes {grid.axes}, edge {grid.edge}")
    print(f"patches:  counts {grid.counts}, {len(grid)} patches of shape {grid.patch_shape}")
    pads = [(a, after) for a, (_, after) in enumerate(grid.pad_width) if after]
    print(
        "padding:  "
        + (", ".join(f"{n} voxels after axis {a}" for a, n in pads) if pads else "none")
    )
    print(f"coverage: {_coverage_summary(grid)}")
    kind = "a view costs nothing" if grid.is_regular else "this grid gathers (not a view)"
    have = _memory_available()
    more = (
        f", more than the {_size(have)} of memory available here"
        if have is not None and patch_bytes > have
        else ""
    )
    print(
        f"memory:   {_size(patch_bytes)} as a copy "
        f"({patch_bytes / max(image_bytes, 1):.1f}x the image{more}); {kind}"
    )
    return 0


def _profiles(grid: Any) -> list[np.ndarray]:
    """Patches over each voxel along each tiled axis, padding left out. The grid is a product
    of per-axis starts, so a voxel lies in the product of its axes' entries: summaries of the
    whole image follow from these, never from a volume as large as the image."""
    profiles = []
    for j, a in enumerate(grid.axes):
        length, size = grid.shape[a], grid.size[j]
        steps = np.zeros(length + 1, dtype=np.int64)
        for start in grid.axis_starts(j).tolist():
            steps[min(start, length)] += 1
            steps[min(start + size, length)] -= 1
        profiles.append(np.cumsum(steps[:-1]))
    return profiles


def _uncovered(grid: Any) -> tuple[int, int]:
    """(voxels no patch covers, voxels of the image)."""
    return grid.uncovered, math.prod(grid.shape)


def _coverage_summary(grid: Any) -> str:
    profiles = _profiles(grid)
    if any(len(p) == 0 for p in profiles):
        return "the image has no voxels"
    low = math.prod(int(p.min()) for p in profiles)
    high = math.prod(int(p.max()) for p in profiles)
    mean = math.prod(float(p.mean()) for p in profiles)
    missing, total = _uncovered(grid)
    where = (
        "every voxel"
        if not missing
        else f"NOT every voxel: {missing:,} of {total:,} lie in no patch (see --edge)"
    )
    return f"{where}; {low} to {high} patches per voxel, {mean:.2f} on average"


# ------------------------------------------------------------------------------------- extract


def _patch_name(pos: Sequence[int], counts: Sequence[int]) -> str:
    width = [max(3, len(str(c - 1))) for c in counts]
    return "patch_" + "_".join(f"{p:0{w}d}" for p, w in zip(pos, width))


def _shifted_affine(affine: Any, grid: Any, start: Sequence[int]) -> Any:
    """The affine of a patch whose corner is at ``start``: the image's, moved to the corner."""
    if affine is None:
        return None
    corner = np.zeros(3)
    for j, a in enumerate(grid.axes):
        if a < 3:
            corner[a] = start[j]
    moved = np.array(affine, dtype=np.float64)
    moved[:3, 3] = affine[:3, 3] + affine[:3, :3] @ corner
    return moved


def _extract(args: argparse.Namespace) -> int:
    import patchgrid as pg
    from patchgrid._apply import _Reader
    from patchgrid.backends import NUMPY
    from patchgrid.io import atomic_path

    fmt = args.format
    out = args.output
    store = fmt is None and out.rstrip("/").lower().endswith(".zarr")
    to_dir = not store and (fmt is not None or out.endswith(("/", os.sep)))
    if not store and not to_dir:
        raise PatchgridError(
            f"-o must be a .zarr store or a folder (with --format nii|tif|npy), got {out!r}"
        )
    with pg.open(args.image) as img:
        grid = _grid(img.shape, args, img.format)
        # A batch is read patch by patch, then stacked; a file per patch holds one at a time.
        per = 1 if to_dir else args.batch
        patch = math.prod(grid.patch_shape) * img.dtype.itemsize
        have = _memory_available()
        fits = 0 if have is None else (have // max(patch, 1) - 1) // 2
        _check_memory(
            (2 * per + 1) * patch,
            f"extracting {per} patch{'es' if per > 1 else ''} of shape {grid.patch_shape} "
            f"{img.dtype} at a time",
            f"lower --batch to {fits}, or use a smaller --size" if fits else "use a smaller --size",
        )
        reader = _Reader(img, grid, [0] * len(grid.axes), NUMPY)
        t0 = time.perf_counter()
        with (
            atomic_path(
                out.rstrip("/") or out,
                overwrite=args.overwrite,
                kind="zarr" if store else "patches",
                inputs=[args.image],
            ) as tmp,
            _progress(len(grid), "extract") as bar,
        ):
            if to_dir:
                os.makedirs(tmp)
                ext = SUFFIX[fmt or "npy"]
                for i in range(len(grid)):
                    pos = grid.position(i)
                    start = [int(grid.axis_starts(j)[p]) for j, p in enumerate(pos)]
                    path = os.path.join(tmp, _patch_name(pos, grid.counts) + ext)
                    pg.save(
                        path,
                        reader.read(i),
                        spacing=img.spacing,
                        affine=_shifted_affine(img.affine, grid, start),
                    )
                    if bar is not None:
                        bar.update(1)
                written = f"{len(grid)} {ext} files in {out}"
            else:
                _write_store(tmp, img, grid, reader, args.batch, bar)
                n, k = len(grid), len(grid.axes)
                written = f"{out}: patches {(n, *grid.patch_shape)}, starts {(n, k)}"
    print(
        f"extract: {len(grid)} patches of {grid.patch_shape} from {args.image} "
        f"({time.perf_counter() - t0:.2f} s)"
    )
    print(f"wrote:   {written}")
    return 0


def _write_store(path: str, img: Any, grid: Any, reader: Any, batch: int, bar: Any) -> None:
    """One zarr group: patches (N, *patch), starts (N, k), and everything merge needs.

    Every patch is stored, even one that is all zeros, so that merge can tell a lost chunk
    from a patch of zeros; the attributes are written last, so that a store without them
    was never finished.
    """
    zarr = importlib.import_module("zarr")
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
        if bar is not None:
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


# --------------------------------------------------------------------------------------- merge


def _open_store(path: str) -> tuple[Any, Any, dict[str, Any]]:
    """The grid, the patches and the source's metadata of a store from ``extract``, checked
    against themselves (attributes, corners, chunks on disk) without reading the patches."""
    import patchgrid as pg
    from patchgrid.io import _need

    zarr = _need("zarr")
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
        grid = pg.PatchGrid(
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
    _check_store(path, grid, patches, starts, source)
    return grid, patches, source


def _check_store(path: str, grid: Any, patches: Any, starts: Any, source: Any) -> None:
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
    lost = _missing_chunks(os.path.join(path, "patches"), patches)
    if lost:
        shown = ", ".join(map(str, lost[:5])) + (
            f" and {len(lost) - 5} more" if len(lost) > 5 else ""
        )
        raise PatchgridError(
            f"{where} lacks {len(lost)} of its {len(grid)} patches on disk (patches {shown}); "
            f"they would merge as zeros: extract again"
        )


def _missing_chunks(folder: str, array: Any) -> list[int]:
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


@contextlib.contextmanager
def _sink(
    path: str, shape: tuple[int, ...], dtype: Any, spacing: Any, affine: Any, overwrite: bool
) -> Iterator[Any]:
    """An array to merge into that becomes the file ``path``: on disk where the format allows
    (npy, zarr, HDF5: bounded memory), in memory for NIfTI and TIFF (written at the end)."""
    import patchgrid as pg
    from patchgrid.io import (
        _attrs,
        _chunks_for,
        _need,
        atomic_path,
        check_dataset,
        check_target,
        split_path,
    )

    file, fmt, dataset = split_path(path)
    dtype = np.dtype(dtype)
    keep = fmt == "hdf5" and os.path.lexists(file)
    name = (dataset or "data") if fmt == "hdf5" else None
    if keep:
        check_target(file, overwrite=True, kind=fmt, dataset=name)
        check_dataset(file, dataset, overwrite)  # the file's other datasets stay
    with atomic_path(file, overwrite=overwrite or keep, dataset=name) as tmp:
        if fmt == "npy":
            mapped = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            yield mapped
            mapped.flush()
            del mapped
        elif fmt == "zarr":
            zarr = _need("zarr")
            out = zarr.open_array(
                tmp, mode="w", shape=shape, dtype=dtype, chunks=_chunks_for(shape, dtype)
            )
            yield out
            out.attrs.update(_attrs(spacing, affine))
        elif fmt == "hdf5":
            h5py = _need("h5py")
            if keep:
                shutil.copy2(file, tmp)
            with h5py.File(tmp, "a") as f:
                name = (dataset or "data").lstrip("/")
                if name in f:
                    del f[name]
                out = f.create_dataset(
                    name, shape=shape, dtype=dtype, chunks=_chunks_for(shape, dtype)
                )
                yield out
                for key, value in _attrs(spacing, affine).items():
                    out.attrs[key] = value
        else:
            out = np.empty(shape, dtype)
            yield out
            pg.save(tmp, out, spacing=spacing, affine=affine)


def _merge(args: argparse.Namespace) -> int:
    import patchgrid as pg
    from patchgrid._tiled import merge_tiled
    from patchgrid.io import split_path

    grid, patches, source = _open_store(args.patches)
    n = len(grid)
    missing, total = _uncovered(grid)
    if missing:
        print(
            f"patchgrid merge: warning: {missing:,} of {total:,} voxels lie in no patch "
            f"(edge {_fmt(grid.edge if len(set(grid.edge)) > 1 else grid.edge[0])}); "
            f"they get --fill {args.fill:g}",
            file=sys.stderr,
        )
    first = np.asarray(patches[0:1])
    reduce_ = args.reduce
    # The source's dtype by default, so that a round trip gives the source back exactly
    # (means into an integer dtype are rounded to the nearest value).
    dtype = args.dtype or (source["dtype"] if reduce_ in ("mean", "max", "min") else None)
    probe = pg.Merger(grid, reduce=reduce_, window=args.window, dtype=dtype)
    probe._start(first, tuple(first.shape[1:]))
    spacing = source.get("spacing") or [1.0] * grid.ndim
    if reduce_ == "argmax" and probe._class_axis is not None:
        spacing = [s for a, s in enumerate(spacing) if a != probe._class_axis]
    # NIfTI and TIFF outputs are built in memory; the others are filled on disk tile by tile.
    in_memory = split_path(args.output)[1] in ("nifti", "tiff")
    out_bytes = math.prod(probe._out_shape) * np.dtype(probe._out_dtype).itemsize
    patch = math.prod(grid.patch_shape)
    _check_memory(
        (out_bytes if in_memory else 0)
        + args.batch * patch * first.dtype.itemsize
        + 2 * patch * np.dtype(probe._acc_dtype).itemsize,
        f"merge into {args.output}"
        + (f" ({_size(out_bytes)} built in memory)" if in_memory else ""),
        "write a .zarr, .h5 or .npy output (filled on disk) or lower --batch",
    )
    t0 = time.perf_counter()
    with (
        _sink(
            args.output,
            probe._out_shape,
            probe._out_dtype,
            spacing,
            source.get("affine"),
            args.overwrite,
        ) as out,
        _progress(n, "merge") as bar,
    ):

        def step(done: int, total: int) -> None:
            if bar is not None:
                bar.total = total  # patches reaching two tiles are read twice
                bar.update(done - bar.n)

        # Tile by tile across the plane, so memory does not grow with the image.
        merge_tiled(
            lambda lo, hi: patches[lo:hi],
            grid,
            out,
            reduce=reduce_,
            window=args.window,
            fill=args.fill,
            dtype=probe._out_dtype,
            batch=args.batch,
            progress=step,
        )
    print(
        f"merge: {n} patches from {args.patches} -> {args.output} {probe._out_shape} "
        f"{probe._out_dtype} (window {args.window}, reduce {reduce_}, "
        f"{time.perf_counter() - t0:.2f} s)"
    )
    return 0


# --------------------------------------------------------------------------------------- apply


def load_function(spec: str) -> Callable[[Any], Any]:
    """``module:function`` or ``path/to/file.py:function``."""
    if ":" not in spec:
        raise PatchgridError(
            f"--model must look like module:function or file.py:function, got {spec!r}"
        )
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        if not os.path.exists(where):
            raise FileNotFoundError(f"no such model file: {where!r}")
        loader = importlib.util.spec_from_file_location(os.path.basename(where)[:-3], where)
        if loader is None or loader.loader is None:
            raise PatchgridError(f"cannot load {where!r}")
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise PatchgridError(f"cannot import {where!r} for --model: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise PatchgridError(f"{where!r} has no function {name!r}")
    return fn  # type: ignore[no-any-return]


def _apply(args: argparse.Namespace) -> int:
    import patchgrid as pg
    from patchgrid.io import split_path

    fn = load_function(args.model)
    kw = dict(
        edge=args.edge,
        pad_mode=args.pad_mode,
        pad_value=args.pad_value,
        window=args.window,
        reduce=args.reduce,
        batch_size=args.batch_size,
        margin=args.margin,
        scale=args.scale,
        dtype=args.dtype,
    )
    with pg.open(args.image) as img:
        kw["axes"] = _axes(img.ndim, img.format, args)
        layout = pg.PatchGrid(img.shape, args.size, axes=kw["axes"], edge="pad")
        axes = layout.axes
        # The model's output over one patch-sized corner tells the output's layout and dtype.
        probe = pg.apply(
            fn, img[_probe_region(layout)], args.size, args.stride, progress=False, **kw
        )
        scale = args.scale if isinstance(args.scale, tuple) else (args.scale,) * len(axes)
        free = [a for a in range(img.ndim) if a not in axes]
        keep = [a for a in range(img.ndim) if not (args.reduce == "argmax" and a == free[-1])]
        out_shape, spacing = list(probe.shape), []
        for pos, a in enumerate(keep):
            if a in axes:
                f = Fraction(scale[axes.index(a)])
                out_shape[pos] = int(img.shape[a] * f)
                spacing.append(img.spacing[a] / float(f))
            else:
                spacing.append(img.spacing[a])
        affine = _scaled_affine(img.affine, axes, scale)
        # A batch in, the model's output and its weighted float64 copy; NIfTI and TIFF
        # outputs are built whole in memory.
        in_memory = split_path(args.output)[1] in ("nifti", "tiff")
        out_bytes = math.prod(out_shape) * probe.dtype.itemsize
        _check_memory(
            args.batch_size * math.prod(layout.patch_shape) * (img.dtype.itemsize + 16)
            + (out_bytes if in_memory else 0),
            f"apply of {args.batch_size} patches at a time"
            + (f" into {args.output} ({_size(out_bytes)} built in memory)" if in_memory else ""),
            "lower --batch-size" + (" or write a .zarr, .h5 or .npy output" if in_memory else ""),
        )
        t0 = time.perf_counter()
        with _sink(
            args.output, tuple(out_shape), probe.dtype, spacing, affine, args.overwrite
        ) as out:
            pg.apply(fn, img, args.size, args.stride, out=out, progress=None, **kw)
    print(
        f"apply: {args.model} over {args.image} {img.shape} -> {args.output} {tuple(out_shape)} "
        f"{probe.dtype} ({time.perf_counter() - t0:.2f} s)"
    )
    return 0


def _scaled_affine(affine: Any, axes: Sequence[int], scale: Sequence[Any]) -> Any:
    """The affine of an output whose voxels are ``scale`` times smaller along ``axes``."""
    if affine is None:
        return None
    m = np.eye(4)
    for a, f in zip(axes, scale):
        if a < 3 and f != 1:
            m[a, a] = 1 / float(f)
            m[a, 3] = (1 / float(f) - 1) / 2  # voxel centres stay where they were
    return np.asarray(affine) @ m


def _probe_region(grid: Any) -> tuple[slice, ...]:
    """One patch-sized corner of the image (less where the image is smaller)."""
    key = [slice(None)] * grid.ndim
    for a, p in zip(grid.axes, grid.size):
        key[a] = slice(0, min(p, grid.shape[a]))
    return tuple(key)


# ------------------------------------------------------------------------------------- preview


def _preview(args: argparse.Namespace) -> int:
    import patchgrid as pg
    from patchgrid.io import _need, atomic_path
    from patchgrid.plot import preview

    _need("matplotlib")
    if not args.output.lower().endswith(".png"):
        raise PatchgridError(f"-o must be a .png file, got {args.output!r}")
    with pg.open(args.image) as img:
        grid = _grid(img.shape, args, img.format)
        # The picture's coverage overlay is a float64 volume over the padded tiled axes.
        _check_memory(
            2 * 8 * math.prod(grid.padded_shape[a] for a in grid.axes),
            f"preview of a grid over {grid.shape}",
            "preview a smaller image (a crop of it)",
        )
        with atomic_path(args.output, overwrite=args.overwrite, inputs=[args.image]) as tmp:
            preview(img, grid, tmp)
    print(f"preview: {grid}")
    print(f"wrote:   {args.output}")
    return 0


# ---------------------------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    import patchgrid as pg

    shape = args.shape if isinstance(args.shape, tuple) else (args.shape,) * 3
    # The phantom's float64 coordinate grids and sums, then patches, merges and coverage.
    _check_memory(
        (len(shape) + 8) * 8 * math.prod(shape),
        f"demo over a {' x '.join(map(str, shape))} volume",
        "give a smaller --shape",
    )
    folder = os.path.abspath(args.dir)
    os.makedirs(folder, exist_ok=True)
    volume = _phantom(shape)
    print(f"demo: a synthetic {' x '.join(map(str, shape))} float32 volume (spheres in noise)")
    grid = pg.PatchGrid(volume.shape, size=args.size, stride=args.stride, edge=args.edge)
    print(f"grid: {grid}")
    t0 = time.perf_counter()
    patches = pg.extract(volume, grid)
    t1 = time.perf_counter()
    view = np.shares_memory(patches, volume)
    print(
        f"extract: patches.shape = {patches.shape}, "
        f"{'a read-only view (no copy)' if view else 'a new array'}, {(t1 - t0) * 1e3:.2f} ms"
    )
    starts, centers = grid.starts().tolist(), grid.centers().tolist()
    print(
        f"         first patch: start {tuple(starts[0])}, centre {tuple(centers[0])}; "
        f"last: start {tuple(starts[-1])}, centre {tuple(centers[-1])}"
    )
    t0 = time.perf_counter()
    restored = pg.merge(patches, grid, window=args.window)
    t1 = time.perf_counter()
    cover = pg.coverage(grid)
    covered = np.broadcast_to(cover > 0, volume.shape)
    err = float(np.abs(np.where(covered, restored - volume, 0)).max())
    print(
        f"merge:   window={args.window!r}, {(t1 - t0) * 1e3:.2f} ms, overlaps averaged; "
        f"max |restored - volume| over covered voxels = {err:.2g}"
    )
    print(f"         each voxel lies in {int(cover.min())} to {int(cover.max())} patches")
    if not covered.all():
        print(
            f"         {int((~covered).sum())} trailing voxels are in no patch "
            f"(edge={args.edge!r}); use --edge shift, even or pad to cover them"
        )
    wrote = _demo_files(volume, grid, folder, args)
    print()
    print("in Python:")
    print("    import patchgrid as pg")
    edge = "" if args.edge == "shift" else f", edge={args.edge!r}"
    print(f"    patches = pg.extract(volume, size={args.size}, stride={args.stride}{edge})")
    print(f"    restored = pg.merge(patches, volume.shape, stride={args.stride}{edge})")
    for line in wrote:
        print(line)
    ok = err < 1e-5
    print("round trip:", "exact (to float rounding)" if ok else "MISMATCH")
    return 0 if ok else 1


def _phantom(shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    volume = 0.1 * rng.random(shape)
    for centre, radius, value in (((0.2, -0.3, 0.1), 0.35, 1.0), ((-0.4, 0.4, -0.2), 0.25, 0.6)):
        dist = sum((g - c) ** 2 for g, c in zip(grids, centre[: len(shape)]))
        volume += value * (dist < radius**2)
    return volume.astype(np.float32)


def _demo_files(volume: np.ndarray, grid: Any, folder: str, args: argparse.Namespace) -> list[str]:
    """The same job through files and the command line, where the io and plot extras exist."""
    lines = ["", f"files in {folder}:"]
    missing = [m for m in ("nibabel", "zarr") if importlib.util.find_spec(m) is None]
    if missing:
        return [
            "",
            f"(files and the command line need {', '.join(missing)}: "
            f"pip install 'patchgrid[io,plot]')",
        ]
    import patchgrid as pg

    source = os.path.join(folder, "volume.nii.gz")
    spacing = (1.0,) * (volume.ndim - 1) + (2.0,)
    pg.save(source, volume, spacing=spacing, overwrite=True)
    lines.append(
        f"  {source}: the volume as NIfTI (spacing {' x '.join(f'{s:g}' for s in spacing)})"
    )
    common = [
        "--size",
        _fmt(args.size),
        "--stride",
        _fmt(args.stride),
        "--edge",
        _fmt(args.edge),
        "--overwrite",
    ]
    store = os.path.join(folder, "patches.zarr")
    main(["extract", source, "-o", store, *common], quiet=True)
    lines.append(
        f"  {store}: patchgrid extract {os.path.basename(source)} {' '.join(common)} "
        f"-o patches.zarr"
    )
    restored = os.path.join(folder, "restored.nii.gz")
    main(["merge", store, "-o", restored, "--window", args.window, "--overwrite"], quiet=True)
    with pg.open(restored) as img:
        same = np.array_equal(
            np.asarray(img), pg.merge(pg.extract(volume, grid), grid, window=args.window)
        )
    lines.append(
        f"  {restored}: patchgrid merge patches.zarr -o restored.nii.gz "
        f"({'identical to the in-memory merge' if same else 'DIFFERS from the in-memory merge'})"
    )
    if importlib.util.find_spec("matplotlib") is not None:
        png = os.path.join(folder, "grid.png")
        main(["preview", source, "-o", png, *common], quiet=True)
        lines.append(f"  {png}: patchgrid preview, the grid over three slices")
    return lines


def _fmt(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


# -------------------------------------------------------------------------------------- parser


def _blend_args(p: argparse.ArgumentParser) -> None:
    """--window and --reduce, as merge and apply take them (the library's defaults)."""
    p.add_argument(
        "--window",
        default="uniform",
        help="uniform, gaussian, hann or triangular (default: uniform)",
    )
    p.add_argument("--reduce", default="mean", help="mean, sum, max, min or argmax (default: mean)")


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="patchgrid",
        description="Cut N-dimensional images into patches and put them back together.",
        epilog="Run 'patchgrid COMMAND --help' for each command's options and an example.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "info",
        help="describe a grid over an image: counts, coverage, padding, memory",
        formatter_class=fmt,
        epilog="example:\n  patchgrid info scan.nii.gz --size 64 --stride 32 --edge shift\n"
        "  patchgrid info --shape 256,256,256 --size 64 --stride 48",
    )
    p.add_argument(
        "image", nargs="?", help="image file (.nii, .nii.gz, .tif, .zarr, .h5:dataset, .npy)"
    )
    p.add_argument(
        "--shape",
        type=_positive_ints,
        default=None,
        help="describe a grid over this shape instead of a file",
    )
    p.add_argument("--dtype", default="float32", help="dtype for --shape (default: float32)")
    _grid_args(p)
    p.set_defaults(run=_info)

    p = sub.add_parser(
        "extract",
        help="cut an image into patches: one zarr store, or one file per patch",
        formatter_class=fmt,
        epilog="examples:\n"
        "  patchgrid extract scan.nii.gz --size 64 --stride 32 -o patches.zarr\n"
        "  patchgrid extract scan.nii.gz --size 64 -o patches/ --format nii",
    )
    p.add_argument("image", help="image file")
    p.add_argument("-o", "--output", required=True, help="OUT.zarr, or a folder (with --format)")
    p.add_argument(
        "--format", choices=sorted(SUFFIX), default=None, help="one file per patch in a folder"
    )
    p.add_argument(
        "--batch",
        type=_positive_int,
        default=16,
        help="patches read and written at a time (default: 16)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _grid_args(p)
    p.set_defaults(run=_extract)

    p = sub.add_parser(
        "merge",
        help="put patches from 'extract' back into an image",
        formatter_class=fmt,
        epilog="example:\n  patchgrid merge patches.zarr -o restored.nii.gz --window gaussian",
    )
    p.add_argument("patches", help="a .zarr store written by 'patchgrid extract'")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="output image (.nii.gz, .tif, .zarr, .h5:dataset, .npy)",
    )
    _blend_args(p)
    p.add_argument(
        "--dtype", default=None, help="output dtype (default: the source's, for mean, max, min)"
    )
    p.add_argument(
        "--fill", type=float, default=0, help="value of voxels no patch covers (default: 0)"
    )
    p.add_argument(
        "--batch", type=_positive_int, default=16, help="patches read at a time (default: 16)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(run=_merge)

    p = sub.add_parser(
        "apply",
        help="run a function over every patch and blend the outputs",
        formatter_class=fmt,
        epilog="example:\n"
        "  patchgrid apply scan.nii.gz --model mymodels.py:segment --size 96 --stride 48 \\\n"
        "      --axes 0,1,2 --reduce argmax -o labels.nii.gz\n"
        "The function takes a batch (B, *patch) as a NumPy array and returns (B, *out_patch).",
    )
    p.add_argument("image", help="image file")
    p.add_argument("--model", required=True, help="module:function or path/file.py:function")
    p.add_argument("-o", "--output", required=True, help="output image")
    _blend_args(p)
    p.add_argument(
        "--batch-size", type=_positive_int, default=4, help="patches per call (default: 4)"
    )
    p.add_argument(
        "--margin", type=_ints, default=0, help="voxels per side the model leaves out (default: 0)"
    )
    p.add_argument(
        "--scale",
        type=_numbers,
        default=1,
        help="output voxels per input voxel: 2, 0.25 (default: 1)",
    )
    p.add_argument("--dtype", default=None, help="output dtype (default: the model's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _grid_args(p)
    p.set_defaults(run=_apply)

    p = sub.add_parser(
        "preview",
        help="draw the grid over three orthogonal slices (PNG)",
        formatter_class=fmt,
        epilog="example:\n"
        "  patchgrid preview scan.nii.gz --size 64 --stride 48 --edge shift -o grid.png",
    )
    p.add_argument("image", help="image file")
    p.add_argument("-o", "--output", required=True, help="a .png file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _grid_args(p)
    p.set_defaults(run=_preview)

    p = sub.add_parser(
        "demo",
        help="extract, merge and preview a built-in synthetic volume",
        formatter_class=fmt,
        epilog="example:\n  patchgrid demo\n"
        "  patchgrid demo --shape 10,20,30 --size 4 --stride 2 --window gaussian",
    )
    p.add_argument(
        "--shape",
        type=_positive_ints,
        default=(10, 20, 30),
        help="volume shape (default: 10,20,30)",
    )
    p.add_argument("--size", type=_ints, default=4, help="patch size (default: 4)")
    p.add_argument("--stride", type=_ints, default=2, help="stride (default: 2)")
    p.add_argument(
        "--edge", type=_edges, default="shift", help="drop, pad, shift or even (default: shift)"
    )
    p.add_argument(
        "--window",
        default="uniform",
        help="uniform, gaussian, hann or triangular (default: uniform)",
    )
    p.add_argument(
        "--dir",
        default="patchgrid-demo",
        help="where to write the demo's files (default: patchgrid-demo)",
    )
    p.set_defaults(run=_demo)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, Slurm, Docker), raised as an interrupt so that the same clean-up runs."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def console() -> None:
    """The ``patchgrid`` command: :func:`main` in a process of its own."""
    import signal

    try:
        signal.signal(signal.SIGTERM, _terminate)
        from .io import tune_allocator

        tune_allocator()  # the command owns its process: keep resident memory flat
        code = main()
    except KeyboardInterrupt as exc:  # before main could say so itself
        code = _interrupted("patchgrid", exc, 0)
    # The work is done: a signal now would only cut the interpreter's shutdown short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)


def _interrupted(command: str, exc: BaseException, mark: int) -> int:
    """Say in one line that the command was stopped and what it left (as a rule, nothing:
    outputs are moved into place only when complete); the exit status of the signal."""
    from .io import _settle_writers, _signals_held, _written

    with _signals_held(resend=False):  # a second Ctrl-C does not cut this short
        _settle_writers()  # zarr's writes under way end before the process does
        left = [path for path in _written[mark:] if os.path.lexists(path)]
        what = f"wrote {', '.join(left)} before that" if left else "nothing was written"
        word = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"{command}: {word}; {what}", file=sys.stderr)
    return 128 + (15 if isinstance(exc, Terminated) else 2)


def _check_output(args: argparse.Namespace) -> None:
    """Refuse, before any work, an output the command must not write: a link, its input,
    or (even with --overwrite) an existing file or folder that is not patchgrid's output."""
    from .io import check_dataset, check_target, split_path

    out = getattr(args, "output", None)
    if out is None or not hasattr(args, "overwrite"):
        return
    inputs = [getattr(args, "patches", None) or args.image]
    if args.command == "extract":
        store = args.format is None and out.rstrip("/").lower().endswith(".zarr")
        if store or args.format is not None or out.endswith(("/", os.sep)):
            kind = "zarr" if store else "patches"
            check_target(out.rstrip("/") or out, overwrite=args.overwrite, kind=kind, inputs=inputs)
    elif args.command == "preview":
        if out.lower().endswith(".png"):
            check_target(out, overwrite=args.overwrite, kind="file", inputs=inputs)
    else:
        try:
            file, fmt, dataset = split_path(out)
        except PatchgridError:
            return  # the command says so, in its turn
        if fmt == "hdf5" and os.path.lexists(file):  # a dataset added to a file
            check_target(file, overwrite=True, kind=fmt, inputs=inputs, dataset=dataset or "data")
            check_dataset(file, dataset, args.overwrite)
        else:
            check_target(file, overwrite=args.overwrite, kind=fmt, inputs=inputs)


def main(argv: Sequence[str] | None = None, *, quiet: bool = False) -> int:
    """Run the command line; returns the exit status. Errors print one line, no traceback;
    an interrupt (Ctrl-C, or SIGTERM under :func:`console`) leaves nothing and returns 130
    (143)."""
    from .io import _written

    mark, command = len(_written), "patchgrid"
    try:
        args = _parser().parse_args(argv)
        command = f"patchgrid {args.command}"
        # The command line reports file errors itself, in one line: quiet the readers' logs.
        logging.getLogger("tifffile").setLevel(logging.CRITICAL)
        _check_output(args)
        if quiet:
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                return int(args.run(args))
        return int(args.run(args))
    except KeyboardInterrupt as exc:
        if quiet:
            raise
        return _interrupted(command, exc, mark)
    except (PatchgridError, ValueError, TypeError, OSError, ImportError, EOFError) as exc:
        if quiet:
            raise
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # an error in a user's model, say: one line still, with its type
        if quiet:
            raise
        print(f"{command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
