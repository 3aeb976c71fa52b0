"""merge and Merger against a plain loop: ``out[sl] += w * p; count[sl] += w``."""

import importlib

import numpy as np
import pytest

import patchgrid as pg
from patchgrid.backends import WIDE
from reference import Layout, coverage, window_nd

EDGES = ["drop", "pad", "shift", "even"]

# (shape, size, stride, axes): size and stride per tiled axis, axes in any order.
GRIDS = [
    ((17,), (4,), (3,), (0,)),
    ((12, 13), (4, 4), (2, 2), (0, 1)),
    ((11, 13), (4, 5), (3, 2), (0, 1)),
    ((9, 10, 11), (3, 3, 3), (2, 2, 2), (0, 1, 2)),
    ((9, 10, 11), (4, 3, 5), (1, 2, 3), (0, 1, 2)),
    ((10, 12), (3, 4), (5, 6), (0, 1)),
    ((3, 11, 13), (4, 4), (3, 3), (1, 2)),
    ((11, 2, 13), (5, 4), (2, 3), (2, 0)),
    ((40, 36), (6, 8), (2, 3), (0, 1)),
]
GRID_IDS = ["1d", "2d", "2d-mixed", "3d", "3d-dense", "gapped", "channels-first",
            "channels-middle-unsorted", "larger"]  # fmt: skip


@pytest.fixture(autouse=True, params=["scatter", "rows"])
def strategy(request, monkeypatch):
    """Every test here runs twice: small grids merged at once by the scatter strategy, and
    the same grids merged by rows (the strategy of large grids), both against the loop."""
    if request.param == "rows":
        accumulate = importlib.import_module("patchgrid._accumulate")
        monkeypatch.setattr(accumulate, "SCATTER_ELEMENTS", -1)
    return request.param


def _rng(seed=0):
    return np.random.default_rng(seed)


def _make(shape, size, stride, axes, edge):
    """The grid under test and the reference layout for the same arguments."""
    edges = (edge,) * len(axes)
    grid = pg.PatchGrid(shape, size, stride, axes=axes, edge=edges)
    return grid, Layout(shape, axes, size, stride, edges)


