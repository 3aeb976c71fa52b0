"""One-shot runs, with numba and without: do the compiled kernels pay for their load?

A script or a command run once pays for everything it loads. numba's kernels save time on
large jobs, but a process that uses them first imports numba and loads each kernel it calls
from numba's on-disk cache (the first process of an install compiles them: seconds). Each job
below runs in a fresh Python process, timed from outside (wall, interpreter start included),
with its own peak resident memory (``VmHWM``, read as the process ends):

- ``CLI extract``: ``patchgrid extract VOLUME.npy --size 64 --stride 32 -o patches.zarr``
- ``CLI merge``: ``patchgrid merge patches.zarr -o merged.npy``
- ``script: merge``: ``pg.merge(pg.extract(v, 64, stride=32), v.shape, stride=32)``, the
  volume loaded with ``np.load``
- ``script: copy + gaussian``: ``pg.extract(v, 64, 32, copy=True)`` then
  ``pg.merge(..., window="gaussian")``

on a 256^3 float32 volume (64 MiB; 343 patches, 343 MiB), or with ``--quick`` a 128^3 volume
with 32^3 patches and stride 16 (343 patches, 43 MiB). Every job runs with numba importable
and with it hidden (``sys.modules["numba"] = None`` in the child before patchgrid is imported,
as if it were not installed), in a shuffled order each round, after one untimed run of each
(which fills numba's cache if it is empty, and the page cache). The table gives the least and
the median time of ``--repeats`` runs (the least is the run other processes disturbed least)
and the ratios with/without numba; ``numba loaded`` says whether the process imported it.
Every merge's result is compared with the volume; a mismatch prints ``CORRECTNESS FAILURE``
and the exit status is 1.

A second table measures, in a process for each job (run twice, the first filling numba's
cache for any types it lacks), what loading costs and what the kernels save on the same jobs:
``import numba``, the kernels' module, and each kernel's first call (its types loaded from
numba's cache, its threads started) beside the NumPy path's time and the kernel's. The load
divided by the saving per byte is the job size where loading pays. Without ``--quick``, the
first compile (an empty cache, ``NUMBA_CACHE_DIR`` in a temporary folder) is timed too.

    python benchmarks/bench_oneshot.py                   # 256^3, 5 repeats: a few minutes
    python benchmarks/bench_oneshot.py --quick           # 128^3, 3 repeats: under a minute
    python benchmarks/bench_oneshot.py --markdown results/oneshot.md
    python benchmarks/bench_oneshot.py --compare /tmp/old/src    # also another checkout's code

``--compare SRC`` runs every job also with ``PYTHONPATH=SRC`` (the ``src`` folder of another
checkout, e.g. ``git archive HEAD~3 src | tar -x -C /tmp/old``), shuffled with this one's, so
that before and after are measured in one run on one machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MiB = 1 << 20

# Runs a job in the child: hides numba when asked, then reports the peak memory and whether
# numba was imported, as the process ends.
LAUNCHER = """
import json, runpy, sys
report, hide, kind, arg = sys.argv[1:5]
if hide == "1":
    sys.modules["numba"] = None  # import numba raises ImportError, as if not installed
