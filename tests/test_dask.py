"""The Dask path: lazy results equal to the in-memory ones, on a real distributed cluster too."""

import importlib
import itertools
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


@pytest.mark.parametrize("window", ["monai-gaussian", "gaussian"])
def test_apply_on_dask_takes_overlap_and_monais_window(window):
    # overlap= becomes the stride before the Dask path; MONAI's window travels by its name.
    x = _volume()
    kw = dict(axes=(1, 2, 3), overlap=0.4, window=window, batch_size=3, progress=False)
    lazy = pg.apply(_double, da.from_array(x, chunks=(1, 13, 17, 9)), 10, **kw)
    np.testing.assert_allclose(lazy.compute(), pg.apply(_double, x, 10, 6, **{**kw,
                               "overlap": None}), rtol=1e-6)  # fmt: skip


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


def test_apply_on_dask_refuses_an_out_that_is_not_zarr():
    x = da.zeros((1, 16, 16), chunks=8)
    with pytest.raises(TypeError, match="out= with a Dask image takes a zarr array"):
        pg.apply(_double, x, 8, axes=(1, 2), out=np.empty((1, 16, 16)), progress=False)


def test_apply_on_dask_refuses_a_zarr_out_of_the_wrong_shape_or_chunks(tmp_path):
    zarr = pytest.importorskip("zarr")
    x = da.zeros((1, 16, 24), chunks=(1, 8, 12), dtype=np.float32)
    wrong = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=(1, 16, 20), chunks=(1, 8, 4),
                            dtype="f4")  # fmt: skip
    with pytest.raises(ValueError, match=r"out has shape \(1, 16, 20\)"):
        pg.apply(_double, x, 8, axes=(1, 2), out=wrong, progress=False)
    # Zarr chunks of 8 along the last axis straddle the Dask chunks of 12: refused, not raced.
    across = zarr.open_array(str(tmp_path / "b.zarr"), mode="w", shape=(1, 16, 24),
                             chunks=(1, 8, 8), dtype="f4")  # fmt: skip
    with pytest.raises(ValueError, match="two tasks would write one zarr chunk"):
        pg.apply(_double, x, 8, axes=(1, 2), out=across, progress=False)


def test_apply_on_dask_refuses_a_whole_image_pad_mode():
    x = da.zeros((1, 16, 16), chunks=8)
    with pytest.raises(ValueError, match="pad_mode='mean'"):
        pg.apply(_double, x, 8, axes=(1, 2), margin=1, pad_mode="mean", progress=False)


def test_redundancy_counts_repeated_patches_and_carried_sums():
    grid = pg.PatchGrid((40, 30), 8, 4, edge="shift")
    chunks = ((10, 10, 10, 10), (15, 15))
    starts0, starts1 = grid.axis_starts(0), grid.axis_starts(1)

    def touching(starts, sizes):  # patches run by chunks that run every patch touching them
        return sum(
            sum(1 for s in starts if s < hi and s + 8 > lo)
            for lo, hi in itertools.pairwise(np.cumsum([0, *sizes]))
        )

    redundancy = sys.modules["patchgrid.dask"].redundancy
    # A lazy result: every chunk is a task of its own and runs every patch touching it.
    lazy = redundancy(grid, chunks, threads=1)
    assert lazy.calls == pytest.approx(touching(starts0, chunks[0]) * touching(starts1, chunks[1])
                                       / len(grid) - 1)  # fmt: skip
    assert lazy.sums == 0
    # out=: axis 0 has the most chunks and is one chain (each patch run once, sums passed down).
    reach = 0
    for lo, hi in itertools.pairwise(np.cumsum([0, *chunks[0]])):
        end = max([hi] + [s + 8 for s in starts0 if s < hi])
        reach += min(end, 40) - lo
    chained = redundancy(grid, chunks, threads=1, out=True)
    assert chained.calls == pytest.approx(
        len(starts0) * touching(starts1, chunks[1]) / len(grid) - 1
    )
    assert chained.sums == pytest.approx(reach / 40 - 1)
    # More threads than chains: the chain is cut in two, and the cut repeats patches too.
    assert chained.calls < redundancy(grid, chunks, threads=2, out=True).calls < lazy.calls


