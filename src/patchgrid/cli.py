"""The command line: ``patchgrid demo`` and ``patchgrid info``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np

from ._checks import PatchgridError

EPILOG_DEMO = """example:
  patchgrid demo
  patchgrid demo --shape 10,20,30 --size 4 --stride 2 --window gaussian
"""

EPILOG_INFO = """example:
  patchgrid info --shape 256,256,256 --size 64 --stride 32 --edge shift
"""


def _ints(text: str) -> tuple[int, ...] | int:
    """``64`` or ``64,64,32``."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer or comma-separated integers like 64,64,32, got {text!r}"
        ) from None
    return parts[0] if len(parts) == 1 else tuple(parts)


def _edges(text: str) -> str | tuple[str, ...]:
    parts = text.split(",")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def _demo(args: argparse.Namespace) -> int:
    import patchgrid as pg

    shape = args.shape if isinstance(args.shape, tuple) else (args.shape,) * 3
    rng = np.random.default_rng(0)
    volume = rng.random(shape).astype(np.float32)
    print(f"volume: a synthetic {' x '.join(map(str, shape))} float32 image")
    grid = pg.PatchGrid(volume.shape, size=args.size, stride=args.stride, edge=args.edge)
    print(f"grid:   {grid}")
    t0 = time.perf_counter()
    patches = pg.extract(volume, grid)
    t1 = time.perf_counter()
    view = np.shares_memory(patches, volume)
    print(
        f"extract: patches.shape = {patches.shape}, "
        f"{'a read-only view (no copy)' if view else 'a new array'}, "
        f"{(t1 - t0) * 1e3:.2f} ms"
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
    covered = cover > 0
    err = float(np.abs(np.where(covered, restored - volume, 0)).max())
    print(
        f"merge:   window={args.window!r}, {(t1 - t0) * 1e3:.2f} ms, overlaps averaged; "
        f"max |restored - volume| over covered voxels = {err:.2g}"
    )
    print(f"         each voxel lies in {int(cover.min())} to {int(cover.max())} patches")
    if not covered.all():
        print(
            f"         {int((~np.broadcast_to(covered, volume.shape)).sum())} trailing voxels "
            f"are in no patch (edge={args.edge!r}); they get fill=0. Use --edge shift, "
            f"even or pad to cover them"
        )
    print()
    print("in Python:")
    print("    import patchgrid as pg")
    print(
        f"    patches = pg.extract(volume, size={args.size}, stride={args.stride}"
        f"{'' if args.edge == 'drop' else f', edge={args.edge!r}'})"
    )
    print(
        f"    restored = pg.merge(patches, volume.shape, stride={args.stride}"
        f"{'' if args.edge == 'drop' else f', edge={args.edge!r}'})"
    )
    ok = err < 1e-5
    print("round trip:", "exact (to float rounding)" if ok else "MISMATCH")
    return 0 if ok else 1


def _info(args: argparse.Namespace) -> int:
    import patchgrid as pg

    shape = args.shape if isinstance(args.shape, tuple) else (args.shape,)
    grid = pg.PatchGrid(shape, size=args.size, stride=args.stride, edge=args.edge, axes=args.axes)
    itemsize = np.dtype(args.dtype).itemsize
    patch_bytes = len(grid) * int(np.prod(grid.patch_shape)) * itemsize
    image_bytes = int(np.prod(shape)) * itemsize
    cover = pg.coverage(grid)
    print(f"image:    shape {shape}, {args.dtype}, {_mib(image_bytes)}")
    print(f"grid:     size {grid.size}, stride {grid.stride}, axes {grid.axes}, edge {grid.edge}")
    print(f"patches:  counts {grid.counts}, {len(grid)} patches of shape {grid.patch_shape}")
    print(f"padding:  {grid.pad_width}" if any(a for _, a in grid.pad_width) else "padding:  none")
    print(
        f"coverage: {'every voxel' if grid.covers else 'NOT every voxel'}; "
        f"{int(cover.min())} to {int(cover.max())} patches per voxel"
    )
    print(
        f"memory:   {_mib(patch_bytes)} as a copy ({patch_bytes / max(image_bytes, 1):.1f}x "
        f"the image); a view costs nothing"
        + ("" if grid.is_regular else " (this grid is not regular: it gathers)")
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patchgrid",
        description="Cut N-dimensional images into patches and put them back together.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="run extract and merge on a built-in synthetic volume",
        epilog=EPILOG_DEMO,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--shape", type=_ints, default=(10, 20, 30), help="volume shape (10,20,30)")
    demo.add_argument("--size", type=_ints, default=4, help="patch size: 4 or 4,4,8 (default 4)")
    demo.add_argument("--stride", type=_ints, default=2, help="stride (default 2)")
    demo.add_argument("--edge", type=_edges, default="drop", help="drop, pad, shift or even")
    demo.add_argument(
        "--window",
        default="uniform",
        help="uniform, gaussian, hann or triangular (default uniform)",
    )
    demo.set_defaults(run=_demo)
    info = sub.add_parser(
        "info",
        help="describe a grid: counts, coverage, padding, memory",
        epilog=EPILOG_INFO,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument("--shape", type=_ints, required=True, help="image shape: 256,256,256")
    info.add_argument("--size", type=_ints, required=True, help="patch size: 64 or 64,64,32")
    info.add_argument("--stride", type=_ints, default=None, help="stride (default: size)")
    info.add_argument("--edge", type=_edges, default="drop", help="drop, pad, shift or even")
    info.add_argument("--axes", type=_ints, default=None, help="tiled axes: 1,2,3")
    info.add_argument("--dtype", default="float32", help="dtype for the memory estimate")
    info.set_defaults(run=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (PatchgridError, TypeError, ValueError) as exc:
        print(f"patchgrid {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
