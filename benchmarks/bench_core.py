"""Core benchmark: extract and merge against the plain NumPy way and the machine's bandwidth.

Everything is measured in one run on one machine and reported as ratios:

- copy bandwidth two ways: ``a.copy()`` (fresh pages) and ``np.copyto`` (a buffer already
  touched), both of an array about the size of the extracted patches;
- extract: ``np.ascontiguousarray(sliding_window_view(...)[::s, ::s, ::s])``, ``pg.extract(...,
  copy=True)``, ``pg.extract(..., out=buf)`` and the zero-copy view;
- merge (mean): a plain Python loop, ``pg.merge`` uniform and gaussian (and MONAI's
  ``AvgMerger`` when MONAI is importable);
- peak memory of the merges beyond their inputs, with tracemalloc, each in a fresh process.

Times are the best (minimum) of several repeats. Every case is checked for correctness once
before it is timed; a wrong answer stops the run with exit status 1.

    python benchmarks/bench_core.py            # full run, about a minute
    python benchmarks/bench_core.py --quick    # smaller volumes, a few seconds
    python benchmarks/bench_core.py --markdown results.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import patchgrid as pg
from _memory import peak_rss
from patchgrid import _compiled

MiB = 1 << 20


@dataclass(frozen=True)
class Workload:
    name: str
    side: int  # the image is side^3 float32
    size: int  # patch side
    stride: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.side,) * 3

    @property
    def grid(self) -> pg.PatchGrid:
        return pg.PatchGrid(self.shape, self.size, self.stride)

    @property
    def patch_shape(self) -> tuple[int, ...]:
        return (*self.grid.counts, *(self.size,) * 3)

    @property
    def patch_bytes(self) -> int:
        return int(np.prod(self.patch_shape)) * 4

    @property
    def image_bytes(self) -> int:
        return self.side**3 * 4

    def describe(self) -> str:
        c = self.grid.counts
        return (
            f"{self.name}: image {self.side}^3 float32 ({self.image_bytes / MiB:.0f} MiB), "
            f"patch {self.size}^3, stride {self.stride} -> {c[0]}x{c[1]}x{c[2]} = "
            f"{len(self.grid)} patches ({self.patch_bytes / MiB:.0f} MiB)"
        )


FULL = [Workload("A", 256, 64, 32), Workload("B", 128, 4, 2)]
QUICK = [Workload("A", 128, 64, 32), Workload("B", 64, 4, 2)]
# Gaussian merge is checked against a weighted Python loop; on many small patches that loop
# is slow, so it runs on a smaller volume with the same patch size and stride.
CHECK_SIDE_LIMIT_PATCHES = 5000

# Targets, per workload name.
TARGETS: dict[str, dict[str, float]] = {
    "A": {"extract_copy": 0.90, "extract_out": 0.80, "merge": 0.50, "speedup": 5.0},
    "B": {"extract_copy": 0.60, "merge": 0.20, "speedup": 5.0},
}
GAUSS_MAX = 1.5  # gaussian time / uniform time
MEM_MAX = 1.2  # merge peak / output bytes counts as "about the output size"


# ----------------------------------------------------------------------------- helpers


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Minimum wall time of ``repeats`` calls, each result dropped before the next call."""
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        r = fn()
        t = time.perf_counter() - t0
        del r
        best = min(best, t)
    return best


def best_of_each(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """``best_of`` for several functions, their calls interleaved round-robin.

    On a shared machine the background load drifts; interleaving lets every function see the
    same conditions, so the ratios between them stay fair.
    """
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], best_of(fn, 1))
    return best