@pytest.mark.parametrize("chunks", [(1, 9, 11, 7), (1, 29, 5, 23), (1, 29, 34, 23)])
def test_fn_calls_on_dask_are_what_redundancy_says(chunks):
    calls = []

    def record(batch):
        calls.append(batch.shape[0])
        return batch

    x = _volume()
    lazy = pg.apply(record, da.from_array(x, chunks=chunks), 10, 6, axes=(1, 2, 3),
                    batch_size=1, progress=False)  # fmt: skip
    probe_calls = len(calls)
    lazy.compute(scheduler="synchronous")
    grid = pg.PatchGrid(x.shape, 10, 6, axes=(1, 2, 3), edge="shift")
    extra = sys.modules["patchgrid.dask"].redundancy(grid, lazy.chunks).calls
    assert len(calls) - probe_calls == round(len(grid) * (1 + extra))
    if chunks == (1, 29, 34, 23):  # one chunk: every patch once
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


def test_out_in_this_process_memory_is_refused_with_a_cluster(client):
    zarr = pytest.importorskip("zarr")
    x = da.zeros((1, 16, 16), chunks=8, dtype=np.float32)
    out = zarr.create_array(store=zarr.storage.MemoryStore(), shape=(1, 16, 16), chunks=(1, 8, 8),
                            dtype="f4")  # fmt: skip
    with pytest.raises(ValueError, match="their own copies"):
        pg.apply(_double, x, 8, axes=(1, 2), out=out, progress=False)


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


def _zarr_volume(tmp_path, shape=(1, 29, 34, 23), chunks=(1, 8, 8, 8)):
    zarr = pytest.importorskip("zarr")
    x = _volume(shape)
    z = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=x.shape, chunks=chunks,
                        dtype=x.dtype)  # fmt: skip
    z[...] = x
    return x, z


def test_tasks_read_their_regions_from_the_store(tmp_path):
    x, z = _zarr_volume(tmp_path)
    find = sys.modules["patchgrid.dask"].store_of
    assert find(da.from_zarr(z, chunks=(1, 9, 11, 7))) is not None
    assert find(da.from_array(x, chunks=(1, 9, 11, 7))) is None  # chunks are data already
    assert find(da.from_zarr(z) + 1) is None  # a graph that computes something
    kw = dict(axes=(1, 2, 3), edge="shift", margin=1, pad_mode="reflect", progress=False)
    lazy = pg.apply(_double, da.from_zarr(z, chunks=(1, 9, 11, 7)), 10, 6, **kw)
    np.testing.assert_allclose(lazy.compute(), pg.apply(_double, x, 10, 6, **kw), rtol=1e-6)


@pytest.mark.parametrize("reduce", ["mean", "argmax", "classes"])
@pytest.mark.parametrize("chunks", [(1, 9, 11, 7), (1, 5, 7, 6)], ids=["bigger", "smaller"])
def test_apply_on_dask_writes_out_equal_to_in_memory(tmp_path, chunks, reduce):
    zarr = pytest.importorskip("zarr")
    x, z = _zarr_volume(tmp_path)
    fn = _double if reduce == "mean" else _three_classes  # "classes": 3 channels out, averaged
    kw = dict(axes=(1, 2, 3), edge="shift", window="gaussian", batch_size=3,
              reduce="mean" if reduce == "classes" else reduce, progress=False)  # fmt: skip
    want = pg.apply(fn, x, 10, 6, **kw)
    zchunks = {"mean": chunks, "argmax": chunks[1:], "classes": (3, *chunks[1:])}[reduce]
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="w", shape=want.shape,
                          chunks=zchunks, dtype=want.dtype)  # fmt: skip
    got = pg.apply(fn, da.from_zarr(z, chunks=chunks), 10, 6, out=out, **kw)
    assert got is out
    np.testing.assert_allclose(out[...], want, rtol=1e-6)


