"""Hypothesis properties: extract against the loop, merge(extract(x)) == x, Merger == merge."""

import importlib

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import patchgrid as pg
from reference import Layout, coverage, window_nd

SETTINGS = settings(max_examples=100, deadline=None)
# Longest axis per number of dimensions, so that every example stays small.
MAX_SIDE = {1: 30, 2: 12, 3: 8, 4: 5}
DTYPES = ["float16", "float32", "float64", "uint8", "int16"]


@st.composite
def grid_args(draw, full=True):
    """Arguments of a PatchGrid: shape, axes (any order, maybe negative), size, stride, edge.

    ``full``: stride <= size, and ``"drop"`` only where it leaves no trailing voxels, so that
    the patches cover the whole image. Otherwise strides may leave gaps and drop anything.
    """
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, MAX_SIDE[ndim]), min_size=ndim, max_size=ndim)))
    axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    axes = [a - ndim if draw(st.booleans()) else a for a in axes]
    size, stride, edge = [], [], []
    for a in axes:
        length = shape[a]
        p = draw(st.integers(1, length + 2))
        s = draw(st.integers(1, p if full else p + 3))
        edges = ["pad", "shift", "even"]
        if length >= p and (not full or (length - p) % s == 0):
            edges.append("drop")
        size.append(p)
        stride.append(s)
        edge.append(draw(st.sampled_from(edges)))
    return shape, tuple(axes), tuple(size), tuple(stride), tuple(edge)


def _grid(args):
    shape, axes, size, stride, edge = args
    return pg.PatchGrid(shape, size, stride, axes=axes, edge=edge)


def _image(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind == "c":
        return (rng.uniform(-9, 9, shape) + 1j * rng.uniform(-9, 9, shape)).astype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)
    return rng.uniform(-100, 100, shape).astype(dtype)


def _assert_restores(merged, image):
    if image.dtype.kind in "iu":
        np.testing.assert_array_equal(np.round(merged).astype(image.dtype), image)
        return
    rtol = {"float16": 1e-3, "float32": 1e-5, "float64": 1e-10}[image.dtype.name]
    np.testing.assert_allclose(merged, image, rtol=rtol, atol=rtol)


@SETTINGS
@given(args=grid_args(full=False), seed=st.integers(0, 2**16))
def test_extract_equals_the_loop(args, seed):
    image = _image(args[0], "int16", seed)
    np.testing.assert_array_equal(pg.extract(image, _grid(args)), Layout(*args).extract(image))


@SETTINGS
@given(args=grid_args(full=False), seed=st.integers(0, 2**16))
def test_extract_copy_equals_the_loop(args, seed):
    image = _image(args[0], "float32", seed)
    got = pg.extract(image, _grid(args), copy=True)
    np.testing.assert_array_equal(got, Layout(*args).extract(image))


ALL_DTYPES = ["bool", "uint8", "int16", "float16", "float32", "float64", "complex64"]


@st.composite
def strided_image(draw, shape, dtype, seed):
    """An image of ``shape`` that is a transposed, stepped and maybe reversed view of another."""
    ndim = len(shape)
    perm = draw(st.permutations(range(ndim)))
    steps = [draw(st.sampled_from([1, 2, -1, -2])) for _ in range(ndim)]
    big = [n * abs(t) for n, t in zip(shape, steps)]
    base = _image(tuple(big[p] for p in perm), dtype, seed)
    image = base.transpose(np.argsort(perm))[tuple(slice(None, None, t) for t in steps)]
    assert image.shape == tuple(shape)
    return image


