"""apply: sliding-window inference against full-image computations of local models.

Every model here is local (identity, pointwise, a box filter, nearest upsampling, block means,
per-voxel class scores), so running it over patches and blending must give what running it
over the whole (padded) image gives. The references are computed on the whole image with
plain NumPy; nothing in them calls patchgrid.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import patchgrid as pg
from reference import Layout, axis_starts

EDGES = ["shift", "even", "pad"]
WINDOWS = ["uniform", "gaussian", "hann", "triangular"]

# An image with a channel axis in front and two tiled axes: 13 and 11 are not reached by
# size 5 and stride 3, so every edge policy has work to do.
SHAPE = (2, 13, 11)
AXES = (1, 2)
SIZE, STRIDE = 5, 3


def _image(shape=SHAPE, seed=0):
    return np.random.default_rng(seed).random(shape)


def _n_patches(shape=SHAPE, size=SIZE, stride=STRIDE, edge="shift", axes=AXES):
    n = 1
    for a in axes:
        n *= len(axis_starts(shape[a], size, stride, edge)[0])
    return n


def _box_valid(a, k=(3, 3)):
    """Mean over a k[0] x k[1] box on the last two axes, only where the box fits ('valid')."""
    h, w = a.shape[-2:]
    kh, kw = k
    total = sum(
        a[..., i : h - kh + 1 + i, j : w - kw + 1 + j] for i in range(kh) for j in range(kw)
    )
    return total / (kh * kw)


def _box_same(a):
    """A 3 x 3 box filter that keeps the input's size (zeros outside), as a 'same' conv does."""
    width = [(0, 0)] * (a.ndim - 2) + [(1, 1), (1, 1)]
    return _box_valid(np.pad(a, width))


def _pad_last2(a, m, mode):
    """The image padded by m = (m0, m1) voxels on each side of its last two axes."""
    width = [(0, 0)] * (a.ndim - 2) + [(m[0], m[0]), (m[1], m[1])]
    return np.pad(a, width, mode=mode)


def _up2(a):
    """Nearest-neighbour upsampling x2 on the last two axes."""
    return np.repeat(np.repeat(a, 2, axis=-2), 2, axis=-1)