def test_out_runs_whole_chains_and_calls_fn_as_redundancy_says(tmp_path):
    zarr = pytest.importorskip("zarr")
    calls = []

    def record(batch):
        calls.append(batch.shape[0])
        return batch

    x, z = _zarr_volume(tmp_path)
    kw = dict(axes=(1, 2, 3), batch_size=1, progress=False)
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="w", shape=x.shape,
                          chunks=(1, 5, 7, 6), dtype="f4")  # fmt: skip
    lazy_in = da.from_zarr(z, chunks=(1, 5, 7, 6))
    with sys.modules["dask"].config.set(scheduler="synchronous"):
        pg.apply(record, lazy_in, 10, 6, out=out, **kw)
    grid = pg.PatchGrid(x.shape, 10, 6, axes=(1, 2, 3), edge="shift")
    red = sys.modules["patchgrid.dask"].redundancy
    extra = red(grid, lazy_in.chunks, out=True).calls
    assert len(calls) - 1 == round(len(grid) * (1 + extra))  # one call probes the output
    assert extra < red(grid, lazy_in.chunks).calls  # lazy results cut their runs at RUN


def test_out_on_a_local_cluster(client, tmp_path):
    zarr = pytest.importorskip("zarr")
    x, z = _zarr_volume(tmp_path, (1, 40, 36, 30), (1, 10, 9, 10))
    kw = dict(axes=(1, 2, 3), edge="shift", window="gaussian", batch_size=4, progress=False)
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="w", shape=x.shape,
                          chunks=(1, 10, 9, 10), dtype="f4")  # fmt: skip
    pg.apply(_double, da.from_zarr(z, chunks=(1, 20, 18, 10)), 12, 8, out=out, **kw)
    np.testing.assert_allclose(out[...], pg.apply(_double, x, 12, 8, **kw), rtol=1e-6)


def test_out_shows_progress(tmp_path):
    zarr = pytest.importorskip("zarr")
    x, z = _zarr_volume(tmp_path)
    seen = []
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="w", shape=x.shape,
                          chunks=(1, 9, 11, 7), dtype="f4")  # fmt: skip
    pg.apply(_double, da.from_zarr(z, chunks=(1, 9, 11, 7)), 10, 6, axes=(1, 2, 3), out=out,
             progress=lambda done, total: seen.append((done, total)))  # fmt: skip
    grid = pg.PatchGrid(x.shape, 10, 6, axes=(1, 2, 3), edge="shift")
    runs = round(
        len(grid)
        * (
            1
            + sys.modules["patchgrid.dask"]
            .redundancy(grid, ((1,), (9, 9, 9, 2), (11, 11, 11, 1), (7, 7, 7, 2)), out=True)
            .calls
        )
    )
    done = [d for d, _ in seen]
    assert done == sorted(done)
    assert seen[-1] == (runs, runs)  # every patch run counted, the repeated ones too


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_dask_apply_equals_in_memory_for_any_grid_and_chunking(data):
    """Lazy and out= results against the in-memory apply: shapes, patch sizes, strides (gaps
    too), edge policies, windows, margins, scales and chunkings (smaller than the patch too),
    1-D to 3-D."""
    zarr = pytest.importorskip("zarr")
    ndim = data.draw(st.integers(1, 3), label="ndim")
    shape = tuple(data.draw(st.integers(3, 18)) for _ in range(ndim))
    margin = data.draw(st.integers(0, 1), label="margin")
    size = tuple(data.draw(st.integers(1 + 2 * margin, s + 2 * margin)) for s in shape)
    stride = tuple(data.draw(st.integers(1, p - 2 * margin + 1)) for p in size)
    scale = data.draw(st.sampled_from([1, 2]), label="scale")
    chunks = tuple(data.draw(st.integers(1, s)) for s in shape)
    kw = dict(
        edge=data.draw(st.sampled_from(["shift", "pad", "even", "drop"]), label="edge"),
        window=data.draw(st.sampled_from(["uniform", "gaussian", "hann"]), label="window"),
        batch_size=data.draw(st.integers(1, 3), label="batch_size"),
        margin=margin, scale=scale, progress=False,
        pad_mode=data.draw(st.sampled_from(["reflect", "wrap", "constant", "edge"]), label="pad"),
    )  # fmt: skip

    def fn(batch):
        core = batch[(slice(None), *[slice(margin, b - margin) for b in batch.shape[1:]])]
        for a in range(1, batch.ndim):
            core = core.repeat(scale, axis=a)
        return 2 * core

    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    want = pg.apply(fn, x, size, stride, **kw)
    with sys.modules["dask"].config.set(scheduler="synchronous"):
        lazy = pg.apply(fn, da.from_array(x, chunks=chunks), size, stride, **kw)
        np.testing.assert_allclose(lazy.compute(), want, rtol=1e-5, atol=1e-6)
        out = zarr.create_array(store=zarr.storage.MemoryStore(), shape=want.shape,
                                chunks=tuple(c * scale for c in chunks), dtype="f4")  # fmt: skip
        pg.apply(fn, da.from_array(x, chunks=chunks), size, stride, out=out, **kw)
        np.testing.assert_allclose(out[...], want, rtol=1e-5, atol=1e-6)


