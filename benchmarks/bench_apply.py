"""Sliding-window apply: pg.apply against MONAI's sliding_window_inference, time and memory.

Every case runs in a fresh process, so that its peak memory is its own, and the whole list of
cases runs ``--rounds`` times in turn, so that a drift of a shared machine's load meets every
case alike. Time is the best call over the rounds; memory is the median over the rounds of the
growth of the process's peak resident set during its first call (``VmHWM`` reset through
``/proc/self/clear_refs``), so it counts NumPy and torch allocations alike.

Jobs, as issue 3 sets them: a float32 volume, 64^3 patches, stride 32 (overlap 0.5), batch 4,
gaussian window; an identity model, and a 3-class model whose labels are kept (argmax). Then
``out=`` a zarr array on disk at two volume sizes, to show that the memory the call adds does
not grow with the volume.

    python benchmarks/bench_apply.py             # 256^3 (and 512^3 for out=zarr)
    python benchmarks/bench_apply.py --quick     # 128^3 and 256^3
    python benchmarks/bench_apply.py --markdown results.md

MONAI and zarr come from the ``bench`` extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from _memory import peak_rss

MiB = 1 << 20
CASES = [
    "pg numpy identity",
    "pg torch identity",
    "monai identity",
    "pg numpy argmax",
    "pg torch argmax",
    "monai argmax",
    "pg numpy out=zarr",
    "pg numpy out=zarr big",
]


def three_classes(batch: Any) -> Any:
    """A stand-in segmentation model: three class scores per voxel."""
    if isinstance(batch, np.ndarray):
        return np.concatenate([batch, 1 - batch, np.full_like(batch, 0.5)], axis=1)
    import torch

    return torch.cat([batch, 1 - batch, torch.full_like(batch, 0.5)], dim=1)


def child(case: str, side: int, repeats: int) -> dict[str, Any]:
    """Run one case in this fresh process."""
    import torch

    import patchgrid as pg

    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    volume = rng.random((1, side, side, side), dtype=np.float32)
    tensor = torch.from_numpy(volume)
    kw = dict(axes=(1, 2, 3), edge="shift", window="gaussian", batch_size=4, progress=False)
    tmp = tempfile.mkdtemp()

    def run_monai(predictor: Any) -> Any:
        from monai.inferers import sliding_window_inference

        with torch.no_grad():
            return sliding_window_inference(
                tensor[None], (64, 64, 64), 4, predictor, overlap=0.5, mode="gaussian",
                sigma_scale=0.125,
            )[0]  # fmt: skip

    def zarr_out() -> Any:
        import zarr

        path = os.path.join(tmp, f"out{time.perf_counter_ns()}.zarr")
        return zarr.open_array(path, mode="w", shape=volume.shape, dtype="float32",
                               chunks=(1, 64, 64, 64))  # fmt: skip

    calls = {
        "pg numpy identity": lambda: pg.apply(lambda b: b, volume, 64, 32, **kw),
        "pg torch identity": lambda: pg.apply(lambda b: b, tensor, 64, 32, **kw),
        "monai identity": lambda: run_monai(lambda b: b),
        "pg numpy argmax": lambda: pg.apply(three_classes, volume, 64, 32, reduce="argmax", **kw),
        "pg torch argmax": lambda: pg.apply(three_classes, tensor, 64, 32, reduce="argmax", **kw),
        "monai argmax": lambda: torch.argmax(run_monai(three_classes), dim=0).to(torch.uint8),
        "pg numpy out=zarr": lambda: pg.apply(lambda b: b, volume, 64, 32, out=zarr_out(), **kw),
    }
    calls["pg numpy out=zarr big"] = calls["pg numpy out=zarr"]
    fn = calls[case]
    # Import what the case needs before measuring: modules are not the call's memory.
    if case.startswith("monai"):
        import monai.inferers  # noqa: F401
    if case.startswith("pg"):
        # The compiled kernels (the `fast` extra), loaded once per process like a module.
        from patchgrid import _compiled

        _compiled.warm()
    if "zarr" in case:
        import zarr  # noqa: F401
    # Memory on the first call: later calls reuse what the allocators kept from it.
    before = peak_rss(reset=True)
    result = fn()
    added = peak_rss() - before
    check(case, result, volume)
    del result
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"time": min(times), "added": added, "image": volume.nbytes}


def check(case: str, result: Any, volume: np.ndarray) -> None:
    """Identity gives the volume back; the 3-class model's labels are argmax of the scores."""
    got = np.asarray(result[...] if hasattr(result, "store") else result)
    if "argmax" in case:
        want = np.argmax(three_classes(volume[None])[0], axis=0)
        ok = got.shape == want.shape and (got == want).mean() > 0.999
    else:
        ok = got.shape == volume.shape and np.allclose(got, volume, atol=1e-4)
    if not ok:
        print(f"CORRECTNESS FAILURE in {case}", file=sys.stderr)
        sys.exit(1)


def run_case(case: str, side: int, repeats: int) -> dict[str, Any] | str:
    cmd = [sys.executable, __file__, "--child", case, "--side", str(side), "--repeats",
           str(repeats)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return f"failed: {tail[-1] if tail else proc.returncode}"
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="128^3 (256^3 for the big zarr)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="run every case this many times, in turn (time: the best round; memory: the "
        "median), so that a drift of the machine's load meets every case alike",
    )
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--side", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.side, args.repeats)))
        return 0
    side = 128 if args.quick else 256
    runs: dict[str, list[Any]] = {case: [] for case in CASES}
    for r in range(args.rounds):
        for case in CASES:
            n = 2 * side if case.endswith("big") else side
            print(f"round {r + 1}: {case} at {n}^3 ...", file=sys.stderr, flush=True)
            runs[case].append(run_case(case, n, args.repeats))
    results: dict[str, Any] = {}
    for case, got in runs.items():
        n = 2 * side if case.endswith("big") else side
        ok = [g for g in got if not isinstance(g, str)]
        if len(ok) < len(got):
            results[case] = (n, next(g for g in got if isinstance(g, str)))
            continue
        results[case] = (n, {
            "time": min(g["time"] for g in ok),
            "added": statistics.median(g["added"] for g in ok),
            "image": ok[0]["image"],
        })  # fmt: skip
    rows = [
        "| job | volume | time | speed-up (MONAI time / ours) | memory added "
        "| ours / MONAI's | added / image |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, (n, r) in results.items():
        if isinstance(r, str):
            rows.append(f"| {case} | {n}^3 | {r} | | | | |")
            continue
        ref = results.get("monai argmax" if "argmax" in case else "monai identity")
        speed = mem = ""
        if ref and not isinstance(ref[1], str) and not case.startswith("monai") and ref[0] == n:
            speed = f"{ref[1]['time'] / r['time']:.2f}x"
            mem = f"{r['added'] / max(ref[1]['added'], 1):.2f}x"
        rows.append(
            f"| {case} | {n}^3 | {r['time'] * 1e3:.0f} ms | {speed} | "
            f"{r['added'] / MiB:.0f} MiB | {mem} | {r['added'] / r['image']:.2f} |"
        )
    head = [
        f"pg.apply vs MONAI sliding_window_inference, {datetime.date.today()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"64^3 patches, stride 32, batch 4, gaussian; each case in a fresh process "
        f"{args.rounds} times, in turn; time: the best call of all, memory: the median of the "
        f"{args.rounds} first calls",
        "",
    ]
    text = "\n".join(head + rows)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
