"""The optional compiled overlap-add (numba) against the plain-loop reference and NumPy's path."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import patchgrid as pg
from patchgrid import _fast
from reference import Layout, window_nd

pytest.importorskip("numba")

# The fixture only patches module constants and counts calls; counting by difference is safe
# across examples.
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
def compiled(monkeypatch):
    """Send every eligible merge, however small, through the kernel; count the calls."""
    monkeypatch.setattr(_fast, "MIN_BYTES", 0)
    monkeypatch.setattr(_fast, "MIN_ROW", 1)
    return _spy(monkeypatch, "overlap_add")


def _spy(monkeypatch, name):
    calls = []
    real = getattr(_fast, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(_fast, name, spy)
    return calls


@st.composite
def cases(draw):
    """Shapes whose tiled axes are the last k (1 to 3), with up to one axis carried whole."""
    k = draw(st.integers(1, 3))
    n_lead = draw(st.integers(0, 1))
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=n_lead, max_size=n_lead)))
    shape, size, stride, edge = [], [], [], []
    for _ in range(k):
        n = draw(st.integers(1, 14))
        p = draw(st.integers(1, n + 2))
        s = draw(st.integers(1, p + 3))
        edges = ["pad", "shift", "even"] + (["drop"] if n >= p else [])
        shape.append(n)
        size.append(p)
        stride.append(s)
        edge.append(draw(st.sampled_from(edges)))
    axes = tuple(range(n_lead, n_lead + k))
    return lead + tuple(shape), axes, tuple(size), tuple(stride), tuple(edge)


@SETTINGS
@given(
    case=cases(),
    dtype=st.sampled_from(["float32", "float64"]),
    window=st.sampled_from(["uniform", "gaussian", "hann"]),
    reduce=st.sampled_from(["mean", "sum"]),
    seed=st.integers(0, 2**16),
)
def test_compiled_merge_equals_the_loop(compiled, case, dtype, window, reduce, seed):
    shape, axes, size, stride, edge = case
    grid = pg.PatchGrid(shape, size, stride, axes=axes, edge=edge)
    layout = Layout(shape, axes, size, stride, edge)
    patches = np.random.default_rng(seed).standard_normal((len(grid), *grid.patch_shape))
    patches = patches.astype(dtype)
    weight = None if window == "uniform" else window_nd(window, size)
    shaped = None if weight is None else weight.reshape(
        [size[axes.index(a)] if a in axes else 1 for a in range(len(shape))]
    )  # fmt: skip
    expected, _ = layout.merge(patches.astype(np.float64), reduce, shaped, fill=-5.0)
    before = len(compiled)
    got = pg.merge(patches, grid, reduce=reduce, window=window, fill=-5.0)
    rtol = 1e-4 if dtype == "float32" else 1e-10
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol)
    assert got.dtype == np.dtype(dtype)
    padded = grid.padded_shape != grid.shape
    assert len(compiled) - before == (0 if padded else 1)


def test_compiled_merge_restores_the_image_exactly_where_numpy_does(compiled):
    image = np.random.default_rng(1).random((20, 24, 28)).astype(np.float32)
    grid = pg.PatchGrid(image.shape, (8, 8, 16), (4, 4, 8), edge="shift")
    merged = pg.merge(pg.extract(image, grid), grid)
    assert len(compiled) == 1
    np.testing.assert_allclose(merged, image, rtol=1e-6)


def test_compiled_merge_writes_into_out(compiled):
    image = np.random.default_rng(2).random((12, 30)).astype(np.float64)
    grid = pg.PatchGrid(image.shape, 6, 3)
    out = np.full(image.shape, np.nan)
    merger = pg.Merger(grid, window="gaussian", out=out)
    merger.add_all(pg.extract(image, grid))
    assert merger.result() is out
    assert len(compiled) == 1
    np.testing.assert_allclose(out, image, rtol=1e-12)


def test_compiled_merge_fills_the_gaps(compiled):
    grid = pg.PatchGrid((10, 10), 2, 4)  # stride > size: rows and columns no patch covers
    patches = np.ones((len(grid), 2, 2), np.float32)
    merged = pg.merge(patches, grid, fill=7)
    covered = pg.coverage(grid) > 0
    assert len(compiled) == 1
    np.testing.assert_array_equal(merged[covered], 1)
    np.testing.assert_array_equal(merged[~covered], 7)


def test_numpy_path_serves_what_the_kernel_does_not(compiled):
    image = np.arange(4 * 10 * 12, dtype=np.float32).reshape(4, 10, 12)
    grid = pg.PatchGrid(image.shape, 4, 2, axes=(0, 1))  # the last axis is carried, not tiled
    merged = pg.merge(pg.extract(image, grid), grid)
    assert compiled == []
    np.testing.assert_allclose(merged, image[:, :10])


def test_no_kernel_without_numba(compiled, monkeypatch):
    monkeypatch.setattr(_fast, "available", lambda: False)
    image = np.random.default_rng(3).random((16, 16)).astype(np.float32)
    grid = pg.PatchGrid(image.shape, 8, 4)
    merged = pg.merge(pg.extract(image, grid), grid)
    assert compiled == []
    np.testing.assert_allclose(merged, image, rtol=1e-6)


def test_large_merges_take_the_kernel_by_default():
    image = np.random.default_rng(4).random((128, 128, 128)).astype(np.float32)
    grid = pg.PatchGrid(image.shape, 32, 16)
    patches = pg.extract(image, grid, copy=True)
    assert patches.nbytes >= _fast.MIN_BYTES
    assert _fast.serves(np.empty(image.shape, np.float32), patches, 3, (0, 1, 2))
    np.testing.assert_allclose(pg.merge(patches, grid, window="hann"), image, rtol=1e-5)