def test_out_takes_its_integer_dtype_rounding_and_refuses_values_it_cannot_hold(tmp_path):
    zarr = pytest.importorskip("zarr")
    x = (np.random.default_rng(3).random((20, 18)) * 100).astype(np.float32)
    out = zarr.create_array(store=zarr.storage.MemoryStore(), shape=x.shape, chunks=(5, 6),
                            dtype="int16")  # fmt: skip
    kw = dict(window="hann", progress=False)
    with sys.modules["dask"].config.set(scheduler="synchronous"):
        pg.apply(_double, da.from_array(x, chunks=(5, 6)), 6, 4, out=out, **kw)
        np.testing.assert_array_equal(out[...], pg.apply(_double, x, 6, 4, dtype=np.int16, **kw))
        big = x.copy()
        big[10:, 10:] += 200  # doubled: up to 600, past uint8
        lazy = pg.apply(_double, da.from_array(big, chunks=8), 8, 4, dtype=np.uint8, **kw)
        with pytest.raises(ValueError, match="dtype=uint8 cannot hold"):
            lazy.compute()


def test_out_refuses_shards_that_tasks_would_share_and_suggests_chunks_that_fit():
    zarr = pytest.importorskip("zarr")
    x = da.ones((40, 24), chunks=((8, 8, 24), (12, 12)), dtype=np.float32)
    sharded = zarr.create_array(store=zarr.storage.MemoryStore(), shape=(40, 24),
                                shards=(16, 24), chunks=(4, 4), dtype="f4")  # fmt: skip
    with pytest.raises(ValueError, match=r"out's shards \(16, 24\) cut across") as info:
        pg.apply(_double, x, 8, out=sharded, progress=False)
    # The suggestion works.
    assert "shards=(8, 12)" in str(info.value)
    fits = zarr.create_array(store=zarr.storage.MemoryStore(), shape=(40, 24), shards=(8, 12),
                             chunks=(4, 4), dtype="f4")  # fmt: skip
    with sys.modules["dask"].config.set(scheduler="synchronous"):
        pg.apply(_double, x, 8, out=fits, progress=False)
    np.testing.assert_allclose(fits[...], 2.0)


def test_reads_that_need_a_lock_go_through_dask(tmp_path):
    _, z = _zarr_volume(tmp_path)
    assert sys.modules["patchgrid.dask"].store_of(da.from_array(z, chunks=9, lock=True)) is None


def test_fn_returning_the_wrong_patch_shape_on_dask_says_so():
    calls = []

    def fickle(batch):  # right on the probe, wrong in the tasks
        calls.append(1)
        return batch if len(calls) == 1 else batch[:, :, :4]

    x = da.zeros((1, 16, 16), chunks=8, dtype=np.float32)
    lazy = pg.apply(fickle, x, 8, axes=(1, 2), progress=False)
    with pytest.raises(ValueError, match="returned shape"):
        lazy.compute(scheduler="synchronous")


