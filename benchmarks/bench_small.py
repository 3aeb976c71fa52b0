"""The user's own question, timed: a 10 x 20 x 30 volume, 4^3 patches, stride 2.

Small work is where a per-call cost shows: building and checking the same geometry on every
call. patchgrid keeps a plan per layout (the grid, the view's strides, the merge's index
tables), so a repeated call pays for its data only. Side by side in one run:

- the view: ``pg.extract`` (a read-only strided view), NumPy's ``sliding_window_view`` with
  the stride taken by slicing, torch's ``unfold`` three times;
- the merge (mean of the overlaps): ``pg.merge`` given the shape or the grid, and a plain
  overlap-add with torch's ``index_add_`` over precomputed flat indices (values and counts),
  in float64 and float32. torch sums in the patches' own dtype; patchgrid in a wider one
  (float64 for float32, extended precision for float64), so that equal values come back
  exactly.

Every result is checked before it is timed. Times are the best of ``--repeats`` rounds of
``--number`` calls, in microseconds per call.

    python benchmarks/bench_small.py [--markdown results/small.md]
"""

from __future__ import annotations

import argparse
import platform
import sys
import timeit
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import patchgrid as pg

SHAPE, SIZE, STRIDE = (10, 20, 30), 4, 2


def best_us(fn: Callable[[], Any], number: int, repeats: int) -> float:
    fn()
    return min(timeit.repeat(fn, number=number, repeat=repeats)) / number * 1e6


def _torch_merge(torch: Any, patches: np.ndarray, grid: pg.PatchGrid) -> Callable[[], Any]:
    offsets = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij"), -1).reshape(-1, 3)
    points = (grid.starts()[:, None, :] + offsets[None]).reshape(-1, 3)
    index = torch.from_numpy(np.ravel_multi_index(tuple(points.T), SHAPE))
    flat = torch.from_numpy(np.ascontiguousarray(patches)).reshape(-1)
    ones = torch.ones_like(flat)
    n = int(np.prod(SHAPE))

    def merge() -> Any:
        out = torch.zeros(n, dtype=flat.dtype).index_add_(0, index, flat)
        count = torch.zeros(n, dtype=flat.dtype).index_add_(0, index, ones)
        return (out / count).reshape(SHAPE)

    return merge


def run(number: int, repeats: int) -> list[tuple[str, str, float, str]]:
    rows: list[tuple[str, str, float, str]] = []
    volume = np.random.default_rng(0).random(SHAPE)
    grid = pg.PatchGrid(SHAPE, SIZE, STRIDE)
    view = pg.extract(volume, SIZE, STRIDE)
    swv = sliding_window_view(volume, (SIZE,) * 3)[::STRIDE, ::STRIDE, ::STRIDE]
    assert np.array_equal(view, swv), "CORRECTNESS FAILURE: view"
    t_swv = best_us(lambda: sliding_window_view(volume, (SIZE,) * 3)[::2, ::2, ::2], number,
                    repeats)  # fmt: skip
    rows.append(("view", "NumPy sliding_window_view[::2]", t_swv, "reference"))
    t_pg = best_us(lambda: pg.extract(volume, SIZE, STRIDE), number, repeats)
    rows.append(("view", "pg.extract", t_pg, f"{t_swv / t_pg:.2f}x NumPy"))
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        tv = torch.from_numpy(volume)
        unfold = tv.unfold(0, 4, 2).unfold(1, 4, 2).unfold(2, 4, 2)
        assert np.array_equal(unfold.numpy(), swv), "CORRECTNESS FAILURE: unfold"
        t_unfold = best_us(lambda: tv.unfold(0, 4, 2).unfold(1, 4, 2).unfold(2, 4, 2), number,
                           repeats)  # fmt: skip
        rows.append(("view", "torch unfold x3", t_unfold, f"{t_unfold / t_pg:.2f}x pg time"))
    for dtype in (np.float64, np.float32):
        patches = np.ascontiguousarray(view.astype(dtype))
        image = volume.astype(dtype)
        name = np.dtype(dtype).name
        assert np.array_equal(pg.merge(patches, SHAPE, stride=STRIDE), image), (
            "CORRECTNESS FAILURE: pg.merge"
        )
        ref = None
        if torch is not None:
            merge = _torch_merge(torch, patches, grid)
            assert np.allclose(merge().numpy(), image), "CORRECTNESS FAILURE: index_add_"
            ref = best_us(merge, number // 4, repeats)
            rows.append((f"merge {name}", "torch index_add_ (values, counts)", ref, "reference"))
        cut = pg.extract(image, SIZE, STRIDE)  # a strided view, not contiguous
        cases: list[tuple[str, Callable[[], Any]]] = [
            ("pg.merge(patches, shape, stride=2)",
             lambda p=patches: pg.merge(p, SHAPE, stride=STRIDE)),
            ("pg.merge(patches, grid)", lambda p=patches: pg.merge(p, grid)),
            ("pg.merge of the extract view", lambda p=cut: pg.merge(p, SHAPE, stride=STRIDE)),
        ]  # fmt: skip
        for label, call in cases:
            t = best_us(call, number // 4, repeats)
            rows.append((f"merge {name}", label, t, f"{ref / t:.2f}x torch" if ref else ""))
    return rows


def markdown(rows: list[tuple[str, str, float, str]]) -> str:
    lines = [
        f"The user's example: {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]}, {SIZE}^3 patches, stride "
        f"{STRIDE}. {platform.processor() or platform.machine()}, Python "
        f"{sys.version.split()[0]}, NumPy {np.__version__}, patchgrid {pg.__version__}.",
        "",
        "| job | case | best us per call | relative |",
        "|---|---|---|---|",
    ]
    lines += [f"| {job} | {case} | {t:.1f} | {rel} |" for job, case, t, rel in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    text = markdown(run(args.number, args.repeats))
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
