"""extract: views, copies and gathers, checked against sliding_window_view and plain loops."""

import tracemalloc

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import patchgrid as pg
from reference import Layout


def _volume(shape, dtype=np.float64, seed=0):
    """Distinct values (modulo the dtype's range) so that a misplaced voxel shows."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _sliding_reference(image, size, stride):
    """All axes tiled, edge='drop': NumPy's sliding windows, every ``stride``-th one."""
    size = (size,) * image.ndim if isinstance(size, int) else size
    stride = (stride,) * image.ndim if isinstance(stride, int) else stride
    windows = sliding_window_view(image, size)
    return windows[tuple(slice(None, None, s) for s in stride)]


def _layout(shape, size, stride=None, axes=None, edge="drop"):
    """Build a reference Layout from extract-style arguments (ints broadcast)."""
    if axes is None:
        axes = tuple(range(len(shape)))
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    k = len(axes)
    size = (size,) * k if isinstance(size, int) else tuple(size)
    stride = size if stride is None else stride
    stride = (stride,) * k if isinstance(stride, int) else tuple(stride)
    edge = (edge,) * k if isinstance(edge, str) else tuple(edge)
    return Layout(shape, axes, size, stride, edge)


@pytest.fixture
def volume():
    return np.arange(10 * 20 * 30, dtype=np.float32).reshape(10, 20, 30)


def test_user_example_shape(volume):
    assert pg.extract(volume, size=4, stride=2).shape == (4, 9, 14, 4, 4, 4)


def test_user_example_values(volume):
    np.testing.assert_array_equal(
        pg.extract(volume, size=4, stride=2), _sliding_reference(volume, 4, 2)
    )


def test_user_example_is_a_view(volume):
    assert np.shares_memory(pg.extract(volume, size=4, stride=2), volume)


def test_user_example_is_read_only(volume):
    assert not pg.extract(volume, size=4, stride=2).flags.writeable


def test_writing_to_the_view_raises(volume):
    patches = pg.extract(volume, size=4, stride=2)
    with pytest.raises(ValueError, match="read-only"):
        patches[0, 0, 0, 0, 0, 0] = 1


def test_writing_to_the_view_leaves_the_image_alone(volume):
    patches = pg.extract(volume, size=4, stride=2)
    with pytest.raises(ValueError, match="read-only"):
        patches[...] = 0
    np.testing.assert_array_equal(volume.ravel(), np.arange(volume.size, dtype=np.float32))


def test_view_sees_later_changes_to_the_image(volume):
    patches = pg.extract(volume, size=4, stride=2)
    volume[9, 19, 29] = -1
    assert patches[3, 8, 13, 3, 3, 3] == -1


def test_extracting_a_view_allocates_nothing_like_the_patches():
    # 41**3 patches of 8**3 float64 would take 282 MB as a copy; a view takes a few bytes.
    image = np.zeros((48, 48, 48))
    tracemalloc.start()
    try:
        patches = pg.extract(image, size=8, stride=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert patches.shape == (41, 41, 41, 8, 8, 8)
    assert peak < 64 * 1024


def test_extracting_a_big_view_shares_memory():
    image = np.zeros((48, 48, 48))
    assert np.shares_memory(pg.extract(image, size=8, stride=1), image)


SHAPES = [
    ((17,), 4, 3),
    ((17,), 1, 1),
    ((17,), 17, 1),
    ((9, 11), 3, 2),
    ((9, 11), (2, 5), (3, 1)),
    ((9, 11), (9, 11), 1),
    ((6, 7, 8), 3, 1),
    ((6, 7, 8), (2, 3, 4), (2, 3, 4)),
    ((10, 20, 30), 4, 2),
    ((4, 5, 6, 7), 2, (1, 2, 3, 1)),
    ((3, 4, 5, 4, 3), (2, 2, 3, 2, 1), 2),
]
SHAPE_IDS = ["1d", "1d-size1", "1d-whole", "2d", "2d-mixed", "2d-whole", "3d-dense", "3d-tiles",
             "3d-user", "4d", "5d"]  # fmt: skip
DTYPES = ["bool", "uint8", "int16", "float16", "float32", "float64", "complex64"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "size", "stride"), SHAPES, ids=SHAPE_IDS)
def test_view_equals_sliding_window_view(shape, size, stride, dtype):
    image = _volume(shape, dtype)
    np.testing.assert_array_equal(
        pg.extract(image, size, stride, edge="drop"), _sliding_reference(image, size, stride)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_view_keeps_the_dtype(dtype):
    assert pg.extract(_volume((9, 11), dtype), 3, 2).dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "size", "stride"), SHAPES, ids=SHAPE_IDS)
