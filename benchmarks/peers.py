"""patchgrid against its peers: the same extract, merge and apply jobs through every library.

Peers: the plain NumPy way (``sliding_window_view`` + copy; a Python loop for the merge),
scikit-image ``view_as_windows``, patchify, tiler, patchly, torch ``Tensor.unfold``, MONAI
(``SlidingWindowSplitter``, ``AvgMerger``, ``sliding_window_inference``) and TorchIO
(``GridSampler``, ``GridAggregator``). Every measurement (one job, one peer, one operation)
runs in a fresh Python process: the peer's modules are imported and warmed up on a small
volume, the inputs are made, and then the process' peak resident memory is reset, so the
memory reported is what the operation itself added (its output included). Times are the
median of several calls. Correctness (extract equal to an independent reference, merge giving
back the image, merge averaging overlaps) is checked on the small and the non-dividing job.

    python benchmarks/peers.py                   # everything: table, results/peers.md, .png
    python benchmarks/peers.py --quick           # fewer repeats, a smoke run
    python benchmarks/peers.py --jobs 1 4 --peers patchgrid monai
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np

import patchgrid as pg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _memory import peak_rss

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
MiB = 1 << 20
SLOW_S = 60.0  # a call estimated to take longer than this is not run
OPS = ("extract", "merge", "apply")

Thunk = Callable[[], Any]


# ----------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Job:
    name: str
    shape: tuple[int, int, int]
    size: int
    stride: int
    title: str

    @property
    def divides(self) -> bool:
        return all((n - self.size) % self.stride == 0 for n in self.shape)

    def axis_starts(self, n: int, edge: str) -> list[int]:
        """Patch corners along one axis, computed here, independently of patchgrid."""
        last = n - self.size
        starts = list(range(0, last + 1, self.stride))
        if edge == "drop" or starts[-1] == last:
            return starts
        if edge == "shift":
            return [*starts, last]
        return [*starts, starts[-1] + self.stride]  # pad: one more step, into the padding

    def starts(self, edge: str) -> np.ndarray:
        axes = [self.axis_starts(n, edge) for n in self.shape]
        mesh = np.meshgrid(*axes, indexing="ij")
        return np.stack([m.ravel() for m in mesh], axis=1)

    def canvas(self, edge: str) -> tuple[int, ...]:
        """The shape the patches of ``edge`` lie in (larger than the image under "pad")."""
        return tuple(max(n, self.axis_starts(n, edge)[-1] + self.size) for n in self.shape)

    def covered(self, edge: str) -> tuple[slice, ...]:
        return tuple(slice(0, self.axis_starts(n, edge)[-1] + self.size) for n in self.shape)

    def count(self, edge: str = "shift") -> int:
        return int(np.prod([len(self.axis_starts(n, edge)) for n in self.shape]))

    def describe(self) -> str:
        d, h, w = self.shape
        return (
            f"{d}x{h}x{w} float32, {self.size}^3 patches, stride {self.stride} "
            f"({self.count():,} patches)"
        )


JOBS = {
    "1": Job("1", (10, 20, 30), 4, 2, "the question's example"),
    "2": Job("2", (256, 256, 256), 64, 32, "large patches"),
    "3": Job("3", (128, 128, 128), 4, 2, "many tiny patches"),
    "4": Job("4", (250, 250, 250), 64, 48, "stride does not divide"),
}


def volume(job: Job) -> np.ndarray:
    return np.random.default_rng(0).random(job.shape, dtype=np.float32)


def source(vol: np.ndarray, job: Job, edge: str) -> np.ndarray:
    canvas = job.canvas(edge)
    if canvas == vol.shape:
        return vol
    return np.pad(vol, [(0, c - n) for c, n in zip(canvas, vol.shape)])


def gather(src: np.ndarray, starts: np.ndarray, p: int) -> np.ndarray:
    return np.stack([src[tuple(slice(a, a + p) for a in st)] for st in starts.tolist()])


def loop_mean(patches: np.ndarray, starts: np.ndarray, job: Job, edge: str) -> np.ndarray:
    """The independent reference: a float64 Python loop over the patches, cropped."""
    out = np.zeros(job.canvas(edge))
    count = np.zeros(job.canvas(edge))
    p = job.size
    for st, patch in zip(starts.tolist(), patches):
        sl = tuple(slice(a, a + p) for a in st)
        out[sl] += patch
        count[sl] += 1
    out /= np.maximum(count, 1)
    return out[tuple(slice(0, n) for n in job.shape)]


# ----------------------------------------------------------------------------- peers


@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    modules: tuple[str, ...]  # what must be importable
    dist: str  # the distribution whose version is reported
    edges: dict[str, str]  # op -> placement when the stride does not divide; absent: n/a
    na: dict[str, str] = field(default_factory=dict)  # op -> why it is not offered


PEERS = [
    Peer("patchgrid", "patchgrid (shift)", (), "patchgrid", dict.fromkeys(OPS, "shift")),
    Peer(
        "patchgrid-drop", "patchgrid (drop)", (), "patchgrid", {"extract": "drop", "merge": "drop"}
    ),
    Peer("patchgrid-pad", "patchgrid (pad)", (), "patchgrid", {"extract": "pad", "merge": "pad"}),
    Peer(
        "numpy",
        "NumPy sliding_window_view / loop",
        (),
        "numpy",
        {"extract": "drop", "merge": "shift"},
        {"apply": "no such function"},
    ),
    Peer(
        "skimage",
        "scikit-image view_as_windows",
        ("skimage",),
        "scikit-image",
        {"extract": "drop"},
        {"merge": "no merge", "apply": "no such function"},
    ),
    Peer(
        "patchify",
        "patchify",
        ("patchify",),
        "patchify",
        {"extract": "drop", "merge": "drop"},
        {"apply": "no such function"},
    ),
    Peer(
        "tiler",
        "tiler Tiler + Merger",
        ("tiler",),
        "tiler",
        {"extract": "pad", "merge": "pad"},
        {"apply": "not measured"},
    ),
    Peer(
        "patchly",
        "patchly GridSampler + Aggregator",
        ("patchly",),
        "patchly",
        {"extract": "shift", "merge": "shift"},
        {"apply": "not measured"},
    ),
    Peer(
        "torch",
        "torch Tensor.unfold",
        ("torch",),
        "torch",
        {"extract": "drop"},
        {"merge": "n/a (fold is 2-D only)", "apply": "no such function"},
    ),
    Peer(
        "monai",
        "MONAI",
        ("torch", "monai"),
        "monai",
        {"extract": "pad", "merge": "shift", "apply": "shift"},
    ),
    Peer(
        "torchio",
        "TorchIO GridSampler + GridAggregator",
        ("torch", "torchio"),
        "torchio",
        {"extract": "shift", "merge": "shift"},
        {"apply": "not measured"},
    ),
]
PEER = {p.name: p for p in PEERS}

# What each peer does when (shape - size) % stride != 0, beyond what the checks print.
EDGE_NOTES = {
    "patchgrid": "`edge=` chooses: `drop` (default), `pad`, `shift` (used here), `even`.",
    "numpy": "`sliding_window_view(...)[::s, ::s, ::s]` drops the trailing voxels; the loop "
    "merge places patches wherever it is told (here: shifted, like patchgrid).",
    "skimage": "`view_as_windows` drops the trailing voxels silently; a view (copied here).",
    "patchify": "`patchify` is `view_as_windows`: drops the trailing voxels (copied here). "
    "`unpatchify` overwrites instead of averaging and skips overlapping patches; it infers the "
    "step from the image size, so patches that do not reach the far border either raise "
    "`NonUniformStepSizeError` or, as on job 4 (a step of 62 instead of 48), are silently put "
    "in the wrong places.",
    "tiler": "`mode='constant'` (default) pads the far end, `Merger.merge(unpad=True)` crops "
    "back; `mode='drop'` drops. It cannot shift the last tile.",
    "patchly": "`SamplingMode.SAMPLE_EDGE` (used here) shifts the last patch; the default "
    "`SAMPLE_SQUEEZE` spreads the patches evenly; `SAMPLE_CROP` drops.",
    "torch": "`unfold` drops the trailing voxels; a view (`.contiguous()` copies it). "
    "`torch.nn.functional.fold` merges 2-D only: no 3-D merge.",
    "monai": "`SlidingWindowSplitter` pads the far end (`pad_mode='constant'`, default; "
    "`pad_mode=None` drops); `AvgMerger` takes any corner (here: shifted, like patchgrid); "
    "`sliding_window_inference` shifts the last patch. Counts are uint8 (255 overlaps at most).",
    "torchio": "`GridSampler` shifts the last patch; `GridAggregator(overlap_mode='average')` "
    "averages. Patch overlap must be even.",
}


def installed(peer: Peer) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in peer.modules)


def peer_version(peer: Peer) -> str:
    try:
        return importlib.metadata.version(peer.dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def module(name: str) -> Any:
    """Import a peer's module when it is used (the peers are untyped; Any keeps mypy quiet)."""
    return importlib.import_module(name)