def _block_mean4(a):
    """Mean over 4 x 4 blocks on the last two axes."""
    *lead, h, w = a.shape
    return a.reshape(*lead, h // 4, 4, w // 4, 4).mean(axis=(-3, -1))


CENTRES = (0.2, 0.5, 0.8)


def _scores(a, axis):
    """Per-voxel class scores (nearest centre wins), stacked along ``axis``."""
    return np.concatenate([-((a - c) ** 2) for c in CENTRES], axis=axis)


class _Recorder:
    """A model that records the batches it is given and returns ``model(batch)``."""

    def __init__(self, model=lambda b: b):
        self.model = model
        self.batches = []

    def __call__(self, batch):
        self.batches.append(np.array(batch))
        return self.model(batch)


class _Lazy:
    """An array that only has shape, dtype and __getitem__, and records what is read."""

    def __init__(self, array):
        self._array = array
        self.reads = []

    @property
    def shape(self):
        return self._array.shape

    @property
    def dtype(self):
        return self._array.dtype

    def __getitem__(self, key):
        self.reads.append(key)
        return self._array[key]


def _extents(key, shape):
    """Length of the region a basic-slicing key reads along every axis."""
    key = key if isinstance(key, tuple) else (key,)
    key = key + (slice(None),) * (len(shape) - len(key))
    return tuple(len(range(*k.indices(n))) for k, n in zip(key, shape))


# 1. identity, pointwise and channel-changing models; batches


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("edge", EDGES)
def test_identity_gives_the_image(edge, window):
    image = _image()
    result = pg.apply(
        lambda b: b, image, SIZE, STRIDE, axes=AXES, edge=edge, window=window, batch_size=4,
        progress=False,
    )  # fmt: skip
    np.testing.assert_allclose(result, image, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("edge", EDGES)
def test_pointwise_model_gives_the_function_of_the_image(edge, window):
    image = _image()
    result = pg.apply(
        lambda b: np.tanh(3 * b) - b**2, image, SIZE, STRIDE, axes=AXES, edge=edge,
        window=window, batch_size=3, progress=False,
    )  # fmt: skip
    np.testing.assert_allclose(result, np.tanh(3 * image) - image**2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("edge", EDGES)
def test_identity_on_a_3d_volume_with_all_axes_tiled(edge):
    image = _image((9, 10, 7))
    result = pg.apply(lambda b: b, image, (4, 5, 3), (3, 3, 2), edge=edge, progress=False)
    np.testing.assert_allclose(result, image, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("edge", EDGES)
def test_image_smaller_than_the_patch(edge):
    image = _image((2, 3, 4))
    result = pg.apply(lambda b: 2 * b, image, 6, axes=AXES, edge=edge, progress=False)
    np.testing.assert_allclose(result, 2 * image, rtol=1e-12)


def test_one_channel_to_three_classes_has_the_class_shape():
    image = _image((1, 13, 11))
    result = pg.apply(
        lambda b: np.concatenate([b, 2 * b, b**2], axis=1), image, SIZE, STRIDE, axes=AXES,
        progress=False,
    )  # fmt: skip
    assert result.shape == (3, 13, 11)


@pytest.mark.parametrize("window", WINDOWS)
def test_one_channel_to_three_classes_has_the_class_values(window):
    image = _image((1, 13, 11))
    result = pg.apply(
        lambda b: np.concatenate([b, 2 * b, b**2], axis=1), image, SIZE, STRIDE, axes=AXES,
        window=window, progress=False,
    )  # fmt: skip
    expected = np.concatenate([image, 2 * image, image**2], axis=0)
    np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch_size", [1, 4, 5, 100], ids=lambda b: f"batch{b}")
def test_batches_are_shaped_batch_by_patch(batch_size):
    fn = _Recorder()
    pg.apply(fn, _image(), SIZE, STRIDE, axes=AXES, batch_size=batch_size, progress=False)
    shapes = {b.shape[1:] for b in fn.batches}
    assert shapes == {(2, SIZE, SIZE)}


@pytest.mark.parametrize("batch_size", [1, 4, 5, 100], ids=lambda b: f"batch{b}")
def test_batches_hold_at_most_batch_size_and_only_the_last_is_short(batch_size):
    n = _n_patches()
    fn = _Recorder()
    pg.apply(fn, _image(), SIZE, STRIDE, axes=AXES, batch_size=batch_size, progress=False)
    full, last = divmod(n, batch_size)
    expected = [batch_size] * full + ([last] if last else [])
    assert [len(b) for b in fn.batches] == expected


@pytest.mark.parametrize("edge", EDGES)
def test_batches_hold_the_image_patches_in_grid_order(edge):
    image = _image()
    fn = _Recorder()
    pg.apply(fn, image, SIZE, STRIDE, axes=AXES, edge=edge, batch_size=5, progress=False)
    layout = Layout(SHAPE, AXES, (SIZE, SIZE), (STRIDE, STRIDE), (edge, edge))
    expected = layout.extract(image).reshape(-1, 2, SIZE, SIZE)
    np.testing.assert_array_equal(np.concatenate(fn.batches), expected)


def test_pad_batch_makes_every_batch_full():
    fn = _Recorder()
    pg.apply(fn, _image(), SIZE, STRIDE, axes=AXES, batch_size=5, pad_batch=True,
             progress=False)  # fmt: skip
    assert _n_patches() % 5 != 0
    assert [len(b) for b in fn.batches] == [5] * -(-_n_patches() // 5)


@pytest.mark.parametrize("window", ["uniform", "gaussian"])
def test_pad_batch_result_is_still_correct(window):
    image = _image()
    result = pg.apply(
        lambda b: 3 * b + 1, image, SIZE, STRIDE, axes=AXES, window=window, batch_size=5,
        pad_batch=True, progress=False,
    )  # fmt: skip
    np.testing.assert_allclose(result, 3 * image + 1, rtol=1e-12)


def test_result_is_an_ndarray_for_an_ndarray():
    result = pg.apply(lambda b: b, _image(), SIZE, STRIDE, axes=AXES, progress=False)
    assert type(result) is np.ndarray


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_result_keeps_a_float_image_dtype(dtype):
    image = _image().astype(dtype)
    result = pg.apply(lambda b: b, image, SIZE, STRIDE, axes=AXES, progress=False)
    assert result.dtype == np.dtype(dtype)


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    shape=st.tuples(st.integers(1, 14), st.integers(1, 14)),
    edge=st.sampled_from(EDGES),
    window=st.sampled_from(WINDOWS),
    batch_size=st.integers(1, 7),
)
def test_identity_round_trip_property(data, shape, edge, window, batch_size):
    size = data.draw(st.tuples(st.integers(1, 6), st.integers(1, 6)), label="size")
    stride = tuple(data.draw(st.integers(1, p), label="stride") for p in size)
    image = _image(shape)
    result = pg.apply(lambda b: b, image, size, stride, edge=edge, window=window,
                      batch_size=batch_size, progress=False)  # fmt: skip
    np.testing.assert_allclose(result, image, rtol=1e-12, atol=1e-12)


# 2. margin: models that return only the core of each patch


@pytest.mark.parametrize("pad_mode", ["reflect", "edge", "constant", "symmetric", "wrap"])
def test_valid_box_filter_with_margin_equals_the_filtered_padded_image(pad_mode):
    image = _image()
    result = pg.apply(_box_valid, image, 6, axes=AXES, margin=1, pad_mode=pad_mode,
                      progress=False)  # fmt: skip
    expected = _box_valid(_pad_last2(image, (1, 1), pad_mode))
    np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pad_mode", ["reflect", "edge", "constant", "symmetric", "wrap"])
def test_same_size_box_filter_with_margin_keeps_only_the_core(pad_mode):
    image = _image()
    result = pg.apply(_box_same, image, 6, axes=AXES, margin=1, pad_mode=pad_mode,
                      progress=False)  # fmt: skip
    expected = _box_valid(_pad_last2(image, (1, 1), pad_mode))
    np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("edge", EDGES)
def test_margin_with_overlapping_cores(edge, window):
    image = _image()
    result = pg.apply(_box_valid, image, 7, 3, axes=AXES, margin=1, pad_mode="edge", edge=edge,
                      window=window, progress=False)  # fmt: skip
    expected = _box_valid(_pad_last2(image, (1, 1), "edge"))
    np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-12)


def test_margin_per_axis():
    image = _image()
    result = pg.apply(lambda b: _box_valid(b, (3, 5)), image, (6, 8), axes=AXES, margin=(1, 2),
                      pad_mode="reflect", progress=False)  # fmt: skip
    expected = _box_valid(_pad_last2(image, (1, 2), "reflect"), (3, 5))
    np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-12)


def test_margin_batches_hold_core_plus_margin():
    fn = _Recorder(_box_valid)
    pg.apply(fn, _image(), 6, axes=AXES, margin=1, pad_mode="edge", progress=False)
    assert {b.shape[1:] for b in fn.batches} == {(2, 6, 6)}


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    core=st.integers(1, 5),
    pad_mode=st.sampled_from(["reflect", "edge", "symmetric", "wrap"]),
    edge=st.sampled_from(EDGES),
)
def test_margin_box_filter_property(shape, core, pad_mode, edge):
    # "constant" has its own parametrized tests above; here it would only repeat them.
    image = _image(shape)
    result = pg.apply(_box_valid, image, core + 2, axes=(0, 1), margin=1, pad_mode=pad_mode,
                      edge=edge, progress=False)  # fmt: skip
    expected = _box_valid(_pad_last2(image, (1, 1), pad_mode))
    np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("size", "margin"),
    [(2, 1), (4, 2), (5, 3), ((6, 3), (1, 2))],
    ids=["2-margin1", "4-margin2", "5-margin3", "one-axis-without-core"],
)
def test_margin_leaving_no_core_raises(size, margin):
    with pytest.raises(ValueError, match="margin"):
        pg.apply(lambda b: b, _image(), size, axes=AXES, margin=margin)


def test_negative_margin_raises():
    with pytest.raises(ValueError, match="margin"):
        pg.apply(lambda b: b, _image(), 5, axes=AXES, margin=-1)


# 3. scale: models whose output patch is larger or smaller


@pytest.mark.parametrize("window", ["uniform", "gaussian"])
@pytest.mark.parametrize("edge", EDGES)
def test_nearest_upsampling_x2_equals_repeat(edge, window):
    image = _image()
    result = pg.apply(_up2, image, SIZE, STRIDE, axes=AXES, edge=edge, window=window, scale=2,
                      progress=False)  # fmt: skip
    np.testing.assert_allclose(result, _up2(image), rtol=1e-12, atol=1e-12)


def test_upsampling_per_axis_scale():
    image = _image()
    result = pg.apply(
        lambda b: np.repeat(np.repeat(b, 2, axis=-2), 3, axis=-1), image, SIZE, STRIDE,
        axes=AXES, scale=(2, 3), progress=False,
    )  # fmt: skip
    expected = np.repeat(np.repeat(image, 2, axis=-2), 3, axis=-1)
    np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", ["uniform", "gaussian"])
