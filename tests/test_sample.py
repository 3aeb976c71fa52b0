"""Random patches: uniform and weighted centres, reproducible, reading only what is drawn."""

import sys

import numpy as np
import pytest

import patchgrid as pg

SAMPLE = sys.modules["patchgrid._sample"]  # the module; pg.sample is the function


def _volume(shape=(12, 14, 16), seed=0):
    return np.random.default_rng(seed).random(shape)


class Recorder:
    """An array that records every region read from it."""

    def __init__(self, data):
        self.data, self.shape, self.dtype, self.reads = data, data.shape, data.dtype, []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.data[key]


def _size_of(key, shape):
    key = key if isinstance(key, tuple) else (key,)
    key = key + (slice(None),) * (len(shape) - len(key))
    return int(np.prod([len(range(*k.indices(n))) for k, n in zip(key, shape)]))


@pytest.mark.parametrize("size", [4, (3, 5, 2)], ids=["cube", "per-axis"])
def test_patches_are_the_image_at_their_starts(size):
    image = _volume()
    patches, starts = pg.sample(image, size, 20, rng=1)
    sizes = (size,) * 3 if isinstance(size, int) else size
    assert patches.shape == (20, *sizes)
    for patch, start in zip(patches, starts):
        region = tuple(slice(s, s + p) for s, p in zip(start, sizes))
        np.testing.assert_array_equal(patch, image[region])


def test_drop_keeps_every_patch_inside_the_image():
    _, starts = pg.sample(_volume(), 5, 500, rng=2)
    assert starts.min() >= 0
    assert (starts + 5 <= np.array([12, 14, 16])).all()


def test_every_allowed_start_can_be_drawn():
    _, starts = pg.sample(np.zeros((6, 6)), 4, 2000, rng=3)
    assert {tuple(s) for s in starts.tolist()} == {(i, j) for i in range(3) for j in range(3)}


def test_the_same_seed_gives_the_same_patches():
    a = pg.sample(_volume(), 4, 10, rng=7)
    b = pg.sample(_volume(), 4, 10, rng=7)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


def test_different_seeds_give_different_patches():
    a = pg.sample(_volume(), 4, 10, rng=7)[1]
    b = pg.sample(_volume(), 4, 10, rng=8)[1]
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
def test_pad_lets_centres_reach_the_border_and_pads_like_numpy(mode):
    image = _volume((7, 9))
    patches, starts = pg.sample(image, 5, 200, rng=4, edge="pad", pad_mode=mode, pad_value=-1)
    centres = starts + 2
    assert centres.min() == 0
    assert (centres.max(axis=0) == [6, 8]).all()
    kw = {"constant_values": -1} if mode == "constant" else {}
    padded = np.pad(image, 5, mode=mode, **kw)
    for patch, start in zip(patches, starts):
        region = tuple(slice(s + 5, s + 10) for s in start)
        np.testing.assert_array_equal(patch, padded[region])


def test_channels_are_carried_whole():
    image = _volume((3, 10, 11))
    patches, starts = pg.sample(image, (4, 4), 6, rng=5)
    assert patches.shape == (6, 3, 4, 4)
    for patch, (y, x) in zip(patches, starts):
        np.testing.assert_array_equal(patch, image[:, y : y + 4, x : x + 4])


def test_a_single_weighted_voxel_centres_every_patch():
    weights = np.zeros((12, 14, 16))
    weights[6, 7, 9] = 1
    _, starts = pg.sample(_volume(), 4, 30, weights=weights, rng=6)
    assert (starts + 2 == [6, 7, 9]).all()


def test_centres_are_drawn_in_proportion_to_the_weights():
    weights = np.zeros((10, 10))
    weights[4, 4], weights[6, 6] = 3.0, 1.0
    _, starts = pg.sample(np.zeros((10, 10)), 4, 4000, weights=weights, rng=7)
    share = np.mean((starts == [2, 2]).all(axis=1))
    assert share == pytest.approx(0.75, abs=0.03)


