"""Skipping empty space (`_mask`): which patches a mask keeps, and coarse masks from lazy images.

Every result is compared with a plain loop over the patches (``mask[region].any()``) or over
the blocks of a coarse mask, never with the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import patchgrid as pg
from patchgrid import _mask
from patchgrid._mask import coarse_mask, kept
from patchgrid._regions import Reader
from patchgrid.backends import NUMPY


def loop_kept(mask, grid, f=None):
    """The reference: for each patch, any foreground in its core, cut at the image's end,
    in the mask's grid ``floor(start / f) .. ceil(stop / f)`` with ``f`` per tiled axis."""
    f = f or (1,) * len(grid.axes)
    out = []
    for i in range(len(grid)):
        cut = []
        for j, (a, s) in enumerate(zip(grid.axes, grid.slices(i)[-len(grid.axes) :])):
            stop = min(s.stop, grid.shape[a])
            cut.append(slice(s.start // f[j], -(-stop // f[j])))
        out.append(bool((np.asarray(mask[tuple(cut)]) > 0).any()))
    return np.array(out, dtype=bool)


class Spy:
    """A lazy array that records each region read from it."""

    def __init__(self, array):
        self.array, self.reads = array, []
        self.shape, self.dtype = array.shape, array.dtype

    def __getitem__(self, key):
        self.reads.append(key)
        return np.asarray(self.array[key])


def sparse(shape, fraction, seed=0):
    return np.random.default_rng(seed).random(shape) < fraction


@pytest.mark.parametrize("edge", ["shift", "pad", "drop", "even"])
@pytest.mark.parametrize(("size", "stride"), [(4, 4), (4, 2), (5, 3), (3, 5)],
                         ids=["tiles", "overlap", "uneven", "gaps"])  # fmt: skip
def test_full_resolution_mask_matches_the_loop(edge, size, stride):
    mask = sparse((13, 11, 9), 0.01)
    grid = pg.PatchGrid(mask.shape, size=size, stride=stride, edge=edge)
    assert np.array_equal(kept(mask, grid, 0), loop_kept(mask, grid))


def test_weights_count_above_zero_only():
    weights = -np.random.default_rng(1).random((12, 12))  # background: zero or below
    weights[0, 0] = 0.0
    weights[2, 7] = 0.5
    weights[10, 1] = 1e-9
    weights[6, 6] = np.nan  # NaN is not foreground
    grid = pg.PatchGrid(weights.shape, size=3)
    expected = np.array([(weights[s] > 0).any() for s in grid])
    assert expected.any()
    assert not expected.all()
    assert np.array_equal(kept(weights, grid, 0), expected)


@pytest.mark.parametrize(("shape", "factor"), [((20, 24), (4, 2)), ((21, 22), (4, 3)),
                                               ((22, 10), (3, 1)), ((9, 9), (9, 9))],
                         ids=["divides", "does-not-divide", "mixed", "one-voxel"])  # fmt: skip
@pytest.mark.parametrize("edge", ["shift", "pad", "drop"])
def test_coarse_mask_matches_the_loop(shape, factor, edge):
    coarse = sparse([-(-n // f) for n, f in zip(shape, factor)], 0.15, seed=3)
    grid = pg.PatchGrid(shape, size=4, stride=3, edge=edge)
    assert np.array_equal(kept(coarse, grid, 0), loop_kept(coarse, grid, factor))


def test_ambiguous_factor_keeps_more_never_fewer():
    # ceil(1000 / f) == 16 for f = 63 .. 66: the pyramid's 64 is one of them
    coarse = sparse((16, 16), 0.05, seed=4)
    grid = pg.PatchGrid((1000, 1000), size=40, stride=40)
    exact = loop_kept(coarse, grid, (64, 64))
    inferred = kept(coarse, grid, 0)
    assert not (exact & ~inferred).any()
    assert np.array_equal(kept(coarse, grid, 0, factor=64), exact)


def test_margin_does_not_count():
    mask = np.zeros((12, 12), bool)
    mask[4, 4] = True  # in the core of patch (1, 1) only, and in its neighbours' margins
    grid = pg.PatchGrid(mask.shape, size=4, edge="shift")
    assert np.flatnonzero(kept(mask, grid, 2)).tolist() == [grid.index((1, 1))]


@pytest.mark.parametrize("mask_shape", [(1, 10, 12), (3, 10, 12), (10, 12)],
                         ids=["channel-1", "channels", "no-channel"])  # fmt: skip
def test_untiled_axes_of_the_mask(mask_shape):
    full = sparse((3, 10, 12), 0.02, seed=5)
    mask = full.any(axis=0, keepdims=True) if mask_shape[0] == 1 else full
    mask = full.any(axis=0) if len(mask_shape) == 2 else mask
    grid = pg.PatchGrid((3, 10, 12), size=(4, 4), stride=3)
    expected = np.array([full[s].any() for s in grid])
    assert np.array_equal(kept(mask, grid, 0), expected)


def test_ten_percent_foreground_volume():
    volume = np.zeros((96, 96, 96), bool)
    rng = np.random.default_rng(6)
    volume[30:50, 20:70, 10:90] = rng.random((20, 50, 80)) < 0.9  # 0.09 of the volume
    grid = pg.PatchGrid(volume.shape, size=16, stride=8)
    got = kept(volume, grid, 0)
    expected = loop_kept(volume, grid)
    assert got.sum() == expected.sum() == 440


def test_lazy_mask_read_in_slabs_each_plane_once(monkeypatch):
    mask = Spy(sparse((40, 8, 8), 0.01, seed=7))
    monkeypatch.setattr(_mask, "SLAB_BYTES", 3 * 64)  # three planes of 64 bools
    grid = pg.PatchGrid(mask.shape, size=8, stride=4)
    assert np.array_equal(kept(mask, grid, 0), loop_kept(mask.array, grid))
    planes = [r for key in mask.reads for r in range(*key[0].indices(40))]
    assert all(len(range(*key[0].indices(40))) <= 3 for key in mask.reads)
    assert sorted(planes) == list(range(40))


def test_zarr_mask():
    zarr = pytest.importorskip("zarr")
    full = sparse((30, 20), 0.02, seed=8)
    store = zarr.create_array(store={}, shape=full.shape, chunks=(7, 20), dtype=bool)
    store[:] = full
    grid = pg.PatchGrid(full.shape, size=6, stride=5)
    assert np.array_equal(kept(store, grid, 0), loop_kept(full, grid))


def reference_patch(image, grid, margin, i):
    pad = [(m, m + after) for m, (_, after) in
           zip(margin, (grid.pad_width[a] for a in grid.axes))]  # fmt: skip
    padded = np.pad(image, pad)
    cut = [slice(s.start, s.stop + 2 * m) for s, m in zip(grid.slices(i), margin)]
    return padded[tuple(cut)]


def test_callable_sees_each_input_patch_once():
    image = np.random.default_rng(9).random((11, 13))
    grid = pg.PatchGrid(image.shape, size=4, stride=3, edge="pad")
    seen = []

    def bright(patch):
        seen.append(patch.copy())
        return patch.max() > 0.97

    got = kept(bright, grid, (1, 2), reader=Reader(image, grid, (1, 2), NUMPY))
    expected = [reference_patch(image, grid, (1, 2), i) for i in range(len(grid))]
    assert len(seen) == len(grid)
    assert all(np.array_equal(a, b) for a, b in zip(seen, expected))
    assert np.array_equal(got, [p.max() > 0.97 for p in expected])


def test_callable_needs_a_reader():
    grid = pg.PatchGrid((8, 8), size=4)
    with pytest.raises(ValueError, match=r"mask is a callable .* needs reader="):
        kept(lambda p: True, grid, 0)


def test_callable_reader_of_another_grid():
    grid = pg.PatchGrid((8, 8), size=4)
    reader = Reader(np.zeros((8, 8)), grid, (1, 1), NUMPY)
    with pytest.raises(ValueError, match=r"reader= reads .* margin"):
        kept(lambda p: True, grid, 0, reader=reader)


def test_callable_must_return_one_truth_value():
    grid = pg.PatchGrid((8, 8), size=4)
    reader = Reader(np.zeros((8, 8)), grid, (0, 0), NUMPY)
    with pytest.raises(ValueError, match=r"mask\(patch\) must return one truth value.*\(4, 4\)"):
        kept(lambda p: p > 0, grid, 0, reader=reader)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((10, 6), r"mask has 6 voxels along axis 1 where the image has 10: no integer factor"),
        ((11, 10), r"mask has 11 voxels along axis 0 where the image has 10"),
        ((10, 10, 10), r"mask has shape \(10, 10, 10\): give it one axis per image axis"),
        ((0, 10), r"mask has 0 voxels along axis 0"),
    ],
    ids=["no-factor", "longer", "ndim", "empty"],
)
def test_mask_shape_errors(shape, match):
    with pytest.raises(ValueError, match=match):
        kept(np.ones(shape, bool), pg.PatchGrid((10, 10), size=4), 0)


def test_untiled_axis_of_another_length():
    grid = pg.PatchGrid((3, 10, 10), size=(4, 4))
    with pytest.raises(ValueError, match=r"mask has shape \(2, 10, 10\) with 2 along axis 0"):
        kept(np.ones((2, 10, 10), bool), grid, 0)


def test_given_factor_that_does_not_fit():
    with pytest.raises(ValueError, match=r"factor 3 gives ceil\(10 / 3\) = 4"):
        kept(np.ones((5, 5), bool), pg.PatchGrid((10, 10), size=4), 0, factor=3)


def test_mask_of_strings():
    with pytest.raises(ValueError, match="mask must be boolean or numeric, got dtype <U1"):
        kept(np.full((8, 8), "a"), pg.PatchGrid((8, 8), size=4), 0)


def test_negative_margin():
    with pytest.raises(ValueError, match=r"margin must not be negative, got \(1, -1\)"):
        kept(np.ones((8, 8), bool), pg.PatchGrid((8, 8), size=4), (1, -1))


def loop_coarse(image, factor, threshold):
    shape = [-(-n // f) for n, f in zip(image.shape, factor)]
    out = np.zeros(shape, bool)
    for pos in np.ndindex(*shape):
        block = image[tuple(slice(p * f, (p + 1) * f) for p, f in zip(pos, factor))]
        out[pos] = bool((block > threshold).any())
    return out


@pytest.mark.parametrize("factor", [(2, 2, 2), (3, 4, 1), (5, 7, 3)],
                         ids=["divides", "does-not-divide", "large"])  # fmt: skip
def test_coarse_mask_is_the_maximum_over_blocks(factor):
    image = np.random.default_rng(10).random((13, 14, 9)).astype(np.float32)
    assert np.array_equal(coarse_mask(image, factor, 0.9), loop_coarse(image, factor, 0.9))


def test_coarse_mask_finds_a_thin_plane():
    image = np.zeros((8, 8))
    image[3] = 1.0  # a strided sample, image[::2], never sees it
    assert coarse_mask(image, 2, 0.5)[1].all()
    assert not (image[::2, ::2] > 0.5).any()


def test_coarse_mask_nan_is_background():
    image = np.full((4, 4), np.nan)
    image[3, 3] = 2.0
    assert np.flatnonzero(coarse_mask(image, 2)).tolist() == [3]


def test_coarse_mask_of_zarr_reads_slabs(monkeypatch):
    zarr = pytest.importorskip("zarr")
    data = np.random.default_rng(11).random((23, 10, 12)).astype(np.float32)
    store = zarr.create_array(store={}, shape=data.shape, chunks=(4, 10, 12), dtype=np.float32)
    store[:] = data
    image = Spy(store)
    monkeypatch.setattr(_mask, "SLAB_BYTES", 2 * 3 * 10 * 12 * 4)  # two blocks of 3 planes
    got = coarse_mask(image, (3, 4, 5), 0.95)
    assert np.array_equal(got, loop_coarse(data, (3, 4, 5), 0.95))
    lengths = [len(range(*key.indices(23))) for key in image.reads]
    assert all(isinstance(key, slice) for key in image.reads)
    assert max(lengths) == 6
    assert sum(lengths) == 23


def test_coarse_mask_of_an_opened_file(tmp_path):
    data = np.random.default_rng(12).random((9, 10)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    image = pg.open(tmp_path / "x.npy")
    assert np.array_equal(coarse_mask(image, 4, 0.9), loop_coarse(data, (4, 4), 0.9))


def test_coarse_mask_then_kept():
    image = np.zeros((40, 40), np.float32)
    image[17, 23] = 1.0
    grid = pg.PatchGrid(image.shape, size=8, stride=8)
    assert np.array_equal(kept(coarse_mask(image, 4), grid, 0), loop_kept(image, grid))


def test_coarse_mask_factor_per_axis_error():
    with pytest.raises(ValueError, match="factor has 2 entries but 3 axes"):
        coarse_mask(np.zeros((4, 4, 4)), (2, 2))


def test_coarse_mask_factor_zero():
    with pytest.raises(ValueError, match=r"factor must be positive integers, got \(0, 0\)"):
        coarse_mask(np.zeros((4, 4)), 0)


@st.composite
def cases(draw):
    k = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 14)) for _ in range(k))
    size = tuple(draw(st.integers(1, 6)) for _ in range(k))
    stride = tuple(draw(st.integers(1, 6)) for _ in range(k))
    factor = tuple(draw(st.integers(1, 5)) for _ in range(k))
    edge = draw(st.sampled_from(["shift", "pad", "even"]))
    seed = draw(st.integers(0, 2**16))
    return shape, size, stride, factor, edge, seed


def fitting(n, m):
    return [f for f in range(1, n + 1) if -(-n // f) == m]


@settings(max_examples=150, deadline=None)
@given(cases())
def test_property_against_the_loop(case):
    shape, size, stride, factor, edge, seed = case
    grid = pg.PatchGrid(shape, size=size, stride=stride, edge=edge, axes=tuple(range(len(shape))))
    full = sparse(shape, 0.08, seed=seed)
    assert np.array_equal(kept(full, grid, 0), loop_kept(full, grid))
    coarse = loop_coarse(full, factor, 0)
    assert np.array_equal(kept(coarse, grid, 0, factor=factor), loop_kept(coarse, grid, factor))
    # Inferred: any factor that fits may be the true one; every one of them is kept.
    inferred = kept(coarse, grid, 0)
    for j, (n, m) in enumerate(zip(shape, coarse.shape)):
        for f in fitting(n, m):
            other = list(factor)
            other[j] = f
            if all(-(-nn // ff) == mm for nn, ff, mm in zip(shape, other, coarse.shape)):
                assert not (loop_kept(coarse, grid, other) & ~inferred).any()
    # A full-resolution foreground never lost through the coarse mask of its blocks.
    assert not (loop_kept(full, grid) & ~kept(coarse, grid, 0)).any()
    assert math.prod(grid.counts) == len(inferred)
