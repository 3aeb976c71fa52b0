"""PatchGrid: layout arithmetic, checked against the reference rules in reference.py."""

import copy
import pickle

import numpy as np
import pytest

import patchgrid as pg
from reference import Layout, axis_starts

USER_SHAPE = (10, 20, 30)


@pytest.fixture
def user_grid():
    """The question in DESIGN.md: a 10x20x30 volume, patches of 4, stride 2."""
    return pg.PatchGrid(USER_SHAPE, size=4, stride=2)


@pytest.fixture
def user_layout():
    return Layout(USER_SHAPE, (0, 1, 2), (4, 4, 4), (2, 2, 2), ("drop",) * 3)


def test_user_example_counts(user_grid):
    assert user_grid.counts == (4, 9, 14)


def test_user_example_len(user_grid):
    assert len(user_grid) == 4 * 9 * 14


def test_user_example_first_center(user_grid):
    assert user_grid.centers()[0].tolist() == [2, 2, 2]


def test_user_example_last_center(user_grid):
    assert user_grid.centers()[-1].tolist() == [6 + 2, 16 + 2, 26 + 2]


def test_user_example_starts(user_grid, user_layout):
    np.testing.assert_array_equal(user_grid.starts(), np.array(user_layout.corners))


def test_user_example_starts_shape_and_dtype(user_grid):
    starts = user_grid.starts()
    assert starts.shape == (504, 3)
    assert starts.dtype.kind == "i"


def test_user_example_centers_are_start_plus_half_size(user_grid, user_layout):
    expected = np.array(user_layout.corners) + 4 // 2
    np.testing.assert_array_equal(user_grid.centers(), expected)


def test_user_example_slices_of_second_patch(user_grid):
    assert user_grid.slices(1) == (slice(0, 4), slice(0, 4), slice(2, 6))


def test_user_example_slices_of_a_position(user_grid):
    assert user_grid.slices((1, 2, 3)) == (slice(2, 6), slice(4, 8), slice(6, 10))


def test_user_example_slices_of_every_patch(user_grid, user_layout):
    got = [user_grid.slices(i) for i in range(len(user_grid))]
    assert got == [user_layout.slices(c) for c in user_layout.corners]


def test_user_example_iteration_in_c_order(user_grid, user_layout):
    assert list(user_grid) == [user_layout.slices(c) for c in user_layout.corners]


@pytest.mark.parametrize(
    ("index", "position"),
    [(0, (0, 0, 0)), (1, (0, 0, 1)), (14, (0, 1, 0)), (126, (1, 0, 0)), (503, (3, 8, 13))],
    ids=["first", "second", "next-row", "next-plane", "last"],
)
def test_user_example_position(user_grid, index, position):
    assert user_grid.position(index) == position


@pytest.mark.parametrize(
    ("index", "position"),
    [(0, (0, 0, 0)), (1, (0, 0, 1)), (14, (0, 1, 0)), (126, (1, 0, 0)), (503, (3, 8, 13))],
    ids=["first", "second", "next-row", "next-plane", "last"],
)
def test_user_example_index(user_grid, index, position):
    assert user_grid.index(position) == index


def test_negative_index_counts_from_the_end(user_grid):
    assert user_grid.position(-1) == (3, 8, 13)


def test_position_and_index_are_inverse_for_every_patch(user_grid):
    numbers = [user_grid.index(user_grid.position(i)) for i in range(len(user_grid))]
    assert numbers == list(range(len(user_grid)))


def test_numpy_integer_index_is_accepted(user_grid):
    assert user_grid.slices(np.int64(1)) == (slice(0, 4), slice(0, 4), slice(2, 6))


def test_user_example_ndim_and_patch_shape(user_grid):
    assert (user_grid.ndim, user_grid.patch_shape) == (3, (4, 4, 4))


def test_user_example_is_regular(user_grid):
    assert user_grid.is_regular


