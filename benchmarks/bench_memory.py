"""Peak memory of an out-of-core ``pg.apply(fn, zarr, out=zarr)``, with no allocator call.

The target (issue #13, item 20): under 400 MiB at 512^3 and flat from 256^3, for output chunks
of 64^3 and of (64, 512, 512), at strides 32 and 48, in a script that calls nothing but
``pg.apply`` (no ``pg.tune_allocator()``). The source is a random float32 zarr array in chunks
of 64 x 256 x 256; patches are 64^3, ``fn`` is the identity, the window gaussian.

    python benchmarks/bench_memory.py                 # 256^3 and 512^3, four cases each
    python benchmarks/bench_memory.py --quick         # 128^3 and 256^3
    python benchmarks/bench_memory.py --shapes 512,1024x512x512 --strides 48
    python benchmarks/bench_memory.py --chunks 64,512,512 --chunks 32,64,64
    python benchmarks/bench_memory.py --tune          # the script calls pg.tune_allocator() too
    python benchmarks/bench_memory.py --unbounded     # as before the library bounded itself
    python benchmarks/bench_memory.py --markdown results/memory.md

Every case runs in a fresh process; its peak is that process's own peak resident set
(``VmHWM`` when the call returns: interpreter and imports included, what a user sees), next to
the import-only baseline measured the same way. Every output is compared with the input over
the whole volume (the identity, blended, gives the input back); a mismatch prints
``CORRECTNESS FAILURE`` and the exit status is 1. Volumes live in a temporary folder under
/tmp, removed at the end (``--volumes DIR`` keeps them there for the next run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

# Run as a script, the folder is on the path; run as a child through ``-c`` it is not.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _memory import peak_rss
from bench_files import compare  # one zarr comparison for both benchmarks

MiB = 1 << 20
TARGET_MIB = 400
SIZE = 64
SRC_CHUNKS = (64, 256, 256)
IMPORTS = "import numpy, zarr, patchgrid"


def make_volume(path: str, shape: tuple[int, ...], seed: int) -> None:
    """A random float32 zarr array, written one chunk row at a time."""
    import zarr

    chunks = tuple(min(c, n) for c, n in zip(SRC_CHUNKS, shape))
    z = zarr.create_array(store=path, shape=shape, dtype="float32", chunks=chunks)
    for lo in range(0, shape[0], chunks[0]):
        hi = min(lo + chunks[0], shape[0])
        z[lo:hi] = np.random.default_rng([seed, lo]).random((hi - lo, *shape[1:]), np.float32)


def unbound() -> None:
    """Undo what the library does around an out-of-core job (allocator and zarr settings,
    writes held until whole chunks), to show what the job cost before. Private names, for
    this comparison only."""
    import contextlib

    from patchgrid import _memory

    _memory.bound = lambda *arrays: contextlib.nullcontext()  # type: ignore[assignment,misc]
    _memory.staged = lambda out, axis: out
    _memory.chunked = lambda out: False


def child(volume: str, output: str, stride: int, chunks: tuple[int, ...], how: str) -> None:
    """One case in this (fresh) process: print its times and peaks as JSON."""
    import zarr

    import patchgrid as pg

    if how == "tune":
        pg.tune_allocator()
    elif how == "unbounded":
        unbound()
    src = zarr.open_array(volume, mode="r")
    out = zarr.create_array(store=output, shape=src.shape, dtype=src.dtype, chunks=chunks)
    before = peak_rss()
    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    pg.apply(lambda b: b, src, SIZE, stride, out=out, progress=False)
    seconds, c1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    cpu = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
    print(json.dumps({"time": seconds, "cpu": cpu, "before": before, "peak": peak_rss()}))


def run(cmd: list[str]) -> dict[str, Any]:
    """``python CMD`` in a fresh process: its JSON line, or its error."""
    done = subprocess.run([sys.executable, *cmd], capture_output=True, text=True)
    if done.returncode:
        tail = done.stderr.strip().splitlines()
        return {"error": f"failed (status {done.returncode}): {tail[-1] if tail else ''}"}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def shape_of(text: str) -> tuple[int, ...]:
    """``512`` is 512^3; ``1024x512x512`` is that shape."""
    sides = tuple(int(n) for n in text.split("x"))
    return sides * 3 if len(sides) == 1 else sides


def name_of(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}^3" if len(set(shape)) == 1 else "x".join(map(str, shape))


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="128^3 and 256^3")
    parser.add_argument("--shapes", help="volumes: 512 for 512^3, or 1024x512x512; comma-separated")
    parser.add_argument("--strides", default="32,48", help="strides, comma-separated")
    parser.add_argument(
        "--chunks", action="append",
        help="output chunks as D,H,W; repeat for more (default 64,64,64 and 64,512,512)",
    )  # fmt: skip
    parser.add_argument("--tune", action="store_true", help="call pg.tune_allocator() first")
    parser.add_argument(
        "--unbounded", action="store_true", help="undo the library's bounds: the before numbers"
    )
    parser.add_argument("--no-check", action="store_true", help="skip comparing the outputs")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    parser.add_argument("--volumes", help="a folder to keep the volumes in, reused across runs")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        vol, output, stride, chunks, how = args.child
        child(vol, output, int(stride), tuple(int(c) for c in chunks.split(",")), how)
        return 0

    how = "tune" if args.tune else "unbounded" if args.unbounded else "plain"
    shapes = [
        shape_of(s) for s in (args.shapes or ("128,256" if args.quick else "256,512")).split(",")
    ]
    strides = [int(s) for s in args.strides.split(",")]
    chunk_list = [tuple(int(c) for c in spec.split(",")) for spec in args.chunks or []]
    chunk_list = chunk_list or [(64, 64, 64), (64, 512, 512)]
    folder = args.volumes or tempfile.mkdtemp(prefix="patchgrid-bench-memory-", dir="/tmp")
    os.makedirs(folder, exist_ok=True)
    me = os.path.abspath(__file__)
    here = os.path.dirname(me)
    base = run(["-c", f"{IMPORTS}; import sys, json; sys.path.insert(0, {here!r}); from _memory "
                      "import peak_rss; print(json.dumps({'peak': peak_rss()}))"])  # fmt: skip
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    try:
        for i, shape in enumerate(shapes):
            vol = os.path.join(folder, f"volume-{'x'.join(map(str, shape))}.zarr")
            if not os.path.exists(vol):
                say(f"{name_of(shape)}: writing the volume ...")
                make_volume(vol, shape, i)
            for chunks in chunk_list:
                for stride in strides:
                    out = os.path.join(folder, "out.zarr")
                    shutil.rmtree(out, ignore_errors=True)
                    say(f"{name_of(shape)}, stride {stride}, out chunks {name_of(chunks)} ...")
                    spec = ",".join(map(str, chunks))
                    r = run([me, "--child", vol, out, str(stride), spec, how])
                    r.update(shape=shape, stride=stride, chunks=chunks)
                    if "error" not in r and not args.no_check:
                        r["ok"], r["worst"] = compare(vol, out)
                    shutil.rmtree(out, ignore_errors=True)
                    rows.append(r)
    finally:
        if not args.volumes:
            shutil.rmtree(folder, ignore_errors=True)

    text, ok = report(rows, shapes, strides, chunk_list, base, how)
    text += f"\n- whole run: {time.perf_counter() - t_all:.0f} s"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if any(r.get("ok") is False for r in rows):
        print("CORRECTNESS FAILURE: an output differs from its input", file=sys.stderr)
        return 1
    return 0 if ok else 1


HOW = {
    "plain": "The script calls nothing else (no `pg.tune_allocator()`).",
    "tune": "The script calls `pg.tune_allocator()` first.",
    "unbounded": "Run `--unbounded`: the library's own bounds undone, as before it had them.",
}


def report(
    rows: list[dict[str, Any]],
    shapes: list[tuple[int, ...]],
    strides: list[int],
    chunk_list: list[tuple[int, ...]],
    base: dict[str, Any],
    how: str,
) -> tuple[str, bool]:
    """One row per (output chunks, stride), the volumes beside each other."""
    import zarr

    head = [
        f"patchgrid out-of-core apply, peak memory, {datetime.datetime.now():%Y-%m-%d %H:%M}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, numpy {np.__version__}, zarr {zarr.__version__}",
        "",
        f"`pg.apply(lambda b: b, src, {SIZE}, stride, out=out)`: src a random float32 zarr "
        f"array in chunks of {'x'.join(map(str, SRC_CHUNKS))}, out a new zarr array; gaussian "
        "window. Peak: the process's own peak resident set (`VmHWM`), imports included; call: "
        f"wall time of the call (CPU time, user + system, in brackets). {HOW[how]}",
        "",
    ]
    names = [name_of(s) for s in shapes]
    cols = " | ".join(f"{n} peak | {n} call" for n in names)
    lines = [f"| out chunks | stride | {cols} | under {TARGET_MIB} MiB |",
             "|---|---|" + "---|---|" * len(shapes) + "---|"]  # fmt: skip
    met = True
    for chunks in chunk_list:
        for stride in strides:
            cells, under = [], True
            for shape in shapes:
                key = (shape, stride, chunks)
                r = next(r for r in rows if (r["shape"], r["stride"], r["chunks"]) == key)
                if "error" in r:
                    cells += [r["error"], ""]
                    under = False
                    continue
                cells += [f"{r['peak'] / MiB:.0f} MiB", f"{r['time']:.1f} s ({r['cpu']:.0f} s)"]
                under = under and r["peak"] < TARGET_MIB * MiB
            met = met and under
            lines.append(f"| {name_of(chunks)} | {stride} | " + " | ".join(cells) +
                         f" | {'yes' if under else 'NO'} |")  # fmt: skip
    peak = base.get("peak", 0) / MiB
    lines.append(f"| baseline: `python -c '{IMPORTS}'` | | " +
                 " | ".join([f"{peak:.0f} MiB", ""] * len(shapes)) + " | |")  # fmt: skip
    tail = ["", f"Target: under {TARGET_MIB} MiB in every case: {'MET' if met else 'NOT MET'}."]
    checked = [r for r in rows if "ok" in r]
    if checked:
        worst = max(r["worst"] for r in checked)
        same = all(r["ok"] for r in checked)
        tail.append(f"- outputs equal their input: {'yes' if same else 'NO'} "
                    f"(max |diff| {worst:.1e})")  # fmt: skip
    return "\n".join(head + lines + tail), met


if __name__ == "__main__":
    sys.exit(main())
