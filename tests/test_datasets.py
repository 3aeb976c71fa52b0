"""torch datasets: every grid patch of many volumes, and random patches drawn reproducibly."""

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402

import patchgrid as pg  # noqa: E402


def _volumes():
    rng = np.random.default_rng(0)
    return [rng.random((10, 12), dtype=np.float32), rng.random((9, 16), dtype=np.float32)]


def test_patch_dataset_walks_every_grid_in_order():
    vols = _volumes()
    ds = pg.PatchDataset(vols, size=4, stride=3, edge="shift")
    grids = [pg.PatchGrid(v.shape, 4, 3, edge="shift") for v in vols]
    assert len(ds) == sum(len(g) for g in grids)
    i = 0
    for v, (vol, grid) in enumerate(zip(vols, grids)):
        for j in range(len(grid)):
            item = ds[i]
            assert item["volume"] == v
            np.testing.assert_array_equal(item["start"].numpy(), grid.starts()[j])
            np.testing.assert_array_equal(item["patch"].numpy(), vol[grid.slices(j)])
            i += 1


def test_patch_dataset_gives_label_patches_in_the_same_place():
    vols = _volumes()
    labels = [(v > 0.5).astype(np.uint8) for v in vols]
    ds = pg.PatchDataset(vols, size=4, labels=labels)
    item = ds[len(ds) - 1]
    grid = pg.PatchGrid(vols[1].shape, 4, edge="shift")
    np.testing.assert_array_equal(item["label"].numpy(), labels[1][grid.slices(len(grid) - 1)])


def test_patch_dataset_applies_the_transform_to_image_and_label_together():
    vols = _volumes()
    labels = [(v > 0.5).astype(np.uint8) for v in vols]

    def flip(item):
        return {**item, "patch": item["patch"].flip(-1), "label": item["label"].flip(-1)}

    plain = pg.PatchDataset(vols, size=4, labels=labels)[3]
    flipped = pg.PatchDataset(vols, size=4, labels=labels, transform=flip)[3]
    np.testing.assert_array_equal(flipped["patch"].numpy(), plain["patch"].numpy()[..., ::-1])
    np.testing.assert_array_equal(flipped["label"].numpy(), plain["label"].numpy()[..., ::-1])


def test_patch_dataset_index_out_of_range_raises():
    ds = pg.PatchDataset(_volumes(), size=4)
    with pytest.raises(IndexError, match="out of range"):
        ds[len(ds)]


def test_patch_dataset_from_paths_works_with_dataloader_workers(tmp_path):
    vols = _volumes()
    paths = []
    for i, v in enumerate(vols):
        path = str(tmp_path / f"v{i}.npy")
        pg.save(path, v)
        paths.append(path)
    ds = pg.PatchDataset(paths, size=4, stride=4, edge="pad")
    loader = DataLoader(ds, batch_size=5, num_workers=2)
    got = torch.cat([batch["patch"] for batch in loader])
    want = torch.stack([ds[i]["patch"] for i in range(len(ds))])
    assert torch.equal(got, want)


def test_a_memmap_travels_to_workers_as_its_file_name(tmp_path):
    path = str(tmp_path / "v.npy")
    pg.save(path, _volumes()[0])
    mm = np.load(path, mmap_mode="r")
    ds = pg.PatchDataset(mm, size=4)
    state = ds.volumes[0].__getstate__()
    assert state["opened"] is None
    assert state["reopen"][0] == "memmap"
    loader = DataLoader(ds, batch_size=len(ds), num_workers=2)
    assert torch.equal(
        next(iter(loader))["patch"], torch.stack([ds[i]["patch"] for i in range(len(ds))])
    )


def test_labels_of_another_shape_raise():
    with pytest.raises(ValueError, match=r"labels\[0\] has shape"):
        pg.PatchDataset(_volumes(), size=4, labels=[np.zeros((3, 3)), np.zeros((9, 16))])


def test_random_dataset_is_reproducible_from_one_seed():
    a = [item["start"].tolist() for item in pg.RandomPatchDataset(_volumes(), 4, 20, seed=3)]
    b = [item["start"].tolist() for item in pg.RandomPatchDataset(_volumes(), 4, 20, seed=3)]
    c = [item["start"].tolist() for item in pg.RandomPatchDataset(_volumes(), 4, 20, seed=4)]
    assert a == b
    assert a != c