def test_user_example_needs_no_padding(user_grid):
    assert user_grid.pad_width == ((0, 0), (0, 0), (0, 0))


def test_normalised_attributes(user_grid):
    assert (user_grid.shape, user_grid.size, user_grid.stride, user_grid.axes) == (
        USER_SHAPE,
        (4, 4, 4),
        (2, 2, 2),
        (0, 1, 2),
    )


def test_edge_attribute_is_per_axis(user_grid):
    assert user_grid.edge == ("shift", "shift", "shift")  # the default edge policy


def test_per_axis_size_and_stride():
    grid = pg.PatchGrid((10, 20, 30), size=(2, 4, 6), stride=(1, 2, 3))
    layout = Layout((10, 20, 30), (0, 1, 2), (2, 4, 6), (1, 2, 3), ("drop",) * 3)
    np.testing.assert_array_equal(grid.starts(), np.array(layout.corners))


def test_per_axis_size_and_stride_counts():
    grid = pg.PatchGrid((10, 20, 30), size=(2, 4, 6), stride=(1, 2, 3))
    assert grid.counts == ((10 - 2) // 1 + 1, (20 - 4) // 2 + 1, (30 - 6) // 3 + 1)


def test_per_axis_size_gives_patch_shape():
    assert pg.PatchGrid((10, 20, 30), size=(2, 4, 6)).patch_shape == (2, 4, 6)


def test_stride_defaults_to_size():
    grid = pg.PatchGrid((8, 12), size=4)
    assert (grid.stride, grid.counts) == ((4, 4), (2, 3))


def test_stride_none_equals_stride_size():
    assert pg.PatchGrid((8, 12), size=4) == pg.PatchGrid((8, 12), size=4, stride=4)


def test_int_size_tiles_every_axis():
    assert pg.PatchGrid((3, 10, 20), size=2).axes == (0, 1, 2)


def test_size_tuple_tiles_the_last_axes():
    assert pg.PatchGrid((3, 10, 20), size=(4, 4)).axes == (1, 2)


def test_stride_tuple_tiles_the_last_axes():
    assert pg.PatchGrid((3, 10, 20), size=4, stride=(2, 2)).axes == (1, 2)


def test_int_shape_means_1d():
    assert pg.PatchGrid(10, size=4, stride=3).counts == (3,)


@pytest.mark.parametrize(
    ("axes", "expected"),
    [((-2, -1), (1, 2)), ((-3,), (0,)), ((0, -1), (0, 2)), (-1, (2,)), (1, (1,))],
    ids=["last-two", "first-negative", "mixed", "int-negative", "int"],
)
def test_axes_are_normalised(axes, expected):
    assert pg.PatchGrid((6, 7, 8), size=2, axes=axes).axes == expected


def test_unsorted_axes_are_sorted_with_their_sizes():
    grid = pg.PatchGrid((10, 12, 14), size=(3, 5), stride=(1, 2), axes=(2, 0))
    assert (grid.axes, grid.size, grid.stride) == ((0, 2), (5, 3), (2, 1))


def test_unsorted_axes_starts_follow_increasing_axes():
    grid = pg.PatchGrid((10, 12, 14), size=(3, 5), stride=(1, 2), axes=(2, 0), edge="drop")
    layout = Layout((10, 12, 14), (2, 0), (3, 5), (1, 2), ("drop", "drop"))
    np.testing.assert_array_equal(grid.starts(), np.array(layout.corners))


def test_unsorted_axes_sort_per_axis_edges():
    grid = pg.PatchGrid((10, 12), size=(3, 5), stride=(3, 2), axes=(1, 0), edge=("shift", "pad"))
    assert grid.edge == ("pad", "shift")


def test_channels_are_carried_whole_in_patch_shape():
    grid = pg.PatchGrid((3, 10, 20, 30), size=(4, 4, 4), stride=2)
    assert grid.patch_shape == (3, 4, 4, 4)


def test_channels_last_carried_whole_in_patch_shape():
    grid = pg.PatchGrid((10, 20, 5), size=4, stride=2, axes=(0, 1))
    assert grid.patch_shape == (4, 4, 5)


def test_channels_are_sliced_whole():
    grid = pg.PatchGrid((3, 10, 20, 30), size=(4, 4, 4), stride=2)
    assert grid.slices((1, 2, 3)) == (slice(None), slice(2, 6), slice(4, 8), slice(6, 10))


def test_channels_count_has_no_count_axis():
    grid = pg.PatchGrid((3, 10, 20, 30), size=(4, 4, 4), stride=2)
    assert grid.counts == (4, 9, 14)


def test_starts_cover_tiled_axes_only():
    grid = pg.PatchGrid((3, 10, 20, 30), size=(4, 4, 4), stride=2)
    assert grid.starts().shape == (504, 3)


def test_padded_shape_keeps_untiled_axes():
    grid = pg.PatchGrid((3, 10), size=4, stride=4, axes=1, edge="pad")
    assert grid.padded_shape == (3, 12)


# (length, size, stride): exact fits, remainders, stride 1, stride == size, odd rounding cases.
AXIS_CASES = [
    (10, 4, 2),
    (10, 4, 3),
    (11, 4, 3),
    (10, 4, 4),
    (10, 3, 4),
    (17, 5, 3),
    (7, 3, 1),
    (4, 4, 2),
    (5, 4, 2),
    (9, 2, 2),
    (100, 16, 7),
    (29, 8, 6),
    (13, 6, 5),
]
AXIS_IDS = [f"L{length}-P{size}-S{stride}" for length, size, stride in AXIS_CASES]
EDGES = ["drop", "pad", "shift", "even"]


@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize(("length", "size", "stride"), AXIS_CASES, ids=AXIS_IDS)
def test_axis_starts_match_the_reference(length, size, stride, edge):
    grid = pg.PatchGrid(length, size, stride, edge=edge)
    assert grid.axis_starts(0).tolist() == axis_starts(length, size, stride, edge)[0]


@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize(("length", "size", "stride"), AXIS_CASES, ids=AXIS_IDS)
def test_pad_width_matches_the_reference(length, size, stride, edge):
    grid = pg.PatchGrid(length, size, stride, edge=edge)
    assert grid.pad_width == ((0, axis_starts(length, size, stride, edge)[1]),)


@pytest.mark.parametrize(
    ("length", "size", "stride", "expected"),
    [
        (10, 4, 3, [0, 3, 6]),  # exact: (10 - 4) / 3 = 2 steps
        (11, 4, 3, [0, 2, 5, 7]),  # n = 4, step 7/3: 0, 2.33, 4.67, 7
        (9, 4, 3, [0, 2, 5]),  # n = 3, step 2.5: round(2.5) = 2, NumPy rounds half to even
        (14, 4, 4, [0, 3, 7, 10]),  # n = 4, step 10/3: 0, 3.33, 6.67, 10
        (4, 4, 2, [0]),  # the image is exactly one patch
    ],
    ids=["exact", "thirds", "half-to-even", "longer", "one-patch"],
)
def test_even_starts_worked_examples(length, size, stride, expected):
    assert pg.PatchGrid(length, size, stride, edge="even").axis_starts(0).tolist() == expected


def test_shift_moves_last_patch_to_the_border():
    assert pg.PatchGrid(11, 4, 3, edge="shift").axis_starts(0).tolist() == [0, 3, 6, 7]


def test_pad_pads_the_far_end():
    grid = pg.PatchGrid(11, 4, 3, edge="pad")
    assert (grid.axis_starts(0).tolist(), grid.pad_width) == ([0, 3, 6, 9], ((0, 2),))


def test_drop_leaves_trailing_voxels():
    grid = pg.PatchGrid(11, 4, 3, edge="drop")
    assert grid.axis_starts(0).tolist() == [0, 3, 6]


@pytest.mark.parametrize("edge", EDGES)
def test_edge_per_axis(edge):
    grid = pg.PatchGrid((11, 13), size=4, stride=3, edge=("drop", edge))
    layout = Layout((11, 13), (0, 1), (4, 4), (3, 3), ("drop", edge))
    np.testing.assert_array_equal(grid.starts(), np.array(layout.corners))


def test_edge_per_axis_pads_only_its_axis():
    grid = pg.PatchGrid((11, 11), size=4, stride=3, edge=("shift", "pad"))
    assert grid.pad_width == ((0, 0), (0, 2))


@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize(
    ("shape", "size", "stride"),
    [((10, 20, 30), 4, 2), ((11, 13, 7), (4, 5, 3), (3, 2, 3)), ((9, 9), 4, 3)],
    ids=["user", "mixed", "square"],
)
def test_nd_starts_are_the_product_of_axis_starts(shape, size, stride, edge):
    grid = pg.PatchGrid(shape, size, stride, edge=edge)
    sizes = (size,) * len(shape) if isinstance(size, int) else size
    strides = (stride,) * len(shape) if isinstance(stride, int) else stride
    layout = Layout(shape, range(len(shape)), sizes, strides, (edge,) * len(shape))
    np.testing.assert_array_equal(grid.starts(), np.array(layout.corners))


@pytest.mark.parametrize(
    ("edge", "regular"),
    [("drop", True), ("pad", True), ("shift", False), ("even", False)],
    ids=["drop", "pad", "shift", "even"],
)
def test_is_regular_with_a_remainder(edge, regular):
    assert pg.PatchGrid(11, 4, 3, edge=edge).is_regular is regular


@pytest.mark.parametrize("edge", EDGES)
def test_is_regular_when_the_stride_fits(edge):
    assert pg.PatchGrid(10, 4, 3, edge=edge).is_regular


@pytest.mark.parametrize("edge", ["pad", "shift", "even"])
def test_small_image_gets_one_patch(edge):
    assert pg.PatchGrid((3, 10), size=(5, 4), stride=2, edge=edge).axis_starts(0).tolist() == [0]


@pytest.mark.parametrize("edge", ["pad", "shift", "even"])
def test_small_image_is_padded_up_to_the_patch(edge):
    grid = pg.PatchGrid((3, 10), size=(5, 4), stride=2, edge=edge)
    assert grid.pad_width[0] == (0, 2)


@pytest.mark.parametrize("edge", ["pad", "shift", "even"])
def test_small_image_padded_shape(edge):
    assert pg.PatchGrid((3, 2), size=(4, 4), edge=edge).padded_shape == (4, 4)


@pytest.mark.parametrize("edge", ["pad", "shift", "even"])
def test_small_image_is_covered(edge):
    assert pg.PatchGrid((3, 2), size=(4, 4), edge=edge).covers


def test_small_image_with_drop_raises():
    with pytest.raises(ValueError, match="size"):
        pg.PatchGrid((3, 10), size=(5, 4), stride=2, edge="drop")


def test_small_image_with_drop_on_one_axis_raises():
    with pytest.raises(ValueError, match="size"):
        pg.PatchGrid((3, 10), size=(5, 4), edge=("drop", "pad"))


GAPPED = [(10, 2, 3), (11, 2, 4), (13, 2, 4), (20, 3, 7), (9, 1, 5)]
GAPPED_IDS = [f"L{length}-P{size}-S{stride}" for length, size, stride in GAPPED]


@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize(("length", "size", "stride"), GAPPED, ids=GAPPED_IDS)
def test_gapped_starts_match_the_reference(length, size, stride, edge):
    grid = pg.PatchGrid(length, size, stride, edge=edge)
    assert grid.axis_starts(0).tolist() == axis_starts(length, size, stride, edge)[0]


@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize(("length", "size", "stride"), GAPPED, ids=GAPPED_IDS)
def test_gapped_grid_does_not_cover(length, size, stride, edge):
    assert not pg.PatchGrid(length, size, stride, edge=edge).covers


def test_gapped_pad_never_starts_a_patch_past_the_image():
    assert pg.PatchGrid(11, 2, 4, edge="pad").axis_starts(0).max() < 11


def _covered_by_loop(shape, size, stride, edge):
    layout = Layout(shape, range(len(shape)), size, stride, edge)
    hit = np.zeros(tuple(s + after for s, (_, after) in zip(shape, layout.pad_width)), bool)
    for corner in layout.corners:
        hit[layout.slices(corner)] = True
    return bool(hit[tuple(slice(0, s) for s in shape)].all())


COVER_CASES = [
    ((10,), (4,), (2,), ("drop",)),
    ((11,), (4,), (3,), ("drop",)),
    ((11,), (4,), (3,), ("pad",)),
    ((11,), (4,), (3,), ("shift",)),
    ((11,), (4,), (3,), ("even",)),
    ((10, 11), (4, 4), (3, 3), ("shift", "drop")),
    ((10, 11), (4, 4), (3, 3), ("drop", "shift")),
    ((10, 11), (4, 4), (3, 3), ("drop", "even")),
    ((10, 12), (4, 4), (3, 4), ("drop", "drop")),
    ((10,), (2,), (3,), ("shift",)),
    ((3,), (5,), (1,), ("pad",)),
]


@pytest.mark.parametrize(
    ("shape", "size", "stride", "edge"),
    COVER_CASES,
    ids=[f"{s}-{p}-{t}-{'-'.join(e)}" for s, p, t, e in COVER_CASES],
)
def test_covers_matches_a_loop(shape, size, stride, edge):
    grid = pg.PatchGrid(shape, size, stride, edge=edge)
    assert grid.covers is _covered_by_loop(shape, size, stride, edge)


def test_grid_is_frozen(user_grid):
    with pytest.raises(AttributeError, match="immutable"):
        user_grid.stride = (1, 1, 1)


def test_grid_attributes_cannot_be_deleted(user_grid):
    with pytest.raises(AttributeError, match="immutable"):
        del user_grid.shape


def test_grid_has_no_instance_dict(user_grid):
    with pytest.raises(AttributeError):
        user_grid.extra = 1


def test_equal_grids_compare_equal():
    assert pg.PatchGrid((10, 20), 4, 2) == pg.PatchGrid([10, 20], (4, 4), [2, 2])


def test_equal_grids_hash_equal():
    assert hash(pg.PatchGrid((10, 20), 4, 2)) == hash(pg.PatchGrid([10, 20], (4, 4), [2, 2]))


@pytest.mark.parametrize(
    "other",
    [
        pg.PatchGrid((10, 21), 4, 2),
        pg.PatchGrid((10, 20), 3, 2),
        pg.PatchGrid((10, 20), 4, 1),
        pg.PatchGrid((10, 20), 4, 2, edge="shift"),
        pg.PatchGrid((10, 20), 4, 2, axes=(1,)),
        pg.PatchGrid((10, 20), 4, 2, edge="pad", pad_mode="reflect"),
    ],
    ids=["shape", "size", "stride", "edge", "axes", "pad_mode"],
)
def test_different_grids_compare_unequal(other):
    assert pg.PatchGrid((10, 20), 4, 2, edge="drop") != other


def test_grid_is_not_equal_to_other_types():
    assert pg.PatchGrid((10, 20), 4, 2) != ((10, 20), 4, 2)


def test_grid_works_as_a_dict_key():
    table = {pg.PatchGrid((10, 20), 4, 2): "a"}
    assert table[pg.PatchGrid((10, 20), 4, 2)] == "a"


@pytest.mark.parametrize(
    "grid",
    [
        pg.PatchGrid((10, 20, 30), 4, 2),
        pg.PatchGrid((3, 11, 13), (4, 5), (3, 2), edge=("pad", "even")),
        pg.PatchGrid((11,), 4, 3, edge="pad", pad_mode="constant", pad_value=7.5),
        pg.PatchGrid((11, 6), 4, 3, axes=0, edge="pad", pad_mode="reflect"),
    ],
    ids=["user", "channels-mixed-edges", "pad-value", "pad-mode"],
)
def test_pickle_round_trip(grid):
    assert pickle.loads(pickle.dumps(grid)) == grid


def test_pickled_grid_keeps_its_starts():
    grid = pg.PatchGrid((3, 11, 13), (4, 5), (3, 2), edge=("pad", "even"))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(grid)).starts(), grid.starts())


