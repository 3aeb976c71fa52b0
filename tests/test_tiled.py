"""merge_tiled (the CLI's out-of-core merge) against merge in memory and the plain loop."""

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import patchgrid as pg
from patchgrid import _memory
from patchgrid._tiled import merge_tiled, plan_tiles, tile_ranges
from reference import Layout

SETTINGS = settings(max_examples=80, deadline=None)


@st.composite
def cases(draw):
    """Any tiled axes (up to one carried axis), gaps, padding; a budget that makes many tiles."""
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 14), min_size=ndim, max_size=ndim)))
    axes = sorted(draw(st.sets(st.integers(0, ndim - 1), min_size=max(1, ndim - 1))))
    size, stride, edge = [], [], []
    for a in axes:
        p = draw(st.integers(1, shape[a] + 2))
        size.append(p)
        stride.append(draw(st.integers(1, p + 3)))
        edge.append(draw(st.sampled_from(["pad", "shift", "even"] + ["drop"] * (shape[a] >= p))))
    return shape, tuple(axes), tuple(size), tuple(stride), tuple(edge)


@SETTINGS
@given(
    case=cases(),
    reduce=st.sampled_from(["mean", "sum", "max", "min"]),
    window=st.sampled_from([None, "gaussian"]),
    budget=st.integers(1, 4000),
    batch=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_merge_tiled_equals_the_loop(case, reduce, window, budget, batch, seed):
    shape, axes, size, stride, edge = case
    if reduce in ("max", "min"):
        window = None
    grid = pg.PatchGrid(shape, size, stride, axes=axes, edge=edge)
    patches = np.random.default_rng(seed).standard_normal((len(grid), *grid.patch_shape))
    weight = None
    if window is not None:
        weight = pg.window(window, size).reshape(
            [size[axes.index(a)] if a in axes else 1 for a in range(len(shape))]
        )
    expected, _ = Layout(shape, axes, size, stride, edge).merge(patches, reduce, weight, fill=-5.0)
    out = np.full(expected.shape, np.nan)
    reads = []

    def read(lo, hi):
        reads.append(hi - lo)
        assert hi - lo <= batch
        return patches[lo:hi]

    merge_tiled(read, grid, out, reduce=reduce, window=window, fill=-5.0, budget=budget,
                batch=batch)  # fmt: skip
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
    assert sum(reads) >= len(grid)  # every patch read, some twice at tile borders


def test_merge_tiled_argmax_drops_the_class_axis():
    rng = np.random.default_rng(0)
    grid = pg.PatchGrid((3, 30, 40), 8, 4, axes=(1, 2), edge="shift")
    scores = rng.random((len(grid), 3, 8, 8)).astype(np.float32)
    out = np.zeros((30, 40), np.uint8)
    merge_tiled(lambda lo, hi: scores[lo:hi], grid, out, reduce="argmax", budget=2000)
    assert len(tile_ranges(grid, 4 * 3, 2000)) > 1
    np.testing.assert_array_equal(out, pg.merge(scores, grid, reduce="argmax"))


@pytest.mark.parametrize("side", [256, 512, 1024])
def test_merge_tiled_memory_follows_the_budget_not_the_plane(side):
    grid = pg.PatchGrid((256, side, side), 64, 32)
    budget = 24 << 20
    tiles = plan_tiles(grid, grid.shape, [0, 1, 2], 4, budget)
    rows = 64 + 32  # the slab: a patch and the step to the next row of patches
    assert all(rows * t.shape[1] * t.shape[2] * 4 <= budget for t in tiles)
    assert len(tiles) > 1


def test_tiles_align_with_the_output_chunks():
    class Chunked:
        shape, chunks = (64, 700, 700), (16, 100, 300)

    grid = pg.PatchGrid(Chunked.shape, 32, 16)
    tiles = plan_tiles(grid, grid.shape, [0, 1, 2], 4, 1 << 20, Chunked())
    for tile in tiles:
        for w, c, n in zip(tile.where[1:], Chunked.chunks[1:], Chunked.shape[1:]):
            assert w.start % c == 0
            assert w.stop % c == 0 or w.stop == n


def test_merge_tiled_reports_progress():
    image = np.random.default_rng(1).random((20, 40))
    grid = pg.PatchGrid(image.shape, 8, 4)
    patches = pg.extract(image, grid, flatten=True)
    seen = []
    out = np.empty(image.shape)
    merge_tiled(lambda lo, hi: patches[lo:hi], grid, out, budget=600,
                progress=lambda done, total: seen.append((done, total)))  # fmt: skip
    np.testing.assert_allclose(out, image)
    assert seen[-1][0] == seen[-1][1] >= len(grid)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


class Store:
    """A file-backed array stand-in: shape, dtype and slice assignment, not an ndarray."""

    def __init__(self, shape, dtype):
        self.data = np.full(shape, 99, dtype)
        self.shape, self.dtype = self.data.shape, self.data.dtype
        self.writes = 0

    def __setitem__(self, where, value):
        self.writes += 1
        self.data[where] = value

    def __getitem__(self, where):
        return self.data[where]


def _model(batch):
    """Not linear and patch-dependent, so a patch merged into the wrong place shows."""
    return np.sin(batch * 3) + batch.mean(axis=tuple(range(1, batch.ndim)), keepdims=True)


def _upsample(batch):
    """x2 along every spatial axis."""
    out = _model(batch)
    for a in range(1, batch.ndim):
        out = out.repeat(2, axis=a)
    return out


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ((24, 60, 70), dict(size=16, stride=8)),
        ((24, 60, 70), dict(size=16, stride=8, window="uniform", edge="pad")),
        ((20, 50, 45), dict(size=12, stride=20, edge="drop", fill=-1)),
        ((20, 50, 45), dict(size=12, stride=6, margin=2)),
        ((2, 20, 50, 45), dict(size=12, stride=6, axes=(1, 2, 3))),
        ((20, 40, 44), dict(size=(8, 8, 12), stride=(4, 6, 6), scale=2, fn=_upsample)),
    ],
    ids=["gaussian", "uniform-pad", "gaps", "margin", "channels", "scale"],
)
def test_apply_into_a_store_in_tiles_equals_apply_in_memory(monkeypatch, shape, kwargs):
    tiled_module = importlib.import_module("patchgrid._tiled")

    image = np.random.default_rng(2).random(shape).astype(np.float32)
    kwargs = dict(kwargs)
    fn = kwargs.pop("fn", _model)
    expected = pg.apply(fn, image, progress=False, **kwargs)
    monkeypatch.setattr(pg.settings, "TILE_BYTES", 40_000)
    out = Store(expected.shape, expected.dtype)
    done = []
    got = pg.apply(fn, image, out=out, progress=lambda d, t: done.append((d, t)), **kwargs)
    assert got is out
    assert len(tiled_module.apply_tiles(out, *_grids(image, kwargs))) > 1
    np.testing.assert_allclose(out.data, expected, rtol=1e-5, atol=1e-6)
    assert done[-1][0] == done[-1][1] > 0