code = 0
try:
    if kind == "cli":
        sys.argv = ["patchgrid", *sys.argv[5:]]
        runpy.run_module("patchgrid", run_name="__main__", alter_sys=True)
    else:
        exec(arg)
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
with open("/proc/self/status") as f:
    hwm = [int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")][0]
with open(report, "w") as f:
    json.dump({"hwm": hwm, "numba": sys.modules.get("numba") is not None}, f)
sys.exit(code)
"""

SCRIPT_MERGE = """
import numpy as np, patchgrid as pg
v = np.load({vol!r})
r = pg.merge(pg.extract(v, {size}, {stride}), v.shape, stride={stride})
assert np.allclose(r, v, rtol=1e-6, atol=0), "CORRECTNESS FAILURE: merge != volume"
"""

SCRIPT_GAUSSIAN = """
import numpy as np, patchgrid as pg
v = np.load({vol!r})
p = pg.extract(v, {size}, {stride}, copy=True)
r = pg.merge(p, v.shape, stride={stride}, window="gaussian")
assert np.allclose(r, v, rtol=1e-5, atol=0), "CORRECTNESS FAILURE: merge != volume"
"""

CHECK_MERGED = """
import numpy as np
a, b = np.load({vol!r}), np.load({out!r})
assert a.shape == b.shape and np.allclose(a, b, rtol=1e-6, atol=0), "CORRECTNESS FAILURE"
"""

# In one process: the NumPy path, the load (import numba, the kernels' module, each kernel's
# first call) and the kernels' path, on the same jobs. Works on code with or without a
# LOAD_BYTES threshold: MIN_BYTES set high keeps a job on NumPy's path, warm kernels serve
# every job of MIN_BYTES or more.
LOAD_CHILD = """
import json, sys, time
import numpy as np
import patchgrid as pg
from patchgrid import _compiled
vol, size, stride, job = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
v = np.load(vol)
view = pg.extract(v, size, stride)
copy = np.ascontiguousarray(view)
fn = {
    "extract copy=True": lambda: pg.extract(v, size, stride, copy=True),
    "merge (view)": lambda: pg.merge(view, v.shape, stride=stride),
    "merge gaussian": lambda: pg.merge(copy, v.shape, stride=stride, window="gaussian"),
}[job]
def best(n):
    times = []
    for _ in range(n):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return min(times)
limit = _compiled.MIN_BYTES
_compiled.MIN_BYTES = 1 << 62
numpy_s = best(3)
_compiled.MIN_BYTES = limit
assert "numba" not in sys.modules
t = time.perf_counter(); import numba; import_s = time.perf_counter() - t
t = time.perf_counter(); _compiled.kernels(); module_s = time.perf_counter() - t
if hasattr(_compiled, "LOAD_BYTES"):
    _compiled.LOAD_BYTES = 0
first_s = best(1)
kernel_s = best(3)
assert _compiled.loaded()
print(json.dumps({"numpy": numpy_s, "import": import_s, "module": module_s, "first": first_s,
                  "kernel": kernel_s, "job_bytes": copy.nbytes}))
"""

LOAD_JOBS = ("extract copy=True", "merge (view)", "merge gaussian")

COMPILE_CHILD = """
import json, time
t = time.perf_counter()
from patchgrid import _compiled
_compiled.warm()
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


@dataclass
class Job:
    name: str
    kind: str  # "cli" or "py"
    arg: str  # the code of a "py" job
    cli: list[str] = field(default_factory=list)
    output: str = ""  # removed before each run
    check: str = ""  # code run after each run, in a process of its own


@dataclass
class Runs:
    wall: list[float] = field(default_factory=list)
    peak: list[int] = field(default_factory=list)
    numba: list[bool] = field(default_factory=list)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_child(
    job: Job, hide: bool, src: str | None, folder: str
) -> tuple[float, int, bool, int, str]:
    """One run of ``job`` in a fresh process: wall seconds, peak bytes, whether numba was
    imported, the exit status and the end of its output."""
    if job.output:
        shutil.rmtree(job.output, ignore_errors=True)
        if os.path.exists(job.output):
            os.remove(job.output)
    env = dict(os.environ)
    env.pop("PATCHGRID_NUMBA", None)
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    report = os.path.join(folder, "report.json")
    if os.path.exists(report):
        os.remove(report)
    cmd = [sys.executable, "-c", LAUNCHER, report, "1" if hide else "0", job.kind, job.arg]
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, *job.cli], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    info: dict[str, Any] = {"hwm": 0, "numba": False}
    if os.path.exists(report):
        with open(report) as f:
            info = json.load(f)
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    if proc.returncode == 0 and job.check:
        chk = subprocess.run([sys.executable, "-c", job.check], capture_output=True, text=True)
        if chk.returncode:
            return wall, info["hwm"], info["numba"], 1, "CORRECTNESS FAILURE"
    return wall, info["hwm"], info["numba"], proc.returncode, tail[-1] if tail else ""


