"""Bugs a review found, each pinned by the smallest case that showed it."""

import numpy as np
import pytest

import patchgrid as pg


def test_apply_max_takes_no_window_by_default():
    image = np.random.default_rng(0).random((20, 20)).astype(np.float32)
    got = pg.apply(lambda b: b, image, 8, 4, reduce="max", progress=False)
    np.testing.assert_array_equal(got, image)


def test_apply_accepts_a_core_whose_margin_times_scale_is_fractional():
    x = np.random.default_rng(1).random((48, 48)).astype(np.float32)

    def encoder(b):
        core = b[:, 3:-3, 3:-3]
        return core.reshape(len(core), 3, 4, 3, 4).mean(axis=(2, 4))

    got = pg.apply(encoder, x, 18, margin=3, scale=0.25, window=None, progress=False)
    want = x.reshape(12, 4, 12, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_a_merge_into_an_integer_dtype_too_small_raises_instead_of_wrapping():
    image = np.full((8, 8), 200, np.uint8)
    grid = pg.PatchGrid(image.shape, 4, 2)
    with pytest.raises(ValueError, match="dtype=uint8 cannot hold"):
        pg.merge(pg.extract(image, grid), grid, reduce="sum", dtype=np.uint8)


def test_cli_merge_sum_of_integers_keeps_the_sums(tmp_path, capsys):
    from patchgrid.cli import main

    src = str(tmp_path / "s.npy")
    pg.save(src, np.full((8, 8), 200, np.uint8))
    assert (
        main(["extract", src, "--size", "4", "--stride", "2", "-o", str(tmp_path / "s.zarr")]) == 0
    )
    out = str(tmp_path / "sum.npy")
    assert main(["merge", str(tmp_path / "s.zarr"), "-o", out, "--reduce", "sum"]) == 0
    merged = np.load(out)
    assert merged.max() == 800
    assert merged.min() == 200


def test_a_tensor_out_with_a_numpy_image():
    torch = pytest.importorskip("torch")
    image = np.random.default_rng(2).random((3, 20, 18)).astype(np.float32)
    out = torch.zeros(3, 20, 18)
    got = pg.apply(lambda b: b * 2, image, 8, 5, axes=(1, 2), out=out, progress=False)
    assert got is out
    np.testing.assert_allclose(out.numpy(), 2 * image, rtol=1e-6)


@pytest.mark.parametrize("mode", ["reflect", "symmetric", "wrap"])
def test_dask_extract_pads_longer_than_the_axis_like_numpy(mode):
    da = pytest.importorskip("dask.array")
    x = np.arange(3.0)
    got = pg.extract(da.from_array(x), (6,), edge="pad", pad_mode=mode).compute()
    np.testing.assert_array_equal(got, pg.extract(x, (6,), edge="pad", pad_mode=mode))


def test_saving_one_hdf5_dataset_keeps_the_others(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = str(tmp_path / "m.h5")
    pg.save(path + ":a", np.zeros(3))
    with h5py.File(path, "a") as f:
        f["b"] = np.ones(4)
    pg.save(path + ":c", np.arange(5))
    with h5py.File(path, "r") as f:
        assert sorted(f) == ["a", "b", "c"]


def test_replacing_an_hdf5_dataset_needs_overwrite(tmp_path):
    path = str(tmp_path / "m.h5")
    pg.save(path + ":a", np.zeros(3))
    with pytest.raises(FileExistsError, match="overwrite"):
        pg.save(path + ":a", np.ones(3))


def test_torch_uint16_tensors_are_supported():
    torch = pytest.importorskip("torch")
    x = torch.arange(7).to(torch.uint16)
    got = pg.extract(x, 5, 2, edge="pad")
    np.testing.assert_array_equal(
        got.to(torch.int64).numpy(), pg.extract(np.arange(7), 5, 2, edge="pad")
    )


def test_a_batch_that_fails_halfway_does_not_count_its_first_patches_twice(monkeypatch):
    from patchgrid.backends import NumpyBackend as Backend

    grid = pg.PatchGrid((8,), 4, 2)
    merger = pg.Merger(grid)
    merger.add(np.ones((1, 4)), [0])
    calls = []
    real = Backend.inplace

    def fail_on_second(self, op, target, source, order="K"):
        calls.append(op)
        if len(calls) == 2:
            raise MemoryError("out of memory halfway through a batch")
        real(self, op, target, source, order)

    monkeypatch.setattr(Backend, "inplace", fail_on_second)
    with pytest.raises(MemoryError):
        merger.add(np.ones((2, 4)), [1, 2])
    monkeypatch.setattr(Backend, "inplace", real)
    with pytest.raises(ValueError, match=r"patch 1 .* was already added"):
        merger.add(np.ones((1, 4)), [1])
    merger.add(np.ones((1, 4)), [2])
    np.testing.assert_allclose(merger.result(), np.ones(8))


def test_merging_shifted_patches_as_drop_says_which_edge_it_assumed():
    image = np.arange(11.0)  # shift cuts 4 patches here, drop only 3
    patches = pg.extract(image, 4, 3, edge="shift")
    with pytest.raises(ValueError, match=r"edge \('drop',\).*pass the PatchGrid itself"):
        pg.merge(patches, image.shape, stride=3, edge="drop")


@pytest.mark.parametrize(
    "bad", [(4, 4.0), (4.0, 4), (4, True)], ids=["float-last", "float-first", "bool"]
)
def test_a_cached_layout_never_serves_an_argument_that_only_compares_equal(bad):
    # 4, 4.0 and True compare equal, but only 4 is a size: a plan cached for (4, 4) must not
    # answer a call with (4, 4.0) (it did, when the cache key ignored the types in tuples).
    image = np.zeros((8, 8))
    pg.extract(image, (4, 4))
    pg.merge(pg.extract(image, (4, 4)), image.shape, stride=(4, 4))
    with pytest.raises(TypeError, match=r"size\[[01]\] must be an integer"):
        pg.extract(image, bad)
    with pytest.raises(TypeError, match=r"must be an integer"):
        pg.merge(pg.extract(image, (4, 4)), image.shape, stride=bad)