@SETTINGS
@given(
    args=grid_args(full=False),
    dtype=st.sampled_from(ALL_DTYPES),
    copy=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_extract_of_a_strided_view_equals_the_loop(args, dtype, copy, seed, data):
    image = data.draw(strided_image(args[0], dtype, seed))
    got = pg.extract(image, _grid(args), copy=copy)
    np.testing.assert_array_equal(got, Layout(*args).extract(image))


@SETTINGS
@given(args=grid_args(full=False), flat=st.booleans(), seed=st.integers(0, 2**16))
def test_extract_into_out_equals_the_loop(args, flat, seed):
    image = _image(args[0], "float64", seed)
    grid = _grid(args)
    expected = Layout(*args).extract(image)
    out = np.full(
        expected.reshape(len(grid), *grid.patch_shape).shape if flat else expected.shape, -1.0
    )
    pg.extract(image, grid, out=out)
    np.testing.assert_array_equal(out.reshape(expected.shape), expected)


@SETTINGS
@given(args=grid_args(full=False), seed=st.integers(0, 2**16))
def test_extract_flat_follows_grid_starts(args, seed):
    image = _image(args[0], "uint8", seed)
    grid = _grid(args)
    layout = Layout(*args)
    padded = layout.padded(image)
    expected = np.stack([padded[layout.slices(c)] for c in grid.starts().tolist()])
    np.testing.assert_array_equal(pg.extract(image, grid, flatten=True), expected)


@SETTINGS
@given(args=grid_args(full=False), seed=st.integers(0, 2**16))
def test_extract_with_arguments_equals_extract_with_the_grid(args, seed):
    shape, axes, size, stride, edge = args
    image = _image(shape, "float64", seed)
    np.testing.assert_array_equal(
        pg.extract(image, size, stride, axes=axes, edge=edge), pg.extract(image, _grid(args))
    )


@SETTINGS
@given(args=grid_args(full=False))
def test_grid_starts_equal_the_reference(args):
    np.testing.assert_array_equal(
        _grid(args).starts().reshape(-1, len(args[1])), np.array(Layout(*args).corners)
    )


@SETTINGS
@given(args=grid_args(full=False))
def test_grid_pad_width_equals_the_reference(args):
    assert _grid(args).pad_width == tuple(Layout(*args).pad_width)


@SETTINGS
@given(args=grid_args(full=False))
def test_covers_iff_every_voxel_is_in_a_patch(args):
    assert _grid(args).covers == bool((coverage(Layout(*args)) > 0).all())


@SETTINGS
@given(args=grid_args(full=True))
def test_full_coverage_arguments_cover(args):
    assert _grid(args).covers


@SETTINGS
@given(args=grid_args(full=False))
def test_coverage_equals_the_loop(args):
    np.testing.assert_array_equal(pg.coverage(_grid(args)), coverage(Layout(*args)))


@pytest.mark.parametrize("strategy", ["scatter", "rows"])
@SETTINGS
@given(
    args=grid_args(full=True),
    dtype=st.sampled_from(DTYPES),
    window=st.sampled_from(["uniform", "gaussian"]),
    seed=st.integers(0, 2**16),
)
def test_merge_of_extract_restores_the_image(strategy, args, dtype, window, seed):
    # Small grids are gathered at once (scatter); "rows" sends them the way of large ones.
    image = _image(args[0], dtype, seed)
    grid = _grid(args)
    with pytest.MonkeyPatch.context() as mp:
        if strategy == "rows":
            mp.setattr(importlib.import_module("patchgrid._accumulate"), "SCATTER_ELEMENTS", -1)
        merged = pg.merge(pg.extract(image, grid), grid, window=window)
    _assert_restores(merged, image)


@SETTINGS
@given(
    args=grid_args(full=True),
    window=st.sampled_from(["hann", "triangular"]),
    seed=st.integers(0, 2**16),
)
def test_merge_of_extract_restores_the_image_with_other_windows(args, window, seed):
    image = _image(args[0], "float64", seed)
    grid = _grid(args)
    _assert_restores(pg.merge(pg.extract(image, grid), grid, window=window), image)


@SETTINGS
@given(
    args=grid_args(full=True), reduce=st.sampled_from(["max", "min"]), seed=st.integers(0, 2**16)
)
def test_max_and_min_of_extract_restore_the_image_exactly(args, reduce, seed):
    image = _image(args[0], "int16", seed)
    grid = _grid(args)
    merged = pg.merge(pg.extract(image, grid), grid, reduce=reduce)
    np.testing.assert_array_equal(merged, image)


@SETTINGS
@given(args=grid_args(full=True), seed=st.integers(0, 2**16))
def test_merge_of_flat_patches_restores_the_image(args, seed):
    image = _image(args[0], "float64", seed)
    grid = _grid(args)
    _assert_restores(pg.merge(pg.extract(image, grid, flatten=True), grid), image)


@SETTINGS
@given(args=grid_args(full=True), seed=st.integers(0, 2**16))
def test_merge_with_the_shape_restores_the_image(args, seed):
    shape, axes, _, stride, edge = args
    image = _image(shape, "float64", seed)
    patches = pg.extract(image, _grid(args), flatten=True)
    _assert_restores(pg.merge(patches, shape, stride, axes=axes, edge=edge), image)


@SETTINGS
@given(
    args=grid_args(full=False),
    reduce=st.sampled_from(["mean", "sum", "max", "min"]),
    seed=st.integers(0, 2**16),
)
def test_merge_of_random_patches_equals_the_loop(args, reduce, seed):
    grid = _grid(args)
    layout = Layout(*args)
    patches = np.random.default_rng(seed).standard_normal((len(grid), *grid.patch_shape))
    expected, _ = layout.merge(patches, reduce, fill=-5.0)
    got = pg.merge(patches, grid, reduce=reduce, fill=-5.0)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@st.composite
def merger_case(draw):
    args = draw(grid_args(full=False))
    n = len(_grid(args))
    order = draw(st.permutations(range(n)))
    cuts = sorted(draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=4, unique=True)))
    reduce, window = draw(
        st.sampled_from(
            [("mean", None), ("mean", "gaussian"), ("sum", "hann"), ("max", None), ("min", None)]
        )
    )
    return args, np.array(order, dtype=np.intp), cuts, reduce, window