def test_apply_argmax_into_a_store_in_tiles(monkeypatch):

    image = np.random.default_rng(3).random((1, 20, 60, 50)).astype(np.float32)

    def classes(batch):
        return np.concatenate([batch, 1 - batch, batch**2], axis=1)

    kwargs = dict(size=10, stride=5, axes=(1, 2, 3), reduce="argmax", progress=False)
    expected = pg.apply(classes, image, **kwargs)
    monkeypatch.setattr(pg.settings, "TILE_BYTES", 20_000)
    out = Store(expected.shape, expected.dtype)
    pg.apply(classes, image, out=out, **kwargs)
    np.testing.assert_array_equal(out.data, expected)


def _grids(image, kwargs):
    """The output grid apply builds, for checking that the call was tiled."""
    size, stride = kwargs["size"], kwargs["stride"]
    margin = kwargs.get("margin", 0)
    axes = kwargs.get("axes")
    core = size - 2 * margin if isinstance(size, int) else size
    grid = pg.PatchGrid(image.shape, core, stride, axes=axes, edge=kwargs.get("edge", "shift"))
    if "scale" in kwargs:
        grid = grid.scaled(kwargs["scale"])
    return grid, "mean"


class ChunkedStore(Store):
    """A chunked array stand-in (zarr, HDF5): ``chunks``, and every box written, in order."""

    def __init__(self, shape, dtype, chunks):
        super().__init__(shape, dtype)
        self.chunks = chunks
        self.boxes = []

    def __setitem__(self, where, value):
        self.boxes.append(tuple((w.start, w.stop) if isinstance(w, slice) else w for w in where))
        super().__setitem__(where, value)