def test_copy_equals_sliding_window_view(shape, size, stride, dtype):
    image = _volume(shape, dtype)
    np.testing.assert_array_equal(
        pg.extract(image, size, stride, copy=True, edge="drop"),
        _sliding_reference(image, size, stride),
    )


@pytest.mark.parametrize(("shape", "size", "stride"), SHAPES, ids=SHAPE_IDS)
def test_copy_is_c_contiguous(shape, size, stride):
    assert pg.extract(_volume(shape), size, stride, copy=True).flags.c_contiguous


def test_copy_does_not_share_memory(volume):
    assert not np.shares_memory(pg.extract(volume, 4, 2, copy=True), volume)


def test_copy_is_writeable(volume):
    assert pg.extract(volume, 4, 2, copy=True).flags.writeable


def test_copy_keeps_the_dtype():
    assert pg.extract(_volume((9, 11), np.int16), 3, 2, copy=True).dtype == np.int16


def test_copy_of_a_large_grid_equals_the_reference():
    # Large enough that the copy is cut into several cache-sized chunks.
    image = _volume((40, 64, 64), np.float32)
    np.testing.assert_array_equal(
        pg.extract(image, (5, 6, 7), (3, 2, 3), copy=True, edge="drop"),
        _sliding_reference(image, (5, 6, 7), (3, 2, 3)),
    )


@pytest.mark.parametrize("copy", [False, True], ids=["view", "copy"])
def test_flatten_shape(volume, copy):
    assert pg.extract(volume, 4, 2, flatten=True, copy=copy).shape == (504, 4, 4, 4)


@pytest.mark.parametrize("edge", ["drop", "pad", "shift", "even"])
def test_flatten_is_in_the_order_of_grid_starts(edge):
    image = _volume((11, 13))
    grid = pg.PatchGrid(image.shape, size=4, stride=3, edge=edge)
    layout = _layout(image.shape, 4, 3, edge=edge)
    padded = layout.padded(image)
    expected = np.stack([padded[s0 : s0 + 4, s1 : s1 + 4] for s0, s1 in grid.starts().tolist()])
    np.testing.assert_array_equal(pg.extract(image, grid, flatten=True), expected)


@pytest.mark.parametrize("edge", ["drop", "pad", "shift", "even"])
def test_flatten_equals_the_reference_in_c_order(edge):
    image = _volume((11, 13))
    layout = _layout(image.shape, 4, 3, edge=edge)
    expected = layout.extract(image).reshape(-1, 4, 4)
    np.testing.assert_array_equal(pg.extract(image, 4, 3, edge=edge, flatten=True), expected)


def test_flatten_1d_axis_stays_a_view():
    image = _volume((20,))
    assert np.shares_memory(pg.extract(image, 4, 2, flatten=True), image)


@pytest.mark.parametrize("edge", ["drop", "pad", "shift", "even"])
def test_out_full_shape(edge):
    image = _volume((11, 13))
    layout = _layout(image.shape, 4, 3, edge=edge)
    out = np.empty((*layout.counts, 4, 4))
    pg.extract(image, 4, 3, edge=edge, out=out)
    np.testing.assert_array_equal(out, layout.extract(image))