@SETTINGS
@given(case=merger_case(), by_position=st.booleans(), seed=st.integers(0, 2**16))
def test_merger_in_random_order_and_batches_equals_merge(case, by_position, seed):
    args, order, cuts, reduce, window = case
    grid = _grid(args)
    patches = np.random.default_rng(seed).standard_normal((len(grid), *grid.patch_shape))
    merger = pg.Merger(grid, reduce=reduce, window=window, fill=2.0)
    for batch in np.split(order, [c for c in cuts if c < len(order)]):
        if by_position:
            merger.add(patches[batch], np.stack(np.unravel_index(batch, grid.counts), axis=1))
        else:
            merger.add(patches[batch], batch)
    expected = pg.merge(patches, grid, reduce=reduce, window=window, fill=2.0)
    np.testing.assert_allclose(merger.result(), expected, rtol=1e-10, atol=1e-12)


@st.composite
def streaming_case(draw):
    """A grid, which patches to add (at least one), a batch size, a reduction and a window."""
    args = draw(grid_args(full=False))
    n = len(_grid(args))
    keep = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    if not any(keep):
        keep[draw(st.integers(0, n - 1))] = True
    batch = draw(st.integers(1, n))
    reduce, window = draw(
        st.sampled_from(
            [
                ("mean", None),
                ("mean", "gaussian"),
                ("mean", "array"),
                ("sum", "hann"),
                ("sum", "array"),
                ("max", None),
                ("min", None),
            ]
        )
    )
    return args, [i for i, k in enumerate(keep) if k], batch, reduce, window


def _weight(window, layout, seed):
    if window is None:
        return None, None
    if window == "array":
        w = np.random.default_rng(seed).uniform(0.1, 2.0, layout.size)
        return w, w
    return window, window_nd(window, layout.size)


@SETTINGS
@given(case=streaming_case(), seed=st.integers(0, 2**16))
def test_merger_in_grid_order_with_missing_patches_equals_the_loop(case, seed):
    args, kept, batch, reduce, window = case
    grid, layout = _grid(args), Layout(*args)
    arg, weight = _weight(window, layout, seed)
    patches = np.random.default_rng(seed).standard_normal((len(grid), *grid.patch_shape))
    merger = pg.Merger(grid, reduce=reduce, window=arg, fill=-3.0)
    for lo in range(0, len(kept), batch):
        merger.add(patches[kept[lo : lo + batch]], kept[lo : lo + batch])
    expected, _ = layout.merge(patches, reduce, weight, fill=-3.0, keep=kept)
    got = merger.result(allow_missing=True)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@SETTINGS
