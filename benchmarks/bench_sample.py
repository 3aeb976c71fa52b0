"""Training patches per second: pg.RandomPatchDataset from zarr on disk, against TorchIO.

Job: 64^3 patches from a float32 volume with a label map (0.5% foreground), centres drawn
2 : 1 foreground : background, through a DataLoader with 2 workers, batch 8. patchgrid reads
the volume and the labels from zarr on disk, region by region. TorchIO's ``Queue`` with a
``LabelSampler`` needs each subject in memory (it loads NIfTI files whole), so it reads the
same volume saved as NIfTI. Peak memory is the whole process tree's (main and workers), read
from ``VmHWM`` of each.

    python benchmarks/bench_sample.py            # 256^3
    python benchmarks/bench_sample.py --quick    # 128^3

TorchIO comes from ``pip install torchio`` (not in any extra; skipped when absent).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _memory import peak_rss

MiB = 1 << 20


def _children_peak() -> int:
    """Peak RSS of this process's live children (DataLoader workers), summed."""
    total = 0
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().split(") ")[1].split()[1])
            if parent != me:
                continue
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            continue
    return total


def run_patchgrid(folder: str, n: int) -> tuple[float, float]:
    import zarr
    from torch.utils.data import DataLoader

    import patchgrid as pg

    image = zarr.open_array(os.path.join(folder, "image.zarr"), mode="r")
    labels = zarr.open_array(os.path.join(folder, "labels.zarr"), mode="r")
    ds = pg.RandomPatchDataset(image, 64, n, labels=labels, pos=2, neg=1, seed=0)
    loader = DataLoader(ds, batch_size=8, num_workers=2, persistent_workers=False)
    t0 = time.perf_counter()
    seen, peak = 0, 0
    for batch in loader:
        seen += batch["patch"].shape[0]
        peak = max(peak, _children_peak())
    return seen / (time.perf_counter() - t0), (peak + peak_rss()) / MiB


def run_torchio(folder: str, n: int) -> tuple[float, float] | str:
    try:
        import torchio as tio
    except ImportError:
        return "skipped: torchio not installed"
    from torch.utils.data import DataLoader

    subject = tio.Subject(image=tio.ScalarImage(os.path.join(folder, "image.nii.gz")),
                          labels=tio.LabelMap(os.path.join(folder, "labels.nii.gz")))  # fmt: skip
    dataset = tio.SubjectsDataset([subject])
    sampler = tio.LabelSampler(64, label_name="labels", label_probabilities={0: 1, 1: 2})
    queue = tio.Queue(dataset, max_length=64, samples_per_volume=64, sampler=sampler,
                      num_workers=2, shuffle_subjects=False, shuffle_patches=True)  # fmt: skip
    loader = DataLoader(queue, batch_size=8, num_workers=0)
    t0 = time.perf_counter()
    seen, peak = 0, 0
    while seen < n:  # one subject gives 64 patches an epoch; go round until n
        for batch in loader:
            seen += batch["image"][tio.DATA].shape[0]
            peak = max(peak, _children_peak())
    return seen / (time.perf_counter() - t0), (peak + peak_rss()) / MiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--patches", type=int, default=400)
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)

    import zarr

    import patchgrid as pg

    side = 128 if args.quick else 256
    folder = tempfile.mkdtemp(prefix="pg-sample-bench-")
    try:
        rng = np.random.default_rng(0)
        image = rng.random((side,) * 3, dtype=np.float32)
        labels = np.zeros((side,) * 3, dtype=np.uint8)
        c = side // 2
        r = max(2, round((0.005 * side**3 * 3 / (4 * np.pi)) ** (1 / 3)))
        zz, yy, xx = np.ogrid[:side, :side, :side]
        labels[(zz - c) ** 2 + (yy - c) ** 2 + (xx - c) ** 2 <= r * r] = 1
        for name, data in (("image", image), ("labels", labels)):
            z = zarr.open_array(os.path.join(folder, f"{name}.zarr"), mode="w", shape=data.shape,
                                dtype=data.dtype, chunks=(64, 64, 64))  # fmt: skip
            z[...] = data
            pg.save(os.path.join(folder, f"{name}.nii.gz"), data)
        del image, labels
        ours = run_patchgrid(folder, args.patches)
        theirs = run_torchio(folder, args.patches)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rows = [
        f"Training patches from a {side}^3 float32 volume with labels (0.5% foreground), 64^3 "
        f"patches, 2:1 foreground:background, DataLoader 2 workers, batch 8, {args.patches} "
        f"patches; {os.cpu_count()} CPUs",
        "",
        "| library | patches/s | ratio | peak memory, all processes |",
        "|---|---|---|---|",
        f"| patchgrid RandomPatchDataset (zarr on disk) | {ours[0]:.0f} | 1.00x "
        f"| {ours[1]:.0f} MiB |",
    ]
    if isinstance(theirs, str):
        rows.append(f"| TorchIO Queue + LabelSampler | {theirs} | | |")
    else:
        rows.append(f"| TorchIO Queue + LabelSampler (NIfTI, loaded whole) | {theirs[0]:.0f} | "
                    f"{theirs[0] / ours[0]:.2f}x | {theirs[1]:.0f} MiB |")  # fmt: skip
    text = "\n".join(rows)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