@pytest.mark.parametrize("scale", [0.25, (0.25, 0.25)], ids=["float", "per-axis"])
def test_block_mean_quarter_equals_block_mean(scale, window):
    image = _image((2, 16, 12))
    result = pg.apply(_block_mean4, image, 8, 4, axes=AXES, scale=scale, window=window,
                      progress=False)  # fmt: skip
    np.testing.assert_allclose(result, _block_mean4(image), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("shape", "size", "stride"),
    [((2, 16, 16), 6, 4), ((2, 18, 16), 8, 4), ((2, 16, 16), 8, 2)],
    ids=["patch-size", "image-length", "stride"],
)
def test_scale_giving_a_fraction_of_a_voxel_raises(shape, size, stride):
    with pytest.raises(ValueError, match="scale"):
        pg.apply(_block_mean4, _image(shape), size, stride, axes=AXES, scale=0.25)


@pytest.mark.parametrize("whole", [False, True], ids=["core-only", "whole-patch"])
def test_margin_and_scale_together(whole):
    image = _image()
    model = (lambda b: _up2(_box_same(b))) if whole else (lambda b: _up2(_box_valid(b)))
    result = pg.apply(model, image, 6, 3, axes=AXES, margin=1, scale=2, pad_mode="edge",
                      progress=False)  # fmt: skip
    expected = _up2(_box_valid(_pad_last2(image, (1, 1), "edge")))
    np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-12)


# 4. reductions, dtypes and out=


@pytest.mark.parametrize("window", ["uniform", "gaussian", "hann"])
@pytest.mark.parametrize("edge", EDGES)
def test_argmax_equals_argmax_of_the_full_scores(edge, window):
    image = _image((1, 13, 11))
    labels = pg.apply(lambda b: _scores(b, 1), image, SIZE, STRIDE, axes=AXES, edge=edge,
                      window=window, reduce="argmax", progress=False)  # fmt: skip
    expected = np.argmax(_scores(image, 0), axis=0)
    assert set(np.unique(expected)) == {0, 1, 2}
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize(
    ("shape", "axes", "class_axis"),
    [((13, 11, 1), (0, 1), 2), ((13, 1, 11), (0, 2), 1)],
    ids=["channels-last", "channels-between"],
)
def test_argmax_with_the_class_axis_elsewhere(shape, axes, class_axis):
    image = _image(shape)
    labels = pg.apply(lambda b: _scores(b, class_axis + 1), image, SIZE, STRIDE, axes=axes,
                      reduce="argmax", progress=False)  # fmt: skip
    np.testing.assert_array_equal(labels, np.argmax(_scores(image, class_axis), axis=class_axis))


def test_argmax_of_a_valid_model_with_margin():
    image = _image((1, 13, 11))
    labels = pg.apply(lambda b: _scores(_box_valid(b), 1), image, 6, 3, axes=AXES, margin=1,
                      pad_mode="reflect", reduce="argmax", progress=False)  # fmt: skip
    scores = _scores(_box_valid(_pad_last2(image, (1, 1), "reflect")), 0)
    np.testing.assert_array_equal(labels, np.argmax(scores, axis=0))


def test_argmax_drops_the_class_axis():
    image = _image((1, 13, 11))
    labels = pg.apply(lambda b: _scores(b, 1), image, SIZE, STRIDE, axes=AXES, reduce="argmax",
                      progress=False)  # fmt: skip
    assert labels.shape == (13, 11)


@pytest.mark.parametrize(
    ("n_classes", "dtype"),
    [(2, np.uint8), (3, np.uint8), (256, np.uint8), (257, np.uint16)],
    ids=["2", "3", "256", "257"],
)
def test_argmax_labels_take_the_smallest_unsigned_dtype(n_classes, dtype):
    image = _image((1, 6, 5))
    labels = pg.apply(
        lambda b: np.concatenate([b * (i + 1) for i in range(n_classes)], axis=1), image, 4, 2,
        axes=AXES, reduce="argmax", progress=False,
    )  # fmt: skip
    assert labels.dtype == dtype


def test_argmax_with_many_classes_picks_the_largest():
    image = _image((1, 6, 5)) + 0.5
    labels = pg.apply(
        lambda b: np.concatenate([b * (i + 1) for i in range(257)], axis=1), image, 4, 2,
        axes=AXES, reduce="argmax", progress=False,
    )  # fmt: skip
    np.testing.assert_array_equal(labels, np.full((6, 5), 256))


def test_argmax_into_a_memmap_is_written_there_and_returned(tmp_path):
    image = _image((1, 13, 11))
    out = np.lib.format.open_memmap(tmp_path / "labels.npy", mode="w+", dtype=np.uint8,
                                    shape=(13, 11))  # fmt: skip
    result = pg.apply(lambda b: _scores(b, 1), image, SIZE, STRIDE, axes=AXES, reduce="argmax",
                      out=out, progress=False)  # fmt: skip
    assert result is out


def test_argmax_into_a_memmap_holds_the_labels_on_disk(tmp_path):
    image = _image((1, 13, 11))
    path = tmp_path / "labels.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(13, 11))
    pg.apply(lambda b: _scores(b, 1), image, SIZE, STRIDE, axes=AXES, reduce="argmax", out=out,
             progress=False)  # fmt: skip
    out.flush()
    np.testing.assert_array_equal(np.load(path), np.argmax(_scores(image, 0), axis=0))


def test_mean_into_a_memmap_is_written_there_and_returned(tmp_path):
    image = _image()
    out = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float64,
                                    shape=image.shape)  # fmt: skip
    result = pg.apply(lambda b: 2 * b, image, SIZE, STRIDE, axes=AXES, out=out, progress=False)
    assert result is out


def test_mean_into_a_memmap_holds_the_result_on_disk(tmp_path):
    image = _image()
    path = tmp_path / "x.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=image.shape)
    pg.apply(lambda b: 2 * b, image, SIZE, STRIDE, axes=AXES, window="hann", out=out,
             progress=False)  # fmt: skip
    out.flush()
    np.testing.assert_allclose(np.load(path), 2 * image, rtol=1e-12)


def test_out_dtype_is_used_for_the_result(tmp_path):
    image = _image()
    out = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32,
                                    shape=image.shape)  # fmt: skip
    pg.apply(lambda b: b, image, SIZE, STRIDE, axes=AXES, out=out, progress=False)
    np.testing.assert_allclose(out, image.astype(np.float32), rtol=1e-6)


def test_out_of_the_wrong_shape_raises():
    out = np.empty((2, 13, 10))
    with pytest.raises(ValueError, match="out must have shape"):
        pg.apply(lambda b: b, _image(), SIZE, STRIDE, axes=AXES, out=out, progress=False)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