@pytest.mark.parametrize("edge", ["drop", "pad", "shift", "even"])
def test_out_flat_shape(edge):
    image = _volume((11, 13))
    layout = _layout(image.shape, 4, 3, edge=edge)
    out = np.empty((len(layout.corners), 4, 4))
    pg.extract(image, 4, 3, edge=edge, out=out)
    np.testing.assert_array_equal(out, layout.extract(image).reshape(-1, 4, 4))


def test_out_is_returned():
    image = _volume((11, 13))
    out = np.empty((3, 4, 4, 4))
    assert pg.extract(image, 4, 3, out=out, edge="drop") is out


def test_out_of_a_wider_dtype_gets_the_values():
    image = _volume((11, 13), np.int16)
    out = np.empty((3, 4, 4, 4), dtype=np.float64)
    pg.extract(image, 4, 3, out=out, edge="drop")
    np.testing.assert_array_equal(out, _sliding_reference(image, 4, 3))


@pytest.mark.parametrize(
    "shape",
    [(3, 3, 4, 4), (12, 4, 5), (11, 4, 4), (3, 4, 4, 5), (3, 4, 4, 4, 1)],
    ids=["counts", "flat-patch", "flat-count", "patch", "extra-axis"],
)
def test_out_of_the_wrong_shape_raises(shape):
    image = _volume((11, 13))
    with pytest.raises(ValueError, match="out must have shape"):
        pg.extract(image, 4, 3, out=np.empty(shape))


def test_read_only_out_raises():
    out = np.empty((3, 4, 4, 4))
    out.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        pg.extract(_volume((11, 13)), 4, 3, out=out, edge="drop")


def test_out_of_a_narrower_kind_raises():
    with pytest.raises(TypeError, match="out has dtype"):
        pg.extract(_volume((11, 13)), 4, 3, out=np.empty((3, 4, 4, 4), dtype=np.int32), edge="drop")


def test_out_that_is_not_an_array_raises():
    with pytest.raises(TypeError, match="out must be"):
        pg.extract(_volume((11, 13)), 4, 3, out=[[0.0]])


PAD_MODES = ["constant", "edge", "linear_ramp", "maximum", "mean", "median", "minimum",
             "reflect", "symmetric", "wrap"]  # fmt: skip


@pytest.mark.parametrize("mode", PAD_MODES)
def test_pad_modes_equal_numpy_pad(mode):
    image = _volume((11, 13, 3))
    layout = _layout(image.shape, (4, 5), 3, axes=(0, 1), edge="pad")
    got = pg.extract(image, (4, 5), 3, axes=(0, 1), edge="pad", pad_mode=mode)
    np.testing.assert_array_equal(got, layout.extract(image, mode))


@pytest.mark.parametrize("value", [7, -2.5], ids=["int", "float"])
def test_pad_value(value):
    image = _volume((11, 13))
    layout = _layout(image.shape, 4, 3, edge="pad")
    got = pg.extract(image, 4, 3, edge="pad", pad_value=value)
    np.testing.assert_array_equal(got, layout.extract(image, "constant", value))


def test_pad_value_reaches_the_last_patch():
    got = pg.extract(np.arange(11.0), 4, 3, edge="pad", pad_value=-1)
    np.testing.assert_array_equal(got[-1], [9.0, 10.0, -1.0, -1.0])


def test_pad_value_is_ignored_by_other_modes():
    image = _volume((11,))
    layout = _layout(image.shape, 4, 3, edge="pad")
    got = pg.extract(image, 4, 3, edge="pad", pad_mode="edge", pad_value=99)
    np.testing.assert_array_equal(got, layout.extract(image, "edge"))


def test_pad_is_a_read_only_view_of_a_padded_copy():
    image = _volume((11, 13))
    patches = pg.extract(image, 4, 3, edge="pad")
    assert (np.shares_memory(patches, image), patches.flags.writeable) == (False, False)


