"""The command line: info, extract, merge, apply, preview and demo."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
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
        default="drop",
        help="drop, pad, shift or even (per axis: shift,shift,pad)",
    )
    p.add_argument(
        "--axes",
        type=_ints,
        default=None,
        help="tiled axes, e.g. 1,2,3 (default: the last len(size), or all)",
    )
    p.add_argument(
        "--pad-mode", default="constant", help="a numpy.pad mode for edge=pad (default constant)"
    )
    p.add_argument(
        "--pad-value", type=float, default=0, help="value of pad-mode constant (default 0)"
    )


def _grid(shape: tuple[int, ...], args: argparse.Namespace) -> Any:
    import patchgrid as pg

    value = int(args.pad_value) if float(args.pad_value).is_integer() else args.pad_value
    return pg.PatchGrid(
        shape,
        args.size,
        args.stride,
        axes=args.axes,
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
            source = f"{args.image} ({img.format})"
    else:
        shape = args.shape if isinstance(args.shape, tuple) else (args.shape,)
        dtype, spacing, source = np.dtype(args.dtype), (1.0,) * len(shape), "--shape"
    grid = _grid(shape, args)
    patch_bytes = len(grid) * int(np.prod(grid.patch_shape)) * dtype.itemsize
    image_bytes = int(np.prod(shape)) * dtype.itemsize
    cover = pg.coverage(grid)
    print(f"image:    {source}: shape {shape}, {dtype}, {_mib(image_bytes)}, spacing {spacing}")
    print(f"grid:     size {grid.size}, stride {grid.stride}, axes {grid.axes}, edge {grid.edge}")
    print(f"patches:  counts {grid.counts}, {len(grid)} patches of shape {grid.patch_shape}")
    pads = [(a, after) for a, (_, after) in enumerate(grid.pad_width) if after]
    print(
        "padding:  "
        + (", ".join(f"{n} voxels after axis {a}" for a, n in pads) if pads else "none")
    )
    print(
        f"coverage: {'every voxel' if grid.covers else 'NOT every voxel (see --edge)'}; "
        f"{int(cover.min())} to {int(cover.max())} patches per voxel"
    )
    kind = "a view costs nothing" if grid.is_regular else "this grid gathers (not a view)"
    print(
        f"memory:   {_mib(patch_bytes)} as a copy "
        f"({patch_bytes / max(image_bytes, 1):.1f}x the image); {kind}"
    )
    return 0


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
    from patchgrid.apply import _Reader
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
        grid = _grid(img.shape, args)
        reader = _Reader(img, grid, [0] * len(grid.axes), NUMPY)
        t0 = time.perf_counter()
        with (
            atomic_path(out.rstrip("/"), overwrite=args.overwrite) as tmp,
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
    """One zarr group: patches (N, *patch), starts (N, k), and everything merge needs."""
    zarr = importlib.import_module("zarr")
    root = zarr.open_group(path, mode="w")
    n = len(grid)
    patches = root.create_array(
        "patches", shape=(n, *grid.patch_shape), dtype=img.dtype, chunks=(1, *grid.patch_shape)
    )
    root.create_array("starts", data=grid.starts().astype(np.int64))
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
    for lo in range(0, n, batch):
        ids = range(lo, min(lo + batch, n))
        patches[lo : lo + len(ids)] = np.stack([reader.read(i) for i in ids])
        if bar is not None:
            bar.update(len(ids))


# --------------------------------------------------------------------------------------- merge


def _open_store(path: str) -> tuple[Any, Any, dict[str, Any]]:
    import patchgrid as pg
    from patchgrid.io import _need

    zarr = _need("zarr")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such patch store: {path!r}")
    try:
        root = zarr.open_group(path, mode="r")
        meta = dict(root.attrs["patchgrid"])
        patches = root["patches"]
    except Exception:
        raise PatchgridError(
            f"{path!r} is not a patch store written by 'patchgrid extract'"
        ) from None
    g = meta["grid"]
    grid = pg.PatchGrid(
        tuple(g["shape"]),
        tuple(g["size"]),
        tuple(g["stride"]),
        axes=tuple(g["axes"]),
        edge=tuple(g["edge"]),
        pad_mode=g["pad_mode"],
        pad_value=g["pad_value"],
    )
    if tuple(patches.shape) != (len(grid), *patches.shape[1:]):
        raise PatchgridError(
            f"{path!r} holds {patches.shape[0]} patches but its grid has {len(grid)}"
        )
    return grid, patches, meta["source"]


@contextlib.contextmanager
def _sink(
    path: str, shape: tuple[int, ...], dtype: Any, spacing: Any, affine: Any, overwrite: bool
) -> Iterator[Any]:
    """An array to merge into that becomes the file ``path``: on disk where the format allows
    (npy, zarr, HDF5: bounded memory), in memory for NIfTI and TIFF (written at the end)."""
    import patchgrid as pg
    from patchgrid.io import _attrs, _chunks_for, _need, atomic_path, check_dataset, split_path

    file, fmt, dataset = split_path(path)
    dtype = np.dtype(dtype)
    keep = fmt == "hdf5" and os.path.exists(file)
    if keep:
        check_dataset(file, dataset, overwrite)  # the file's other datasets stay
    with atomic_path(file, overwrite=overwrite or keep) as tmp:
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
    from patchgrid.merge import merge_tiled

    grid, patches, source = _open_store(args.patches)
    n = len(grid)
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

    fn = load_function(args.model)
    kw = dict(
        axes=args.axes,
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
        # The model's output over one patch-sized corner tells the output's layout and dtype.
        probe = pg.apply(
            fn, img[_probe_region(img.shape, args)], args.size, args.stride, progress=False, **kw
        )
        axes = pg.PatchGrid(img.shape, args.size, axes=args.axes, edge="pad").axes
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


def _probe_region(shape: Sequence[int], args: argparse.Namespace) -> tuple[slice, ...]:
    import patchgrid as pg

    grid = pg.PatchGrid(shape, args.size, axes=args.axes, edge="pad")
    key = [slice(None)] * len(shape)
    for a, p in zip(grid.axes, grid.size):
        key[a] = slice(0, min(p, shape[a]))
    return tuple(key)


# ------------------------------------------------------------------------------------- preview


def _preview(args: argparse.Namespace) -> int:
    import patchgrid as pg
    from patchgrid.io import _need
    from patchgrid.plot import preview

    _need("matplotlib")
    if not args.output.lower().endswith(".png"):
        raise PatchgridError(f"-o must be a .png file, got {args.output!r}")
    if os.path.exists(args.output) and not args.overwrite:
        raise FileExistsError(f"{args.output!r} exists; pass --overwrite to replace it")
    with pg.open(args.image) as img:
        grid = _grid(img.shape, args)
        preview(img, grid, args.output)
    print(f"preview: {grid}")
    print(f"wrote:   {args.output}")
    return 0


# ---------------------------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    import patchgrid as pg

    folder = os.path.abspath(args.dir)
    os.makedirs(folder, exist_ok=True)
    shape = args.shape if isinstance(args.shape, tuple) else (args.shape,) * 3
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
    edge = "" if args.edge == "drop" else f", edge={args.edge!r}"
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
    pg.save(source, volume, spacing=(1.0, 1.0, 2.0), overwrite=True)
    lines.append(f"  {source}: the volume as NIfTI (spacing 1 x 1 x 2)")
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
        type=_ints,
        default=None,
        help="describe a grid over this shape instead of a file",
    )
    p.add_argument("--dtype", default="float32", help="dtype for --shape (default float32)")
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
        "--batch", type=int, default=16, help="patches read and written at a time (default 16)"
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
    p.add_argument("--window", default="uniform", help="uniform, gaussian, hann or triangular")
    p.add_argument("--reduce", default="mean", help="mean, sum, max, min or argmax")
    p.add_argument("--dtype", default=None, help="output dtype (default: as merge decides)")
    p.add_argument("--fill", type=float, default=0, help="value of voxels no patch covers")
    p.add_argument("--batch", type=int, default=16, help="patches read at a time")
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
    p.add_argument(
        "--window", default=None, help="blending window (default gaussian; uniform for max and min)"
    )
    p.add_argument("--reduce", default="mean", help="mean, sum, max, min or argmax")
    p.add_argument("--batch-size", type=int, default=4, help="patches per call (default 4)")
    p.add_argument("--margin", type=_ints, default=0, help="voxels per side the model leaves out")
    p.add_argument(
        "--scale", type=_numbers, default=1, help="output voxels per input voxel: 2, 0.25"
    )
    p.add_argument("--dtype", default=None, help="output dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _grid_args(p)
    p.set_defaults(run=_apply, edge="shift")

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
        "--shape", type=_ints, default=(10, 20, 30), help="volume shape (default 10,20,30)"
    )
    p.add_argument("--size", type=_ints, default=4, help="patch size (default 4)")
    p.add_argument("--stride", type=_ints, default=2, help="stride (default 2)")
    p.add_argument("--edge", type=_edges, default="drop", help="drop, pad, shift or even")
    p.add_argument("--window", default="uniform", help="uniform, gaussian, hann or triangular")
    p.add_argument("--dir", default="patchgrid-demo", help="where to write the demo's files")
    p.set_defaults(run=_demo)
    return parser


def console() -> None:
    """The ``patchgrid`` command: :func:`main` in a process of its own."""
    from .io import tune_allocator

    tune_allocator()  # the command owns its process: keep resident memory flat
    sys.exit(main())


def main(argv: Sequence[str] | None = None, *, quiet: bool = False) -> int:
    """Run the command line; returns the exit status. Errors print one line, no traceback."""
    args = _parser().parse_args(argv)
    # The command line reports file errors itself, in one line: quiet the readers' own logs.
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    try:
        if quiet:
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                return int(args.run(args))
        return int(args.run(args))
    except KeyboardInterrupt:
        print(f"patchgrid {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (PatchgridError, ValueError, TypeError, OSError, ImportError, EOFError) as exc:
        if quiet:
            raise
        print(f"patchgrid {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # an error in a user's model, say: one line still, with its type
        if quiet:
            raise
        print(f"patchgrid {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
