"""Training patches: ``pg.sample`` with a foreground:background ratio, and a torch dataset.

A 2-D image with a small bright "lesion" (under 1% of the pixels): uniform sampling would
almost never centre a patch on it; ``pg.label_weights(labels, pos=1, neg=1)`` puts half of the
centres on it whatever its size. Then ``pg.PatchDataset`` serves every patch of a grid over two
volumes to a torch ``DataLoader``. The picture (``samples.png``) goes to the folder named by
the ``PATCHGRID_EXAMPLES_OUT`` environment variable, or to a temporary folder.
Run: python examples/sample_patches.py
"""

import os
import pathlib
import tempfile

import numpy as np

import patchgrid as pg

y, x = np.mgrid[0:128, 0:160]
labels = ((y - 40) ** 2 + (x - 110) ** 2 < 6**2).astype(np.uint8)  # 0.6% foreground
image = (labels + np.random.default_rng(1).normal(0, 0.2, labels.shape)).astype(np.float32)

weights = pg.label_weights(labels, pos=1, neg=1)
patches, starts = pg.sample(image, size=16, n=200, weights=weights, rng=0, edge="pad")
centres = starts + 16 // 2
on_lesion = labels[centres[:, 0], centres[:, 1]].mean()
print(f"foreground {labels.mean():.1%} of the image, {on_lesion:.0%} of 200 centres on it")
assert patches.shape == (200, 16, 16)
assert 0.4 < on_lesion < 0.6
again, _ = pg.sample(image, size=16, n=200, weights=weights, rng=0, edge="pad")
assert np.array_equal(patches, again)  # the same seed gives the same patches

import torch  # noqa: E402  (the datasets need torch)

volumes = [image, image[:64, :96]]
dataset = pg.PatchDataset(volumes, size=32, stride=32, labels=[labels, labels[:64, :96]])
loader = torch.utils.data.DataLoader(dataset, batch_size=8)
batch = next(iter(loader))
print(f"PatchDataset: {len(dataset)} patches; a batch: " + ", ".join(
    f"{k} {tuple(v.shape)}" for k, v in batch.items()))  # fmt: skip
assert len(dataset) == 4 * 5 + 2 * 3
assert batch["patch"].shape == (8, 32, 32)
assert batch["label"].shape == (8, 32, 32)

outdir = pathlib.Path(os.environ.get("PATCHGRID_EXAMPLES_OUT") or tempfile.mkdtemp())
outdir.mkdir(parents=True, exist_ok=True)
from matplotlib.figure import Figure  # noqa: E402  (only for the picture)

fig = Figure(figsize=(5.5, 4.2), layout="constrained")
ax = fig.add_subplot()
ax.imshow(image, cmap="gray")
ax.contour(labels, levels=[0.5], colors="red", linewidths=1)
ax.plot(centres[:, 1], centres[:, 0], "+", color="yellow", markersize=5)
ax.set_title("200 centres drawn 1:1 foreground (red) : background", fontsize=10)
fig.savefig(outdir / "samples.png", dpi=100, metadata={"Software": None})
print(f"picture: {outdir / 'samples.png'}")
