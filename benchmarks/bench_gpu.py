"""On the GPU: pg.apply against MONAI's sliding_window_inference, and pg.merge against a loop.

Every job runs in this one process, patchgrid beside its peer, on one device (issue 15). The
image is a (1, C, D, H, W) tensor, as MONAI takes it; patchgrid is called the way MONAI is:

    pg.apply(model, image, size=64, overlap=0.5, window="monai-gaussian", batch_size=4,
             batched=True)
    sliding_window_inference(image, roi_size=(64, 64, 64), sw_batch_size=4, predictor=model,
                             overlap=0.5, mode="gaussian")

Jobs (``--jobs`` picks some by name; ``--quick`` divides every size by 4 per axis):

- ``identity-256``: identity model, 256^3, 64^3 patches, stride 32 (overlap 0.5), batch 4;
- ``net16-256``: a small 3-D conv net in float16 (1-16-16-3 channels, Conv3d k3 p1, ReLU
  between), same geometry;
- ``argmax-256``: the same net in float32, labels kept (``reduce="argmax"``; MONAI: argmax of
  its output along the class axis);
- ``identity-512``, ``net16-512``, ``argmax-512``: 512^3, 64^3 patches, batch 8;
- ``identity-512-p128``: identity, 512^3, 128^3 patches, batch 4;
- ``host-512``: the image in host memory, the float32 net on the GPU, 512^3, 128^3 patches,
  batch 4 (patchgrid ``device="cuda"``, MONAI ``sw_device="cuda", device="cpu"``); also the
  model alone over as many patches on the device, and as many pinned host-to-device copies of
  one batch alone, and the call's wall time over the larger of the two;
- ``merge-256``: ``pg.merge`` (mean) of the 343 patches of a 256^3 volume (64^3, stride 32)
  on the device, against a plain torch loop ``out[sl] += p; count[sl] += 1``.

Time: the median of ``--repeats`` calls after one warm-up, with ``torch.cuda.synchronize()``
around each. GPU memory added: the peak the allocator saw during the call over what it held
before (``torch.cuda.reset_peak_memory_stats``, then ``max_memory_allocated`` minus
``memory_allocated`` before), the result included. Before any timing the warm-up results are
checked: identity gives the image back, every output is compared with MONAI's (both with
MONAI's gaussian) and the merge with the loop's; the largest difference is printed, and one
over its tolerance prints ``CORRECTNESS FAILURE`` and makes the exit status 1.

    python benchmarks/bench_gpu.py                       # on CUDA, a few minutes on one GPU
    python benchmarks/bench_gpu.py --device cpu --quick  # a smoke run on the CPU
    python benchmarks/bench_gpu.py --jobs identity-256 merge-256 --markdown results/gpu.md

MONAI is optional (``pip install -e '.[bench]'``): without it only patchgrid's columns are
printed. On the CPU the float16 net runs in float32 (a CPU has no fast float16 convolution).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import patchgrid as pg

MiB = 1 << 20
NEEDS = "n/a (needs device=/batched=)"


@dataclass(frozen=True)
class Job:
    name: str
    kind: str  # "apply", "host" or "merge"
    model: str  # "identity", "net16", "net32" or "argmax"
    side: int
    patch: int
    batch: int

    def scaled(self, quick: bool) -> Job:
        if not quick:
            return self
        return Job(self.name, self.kind, self.model, self.side // 4, self.patch // 4, self.batch)


JOBS = [
    Job("identity-256", "apply", "identity", 256, 64, 4),
    Job("net16-256", "apply", "net16", 256, 64, 4),
    Job("argmax-256", "apply", "argmax", 256, 64, 4),
    Job("identity-512", "apply", "identity", 512, 64, 8),
    Job("net16-512", "apply", "net16", 512, 64, 8),
    Job("argmax-512", "apply", "argmax", 512, 64, 8),
    Job("identity-512-p128", "apply", "identity", 512, 128, 4),
    Job("host-512", "host", "net32", 512, 128, 4),
    Job("merge-256", "merge", "", 256, 64, 0),
]
NAMES = [job.name for job in JOBS]


class NeedsKeywords(Exception):
    """pg.apply does not take ``device=`` / ``batched=`` yet."""


def net(dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The small segmentation net: 1 -> 16 -> 16 -> 3 channels, 3^3 kernels, same size."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(
        torch.nn.Conv3d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(16, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(16, 3, 3, padding=1),
    )
    return layers.to(device=device, dtype=dtype).eval()


def identity(batch: torch.Tensor) -> torch.Tensor:
    return batch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], Any], repeats: int, device: str) -> tuple[float, int | None]:
    """Median time of ``repeats`` calls and the most GPU memory one of them added.

    The caller has made the warm-up call. Each result is dropped before the next call, so
    that the memory held before a call is the same for every call.
    """
    times: list[float] = []
    added: list[int] = []
    for _ in range(repeats):
        sync(device)
        if device == "cuda":
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if device == "cuda":
            added.append(torch.cuda.max_memory_allocated() - before)
        del result
    return statistics.median(times), (max(added) if added else None)


def pg_apply(model: Any, image: Any, job: Job, **extra: Any) -> Any:
    """pg.apply as MONAI's sliding_window_inference is called; NeedsKeywords without them."""
    try:
        return pg.apply(
            model,
            image,
            size=job.patch,
            overlap=0.5,
            window="monai-gaussian",
            batch_size=job.batch,
            batched=True,
            progress=False,
            **extra,
        )
    except TypeError as e:
        msg = str(e)
        if "keyword" in msg and ("batched" in msg or "device" in msg):
            raise NeedsKeywords(msg) from e
        raise