def test_deepcopy_is_equal():
    grid = pg.PatchGrid((3, 11, 13), (4, 5), (3, 2), edge="shift")
    assert copy.deepcopy(grid) == grid


def test_repr_names_the_counts(user_grid):
    assert "(4, 9, 14)" in repr(user_grid)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 0}, "size must be positive"),
        ({"size": -2}, "size must be positive"),
        ({"size": (4, 0)}, "size must be positive"),
        ({"size": 4, "stride": 0}, "stride must be positive"),
        ({"size": 4, "stride": -1}, "stride must be positive"),
        ({"size": 4, "stride": (2, 0)}, "stride must be positive"),
        ({"size": (4, 4, 4)}, "size has 3 entries"),
        ({"size": ()}, "size has 0 entries"),
        ({"size": (4, 4), "stride": (2, 2, 2)}, "stride has 3 entries"),
        ({"size": (4, 4), "axes": (0,)}, "size has 2 entries"),
        ({"size": 4, "stride": (1, 1), "axes": 1}, "stride has 2 entries"),
        ({"size": 4, "axes": 2}, "axes has axis 2, out of range"),
        ({"size": 4, "axes": -3}, "axes has axis -3, out of range"),
        ({"size": 4, "axes": (0, 0)}, "axes must not repeat"),
        ({"size": 4, "axes": (1, -1)}, "axes must not repeat"),
        ({"size": 4, "axes": ()}, "axes must name at least one axis"),
        ({"size": 4, "edge": "wrap"}, "edge must be one of"),
        ({"size": 4, "edge": ("drop", "crop")}, "edge must be one of"),
        ({"size": 4, "edge": ("drop", "pad", "pad")}, "edge has 3 entries"),
        ({"size": 4, "edge": "pad", "pad_mode": "zeros"}, "pad_mode must be one of"),
        ({"size": 4, "pad_mode": None}, "pad_mode must be one of"),
    ],
    ids=[
        "size-zero",
        "size-negative",
        "size-entry-zero",
        "stride-zero",
        "stride-negative",
        "stride-entry-zero",
        "size-too-many",
        "size-empty",
        "stride-too-many",
        "size-vs-axes",
        "stride-vs-axes",
        "axis-too-big",
        "axis-too-negative",
        "axis-repeated",
        "axis-repeated-negative",
        "axes-empty",
        "edge-unknown",
        "edge-entry-unknown",
        "edge-too-many",
        "pad-mode-unknown",
        "pad-mode-none",
    ],
)
def test_bad_values_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pg.PatchGrid((10, 12), **kwargs)