@given(case=streaming_case(), seed=st.integers(0, 2**16))
@example(case=(((2,), (0,), (1,), (1,), ("pad",)), [0, 1], 1, "mean", "array"), seed=0)
def test_merger_coverage_in_grid_order_equals_the_loop(case, seed):
    args, kept, batch, reduce, window = case
    grid, layout = _grid(args), Layout(*args)
    arg, weight = _weight(window, layout, seed)
    merger = pg.Merger(grid, reduce=reduce, window=arg)
    for lo in range(0, len(kept), batch):
        merger.add(np.zeros((len(kept[lo : lo + batch]), *grid.patch_shape)), kept[lo : lo + batch])
    zeros = np.zeros(
        (len(grid), *(1 if a not in layout.axes else n for a, n in enumerate(grid.patch_shape)))
    )
    _, expected = layout.merge(zeros, reduce, weight, keep=kept)
    np.testing.assert_allclose(merger.coverage(), expected, rtol=1e-10, atol=1e-12)


# Bit-exact or a clear error, for every dtype and its awkward values (issue #13).

EXACT_DTYPES = ["bool", "uint8", "int16", "int32", "uint32", "int64", "uint64", "float16",
                "float32", "float64"]  # fmt: skip


@st.composite
def awkward_images(draw, shape):
    """An image of a drawn dtype holding its awkward values: the dtype's limits, values near
    2**53 and 2**64 for 64-bit integers, NaN, inf and subnormals for floats."""
    dtype = np.dtype(draw(st.sampled_from(EXACT_DTYPES)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    image = _image(shape, dtype, int(rng.integers(2**16)))
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        specials = [info.min, info.max, 0, 1]
        if dtype.itemsize == 8:
            specials += [2**53 + 1, 2**60 + 3, info.max - 1]
    elif dtype.kind == "f":
        info = np.finfo(dtype)
        specials = [np.nan, np.inf, -np.inf, info.max, -info.max, info.tiny / 2, 0.0, -0.0]
    else:
        specials = [True, False]
    flat = image.reshape(-1)
    picks = draw(st.lists(st.integers(0, max(flat.size - 1, 0)), max_size=6))
    for i, v in zip(picks, draw(st.lists(st.sampled_from(specials), min_size=len(picks),
                                         max_size=len(picks)))):  # fmt: skip
        if flat.size:
            flat[i] = v
    return image


def _same_bits(got, image):
    if image.dtype.kind == "f":
        # Bit for bit: NaN where NaN, -0.0 may come back as +0.0 only through a sum of zeros.
        assert got.dtype == image.dtype
        same = (got == image) | (np.isnan(got) & np.isnan(image))
        assert same.all(), f"{(~same).sum()} voxels differ"
        return
    assert got.dtype == image.dtype
    np.testing.assert_array_equal(got, image)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), args=grid_args(), window=st.sampled_from(["uniform", "gaussian", "hann"]))
def test_merge_of_extract_is_bit_exact_or_raises(data, args, window):
    image = data.draw(awkward_images(args[0]))
    grid = _grid(args)
    patches = pg.extract(image, grid)
    try:
        merged = pg.merge(patches, grid, window=window, dtype=image.dtype)
    except ValueError as exc:
        refused = str(exc)
    else:
        _same_bits(merged, image)
        return
    # Refused, with a message that says what to use instead: only where the values are integers
    # the accumulator cannot sum exactly.
    assert image.dtype.kind in "iu", refused
    assert "reduce='max' or 'min'" in refused, refused


@settings(max_examples=150, deadline=None)
@given(data=st.data(), args=grid_args())
def test_merge_max_of_extract_is_bit_exact_for_every_dtype(data, args):
    image = data.draw(awkward_images(args[0]))
    grid = _grid(args)
    merged = pg.merge(pg.extract(image, grid), grid, reduce="max")
    _same_bits(merged, image)


@settings(max_examples=100, deadline=None)
@given(
    args=grid_args(),
    dtype=st.sampled_from(["float16", "float32", "float64"]),
    window=st.sampled_from(["uniform", "gaussian", "hann", "triangular"]),
    seed=st.integers(0, 2**16),
)
def test_an_identity_apply_never_leaves_the_range_of_its_input(args, dtype, window, seed):
    shape, axes, size, stride, edge = args
    image = _image(shape, dtype, seed)
    out = pg.apply(lambda b: b, image, size, stride, axes=axes, edge=edge, window=window)
    assert out.dtype == image.dtype
    assert out.min() >= image.min()
    assert out.max() <= image.max()