def identity(x: Any) -> Any:
    return x


def batch_size(job: Job) -> int:
    """About 4 MiB of float32 patches per batch, between 4 and 1024 patches."""
    return int(np.clip((1 << 20) // job.size**3, 4, 1024))


def make_extract(peer: str, vol: np.ndarray, job: Job, edge: str) -> Thunk:
    p, s = job.size, job.stride
    if peer.startswith("patchgrid"):
        return lambda: pg.extract(vol, p, s, edge=edge, copy=True)
    if peer == "numpy":
        swv = np.lib.stride_tricks.sliding_window_view
        return lambda: np.ascontiguousarray(swv(vol, (p, p, p))[::s, ::s, ::s])
    if peer == "skimage":
        view_as_windows = module("skimage.util").view_as_windows
        return lambda: np.ascontiguousarray(view_as_windows(vol, p, s))
    if peer == "patchify":
        patchify = module("patchify").patchify
        return lambda: np.ascontiguousarray(patchify(vol, (p, p, p), s))
    if peer == "tiler":
        tiler_mod = module("tiler")

        def tiler_extract() -> Any:
            tiler = tiler_mod.Tiler(vol.shape, (p, p, p), overlap=p - s, mode="constant")
            return tiler.get_all_tiles(vol, copy_data=True)

        return tiler_extract
    if peer == "patchly":
        patchly = module("patchly")

        def patchly_extract() -> np.ndarray:
            edge_mode = patchly.SamplingMode.SAMPLE_EDGE
            sampler = patchly.GridSampler(vol, vol.shape, (p, p, p), (s, s, s), mode=edge_mode)
            return np.stack([patch for patch, _ in sampler])

        return patchly_extract
    if peer == "torch":
        torch = module("torch")
        t = torch.from_numpy(vol)
        return lambda: t.unfold(0, p, s).unfold(1, p, s).unfold(2, p, s).contiguous()
    if peer == "monai":
        torch, inferers = module("torch"), module("monai.inferers")
        t5 = torch.from_numpy(vol)[None, None]

        def monai_extract() -> Any:
            splitter = inferers.SlidingWindowSplitter((p, p, p), overlap=p - s)
            return torch.cat([patch for patch, _ in splitter(t5)])

        return monai_extract
    if peer == "torchio":
        torch, tio = module("torch"), module("torchio")
        subject = tio.Subject(img=tio.ScalarImage(tensor=torch.from_numpy(vol)[None]))

        def torchio_extract() -> Any:
            sampler = tio.GridSampler(subject, p, p - s)
            return torch.stack([patch["img"][tio.DATA] for patch in sampler])

        return torchio_extract
    raise ValueError(f"no extract for {peer}")


def make_merge(peer: str, patches: np.ndarray, starts: np.ndarray, job: Job, edge: str) -> Thunk:
    """``patches``: (N, p, p, p), in the C order of ``starts`` (the placement ``edge``)."""
    p, s, shape = job.size, job.stride, job.shape
    if peer.startswith("patchgrid"):
        return lambda: pg.merge(patches, pg.PatchGrid(shape, p, s, edge=edge))
    if peer == "numpy":
        slices = [tuple(slice(a, a + p) for a in st) for st in starts.tolist()]
        canvas = job.canvas(edge)

        def loop_merge() -> np.ndarray:
            out = np.zeros(canvas, np.float32)
            count = np.zeros(canvas, np.float32)
            for sl, patch in zip(slices, patches):
                out[sl] += patch
                count[sl] += 1
            out /= count
            return out[tuple(slice(0, n) for n in shape)]

        return loop_merge
    if peer == "patchify":
        unpatchify = module("patchify").unpatchify
        counts = [len(job.axis_starts(n, edge)) for n in shape]
        grid_shaped = patches.reshape(*counts, p, p, p)
        return lambda: unpatchify(grid_shaped, shape)
    if peer == "tiler":
        tiler_mod = module("tiler")

        def tiler_merge() -> Any:
            tiler = tiler_mod.Tiler(shape, (p, p, p), overlap=p - s, mode="constant")
            merger = tiler_mod.Merger(tiler)
            merger.add_batch(0, len(patches), patches)
            return merger.merge(unpad=True, dtype=np.float32)

        return tiler_merge
    if peer == "patchly":
        patchly = module("patchly")
        edge_mode = patchly.SamplingMode.SAMPLE_EDGE
        sampler = patchly.GridSampler(None, shape, (p, p, p), (s, s, s), mode=edge_mode)
        bboxes = [np.stack([st, st + p], axis=1) for st in starts]

        def patchly_merge() -> Any:
            aggregator = patchly.Aggregator(sampler, output_size=shape, weights="avg")
            for patch, bbox in zip(patches, bboxes):
                aggregator.append(patch, bbox)
            return aggregator.get_output(inplace=True)

        return patchly_merge
    if peer == "monai":
        torch, inferers = module("torch"), module("monai.inferers")
        pt = torch.from_numpy(patches)[:, None]
        locations = [tuple(st) for st in starts.tolist()]
        canvas = job.canvas(edge)

        def monai_merge() -> Any:
            merger = inferers.AvgMerger(merged_shape=(1, 1, *canvas), cropped_shape=(1, 1, *shape))
            for i, location in enumerate(locations):
                merger.aggregate(pt[i : i + 1], location)
            return merger.finalize()

        return monai_merge
    if peer == "torchio":
        torch, tio = module("torch"), module("torchio")
        empty = torch.zeros((1, *shape), dtype=torch.float32)
        sampler = tio.GridSampler(tio.Subject(img=tio.ScalarImage(tensor=empty)), p, p - s)
        pt = torch.from_numpy(patches)[:, None]
        locations = torch.from_numpy(np.concatenate([starts, starts + p], axis=1))

        def torchio_merge() -> Any:
            aggregator = tio.inference.GridAggregator(sampler, overlap_mode="average")
            aggregator.add_batch(pt, locations)
            return aggregator.get_output_tensor()

        return torchio_merge
    raise ValueError(f"no merge for {peer}")


def make_apply(peer: str, vol: np.ndarray, job: Job, edge: str) -> Thunk:
    p, s, b = job.size, job.stride, batch_size(job)
    if peer.startswith("patchgrid"):
        return lambda: pg.apply(identity, vol, p, s, edge=edge, window="uniform", batch_size=b)
    if peer == "monai":
        torch, inferers = module("torch"), module("monai.inferers")
        t5 = torch.from_numpy(vol)[None, None]
        overlap = 1 - s / p
        return lambda: inferers.sliding_window_inference(
            t5, (p, p, p), b, identity, overlap=overlap
        )
    raise ValueError(f"no apply for {peer}")


def placement(peer: Peer, op: str, job: Job) -> str:
    return peer.edges[op] if not job.divides else "-"


def make(peer: str, op: str, vol: np.ndarray, job: Job) -> Thunk:
    edge = PEER[peer].edges[op]
    if op == "extract":
        return make_extract(peer, vol, job, edge)
    if op == "apply":
        return make_apply(peer, vol, job, edge)
    starts = job.starts(edge)
    return make_merge(peer, gather(source(vol, job, edge), starts, job.size), starts, job, edge)


def to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def nbytes(x: Any) -> int:
    if hasattr(x, "element_size"):
        return int(x.numel() * x.element_size())
    return int(np.asarray(x).nbytes)


# ----------------------------------------------------------------------------- children


def release_free_memory() -> None:
    """Give the heap's free pages back to the system, so that an operation that reuses memory
    freed while its inputs were made still shows in the resident peak (glibc only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def child_measure(job: Job, peer: str, op: str, repeats: int) -> dict[str, Any]:
    """Time and peak memory of one operation, in this (fresh) process."""
    warm = Job("warm", (job.size + job.stride,) * 3, job.size, job.stride, "")
    fast = importlib.import_module("patchgrid._compiled")
    saved = fast.MIN_BYTES
    patch_bytes = (
        4
        * job.size**3
        * math.prod(len(range(0, n - job.size + 1, job.stride)) + 1 for n in job.shape)
    )
    if peer.startswith("patchgrid") and patch_bytes >= saved:
        # Large merges load compiled kernels (numba) once per process: lazy initialisation
        # too, which the small warm-up volume reaches only with the threshold lifted. (Small
        # jobs never load them, so their warm-up does not either.)
        fast.MIN_BYTES = 0
        fast.warm()  # every kernel and dtype, the batch kernels of apply and extract included
    try:
        r = make(peer, op, volume(warm), warm)()  # imports, lazy initialisation
    finally:
        fast.MIN_BYTES = saved
    del r
    vol = volume(job)
    fn = make(peer, op, vol, job)
    gc.collect()
    release_free_memory()
    base = peak_rss(reset=True)
    t0 = time.perf_counter()
    r = fn()
    first = time.perf_counter() - t0
    mem = max(0, peak_rss() - base)
    out = nbytes(r)
    del r
    if first < 0.02:  # tiny calls: time batches of calls, report the time per call
        calls = max(1, int(0.05 / max(first, 1e-6)))
        times = []
        for _ in range(max(repeats, 5)):
            gc.collect()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) / calls)
    else:
        n = repeats if first < 2 else (min(repeats, 3) if first < 10 else 1)
        times = [first]
        for _ in range(n - 1):
            gc.collect()
            t0 = time.perf_counter()
            r = fn()
            times.append(time.perf_counter() - t0)
            del r
    return {"time": statistics.median(times), "runs": len(times), "mem": mem, "out": out}


def compare(got: np.ndarray, want: np.ndarray, region: tuple[slice, ...] | None = None) -> str:
    if got.shape != want.shape:
        return f"no: shape {got.shape}, expected {want.shape}"
    if region is not None:
        got, want = got[region], want[region]
    if np.array_equal(got, want):
        return "exact"
    err = float(np.max(np.abs(got.astype(np.float64) - want)))
    if np.allclose(got, want, rtol=1e-5, atol=1e-5):
        return f"yes (max err {err:.1e})"
    return f"NO (max err {err:.2g})"


def attempt(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception as e:  # a peer that raises is a result, not a crash
        return f"raises {type(e).__name__}"


def check_extract(peer: str, vol: np.ndarray, job: Job, edge: str) -> str:
    want = gather(source(vol, job, edge), job.starts(edge), job.size)
    got = to_numpy(make_extract(peer, vol, job, edge)())
    contiguous = "" if got.flags.c_contiguous else ", not C-contiguous"
    return compare(got.reshape(want.shape), want) + contiguous


def check_merge(peer: str, vol: np.ndarray, job: Job, edge: str, constants: bool) -> str:
    """Merge the image's own patches (want: the image) or patch i filled with i (want: mean)."""
    starts = job.starts(edge)
    patches = gather(source(vol, job, edge), starts, job.size)
    want = vol
    if constants:
        ids = np.arange(len(starts), dtype=np.float32)[:, None, None, None]
        patches = np.broadcast_to(ids, patches.shape).copy()
        want = loop_mean(patches, starts, job, edge)
    got = to_numpy(make_merge(peer, patches, starts, job, edge)())
    return compare(got.reshape(got.shape[-3:]), want, job.covered(edge))


def check_apply(peer: str, vol: np.ndarray, job: Job, edge: str) -> str:
    got = to_numpy(make_apply(peer, vol, job, edge)())
    return compare(got.reshape(got.shape[-3:]), vol, job.covered(edge))


def child_check(job: Job, peer: str) -> dict[str, dict[str, str]]:
    """Correctness of every operation the peer offers, on this job."""
    vol = volume(job)
    result: dict[str, dict[str, str]] = {}
    for op, edge in PEER[peer].edges.items():
        if op == "extract":
            result[op] = {"equal": attempt(partial(check_extract, peer, vol, job, edge))}
        elif op == "merge":
            result[op] = {
                "restores": attempt(partial(check_merge, peer, vol, job, edge, False)),
                "averages": attempt(partial(check_merge, peer, vol, job, edge, True)),
            }
        else:
            result[op] = {"restores": attempt(partial(check_apply, peer, vol, job, edge))}
    return result


def others_running() -> float:
    """How many other tasks are running right now, on average over about a second."""
    counts = []
    for _ in range(5):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)  # minus this one
        except (OSError, ValueError, IndexError):
            return 0.0
        time.sleep(0.2)
    return statistics.mean(counts)


def wait_quiet(max_wait: float = 30.0) -> float:
    """Wait (up to ``max_wait`` seconds) until no other task competes for the CPU.

    The machine may be shared: torch's worker threads in particular slow down many times over
    when another process takes a core. Returns the competing tasks seen when the wait ended.
    """
    end = time.monotonic() + max_wait
    busy = others_running()
    while busy >= 0.5 and time.monotonic() < end:
        time.sleep(2)
        busy = others_running()
    return busy


def run_child(args: list[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": last[:120]}
    return json.loads(lines[-1])  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- the run


@dataclass
class Cell:
    job: str
    op: str
    peer: str
    edge: str = "-"
    time: float | None = None
    mem: int | None = None
    runs: int = 0
    note: str = ""
    t_ratio: float | None = None
    m_ratio: float | None = None


def reference_name(edge: str) -> str:
    return {"drop": "patchgrid-drop", "pad": "patchgrid-pad"}.get(edge, "patchgrid")


def measure_all(
    jobs: list[Job], peers: list[Peer], repeats: int, quiet: bool, log: Callable[[str], None]
) -> list[Cell]:
    cells: list[Cell] = []
    first_job_time: dict[tuple[str, str], float] = {}
    for job in jobs:
        for op in OPS:
            for peer in peers:
                if peer.name in ("patchgrid-drop", "patchgrid-pad") and job.divides:
                    continue  # identical to patchgrid when the stride divides
                cell = Cell(job.name, op, peer.name)
                if op not in peer.edges:
                    if peer.name.startswith("patchgrid") or op == "apply":
                        continue  # apply: only MONAI has a sliding-window function
                    cell.note = peer.na.get(op, "n/a")
                    cells.append(cell)
                    continue
                cell.edge = placement(peer, op, job)
                if not installed(peer):
                    cell.note = "not installed"
                    cells.append(cell)
                    continue
                est = estimate(job, peer.name, op, first_job_time, repeats, log)
                if est is not None and est > SLOW_S:
                    cell.note = f"too slow (>{SLOW_S:.0f} s est.: ~{est:.0f} s per call)"
                    log(f"job {job.name} {op:7} {peer.name:14} skipped, {cell.note}")
                    cells.append(cell)
                    continue
                measure(cell, repeats, quiet, log)
                if job.name == "1" and cell.time is not None:
                    first_job_time[peer.name, op] = cell.time
                cells.append(cell)
    return cells


def add_ratios(cells: list[Cell]) -> None:
    """Each peer's time and memory over patchgrid's with the same placement."""
    for c in cells:
        ref = next(
            (
                r
                for r in cells
                if r.job == c.job and r.op == c.op and r.peer == reference_name(c.edge)
            ),
            None,
        )
        if ref is None or c.time is None or ref.time is None:
            continue
        c.t_ratio = c.time / ref.time
        if c.mem is not None and ref.mem:
            c.m_ratio = c.mem / ref.mem


def measure(cell: Cell, repeats: int, quiet: bool, log: Callable[[str], None]) -> None:
    """Run one case in a fresh process and fill ``cell`` with its time and memory."""
    job = JOBS[cell.job]
    busy = wait_quiet() if quiet else 0.0
    log(f"job {job.name} {cell.op:7} {cell.peer:14} ...")
    res = run_child(["--one", job.name, cell.peer, cell.op, str(repeats)], 900)
    cell.note, cell.time, cell.mem, cell.runs = "", None, None, 0
    if "error" in res:
        cell.note = res["error"]
    else:
        cell.time, cell.mem, cell.runs = res["time"], res["mem"], res["runs"]
        if res["runs"] == 1:
            cell.note = "timed once"
    if busy >= 0.5:
        cell.note = "; ".join(x for x in (cell.note, f"machine busy ({busy:.1f})") if x)
    log(f"    {fmt_time(cell.time, job)} {fmt_mem(cell.mem, job)} {cell.note}")


def redo_busy(run: dict[str, Any], log: Callable[[str], None]) -> None:
    """Measure again the cases of a saved run that met a busy machine; keep quiet retries."""
    for i, c in enumerate(run["cells"]):
        if "machine busy" not in c["note"]:
            continue
        cell = Cell(**c)
        measure(cell, run["repeats"], True, log)
        if "machine busy" not in cell.note:
            run["cells"][i] = asdict(cell)
            redone = run["info"].setdefault("redone", [])
            redone.append(f"job {cell.job} {cell.op} {PEER[cell.peer].label}")
    run["info"]["redone_at"] = datetime.datetime.now().isoformat(timespec="minutes")


def estimate(
    job: Job,
    peer: str,
    op: str,
    known: dict[tuple[str, str], float],
    repeats: int,
    log: Callable[[str], None],
) -> float | None:
    """Job 3 has job 1's patch and stride, 500x the patches: a per-patch loop scales with them."""
    small = JOBS["1"]
    if job.size != small.size or job.stride != small.stride or job.name == small.name:
        return None
    if (peer, op) not in known:
        res = run_child(["--one", small.name, peer, op, str(repeats)], 600)
        if "error" in res:
            return None
        known[peer, op] = res["time"]
        log(f"    (job 1 for the estimate: {res['time'] * 1e6:.0f} us)")
    return known[peer, op] * job.count() / small.count()


def check_all(
    jobs: list[Job], peers: list[Peer], log: Callable[[str], None]
) -> list[dict[str, Any]]:
    rows = []
    for job in jobs:
        if job.name not in ("1", "4"):
            continue
        for peer in peers:
            if not peer.edges or not installed(peer):
                continue
            log(f"check job {job.name} {peer.name}")
            res = run_child(["--check", job.name, peer.name], 600)
            rows.append({"job": job.name, "peer": peer.name, "result": res})
    return rows


# ----------------------------------------------------------------------------- output


def fmt_time(t: float | None, job: Job) -> str:
    if t is None:
        return ""
    if job.name == "1":
        return f"{t * 1e6:,.0f} µs"
    return f"{t * 1e3:,.0f} ms" if t >= 0.1 else f"{t * 1e3:.1f} ms"


def fmt_mem(m: int | None, job: Job) -> str:
    if m is None:
        return ""
    if job.name == "1":
        return f"{m / 1024:,.0f} KiB"
    return f"{m / MiB:,.0f} MiB"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return ""
    return f"{r:.2f}x" if r < 10 else f"{r:,.0f}x"


def check_summary(checks: list[dict[str, Any]], job: str, peer: str, op: str) -> str:
    for row in checks:
        if row["job"] == job and row["peer"] == peer:
            res = row["result"]
            if "error" in res:
                return f"check failed: {res['error']}"
            parts = res.get(op, {})
            return "; ".join(f"{k}: {v}" for k, v in parts.items())
    return ""


def note(c: Cell) -> str:
    notes = [c.note] if c.note else []
    if c.op == "merge" and c.time is not None and c.peer in NOT_A_MEAN:
        notes.append(NOT_A_MEAN[c.peer])
    return "; ".join(notes)


def render_table(cells: list[Cell], checks: list[dict[str, Any]]) -> str:
    head = [
        "Job",
        "Op",
        "Peer",
        "Edge",
        "Time",
        "Time / pg",
        "Peak added",
        "Mem / pg",
        "Correct (jobs 1, 4)",
        "Notes",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for c in cells:
        job = JOBS[c.job]
        row = [
            c.job,
            c.op,
            PEER[c.peer].label,
            c.edge,
            fmt_time(c.time, job),
            "" if c.peer.startswith("patchgrid") else fmt_ratio(c.t_ratio),
            fmt_mem(c.mem, job),
            "" if c.peer.startswith("patchgrid") else fmt_ratio(c.m_ratio),
            check_summary(checks, c.job, c.peer, c.op) if c.time is not None else "",
            note(c),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


NOT_A_MEAN = {"patchify": "not a mean: `unpatchify` overwrites and skips overlapping patches"}
MEM_TIE = 64 * 1024  # resident memory moves in 4 KiB pages; 16 pages or fewer count as a tie


def misses(cells: list[Cell]) -> list[str]:
    """Every job and operation where a peer beats patchgrid (same placement) on time or memory."""
    out = []
    for c in cells:
        if c.peer.startswith("patchgrid"):
            continue
        job = JOBS[c.job]
        ref = next(
            r for r in cells if (r.job, r.op, r.peer) == (c.job, c.op, reference_name(c.edge))
        )
        caveat = f" ({NOT_A_MEAN[c.peer]})" if c.op == "merge" and c.peer in NOT_A_MEAN else ""
        if c.t_ratio is not None and c.t_ratio < 1:
            noise = " (within 5 %: noise level)" if c.t_ratio > 0.95 else ""
            out.append(
                f"job {c.job} {c.op}, time: {PEER[c.peer].label} {fmt_time(c.time, job)} against "
                f"{PEER[ref.peer].label} {fmt_time(ref.time, job)} ({c.t_ratio:.2f}x)"
                f"{noise}{caveat}"
            )
        if c.mem is not None and ref.mem is not None and c.mem < ref.mem - MEM_TIE:
            out.append(
                f"job {c.job} {c.op}, memory: {PEER[c.peer].label} {fmt_mem(c.mem, job)} against "
                f"{PEER[ref.peer].label} {fmt_mem(ref.mem, job)}{caveat}"
            )
    return out


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    ram = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
        with open("/proc/meminfo") as f:
            kib = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal")))
            ram = f"{kib / (1 << 20):.0f} GiB"
    except (OSError, StopIteration):
        pass
    threads = "?"
    if importlib.util.find_spec("torch") is not None:
        threads = str(module("torch").get_num_threads())
    versions = ", ".join(
        f"{name} {peer_version(Peer(name, name, (), dist, {}))}"
        for name, dist in [
            ("patchgrid", "patchgrid"),
            ("numpy", "numpy"),
            ("torch", "torch"),
            ("monai", "monai"),
            ("torchio", "torchio"),
            ("scikit-image", "scikit-image"),
            ("patchify", "patchify"),
            ("tiler", "tiler"),
            ("patchly", "patchly"),
            ("numba", "numba"),
        ]
    )
    return {
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": ram,
        "python": platform.python_version(),
        "versions": versions,
        "torch_threads": threads,
        "pg_threads": str(getattr(importlib.import_module("patchgrid._strided"), "THREADS", 1)),
        "source": source_state(),
        "load": load(),
    }


def source_state() -> str:
    """The commit measured, and whether patchgrid's sources differed from it."""
    root = os.path.dirname(HERE)
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "src"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"commit {head}" + (" with uncommitted changes under src/" if dirty else "")


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def write_markdown(
    path: str,
    table: str,
    cells: list[Cell],
    info: dict[str, str],
    jobs: list[Job],
    repeats: int,
    quick: bool,
) -> None:
    drop = JOBS["4"]
    frac = np.prod([s.stop for s in drop.covered("drop")]) / np.prod(drop.shape)
    lines = [
        "# patchgrid and its peers",
        "",
        f"- date: {info['date']}"
        + (" (`--quick`: fewer repeats, indicative only)" if quick else ""),
        f"- machine: {info['cpu']}, {info['cores']} logical CPUs, {info['ram']} RAM; load average "
        f"(1, 5, 15 min) at the start {info['load']}, at the end {info['load_end']}; shared "
        "with other work",
        f"- Python {info['python']}; {info['versions']}; torch threads {info['torch_threads']}, "
        f"patchgrid kernel threads {info['pg_threads']}; patchgrid {info['source']}",
        f"- times: the median of up to {repeats} calls (fewer for calls over 2 s: 3, over 10 s: "
        "1, marked 'timed once'); calls under 20 ms are timed in loops of many calls",
        "- memory ('Peak added'): the peak resident memory (VmHWM) the call added over the "
        "process' resident memory just before it, the output included; every job, peer and "
        "operation runs in a fresh process in which the peer was imported and warmed up on a "
        "small volume first, so imports are not counted",
        "- before each case the run waits (up to 30 s) until no other task is running; a case "
        "measured while others ran says 'machine busy (n)', n the tasks competing",
        *(
            [
                f"- measured again at {info['redone_at']}, the machine quiet, after meeting a busy "
                f"machine in the run: {', '.join(info['redone'])}"
            ]
            if info.get("redone")
            else []
        ),
        *([f"- {info['note']}"] if info.get("note") else []),
        "- 'Time / pg', 'Mem / pg': the peer over patchgrid with the same placement (shift, drop "
        "or pad); above 1 patchgrid is faster or leaner",
        "- extract: the patches as one C-contiguous array (peers that return views are copied); "
        "merge: plain average of the overlaps (uniform weights) back to the image; apply: "
        "cut, an identity model, average back (patchgrid `apply(window='uniform')` and MONAI "
        "`sliding_window_inference`, same batch size)",
        "",
        "Jobs:",
        "",
        *[f"- job {j.name} ({j.title}): {j.describe()}" for j in jobs],
        "",
        table,
        "",
        "![time and peak memory of each peer over patchgrid's, log scale](peers.png)",
        "",
        "Correctness: 'equal': the extract equals patches cut one by one from the (padded) image "
        "at the corners of its placement; 'restores': merging the image's own patches gives the "
        "image back on the region they cover; 'averages': merging patch i filled with the "
        "constant i equals a float64 Python-loop mean. 'exact' is bit-for-bit.",
        "",
        "## At the edge (job 4: 250^3, 64^3 patches, stride 48, (250 - 64) % 48 = 42)",
        "",
        "- shift: 5 patches per axis, the last at 186; pad: 5 per axis, the last at 192 in a "
        f"256^3 zero-padded image; drop: 4 per axis, covering 0..207 of 250 ({frac:.1%} of the "
        "voxels).",
        *[f"- {PEER[k].label if k in PEER else k}: {v}" for k, v in EDGE_NOTES.items()],
        "",
        "## Where patchgrid is not the fastest or the leanest",
        "",
        *([f"- {m}" for m in misses(cells)] or ["- nowhere in this run"]),
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_chart(path: str, cells: list[Cell], info: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(c.job, c.op) for c in cells if c.peer == "patchgrid" and c.time is not None]
    keys = list(dict.fromkeys(keys))
    peers = [
        p.name
        for p in PEERS
        if not p.name.startswith("patchgrid")
        and any(c.peer == p.name and c.t_ratio is not None for c in cells)
    ]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.4 * len(keys)), 9), sharex=True)
    width = 0.8 / max(1, len(peers))
    x = np.arange(len(keys))
    for attr, ax, what in [("t_ratio", axes[0], "time"), ("m_ratio", axes[1], "peak memory")]:
        for i, name in enumerate(peers):
            vals = []
            for job, op in keys:
                c = next((c for c in cells if c.job == job and c.op == op and c.peer == name), None)
                v = getattr(c, attr) if c is not None else None
                vals.append(np.nan if v is None or v <= 0 else v)
            ax.bar(x + (i - (len(peers) - 1) / 2) * width, vals, width, label=PEER[name].label)
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_yscale("log")
        ax.set_ylabel(f"{what} / patchgrid's")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[1].set_xticks(x, [f"job {j}\n{op}" for j, op in keys])
    axes[0].legend(fontsize=8, ncol=2)
    axes[0].set_title(
        "patchgrid and its peers: above 1, patchgrid is faster (top) or leaner (bottom)"
    )
    fig.text(
        0.01,
        0.005,
        f"{info['date']}; {info['cpu']}, {info['cores']} CPUs, {info['ram']}; "
        f"load average {info['load']} at the start, {info.get('load_end', '?')} at the end; "
        "same placement as patchgrid's (shift, drop or pad); "
        "missing bar: not offered, not installed or too slow",
        fontsize=7,
    )
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log(msg: str) -> None:
    print(f"  ... {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--jobs", nargs="+", choices=sorted(JOBS), default=sorted(JOBS))
    parser.add_argument(
        "--peers",
        nargs="+",
        choices=[p.name for p in PEERS if p.name == p.name.split("-")[0]],
        help="peers to run (patchgrid always runs)",
    )
    parser.add_argument("--repeats", type=int, help="calls timed per measurement (default 5)")
    parser.add_argument(
        "--no-wait", action="store_true", help="do not wait for a quiet machine before each case"
    )
    parser.add_argument("--out", default=RESULTS, help="folder for peers.md and peers.png")
    parser.add_argument("--save", metavar="JSON", help="also save the raw results")
    parser.add_argument("--render", metavar="JSON", help="only write the report of a saved run")
    parser.add_argument(
        "--redo-busy",
        metavar="JSON",
        help="measure again the cases of a saved run that met a busy "
        "machine, update it and write the report",
    )
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--check", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        job, peer, op, repeats = args.one
        print(json.dumps(child_measure(JOBS[job], peer, op, int(repeats))))
        return 0
    if args.check:
        print(json.dumps(child_check(JOBS[args.check[0]], args.check[1])))
        return 0
    if args.render or args.redo_busy:
        path = args.render or args.redo_busy
        with open(path) as f:
            saved = json.load(f)
        if args.redo_busy:
            redo_busy(saved, log)
            with open(path, "w") as f:
                json.dump(saved, f, indent=1)
        report(saved, args.out)
        return 0

    repeats = args.repeats or (2 if args.quick else 5)
    jobs = [JOBS[j] for j in args.jobs]
    wanted = set(args.peers or PEER) | {"patchgrid"}
    peers = [p for p in PEERS if p.name.split("-")[0] in wanted]
    info = machine()
    start = time.perf_counter()
    checks = check_all(jobs, peers, log)
    cells = measure_all(jobs, peers, repeats, not args.no_wait, log)
    info["load_end"] = load()
    info["elapsed"] = f"{time.perf_counter() - start:.0f} s"
    run = {
        "info": info,
        "jobs": [j.name for j in jobs],
        "repeats": repeats,
        "quick": args.quick,
        "checks": checks,
        "cells": [asdict(c) for c in cells],
    }
    if args.save:
        with open(args.save, "w") as f:
            json.dump(run, f, indent=1)
    report(run, args.out)
    return 0


def report(run: dict[str, Any], out: str) -> None:
    """Print the table and the misses; write peers.md and peers.png into ``out``."""
    cells = [Cell(**c) for c in run["cells"]]
    add_ratios(cells)
    info, jobs = run["info"], [JOBS[j] for j in run["jobs"]]
    table = render_table(cells, run["checks"])
    print(table)
    print()
    for m in misses(cells) or ["patchgrid is the fastest and the leanest everywhere here"]:
        print(f"- {m}")
    os.makedirs(out, exist_ok=True)
    md, png = os.path.join(out, "peers.md"), os.path.join(out, "peers.png")
    write_markdown(md, table, cells, info, jobs, run["repeats"], run["quick"])
    write_chart(png, cells, info)
    print(f"\nwritten: {md}, {png} (the run took {info['elapsed']})")


if __name__ == "__main__":
    sys.exit(main())