def make_jobs(folder: str, side: int, size: int, stride: int) -> list[Job]:
    vol = os.path.join(folder, "volume.npy")
    store = os.path.join(folder, "patches.zarr")
    merged = os.path.join(folder, "merged.npy")
    common = ["--size", str(size), "--stride", str(stride)]
    fmt = {"vol": vol, "size": size, "stride": stride, "out": merged}
    return [
        Job("CLI extract", "cli", "", ["extract", vol, *common, "-o", store + "-out.zarr"],
            output=store + "-out.zarr"),
        Job("CLI merge", "cli", "", ["merge", store, "-o", merged], output=merged,
            check=CHECK_MERGED.format(**fmt)),
        Job("script: merge", "py", SCRIPT_MERGE.format(**fmt)),
        Job("script: copy + gaussian", "py", SCRIPT_GAUSSIAN.format(**fmt)),
    ]  # fmt: skip


def setup(folder: str, side: int, size: int, stride: int) -> None:
    """The volume (random float32 .npy) and the patch store the merges read."""
    vol = os.path.join(folder, "volume.npy")
    rng = np.random.default_rng(0)
    np.save(vol, rng.random((side,) * 3, dtype=np.float32))
    store = os.path.join(folder, "patches.zarr")
    cmd = [sys.executable, "-m", "patchgrid", "extract", vol, "--size", str(size),
           "--stride", str(stride), "-o", store]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)


def measure(
    jobs: list[Job], sources: list[tuple[str, str | None]], repeats: int, folder: str
) -> tuple[dict[tuple[str, str, bool], Runs], bool]:
    """Every job under every source, with numba and without; one untimed round first, then
    ``repeats`` rounds, each in its own shuffled order.

    A run's time depends on the run before it (a process that follows one of another job
    finds memory in another state: its first touches of fresh pages cost up to 3x more here),
    so a fixed order would favour whichever case always comes second.
    """
    results: dict[tuple[str, str, bool], Runs] = {}
    ok = True
    cases = [(job, label, src, hide) for job in jobs for label, src in sources
             for hide in (True, False)]  # fmt: skip
    for r in range(repeats + 1):
        say(f"round {r}/{repeats}" + (" (untimed)" if r == 0 else ""))
        order = list(cases)
        random.Random(r).shuffle(order)
        for job, label, src, hide in order:
            wall, peak, numba, rc, tail = run_child(job, hide, src, folder)
            if rc != 0:
                say(f"{job.name} ({label}, numba {'hidden' if hide else 'on'}): {tail}")
                ok = False
            if r == 0:
                continue
            runs = results.setdefault((job.name, label, hide), Runs())
            runs.wall.append(wall)
            runs.peak.append(peak)
            runs.numba.append(numba)
    return results, ok


def table(
    jobs: list[Job], sources: list[tuple[str, str | None]], results: dict[Any, Runs]
) -> list[str]:
    head = ("| job | code | NumPy only s | with numba s | ratio | NumPy only MiB "
            "| with numba MiB | numba loaded |")  # fmt: skip
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---|"]

    def cell(runs: Runs) -> str:
        return f"{min(runs.wall):.2f} / {statistics.median(runs.wall):.2f}"

    for job in jobs:
        for label, _ in sources:
            without, with_ = results[(job.name, label, True)], results[(job.name, label, False)]
            best = min(with_.wall) / min(without.wall)
            middle = statistics.median(with_.wall) / statistics.median(without.wall)
            loads = sum(with_.numba)
            lines.append(
                f"| {job.name} | {label} | {cell(without)} | {cell(with_)} "
                f"| {best:.2f} / {middle:.2f} "
                f"| {max(without.peak) / MiB:.0f} | {max(with_.peak) / MiB:.0f} "
                f"| {'yes' if loads == len(with_.numba) else 'no' if not loads else 'some'} |"
            )
    return lines


