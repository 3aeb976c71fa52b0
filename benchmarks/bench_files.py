"""Out-of-core files: the command line's extract and merge, and pg.apply into zarr, peak memory.

The issue's target: extract and merge through the CLI on a 512^3 float32 zarr volume (512 MiB),
and an out-of-core ``pg.apply`` into a zarr output, each with a peak memory under 400 MiB that
does not grow with the volume (256^3 and 512^3 beside each other), plus one volume four times
deeper along the first axis with the 256^3 plane, to show that depth costs no memory.

Every step runs in its own process (``python -m patchgrid extract ...`` exactly as a user types
it, run through a few lines that read ``VmHWM`` when it ends), and its peak memory is that
process's own peak resident set: interpreter and imports included, which is what a user sees.
The import-only baseline is measured the same way, so the reader can see what the call itself
adds. (Not ``ru_maxrss`` from ``wait4``: Linux folds the parent's peak into it, see WRAPPER.)

    python benchmarks/bench_files.py                  # 256^3, 512^3 and 1024x256x256
    python benchmarks/bench_files.py --quick          # 128^3, 256^3 and 512x128x128
    python benchmarks/bench_files.py --markdown results/files.md
    python benchmarks/bench_files.py --profile        # also: where the biggest case's memory goes
    python benchmarks/bench_files.py --deep 1024,512,512   # another deep volume (1 GiB)

Inputs are random float32 zarr arrays in chunks of 64^3 (incompressible: the worst case for the
codec and the disk), written slab by slab so that making them needs no whole volume in memory.
They live in a temporary folder under /tmp, removed at the end (``--keep`` keeps it). The
extract -> merge round trip and every apply output are compared with the input, slab by slab,
over the whole volume; a mismatch prints ``CORRECTNESS FAILURE`` and the exit status is 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

# The script also runs through runpy (as its own child), which does not put its folder on
# the path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _memory import peak_rss

MiB = 1 << 20
TARGET_MIB = 400
SIZE, STRIDE = 64, 32
IN_CHUNKS = (64, 64, 64)
IMPORTS = "import numpy, zarr, patchgrid, patchgrid.cli, patchgrid.io"


# ------------------------------------------------------------------------------ measurement


WRAPPER = """
import sys
report = sys.argv.pop(1)
code = 0
try:
    import runpy
    if sys.argv[1] == "-m":
        module = sys.argv[2]
        sys.argv = [module] + sys.argv[3:]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    elif sys.argv[1] == "-c":
        exec(sys.argv[2])
    else:
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
with open("/proc/self/status") as f:
    hwm = [int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")][0]
with open(report, "w") as f:
    f.write(str(hwm))
sys.exit(code)
"""


def measured(cmd: list[str], log: str) -> dict[str, Any]:
    """Run ``python -m MODULE ARGS``, ``python -c CODE`` or ``python SCRIPT ARGS`` (``cmd``
    without the interpreter) through the wrapper: wall time, exit status, output and the
    child's own peak RSS.

    Output goes to files, not pipes, so nothing has to be read while the child runs.
    """
    report = log + ".hwm"
    with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", WRAPPER, report, *cmd], stdout=out, stderr=err)
        wall = time.perf_counter() - t0
    with open(log + ".out") as f:
        stdout = f.read()
    with open(log + ".err") as f:
        stderr = f.read()
    peak = 0
    if os.path.exists(report):
        with open(report) as f:
            peak = int(f.read())
    return {"rc": proc.returncode, "wall": wall, "peak": peak, "stdout": stdout,
            "stderr": stderr}  # fmt: skip


def failure(result: dict[str, Any]) -> str:
    tail = (result["stderr"] or result["stdout"]).strip().splitlines()
    return f"failed (status {result['rc']}): {tail[-1] if tail else ''}"


# ---------------------------------------------------------------------------------- volumes


def make_volume(path: str, shape: tuple[int, ...], seed: int) -> None:
    """A random float32 zarr array, written 64 rows (one chunk row) at a time."""
    import zarr

    z = zarr.create_array(store=path, shape=shape, dtype="float32", chunks=IN_CHUNKS)
    rows = IN_CHUNKS[0]
    for lo in range(0, shape[0], rows):
        hi = min(lo + rows, shape[0])
        rng = np.random.default_rng([seed, lo])
        z[lo:hi] = rng.random((hi - lo, *shape[1:]), dtype=np.float32)


def compare(path_a: str, path_b: str) -> tuple[bool, float]:
    """Whether two zarr arrays are allclose everywhere, and their largest difference.

    Read 64 rows at a time, so the check needs no whole volume either.
    """
    import zarr

    a, b = zarr.open_array(path_a, mode="r"), zarr.open_array(path_b, mode="r")
    if tuple(a.shape) != tuple(b.shape):
        return False, float("inf")
    ok, worst = True, 0.0
    for lo in range(0, a.shape[0], 64):
        x, y = np.asarray(a[lo : lo + 64]), np.asarray(b[lo : lo + 64])
        ok = ok and bool(np.allclose(x, y, rtol=1e-5, atol=1e-6))
        worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y))))
    return ok, worst


def disk_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(root, name))
    return total


def name_of(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}^3" if len(set(shape)) == 1 else "x".join(map(str, shape))


# ----------------------------------------------------------------------------------- children


def child_apply(volume: str, output: str, chunks: tuple[int, ...]) -> dict[str, Any]:
    """pg.apply(identity) from a zarr volume into a new zarr array on disk."""
    import zarr

    import patchgrid as pg

    # No allocator call: the library bounds an out-of-core job's memory itself.
    with pg.open(volume) as img:
        out = zarr.create_array(store=output, shape=img.shape, dtype=img.dtype, chunks=chunks)
        before = peak_rss()
        t0 = time.perf_counter()
        pg.apply(lambda b: b, img, SIZE, STRIDE, out=out, progress=False)
        seconds = time.perf_counter() - t0
    return {"time": seconds, "hwm_before": before, "hwm_after": peak_rss()}


def child_profile(argv: list[str], top: int) -> None:
    """Run one step under tracemalloc and print the allocation sites at its traced peak.

    A thread samples the traced memory every few milliseconds and takes a snapshot whenever
    it reaches a new high, so the snapshot printed is the one closest to the peak. tracemalloc
    sees NumPy's and Python's allocations (zarr's buffers included), not the interpreter's
    own memory, thread stacks or what the allocator keeps without using it.
    """
    import threading
    import tracemalloc

    tracemalloc.start(12)
    best: dict[str, Any] = {"size": 0, "snap": None}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            current, _ = tracemalloc.get_traced_memory()
            if current > best["size"] * 1.03 + 4 * MiB:
                best["snap"] = tracemalloc.take_snapshot()
                best["size"] = tracemalloc.get_traced_memory()[0]
            stop.wait(0.003)

    worker = threading.Thread(target=sample, daemon=True)
    worker.start()
    if argv[0] == "apply":
        child_apply(argv[1], argv[2], tuple(int(c) for c in argv[3].split(",")))
    else:
        from patchgrid.cli import main as cli_main

        cli_main(argv)
    stop.set()
    worker.join()
    _, peak = tracemalloc.get_traced_memory()
    snap = best["snap"]
    print(
        f"tracemalloc: peak traced {peak / MiB:.1f} MiB; the snapshot nearest it holds "
        f"{best['size'] / MiB:.1f} MiB; process peak RSS {peak_rss() / MiB:.1f} MiB"
    )
    if snap is None:
        return
    skip = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = snap.filter_traces(skip).statistics("traceback")
    for stat in stats[:top]:
        if stat.size < MiB:
            break
        frames = [
            f"{os.path.relpath(f.filename) if 'patchgrid' in f.filename else f.filename}:{f.lineno}"
            for f in stat.traceback
        ]
        # The innermost frame (tracebacks run oldest first), and the innermost patchgrid frame.
        ours = [fr for fr in frames if "patchgrid" in fr and "bench_files" not in fr]
        where = frames[-1] if frames else "?"
        if ours and ours[-1] != where:
            where += f"  <- {ours[-1]}"
        print(f"  {stat.size / MiB:8.1f} MiB in {stat.count:5d} blocks  {where}")


# --------------------------------------------------------------------------------------- main


def run_volume(
    shape: tuple[int, ...], folder: str, seed: int, chunk_choices: list[tuple[int, ...]]
) -> dict[str, dict[str, Any]]:
    """All steps on one volume; the volume's files are removed after."""
    me = os.path.abspath(__file__)
    tag = name_of(shape)
    where = os.path.join(folder, tag)
    os.makedirs(where)
    vol = os.path.join(where, "volume.zarr")
    t0 = time.perf_counter()
    make_volume(vol, shape, seed)
    size = disk_bytes(vol) / MiB
    say(f"{tag}: volume written in {time.perf_counter() - t0:.1f} s ({size:.0f} MiB on disk)")
    results: dict[str, dict[str, Any]] = {}

    patches = os.path.join(where, "patches.zarr")
    merged = os.path.join(where, "merged.zarr")
    steps = [
        ("extract (CLI)", ["-m", "patchgrid", "extract", vol, "--size", str(SIZE),
                           "--stride", str(STRIDE), "--edge", "shift", "-o", patches]),
        ("merge (CLI, gaussian)", ["-m", "patchgrid", "merge", patches, "-o", merged,
                                   "--window", "gaussian"]),
    ]  # fmt: skip
    for step, cmd in steps:
        say(f"{tag}: {step} ...")
        r = measured(cmd, os.path.join(where, step.split()[0]))
        if r["rc"] == 0 and step.startswith("extract"):
            r["note"] = f"patch store {disk_bytes(patches) / MiB:,.0f} MiB on disk"
        if r["rc"] == 0 and step.startswith("merge"):
            ok, worst = compare(vol, merged)
            r["check"] = ok
            r["note"] = f"output == input: {'yes' if ok else 'NO'} (max |diff| {worst:.1e})"
            shutil.rmtree(merged, ignore_errors=True)
        results[step] = r
    shutil.rmtree(patches, ignore_errors=True)

    for chunks in chunk_choices:
        step = f"pg.apply out=zarr {chunks_name(chunks, shape)}"
        out = os.path.join(where, f"apply-{'x'.join(map(str, chunks))}.zarr")
        say(f"{tag}: {step} ...")
        spec = ",".join(map(str, chunks))
        r = measured([me, "--child", "apply", vol, out, spec], os.path.join(where, "apply"))
        if r["rc"] == 0:
            info = json.loads(r["stdout"].strip().splitlines()[-1])
            r["call"] = info["time"]
            r["added"] = r["peak"] - info["hwm_before"]
            ok, worst = compare(vol, out)
            r["check"] = ok
            r["note"] = (
                f"call {info['time']:.1f} s, adds {r['added'] / MiB:.0f} MiB; "
                f"output == input: {'yes' if ok else 'NO'} (max |diff| {worst:.1e})"
            )
        results[step] = r
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(where, ignore_errors=True)
    return results


def apply_chunks(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Output chunks for pg.apply: the input's 64^3; ``stride`` rows (what the Merger writes at
    a time) by 64 x 64; and ``stride`` rows of the whole plane."""
    return [IN_CHUNKS, (STRIDE, 64, 64), (STRIDE, *shape[1:])]


def chunks_name(chunks: tuple[int, ...], shape: tuple[int, ...]) -> str:
    """``chunks 64^3``, or ``chunks 32 x plane`` when the chunk is whole planes."""
    if tuple(chunks[1:]) == tuple(shape[1:]):
        return f"chunks {chunks[0]} x plane"
    if len(set(chunks)) == 1:
        return f"chunks {chunks[0]}^3"
    return "chunks " + "x".join(map(str, chunks))


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def table(
    shapes: list[tuple[int, ...]],
    results: dict[str, dict[str, dict[str, Any]]],
    baseline: int,
) -> tuple[list[str], bool]:
    """One row per step, the volumes beside each other."""
    tags = [name_of(s) for s in shapes]
    head = "| step | " + " | ".join(f"{t} time | {t} peak RSS" for t in tags)
    head += f" | under {TARGET_MIB} MiB |"
    rows = [head, "|---|" + "---|---|" * len(tags) + "---|"]
    steps: list[str] = []
    for tag in tags:
        for step in results[tag]:
            if step not in steps:
                steps.append(step)
    met_all = True
    for step in steps:
        cells, met = [], True
        for tag in tags:
            r = results[tag].get(step)
            if r is None:
                cells += ["", ""]
            elif r["rc"]:
                cells += [failure(r), ""]
                met = False
            else:
                cells += [f"{r['wall']:.1f} s", f"{r['peak'] / MiB:.0f} MiB"]
                met = met and r["peak"] < TARGET_MIB * MiB
        met_all = met_all and met
        rows.append(f"| {step} | " + " | ".join(cells) + f" | {'yes' if met else 'NO'} |")
    cells = ["", f"{baseline / MiB:.0f} MiB"] * len(tags)
    rows.append(f"| baseline: `python -c '{IMPORTS}'` | " + " | ".join(cells) + " | |")
    return rows, met_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="128^3, 256^3 and 512x128x128")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    parser.add_argument(
        "--deep", help="the deep volume as D,H,W (default 4 x the small side, then its plane)"
    )
    parser.add_argument(
        "--profile", action="store_true",
        help="also run the step with the largest peak under tracemalloc and list its allocations",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.child[0] == "apply":
            chunks = tuple(int(c) for c in args.child[3].split(","))
            print(json.dumps(child_apply(args.child[1], args.child[2], chunks)))
        elif args.child[0] == "profile":
            child_profile(args.child[1:], top=15)
        return 0

    small = 128 if args.quick else 256
    shapes: list[tuple[int, ...]] = [(small,) * 3, (2 * small,) * 3]
    deep = (
        tuple(int(n) for n in args.deep.split(","))
        if args.deep
        else (4 * small, small, small)
    )  # fmt: skip
    shapes.append(deep)
    folder = tempfile.mkdtemp(prefix="patchgrid-bench-files-", dir="/tmp")
    say(f"working in {folder}")
    t_all = time.perf_counter()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    profile_text = ""
    try:
        base = measured(["-c", IMPORTS], os.path.join(folder, "baseline"))
        if base["rc"]:
            say(failure(base))
            return 1
        for i, shape in enumerate(shapes):
            results[name_of(shape)] = run_volume(shape, folder, i, apply_chunks(shape))
        if args.profile:
            profile_text = run_profile(shapes, results, folder)
    finally:
        if args.keep:
            say(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)

    rows, met = table(shapes, results, base["peak"])
    total = time.perf_counter() - t_all
    head = [
        f"patchgrid out-of-core files, {datetime.datetime.now():%Y-%m-%d %H:%M}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, numpy {np.__version__}, zarr {zarr_version()}",
        "",
        f"float32 zarr volumes (random, chunks {'x'.join(map(str, IN_CHUNKS))}), patches "
        f"{SIZE}^3, stride {STRIDE}, edge shift; merge and apply blend with the gaussian window. "
        "Time: the whole process (imports included); peak RSS: the process's own peak "
        "resident set (`VmHWM` when it ends). The `pg.apply` script makes no allocator call "
        "(the library bounds its out-of-core jobs itself; the `patchgrid` command calls "
        "`pg.tune_allocator()` for its own process).",
        "",
    ]
    worst = max(
        (r["peak"] for res in results.values() for r in res.values() if not r["rc"]), default=0
    )
    checks = [r.get("check", True) for res in results.values() for r in res.values()]
    failed = [r for res in results.values() for r in res.values() if r["rc"]]
    verdict = [
        "",
        f"Target: peak memory under {TARGET_MIB} MiB for every step: "
        f"{'MET' if met and not failed else 'NOT MET'} (largest peak {worst / MiB:.0f} MiB).",
        f"Round trips: every output equals its input (allclose over the whole volume): "
        f"{'yes' if all(checks) else 'NO'}.",
        "",
        "Notes:",
        "",
    ]
    for tag, res in results.items():
        for step, r in res.items():
            if r.get("note"):
                verdict.append(f"- {tag} {step}: {r['note']}")
    verdict.append(f"- whole run: {total:.0f} s")
    text = "\n".join(head + rows + verdict)
    if profile_text:
        text += "\n\n" + profile_text
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if not all(checks):
        print("CORRECTNESS FAILURE: an output differs from its input", file=sys.stderr)
        return 1
    return 1 if failed else 0


def run_profile(
    shapes: list[tuple[int, ...]], results: dict[str, dict[str, dict[str, Any]]], folder: str
) -> str:
    """tracemalloc over the step with the largest peak, on its volume, again."""
    best = None
    for shape in shapes:
        for step, r in results[name_of(shape)].items():
            if not r["rc"] and (best is None or r["peak"] > best[2]):
                best = (shape, step, r["peak"])
    if best is None:
        return ""
    shape, step, _ = best
    say(f"profiling {step} on {name_of(shape)} ...")
    where = os.path.join(folder, "profile")
    os.makedirs(where, exist_ok=True)
    vol = os.path.join(where, "volume.zarr")
    make_volume(vol, shape, shapes.index(shape))
    me = os.path.abspath(__file__)
    patches = os.path.join(where, "patches.zarr")
    extract = ["extract", vol, "--size", str(SIZE), "--stride", str(STRIDE), "--edge", "shift",
               "-o", patches]  # fmt: skip
    if step.startswith("extract"):
        argv = extract
    elif step.startswith("merge"):
        measured(["-m", "patchgrid", *extract], os.path.join(where, "x"))
        argv = ["merge", patches, "-o", os.path.join(where, "m.zarr"), "--window", "gaussian"]
    else:
        chunks = next(c for c in apply_chunks(shape) if chunks_name(c, shape) in step)
        argv = ["apply", vol, os.path.join(where, "a.zarr"), ",".join(map(str, chunks))]
    r = measured([me, "--child", "profile", *argv], os.path.join(where, "p"))
    body = r["stdout"].strip() if not r["rc"] else failure(r)
    lines = body.splitlines()
    title = f"Where the memory of '{step}' on {name_of(shape)} goes (tracemalloc, a second run):"
    return "\n".join([title, "", "```", *lines, "```"])


def zarr_version() -> str:
    try:
        import zarr

        return str(zarr.__version__)
    except ImportError:
        return "missing"


if __name__ == "__main__":
    sys.exit(main())