def test_dtype_casts_the_mean(dtype):
    image = _image()
    result = pg.apply(lambda b: b, image, SIZE, STRIDE, axes=AXES, dtype=dtype, progress=False)
    assert result.dtype == dtype


def test_dtype_cast_keeps_the_values():
    image = _image()
    result = pg.apply(lambda b: b, image, SIZE, STRIDE, axes=AXES, dtype=np.float32,
                      progress=False)  # fmt: skip
    np.testing.assert_allclose(result, image, rtol=1e-6)


def test_dtype_casts_argmax_labels():
    image = _image((1, 13, 11))
    labels = pg.apply(lambda b: _scores(b, 1), image, SIZE, STRIDE, axes=AXES, reduce="argmax",
                      dtype=np.int32, progress=False)  # fmt: skip
    assert labels.dtype == np.int32


@pytest.mark.parametrize("reduce", ["max", "min"])
def test_max_and_min_of_a_pointwise_model(reduce):
    image = _image()
    result = pg.apply(lambda b: b + 1, image, SIZE, STRIDE, axes=AXES, reduce=reduce,
                      window=None, progress=False)  # fmt: skip
    np.testing.assert_array_equal(result, image + 1)


# 5. streaming: the Merger holds about one patch row and writes finished rows at once

TALL = (40, 9)
T_SIZE, T_STRIDE = 4, 3


def _tall_grid():
    return pg.PatchGrid(TALL, T_SIZE, T_STRIDE, edge="shift")


def _row_batches(grid):
    """Patch numbers, one patch row (along the first axis) at a time, in grid order."""
    per_row = len(grid) // grid.counts[0]
    return [np.arange(r * per_row, (r + 1) * per_row) for r in range(grid.counts[0])]


def _fixed_batches(grid, n):
    return [np.arange(i, min(i + n, len(grid))) for i in range(0, len(grid), n)]


def _patches(image, grid):
    layout = Layout(grid.shape, grid.axes, grid.size, grid.stride, grid.edge)
    return layout.extract(image).reshape(len(grid), *grid.patch_shape)


def _leading_written_rows(out):
    written = ~np.isnan(out).any(axis=1)
    return len(written) if written.all() else int(np.argmin(written))


@pytest.mark.parametrize("batching", ["rows", "batches-of-4", "batches-of-1"])
def test_merger_accumulator_stays_one_patch_thick(batching):
    grid = _tall_grid()
    patches = _patches(_image(TALL), grid)
    batches = {"rows": _row_batches(grid), "batches-of-4": _fixed_batches(grid, 4),
               "batches-of-1": _fixed_batches(grid, 1)}[batching]  # fmt: skip
    # A float32 output from float64 patches needs a cast, so the Merger cannot accumulate
    # straight into the output: it keeps a separate accumulator, which must stay thin.
    merger = pg.Merger(grid, window="hann", dtype=np.float32)
    thickness = []
    for ids in batches:
        merger.add(patches[ids], ids)
        thickness.append(0 if merger.accumulator is None else merger.accumulator.shape[0])
    assert max(thickness) <= T_SIZE  # one patch: a batch reaching into the next row goes row by row


def test_merger_accumulates_straight_into_the_output_when_nothing_needs_casting():
    grid = _tall_grid()
    image = _image(TALL).astype(np.float32)
    patches = _patches(image, grid)
    out = np.full(TALL, np.nan)  # float64: float32 patches' own accumulator dtype
    merger = pg.Merger(grid, window="hann", out=out)
    for ids in _row_batches(grid):
        merger.add(patches[ids], ids)
        assert merger.accumulator is out
    assert merger.result() is out
    np.testing.assert_allclose(out, image)


def test_merger_writes_finished_rows_to_out_as_soon_as_they_are_done():
    grid = _tall_grid()
    patches = _patches(_image(TALL), grid)
    out = np.full(TALL, np.nan, dtype=np.float32)  # a cast: the Merger must write rows out
    merger = pg.Merger(grid, window="hann", out=out)
    written = []
    for ids in _row_batches(grid):
        merger.add(patches[ids], ids)
        written.append(_leading_written_rows(out))
    starts = axis_starts(TALL[0], T_SIZE, T_STRIDE, "shift")[0]
    assert written == [*starts[1:], TALL[0]]


def test_merger_rows_written_early_hold_their_final_values():
    grid = _tall_grid()
    image = _image(TALL)
    patches = _patches(image, grid)
    out = np.full(TALL, np.nan, dtype=np.float32)  # a cast: the Merger must write rows out
    merger = pg.Merger(grid, window="gaussian", out=out)
    first, second = _row_batches(grid)[:2]
    merger.add(patches[first], first)
    merger.add(patches[second], second)
    np.testing.assert_allclose(out[: 2 * T_STRIDE], image[: 2 * T_STRIDE], rtol=1e-6)


def test_merger_streaming_result_equals_the_image():
    grid = _tall_grid()
    image = _image(TALL)
    patches = _patches(image, grid)
    out = np.full(TALL, np.nan)
    merger = pg.Merger(grid, window="gaussian", out=out)
    for ids in _fixed_batches(grid, 5):
        merger.add(patches[ids], ids)
    assert merger.result() is out
    np.testing.assert_allclose(out, image, rtol=1e-12)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("seed", [0, 1, 2], ids=lambda s: f"seed{s}")
def test_merger_in_random_order_gives_the_image(seed, window):
    grid = _tall_grid()
    image = _image(TALL)
    patches = _patches(image, grid)
    order = np.random.default_rng(seed).permutation(len(grid))
    merger = pg.Merger(grid, window=window)
    for ids in np.array_split(order, 7):
        merger.add(patches[ids], ids)
    np.testing.assert_allclose(merger.result(), image, rtol=1e-12)


def test_merger_in_random_order_into_out_gives_the_image():
    grid = _tall_grid()
    image = _image(TALL)
    patches = _patches(image, grid)
    order = np.random.default_rng(3).permutation(len(grid))
    out = np.full(TALL, np.nan)
    merger = pg.Merger(grid, window="hann", out=out)
    for ids in np.array_split(order, 6):
        merger.add(patches[ids], ids)
    merger.result()
    np.testing.assert_allclose(out, image, rtol=1e-12)


def test_apply_writes_finished_rows_before_fn_sees_later_rows():
    image = _image(TALL)
    out = np.full(TALL, np.nan, dtype=np.float32)  # a cast: the Merger must write rows out
    per_row = len(axis_starts(TALL[1], T_SIZE, T_STRIDE, "shift")[0])
    written = []

    def fn(batch):
        written.append(_leading_written_rows(out))
        return batch

    pg.apply(fn, image, T_SIZE, T_STRIDE, batch_size=per_row, out=out, progress=False)
    starts = axis_starts(TALL[0], T_SIZE, T_STRIDE, "shift")[0]
    assert written == starts