@pytest.mark.parametrize("step", [32, 48, 20, 64, 100], ids=lambda s: f"rows{s}")
@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
def test_staged_writes_only_whole_chunk_rows(step, axis):
    shape = (200, 30, 40) if axis == 0 else (3, 200, 40)
    out = ChunkedStore(shape, np.float32, tuple(64 if a == axis else 8 for a in range(3)))
    values = np.random.default_rng(4).random(shape, dtype=np.float32)
    sink = _memory.staged(out, axis)
    for lo in range(0, 200, step):
        where = [slice(None)] * 3
        where[axis] = slice(lo, min(lo + step, 200))
        sink[tuple(where)] = values[tuple(where)]
    np.testing.assert_array_equal(out.data, values)
    for box in out.boxes:
        lo, hi = box[axis]
        assert lo % 64 == 0
        assert hi % 64 == 0 or hi == 200
    assert len(out.boxes) == 4  # 0-64, 64-128, 128-192, 192-200: each chunk row once


def test_staged_lets_rows_go_when_the_box_changes():
    out = ChunkedStore((100, 20), np.float64, (50, 10))
    sink = _memory.staged(out, 0)
    sink[0:20, 0:10] = np.ones((20, 10))
    sink[0:30, 10:20] = np.full((30, 10), 2.0)  # another box: the rows held go out first
    sink[30:60, 10:20] = np.full((30, 10), 3.0)
    assert out.boxes == [((0, 20), (0, 10)), ((0, 50), (10, 20))]  # 50-60 waits for 60-100
    sink[60:100, 10:20] = np.full((40, 10), 4.0)  # the last rows: everything goes out
    assert out.boxes[2:] == [((50, 100), (10, 20))]
    assert out.data[:20, :10].min() == 1
    assert (out.data[50:60, 10:20] == 3).all()
    assert (out.data[60:, 10:20] == 4).all()


def test_staged_passes_other_writes_and_arrays_through():
    plain = Store((10, 10), np.float32)
    assert _memory.staged(plain, 0) is plain
    assert _memory.staged(np.zeros((4, 4)), 0).shape == (4, 4)
    out = ChunkedStore((10, 10), np.float32, (5, 5))
    sink = _memory.staged(out, 0)
    sink[0:2, :] = 1
    sink[3, :] = 2  # not a box of slices: written as it is, after the rows held
    assert out.boxes[0] == ((0, 2), (0, 10))
    assert (out.data[3] == 2).all()


def _counting_zarr(zarr, shape, chunks):
    """A zarr array in memory, and how many times its store wrote each chunk."""
    sets = {}

    class Counting(zarr.storage.MemoryStore):
        async def set(self, key, value, byte_range=None):
            if not key.endswith("zarr.json"):
                sets[key] = sets.get(key, 0) + 1
            await super().set(key, value)

    return zarr.create_array(store=Counting(), shape=shape, dtype="float32", chunks=chunks), sets


