"""Issue 17's long-run features of pg.apply: resume after SIGKILL, shards, mask=, tta="flips".

Every run is a fresh process (this script with ``--child``); the cases of a job run side by
side in one run and are compared by ratios. Before anything is reported its result is checked
against the plain run (bit for bit where the issue says so); a failure prints
``CORRECTNESS FAILURE`` and exits with status 1.

1. resume: a float32 zarr volume (512 x 512 x 1024, 1 GiB; ``--quick`` 128 x 256 x 256)
   through ``apply(np.sin, ..., out=zarr, resume=True)``, 64^3 patches at stride 48 (quick:
   32^3, stride 24), output chunks one patch deep and whole across; SIGKILLed 3 times at
   seeded random moments and resumed until finished, against one clean run.
2. shards: the same job as 2 and 4 processes at once (``shard=(i, n)``) against one process.
3. mask: the volume of job 1 made 10% foreground (an ellipsoid; 16^3 patches at stride 12 in
   quick), a conv-like NumPy model, without ``mask=``, with the full resolution mask and with
   ``pg.coarse_mask(image, 4, 0)`` (its time included).
4. flips: ``tta=None`` against ``tta="flips"`` with a small torch Conv3d net (NumPy
   fallback): time per patch.

    python benchmarks/bench_beyond.py --quick
    python benchmarks/bench_beyond.py --markdown results/beyond.md
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

HERE = os.path.abspath(__file__)


# ---- the child: one apply in a fresh process ------------------------------------------------


def _model(name: str, counter: str) -> Any:
    fd = os.open(counter, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def count(b: Any) -> None:
        os.write(fd, b"%d\n" % len(b))  # one atomic append per call: survives a SIGKILL

    if name == "sin":

        def sin(b: Any) -> Any:
            count(b)
            return np.sin(b)

        return sin
    if name == "conv":
        import torch

        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv3d(1, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv3d(8, 1, 3, padding=1),
        ).eval()

        def conv(b: Any) -> Any:
            count(b)
            return net(b[:, None])[:, 0]

        return conv
    if name == "npconv":  # a conv-like NumPy model: a weighted sum of shifted copies

        def npconv(b: Any) -> Any:
            count(b)
            out = 0.4 * b
            for axis in (1, 2, 3):
                out = out + 0.3 * np.roll(b, 1, axis) - 0.1 * np.roll(b, -1, axis)
            return np.tanh(out)

        return npconv
    raise ValueError(f"model: unknown {name!r}")


def child(spec: dict[str, Any]) -> None:
    import zarr

    import patchgrid as pg

    fn = _model(spec["model"], spec["counter"])
    if spec["image"].endswith(".npy"):
        image: Any = np.load(spec["image"])
        if spec["model"] == "conv":
            import torch

            torch.set_num_threads(spec.get("threads", 1))
            image = torch.from_numpy(image)
    else:
        image = zarr.open_array(spec["image"], mode="r")
    kw: dict[str, Any] = dict(spec["kw"])
    if spec.get("out"):
        kw["out"] = zarr.open_array(spec["out"], mode="r+")
    print("ready", flush=True)
    t0 = time.perf_counter()
    if spec.get("mask") == "full":
        kw["mask"] = np.load(spec["mask_path"])
    elif spec.get("mask") == "coarse":
        kw["mask"] = pg.coarse_mask(image, 4, 0)
    result = pg.apply(fn, image, spec["size"], spec["stride"], progress=False, **kw)
    seconds = time.perf_counter() - t0
    if spec.get("save"):
        np.save(spec["save"], np.asarray(result))
    print(json.dumps({"seconds": seconds}), flush=True)


# ---- the parent ---------------------------------------------------------------------------


def _counted(counter: str) -> tuple[int, int]:
    """(calls, patches) recorded in a counter file."""
    if not os.path.exists(counter):
        return 0, 0
    with open(counter) as f:
        sizes = [int(line) for line in f if line.strip()]
    return len(sizes), sum(sizes)


class Runner:
    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.n = 0

    def spec(self, **spec: Any) -> dict[str, Any]:
        self.n += 1
        spec["counter"] = os.path.join(self.tmp, f"calls{self.n}.txt")
        return spec

    def start(self, spec: dict[str, Any]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, HERE, "--child", json.dumps(spec)],
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, spec: dict[str, Any], kill_after: float | None = None) -> dict[str, Any]:
        """Run one child; with ``kill_after``, SIGKILL it that many seconds into the call."""
        t0 = time.perf_counter()
        proc = self.start(spec)
        assert proc.stdout is not None
        proc.stdout.readline()  # "ready": imports done, arrays open
        killed = False
        if kill_after is not None:
            try:
                proc.wait(kill_after)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                killed = True
        out = proc.stdout.read()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        if not killed and rc != 0:
            raise RuntimeError(f"child failed (status {rc}): {spec}")
        calls, patches = _counted(spec["counter"])
        res = json.loads(out.strip().splitlines()[-1]) if not killed else {"seconds": None}
        return dict(res, wall=wall, killed=killed, calls=calls, patches=patches)


def _equal_zarr(a_path: str, b_path: str) -> bool:
    import zarr

    a, b = zarr.open_array(a_path, mode="r"), zarr.open_array(b_path, mode="r")
    step = max(1, (64 << 20) // (int(np.prod(a.shape[1:])) * 4))
    return all(np.array_equal(a[z : z + step], b[z : z + step]) for z in range(0, a.shape[0], step))


def _fail(what: str) -> int:
    print(f"CORRECTNESS FAILURE: {what}", file=sys.stderr)
    return 1


def _rows_done(path: str) -> int:
    done = 0
    for rec in glob.glob(os.path.join(path, "patchgrid-progress*.json")):
        with open(rec) as f:
            done += int(json.load(f)["rows_done"])
    return done


def job_resume_and_shards(
    run: Runner, args: argparse.Namespace, rows: list[tuple[str, ...]]
) -> int:
    import zarr

    import patchgrid as pg

    shape = (128, 256, 256) if args.quick else (512, 512, 1024)
    size, stride = (32, 24) if args.quick else (64, 48)
    chunks = (size, *shape[1:])
    src = os.path.join(run.tmp, "in.zarr")
    z = zarr.create_array(src, shape=shape, chunks=(size,) * 3, dtype="float32")
    rng = np.random.default_rng(args.seed)
    for i in range(0, shape[0], size):
        z[i : i + size] = rng.random((size, *shape[1:]), dtype=np.float32)
    n_patches = len(pg.PatchGrid(shape, size, stride, edge="shift"))

    def fresh(name: str) -> str:
        path = os.path.join(run.tmp, name)
        zarr.create_array(path, shape=shape, chunks=chunks, dtype="float32")
        return path

    def spec(out: str, **kw: Any) -> dict[str, Any]:
        return run.spec(model="sin", image=src, out=out, size=size, stride=stride, kw=kw)

    ref = fresh("clean.zarr")
    clean = run.run(spec(ref))
    t_clean = clean["wall"]
    rec = run.run(spec(fresh("recorded.zarr"), resume=True))
    if not _equal_zarr(os.path.join(run.tmp, "recorded.zarr"), ref):
        return _fail("resume=True without a kill differs from the plain run")

    # Killed 3 times at seeded random moments of the call, resumed until finished.
    path = fresh("resumed.zarr")
    runs, notes = [], []
    for _ in range(3):
        left = 1 - _rows_done(path) / shape[0]  # a moment inside what is left to do
        at = float(rng.uniform(0.2, 0.8)) * clean["seconds"] * left
        r = run.run(spec(path, resume=True), kill_after=at)
        runs.append(r)
        notes.append(f"{at:.1f} s: {_rows_done(path)} rows done" if r["killed"] else "finished")
        if not r["killed"]:
            break
    if runs[-1]["killed"]:
        runs.append(run.run(spec(path, resume=True)))
    if not _equal_zarr(path, ref):
        return _fail("the killed and resumed run differs from the clean run")
    calls = sum(r["calls"] for r in runs)
    patches = sum(r["patches"] for r in runs)
    wall = sum(r["wall"] for r in runs)
    rows.append(("resume", "one clean run (resume=False)", f"{clean['calls']}",
                 f"{clean['patches']}", f"{t_clean:.2f}", "1.00x", "reference"))  # fmt: skip
    rows.append(("resume", "one run, resume=True, not killed", f"{rec['calls']}",
                 f"{rec['patches']}", f"{rec['wall']:.2f}", f"{rec['wall'] / t_clean:.2f}x",
                 "bit-identical"))  # fmt: skip
    rows.append(("resume", f"killed 3x, resumed ({len(runs)} processes)", f"{calls}",
                 f"{patches} ({patches / n_patches:.2f}x)", f"{wall:.2f}",
                 f"{wall / t_clean:.2f}x",
                 "bit-identical; killed at " + ", ".join(notes)))  # fmt: skip

    for n in (2, 4):
        out = fresh(f"shards{n}.zarr")
        specs = [spec(out, shard=[i, n]) for i in range(n)]
        t0 = time.perf_counter()
        procs = [run.start(s) for s in specs]
        for p in procs:
            p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"shard child failed (status {p.returncode})")
        wall = time.perf_counter() - t0
        if not _equal_zarr(out, ref):
            return _fail(f"{n} shards differ from the one-process run")
        counts = [_counted(s["counter"]) for s in specs]
        calls = sum(c for c, _ in counts)
        patches = sum(p for _, p in counts)
        rows.append(("shards", f"{n} processes at once", f"{calls}",
                     f"{patches} (+{patches - n_patches} at borders, "
                     f"{(patches - n_patches) / n_patches:.1%})",
                     f"{wall:.2f}", f"{wall / t_clean:.2f}x", "bit-identical"))  # fmt: skip
    return 0


def job_mask(run: Runner, args: argparse.Namespace, rows: list[tuple[str, ...]]) -> int:
    # Patches small enough against the blob that >= 5x of them hold no foreground.
    shape = (128, 256, 256) if args.quick else (512, 512, 1024)
    size, stride = (16, 12) if args.quick else (64, 48)
    # An ellipsoid centred in the volume, semi-axes k * shape / 2: pi/6 k^3 = 10%.
    k = (0.6 / np.pi) ** (1 / 3)
    fg = np.empty(shape, bool)
    _, y, x = np.ogrid[tuple(slice(0, s) for s in shape)]
    yx = sum(((g + 0.5 - s / 2) / (k * s / 2)) ** 2 for g, s in zip((y, x), shape[1:]))
    for z in range(shape[0]):  # plane by plane: no float64 volume
        fg[z] = ((z + 0.5 - shape[0] / 2) / (k * shape[0] / 2)) ** 2 + yx <= 1
    rng = np.random.default_rng(args.seed)
    image = np.where(fg, rng.random(shape, dtype=np.float32) + 0.5, np.float32(0))
    img_path, mask_path = os.path.join(run.tmp, "blob.npy"), os.path.join(run.tmp, "fg.npy")
    np.save(img_path, image)
    np.save(mask_path, fg)
    results = {}
    for how in ("none", "full", "coarse"):
        save = os.path.join(run.tmp, f"mask-{how}.npy")
        spec = run.spec(model="npconv", image=img_path, size=size, stride=stride, kw={},
                        mask=how, mask_path=mask_path, save=save)  # fmt: skip
        results[how] = run.run(spec)
        results[how]["out"] = np.load(save)
    plain = results["none"]
    for how, label in (("none", "no mask"), ("full", "mask= full resolution"),
                       ("coarse", "mask=pg.coarse_mask(image, 4, 0)")):  # fmt: skip
        r = results[how]
        if how != "none" and not np.array_equal(r["out"][fg], plain["out"][fg]):
            return _fail(f"mask={how}: foreground differs from the unmasked run")
        rows.append(("mask", f"{label} ({fg.mean():.0%} fg, {size}^3/{stride})", f"{r['calls']}",
                     f"{r['patches']} ({plain['patches'] / max(r['patches'], 1):.1f}x fewer)",
                     f"{r['seconds']:.2f}", f"{r['seconds'] / plain['seconds']:.2f}x",
                     "reference" if how == "none" else "foreground bit-identical"))  # fmt: skip
    return 0


def job_flips(run: Runner, args: argparse.Namespace, rows: list[tuple[str, ...]]) -> int:
    import patchgrid as pg

    try:
        import torch  # noqa: F401

        model = "conv"
    except ImportError:
        model = "npconv"
    shape = (64, 96, 96) if args.quick else (128, 128, 128)
    size, stride = 32, 24
    # An equivariant model (elementwise) gives the plain result with flips.
    x = np.random.default_rng(args.seed).random((40, 30, 36), dtype=np.float32)
    a = pg.apply(np.sin, x, 16, 12, progress=False)
    b = pg.apply(np.sin, x, 16, 12, tta="flips", progress=False)
    if not np.array_equal(a, b):
        return _fail('tta="flips" with np.sin differs from the plain run')
    img_path = os.path.join(run.tmp, "flips.npy")
    np.save(img_path, np.random.default_rng(args.seed).random(shape, dtype=np.float32))
    n_patches = len(pg.PatchGrid(shape, size, stride, edge="shift"))
    per = {}
    for tta in (None, "flips"):
        spec = run.spec(model=model, image=img_path, size=size, stride=stride,
                        kw={"tta": tta, "batch_size": 4}, threads=1)  # fmt: skip
        r = run.run(spec)
        per[tta] = r["seconds"] / n_patches
        ratio = per[tta] / per[None]
        rows.append(("flips", f"tta={tta!r}, {model} model", f"{r['calls']}",
                     f"{r['patches']} ({r['patches'] / n_patches:.0f} per patch)",
                     f"{r['seconds']:.2f} ({per[tta] * 1e3:.1f} ms/patch)", f"{ratio:.2f}x",
                     "plain" if tta is None else "8 mirrorings of 3 axes"))  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small volumes, under a minute")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    parser.add_argument("--seed", type=int, default=0, help="volumes and kill moments")
    parser.add_argument("--jobs", nargs="+", default=["resume", "mask", "flips"],
                        choices=["resume", "mask", "flips"],
                        help="jobs to run (resume includes shards)")  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0

    tmp = tempfile.mkdtemp(prefix="pg-beyond-")
    rows: list[tuple[str, ...]] = []
    t0 = time.perf_counter()
    try:
        run = Runner(tmp)
        jobs = {"resume": job_resume_and_shards, "mask": job_mask, "flips": job_flips}
        for name in args.jobs:
            if jobs[name](run, args, rows):
                return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = "quick" if args.quick else "full"
    lines = [
        f"pg.apply, issue 17 ({size}, seed {args.seed}); {datetime.date.today()}, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"{time.perf_counter() - t0:.0f} s in all",
        "",
        "| job | case | fn calls | patches run | seconds | vs plain | check |",
        "|---|---|---:|---|---:|---:|---|",
        *[f"| {' | '.join(r)} |" for r in rows],
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
