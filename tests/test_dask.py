"""The Dask path: lazy results equal to the in-memory ones, on a real distributed cluster too."""

import itertools
import sys

import numpy as np
import pytest

import patchgrid as pg

da = pytest.importorskip("dask.array")

EDGES = ["drop", "pad", "shift", "even"]


def _volume(shape=(1, 29, 34, 23), seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _three_classes(batch):
    return np.concatenate([batch, 1 - batch, np.full_like(batch, 0.5)], axis=1)


def _double(batch):
    return 2 * batch


@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize("flatten", [False, True], ids=["grid", "flat"])
def test_extract_on_dask_equals_numpy(edge, flatten):
    x = _volume((29, 34, 23))
    lazy = pg.extract(da.from_array(x, chunks=(10, 16, 23)), 8, 5, edge=edge, flatten=flatten,
                      pad_mode="reflect")  # fmt: skip
    assert isinstance(lazy, da.Array)
    want = pg.extract(x, 8, 5, edge=edge, flatten=flatten, pad_mode="reflect")
    np.testing.assert_array_equal(lazy.compute(), want)


def test_extract_on_dask_refuses_out():
    x = da.zeros((8, 8), chunks=4)
    with pytest.raises(ValueError, match="out= is not taken"):
        pg.extract(x, 4, out=np.empty((2, 2, 4, 4)))


CHUNKINGS = {
    "bigger-than-patch": (1, 20, 20, 23),
    "smaller-than-patch": (1, 5, 7, 6),
    "uneven": (1, 13, 34, 9),
}


@pytest.mark.parametrize("chunks", list(CHUNKINGS.values()), ids=list(CHUNKINGS))
@pytest.mark.parametrize("edge", ["shift", "even", "pad"])
def test_apply_on_dask_equals_in_memory(chunks, edge):
    x = _volume()
    kw = dict(axes=(1, 2, 3), edge=edge, window="gaussian", batch_size=3, progress=False)
    lazy = pg.apply(_double, da.from_array(x, chunks=chunks), 10, 6, **kw)
    assert isinstance(lazy, da.Array)
    assert lazy.chunks[1:] == da.from_array(x, chunks=chunks).chunks[1:]
    np.testing.assert_allclose(lazy.compute(), pg.apply(_double, x, 10, 6, **kw), rtol=1e-6)


@pytest.mark.parametrize(
    "kw",
    [
        dict(reduce="argmax"),
        dict(scale=2),
        dict(margin=2, pad_mode="reflect", window="uniform"),
        dict(window="hann", stride=12),
    ],
    ids=["argmax", "scale2", "margin", "gapped-hann"],
)
def test_apply_options_carry_over_to_dask(kw):
    x = _volume()
    fn = _three_classes if kw.get("reduce") == "argmax" else _double
    if kw.get("scale") == 2:

        def fn(b):
            return b.repeat(2, axis=2).repeat(2, axis=3).repeat(2, axis=4)

    kw = dict(axes=(1, 2, 3), edge="shift", progress=False, **kw)
    stride = kw.pop("stride", 6)
    lazy = pg.apply(fn, da.from_array(x, chunks=(1, 9, 11, 23)), 10, stride, **kw)
    want = pg.apply(fn, x, 10, stride, **kw)
    assert lazy.shape == want.shape
    assert lazy.dtype == want.dtype
    np.testing.assert_allclose(lazy.compute(), want, rtol=1e-6)


def test_fn_only_sees_full_batches_on_dask():
    seen = []

    def record(batch):
        seen.append(batch.shape[0])
        return batch

    x = _volume()
    pg.apply(record, da.from_array(x, chunks=(1, 9, 11, 23)), 10, 6, axes=(1, 2, 3),
             batch_size=4, progress=False).compute(scheduler="synchronous")  # fmt: skip
    assert set(seen) == {4}


def test_apply_on_dask_refuses_out():
    x = da.zeros((1, 16, 16), chunks=8)
    with pytest.raises(ValueError, match="out= is not taken"):
        pg.apply(_double, x, 8, axes=(1, 2), out=np.empty((1, 16, 16)), progress=False)


def test_apply_on_dask_refuses_a_whole_image_pad_mode():
    x = da.zeros((1, 16, 16), chunks=8)
    with pytest.raises(ValueError, match="pad_mode='mean'"):
        pg.apply(_double, x, 8, axes=(1, 2), margin=1, pad_mode="mean", progress=False)


def test_redundancy_is_the_halo_volume_over_the_output():
    grid = pg.PatchGrid((40, 30), 8, 4, edge="shift")
    chunks = ((10, 10, 10, 10), (15, 15))
    starts0, starts1 = grid.axis_starts(0), grid.axis_starts(1)
    # Each chunk's own patches are those starting in it; their bounding box is its halo region.
    total = 0
    for lo0, hi0 in itertools.pairwise(np.cumsum([0, *chunks[0]])):
        own0 = starts0[(starts0 >= lo0) & (starts0 < hi0)]
        for lo1, hi1 in itertools.pairwise(np.cumsum([0, *chunks[1]])):
            own1 = starts1[(starts1 >= lo1) & (starts1 < hi1)]
            if len(own0) and len(own1):
                total += (own0.max() + 8 - own0.min()) * (own1.max() + 8 - own1.min())
    redundancy = sys.modules["patchgrid.dask"].redundancy
    assert redundancy(grid, chunks) == pytest.approx(total / (40 * 30) - 1)


def test_fn_runs_once_per_patch_on_dask():
    calls = []

    def record(batch):
        calls.append(batch.shape[0])
        return batch

    x = _volume()
    lazy = pg.apply(record, da.from_array(x, chunks=(1, 9, 11, 7)), 10, 6, axes=(1, 2, 3),
                    batch_size=1, progress=False)  # fmt: skip
    probe_calls = len(calls)
    lazy.compute(scheduler="synchronous")
    grid = pg.PatchGrid(x.shape, 10, 6, axes=(1, 2, 3), edge="shift")
    assert len(calls) - probe_calls == len(grid)


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=50)  # fmt: skip
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def test_apply_on_a_local_cluster_equals_in_memory(client):
    x = _volume((1, 40, 36, 30))
    kw = dict(axes=(1, 2, 3), edge="shift", window="gaussian", batch_size=4, progress=False)
    lazy = pg.apply(_three_classes, da.from_array(x, chunks=(1, 20, 18, 30)), 12, 8,
                    reduce="argmax", **kw)  # fmt: skip
    got = client.compute(lazy).result()
    np.testing.assert_array_equal(got, pg.apply(_three_classes, x, 12, 8, reduce="argmax", **kw))
    assert len(client.scheduler_info()["workers"]) == 2


def test_a_torch_module_travels_to_the_workers(client):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 2, 3, padding=1)

    def model(batch):
        with torch.no_grad():
            return conv(torch.from_numpy(batch)).numpy()

    x = _volume((1, 24, 20, 16))
    kw = dict(axes=(1, 2, 3), edge="shift", batch_size=2, progress=False)
    lazy = pg.apply(model, da.from_array(x, chunks=(1, 12, 10, 16)), 8, 6, **kw)
    np.testing.assert_allclose(client.compute(lazy).result(), pg.apply(model, x, 8, 6, **kw),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_to_zarr_streams_the_result_to_disk(client, tmp_path):
    zarr = pytest.importorskip("zarr")
    x = _volume((1, 32, 28, 20))
    lazy = pg.apply(_double, da.from_array(x, chunks=(1, 16, 14, 20)), 8, 6, axes=(1, 2, 3),
                    progress=False)  # fmt: skip
    path = str(tmp_path / "out.zarr")
    lazy.to_zarr(path)
    np.testing.assert_allclose(zarr.open_array(path, mode="r")[...],
                               pg.apply(_double, x, 8, 6, axes=(1, 2, 3), progress=False),
                               rtol=1e-6)  # fmt: skip