@pytest.mark.parametrize(
    ("shape", "chunks", "tile_bytes"),
    [((80, 64, 64), (16, 64, 64), None), ((80, 96, 96), (16, 32, 32), 60_000)],
    ids=["one-tile", "tiles"],
)
def test_apply_into_zarr_writes_every_chunk_once(monkeypatch, shape, chunks, tile_bytes):
    zarr = pytest.importorskip("zarr")
    if tile_bytes:
        monkeypatch.setattr(pg.settings, "TILE_BYTES", tile_bytes)
    image = np.random.default_rng(5).random(shape, dtype=np.float32)
    out, sets = _counting_zarr(zarr, shape, chunks)
    # Stride 12 against chunks of 16 rows: the merge finishes rows that straddle chunks.
    pg.apply(_model, image, 16, 12, out=out, progress=False)
    np.testing.assert_allclose(out[...], pg.apply(_model, image, 16, 12), rtol=1e-6)
    n_chunks = int(np.prod([-(-n // c) for n, c in zip(shape, chunks)]))
    assert len(sets) == n_chunks
    assert set(sets.values()) == {1}  # none written in parts, none read back


def test_apply_into_zarr_limits_zarr_while_it_runs_and_puts_it_back():
    zarr = pytest.importorskip("zarr")
    image = np.random.default_rng(6).random((40, 32, 32), dtype=np.float32)
    # Chunks of 16 MiB (larger than the array): two in flight, not ten.
    out = zarr.create_array(store={}, shape=image.shape, dtype="float32", chunks=(64, 256, 256))
    seen = []

    def model(batch):
        seen.append(zarr.config.get("async.concurrency"))
        return batch

    before = zarr.config.get("async.concurrency")
    with zarr.config.set({"async.concurrency": 10}):
        pg.apply(model, image, 16, 8, out=out, progress=False)
        assert set(seen) == {2}
        assert zarr.config.get("async.concurrency") == 10
    assert zarr.config.get("async.concurrency") == before

    def broken(batch):
        raise RuntimeError("model failed")

    with pytest.raises(RuntimeError, match="model failed"):
        pg.apply(broken, image, 16, 8, out=out, progress=False)
    assert zarr.config.get("async.concurrency") == before
    assert _memory.state.jobs == 0


def test_zarr_concurrency_follows_the_chunk_bytes():
    class Chunked:
        def __init__(self, chunks):
            self.dtype, self.chunks = np.dtype("float32"), chunks

    assert _memory.zarr_concurrency(Chunked((64, 64, 64)), now=10) == 10
    assert _memory.zarr_concurrency(Chunked((64, 256, 256)), now=10) == 2
    assert _memory.zarr_concurrency(Chunked((64, 256, 256)), Chunked((64, 512, 512))) == 1
    assert _memory.zarr_concurrency(np.zeros(3), now=7) == 7


CHILD = """
import sys
import numpy as np, zarr, patchgrid as pg
where = sys.argv[1]
src = zarr.create_array(store=where + "/src.zarr", shape=(128,) * 3, dtype="float32",
                        chunks=(64, 128, 128))
for lo in (0, 64):
    src[lo:lo + 64] = np.random.default_rng(lo).random((64, 128, 128), dtype=np.float32)
out = zarr.create_array(store=where + "/out.zarr", shape=(128,) * 3, dtype="float32",
                        chunks=(64, 512, 512))
def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) << 10
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = peak()
pg.apply(lambda b: b, src, 64, 48, out=out, progress=False)
print(peak() - before)
"""


def test_apply_into_zarr_bounds_its_memory_without_the_user(tmp_path):
    """The call's own peak, in a fresh process that makes no allocator call: 64 MiB output
    chunks written by rows of 48. It adds about 115 MiB; before the library bounded itself
    (glibc's rising threshold, ten chunks in flight, every chunk read back and written in
    parts) it added about 210."""
    pytest.importorskip("zarr")
    if not (sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs")):
        pytest.skip("reads the peak of a Linux process")
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    added = int(done.stdout.split()[-1])
    assert added < 160 << 20, f"the call added {added >> 20} MiB"