# 6. progress


def test_progress_false_prints_nothing(capsys):
    pg.apply(lambda b: b, _image(), SIZE, STRIDE, axes=AXES, progress=False)
    assert capsys.readouterr().err == ""


def test_progress_default_is_silent_when_stderr_is_not_a_terminal(capsys):
    pg.apply(lambda b: b, _image(), SIZE, STRIDE, axes=AXES)
    assert capsys.readouterr().err == ""


def test_progress_callable_gets_done_and_total():
    calls = []
    n = _n_patches()
    pg.apply(lambda b: b, _image(), SIZE, STRIDE, axes=AXES, batch_size=5,
             progress=lambda done, total: calls.append((done, total)))  # fmt: skip
    expected = [(min(d, n), n) for d in range(5, n + 5, 5)]
    assert calls == expected


def test_progress_callable_prints_nothing(capsys):
    pg.apply(lambda b: b, _image(), SIZE, STRIDE, axes=AXES, progress=lambda d, t: None)
    assert capsys.readouterr().err == ""


def test_progress_true_shows_a_bar(capsys):
    pg.apply(lambda b: b, _image(), SIZE, STRIDE, axes=AXES, progress=True)
    assert f"/{_n_patches()}" in capsys.readouterr().err


# 7. a model that returns the wrong thing fails on its first batch


def _counted(model):
    def fn(batch):
        fn.calls += 1
        return model(batch)

    fn.calls = 0
    return fn


BAD_MODELS = [
    (lambda b: b[:-1], "returned shape"),
    (lambda b: np.concatenate([b, b[:1]]), "returned shape"),
    (lambda b: b[:, :, :-1], "returned shape"),
    (lambda b: b[:, :, :, 1:], "returned shape"),
    (lambda b: b[..., None], "returned shape"),
    (lambda b: b[:, 0], "returned shape"),
    (lambda b: list(b), "must return"),
    (lambda b: None, "must return"),
    (lambda b: 1.5, "must return"),
]
BAD_IDS = ["fewer-patches", "more-patches", "short-axis-1", "short-axis-2", "extra-axis",
           "missing-axis", "list", "none", "scalar"]  # fmt: skip


@pytest.mark.parametrize(("model", "match"), BAD_MODELS, ids=BAD_IDS)
def test_wrong_output_raises(model, match):
    with pytest.raises(ValueError, match=match):
        pg.apply(_counted(model), _image(), SIZE, STRIDE, axes=AXES, batch_size=4,
                 progress=False)  # fmt: skip


@pytest.mark.parametrize(("model", "match"), BAD_MODELS, ids=BAD_IDS)
def test_wrong_output_raises_on_the_first_batch(model, match):
    fn = _counted(model)
    with pytest.raises(ValueError, match=match):
        pg.apply(fn, _image(), SIZE, STRIDE, axes=AXES, batch_size=4, progress=False)
    assert fn.calls == 1


def test_wrong_output_with_margin_names_the_whole_patch():
    with pytest.raises(ValueError, match="whole patch"):
        pg.apply(lambda b: b[:, :, 1:, 1:], _image(), 6, axes=AXES, margin=1, pad_mode="edge",
                 progress=False)  # fmt: skip


def test_fn_not_callable_raises():
    with pytest.raises(TypeError, match="fn must be callable"):
        pg.apply(None, _image(), SIZE, STRIDE, axes=AXES)