def test_bad_values_raise_patchgrid_error():
    with pytest.raises(pg.PatchgridError, match="size must be positive"):
        pg.PatchGrid((10, 12), size=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 4.0}, "size must be an integer"),
        ({"size": (4, 4.5)}, r"size\[1\] must be an integer"),
        ({"size": True}, "size must be an integer, got the bool"),
        ({"size": (4, np.True_)}, r"size\[1\] must be an integer, got the bool"),
        ({"size": "4"}, "size"),
        ({"size": 4, "stride": 2.0}, "stride must be an integer"),
        ({"size": 4, "stride": False}, "stride must be an integer, got the bool"),
        ({"size": 4, "stride": (1, np.float64(1))}, r"stride\[1\] must be an integer"),
        ({"size": 4, "axes": 0.0}, "axes"),
        ({"size": 4, "axes": (True,)}, r"axes\[0\] must be an integer, got the bool"),
        ({"size": 4, "axes": "0"}, "axes must be an integer or a sequence"),
        ({"size": 4, "edge": "pad", "pad_value": [1, 2]}, "pad_value must be a scalar"),
    ],
    ids=[
        "size-float",
        "size-entry-float",
        "size-bool",
        "size-entry-numpy-bool",
        "size-str",
        "stride-float",
        "stride-bool",
        "stride-entry-numpy-float",
        "axes-float",
        "axes-bool",
        "axes-str",
        "pad-value-list",
    ],
)
def test_bad_types_raise_type_error(kwargs, match):
    with pytest.raises(TypeError, match=match):
        pg.PatchGrid((10, 12), **kwargs)