def test_weights_outside_the_allowed_centres_are_never_drawn():
    weights = np.ones((10, 10))
    _, starts = pg.sample(np.zeros((10, 10)), 4, 1000, weights=weights, rng=8)
    centres = starts + 2
    assert centres.min() >= 2
    assert centres.max() <= 8


def test_label_weights_give_the_pos_neg_ratio():
    labels = np.zeros((30, 30), dtype=np.uint8)
    labels[10:13, 10:13] = 1  # 1% foreground
    w = pg.label_weights(labels, pos=2, neg=1)
    patches, _ = pg.sample(labels, 5, 3000, weights=w, rng=9, edge="pad")
    share = np.mean(patches[:, 2, 2] == 1)
    assert share == pytest.approx(2 / 3, abs=0.03)


def test_lazy_image_is_read_only_where_patches_are_drawn():
    data = _volume((20, 20, 20))
    lazy = Recorder(data)
    patches, starts = pg.sample(lazy, 4, 5, rng=10)
    assert len(lazy.reads) == 5
    assert all(_size_of(k, data.shape) == 64 for k in lazy.reads)
    for patch, start in zip(patches, starts):
        np.testing.assert_array_equal(patch, data[tuple(slice(s, s + 4) for s in start)])


def test_a_lazy_weight_map_is_read_in_slabs_never_whole(monkeypatch):
    monkeypatch.setattr(SAMPLE, "SLAB_BYTES", 8 * 20 * 20 * 3)
    weights = Recorder(np.random.default_rng(11).random((20, 20, 20)))
    pg.sample(np.zeros((20, 20, 20)), 4, 50, weights=weights, rng=11, edge="pad")
    assert max(_size_of(k, (20, 20, 20)) for k in weights.reads) <= 3 * 20 * 20


def test_label_weights_read_labels_in_slabs(monkeypatch):
    monkeypatch.setattr(SAMPLE, "SLAB_BYTES", 20 * 20 * 4)
    labels = Recorder((np.random.default_rng(12).random((20, 20, 20)) > 0.9).astype(np.uint8))
    w = pg.label_weights(labels, pos=1, neg=1)
    pg.sample(np.zeros((20, 20, 20)), 4, 20, weights=w, rng=12, edge="pad")
    assert max(_size_of(k, (20, 20, 20)) for k in labels.reads) <= 4 * 20 * 20


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(n=0), ValueError, "n must be at least 1"),
        (dict(weights=np.ones((5, 5))), ValueError, "weights must have the image's shape"),
        (dict(weights=np.zeros((12, 14, 16))), ValueError, "zero everywhere"),
        (dict(weights=-np.ones((12, 14, 16))), ValueError, "non-negative"),
        (dict(size=20), ValueError, "larger than the image"),
        (dict(edge="shift"), ValueError, "edge must be one of"),
        (dict(edge="pad", pad_mode="mean"), ValueError, "pad_mode must be one of"),
        (dict(rng="seed"), TypeError, "rng must be"),
        (dict(n=2.5), TypeError, "n must be an integer"),
    ],
    ids=["n", "weights-shape", "all-zero", "negative", "too-big", "edge", "pad-mode", "rng",
         "n-float"],
)  # fmt: skip
def test_bad_input_raises_naming_the_parameter(kwargs, error, match):
    args = dict(size=4, n=3)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        pg.sample(_volume(), args.pop("size"), args.pop("n"), **args)


def test_label_weights_with_nothing_to_draw_raises():
    with pytest.raises(ValueError, match="no voxel can be drawn"):
        pg.label_weights(np.zeros((5, 5)), pos=1, neg=0)


def test_weights_near_the_float64_maximum_are_drawn_from():
    # Their sums overflow float64; only their ratios matter.
    weights = np.full((12, 14, 16), 1e308)
    weights[:, :, :8] = 0
    _, starts = pg.sample(_volume(), 4, 50, weights=weights, rng=3, edge="pad")
    assert (starts[:, 2] + 2 < 8).sum() == 0