def load_table(folder: str, sources: list[tuple[str, str | None]], size: int,
               stride: int) -> list[str]:  # fmt: skip
    """What loading the kernels costs a process, and what they save, on the same jobs: each
    job in a process of its own."""
    vol = os.path.join(folder, "volume.npy")
    lines = [
        "| code | job | NumPy ms | kernel ms | saves ms | import numba ms | first call ms "
        "| load ms | job MiB | loading pays from MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, src in sources:
        env = dict(os.environ)
        env.pop("PATCHGRID_NUMBA", None)
        if src:
            env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        for job in LOAD_JOBS:
            cmd = [sys.executable, "-c", LOAD_CHILD, vol, str(size), str(stride), job]
            # Twice: the first run compiles what numba's cache does not hold yet.
            subprocess.run(cmd, env=env, capture_output=True, text=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                lines.append(f"| {label} | {job} | failed: {proc.stderr.strip()[-200:]} |")
                continue
            d = json.loads(proc.stdout.strip().splitlines()[-1])
            job_mib = d["job_bytes"] / MiB
            saves = d["numpy"] - d["kernel"]
            # What this job alone pays to load: numba, the module, the first call's extra.
            load = d["import"] + d["module"] + max(d["first"] - d["kernel"], 0.0)
            pays = f"{load / saves * job_mib:,.0f}" if saves > 0 else "never"
            lines.append(
                f"| {label} | {job} | {d['numpy'] * 1e3:.0f} | {d['kernel'] * 1e3:.0f} "
                f"| {saves * 1e3:.0f} | {d['import'] * 1e3:.0f} "
                f"| {d['first'] * 1e3:.0f} | {load * 1e3:.0f} | {job_mib:.0f} | {pays} |"
            )
    return [
        *lines,
        "",
        "NumPy ms, kernel ms: best of 3 calls; first call: the kernel's first call, which "
        "loads its types from numba's cache and starts its threads; load: import numba, the "
        "kernels' module and the first call's extra time. Loading pays for jobs of "
        "load / (saving per MiB) or more.",
    ]


def compile_seconds(src: str | None) -> float | None:
    """The kernels compiled from an empty cache, as the first process of an install does."""
    with tempfile.TemporaryDirectory(prefix="numba-cache-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        env.pop("PATCHGRID_NUMBA", None)
        if src:
            env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, "-c", COMPILE_CHILD], env=env,
                              capture_output=True, text=True)  # fmt: skip
    if proc.returncode:
        return None
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="128^3, 32^3 patches, 3 repeats")
    parser.add_argument("--repeats", type=int, help="timed runs of each job (default 5; 3)")
    parser.add_argument("--markdown", help="also write the tables to this Markdown file")
    parser.add_argument("--compare", metavar="SRC", help="also run the code in SRC (PYTHONPATH)")
    args = parser.parse_args(argv)
    side, size, stride = (128, 32, 16) if args.quick else (256, 64, 32)
    repeats = args.repeats or (3 if args.quick else 5)
    sources: list[tuple[str, str | None]] = [("this", None)]
    if args.compare:
        sources.insert(0, ("compared", os.path.abspath(args.compare)))
    try:
        import numba
    except ImportError:
        print("numba is not installed: nothing to compare (pip install 'patchgrid[fast]')")
        return 0
    with tempfile.TemporaryDirectory(prefix="oneshot-") as folder:
        setup(folder, side, size, stride)
        jobs = make_jobs(folder, side, size, stride)
        results, ok = measure(jobs, sources, repeats, folder)
        say("the load of the kernels, in one process ...")
        loads = load_table(folder, sources, size, stride)
    compiled = [] if args.quick else [(label, compile_seconds(src)) for label, src in sources]
    n = (side - size) // stride + 1
    title = (
        f"One-shot runs, {side}^3 float32, {size}^3 patches, stride {stride} ({n**3} patches, "
        f"{n**3 * size**3 * 4 / MiB:.0f} MiB); {repeats} fresh processes each"
    )
    machine = (
        f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, NumPy {np.__version__}, numba {numba.__version__}"
    )
    lines = [f"### {title}", "", machine, "", *table(jobs, sources, results), "",
             "Seconds: min / median wall time, interpreter start included; ratio: with numba / "
             "NumPy only, of the mins / of the medians; MiB: the process's peak resident "
             "memory (the most of the runs).", "",
             "### Loading the kernels, and what they save (one process)", "", *loads]  # fmt: skip
    for label, seconds in compiled:
        when = f"{seconds:.1f} s" if seconds is not None else "failed"
        lines.append(f"{label}: compiling every kernel from an empty cache (once an install): "
                     f"{when}.")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if not ok:
        print("CORRECTNESS FAILURE (or a failed run): see above")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