@pytest.mark.parametrize("batch_size", [0, -2], ids=["zero", "negative"])
def test_batch_size_below_one_raises(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        pg.apply(lambda b: b, _image(), SIZE, STRIDE, axes=AXES, batch_size=batch_size)


# 8. lazy inputs are read region by region


def test_memmap_image_gives_the_right_result(tmp_path):
    image = _image()
    np.save(tmp_path / "image.npy", image)
    lazy = np.load(tmp_path / "image.npy", mmap_mode="r")
    result = pg.apply(lambda b: 2 * b, lazy, SIZE, STRIDE, axes=AXES, window="gaussian",
                      progress=False)  # fmt: skip
    np.testing.assert_allclose(result, 2 * image, rtol=1e-12)


def test_memmap_image_gives_an_ndarray(tmp_path):
    np.save(tmp_path / "image.npy", _image())
    lazy = np.load(tmp_path / "image.npy", mmap_mode="r")
    result = pg.apply(lambda b: 2 * b, lazy, SIZE, STRIDE, axes=AXES, progress=False)
    assert isinstance(result, np.ndarray)


LAZY_CASES = [
    dict(edge="shift"),
    dict(edge="even"),
    dict(edge="pad", pad_mode="constant"),
    dict(edge="pad", pad_mode="reflect"),
    dict(edge="pad", pad_mode="edge"),
    dict(edge="pad", pad_mode="wrap"),
]
LAZY_IDS = ["shift", "even", "pad-constant", "pad-reflect", "pad-edge", "pad-wrap"]


@pytest.mark.parametrize("kwargs", LAZY_CASES, ids=LAZY_IDS)
def test_lazy_image_gives_the_right_result(kwargs):
    image = _image()
    result = pg.apply(lambda b: 2 * b, _Lazy(image), SIZE, STRIDE, axes=AXES, progress=False,
                      **kwargs)  # fmt: skip
    np.testing.assert_allclose(result, 2 * image, rtol=1e-12)


@pytest.mark.parametrize("kwargs", LAZY_CASES, ids=LAZY_IDS)
def test_lazy_image_is_read_one_batch_stretch_at_a_time(kwargs):
    # A batch's patches along one row of the grid come in one read, no longer than they reach.
    lazy = _Lazy(_image())
    pg.apply(lambda b: b, lazy, SIZE, STRIDE, axes=AXES, batch_size=2, progress=False, **kwargs)
    extents = {_extents(k, SHAPE) for k in lazy.reads}
    assert lazy.reads
    assert all(e[1] <= SIZE and e[2] <= SIZE + STRIDE for e in extents)
    assert max(np.prod(e) for e in extents) < np.prod(SHAPE)


@pytest.mark.parametrize("pad_mode", ["reflect", "edge", "constant", "symmetric", "wrap"])
def test_lazy_image_with_margin_gives_the_filtered_padded_image(pad_mode):
    image = _image()
    lazy = _Lazy(image)
    result = pg.apply(_box_valid, lazy, 6, axes=AXES, margin=1, pad_mode=pad_mode,
                      progress=False)  # fmt: skip
    expected = _box_valid(_pad_last2(image, (1, 1), pad_mode))
    np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pad_mode", ["reflect", "edge", "constant", "symmetric", "wrap"])
def test_lazy_image_with_margin_is_never_read_whole(pad_mode):
    lazy = _Lazy(_image())
    pg.apply(_box_valid, lazy, 6, axes=AXES, margin=1, pad_mode=pad_mode, progress=False)
    sizes = [np.prod(_extents(k, SHAPE)) for k in lazy.reads]
    assert lazy.reads
    assert max(sizes) < np.prod(SHAPE)


def test_lazy_image_with_a_whole_image_pad_mode_raises():
    with pytest.raises(ValueError, match="pad_mode"):
        pg.apply(lambda b: b, _Lazy(_image()), SIZE, STRIDE, axes=AXES, edge="pad",
                 pad_mode="mean", progress=False)  # fmt: skip


def test_whole_image_pad_mode_works_for_an_ndarray():
    image = _image()
    result = pg.apply(_box_valid, image, 6, axes=AXES, margin=1, pad_mode="mean",
                      progress=False)  # fmt: skip
    expected = _box_valid(_pad_last2(image, (1, 1), "mean"))
    np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", ["gaussian", "hann", "uniform"])
def test_weighted_add_is_the_same_with_and_without_torch_loaded(monkeypatch, window):
    # NumPy images use torch's fused multiply-add (and in-place add) when the caller has
    # imported torch; the pure NumPy path must give the same result.
    pytest.importorskip("torch")
    import sys

    from patchgrid import backends

    monkeypatch.setattr(backends, "TORCH_ADD_MIN", 0)

    image = np.random.default_rng(5).random((1, 30, 26), dtype=np.float32)
    kw = dict(axes=(1, 2), edge="shift", window=window, progress=False)
    with_torch = pg.apply(lambda b: b * 3, image, 10, 6, **kw)
    monkeypatch.setitem(sys.modules, "torch", None)
    without = pg.apply(lambda b: b * 3, image, 10, 6, **kw)
    np.testing.assert_allclose(with_torch, without, rtol=1e-6)
    np.testing.assert_allclose(without, 3 * image, rtol=1e-5)


@pytest.mark.parametrize("keep", ["batch", "view"])
def test_a_function_that_keeps_its_inputs_keeps_them_intact(keep):
    # apply reuses batch buffers only when nothing else holds them.
    image = np.random.default_rng(7).random((40, 44)).astype(np.float32)
    kept = []

    def fn(batch):
        kept.append(batch if keep == "batch" else batch[:, 1:])
        return batch

    pg.apply(fn, image, 8, 4, batch_size=3, pad_batch=True, progress=False)
    patches = pg.extract(image, pg.PatchGrid(image.shape, 8, 4, edge="shift"), flatten=True)
    got = np.concatenate(kept)
    want = patches if keep == "batch" else patches[:, 1:]
    np.testing.assert_array_equal(got[: len(patches)], want)


# Exact, or a clear error (issue #13).


@pytest.mark.parametrize("margin", [0, 2])
def test_out_that_is_the_image_is_refused(margin):
    image = _image((40, 40)).astype(np.float32)
    with pytest.raises(ValueError, match="out shares memory with the image"):
        pg.apply(lambda b: b, image, (16, 16), 8, margin=margin, out=image)


def test_out_that_overlaps_the_image_is_refused():
    base = _image((40, 60)).astype(np.float32)
    with pytest.raises(ValueError, match="out shares memory with the image"):
        pg.apply(lambda b: b, base[:, :40], 16, 8, out=base[:, 20:])


def test_out_apart_from_the_image_is_taken():
    base = _image((40, 80)).astype(np.float32)
    out = pg.apply(lambda b: b + 1, base[:, :40], 16, 8, out=base[:, 40:])
    np.testing.assert_allclose(out, base[:, :40] + 1, rtol=1e-6)


def test_the_default_window_is_uniform_so_a_sum_counts_each_patch():
    summed = pg.apply(lambda b: np.ones_like(b), np.ones((50, 50)), 16, 8, reduce="sum")
    np.testing.assert_array_equal(summed, pg.coverage(pg.PatchGrid((50, 50), 16, 8)))


@pytest.mark.parametrize("window", ["uniform", "gaussian", "hann", "triangular"])
def test_an_identity_apply_never_leaves_the_range_of_its_input(window):
    image = np.ones((50, 50), np.float32)
    out = pg.apply(lambda b: b, image, 16, 8, window=window)
    np.testing.assert_array_equal(out, image)


def test_argmax_labels_that_out_cannot_hold_are_refused_before_any_write():
    out = np.full((8, 8), 7, np.uint8)
    scores = lambda b: np.repeat(b, 300, axis=1)  # noqa: E731 - 300 classes
    with pytest.raises(ValueError, match=r"class numbers of 300 classes.*dtype=uint8"):
        pg.apply(scores, np.ones((1, 8, 8), np.float32), 4, axes=(1, 2), reduce="argmax",
                 out=out)  # fmt: skip
    assert (out == 7).all()


def test_nan_from_the_model_into_an_integer_out_is_refused():
    with pytest.raises(ValueError, match="holds NaN, which dtype int32 cannot store"):
        pg.apply(lambda b: b * np.nan, np.ones((8, 8)), 4, out=np.zeros((8, 8), np.int32))


def test_an_int_size_does_not_pad_a_channel_axis():
    calls = []
    with pytest.raises(ValueError, match=r"axes=\(1, 2, 3\)"):
        pg.apply(lambda b: calls.append(b.shape) or b, np.zeros((1, 20, 20, 20)), size=8)
    assert calls == []


def test_naming_the_axes_tiles_only_those():
    seen = []
    pg.apply(lambda b: seen.append(b.shape) or b, np.zeros((1, 20, 20, 20)), size=8,
             axes=(1, 2, 3))  # fmt: skip
    assert {s[1:] for s in seen} == {(1, 8, 8, 8)}


@pytest.mark.parametrize("out", [False, True])
def test_a_zero_length_axis_gives_an_empty_result(out):
    image = np.zeros((0, 8), np.float32)
    result = pg.apply(lambda b: b, image, 4, out=np.zeros((0, 8), np.float32) if out else None)
    assert result.shape == (0, 8)
    assert result.dtype == np.float32


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(scale=float("nan")), ValueError, "scale must be a finite positive number"),
        (dict(scale=float("inf")), ValueError, "scale must be a finite positive number"),
        (dict(scale=True), TypeError, "scale must be a positive number, got True"),
        (dict(out=[[0.0]]), TypeError, "out must be an array with shape, dtype"),
    ],
    ids=["scale-nan", "scale-inf", "scale-bool", "out-list"],
)
def test_bad_options_raise_before_any_work(kwargs, error, match):
    calls = []
    with pytest.raises(error, match=match):
        pg.apply(lambda b: calls.append(1) or b, np.ones((8, 8)), 4, **kwargs)
    assert calls == []