def test_pad_result_shape():
    assert pg.extract(_volume((11, 13)), 4, 3, edge="pad").shape == (4, 4, 4, 4)


EDGE_CASES = [
    ((11,), 4, 3),
    ((11, 13), 4, 3),
    ((11, 13), (4, 5), (3, 2)),
    ((14, 9, 10), (4, 3, 5), (4, 2, 3)),
    ((17, 5), (6, 5), (5, 1)),
    ((29, 8), (8, 3), (6, 2)),
]
EDGE_IDS = ["1d", "2d", "2d-mixed", "3d", "whole-axis", "nnunet-like"]


@pytest.mark.parametrize("copy", [False, True], ids=["default", "copy"])
@pytest.mark.parametrize("edge", ["drop", "pad", "shift", "even"])
@pytest.mark.parametrize(("shape", "size", "stride"), EDGE_CASES, ids=EDGE_IDS)
def test_edges_equal_the_loop_reference(shape, size, stride, edge, copy):
    image = _volume(shape, np.int16)
    layout = _layout(shape, size, stride, edge=edge)
    np.testing.assert_array_equal(
        pg.extract(image, size, stride, edge=edge, copy=copy), layout.extract(image)
    )


@pytest.mark.parametrize("edge", ["drop", "pad", "shift", "even"])
def test_mixed_edges_per_axis_equal_the_loop_reference(edge):
    image = _volume((11, 13, 12))
    edges = ("shift", edge, "even")
    layout = _layout(image.shape, (4, 5, 3), (3, 4, 2), edge=edges)
    got = pg.extract(image, (4, 5, 3), (3, 4, 2), edge=edges)
    np.testing.assert_array_equal(got, layout.extract(image))


@pytest.mark.parametrize("edge", ["shift", "even"])
def test_shift_and_even_are_copies(edge):
    image = _volume((11, 13))
    assert not np.shares_memory(pg.extract(image, 4, 3, edge=edge), image)


def test_shift_docstring_example():
    np.testing.assert_array_equal(
        pg.extract(np.arange(10), size=4, stride=3, edge="shift"),
        [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]],
    )


@pytest.mark.parametrize("edge", ["pad", "shift", "even"])
def test_image_smaller_than_the_patch_is_padded(edge):
    image = _volume((3, 10))
    expected = np.pad(image, ((0, 2), (0, 0)))[None, None]
    np.testing.assert_array_equal(pg.extract(image, (5, 10), edge=edge), expected)


@pytest.mark.parametrize("edge", ["pad", "shift", "even"])
def test_image_smaller_than_the_patch_with_a_pad_mode(edge):
    image = _volume((3, 2))
    expected = np.pad(image, ((0, 2), (0, 3)), mode="reflect")[None, None]
    np.testing.assert_array_equal(
        pg.extract(image, (5, 5), edge=edge, pad_mode="reflect"), expected
    )


def test_image_smaller_than_the_patch_with_drop_raises():
    with pytest.raises(ValueError, match="size"):
        pg.extract(_volume((3, 10)), 4, edge="drop")


@pytest.mark.parametrize("edge", ["drop", "pad", "shift", "even"])
def test_gapped_strides_equal_the_loop_reference(edge):
    image = _volume((13, 20))
    layout = _layout(image.shape, (2, 3), (4, 7), edge=edge)
    np.testing.assert_array_equal(
        pg.extract(image, (2, 3), (4, 7), edge=edge), layout.extract(image)
    )


AXES_CASES = [
    ((3, 10, 12), (4, 4), 2, None),
    ((10, 12, 3), (4, 4), 2, (0, 1)),
    ((10, 3, 12), (4, 4), (3, 2), (0, 2)),
    ((10, 3, 12), (4, 4), (3, 2), (-3, -1)),
    ((10, 3, 12), (5, 4), (2, 3), (2, 0)),
    ((2, 10, 3, 12), 4, 3, (1, 3)),
]
AXES_IDS = [
    "channels-first",
    "channels-last",
    "channels-middle",
    "negative",
    "unsorted",
    "two-untiled",
]


