"""Dask arrays in, lazy Dask arrays (or a zarr array written by the tasks) out, equal to the
in-memory result.

``pg.apply`` on a chunked Dask array builds a task graph. A lazy result takes one task per
output chunk: it runs ``fn`` on every patch that touches the chunk (patches that cross a chunk
border run once for each chunk they touch) and finishes the chunk. With ``out=`` a zarr array,
one task takes a run of chunks along the axis with the most chunks, passes each chunk's partial
sums on to the next, and writes the finished chunks itself: fewer patches run twice, and no
finished chunk waits in memory. ``redundancy`` says how much extra work either way costs.
Here Dask's default threaded scheduler computes it; a ``dask.distributed`` cluster runs the
same graph. Run: python examples/dask_apply.py
"""

import tempfile

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
extra = redundancy(grid, lazy.chunks)
runs = round(len(grid) * (1 + extra.calls))
print(
    f"{len(grid)} patches, {runs} runs of them ({extra.calls:.0%} more, at chunk borders);"
    f" fn saw {seen} in batches of {set(calls)}"
)
print("(each task's last batch is padded to batch_size: fixed shapes for the model)")
assert runs <= seen < runs + 8 * lazy.npartitions

try:
    import zarr
except ImportError:
    zarr = None
if zarr is not None:
    with tempfile.TemporaryDirectory() as tmp:
        out = zarr.open_array(
            f"{tmp}/out.zarr", mode="w", shape=volume.shape, chunks=32, dtype="float32"
        )
        pg.apply(model, chunked, size=16, stride=8, batch_size=8, out=out, progress=False)
        assert np.allclose(out[...], expected, atol=1e-5)
        chained = redundancy(grid, chunked.chunks, out=True)
        print(
            f"out=zarr: {chained.calls:.0%} more patch runs, partial sums over "
            f"{chained.sums:.0%} more voxels passed between chunks"
        )

patches = pg.extract(chunked, size=16, stride=8)  # lazy too
assert np.array_equal(patches[1, 2, 3].compute(), volume[8:24, 16:32, 24:40])