def _random_patches(grid, dtype=np.float64, seed=0):
    """Independent random patches, so every overlap holds different values."""
    rng = _rng(seed)
    shape = (*grid.counts, *grid.patch_shape)
    if np.dtype(dtype).kind in "iu":
        return rng.integers(0, 100, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _flat(patches, grid):
    return patches.reshape(len(grid), *patches.shape[len(grid.counts) :])


@pytest.mark.parametrize("reduce", ["mean", "sum", "max", "min"])
@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize(("shape", "size", "stride", "axes"), GRIDS, ids=GRID_IDS)
def test_merge_equals_the_loop(shape, size, stride, axes, edge, reduce):
    grid, layout = _make(shape, size, stride, axes, edge)
    patches = _random_patches(grid)
    expected, _ = layout.merge(_flat(patches, grid), reduce)
    np.testing.assert_allclose(
        pg.merge(patches, grid, reduce=reduce), expected, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("reduce", ["mean", "sum", "max", "min"])
@pytest.mark.parametrize("edge", EDGES)
def test_merge_of_flat_patches_equals_the_loop(edge, reduce):
    grid, layout = _make((3, 11, 13), (4, 5), (3, 2), (1, 2), edge)
    patches = _flat(_random_patches(grid), grid)
    expected, _ = layout.merge(patches, reduce)
    np.testing.assert_allclose(
        pg.merge(patches, grid, reduce=reduce), expected, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("reduce", ["mean", "sum", "max", "min"])
@pytest.mark.parametrize("edge", ["drop", "shift"])
def test_merge_of_int_patches_equals_the_loop(edge, reduce):
    grid, layout = _make((11, 13), (4, 5), (3, 2), (0, 1), edge)
    patches = _random_patches(grid, np.int16)
    expected, _ = layout.merge(_flat(patches, grid), reduce)
    np.testing.assert_allclose(pg.merge(patches, grid, reduce=reduce), expected, rtol=1e-12)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_merge_of_complex_patches_equals_the_loop(reduce):
    grid, layout = _make((11, 13), (4, 5), (3, 2), (0, 1), "shift")
    patches = _random_patches(grid) + 1j * _random_patches(grid, seed=1)
    expected, _ = layout.merge(_flat(patches, grid), reduce)
    np.testing.assert_allclose(pg.merge(patches, grid, reduce=reduce), expected, rtol=1e-12)


WINDOW_GRIDS = [GRIDS[i] for i in (1, 2, 4, 5, 7)]
WINDOW_GRID_IDS = [GRID_IDS[i] for i in (1, 2, 4, 5, 7)]


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize("window", ["gaussian", "hann", "triangular", "uniform"])
@pytest.mark.parametrize(("shape", "size", "stride", "axes"), WINDOW_GRIDS, ids=WINDOW_GRID_IDS)
def test_named_window_equals_the_loop(shape, size, stride, axes, window, edge, reduce):
    grid, layout = _make(shape, size, stride, axes, edge)
    patches = _random_patches(grid)
    weight = window_nd(window, layout.size)
    expected, _ = layout.merge(_flat(patches, grid), reduce, weight)
    got = pg.merge(patches, grid, reduce=reduce, window=window)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize(("shape", "size", "stride", "axes"), WINDOW_GRIDS, ids=WINDOW_GRID_IDS)
def test_array_window_equals_the_loop(shape, size, stride, axes, edge, reduce):
    grid, layout = _make(shape, size, stride, axes, edge)
    patches = _random_patches(grid)
    weight = _rng(5).uniform(0.1, 2.0, layout.size)
    expected, _ = layout.merge(_flat(patches, grid), reduce, weight)
    got = pg.merge(patches, grid, reduce=reduce, window=weight)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize(("shape", "size", "stride", "axes"), WINDOW_GRIDS, ids=WINDOW_GRID_IDS)
def test_monai_gaussian_equals_the_loop(shape, size, stride, axes, edge, reduce, dtype):
    # A named window that is not separable: small grids keep its summed weights in the plan.
    grid, layout = _make(shape, size, stride, axes, edge)
    patches = _random_patches(grid, dtype)
    weight = pg.window("monai-gaussian", layout.size)
    expected, _ = layout.merge(_flat(patches, grid).astype(np.float64), reduce, weight)
    got = pg.merge(patches, grid, reduce=reduce, window="monai-gaussian")
    rtol = 1e-10 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol)


def test_array_window_as_a_list():
    grid, layout = _make((9, 7), (3, 2), (2, 1), (0, 1), "drop")
    patches = _random_patches(grid)
    weight = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    expected, _ = layout.merge(_flat(patches, grid), "mean", np.array(weight))
    np.testing.assert_allclose(pg.merge(patches, grid, window=weight), expected, rtol=1e-12)


@pytest.mark.parametrize("edge", ["pad", "shift", "even"])
@pytest.mark.parametrize("window", ["uniform", "gaussian", "hann", "triangular", "array"])
def test_identical_patches_blend_back_to_the_image(window, edge):
    image = _rng().standard_normal((3, 19, 22))
    grid = pg.PatchGrid(image.shape, (6, 8), (4, 5), edge=edge)
    weight = _rng(1).uniform(0.5, 1.5, (6, 8)) if window == "array" else window
    got = pg.merge(pg.extract(image, grid), grid, window=weight)
    np.testing.assert_allclose(got, image, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", ["gaussian", "hann", "triangular"])
def test_blending_keeps_the_border_voxels(window):
    # A window that is zero at the patch border would blank the image's border here.
    image = _rng().uniform(1, 2, (16, 16))
    grid = pg.PatchGrid(image.shape, 8, 4)
    got = pg.merge(pg.extract(image, grid), grid, window=window)
    border = np.concatenate([got[0], got[-1], got[:, 0], got[:, -1]])
    expected = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    np.testing.assert_allclose(border, expected, rtol=1e-12)


def test_user_example_round_trip():
    volume = _rng().random((10, 20, 30))
    patches = pg.extract(volume, size=4, stride=2)
    np.testing.assert_allclose(pg.merge(patches, volume.shape, stride=2), volume, rtol=1e-12)


def test_fill_for_trailing_voxels_of_drop():
    image = _rng().standard_normal((11, 13))
    grid = pg.PatchGrid(image.shape, 4, 3, edge="drop")
    got = pg.merge(pg.extract(image, grid), grid, fill=-7.0, edge="drop")
    expected = image.copy()
    expected[10, :] = -7.0  # rows 0..9 are covered by starts 0, 3, 6
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("reduce", "window"),
    [
        ("mean", None),
        ("sum", None),
        ("max", None),
        ("min", None),
        ("mean", "hann"),
        ("sum", "hann"),
    ],
    ids=["mean", "sum", "max", "min", "mean-hann", "sum-hann"],
)
def test_fill_for_gaps_equals_the_loop(reduce, window):
    grid, layout = _make((13, 20), (2, 3), (4, 7), (0, 1), "drop")
    patches = _random_patches(grid)
    weight = None if window is None else window_nd(window, layout.size)
    expected, _ = layout.merge(_flat(patches, grid), reduce, weight, fill=3.5)
    got = pg.merge(patches, grid, reduce=reduce, window=window, fill=3.5)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("edge", EDGES)
def test_fill_nan_marks_uncovered_voxels(edge):
    grid, layout = _make((13, 20), (2, 3), (4, 7), (0, 1), edge)
    got = pg.merge(_random_patches(grid), grid, fill=np.nan)
    np.testing.assert_array_equal(np.isnan(got), coverage(layout) == 0)


@pytest.mark.parametrize("edge", EDGES)
def test_fill_with_max_on_uint8(edge):
    grid, layout = _make((13, 20), (2, 3), (4, 7), (0, 1), edge)
    patches = _random_patches(grid, np.uint8)
    expected, _ = layout.merge(_flat(patches, grid), "max", fill=255)
    np.testing.assert_array_equal(pg.merge(patches, grid, reduce="max", fill=255), expected)


def test_fill_for_trailing_channels_grid():
    grid, layout = _make((2, 11, 9), (4, 4), (3, 4), (1, 2), "drop")
    patches = _random_patches(grid)
    expected, _ = layout.merge(_flat(patches, grid), fill=-1)
    np.testing.assert_array_equal(pg.merge(patches, grid, fill=-1), expected)


COVERAGE_GRIDS = [GRIDS[i] for i in (0, 2, 4, 5, 6, 7)]
COVERAGE_IDS = [GRID_IDS[i] for i in (0, 2, 4, 5, 6, 7)]


@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize(("shape", "size", "stride", "axes"), COVERAGE_GRIDS, ids=COVERAGE_IDS)
def test_coverage_counts_patches(shape, size, stride, axes, edge):
    grid, layout = _make(shape, size, stride, axes, edge)
    np.testing.assert_array_equal(pg.coverage(grid), coverage(layout))


@pytest.mark.parametrize("window", ["gaussian", "hann", "triangular", "array"])
@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize(("shape", "size", "stride", "axes"), COVERAGE_GRIDS, ids=COVERAGE_IDS)
def test_coverage_sums_window_weights(shape, size, stride, axes, edge, window):
    grid, layout = _make(shape, size, stride, axes, edge)
    if window == "array":
        weight = _rng(3).uniform(0.1, 1, layout.size)
        arg = weight
    else:
        weight = arg = window_nd(window, layout.size)
        arg = window
    np.testing.assert_allclose(pg.coverage(grid, arg), coverage(layout, weight), rtol=1e-12)


@pytest.mark.parametrize(
    ("grid", "expected"),
    [
        (pg.PatchGrid(7, size=3, stride=2), [1, 1, 2, 1, 2, 1, 1]),
        (pg.PatchGrid(7, size=2, stride=3, edge="drop"), [1, 1, 0, 1, 1, 0, 0]),
        (pg.PatchGrid(7, size=3, stride=2, edge="pad"), [1, 1, 2, 1, 2, 1, 1]),
        (pg.PatchGrid(8, size=3, stride=2, edge="shift"), [1, 1, 2, 1, 2, 2, 2, 1]),
    ],
    ids=["overlap", "gaps", "pad", "shift"],
)
def test_coverage_worked_examples(grid, expected):
    np.testing.assert_array_equal(pg.coverage(grid), expected)


def test_coverage_shape_has_ones_on_untiled_axes():
    assert pg.coverage(pg.PatchGrid((3, 10, 12), (4, 4), 2)).shape == (1, 10, 12)


@pytest.fixture
def dtype_grid():
    return pg.PatchGrid((11, 13), (4, 5), (3, 2), edge="shift")


@pytest.mark.parametrize("reduce", ["mean", "sum", "max", "min"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_float_patches_keep_their_dtype(dtype_grid, dtype, reduce):
    patches = _random_patches(dtype_grid, dtype)
    assert pg.merge(patches, dtype_grid, reduce=reduce).dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
def test_complex_patches_keep_their_dtype(dtype_grid, dtype):
    patches = _random_patches(dtype_grid).astype(dtype)
    assert pg.merge(patches, dtype_grid).dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype", ["bool", "uint8", "int16", "int32", "uint64"])
def test_integer_patches_under_mean_give_float64(dtype_grid, dtype):
    patches = _random_patches(dtype_grid, dtype)
    assert pg.merge(patches, dtype_grid).dtype == np.float64


@pytest.mark.parametrize("reduce", ["max", "min"])
@pytest.mark.parametrize("dtype", ["bool", "uint8", "int16", "int64", "float32"])
def test_max_and_min_keep_the_dtype(dtype_grid, dtype, reduce):
    patches = _random_patches(dtype_grid, dtype)
    assert pg.merge(patches, dtype_grid, reduce=reduce).dtype == np.dtype(dtype)


@pytest.mark.parametrize("reduce", ["max", "min"])
def test_max_and_min_of_uint8_equal_the_loop(dtype_grid, reduce):
    layout = Layout((11, 13), (0, 1), (4, 5), (3, 2), ("shift", "shift"))
    patches = _rng().integers(0, 256, (*dtype_grid.counts, 4, 5)).astype(np.uint8)
    expected, _ = layout.merge(_flat(patches, dtype_grid), reduce)
    np.testing.assert_array_equal(pg.merge(patches, dtype_grid, reduce=reduce), expected)


@pytest.mark.parametrize(
    ("dtype", "reduce", "override"),
    [
        ("uint8", "mean", "float32"),
        ("float64", "mean", "float32"),
        ("float32", "sum", "float64"),
        ("uint8", "max", "int32"),
        ("int16", "min", "float64"),
    ],
    ids=["int-mean-f32", "f64-mean-f32", "f32-sum-f64", "uint8-max-int32", "int16-min-f64"],
)
def test_dtype_override(dtype_grid, dtype, reduce, override):
    patches = _random_patches(dtype_grid, dtype)
    assert pg.merge(patches, dtype_grid, reduce=reduce, dtype=override).dtype == np.dtype(override)


def test_dtype_override_keeps_the_values(dtype_grid):
    layout = Layout((11, 13), (0, 1), (4, 5), (3, 2), ("shift", "shift"))
    patches = _random_patches(dtype_grid, np.uint8)
    expected, _ = layout.merge(_flat(patches, dtype_grid), "max")
    got = pg.merge(patches, dtype_grid, reduce="max", dtype=np.float32)
    np.testing.assert_array_equal(got, expected.astype(np.float32))


def test_float32_mean_equals_the_loop(dtype_grid):
    layout = Layout((11, 13), (0, 1), (4, 5), (3, 2), ("shift", "shift"))
    patches = _random_patches(dtype_grid, np.float32)
    expected, _ = layout.merge(_flat(patches, dtype_grid), "mean")
    np.testing.assert_allclose(pg.merge(patches, dtype_grid), expected, rtol=1e-5)


@pytest.fixture
def crowded():
    """Size 8, stride 1 in 2-D: up to 64 patches over a voxel."""
    grid = pg.PatchGrid((20, 20), 8, 1)
    layout = Layout((20, 20), (0, 1), (8, 8), (1, 1), ("drop", "drop"))
    return grid, layout


def test_uint8_sum_does_not_overflow(crowded):
    grid, layout = crowded
    patches = np.full((*grid.counts, 8, 8), 255, dtype=np.uint8)
    np.testing.assert_array_equal(pg.merge(patches, grid, reduce="sum"), 255 * coverage(layout))


def test_uint8_mean_does_not_overflow(crowded):
    grid, _ = crowded
    patches = np.full((*grid.counts, 8, 8), 255, dtype=np.uint8)
    np.testing.assert_array_equal(pg.merge(patches, grid), np.full((20, 20), 255.0))


def test_uint8_sum_does_not_overflow_in_merger(crowded):
    grid, layout = crowded
    merger = pg.Merger(grid, reduce="sum")
    merger.add(np.full((len(grid), 8, 8), 255, dtype=np.uint8), np.arange(len(grid)))
    np.testing.assert_array_equal(merger.result(), 255 * coverage(layout))


def test_float16_mean_accumulates_wider_than_float16(crowded):
    # 64 * 2048 overflows float16 (max 65504); the mean itself fits.
    grid, _ = crowded
    patches = np.full((*grid.counts, 8, 8), 2048, dtype=np.float16)
    np.testing.assert_array_equal(pg.merge(patches, grid), np.full((20, 20), 2048, np.float16))


def test_max_count_of_the_crowded_grid_is_64(crowded):
    _, layout = crowded
    assert coverage(layout).max() == 64


@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("edge", EDGES)
def test_patches_with_more_channels_than_the_image(edge, reduce):
    grid, layout = _make((1, 11, 13), (4, 5), (3, 2), (1, 2), edge)
    patches = _rng().standard_normal((*grid.counts, 5, 4, 5))
    expected, _ = layout.merge(_flat(patches, grid), reduce)
    np.testing.assert_allclose(pg.merge(patches, grid, reduce=reduce), expected, rtol=1e-12)


def test_patches_with_more_channels_give_their_shape():
    grid = pg.PatchGrid((1, 11, 13), (4, 5), (3, 2), edge="pad")
    patches = np.zeros((*grid.counts, 5, 4, 5))
    assert pg.merge(patches, grid).shape == (5, 11, 13)


def test_patches_with_more_channels_last():
    grid, layout = _make((11, 13, 1), (4, 5), (3, 2), (0, 1), "shift")
    patches = _rng().standard_normal((*grid.counts, 4, 5, 3))
    expected, _ = layout.merge(_flat(patches, grid), "mean", window_nd("gaussian", (4, 5)))
    got = pg.merge(patches, grid, window="gaussian")
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_patches_with_more_channels_in_merger():
    grid, layout = _make((1, 11, 13), (4, 5), (3, 2), (1, 2), "even")
    patches = _flat(_rng().standard_normal((*grid.counts, 5, 4, 5)), grid)
    merger = pg.Merger(grid)
    merger.add(patches[::2], np.arange(0, len(grid), 2))
    merger.add(patches[1::2], np.arange(1, len(grid), 2))
    expected, _ = layout.merge(patches, "mean")
    np.testing.assert_allclose(merger.result(), expected, rtol=1e-12)


def test_patches_with_fewer_channels_than_the_image():
    grid, layout = _make((4, 11, 13), (4, 5), (3, 2), (1, 2), "drop")
    patches = _rng().standard_normal((*grid.counts, 1, 4, 5))
    expected, _ = layout.merge(_flat(patches, grid), "mean")
    np.testing.assert_allclose(pg.merge(patches, grid), expected, rtol=1e-12)


@pytest.mark.parametrize("edge", ["pad", "shift", "even"])
def test_merge_with_a_shape_and_grid_form_patches(edge):
    image = _rng().standard_normal((11, 13))
    patches = pg.extract(image, (4, 5), (3, 2), edge=edge)
    np.testing.assert_allclose(pg.merge(patches, image.shape, (3, 2), edge=edge), image, rtol=1e-12)


@pytest.mark.parametrize("edge", ["pad", "shift", "even"])
def test_merge_with_a_shape_and_flat_patches(edge):
    image = _rng().standard_normal((11, 13))
    patches = pg.extract(image, (4, 5), (3, 2), edge=edge, flatten=True)
    np.testing.assert_allclose(pg.merge(patches, image.shape, (3, 2), edge=edge), image, rtol=1e-12)


def test_merge_with_a_shape_and_drop_equals_the_loop():
    layout = Layout((11, 13), (0, 1), (4, 5), (3, 2), ("drop", "drop"))
    image = _rng().standard_normal((11, 13))
    patches = layout.extract(image)
    expected, _ = layout.merge(patches.reshape(-1, 4, 5), fill=-1)
    np.testing.assert_array_equal(
        pg.merge(patches, image.shape, (3, 2), fill=-1, edge="drop"), expected
    )


def test_merge_with_a_shape_and_channels_in_grid_form():
    image = _rng().standard_normal((3, 11, 13))
    patches = pg.extract(image, (4, 5), (3, 2), edge="shift")
    np.testing.assert_allclose(
        pg.merge(patches, image.shape, (3, 2), edge="shift"), image, rtol=1e-12
    )


def test_merge_with_a_shape_and_flat_patches_with_channels():
    image = _rng().standard_normal((3, 11, 13))
    patches = pg.extract(image, (4, 5), (3, 2), edge="even", flatten=True)
    got = pg.merge(patches, image.shape, (3, 2), axes=(1, 2), edge="even")
    np.testing.assert_allclose(got, image, rtol=1e-12)


def test_merge_with_a_shape_and_flat_patches_stride_tuple_picks_the_last_axes():
    image = _rng().standard_normal((3, 11, 13))
    patches = pg.extract(image, (4, 5), (3, 2), edge="shift", flatten=True)
    got = pg.merge(patches, image.shape, (3, 2), edge="shift")
    np.testing.assert_allclose(got, image, rtol=1e-12)


def test_merge_with_a_shape_equals_merge_with_the_grid():
    grid = pg.PatchGrid((11, 13), (4, 5), (3, 2), edge="pad")
    patches = _random_patches(grid)
    np.testing.assert_array_equal(
        pg.merge(patches, (11, 13), (3, 2), edge="pad", window="hann"),
        pg.merge(patches, grid, window="hann"),
    )


def test_merge_with_a_shape_defaults_stride_to_size():
    image = _rng().standard_normal((12, 15))
    patches = pg.extract(image, (4, 5))
    np.testing.assert_array_equal(pg.merge(patches, image.shape), image)


@pytest.fixture
def grid():
    return pg.PatchGrid((11, 13), (4, 5), (3, 2), edge="drop")


@pytest.mark.parametrize(
    "shape",
    [(2, 5, 4, 5), (14, 4, 5), (16, 4, 5), (3, 5, 2, 4, 5), (4, 5)],
    ids=["counts", "flat-short", "flat-long", "extra-axis", "no-count-axis"],
)
def test_merge_with_the_wrong_patch_count_raises(grid, shape):
    with pytest.raises(ValueError, match="patches must be shaped"):
        pg.merge(np.zeros(shape), grid)


@pytest.mark.parametrize(
    "shape", [(3, 5, 4, 4), (15, 5, 5), (15, 4, 5, 1)], ids=["grid-form", "flat", "extra-axis"]
)
def test_merge_with_the_wrong_patch_shape_raises(grid, shape):
    with pytest.raises(ValueError, match="patches must"):
        pg.merge(np.zeros(shape), grid)


def test_merge_with_a_shape_and_too_few_dimensions_raises():
    with pytest.raises(ValueError, match="patches must have more dimensions than the image"):
        pg.merge(np.zeros((4, 5)), (11, 13))


def test_merge_with_a_shape_and_a_bad_stride_raises():
    with pytest.raises(ValueError, match="stride must be positive"):
        pg.merge(np.zeros((3, 5, 4, 5)), (11, 13), 0)


@pytest.mark.parametrize("reduce", ["median", "avg", "", None])
def test_unknown_reduce_raises(grid, reduce):
    with pytest.raises(ValueError, match="reduce must be one of"):
        pg.merge(_random_patches(grid), grid, reduce=reduce)


@pytest.mark.parametrize("window", ["blackman", "Hann", ""])
def test_unknown_window_raises(grid, window):
    with pytest.raises(ValueError, match="window must be one of"):
        pg.merge(_random_patches(grid), grid, window=window)


@pytest.mark.parametrize(
    ("window", "match"),
    [
        (np.ones((5, 4)), "window must have the patch's shape"),
        (np.ones(4), "window must have the patch's shape"),
        (3.0, "window must have the patch's shape"),
        (-np.ones((4, 5)), "non-negative"),
        (np.full((4, 5), np.nan), "finite"),
        (np.zeros((4, 5)), "at least one positive weight"),
    ],
    ids=["transposed", "1d", "scalar", "negative", "nan", "zeros"],
)
def test_bad_array_window_raises(grid, window, match):
    with pytest.raises(ValueError, match=match):
        pg.merge(_random_patches(grid), grid, window=window)


@pytest.mark.parametrize("reduce", ["max", "min"])
@pytest.mark.parametrize("window", ["gaussian", "hann", "triangular", "array"])
def test_window_with_max_or_min_raises(grid, window, reduce):
    weight = np.ones((4, 5)) if window == "array" else window
    with pytest.raises(ValueError, match="window applies to reduce="):
        pg.merge(_random_patches(grid), grid, reduce=reduce, window=weight)


@pytest.mark.parametrize("reduce", ["max", "min"])
def test_uniform_window_with_max_or_min_is_allowed(grid, reduce):
    layout = Layout((11, 13), (0, 1), (4, 5), (3, 2), ("drop", "drop"))
    patches = _random_patches(grid)
    expected, _ = layout.merge(_flat(patches, grid), reduce)
    np.testing.assert_array_equal(
        pg.merge(patches, grid, reduce=reduce, window="uniform", edge="drop"), expected
    )


@pytest.mark.parametrize(
    ("dtype", "kwargs"),
    [
        ("uint8", {"reduce": "max", "fill": -1}),
        ("uint8", {"reduce": "min", "fill": 256}),
        ("int16", {"reduce": "max", "fill": 0.5}),
        ("int16", {"reduce": "max", "fill": np.nan}),
        ("float32", {"fill": 1e40}),
        ("uint8", {"dtype": np.uint8, "fill": -3}),
        ("float64", {"dtype": np.int32, "fill": 2.5}),
    ],
    ids=["negative-uint8", "big-uint8", "half-int", "nan-int", "huge-float32", "dtype-uint8",
         "dtype-int32"],
)  # fmt: skip
def test_fill_that_does_not_fit_raises(grid, dtype, kwargs):
    with pytest.raises(ValueError, match="fill="):
        pg.merge(_random_patches(grid, dtype), grid, **kwargs)


def test_fill_that_is_not_a_scalar_raises(grid):
    with pytest.raises(TypeError, match="fill must be a scalar"):
        pg.merge(_random_patches(grid), grid, fill=[0, 1])


def test_max_of_complex_patches_raises(grid):
    patches = _random_patches(grid).astype(np.complex128)
    with pytest.raises((TypeError, ValueError), match="real patches"):
        pg.merge(patches, grid, reduce="max")


MERGER_GRIDS = [GRIDS[i] for i in (0, 2, 4, 5, 6, 7)]
MERGER_IDS = [GRID_IDS[i] for i in (0, 2, 4, 5, 6, 7)]


@pytest.mark.parametrize(
    ("reduce", "window"),
    [("mean", None), ("mean", "gaussian"), ("sum", "hann"), ("max", None), ("min", None)],
    ids=["mean", "mean-gaussian", "sum-hann", "max", "min"],
)
@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize(("shape", "size", "stride", "axes"), MERGER_GRIDS, ids=MERGER_IDS)
def test_merger_in_random_batches_equals_merge(shape, size, stride, axes, edge, reduce, window):
    grid, _ = _make(shape, size, stride, axes, edge)
    patches = _random_patches(grid)
    flat = _flat(patches, grid)
    merger = pg.Merger(grid, reduce=reduce, window=window)
    order = _rng(1).permutation(len(grid))
    for batch in np.array_split(order, 3):
        merger.add(flat[batch], batch)
    expected = pg.merge(patches, grid, reduce=reduce, window=window)
    np.testing.assert_allclose(merger.result(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("shape", "size", "stride", "axes"), MERGER_GRIDS, ids=MERGER_IDS)
def test_merger_equals_the_loop(shape, size, stride, axes):
    grid, layout = _make(shape, size, stride, axes, "shift")
    flat = _flat(_random_patches(grid), grid)
    merger = pg.Merger(grid, window="triangular")
    order = _rng(2).permutation(len(grid))
    for batch in np.array_split(order, 4):
        merger.add(flat[batch], batch)
    expected, _ = layout.merge(flat, "mean", window_nd("triangular", layout.size))
    np.testing.assert_allclose(merger.result(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("edge", EDGES)
def test_merger_with_positions_equals_merge(edge):
    grid, _ = _make((11, 13, 9), (4, 5, 3), (3, 2, 4), (0, 1, 2), edge)
    patches = _random_patches(grid)
    flat = _flat(patches, grid)
    merger = pg.Merger(grid)
    order = _rng(3).permutation(len(grid))
    for batch in np.array_split(order, 5):
        positions = np.stack(np.unravel_index(batch, grid.counts), axis=1)
        merger.add(flat[batch], positions)
    np.testing.assert_allclose(merger.result(), pg.merge(patches, grid), rtol=1e-12)


def test_merger_one_patch_at_a_time():
    grid, layout = _make((3, 11, 13), (4, 5), (3, 2), (1, 2), "pad")
    flat = _flat(_random_patches(grid), grid)
    merger = pg.Merger(grid)
    for i in _rng(4).permutation(len(grid)).tolist():
        merger.add(flat[i], i)
    expected, _ = layout.merge(flat)
    np.testing.assert_allclose(merger.result(), expected, rtol=1e-12)


def test_merger_one_patch_at_a_time_by_position():
    grid, layout = _make((3, 11, 13), (4, 5), (3, 2), (1, 2), "even")
    flat = _flat(_random_patches(grid), grid)
    merger = pg.Merger(grid)
    for i in range(len(grid)):
        merger.add(flat[i], tuple(int(v) for v in np.unravel_index(i, grid.counts)))
    expected, _ = layout.merge(flat)
    np.testing.assert_allclose(merger.result(), expected, rtol=1e-12)


def test_merger_accepts_negative_indices():
    grid, layout = _make((11, 13), (4, 5), (3, 2), (0, 1), "drop")
    flat = _flat(_random_patches(grid), grid)
    merger = pg.Merger(grid)
    merger.add(flat, np.arange(len(grid)) - len(grid))
    expected, _ = layout.merge(flat)
    np.testing.assert_allclose(merger.result(), expected, rtol=1e-12)


def test_merger_reports_missing_patches(grid):
    merger = pg.Merger(grid)
    merger.add(np.zeros((3, 4, 5)), [0, 7, 14])
    assert merger.missing.tolist() == [i for i in range(15) if i not in (0, 7, 14)]


def test_merger_is_not_complete_until_every_patch_is_added(grid):
    merger = pg.Merger(grid)
    merger.add(np.zeros((14, 4, 5)), np.arange(14))
    assert not merger.complete


def test_merger_is_complete_once_every_patch_is_added(grid):
    merger = pg.Merger(grid)
    merger.add(np.zeros((15, 4, 5)), np.arange(15)[::-1])
    assert merger.complete


def test_merger_result_raises_on_a_missing_patch(grid):
    merger = pg.Merger(grid)
    merger.add(np.zeros((14, 4, 5)), np.arange(1, 15))
    with pytest.raises(ValueError, match=r"1 of 15 patches were never added \(positions \(0, 0\)"):
        merger.result()


def test_merger_result_raises_when_nothing_was_added(grid):
    with pytest.raises(ValueError, match="no patches were added"):
        pg.Merger(grid).result()


@pytest.mark.parametrize(
    ("reduce", "window"),
    [("mean", None), ("mean", "hann"), ("sum", None), ("max", None), ("min", None)],
    ids=["mean", "mean-hann", "sum", "max", "min"],
)
def test_merger_allow_missing_fills_the_holes(reduce, window):
    grid, layout = _make((11, 13), (4, 5), (3, 2), (0, 1), "shift")
    flat = _flat(_random_patches(grid), grid)
    keep = [i for i in range(len(grid)) if i % 4 != 1]
    merger = pg.Merger(grid, reduce=reduce, window=window, fill=-9.0)
    merger.add(flat[keep], keep)
    weight = None if window is None else window_nd(window, layout.size)
    expected, _ = layout.merge(flat, reduce, weight, fill=-9.0, keep=keep)
    np.testing.assert_allclose(merger.result(allow_missing=True), expected, rtol=1e-12)


def test_merger_allow_missing_leaves_uncovered_voxels_at_fill():
    grid = pg.PatchGrid((8, 8), 4)
    merger = pg.Merger(grid, fill=-1.0)
    merger.add(np.ones((4, 4)), 0)
    expected = np.full((8, 8), -1.0)
    expected[:4, :4] = 1.0
    np.testing.assert_array_equal(merger.result(allow_missing=True), expected)


def test_merger_coverage_of_some_patches():
    grid, layout = _make((11, 13), (4, 5), (3, 2), (0, 1), "shift")
    keep = [0, 3, 4, 11]
    merger = pg.Merger(grid, window="gaussian")
    merger.add(np.zeros((4, 4, 5)), keep)
    zeros = np.zeros((len(grid), 4, 5))
    _, expected = layout.merge(zeros, "sum", window_nd("gaussian", (4, 5)), keep=keep)
    np.testing.assert_allclose(merger.coverage(), expected, rtol=1e-12)


def test_merger_coverage_of_every_patch():
    grid, layout = _make((3, 11, 13), (4, 5), (3, 2), (1, 2), "even")
    merger = pg.Merger(grid, window="hann")
    merger.add(np.zeros((len(grid), 3, 4, 5)), np.arange(len(grid)))
    np.testing.assert_allclose(
        merger.coverage(), coverage(layout, window_nd("hann", (4, 5))), rtol=1e-12
    )


def test_merger_result_twice_gives_the_same_array(grid):
    merger = pg.Merger(grid)
    merger.add(np.ones((15, 4, 5)), np.arange(15))
    assert merger.result() is merger.result()


@pytest.mark.parametrize(
    ("batch", "indices", "match"),
    [
        (np.zeros((2, 4, 5)), [3, 3], "indices repeats patch 3 in one batch"),
        (np.zeros((3, 4, 5)), [1, 5, -14], "indices repeats patch 1 in one batch"),
        (np.zeros((1, 4, 5)), [15], "indices has 15, out of range for a grid of 15 patches"),
        (np.zeros((1, 4, 5)), [-16], "indices has -16, out of range"),
        (np.zeros((1, 4, 5)), [[3, 0]], r"indices has position \(3, 0\) outside"),
        (np.zeros((1, 4, 5)), [[0, -1]], r"indices has position \(0, -1\) outside"),
        (np.zeros((1, 4, 5)), [[0, 0, 0]], r"indices as positions must be shaped \(B, 2\)"),
        (np.zeros((2, 4, 5)), [0, 1, 2], "batch has 2 patches but indices has 3"),
        (np.zeros((3, 4, 5)), [[0, 1], [0, 2]], "batch has 3 patches but indices has 2"),
        (np.zeros((2, 5, 4)), [0, 1], r"patches must have shape \(4, 5\)"),
        (np.zeros((2, 4, 5, 1)), [0, 1], "patches must have shape"),
        (np.zeros((2, 4)), [0, 1], "patches must have shape"),
        (np.zeros((1, 4, 5)), np.zeros((1, 1, 1), int), "indices must be 1-D"),
    ],
    ids=["repeat", "repeat-negative", "past-end", "before-start", "position-past",
         "position-negative", "position-width", "count-mismatch", "count-mismatch-positions",
         "patch-transposed", "patch-extra-axis", "patch-short", "indices-3d"],
)  # fmt: skip
def test_merger_add_errors(grid, batch, indices, match):
    merger = pg.Merger(grid)
    with pytest.raises(ValueError, match=match):
        merger.add(batch, indices)


def test_merger_add_with_float_indices_raises(grid):
    merger = pg.Merger(grid)
    with pytest.raises(TypeError, match="indices must be integers"):
        merger.add(np.zeros((2, 4, 5)), [0.0, 1.0])


def test_merger_add_twice_raises(grid):
    merger = pg.Merger(grid)
    merger.add(np.zeros((2, 4, 5)), [0, 6])
    with pytest.raises(ValueError, match=r"patch 6 \(position \(1, 1\)\) was already added"):
        merger.add(np.zeros((2, 4, 5)), [2, 6])


def test_merger_add_twice_by_position_raises(grid):
    merger = pg.Merger(grid)
    merger.add(np.zeros((1, 4, 5)), [[2, 4]])
    with pytest.raises(ValueError, match="was already added"):
        merger.add(np.zeros((1, 4, 5)), [14])


def test_merger_failed_add_adds_nothing(grid):
    merger = pg.Merger(grid)
    merger.add(np.zeros((1, 4, 5)), [6])
    with pytest.raises(ValueError, match="already added"):
        merger.add(np.zeros((2, 4, 5)), [2, 6])
    assert merger.missing.tolist() == [i for i in range(15) if i != 6]


def test_merger_patches_of_another_shape_than_the_first_raise():
    grid = pg.PatchGrid((3, 11, 13), (4, 5), (3, 2))
    merger = pg.Merger(grid)
    merger.add(np.zeros((1, 3, 4, 5)), [0])
    with pytest.raises(ValueError, match="patches must all have one shape"):
        merger.add(np.zeros((1, 2, 4, 5)), [1])


def test_merger_add_after_result_raises(grid):
    merger = pg.Merger(grid)
    merger.add(np.zeros((1, 4, 5)), [0])
    merger.result(allow_missing=True)
    with pytest.raises(ValueError, match=r"result\(\) was already called"):
        merger.add(np.zeros((1, 4, 5)), [1])


def test_merger_add_after_a_complete_result_raises(grid):
    merger = pg.Merger(grid)
    merger.add(np.zeros((15, 4, 5)), np.arange(15))
    merger.result()
    with pytest.raises(ValueError, match="already"):
        merger.add(np.zeros((1, 4, 5)), [0])


def test_merger_needs_a_grid():
    with pytest.raises(TypeError, match="grid must be a PatchGrid"):
        pg.Merger((11, 13))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reduce": "median"}, "reduce must be one of"),
        ({"window": "cosine"}, "window must be one of"),
        ({"window": np.ones((3, 3))}, "window must have the patch's shape"),
        ({"reduce": "max", "window": "hann"}, "window applies to"),
    ],
    ids=["reduce", "window", "window-shape", "window-with-max"],
)
def test_merger_checks_its_arguments(grid, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pg.Merger(grid, **kwargs)


@pytest.fixture(scope="module")
def large():
    """30 MB of float64 patches over a 40x48x48 volume: big enough to be cut into chunks."""
    grid, layout = _make((40, 48, 48), (8, 8, 8), (2, 2, 2), (0, 1, 2), "drop")
    patches = _random_patches(grid)
    return grid, layout, patches


@pytest.mark.parametrize(
    ("reduce", "window"),
    [("mean", None), ("mean", "gaussian"), ("sum", "triangular"), ("max", None)],
    ids=["mean", "mean-gaussian", "sum-triangular", "max"],
)
def test_large_merge_equals_the_loop(large, reduce, window):
    grid, layout, patches = large
    weight = None if window is None else window_nd(window, layout.size)
    expected, _ = layout.merge(_flat(patches, grid), reduce, weight)
    got = pg.merge(patches, grid, reduce=reduce, window=window)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_large_shift_merge_equals_the_loop():
    grid, layout = _make((41, 47, 45), (8, 8, 8), (3, 3, 3), (0, 1, 2), "shift")
    patches = _random_patches(grid, np.float32)
    expected, _ = layout.merge(_flat(patches, grid), "mean")
    np.testing.assert_allclose(pg.merge(patches, grid), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [None, "gaussian"], ids=["uniform", "gaussian"])
@pytest.mark.parametrize("edge", EDGES)
def test_argmax_is_the_argmax_of_the_blended_scores(edge, window):
    grid, layout = _make((1, 11, 13), (4, 5), (3, 2), (1, 2), edge)
    scores = _rng().standard_normal((*grid.counts, 5, 4, 5))
    weight = None if window is None else window_nd(window, layout.size)
    blended, count = layout.merge(_flat(scores, grid), "mean", weight)
    expected = np.argmax(blended, axis=0)
    expected[count[0] == 0] = 0
    got = pg.merge(scores, grid, reduce="argmax", window=window)
    np.testing.assert_array_equal(got, expected)


def test_argmax_gives_small_unsigned_labels():
    grid = pg.PatchGrid((1, 11, 13), (4, 5), (3, 2), edge="shift")
    scores = _rng().standard_normal((*grid.counts, 5, 4, 5))
    assert pg.merge(scores, grid, reduce="argmax").dtype == np.uint8


def test_merger_writes_into_out():
    grid, layout = _make((2, 11, 13), (4, 5), (3, 2), (1, 2), "pad")
    flat = _flat(_random_patches(grid), grid)
    out = np.full((2, 11, 13), np.nan)
    merger = pg.Merger(grid, window="hann", out=out)
    merger.add(flat, np.arange(len(grid)))
    expected, _ = layout.merge(flat, "mean", window_nd("hann", (4, 5)))
    np.testing.assert_allclose(merger.result(), expected, rtol=1e-12)


def test_merger_result_is_out():
    grid = pg.PatchGrid((11, 13), (4, 5), (3, 2), edge="pad")
    out = np.empty((11, 13))
    merger = pg.Merger(grid, out=out)
    merger.add(np.ones((len(grid), 4, 5)), np.arange(len(grid)))
    assert merger.result() is out


def test_merger_out_of_the_wrong_shape_raises():
    grid = pg.PatchGrid((11, 13), (4, 5), (3, 2))
    merger = pg.Merger(grid, out=np.empty((11, 12)))
    with pytest.raises(ValueError, match="out must have shape"):
        merger.add(np.ones((len(grid), 4, 5)), np.arange(len(grid)))


@pytest.mark.parametrize(("shape", "size", "stride", "axes"), MERGER_GRIDS, ids=MERGER_IDS)
def test_merger_coverage_with_an_array_window_after_adding_in_grid_order(shape, size, stride, axes):
    grid, layout = _make(shape, size, stride, axes, "shift")
    weight = _rng(6).uniform(0.1, 2.0, layout.size)
    merger = pg.Merger(grid, window=weight)
    for i in range(len(grid)):
        merger.add(np.zeros((1, *grid.patch_shape)), [i])
    np.testing.assert_allclose(merger.coverage(), coverage(layout, weight), rtol=1e-12)


@pytest.mark.parametrize("window", ["gaussian", "array"])
def test_merger_coverage_after_result_equals_the_loop(window):
    grid, layout = _make((11, 13), (4, 5), (3, 2), (0, 1), "even")
    weight = (
        _rng(6).uniform(0.1, 2.0, layout.size)
        if window == "array"
        else window_nd(window, layout.size)
    )
    merger = pg.Merger(grid, window=weight if window == "array" else window)
    merger.add(np.zeros((len(grid), 4, 5)), np.arange(len(grid)))
    merger.result()
    np.testing.assert_allclose(merger.coverage(), coverage(layout, weight), rtol=1e-12)


def test_integer_output_dtype_rounds_the_mean_to_nearest():
    # Two patches overlap on the middle voxel: (1 + 2) / 2 = 1.5 -> 2 (round half to even), and
    # 2 + 3 -> 2.5 -> 2; the ends keep their own value.
    grid = pg.PatchGrid(3, size=2, stride=1)
    patches = np.array([[1.0, 1.0], [2.0, 2.0]])
    got = pg.merge(patches, grid, dtype=np.int32)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, [1, 2, 2])


def test_integer_output_dtype_rounds_instead_of_truncating():
    grid = pg.PatchGrid(3, size=2, stride=1)
    patches = np.array([[0.9, 0.9], [0.9, 0.9]])
    np.testing.assert_array_equal(pg.merge(patches, grid, dtype=np.int64), [1, 1, 1])


# Exact, or a clear error: integers, narrowing casts, NaN, blending and precision (issue #13).

BIG = (2**60 + np.arange(24 * 30).reshape(24, 30)).astype(np.uint64)
needs_wide = pytest.mark.skipif(not WIDE, reason="no extended-precision longdouble here")


@needs_wide
@pytest.mark.parametrize("dtype", ["int64", "uint64"])
def test_64_bit_integers_above_2_53_come_back_exactly(dtype):
    image = BIG.astype(dtype)
    merged = pg.merge(pg.extract(image, 16, 8), image.shape, stride=8, dtype=image.dtype)
    np.testing.assert_array_equal(merged, image)


@needs_wide
def test_int64_tiles_come_back_exactly_with_dtype_int64():
    image = (2**60 + np.arange(64)).reshape(8, 8).astype(np.int64)
    np.testing.assert_array_equal(
        pg.merge(pg.extract(image, 4), image.shape, dtype=np.int64), image
    )


@needs_wide
def test_an_image_holding_int64_max_comes_back_exactly():
    image = np.full((8, 8), np.iinfo(np.int64).max, np.int64)
    image[0, 0] = np.iinfo(np.int64).min
    np.testing.assert_array_equal(
        pg.merge(pg.extract(image, 4), image.shape, dtype=np.int64), image
    )


def test_64_bit_integers_into_float64_are_refused_naming_what_to_use():
    with pytest.raises(ValueError, match=r"2\*\*53.*pass dtype=uint64.*reduce='max'"):
        pg.merge(pg.extract(BIG, 16, 8), BIG.shape, stride=8)


@pytest.mark.parametrize("reduce", ["max", "min"])
def test_max_and_min_of_64_bit_integers_are_exact(reduce):
    merged = pg.merge(pg.extract(BIG, 16, 8), BIG.shape, stride=8, reduce=reduce)
    assert merged.dtype == np.uint64
    np.testing.assert_array_equal(merged, BIG)


def test_integer_sums_the_accumulator_cannot_hold_are_refused():
    image = np.full((8, 8), 2**63 - 1, np.int64)
    with pytest.raises(ValueError, match="reduce='max' or 'min'"):
        pg.merge(pg.extract(image, 4, 2), image.shape, stride=2, reduce="sum")


@pytest.mark.parametrize("reduce", ["max", "min"])
def test_a_narrowing_cast_of_max_and_min_is_refused_not_wrapped(reduce):
    patches = np.full((4, 4, 4), 300, np.int16)
    with pytest.raises(ValueError, match="runs from 300 to 300, which dtype=uint8 cannot hold"):
        pg.merge(patches, (8, 8), stride=4, reduce=reduce, dtype=np.uint8)


def test_a_narrowing_merger_is_refused_not_wrapped():
    grid = pg.PatchGrid((8, 8), 4)
    merger = pg.Merger(grid, reduce="max", dtype=np.uint8)
    with pytest.raises(ValueError, match="dtype=uint8 cannot hold"):
        merger.add_all(np.full((4, 4, 4), 300, np.int16))  # finishes (and checks) every row


def test_values_that_fit_the_narrower_dtype_are_cast():
    merged = pg.merge(np.full((4, 4, 4), 200, np.int16), (8, 8), reduce="max", dtype=np.uint8)
    assert merged.dtype == np.uint8
    assert (merged == 200).all()


def test_nan_merged_into_integers_is_refused():
    with pytest.raises(ValueError, match="holds NaN, which dtype int16 cannot store"):
        pg.merge(np.full((4, 4, 4), np.nan), (8, 8), dtype=np.int16)


def test_nan_merged_into_an_integer_out_is_refused():
    merger = pg.Merger(pg.PatchGrid((8, 8), 4), out=np.zeros((8, 8), np.int32))
    with pytest.raises(ValueError, match="holds NaN, which dtype int32 cannot store"):
        merger.add_all(np.full((4, 4, 4), np.nan))  # finishes (and checks) every row


def test_a_dtype_narrower_than_out_is_checked_on_the_way_to_out():
    out = np.zeros((8, 8), np.uint8)
    merger = pg.Merger(pg.PatchGrid((8, 8), 4), reduce="max", dtype=np.int16, out=out)
    with pytest.raises(ValueError, match="dtype=uint8 cannot hold"):
        merger.add_all(np.full((4, 4, 4), 300, np.int16))  # finishes (and checks) every row


@pytest.mark.parametrize("window", ["uniform", "gaussian", "hann", "triangular"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("value", [1.0, 0.1, 1 / 3, -7.25, 1e-30])
def test_a_weighted_mean_of_equal_values_is_that_value_exactly(window, dtype, value):
    # MONAI's test_sliding_window_default: a constant in, the same constant out.
    image = np.full((23, 29), value, dtype)
    merged = pg.merge(pg.extract(image, (8, 6), (3, 2)), image.shape, stride=(3, 2),
                      window=window)  # fmt: skip
    assert merged.dtype == image.dtype
    np.testing.assert_array_equal(merged, image)


@pytest.mark.parametrize("window", ["gaussian", "hann", "triangular"])
def test_a_weighted_mean_never_leaves_the_range_of_what_it_averages(window):
    rng = np.random.default_rng(4)
    patches = rng.random((9 * 13, 8, 6), dtype=np.float32)
    grid = pg.PatchGrid((23, 29), (8, 6), (2, 2))
    merged = pg.merge(patches, grid, window=window)
    assert merged.min() >= patches.min()
    assert merged.max() <= patches.max()


def test_a_mean_over_4096_overlapping_patches_stays_within_1e_6():
    image = np.random.default_rng(5).uniform(1000, 2000, (31, 31, 31)).astype(np.float32)
    merged = pg.merge(pg.extract(image, 16, 1), image.shape, stride=1)
    assert pg.PatchGrid(image.shape, 16, 1).overlap == 4096
    np.testing.assert_allclose(merged, image, rtol=1e-6)


def test_a_mean_of_large_finite_float32_values_is_finite():
    merged = pg.merge(np.full((2, 4), 2e38, np.float32), (6,), stride=2)
    assert np.isfinite(merged).all()
    np.testing.assert_array_equal(merged, np.float32(2e38))


def test_a_sum_that_overflows_the_output_dtype_is_refused():
    with pytest.raises(ValueError, match="would overflow to inf"):
        pg.merge(np.full((2, 4), 2e38, np.float32), (6,), stride=2, reduce="sum")


def test_voxels_no_patch_covers_are_reported():
    patches = pg.extract(np.ones((10, 11)), 4, 3, edge="drop")
    with pytest.warns(pg.PatchgridWarning, match="10 of 110 voxels lie in no patch"):
        pg.merge(patches, (10, 11), stride=3, edge="drop")


def test_a_grid_that_covers_merges_without_a_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pg.merge(pg.extract(np.ones((10, 11)), 4, 3), (10, 11), stride=3)


def test_the_default_round_trip_restores_a_shape_the_stride_does_not_divide():
    volume = np.random.default_rng(6).random((10, 21, 30)).astype(np.float32)
    restored = pg.merge(pg.extract(volume, size=4, stride=3), volume.shape, stride=3)
    np.testing.assert_array_equal(restored, volume)


@pytest.mark.parametrize("flatten", [False, True])
def test_a_zero_length_axis_merges_into_an_empty_image(flatten):
    patches = pg.extract(np.zeros((0, 8), np.float32), (4, 4), flatten=flatten)
    merged = pg.merge(patches, (0, 8))
    assert merged.shape == (0, 8)
    assert merged.dtype == np.float32


def test_a_merger_over_an_empty_grid_gives_an_empty_image():
    assert pg.Merger(pg.PatchGrid((0, 8), 4)).result().shape == (0, 8)


def test_adding_after_result_says_result_was_called():
    merger = pg.Merger(pg.PatchGrid((8, 8), 4))
    merger.add_all(np.zeros((4, 4, 4)))
    merger.result()
    with pytest.raises(ValueError, match="result\\(\\) was already called"):
        merger.add(np.zeros((1, 4, 4)), [0])


def test_adding_with_no_indices_says_what_is_wrong():
    merger = pg.Merger(pg.PatchGrid((8, 8), 4))
    with pytest.raises(ValueError, match="batch has 1 patches but indices has 0"):
        merger.add(np.zeros((1, 4, 4)), [])


def test_complex_patches_take_an_array_window_without_a_warning():
    patches = np.full((4, 4, 4), 1 + 2j, np.complex64)
    merged = pg.merge(patches, (8, 8), window=np.linspace(0.5, 1, 16).reshape(4, 4))
    np.testing.assert_array_equal(merged, patches[0, 0, 0])