def fail(msg: str) -> None:
    print(f"\nCORRECTNESS FAILURE: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def check_equal(name: str, got: np.ndarray, want: np.ndarray) -> None:
    if got.shape != want.shape or not np.array_equal(got, want):
        fail(f"{name}: differs from the reference (shape {got.shape} vs {want.shape})")


def check_close(name: str, got: Any, want: np.ndarray, rtol: float = 1e-5) -> None:
    got = np.asarray(got)
    if got.shape != want.shape:
        fail(f"{name}: shape {got.shape}, expected {want.shape}")
    if not np.allclose(got, want, rtol=rtol, atol=rtol):
        err = float(np.max(np.abs(got.astype(np.float64) - want)))
        fail(f"{name}: differs from the reference, max abs error {err:.3g}")


def image(w: Workload, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(w.shape, dtype=np.float32)


def distinct_patches(x: np.ndarray, w: Workload) -> np.ndarray:
    """Contiguous patches of ``x``, each scaled by its own factor so that overlaps disagree.

    (Patches cut straight from ``x`` would merge back to ``x`` whatever the weights; these
    make the check against the loop meaningful.)
    """
    patches = pg.extract(x, w.size, w.stride, copy=True)
    factors = np.random.default_rng(1).uniform(0.5, 1.5, w.grid.counts).astype(np.float32)
    patches *= factors[..., None, None, None]
    return patches


def loop_merge(
    patches: np.ndarray, shape: tuple[int, ...], p: int, s: int, weight: np.ndarray | None = None
) -> np.ndarray:
    """The plain way: add every patch into place, count, divide."""
    out = np.zeros(shape, np.float32)
    count = np.zeros(shape, np.float32)
    for idx in np.ndindex(*patches.shape[:3]):
        sl = tuple(slice(i * s, i * s + p) for i in idx)
        if weight is None:
            out[sl] += patches[idx]
            count[sl] += 1
        else:
            out[sl] += patches[idx] * weight
            count[sl] += weight
    return out / count


def numpy_extract(x: np.ndarray, p: int, s: int) -> np.ndarray:
    return np.ascontiguousarray(sliding_window_view(x, (p, p, p))[::s, ::s, ::s])


def copy_in_pieces(dst: np.ndarray, src: np.ndarray, piece: int = MiB) -> None:
    """``np.copyto`` one piece at a time, as a kernel working in cache-sized blocks must.

    One large ``memcpy`` may switch to non-temporal stores (glibc does above a threshold tied
    to the L3 size), which a blocked kernel never gets; this row shows what that is worth.
    """
    d, s = dst.reshape(-1), src.reshape(-1)
    step = piece // d.itemsize
    for i in range(0, d.size, step):
        np.copyto(d[i : i + step], s[i : i + step])


def touched(shape: Any, dtype: Any = np.float32) -> np.ndarray:
    """A buffer whose pages are all mapped (np.zeros may hand back untouched calloc pages)."""
    buf = np.empty(shape, dtype)
    buf.fill(1)
    return buf


def monai_merger() -> Any:
    try:
        import torch  # noqa: F401
        from monai.inferers import AvgMerger
    except Exception:  # MONAI (or torch) is optional and not installed by default
        return None
    return AvgMerger


def monai_merge(avg_merger: Any, patches: np.ndarray, w: Workload) -> np.ndarray:
    import torch

    merger = avg_merger(merged_shape=(1, 1, *w.shape))
    s = w.stride
    for idx in np.ndindex(*patches.shape[:3]):
        merger.aggregate(torch.from_numpy(patches[idx][None, None]), [i * s for i in idx])
    return merger.finalize()[0, 0].numpy()


# ----------------------------------------------------------------------------- memory child


def child(case: str, side: int, size: int, stride: int) -> None:
    """Run one case once in this (fresh) process; print its peak memory as JSON."""
    w = Workload("child", side, size, stride)
    x = image(w)
    patches = distinct_patches(x, w) if case != "extract_copy" else None
    grid = w.grid
    calls: dict[str, Callable[[], np.ndarray]] = {
        "extract_copy": lambda: pg.extract(x, size, stride, copy=True),
        "merge_uniform": lambda: pg.merge(patches, grid),
        "merge_gaussian": lambda: pg.merge(patches, grid, window="gaussian"),
        "loop": lambda: loop_merge(patches, w.shape, size, stride),  # type: ignore[arg-type]
    }
    fn = calls[case]
    # Loading the compiled kernels (numba and LLVM, and each kernel's types on first use) is a
    # cost of the process, once, like importing NumPy; it is reported beside the table, not
    # counted in each call. A small merge of the same kinds of arrays loads it all.
    if _compiled.warm() and case.startswith("merge"):
        small = Workload("warm", 4 * stride, size, stride)
        warm_patches = distinct_patches(image(small), small)
        saved, _compiled.MIN_BYTES = _compiled.MIN_BYTES, 0
        try:
            pg.merge(warm_patches, small.grid)
            pg.merge(warm_patches, small.grid, window="gaussian")
        finally:
            _compiled.MIN_BYTES = saved
    gc.collect()
    rss0 = peak_rss(reset=True)
    tracemalloc.start()
    result = fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = peak_rss()
    print(json.dumps({"peak": peak, "out": int(result.nbytes), "rss_delta": rss1 - rss0}))


def peak_memory(case: str, w: Workload) -> dict[str, int]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_child",
        case,
        str(w.side),
        str(w.size),
        str(w.stride),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        fail(f"memory child {case} on {w.name} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- the run


@dataclass
class Row:
    workload: str
    case: str
    ms: str = ""
    gbps: str = ""
    relative: str = ""
    peak: str = ""
    times_out: str = ""
    target: str = ""
    met: str = ""


COLUMNS = [
    ("workload", "WL"),
    ("case", "Case"),
    ("ms", "Best ms"),
    ("gbps", "GB/s"),
    ("relative", "Relative"),
    ("peak", "Peak MiB"),
    ("times_out", "Peak/out"),
    ("target", "Target"),
    ("met", "Met"),
]


def yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def run_workload(w: Workload, repeats: int, rows: list[Row], log: Callable[[str], None]) -> None:
    W = w.name
    goal = TARGETS[W]
    p, s = w.size, w.stride
    nbytes = w.patch_bytes
    grid = w.grid

    def gbs(seconds: float, n: int = nbytes) -> float:
        return n / seconds / 1e9

    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.3f}" if seconds < 1e-2 else f"{seconds * 1e3:.1f}"

    # 1. copy bandwidth -------------------------------------------------------------
    log(f"{W}: bandwidth")
    a = touched(nbytes // 4)
    buf = touched(a.shape)
    t = best_of_each(
        {
            "copy": a.copy,
            "copyto": partial(np.copyto, buf, a),
            "pieces": partial(copy_in_pieces, buf, a),
        },
        repeats,
    )
    t_copy, t_copyto = t["copy"], t["copyto"]
    del a, buf
    bw_copy, bw_copyto = gbs(t_copy), gbs(t_copyto)
    rows.append(
        Row(
            W, "bandwidth: a.copy() (fresh pages)", ms(t_copy), f"{bw_copy:.2f}", "reference 'copy'"
        )
    )
    rows.append(
        Row(
            W,
            "bandwidth: np.copyto (touched)",
            ms(t_copyto),
            f"{bw_copyto:.2f}",
            "reference 'copyto'",
        )
    )

    rows.append(
        Row(
            W,
            "bandwidth: np.copyto, 1 MiB pieces",
            ms(t["pieces"]),
            f"{gbs(t['pieces']):.2f}",
            f"{gbs(t['pieces']) / bw_copyto:.0%} of copyto (for comparison only)",
        )
    )

    # 2. extract --------------------------------------------------------------------
    log(f"{W}: extract")
    x = image(w)
    ref = numpy_extract(x, p, s)
    check_equal("pg.extract(copy=True)", pg.extract(x, p, s, copy=True), ref)
    out_buf = touched(w.patch_shape)
    check_equal("pg.extract(out=)", pg.extract(x, p, s, out=out_buf), ref)
    check_equal("pg.extract view", pg.extract(x, p, s), ref)
    del ref
    out_buf.fill(1)

    # Large patches are copied by the compiled kernel where numba is installed.
    compiled = _compiled.available() and p**3 * x.itemsize >= _compiled.MIN_PATCH
    t = best_of_each(
        {
            "numpy": partial(numpy_extract, x, p, s),
            "copy": partial(pg.extract, x, p, s, copy=True),
            "out": partial(pg.extract, x, p, s, out=out_buf),
            **({
                "copy numpy": partial(numpy_path, pg.extract, x, p, s, copy=True),
                "out numpy": partial(numpy_path, pg.extract, x, p, s, out=out_buf),
            } if compiled else {}),
        },
        repeats,
    )  # fmt: skip
    t_np, t_ours, t_out = t["numpy"], t["copy"], t["out"]
    t_view = best_of(partial(pg.extract, x, p, s), max(repeats, 20))
    del out_buf
    f_np, f_ours, f_out = gbs(t_np) / bw_copy, gbs(t_ours) / bw_copy, gbs(t_out) / bw_copyto
    rows.append(
        Row(
            W,
            "extract: NumPy ascontiguousarray(swv)",
            ms(t_np),
            f"{gbs(t_np):.2f}",
            f"{f_np:.0%} of copy",
        )
    )
    row = Row(
        W,
        "extract: pg copy=True",
        ms(t_ours),
        f"{gbs(t_ours):.2f}",
        f"{f_ours:.0%} of copy; {t_np / t_ours:.1f}x NumPy way",
        target=f">= {goal['extract_copy']:.0%} of copy",
        met=yes(f_ours >= goal["extract_copy"]),
    )
    rows.append(row)
    row = Row(
        W, "extract: pg out=buf (touched)", ms(t_out), f"{gbs(t_out):.2f}", f"{f_out:.0%} of copyto"
    )
    if "extract_out" in goal:
        row.target = f">= {goal['extract_out']:.0%} of copyto"
        row.met = yes(f_out >= goal["extract_out"])
    rows.append(row)
    if compiled:
        for name, ref, bw in (("copy=True", "copy", bw_copy), ("out=buf", "copyto", bw_copyto)):
            tn = t[f"{name.split('=')[0]} numpy"]
            label = f"extract: pg {name}, NumPy path (no numba)"
            rows.append(Row(W, label, ms(tn), f"{gbs(tn):.2f}", f"{gbs(tn) / bw:.0%} of {ref}"))
    rows.append(Row(W, "extract: pg view (zero-copy)", ms(t_view), "-", "no data moved"))

    # 3. merge ----------------------------------------------------------------------
    log(f"{W}: merge")
    patches = distinct_patches(x, w)
    del x
    t0 = time.perf_counter()
    want = loop_merge(patches, w.shape, p, s)
    t_loop = time.perf_counter() - t0
    loop_runs = 1
    if t_loop < 0.3:  # cheap enough to repeat: take the best as for the others
        t_loop = min(t_loop, best_of(partial(loop_merge, patches, w.shape, p, s), repeats - 1))
        loop_runs = repeats
    check_close("pg.merge uniform", pg.merge(patches, grid), want)
    del want
    check_gaussian(w, patches if len(grid) <= CHECK_SIDE_LIMIT_PATCHES else None)

    t = best_of_each(
        {
            "uniform": partial(pg.merge, patches, grid),
            "gaussian": partial(pg.merge, patches, grid, window="gaussian"),
            "numpy": partial(numpy_path, pg.merge, patches, grid),
        },
        repeats,
    )
    t_uni, t_gau, t_np = t["uniform"], t["gaussian"], t["numpy"]
    f_uni, f_gau = gbs(t_uni) / bw_copyto, gbs(t_gau) / bw_copyto
    f_loop = gbs(t_loop) / bw_copyto
    once = "" if loop_runs > 1 else " [timed once]"
    rows.append(
        Row(
            W,
            f"merge: Python loop{once}",
            ms(t_loop),
            f"{gbs(t_loop):.2f}",
            f"{f_loop:.0%} of copyto",
        )
    )
    ok = f_uni >= goal["merge"] and t_loop / t_uni >= goal["speedup"]
    rows.append(
        Row(
            W,
            "merge: pg uniform",
            ms(t_uni),
            f"{gbs(t_uni):.2f}",
            f"{f_uni:.0%} of copyto; {t_loop / t_uni:.1f}x loop",
            target=f">= {goal['merge']:.0%} of copyto, >= {goal['speedup']:.0f}x loop",
            met=yes(ok),
        )
    )
    if _compiled.available():
        rows.append(
            Row(
                W,
                "merge: pg uniform, NumPy path (no numba)",
                ms(t_np),
                f"{gbs(t_np):.2f}",
                f"{gbs(t_np) / bw_copyto:.0%} of copyto; {t_loop / t_np:.1f}x loop",
            )
        )
    rows.append(
        Row(
            W,
            "merge: pg gaussian",
            ms(t_gau),
            f"{gbs(t_gau):.2f}",
            f"{f_gau:.0%} of copyto; {t_gau / t_uni:.2f}x uniform time",
            target=f"<= {GAUSS_MAX}x uniform time",
            met=yes(t_gau / t_uni <= GAUSS_MAX),
        )
    )

    # 5. MONAI ----------------------------------------------------------------------
    avg_merger = monai_merger()
    if avg_merger is None:
        rows.append(Row(W, "merge: MONAI AvgMerger", relative="skipped: MONAI not importable"))
    else:
        log(f"{W}: MONAI")
        t0 = time.perf_counter()
        got = monai_merge(avg_merger, patches, w)
        t_monai = time.perf_counter() - t0
        check_close("MONAI AvgMerger", got, pg.merge(patches, grid))
        rows.append(
            Row(
                W,
                "merge: MONAI AvgMerger [timed once]",
                ms(t_monai),
                f"{gbs(t_monai):.2f}",
                f"{gbs(t_monai) / bw_copyto:.0%} of copyto; pg is {t_monai / t_uni:.1f}x faster",
            )
        )
    del patches
    gc.collect()

    # 4. peak memory, each case in a fresh process ----------------------------------
    log(f"{W}: peak memory")
    for case, label, has_target in [
        ("extract_copy", "memory: pg extract copy=True", False),
        ("merge_uniform", "memory: pg merge uniform", True),
        ("merge_gaussian", "memory: pg merge gaussian", True),
        ("loop", "memory: Python loop", False),
    ]:
        m = peak_memory(case, w)
        ratio = m["peak"] / m["out"]
        row = Row(
            W,
            label,
            peak=f"{m['peak'] / MiB:.1f}",
            times_out=f"{ratio:.2f}x",
            relative=f"output {m['out'] / MiB:.0f} MiB, +{(m['peak'] - m['out']) / MiB:.1f} MiB "
            f"more; RSS +{m['rss_delta'] / MiB:.0f} MiB",
        )
        if has_target:
            row.target = f"<= {MEM_MAX}x output"
            row.met = yes(ratio <= MEM_MAX)
        rows.append(row)


def check_gaussian(w: Workload, patches: np.ndarray | None) -> None:
    """Gaussian merge against a weighted Python loop (on a smaller volume when many patches)."""
    if patches is None:
        side = w.size + w.stride * 15  # 16 patches per axis, same size and stride
        w = Workload(w.name, side, w.size, w.stride)
        patches = distinct_patches(image(w, seed=2), w)
    weight = pg.window("gaussian", (w.size,) * 3).astype(np.float32)
    want = loop_merge(patches, w.shape, w.size, w.stride, weight)
    check_close("pg.merge gaussian", pg.merge(patches, w.grid, window="gaussian"), want, 1e-4)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(quick: bool, repeats: int) -> list[str]:
    return [
        f"patchgrid core benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}"
        + (" (--quick: smaller volumes, indicative only)" if quick else ""),
        f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); {platform.system()} "
        f"{platform.release()}",
        f"Python {platform.python_version()}, numpy {np.__version__}, "
        f"patchgrid {pg.__version__}; times are the best of {repeats} unless marked",
        f"patchgrid kernel threads: {threads()} (the copy references are single-threaded)",
        f"compiled kernels: {kernels()}",
    ]


def numpy_path(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``f`` with the compiled kernels out of reach: NumPy's own path."""
    saved = _compiled.MIN_BYTES
    _compiled.MIN_BYTES = 1 << 62
    try:
        return f(*args, **kwargs)
    finally:
        _compiled.MIN_BYTES = saved


def kernels() -> str:
    if not _compiled.available():
        return "none (NumPy only; `pip install numba` for the compiled overlap-add)"
    import numba

    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from _memory import peak_rss; "
        "from patchgrid import _compiled; b = peak_rss(True); _compiled.warm(); "
        "print(peak_rss() - b)"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-c", code, here], capture_output=True, text=True)
    load = int(run.stdout.strip() or 0) / MiB
    return (
        f"numba {numba.__version__} (extract and merge of large patches; NumPy path shown "
        f"beside it); loading the "
        f"kernels costs a process {load:.0f} MiB once (not counted in the calls below)"
    )


def threads() -> str:
    """The kernels' thread count, if this version has one (a private detail, read only)."""
    from patchgrid import _strided

    return str(getattr(_strided, "THREADS", 1))


def render_text(rows: list[Row]) -> str:
    cells = [[h for _, h in COLUMNS]] + [[getattr(r, k) for k, _ in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    numeric = {"ms", "gbps", "peak", "times_out"}

    def fmt(line: list[str]) -> str:
        return "  ".join(
            c.rjust(wd) if k in numeric else c.ljust(wd)
            for c, wd, (k, _) in zip(line, widths, COLUMNS)
        ).rstrip()

    out = [fmt(cells[0]), "  ".join("-" * wd for wd in widths)]
    prev = rows[0].workload if rows else ""
    for r, line in zip(rows, cells[1:]):
        if r.workload != prev:
            out.append("")
            prev = r.workload
        out.append(fmt(line))
    return "\n".join(out)


def render_markdown(rows: list[Row]) -> str:
    heads = [h for _, h in COLUMNS]
    out = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    for r in rows:
        out.append("| " + " | ".join(getattr(r, k) or " " for k, _ in COLUMNS) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller volumes, fewer repeats")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table as Markdown")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per timing")
    parser.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        case, side, size, stride = args._child
        child(case, int(side), int(size), int(stride))
        return 0

    repeats = args.repeats or (3 if args.quick else 5)
    workloads = QUICK if args.quick else FULL
    head = header(args.quick, repeats)
    print("\n".join(head))
    for w in workloads:
        print("workload " + w.describe())
    print(flush=True)

    def log(msg: str) -> None:
        print(f"  ... {msg}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    rows: list[Row] = []
    for w in workloads:
        run_workload(w, repeats, rows, log)
    elapsed = time.perf_counter() - start

    table = render_text(rows)
    met = [r.met for r in rows if r.met]
    summary = (
        f"targets met: {met.count('yes')} of {len(met)}; total run {elapsed:.0f} s. "
        "Relative: GB/s as a share of the same workload's copy bandwidth "
        "(copy = a.copy(), copyto = np.copyto); Peak: tracemalloc peak of the call alone, "
        "in a fresh process, beyond its inputs."
    )
    print(table)
    print()
    print(summary)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("# patchgrid core benchmark\n\n")
            f.write("".join(f"- {line}\n" for line in head))
            f.write("".join(f"- workload {w.describe()}\n" for w in workloads))
            f.write("\n" + render_markdown(rows) + "\n\n" + summary + "\n")
        print(f"Markdown written to {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
