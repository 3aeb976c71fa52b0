"""L5: the subcommands of the command line: info, extract, merge, apply, preview and demo.

Each takes the parsed arguments (``cli.py`` builds the parser) and returns the exit status;
each is written over the public API (``pg.open``, ``pg.apply``, ``pg.Merger``...), with the
patch store in ``_store``. What the commands share lives here: the grid from the arguments
(:func:`make_grid`, a NIfTI file's spatial axes by default), the check that a job fits in
memory before any work (:func:`check_memory`), and how values are shown (:func:`as_text`).

Imports: the public API as ``pg``, and ``io``, ``plot``, ``_store``, ``_tiled``, ``_regions``,
``_progress``, ``backends``, ``_checks`` (every layer below L5).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

import patchgrid as pg

from . import _apply, _checks, _resume, _store, _tiled, io, plot
from ._checks import PatchgridError
from ._progress import Progress
from ._regions import Reader
from .backends import NUMPY
from .grid import tiled_axes as grid_axes

# The file of each patch, by --format.
SUFFIX = {"nii": ".nii.gz", "tif": ".tif", "npy": ".npy"}


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def size_text(nbytes: float) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30)):
        if nbytes >= 1 << shift:
            return f"{nbytes / 2**shift:,.1f} {unit}"
    return mib(nbytes)


def memory_available() -> int | None:
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


def check_memory(need: int, what: str, hint: str) -> None:
    """Refuse, before any work, a job whose arrays would not fit in memory."""
    have = memory_available()
    if have is not None and need > have:
        raise PatchgridError(
            f"{what} needs {size_text(need)} of memory, more than the {size_text(have)} available "
            f"here; {hint}"
        )


def tiled_axes(ndim: int, fmt: str | None, args: argparse.Namespace) -> Any:
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


def make_grid(shape: tuple[int, ...], args: argparse.Namespace, fmt: str | None = None) -> Any:
    value = int(args.pad_value) if float(args.pad_value).is_integer() else args.pad_value
    return pg.PatchGrid(
        shape,
        args.size,
        args.stride,
        axes=tiled_axes(len(shape), fmt, args),
        edge=args.edge,
        pad_mode=args.pad_mode,
        pad_value=value,
    )


def info(args: argparse.Namespace) -> int:
    if args.image is None and args.shape is None:
        raise PatchgridError("give an IMAGE file or --shape")
    if args.image is not None:
        with pg.open(args.image) as img:
            shape, dtype, spacing = img.shape, img.dtype, img.spacing
            source, fmt = f"{args.image} ({img.format})", img.format
    else:
        shape = args.shape if isinstance(args.shape, tuple) else (args.shape,)
        dtype, spacing, source, fmt = np.dtype(args.dtype), (1.0,) * len(shape), "--shape", None
    grid = make_grid(shape, args, fmt)
    patch_bytes = len(grid) * math.prod(grid.patch_shape) * dtype.itemsize
    image_bytes = math.prod(shape) * dtype.itemsize
    print(
        f"image:    {source}: shape {shape}, {dtype}, {size_text(image_bytes)}, spacing {spacing}"
    )
    print(f"grid:     size {grid.size}, stride {grid.stride}, axes {grid.axes}, edge {grid.edge}")
    print(f"patches:  counts {grid.counts}, {len(grid)} patches of shape {grid.patch_shape}")
    pads = [(a, after) for a, (_, after) in enumerate(grid.pad_width) if after]
    print(
        "padding:  "
        + (", ".join(f"{n} voxels after axis {a}" for a, n in pads) if pads else "none")
    )
    print(f"coverage: {coverage_summary(grid)}")
    kind = "a view costs nothing" if grid.is_regular else "this grid gathers (not a view)"
    have = memory_available()
    more = (
        f", more than the {size_text(have)} of memory available here"
        if have is not None and patch_bytes > have
        else ""
    )
    print(
        f"memory:   {size_text(patch_bytes)} as a copy "
        f"({patch_bytes / max(image_bytes, 1):.1f}x the image{more}); {kind}"
    )
    return 0


def axis_profiles(grid: Any) -> list[np.ndarray]:
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


def uncovered(grid: Any) -> tuple[int, int]:
    """(voxels no patch covers, voxels of the image)."""
    return grid.uncovered, math.prod(grid.shape)


def coverage_summary(grid: Any) -> str:
    profiles = axis_profiles(grid)
    if any(len(p) == 0 for p in profiles):
        return "the image has no voxels"
    low = math.prod(int(p.min()) for p in profiles)
    high = math.prod(int(p.max()) for p in profiles)
    mean = math.prod(float(p.mean()) for p in profiles)
    missing, total = uncovered(grid)
    where = (
        "every voxel"
        if not missing
        else f"NOT every voxel: {missing:,} of {total:,} lie in no patch (see --edge)"
    )
    return f"{where}; {low} to {high} patches per voxel, {mean:.2f} on average"


def extract(args: argparse.Namespace) -> int:
    fmt = args.format
    out = args.output
    store = fmt is None and out.rstrip("/").lower().endswith(".zarr")
    to_dir = not store and (fmt is not None or out.endswith(("/", os.sep)))
    if not store and not to_dir:
        raise PatchgridError(
            f"-o must be a .zarr store or a folder (with --format nii|tif|npy), got {out!r}"
        )
    with pg.open(args.image) as img:
        grid = make_grid(img.shape, args, img.format)
        # A batch is read patch by patch, then stacked; a file per patch holds one at a time.
        per = 1 if to_dir else args.batch
        patch = math.prod(grid.patch_shape) * img.dtype.itemsize
        have = memory_available()
        fits = 0 if have is None else (have // max(patch, 1) - 1) // 2
        check_memory(
            (2 * per + 1) * patch,
            f"extracting {per} patch{'es' if per > 1 else ''} of shape {grid.patch_shape} "
            f"{img.dtype} at a time",
            f"lower --batch to {fits}, or use a smaller --size" if fits else "use a smaller --size",
        )
        reader = Reader(img, grid, [0] * len(grid.axes), NUMPY)
        t0 = time.perf_counter()
        with (
            io.atomic_path(
                out.rstrip("/") or out,
                overwrite=args.overwrite,
                kind="zarr" if store else "patches",
                inputs=[args.image],
            ) as tmp,
            Progress(None, len(grid), "extract") as bar,
        ):
            if to_dir:
                ext = SUFFIX[fmt or "npy"]
                _store.write_folder(tmp, img, grid, reader, ext, bar)
                written = f"{len(grid)} {ext} files and {_store.MANIFEST} in {out}"
            else:
                _store.write_store(tmp, img, grid, reader, args.batch, bar)
                n, k = len(grid), len(grid.axes)
                written = f"{out}: patches {(n, *grid.patch_shape)}, starts {(n, k)}"
    print(
        f"extract: {len(grid)} patches of {grid.patch_shape} from {args.image} "
        f"({time.perf_counter() - t0:.2f} s)"
    )
    print(f"wrote:   {written}")
    return 0


def merge(args: argparse.Namespace) -> int:
    grid, patches, source = _store.open_store(args.patches)
    n = len(grid)
    missing, total = uncovered(grid)
    if missing:
        print(
            f"patchgrid merge: warning: {missing:,} of {total:,} voxels lie in no patch "
            f"(edge {as_text(grid.edge if len(set(grid.edge)) > 1 else grid.edge[0])}); "
            f"they get --fill {args.fill:g}",
            file=sys.stderr,
        )
    first = np.asarray(patches[0:1])
    reduce_ = args.reduce
    # The source's dtype by default, so that a round trip gives the source back exactly
    # (means into an integer dtype are rounded to the nearest value).
    dtype = args.dtype or (source["dtype"] if reduce_ in ("mean", "max", "min") else None)
    spec = pg.Merger(grid, reduce=reduce_, window=args.window, dtype=dtype).output_spec(first)
    spacing = source.get("spacing") or [1.0] * grid.ndim
    if reduce_ == "argmax" and spec.class_axis is not None:
        spacing = [s for a, s in enumerate(spacing) if a != spec.class_axis]
    like = _store.source_like(args.patches, source, grid.ndim)  # a NIfTI header, say
    # NIfTI and TIFF outputs are built in memory; the others are filled on disk tile by tile.
    fmt = io.output_path(args.output)[1]
    in_memory = fmt in ("nifti", "tiff")
    lost = io.npy_loses(spacing, source.get("affine")) if fmt == "npy" else None
    if lost is not None:
        print(f"patchgrid merge: warning: {args.output}: {lost}", file=sys.stderr)
    out_bytes = math.prod(spec.shape) * np.dtype(spec.dtype).itemsize
    patch = math.prod(grid.patch_shape)
    check_memory(
        (out_bytes if in_memory else 0)
        + args.batch * patch * first.dtype.itemsize
        + 2 * patch * np.dtype(spec.acc_dtype).itemsize,
        f"merge into {args.output}"
        + (f" ({size_text(out_bytes)} built in memory)" if in_memory else ""),
        "write a .zarr, .h5 or .npy output (filled on disk) or lower --batch",
    )
    t0 = time.perf_counter()
    with (
        io.create_output(
            args.output,
            spec.shape,
            spec.dtype,
            spacing,
            source.get("affine"),
            args.overwrite,
            like=like,
        ) as out,
        Progress(None, n, "merge") as bar,
    ):
        # Tile by tile across the plane, so memory does not grow with the image.
        _tiled.merge_tiled(
            lambda lo, hi: patches[lo:hi],
            grid,
            out,
            reduce=reduce_,
            window=args.window,
            fill=args.fill,
            dtype=spec.dtype,
            batch=args.batch,
            progress=bar.reached,  # patches reaching two tiles are read twice
        )
    print(
        f"merge: {n} patches from {args.patches} -> {args.output} {spec.shape} "
        f"{spec.dtype} (window {args.window}, reduce {reduce_}, "
        f"{time.perf_counter() - t0:.2f} s)"
    )
    return 0


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


def apply(args: argparse.Namespace) -> int:
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
        fill=int(args.fill) if float(args.fill).is_integer() else args.fill,
        tta=args.tta,
    )
    if args.mask is not None:
        with pg.open(args.mask) as m:
            kw["mask"] = np.asarray(m[...])
    with pg.open(args.image) as img:
        kw["axes"] = tiled_axes(img.ndim, img.format, args)
        # The first batch's output sizes the output; the run does not call the model on it again.
        spec, model = _apply.first_batch(fn, img, args.size, args.stride, **kw)
        axes = grid_axes(img.shape, args.size, None, kw["axes"])
        patch = [p if a not in axes else 0 for a, p in enumerate(img.shape)]
        for a, p in zip(axes, _checks.per_axis(args.size, len(axes), "size")):
            patch[a] = p
        dtype = np.dtype(spec.dtype)
        out_shape, spacing, affine, last = output_layout(img, axes, spec, args)
        part = args.resume or args.shard is not None
        fmt = io.output_path(args.output)[1]
        lost = io.npy_loses(spacing, affine) if fmt == "npy" else None
        if lost is not None:
            print(f"patchgrid apply: warning: {args.output}: {lost}", file=sys.stderr)
        # A batch in, the model's output and its weighted float64 copy; NIfTI and TIFF
        # outputs are built whole in memory.
        in_memory = fmt in ("nifti", "tiff")
        out_bytes = math.prod(out_shape) * dtype.itemsize
        check_memory(
            args.batch_size * math.prod(patch) * (img.dtype.itemsize + 16)
            + (out_bytes if in_memory else 0),
            f"apply of {args.batch_size} patches at a time"
            + (
                f" into {args.output} ({size_text(out_bytes)} built in memory)" if in_memory else ""
            ),
            "lower --batch-size" + (" or write a .zarr, .h5 or .npy output" if in_memory else ""),
        )
        t0 = time.perf_counter()
        if part:  # a .zarr that lasts between the runs
            if fmt != "zarr":
                raise PatchgridError(
                    f"--resume and --shard write a .zarr output (it records the rows it "
                    f"finished), got -o {args.output}"
                )
            out = _resume.part_output(args.output, tuple(out_shape), dtype, spacing, affine)
            pg.apply(model, img, args.size, args.stride, out=out, progress=None,
                     resume=args.resume, shard=args.shard, **kw)  # fmt: skip
        else:
            with io.create_output(
                args.output, tuple(out_shape), dtype, spacing, affine, args.overwrite, like=img
            ) as out:
                # An axis the model added goes last in a NIfTI file (x, y, z, then the rest).
                target = np.moveaxis(out, -1, 0) if last else out
                pg.apply(model, img, args.size, args.stride, out=target, progress=None, **kw)
    print(
        f"apply: {args.model} over {args.image} {img.shape} -> {args.output} {tuple(out_shape)} "
        f"{dtype} ({time.perf_counter() - t0:.2f} s)"
    )
    return 0


def output_layout(
    img: Any, axes: Sequence[int], spec: Any, args: argparse.Namespace
) -> tuple[list[int], list[float], Any, bool]:
    """Shape, spacing and affine of apply's output file, and whether an axis the model added
    in front goes last in it (a NIfTI output keeps x, y, z first; other formats keep it in
    front, as ``pg.apply`` gives it). The shape is the merge's
    (``spec``): the tiled axes ``--scale`` times the image's, the others as the model gives
    them, an axis the model added in front, less the class axis for argmax."""
    scale = args.scale if isinstance(args.scale, tuple) else (args.scale,) * len(axes)
    source = list(range(img.ndim))  # the image axis each axis of the merge's output holds
    if len(spec.shape) + (spec.class_axis is not None) == img.ndim + 1:
        source = [-1, *source]  # -1: the axis the model added
    if spec.class_axis is not None:
        source.pop(spec.class_axis)
    spacing = []
    for a in source:
        if a in axes:
            spacing.append(img.spacing[a] / float(Fraction(scale[axes.index(a)])))
        else:
            spacing.append(1.0 if a == -1 else img.spacing[a])
    shape = list(spec.shape)
    last = bool(source) and source[0] == -1 and io.split_path(args.output)[1] == "nifti"
    if last:
        shape, spacing = [*shape[1:], shape[0]], [*spacing[1:], spacing[0]]
    return shape, spacing, scaled_affine(img.affine, axes, scale), last


def scaled_affine(affine: Any, axes: Sequence[int], scale: Sequence[Any]) -> Any:
    """The affine of an output whose voxels are ``scale`` times smaller along ``axes``."""
    if affine is None:
        return None
    m = np.eye(4)
    for a, f in zip(axes, scale):
        if a < 3 and f != 1:
            m[a, a] = 1 / float(f)
            m[a, 3] = (1 / float(f) - 1) / 2  # voxel centres stay where they were
    return np.asarray(affine) @ m


def preview(args: argparse.Namespace) -> int:
    plot.need_matplotlib()
    if not args.output.lower().endswith(".png"):
        raise PatchgridError(f"-o must be a .png file, got {args.output!r}")
    with pg.open(args.image) as img:
        grid = make_grid(img.shape, args, img.format)
        # Three planes of the padded image, as float64 and as the coverage drawn beside them.
        padded = sorted(grid.padded_shape[a] for a in grid.axes[-3:])
        check_memory(
            3 * 24 * math.prod(padded[-2:]),
            f"preview of a grid over {grid.shape}",
            "preview a smaller image (a crop of it)",
        )
        with io.atomic_path(args.output, overwrite=args.overwrite, inputs=[args.image]) as tmp:
            plot.preview(img, grid, tmp)
    print(f"preview: {grid}")
    print(f"wrote:   {args.output}")
    return 0


def demo(args: argparse.Namespace, main: Callable[..., int]) -> int:
    """The demo; ``main`` runs the command line (``cli.main``) for its files."""
    shape = args.shape if isinstance(args.shape, tuple) else (args.shape,) * 3
    # The phantom's float64 coordinate grids and sums, then patches, merges and coverage.
    check_memory(
        (len(shape) + 8) * 8 * math.prod(shape),
        f"demo over a {' x '.join(map(str, shape))} volume",
        "give a smaller --shape",
    )
    folder = os.path.abspath(args.dir)
    os.makedirs(folder, exist_ok=True)
    volume = phantom(shape)
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
    wrote = demo_files(volume, grid, folder, args, main)
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


def phantom(shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    volume = 0.1 * rng.random(shape)
    for centre, radius, value in (((0.2, -0.3, 0.1), 0.35, 1.0), ((-0.4, 0.4, -0.2), 0.25, 0.6)):
        dist = sum((g - c) ** 2 for g, c in zip(grids, centre[: len(shape)]))
        volume += value * (dist < radius**2)
    return volume.astype(np.float32)


def demo_files(
    volume: np.ndarray,
    grid: Any,
    folder: str,
    args: argparse.Namespace,
    main: Callable[..., int],
) -> list[str]:
    """The same job through files and the command line, where the io and plot extras exist."""
    lines = ["", f"files in {folder}:"]
    missing = [m for m in ("nibabel", "zarr") if importlib.util.find_spec(m) is None]
    if missing:
        return [
            "",
            f"(files and the command line need {', '.join(missing)}: "
            f"pip install 'patchgrid[io,plot]')",
        ]
    source = os.path.join(folder, "volume.nii.gz")
    spacing = (1.0,) * (volume.ndim - 1) + (2.0,)
    pg.save(source, volume, spacing=spacing, overwrite=True)
    lines.append(
        f"  {source}: the volume as NIfTI (spacing {' x '.join(f'{s:g}' for s in spacing)})"
    )
    common = [
        "--size",
        as_text(args.size),
        "--stride",
        as_text(args.stride),
        "--edge",
        as_text(args.edge),
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


def as_text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
