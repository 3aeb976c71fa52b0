"""Dask arrays in, lazy Dask arrays out, equal to the in-memory result.

``pg.apply`` on a chunked Dask array builds a task graph: one task per output chunk runs
``fn`` on the patches that start in that chunk (exactly once per patch), and a second layer
adds the halos that spill into neighbouring chunks. ``redundancy`` says how much extra
summing the chunking costs. Here Dask's default threaded scheduler computes it; a
``dask.distributed`` cluster runs the same graph. Run: python examples/dask_apply.py
"""

import dask.array as da
import numpy as np

import patchgrid as pg
from patchgrid.dask import redundancy

volume = np.random.default_rng(0).random((64, 64, 64), dtype=np.float32)
chunked = da.from_array(volume, chunks=32)
calls = []


def model(batch: np.ndarray) -> np.ndarray:
    calls.append(len(batch))
    return 2 * batch


lazy = pg.apply(model, chunked, size=16, stride=8, batch_size=8)
print(f"lazy result: {type(lazy).__name__} {lazy.shape}, chunks {lazy.chunksize}")
probed = sum(calls)  # patches fn saw before compute()
result = lazy.compute()
expected = pg.apply(lambda b: 2 * b, volume, size=16, stride=8)
assert np.allclose(result, expected, atol=1e-5)
grid = pg.PatchGrid(volume.shape, 16, 8, edge="shift")
seen = sum(calls) - probed
chunks = lazy.numblocks[0] * lazy.numblocks[1] * lazy.numblocks[2]
print(f"{len(grid)} patches in {chunks} chunks: fn saw {seen} in batches of {set(calls)}")
print("(each chunk's last batch is padded to batch_size: fixed shapes for the model)")
assert len(grid) <= seen < len(grid) + 8 * chunks
print(f"halo work: {redundancy(grid, lazy.chunks):.0%} of the output")

patches = pg.extract(chunked, size=16, stride=8)  # lazy too
assert np.array_equal(patches[1, 2, 3].compute(), volume[8:24, 16:32, 24:40])