@pytest.mark.parametrize("edge", [None, 3], ids=["none", "int"])
def test_edge_of_the_wrong_type_raises_naming_edge(edge):
    with pytest.raises((TypeError, ValueError), match="edge"):
        pg.PatchGrid((10, 12), size=4, edge=edge)


@pytest.mark.parametrize(
    ("shape", "error", "match"),
    [
        ((), ValueError, "shape must have at least one axis"),
        ((10, -1), ValueError, "shape must not have negative lengths"),
        (-3, ValueError, "shape must not have negative lengths"),
        ((10.0, 12), TypeError, r"shape\[0\] must be an integer"),
        ((10, True), TypeError, r"shape\[1\] must be an integer, got the bool"),
        ("10", TypeError, "shape must be a sequence of integers"),
        (None, TypeError, "shape must be a sequence of integers"),
        (10.0, TypeError, "shape must be a sequence of integers"),
    ],
    ids=["empty", "negative", "int-negative", "float", "bool", "str", "none", "scalar-float"],
)
def test_bad_shape_raises(shape, error, match):
    with pytest.raises(error, match=match):
        pg.PatchGrid(shape, size=1)


@pytest.mark.parametrize("index", [504, -505], ids=["past-end", "before-start"])
def test_position_out_of_range_raises(user_grid, index):
    with pytest.raises(IndexError, match="out of range"):
        user_grid.position(index)


