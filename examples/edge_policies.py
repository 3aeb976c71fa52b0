"""The four edge policies on an image whose shape the stride does not reach exactly.

An 11 x 15 image, patches of 4, stride 3: ``(15 - 4) % 3 != 0``, so the last patch of each
axis cannot start on the stride and end on the border. ``"drop"`` leaves the tail out,
``"pad"`` pads the far end, ``"shift"`` moves the last patch back, ``"even"`` spreads the
patches evenly. All but ``"drop"`` cover every voxel, and merging their patches gives the
image back. Run: python examples/edge_policies.py
"""

import numpy as np

import patchgrid as pg

image = np.arange(11 * 15, dtype=np.float32).reshape(11, 15)
for edge in ("drop", "pad", "shift", "even"):
    grid = pg.PatchGrid(image.shape, size=4, stride=3, edge=edge)
    patches = pg.extract(image, grid)
    covered = pg.coverage(grid) > 0
    starts = [grid.axis_starts(j).tolist() for j in range(grid.ndim)]
    print(
        f"{edge:>5}: counts {grid.counts}, starts {starts}, pad_width {grid.pad_width}, "
        f"view {np.shares_memory(patches, image)}, uncovered voxels {int((~covered).sum())}"
    )
    assert patches.shape == (*grid.counts, 4, 4)
    assert grid.covers == covered.all()
    restored = pg.merge(patches, grid)
    assert np.allclose(restored[covered], image[covered])

assert not pg.PatchGrid(image.shape, 4, 3, edge="drop").covers
assert pg.PatchGrid(image.shape, 4, 3, edge="shift").axis_starts(1)[-1] == 15 - 4