def test_random_dataset_patches_are_the_volume_at_their_start():
    vols = _volumes()
    for item in pg.RandomPatchDataset(vols, 4, 30, seed=1, edge="drop"):
        y, x = item["start"].tolist()
        np.testing.assert_array_equal(
            item["patch"].numpy(), vols[item["volume"]][y : y + 4, x : x + 4]
        )


def test_random_dataset_workers_draw_different_streams():
    ds = pg.RandomPatchDataset(_volumes(), 4, 40, seed=5)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    starts = [(item["volume"], *item["start"].tolist()) for item in loader]
    assert len(starts) == 40
    # Batches alternate between the workers; their streams must not repeat each other.
    first, second = starts[0::2], starts[1::2]
    assert first != second
    repeat = DataLoader(pg.RandomPatchDataset(_volumes(), 4, 40, seed=5), batch_size=None,
                        num_workers=2)  # fmt: skip
    again = [(item["volume"], *item["start"].tolist()) for item in repeat]
    assert starts == again


def test_random_dataset_pos_neg_ratio_from_labels():
    vol = np.zeros((40, 40), dtype=np.float32)
    labels = np.zeros((40, 40), dtype=np.uint8)
    labels[18:22, 18:22] = 1
    ds = pg.RandomPatchDataset(vol, 5, 1500, labels=labels, pos=2, neg=1, seed=2)
    share = np.mean([item["label"][2, 2].item() == 1 for item in ds])
    assert share == pytest.approx(2 / 3, abs=0.04)


def test_random_dataset_pos_without_labels_raises():
    with pytest.raises(ValueError, match="give labels="):
        pg.RandomPatchDataset(_volumes(), 4, 10, pos=1)


def test_random_dataset_applies_the_transform_to_image_and_label_together():
    vol = np.random.default_rng(3).random((20, 20)).astype(np.float32)
    labels = (vol > 0.5).astype(np.uint8)

    def flip(item):
        return {**item, "patch": item["patch"].flip(0), "label": item["label"].flip(0)}

    plain = list(pg.RandomPatchDataset(vol, 4, 5, labels=labels, seed=1))
    flipped = list(pg.RandomPatchDataset(vol, 4, 5, labels=labels, seed=1, transform=flip))
    for a, b in zip(plain, flipped):
        assert torch.equal(b["patch"], a["patch"].flip(0))
        assert torch.equal(b["label"], a["label"].flip(0))


@pytest.mark.parametrize("size", [(1, 5, 6), (2, 3, 3)], ids=["contiguous", "strided"])
def test_patch_dataset_items_are_copies_not_views_of_the_volume(size):
    vol = np.zeros((4, 5, 6), dtype=np.float32)
    labels = np.zeros((4, 5, 6), dtype=np.uint8)
    item = pg.PatchDataset(vol, size=size, labels=labels)[0]
    item["patch"].add_(1)
    item["label"].add_(1)
    assert not vol.any()
    assert not labels.any()


def test_patch_dataset_items_from_a_read_only_memmap_are_writable(tmp_path):
    path = str(tmp_path / "v.npy")
    pg.save(path, _volumes()[0])
    item = pg.PatchDataset(np.load(path, mmap_mode="r"), size=(1, 12))[0]
    item["patch"].mul_(0)
    assert not item["patch"].any()
    assert np.load(path)[0].all()


def test_random_dataset_items_are_copies_not_views_of_the_volume():
    vol = np.zeros((4, 6), dtype=np.float32)
    for item in pg.RandomPatchDataset(vol, (1, 6), 5, labels=np.zeros((4, 6)), seed=0):
        item["patch"].add_(1)
        item["label"].add_(1)
    assert not vol.any()


def _epochs(ds, n=3, **loader):
    if not loader:
        return [[item["start"].tolist() for item in ds] for _ in range(n)]
    dl = DataLoader(ds, batch_size=None, **loader)
    return [[item["start"].tolist() for item in dl] for _ in range(n)]


def test_random_dataset_draws_anew_each_epoch():
    first, second, third = _epochs(pg.RandomPatchDataset(_volumes(), 4, 20, seed=3))
    assert first != second
    assert second != third