def test_a_read_only_out_is_refused_before_any_work():
    calls = []
    out = np.zeros((8, 8))
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        pg.apply(lambda b: calls.append(1) or b, np.ones((8, 8)), 4, out=out)
    assert calls == []


def test_a_model_returning_objects_is_refused():
    with pytest.raises(ValueError, match="returned an array of dtype object"):
        pg.apply(lambda b: b.astype(object), np.ones((8, 8)), 4)


def test_a_structured_dtype_that_needs_padding_is_refused():
    image = np.zeros((5, 5), dtype=[("a", "f4")])
    with pytest.raises(ValueError, match=r"is not numeric.*pad_mode='constant'"):
        pg.extract(image, (4, 4), 3, edge="pad")


def test_out_that_is_a_tensor_over_the_image_is_refused():
    torch = pytest.importorskip("torch")
    image = _image((40, 40)).astype(np.float32)
    with pytest.raises(ValueError, match="out shares memory with the image"):
        pg.apply(lambda b: b, image, 16, 8, out=torch.from_numpy(image))


def test_out_that_maps_the_image_file_again_is_refused(tmp_path):
    np.save(tmp_path / "a.npy", _image((40, 40)))
    image = np.load(tmp_path / "a.npy", mmap_mode="r")
    out = np.load(tmp_path / "a.npy", mmap_mode="r+")
    with pytest.raises(ValueError, match="out shares memory with the image"):
        pg.apply(lambda b: b, image, 16, 8, out=out)


@pytest.mark.parametrize(
    ("size", "overlap", "stride"),
    [
        (16, 0.5, 8),
        (16, 0.0, 16),
        (10, 0.75, 2),
        (5, 0.9, 1),
        ((16, 12), (0.5, 0.25), (8, 9)),
        (3, 0.99, 1),
    ],
    ids=["half", "none", "three-quarters", "at-least-one", "per-axis", "floor-one"],
)
def test_overlap_gives_monais_stride(size, overlap, stride):
    # MONAI: int(roi * (1 - overlap)), at least 1; the same patches as that stride.
    image = np.random.default_rng(0).random((40, 36))
    by_overlap = pg.apply(lambda b: b * 3, image, size, overlap=overlap, window="hann",
                          progress=False)  # fmt: skip
    by_stride = pg.apply(lambda b: b * 3, image, size, stride, window="hann", progress=False)
    np.testing.assert_array_equal(by_overlap, by_stride)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(stride=4, overlap=0.5), ValueError, "give stride or overlap, not both"),
        (dict(overlap=1.0), ValueError, r"overlap must be in \[0, 1\), got 1.0"),
        (dict(overlap=-0.1), ValueError, r"overlap must be in \[0, 1\)"),
        (dict(overlap="half"), TypeError, "overlap must be a number"),
        (dict(overlap=(0.5, 0.5, 0.5)), ValueError, "overlap has 3 entries for 2 tiled axes"),
    ],
    ids=["both", "one", "negative", "string", "too-many"],
)
def test_overlap_is_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        pg.apply(lambda b: b, np.zeros((20, 20)), 8, progress=False, **kwargs)


# --- a model that adds a class (or channel) axis to an image that has none ------------------


def _three(b):
    """Class scores for an image without a class axis: (n, *patch) -> (n, 3, *patch)."""
    if isinstance(b, np.ndarray):
        return np.stack([b, 1 - b, np.full_like(b, 0.5)], axis=1)
    import torch

    return torch.stack([b, 1 - b, torch.full_like(b, 0.5)], dim=1)


@given(
    shape=st.tuples(st.integers(5, 14), st.integers(5, 14), st.integers(5, 14)),
    size=st.integers(2, 5),
    stride=st.integers(1, 5),
    edge=st.sampled_from(["shift", "pad"]),
    batch=st.integers(1, 7),
)
@settings(max_examples=40, deadline=None)
def test_a_model_may_add_a_class_axis_in_front(shape, size, stride, edge, batch):
    stride = min(stride, size)  # every voxel covered
    image = np.random.default_rng(sum(shape)).random(shape)
    scores = np.stack([image, 1 - image, np.full_like(image, 0.5)])  # the reference, no patches
    got = pg.apply(_three, image, size, stride, edge=edge, batch_size=batch, progress=False)
    np.testing.assert_allclose(got, scores, rtol=1e-12, atol=1e-12)
    labels = pg.apply(_three, image, size, stride, edge=edge, batch_size=batch, reduce="argmax",
                      progress=False)  # fmt: skip
    np.testing.assert_array_equal(labels, scores.argmax(axis=0))


def test_a_class_axis_added_in_front_on_every_path(tmp_path):
    image = np.random.default_rng(1).random((18, 20, 22)).astype(np.float32)
    scores = np.stack([image, 1 - image, np.full_like(image, 0.5)])
    torch = pytest.importorskip("torch")
    got = pg.apply(_three, torch.from_numpy(image), 8, 4, progress=False)
    np.testing.assert_allclose(got.numpy(), scores, rtol=1e-6)
    da = pytest.importorskip("dask.array")
    lazy = pg.apply(_three, da.from_array(image, chunks=9), 8, 4, progress=False)
    np.testing.assert_allclose(lazy.compute(), scores, rtol=1e-6)
    labels = pg.apply(_three, da.from_array(image, chunks=9), 8, 4, reduce="argmax")
    np.testing.assert_array_equal(labels.compute(), scores.argmax(axis=0))
    zarr = pytest.importorskip("zarr")
    out = zarr.create_array(tmp_path / "o.zarr", shape=scores.shape, chunks=(3, 6, 20, 22),
                            dtype="float32")  # fmt: skip
    pg.apply(_three, image, 8, 4, out=out, progress=False)
    np.testing.assert_allclose(out[...], scores, rtol=1e-6)
    grid = pg.PatchGrid(image.shape, 8, 4)  # merge takes such patches too
    merged = pg.merge(_three(pg.extract(image, grid, flatten=True)), grid)
    np.testing.assert_allclose(merged, scores, rtol=1e-6)


def test_a_wrong_output_shape_shows_both_forms():
    both = r"expected \(4, 8, 8\) \(\* is free\), or \(4, C, 8, 8\) with a class or channel axis C"
    with pytest.raises(ValueError, match=both):
        pg.apply(lambda b: b[:, :4], np.zeros((20, 20)), 8, 4)


# --- test-time flips --------------------------------------------------------------------------


def _flips_of(sets):
    """A model averaged over flips of its input, patch batch by patch batch: the reference."""

    def averaged(model):
        def run(b):
            outs = [
                np.flip(model(np.flip(b, [a + 1 for a in s])), [a + 1 for a in s]) for s in sets
            ]
            return np.mean(outs, axis=0)

        return run

    return averaged