@pytest.mark.parametrize("edge", ["drop", "pad", "shift", "even"])
@pytest.mark.parametrize(("shape", "size", "stride", "axes"), AXES_CASES, ids=AXES_IDS)
def test_axes_equal_the_loop_reference(shape, size, stride, axes, edge):
    image = _volume(shape)
    ref_axes = (len(shape) - 2, len(shape) - 1) if axes is None else axes
    layout = _layout(shape, size, stride, ref_axes, edge)
    got = pg.extract(image, size, stride, axes=axes, edge=edge)
    np.testing.assert_array_equal(got, layout.extract(image))


@pytest.mark.parametrize(("shape", "size", "stride", "axes"), AXES_CASES, ids=AXES_IDS)
def test_every_patch_is_the_image_at_its_slices(shape, size, stride, axes):
    image = _volume(shape)
    grid = pg.PatchGrid(shape, size, stride, axes=axes)
    expected = np.stack([image[grid.slices(i)] for i in range(len(grid))])
    np.testing.assert_array_equal(pg.extract(image, grid, flatten=True), expected)


def test_channels_are_whole_in_each_patch():
    image = _volume((3, 10, 12))
    assert pg.extract(image, (4, 4), 2).shape == (4, 5, 3, 4, 4)


def test_channels_view_shares_memory():
    image = _volume((10, 12, 3))
    assert np.shares_memory(pg.extract(image, (4, 4), 2, axes=(0, 1)), image)


@pytest.mark.parametrize("edge", ["drop", "pad", "shift", "even"])
def test_grid_as_size_equals_arguments(edge):
    image = _volume((11, 13, 2))
    grid = pg.PatchGrid(image.shape, (4, 5), 3, axes=(0, 1), edge=edge, pad_value=3)
    np.testing.assert_array_equal(
        pg.extract(image, grid),
        pg.extract(image, (4, 5), 3, axes=(0, 1), edge=edge, pad_value=3),
    )


def test_grid_as_size_equals_the_loop_reference():
    image = _volume((11, 13, 2))
    grid = pg.PatchGrid(image.shape, (4, 5), 3, axes=(0, 1), edge="pad", pad_value=3)
    layout = _layout(image.shape, (4, 5), 3, (0, 1), "pad")
    np.testing.assert_array_equal(pg.extract(image, grid), layout.extract(image, "constant", 3))


def test_grid_made_for_another_shape_raises():
    grid = pg.PatchGrid((10, 12), 4)
    with pytest.raises(ValueError, match=r"grid was made for shape \(10, 12\)"):
        pg.extract(_volume((10, 13)), grid)


NONCONTIGUOUS = {
    "transposed": lambda x: x.T,
    "stepped": lambda x: x[::2, ::3],
    "reversed": lambda x: x[::-1, ::-1],
    "fortran": np.asfortranarray,
    "column": lambda x: x[:, 5:6],
}


@pytest.mark.parametrize("copy", [False, True], ids=["view", "copy"])
@pytest.mark.parametrize("edge", ["drop", "shift"])
@pytest.mark.parametrize("make", NONCONTIGUOUS.values(), ids=NONCONTIGUOUS.keys())
def test_noncontiguous_input(make, edge, copy):
    image = make(_volume((24, 30)))
    layout = _layout(image.shape, (3, 1), (2, 1), edge=edge)
    got = pg.extract(image, (3, 1), (2, 1), edge=edge, copy=copy)
    np.testing.assert_array_equal(got, layout.extract(image))


def test_noncontiguous_view_shares_memory():
    base = _volume((24, 30))
    image = base[::2, ::3].T
    assert np.shares_memory(pg.extract(image, 3, 2, edge="drop"), base)