def test_random_dataset_every_epoch_is_reproducible_from_the_seed():
    assert _epochs(pg.RandomPatchDataset(_volumes(), 4, 20, seed=3)) == _epochs(
        pg.RandomPatchDataset(_volumes(), 4, 20, seed=3)
    )


@pytest.mark.parametrize(
    "loader",
    [{"num_workers": 2}, {"num_workers": 2, "persistent_workers": True}],
    ids=["workers", "persistent-workers"],
)
def test_random_dataset_epochs_are_the_same_with_or_without_workers(loader):
    alone = _epochs(pg.RandomPatchDataset(_volumes(), 4, 9, seed=3))
    assert _epochs(pg.RandomPatchDataset(_volumes(), 4, 9, seed=3), **loader) == alone


def test_random_dataset_set_epoch_replays_an_epoch():
    ds = pg.RandomPatchDataset(_volumes(), 4, 20, seed=3)
    epochs = _epochs(ds)
    ds.set_epoch(1)
    assert _epochs(ds, 2) == epochs[1:]


def test_random_dataset_without_a_seed_follows_torch_manual_seed():
    torch.manual_seed(1)
    a = _epochs(pg.RandomPatchDataset(_volumes(), 4, 20), 2)
    torch.manual_seed(1)
    b = _epochs(pg.RandomPatchDataset(_volumes(), 4, 20), 2)
    torch.manual_seed(2)
    c = _epochs(pg.RandomPatchDataset(_volumes(), 4, 20), 2)
    assert a == b
    assert a != c
    assert a[0] != a[1]


def test_random_dataset_without_a_seed_in_workers_follows_the_loaders_generator():
    def run():
        gen = torch.Generator().manual_seed(7)
        return _epochs(pg.RandomPatchDataset(_volumes(), 4, 9), 2, num_workers=2, generator=gen)

    a = run()
    assert a == run()
    assert a[0] != a[1]


def test_random_dataset_refuses_a_negative_seed():
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        pg.RandomPatchDataset(_volumes(), 4, 10, seed=-1)


def test_random_dataset_labels_of_another_shape_raise():
    vol = np.zeros((20, 30), dtype=np.float32)
    with pytest.raises(ValueError, match=r"labels\[0\] has shape \(30, 20\).*\(20, 30\)"):
        pg.RandomPatchDataset(vol, 4, 10, labels=np.zeros((30, 20), dtype=np.uint8))


def test_random_dataset_cannot_be_indexed():
    ds = pg.RandomPatchDataset(_volumes(), 4, 10, seed=0)
    with pytest.raises(TypeError, match="cannot be indexed: iterate over it"):
        ds[0]


@pytest.fixture
def big_endian_nifti():
    nib = pytest.importorskip("nibabel")
    path = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "anatomical.nii")
    volume = np.asarray(nib.load(path).dataobj)
    assert volume.dtype.byteorder == ">"
    return path, volume


@pytest.mark.parametrize("source", ["path", "array"])
def test_patch_dataset_reads_a_big_endian_nifti(big_endian_nifti, source):
    path, volume = big_endian_nifti
    ds = pg.PatchDataset(path if source == "path" else volume, size=8)
    grid = pg.PatchGrid(volume.shape, 8, edge="shift")
    item = ds[len(ds) - 1]
    assert item["patch"].dtype == torch.int16
    np.testing.assert_array_equal(item["patch"].numpy(), volume[grid.slices(len(grid) - 1)])


@pytest.mark.parametrize("source", ["path", "array"])
def test_random_dataset_reads_a_big_endian_nifti(big_endian_nifti, source):
    path, volume = big_endian_nifti
    ds = pg.RandomPatchDataset(path if source == "path" else volume, 8, 4, seed=0, edge="drop")
    for item in ds:
        assert item["patch"].dtype == torch.int16
        region = tuple(slice(s, s + 8) for s in item["start"].tolist())
        np.testing.assert_array_equal(item["patch"].numpy(), volume[region])


def test_datasets_without_torch_say_how_to_install_it():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import patchgrid as pg\n"
        "try:\n"
        "    pg.PatchDataset\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "pip install 'patchgrid[torch]'" in out