def monai_apply(model: Any, image: Any, job: Job, **extra: Any) -> Any:
    from monai.inferers import sliding_window_inference

    return sliding_window_inference(
        image,
        roi_size=(job.patch,) * 3,
        sw_batch_size=job.batch,
        predictor=model,
        overlap=0.5,
        mode="gaussian",
        **extra,
    )


def largest_difference(a: Any, b: Any) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    return float((a.float() - b.to(a.device).float()).abs().max())


def labels_differ(a: Any, b: Any) -> float:
    """The share of labels that differ."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    return float((a.long() != b.to(a.device).long()).float().mean())


@dataclass
class Row:
    job: Job
    what: str  # volume, patch, batch
    pg_time: float | str | None = None  # seconds, or why not
    peer_time: float | None = None
    pg_mem: int | None = None
    peer_mem: int | None = None
    diff: str = ""
    failed: bool = False
    model_time: float | None = None
    copies_time: float | None = None


def run_apply(job: Job, device: str, repeats: int, have_monai: bool) -> Row:
    """One apply job (identity, net or argmax; image on the device, or in host memory)."""
    half = job.model == "net16" and device == "cuda"
    dtype = torch.float16 if half else torch.float32
    gen = torch.Generator().manual_seed(0)
    image = torch.rand((1, 1, job.side, job.side, job.side), generator=gen).to(dtype)
    host = job.kind == "host"
    if not host:
        image = image.to(device)
    model: Any = identity if job.model == "identity" else net(dtype, device)
    argmax = job.model == "argmax"
    flavour = {
        "net16": ", float16" if half else ", float32 (float16 on CUDA)",
        "net32": ", float32",
    }
    what = f"{job.side}^3, {job.patch}^3, batch {job.batch}{flavour.get(job.model, '')}" + (
        ", image in host memory" if host else ""
    )
    row = Row(job, what)

    pg_extra: dict[str, Any] = {"device": device} if host else {}
    monai_extra: dict[str, Any] = {"sw_device": device, "device": "cpu"} if host else {}
    if argmax:
        pg_extra["reduce"] = "argmax"

    def ours() -> Any:
        return pg_apply(model, image, job, **pg_extra)

    def theirs() -> Any:
        out = monai_apply(model, image, job, **monai_extra)
        return torch.argmax(out, dim=1) if argmax else out

    with torch.no_grad():
        try:
            got = ours()  # the warm-up, checked
        except NeedsKeywords:
            got, row.pg_time = None, NEEDS
        except Exception as e:  # a row that says why, and the other jobs still run
            got, row.pg_time, row.failed = None, f"failed: {type(e).__name__}: {e}"[:120], True
        checks: list[str] = []
        if got is not None and job.model == "identity":
            d = largest_difference(got, image)
            checks.append(f"{d:.2g} to the image")
            row.failed |= not d <= 1e-5
        if have_monai:
            want = theirs()
            if got is not None:
                if argmax:
                    share = labels_differ(got, want)
                    checks.append(f"{share:.2%} of labels differ from MONAI's")
                    row.failed |= not share <= 1e-3
                else:
                    d = largest_difference(got, want)
                    checks.append(f"{d:.2g} to MONAI")
                    row.failed |= not d <= (2e-2 if half else 1e-4)
            del want
        elif got is not None and job.model != "identity":
            checks.append("not checked (no MONAI)")
        del got
        row.diff = ", ".join(checks)
        if not isinstance(row.pg_time, str):
            row.pg_time, row.pg_mem = measure(ours, repeats, device)
        if have_monai:
            row.peer_time, row.peer_mem = measure(theirs, repeats, device)
        if host:
            row.model_time, row.copies_time = model_and_copies(model, job, device, repeats)
    return row


def model_and_copies(model: Any, job: Job, device: str, repeats: int) -> tuple[float, float | None]:
    """The host job's parts alone: the model over as many patches, the copies of as many."""
    count = len(pg.PatchGrid((job.side,) * 3, job.patch, job.patch // 2))
    sizes = [job.batch] * (count // job.batch) + ([count % job.batch] if count % job.batch else [])
    shape = (job.batch, 1, job.patch, job.patch, job.patch)
    batch = torch.rand(shape, device=device)

    def run_model() -> None:
        for k in sizes:
            model(batch[:k])

    run_model()
    model_time, _ = measure(run_model, repeats, device)
    if device != "cuda":
        return model_time, None
    pinned = torch.rand(shape).pin_memory()

    def copy() -> None:
        for k in sizes:
            pinned[:k].to("cuda", non_blocking=True)

    copy()
    copies_time, _ = measure(copy, repeats, device)
    return model_time, copies_time


def run_merge(job: Job, device: str, repeats: int) -> Row:
    """pg.merge (mean) of a volume's patches, each scaled by its own factor, against a loop."""
    shape = (job.side,) * 3
    stride = job.patch // 2
    grid = pg.PatchGrid(shape, job.patch, stride)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(shape, generator=gen).to(device)
    patches = pg.extract(image, grid, flatten=True, copy=True)
    factors = torch.linspace(0.5, 1.5, len(grid), device=device)
    patches = patches * factors.view(-1, 1, 1, 1)
    slices = list(grid)
    row = Row(job, f"{job.side}^3, {job.patch}^3, stride {stride}, {len(grid)} patches")

    def ours() -> Any:
        return pg.merge(patches, grid)

    def loop() -> Any:
        out = torch.zeros(shape, device=device)
        count = torch.zeros(shape, device=device)
        for p, sl in zip(patches, slices):
            out[sl] += p
            count[sl] += 1
        return out / count

    got, want = ours(), loop()
    d = largest_difference(got, want)
    row.diff = f"{d:.2g} to the loop"
    row.failed = not d <= 1e-5
    del got, want
    row.pg_time, row.pg_mem = measure(ours, repeats, device)
    row.peer_time, row.peer_mem = measure(loop, repeats, device)
    return row


def ms(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e3:.1f} ms" if t < 1 else f"{t * 1e3:.0f} ms"


def mib(m: int | None) -> str:
    return "-" if m is None else f"{m / MiB:.0f} MiB"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def cells(row: Row, have_monai: bool) -> list[str]:
    job = row.job
    if isinstance(row.pg_time, str):
        pg_time = row.pg_time
    else:
        pg_time = ms(row.pg_time)
    ours = row.pg_time if isinstance(row.pg_time, float) else None
    peer = row.peer_time if (have_monai or job.kind == "merge") else None
    speed = f"{peer / ours:.2f}x" if ours and peer else "-"
    if job.kind == "merge":
        time_target = f"≤ 1 ms: {verdict(ours <= 1e-3)}" if ours is not None else "≤ 1 ms"
    else:
        need = 1.5 if job.kind == "host" else 2.0
        time_target = f"≥ {need:g}x"
        if ours and peer:
            time_target += f": {verdict(peer / ours >= need)}"
    mem_ratio, mem_target = "-", "-"
    if job.kind != "merge":
        limit = 0.4 if job.model == "argmax" else 0.6
        mem_target = f"≤ {limit:g}x"
        if row.pg_mem is not None and row.peer_mem:
            r = row.pg_mem / row.peer_mem
            mem_ratio = f"{r:.2f}x"
            mem_target += f": {verdict(r <= limit)}"
    elif row.pg_mem is not None and row.peer_mem:
        mem_ratio = f"{row.pg_mem / row.peer_mem:.2f}x"
    parts = wall = "-"
    if job.kind == "host":
        parts = f"{ms(row.model_time)}, {ms(row.copies_time)}"
        slowest = max(t for t in (row.model_time, row.copies_time) if t is not None)
        if ours and slowest:
            wall = f"{ours / slowest:.2f}x ≤ 1.25: {verdict(ours / slowest <= 1.25)}"
    peer_time = ms(peer) if peer is not None else "-"
    return [
        f"{job.name}",
        row.what,
        pg_time,
        peer_time,
        speed,
        time_target,
        mib(row.pg_mem),
        mib(row.peer_mem),
        mem_ratio,
        mem_target,
        ("CORRECTNESS FAILURE: " if row.failed else "") + (row.diff or "-"),
        parts,
        wall,
    ]


HEADER = [
    "job",
    "volume, patch",
    "patchgrid",
    "MONAI / loop",
    "speed-up",
    "time target",
    "pg GPU added",
    "peer GPU added",
    "pg / peer",
    "memory target",
    "largest difference",
    "model alone, copies alone",
    "wall / max(model, copies)",
]


def machine(device: str) -> str:
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, {cpu}"
    return cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="every size divided by 4 per axis")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after a warm-up")
    parser.add_argument("--jobs", nargs="+", choices=NAMES, metavar="JOB",
                        help=f"run only these jobs, of: {', '.join(NAMES)}")  # fmt: skip
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for a smoke run")
        return 0
    try:
        import monai

        monai_version: str | None = monai.__version__
    except ImportError:
        monai_version = None
    have_monai = monai_version is not None
    jobs = [job.scaled(args.quick) for job in JOBS if not args.jobs or job.name in args.jobs]

    rows: list[Row] = []
    for job in jobs:
        print(f"{job.name} ...", file=sys.stderr, flush=True)
        if job.kind == "merge":
            rows.append(run_merge(job, device, args.repeats))
        else:
            rows.append(run_apply(job, device, args.repeats, have_monai))
        if device == "cuda":
            torch.cuda.empty_cache()

    head = [
        f"pg.apply vs MONAI sliding_window_inference on {device}, {datetime.date.today()}, "
        f"{machine(device)}; torch {torch.__version__}, MONAI {monai_version or 'not installed'}"
        f", patchgrid {pg.__version__}; overlap 0.5, MONAI's gaussian on both sides; time: "
        f"the median of {args.repeats} call(s) after a warm-up"
        + (", --quick (sizes / 4)" if args.quick else ""),
        "",
    ]
    table = [
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
        *("| " + " | ".join(cells(row, have_monai)) + " |" for row in rows),
    ]
    notes = []
    if not have_monai:
        notes.append("MONAI is not importable: patchgrid's columns only (and the merge loop).")
    if device != "cuda":
        notes.append("On the CPU there is no GPU memory to measure, and no copies to time.")
    text = "\n".join(head + table + (["", *notes] if notes else []))
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if any(row.failed for row in rows):
        print("CORRECTNESS FAILURE", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
