"""Run a (stand-in) 3-class model over a 4-D scan in batches, and blend the outputs back.

The same code as in the README. Run: python examples/segment_in_batches.py
"""

import numpy as np

import patchgrid as pg

scan = np.random.default_rng(0).random((1, 155, 240, 240), dtype=np.float32)  # channel, z, y, x
grid = pg.PatchGrid(scan.shape, size=(64, 96, 96), stride=(48, 72, 72), edge="shift")
patches = pg.extract(scan, grid, flatten=True)  # (N, 1, 64, 96, 96), gathered
merger = pg.Merger(grid, window="gaussian")
for first in range(0, len(grid), 8):  # batches, as a model sees them
    batch = patches[first : first + 8]
    probs = np.repeat(batch, 3, axis=1)  # stand-in for a 3-class model
    merger.add(probs, np.arange(first, first + len(batch)))
segmentation = merger.result()  # (3, 155, 240, 240)

assert segmentation.shape == (3, 155, 240, 240)
assert np.allclose(segmentation[1], scan[0], atol=1e-5)
print(f"{len(grid)} patches of {patches.shape[1:]} -> blended output {segmentation.shape}")