def test_a_block_runs_its_longest_run_outermost(monkeypatch, tmp_path):
    zarr = pytest.importorskip("zarr")
    module = importlib.import_module("patchgrid.dask")
    chunks = importlib.import_module("patchgrid._chunks")
    orders = []
    run = chunks.run

    def record(fn, source, datas, steps, spec, out):
        orders.append([s.bid for s in steps])
        return run(fn, source, datas, steps, spec, out)

    monkeypatch.setattr(chunks, "run", record)
    monkeypatch.setattr(module, "worker_threads", lambda: 1)  # two blocks of 2 x 16 chunks
    # The last axis has the most chunks (a whole run); the first takes up to SECOND.
    x = _volume((16, 64))
    out = zarr.create_array(store=zarr.storage.MemoryStore(), shape=x.shape, chunks=(4, 4),
                            dtype="f4")  # fmt: skip
    with sys.modules["dask"].config.set(scheduler="synchronous"):
        pg.apply(_double, da.from_array(x, chunks=4), 4, 2, out=out, progress=False)
    np.testing.assert_allclose(out[...], pg.apply(_double, x, 4, 2, progress=False), rtol=1e-6)
    block = max(orders, key=len)
    assert len({b[0] for b in block}) > 1
    assert len({b[1] for b in block}) > 1
    # The long axis (1) changes slowest: each of its chunks is done before the next.
    assert [b[1] for b in block] == sorted(b[1] for b in block)


class _Recording:
    """An array-like store that records the regions read from it."""

    def __init__(self, data):
        self.data, self.shape, self.dtype, self.ndim = data, data.shape, data.dtype, data.ndim
        self.reads = []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.data[key]


def test_a_wrapped_border_is_read_in_pieces_not_whole():
    x = _volume((1, 100, 40))
    store = _Recording(x)
    kw = dict(axes=(1, 2), margin=2, pad_mode="wrap", edge="pad", progress=False)

    def fn(b):
        return 2 * b[:, :, 2:-2, 2:-2]

    with sys.modules["dask"].config.set(scheduler="synchronous"):
        lazy = pg.apply(fn, da.from_array(store, chunks=(1, 10, 40)), 12, 8, **kw)
        store.reads.clear()
        np.testing.assert_allclose(lazy.compute(), pg.apply(fn, x, 12, 8, **kw), rtol=1e-6)
    spans = [k[1].stop - k[1].start for k in store.reads]
    assert spans
    assert max(spans) < 30  # a chunk of 10 and its patches' reach, never the 100 of the axis


def test_argmax_labels_that_a_zarr_out_cannot_hold_are_refused(tmp_path):
    zarr = pytest.importorskip("zarr")
    image = da.from_array(np.ones((1, 16, 16), np.float32), chunks=(1, 8, 8))
    out = zarr.create_array(str(tmp_path / "o.zarr"), shape=(16, 16), chunks=(8, 8), dtype="u1")
    scores = lambda b: np.repeat(b, 300, axis=1) * np.arange(300)[:, None, None]  # noqa: E731
    with pytest.raises(ValueError, match="class numbers of 300 classes"):
        pg.apply(scores, image, 4, axes=(1, 2), reduce="argmax", out=out)


def test_a_fill_that_a_zarr_out_cannot_hold_is_refused(tmp_path):
    zarr = pytest.importorskip("zarr")
    image = da.from_array(np.ones((16, 16), np.float32), chunks=8)
    out = zarr.create_array(str(tmp_path / "o.zarr"), shape=(16, 16), chunks=(8, 8), dtype="u1")
    with pytest.raises(ValueError, match=r"fill=1\.5 cannot be stored"):
        pg.apply(lambda b: b, image, 2, 4, fill=1.5, out=out)


def test_an_array_window_of_equal_float64_values_comes_back_exactly():
    window = np.random.default_rng(3).uniform(0.1, 1, (6, 6))
    image = np.full((20, 20), 0.1)
    local = pg.apply(lambda b: b, image, 6, 2, window=window)
    lazy = pg.apply(lambda b: b, da.from_array(image, chunks=7), 6, 2, window=window).compute()
    np.testing.assert_array_equal(local, image)
    np.testing.assert_array_equal(lazy, image)