def test_position_of_a_float_raises(user_grid):
    with pytest.raises(TypeError, match="index must be an integer"):
        user_grid.position(1.0)


@pytest.mark.parametrize(
    "position",
    [(4, 0, 0), (0, 9, 0), (0, 0, -1), (0, 0)],
    ids=["past-first", "past-second", "negative", "too-short"],
)
def test_index_outside_the_grid_raises(user_grid, position):
    with pytest.raises(IndexError, match="outside the grid's counts"):
        user_grid.index(position)


@pytest.mark.parametrize(
    ("index", "match"),
    [(504, "out of range"), ((4, 0, 0), "outside the grid's counts"), ((0, 0), "needs 3 entries")],
    ids=["number", "position", "short-position"],
)
def test_slices_outside_the_grid_raise(user_grid, index, match):
    with pytest.raises(IndexError, match=match):
        user_grid.slices(index)


def test_counts_of_a_mixed_grid():
    grid = pg.PatchGrid((3, 11, 13, 9), (4, 5, 2), (3, 2, 4), edge=("pad", "even", "shift"))
    layout = Layout((3, 11, 13, 9), (1, 2, 3), (4, 5, 2), (3, 2, 4), ("pad", "even", "shift"))
    assert grid.counts == layout.counts


def test_len_of_a_mixed_grid():
    grid = pg.PatchGrid((3, 11, 13, 9), (4, 5, 2), (3, 2, 4), edge=("pad", "even", "shift"))
    layout = Layout((3, 11, 13, 9), (1, 2, 3), (4, 5, 2), (3, 2, 4), ("pad", "even", "shift"))
    assert len(grid) == len(layout.corners)
