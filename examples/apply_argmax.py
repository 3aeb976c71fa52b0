"""Sliding-window inference with ``pg.apply``: labels, valid convolutions, scale, ``out=``.

A stand-in two-class "model" scores each voxel of a 3-D volume holding a bright ball;
``reduce="argmax"`` keeps only the labels (uint8), never the class scores of the whole volume.
Then a model that returns only the core of its patch (``margin=``), a x2 upsampler
(``scale=``), and a result written into a memory map (``out=``) with a progress callback.
Run: python examples/apply_argmax.py
"""

import tempfile

import numpy as np

import patchgrid as pg

z, y, x = np.mgrid[0:40, 0:48, 0:56]
ball = ((z - 20) ** 2 + (y - 24) ** 2 + (x - 28) ** 2 < 12**2).astype(np.float32)
rng = np.random.default_rng(0)
scan = (ball + rng.normal(0, 0.1, ball.shape)).astype(np.float32)[None]  # (1, 40, 48, 56)


def two_classes(batch: np.ndarray) -> np.ndarray:
    """(B, 1, *patch) -> (B, 2, *patch): scores for background and foreground."""
    return np.concatenate([1 - batch, batch], axis=1)


labels = pg.apply(two_classes, scan, size=16, stride=8, axes=(1, 2, 3), reduce="argmax")
print(f"labels {labels.shape} {labels.dtype}, foreground voxels {int(labels.sum())}")
assert labels.shape == ball.shape
assert labels.dtype == np.uint8
assert (labels == ball).mean() > 0.999


def core_only(batch: np.ndarray) -> np.ndarray:
    """A 'valid convolution' model: returns the patch less 4 voxels on each side."""
    return batch[:, :, 4:-4, 4:-4, 4:-4]


cores = pg.apply(core_only, scan, size=24, axes=(1, 2, 3), margin=4)
print(f"margin=4: output {cores.shape}, equal to the input: {np.allclose(cores, scan)}")
assert np.allclose(cores, scan)


def upsample(batch: np.ndarray) -> np.ndarray:
    """x2 nearest-neighbour super-resolution along the three tiled axes."""
    for axis in (2, 3, 4):
        batch = np.repeat(batch, 2, axis=axis)
    return batch


big = pg.apply(upsample, scan, size=16, stride=8, axes=(1, 2, 3), scale=2)
print(f"scale=2: {scan.shape} -> {big.shape}")
assert big.shape == (1, 80, 96, 112)
assert np.allclose(big[:, ::2, ::2, ::2], scan, atol=1e-5)

seen = []
with tempfile.TemporaryDirectory() as folder:
    out = np.lib.format.open_memmap(f"{folder}/labels.npy", "w+", np.uint8, ball.shape)
    result = pg.apply(
        two_classes,
        scan,
        size=16,
        stride=8,
        axes=(1, 2, 3),
        reduce="argmax",
        out=out,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert result is out
    assert np.array_equal(out, labels)
    del out, result
print(f"out= a memmap; progress called {len(seen)} times, last {seen[-1]}")
assert seen[-1][0] == seen[-1][1]