def test_read_only_input():
    image = np.broadcast_to(np.arange(12.0), (5, 12))
    np.testing.assert_array_equal(
        pg.extract(image, 3, 2, edge="drop"), _sliding_reference(image, 3, 2)
    )


def test_nested_list_input():
    image = [[1, 2, 3, 4], [5, 6, 7, 8]]
    np.testing.assert_array_equal(
        pg.extract(image, (1, 2)), _sliding_reference(np.array(image), (1, 2), (1, 2))
    )


@pytest.mark.parametrize(
    "image", [object(), "abcdef", None, 12], ids=["object", "str", "none", "int"]
)
def test_non_array_input_raises(image):
    with pytest.raises(TypeError, match="image must be an array"):
        pg.extract(image, 2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"size": 0}, ValueError, "size must be positive"),
        ({"size": 2, "stride": -1}, ValueError, "stride must be positive"),
        ({"size": 2.5}, TypeError, "size must be an integer"),
        ({"size": 2, "edge": "clip"}, ValueError, "edge must be one of"),
        ({"size": 2, "axes": 3}, ValueError, "axes has axis 3"),
        ({"size": 2, "edge": "pad", "pad_mode": "zero"}, ValueError, "pad_mode must be one of"),
    ],
    ids=["size", "stride", "size-float", "edge", "axes", "pad-mode"],
)
def test_extract_raises_the_grid_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        pg.extract(_volume((6, 7)), **kwargs)


def test_pad_value_that_does_not_fit_the_dtype_raises():
    image = np.arange(30, dtype=np.uint8).reshape(5, 6)
    with pytest.raises(ValueError, match=r"pad_value=-1 cannot be stored"):
        pg.extract(image, 4, 3, edge="pad", pad_value=-1)


def test_pad_value_is_not_checked_when_nothing_is_padded():
    image = np.arange(32, dtype=np.uint8).reshape(4, 8)
    patches = pg.extract(image, 4, 4, edge="pad", pad_value=-1)
    assert patches.shape == (1, 2, 4, 4)


# extract's out= obeys the one cast rule on every path (issue #13).


def test_out_of_a_narrower_integer_dtype_refuses_values_it_cannot_hold():
    with pytest.raises(ValueError, match="runs from 300 to 300, which dtype=int8 cannot hold"):
        pg.extract(np.full((8, 8), 300, np.int16), 4, out=np.zeros((2, 2, 4, 4), np.int8))


def test_out_of_a_narrower_integer_dtype_takes_values_that_fit():
    out = pg.extract(np.full((8, 8), 100, np.int16), 4, out=np.zeros((2, 2, 4, 4), np.int8))
    assert (out == 100).all()


def test_a_lazy_image_into_a_narrower_out_refuses_values_it_cannot_hold():
    zarr = pytest.importorskip("zarr")
    image = zarr.create_array(store={}, shape=(8, 8), dtype="i2")
    image[:] = 143
    with pytest.raises(ValueError, match="143 to 143, which dtype=int8 cannot hold"):
        pg.extract(image, 4, out=np.zeros((2, 2, 4, 4), np.int8))


@pytest.mark.parametrize("flatten", [False, True])
def test_a_lazy_image_fills_a_non_contiguous_out(flatten):
    zarr = pytest.importorskip("zarr")
    image = zarr.create_array(store={}, shape=(8, 8), dtype="i2")
    image[:] = np.arange(64).reshape(8, 8)
    shape = (4, 4, 4) if flatten else (2, 2, 4, 4)
    base = np.zeros((*shape, 2), np.int16)
    out = base[..., 0]  # a view that no reshape can keep
    result = pg.extract(image, 4, out=out, flatten=flatten)
    assert result is out
    np.testing.assert_array_equal(base[..., 0], pg.extract(image[:], 4, flatten=flatten))


def test_an_empty_axis_gives_no_patches():
    assert pg.extract(np.zeros((0, 8)), (4, 4)).shape == (0, 2, 4, 4)