@pytest.mark.parametrize("tta", ["flips", [(0,), (1, 2)]])
def test_flips_average_the_flipped_outputs_before_blending(tta):
    image = np.random.default_rng(2).random((14, 15, 16))

    def model(b):  # not equivariant: flips change its output
        return np.cumsum(b, axis=-1) + np.cumsum(b, axis=1)

    sets = [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)] if tta == "flips" else [
        (), *tta]  # fmt: skip
    want = pg.apply(_flips_of(sets)(model), image, 6, 3, window="gaussian", progress=False)
    got = pg.apply(model, image, 6, 3, window="gaussian", tta=tta, progress=False)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_flips_of_an_equivariant_model_give_the_plain_run_on_every_path():
    image = np.random.default_rng(3).random((12, 14, 16)).astype(np.float32)
    plain = pg.apply(lambda b: b * 2 + 1, image, 6, 3, progress=False)
    np.testing.assert_array_equal(pg.apply(lambda b: b * 2 + 1, image, 6, 3, tta="flips"), plain)
    torch = pytest.importorskip("torch")
    got = pg.apply(lambda b: b * 2 + 1, torch.from_numpy(image), 6, 3, tta="flips")
    np.testing.assert_allclose(got.numpy(), plain, rtol=1e-6)
    da = pytest.importorskip("dask.array")
    lazy = pg.apply(lambda b: b * 2 + 1, da.from_array(image, chunks=7), 6, 3, tta="flips")
    np.testing.assert_allclose(lazy.compute(), plain, rtol=1e-6)


def test_flips_keep_the_model_calls_at_batch_size():
    calls = []

    def model(b):
        calls.append(len(b))
        return b

    image = np.zeros((12, 12))
    pg.apply(model, image, 6, 3, batch_size=3, tta="flips", progress=False)
    n = len(pg.PatchGrid(image.shape, 6, 3))
    assert max(calls) <= 3
    assert sum(calls) == 4 * n  # every patch, four ways (two axes)


def test_flips_name_what_is_wrong():
    with pytest.raises(ValueError, match="tta"):
        pg.apply(lambda b: b, np.zeros((8, 8)), 4, tta="mirror")


# --- skipping empty space: mask= ------------------------------------------------------------


def _tenth_foreground(scale=1):
    """A volume whose foreground (values > 0) is one blob of about 10% of its voxels."""
    rng = np.random.default_rng(11)
    image = np.zeros((48 // scale, 64 // scale, 64 // scale), np.float32)
    blob = (slice(10 // scale, 34 // scale), slice(16 // scale, 44 // scale),
            slice(20 // scale, 48 // scale))  # fmt: skip
    image[blob] = rng.random(image[blob].shape, dtype=np.float32) + 0.5
    return image


def test_a_mask_skips_patches_without_foreground_and_keeps_the_foreground_exact():
    image = _tenth_foreground()
    assert 0.08 < (image > 0).mean() < 0.12
    calls = []

    def model(b):
        calls.append(len(b))
        return b * 2 + 1

    plain = pg.apply(model, image, 8, 6, window="gaussian", progress=False)
    unmasked = sum(calls)
    calls.clear()
    got = pg.apply(model, image, 8, 6, window="gaussian", mask=image > 0, fill=-7, progress=False)
    assert sum(calls) * 5 <= unmasked  # at least 5x fewer patches through the model
    fg = image > 0
    np.testing.assert_array_equal(got[fg], plain[fg])
    # A voxel that no patch run covers holds fill; a patch runs iff its core holds foreground.
    grid = pg.PatchGrid(image.shape, 8, 6)
    covered = np.zeros(image.shape, bool)
    for i in range(len(grid)):
        sl = grid.slices(i)
        if fg[sl].any():
            covered[sl] = True
    assert sum(calls) == sum(fg[grid.slices(i)].any() for i in range(len(grid)))
    assert (got[~covered] == -7).all()


def test_a_coarse_mask_from_a_lazy_image(tmp_path):
    zarr = pytest.importorskip("zarr")
    image = _tenth_foreground()
    src = zarr.create_array(tmp_path / "in.zarr", shape=image.shape, chunks=(8, 64, 64),
                            dtype="float32")  # fmt: skip
    src[...] = image
    mask = pg.coarse_mask(src, 4, threshold=0)
    assert mask.shape == (12, 16, 16)
    plain = pg.apply(lambda b: b - 1, image, 8, 4, progress=False)
    out = zarr.create_array(tmp_path / "out.zarr", shape=image.shape, chunks=(8, 32, 32),
                            dtype="float32")  # fmt: skip
    pg.apply(lambda b: b - 1, src, 8, 4, mask=mask, out=out, progress=False)
    fg = image > 0
    np.testing.assert_array_equal(out[...][fg], plain[fg])


def test_a_mask_of_no_foreground_never_calls_the_model():
    def never(b):
        raise AssertionError("called")

    got = pg.apply(never, np.ones((16, 16)), 4, mask=np.zeros((16, 16), bool), fill=3)
    assert (got == 3).all()


def test_a_callable_mask_and_torch():
    torch = pytest.importorskip("torch")
    image = torch.from_numpy(_tenth_foreground(2))
    plain = pg.apply(lambda b: b * 3, image, 8, 4, progress=False)
    got = pg.apply(lambda b: b * 3, image, 8, 4, mask=lambda p: bool((p > 0).any()),
                   progress=False)  # fmt: skip
    fg = image > 0
    torch.testing.assert_close(got[fg], plain[fg])
    da = pytest.importorskip("dask.array")
    with pytest.raises(ValueError, match="a callable mask= reads every patch"):
        pg.apply(lambda b: b, da.zeros((8, 8)), 4, mask=lambda p: True)


@pytest.mark.parametrize("kw", [{"window": "gaussian"}, {"reduce": "max"},
                                {"reduce": "sum", "window": "hann"}])  # fmt: skip
def test_a_mask_on_dask_gives_the_in_memory_result(kw):
    da = pytest.importorskip("dask.array")
    image = _tenth_foreground()
    for mask in (image > 0, pg.coarse_mask(image, 4, 0)):
        want = pg.apply(lambda b: b * 2 + 1, image, 8, 6, mask=mask, fill=-7, progress=False,
                        **kw)  # fmt: skip
        lazy = pg.apply(lambda b: b * 2 + 1, da.from_array(image, chunks=(16, 32, 32)), 8, 6,
                        mask=mask, fill=-7, **kw)  # fmt: skip
        got = lazy.compute()
        np.testing.assert_allclose(got, want, rtol=1e-6)
        np.testing.assert_array_equal(got == -7, want == -7)  # the same voxels left out
