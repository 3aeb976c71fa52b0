"""The question patchgrid exists to answer, in three lines.

"I have a 3-D image D x W x H (10x20x30). Given a patch size 4x4x4 whose centre is at
pd/2 x pw/2 x ph/2, and a stride 2 between the centres of consecutive patches, extract all
patches." Run: python examples/answer.py
"""

import numpy as np

import patchgrid as pg

volume = np.arange(10 * 20 * 30, dtype=np.float32).reshape(10, 20, 30)
patches = pg.extract(volume, size=4, stride=2)  # (4, 9, 14, 4, 4, 4): a read-only view
restored = pg.merge(patches, volume.shape, stride=2)  # overlaps averaged

grid = pg.PatchGrid(volume.shape, size=4, stride=2)
assert patches.shape == (4, 9, 14, 4, 4, 4)
assert np.shares_memory(patches, volume)
assert tuple(grid.centers()[0]) == (2, 2, 2)
assert np.allclose(restored, volume)
print(f"{len(grid)} patches, first centre {tuple(grid.centers()[0].tolist())}, round trip exact")
