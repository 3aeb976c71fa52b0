"""Seams: merge the outputs of a model with border artefacts, with and without blending.

A convolutional model that pads with zeros is least reliable near the border of its patch.
Here the stand-in "model" fades each patch towards 20% at its border. With
``window="uniform"`` every overlap is a plain average, so the faded borders show as a grid of
seams; a ``"gaussian"`` window weights each patch's centre most and its border least, so the
seams mostly vanish. The picture (``seams.png``) goes to the folder named by the
``PATCHGRID_EXAMPLES_OUT`` environment variable, or to a temporary folder.
Run: python examples/blend_seams.py
"""

import os
import pathlib
import tempfile

import numpy as np

import patchgrid as pg

y, x = np.mgrid[0:96, 0:128] / 16.0
image = (np.sin(x) * np.cos(y)).astype(np.float32)
grid = pg.PatchGrid(image.shape, size=32, stride=16, edge="shift")
patches = pg.extract(image, grid, flatten=True)  # (N, 32, 32), a copy (edge="shift")

distance = np.minimum(np.arange(32), np.arange(32)[::-1])  # to the patch's border
fade = 1 - 0.8 * np.exp(-distance / 2)
outputs = patches * np.minimum.outer(fade, fade)  # the "model": right in the middle only

merged = {w: pg.merge(outputs, grid, window=w) for w in ("uniform", "gaussian")}
inside = (slice(4, -4), slice(4, -4))  # the image's own border has no neighbour to help
errors = {w: np.abs(m - image)[inside].mean() for w, m in merged.items()}
for w, err in errors.items():
    print(f"window={w!r:>11}: mean error inside the image {err:.4f}")
assert errors["gaussian"] < 0.5 * errors["uniform"]
assert np.allclose(pg.merge(patches, grid, window="gaussian"), image, atol=1e-5)

outdir = pathlib.Path(os.environ.get("PATCHGRID_EXAMPLES_OUT") or tempfile.mkdtemp())
outdir.mkdir(parents=True, exist_ok=True)
from matplotlib.figure import Figure  # noqa: E402  (only for the picture)

fig = Figure(figsize=(9, 5), layout="constrained")
axes = fig.subplots(2, 3)
panels = [
    ("the image", image, "gray"),
    ('window="uniform"', merged["uniform"], "gray"),
    ('window="gaussian"', merged["gaussian"], "gray"),
    ("one patch from the model", outputs[len(grid) // 2], "gray"),
    ("|error|, uniform", np.abs(merged["uniform"] - image), "magma"),
    ("|error|, gaussian", np.abs(merged["gaussian"] - image), "magma"),
]
for ax, (title, a, cmap) in zip(axes.flat, panels):
    limits = (0, 0.5) if cmap == "magma" else (-1, 1)
    ax.imshow(a, cmap=cmap, vmin=limits[0], vmax=limits[1])
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
fig.savefig(outdir / "seams.png", dpi=100, metadata={"Software": None})
print(f"picture: {outdir / 'seams.png'}")
