"""pg.window against the formulas of DESIGN.md, written out element by element in reference.py."""

import math

import numpy as np
import pytest

import patchgrid as pg
from reference import window_1d, window_nd

NAMES = ["uniform", "gaussian", "hann", "triangular"]
LENGTHS = [1, 2, 3, 4, 5, 8, 9, 16, 33]


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("name", NAMES)
def test_1d_window_matches_the_formula(name, n):
    np.testing.assert_allclose(pg.window(name, n), window_1d(name, n), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("name", "n", "expected"),
    [
        ("triangular", 3, [0.5, 1.0, 0.5]),
        ("triangular", 2, [2 / 3, 2 / 3]),
        ("hann", 1, [1.0]),
        ("hann", 3, [0.5, 1.0, 0.5]),
        ("gaussian", 1, [1.0]),
        ("gaussian", 8, [math.exp(-(3.5**2) / 2), math.exp(-(2.5**2) / 2), math.exp(-(1.5**2) / 2),
                         math.exp(-(0.5**2) / 2), math.exp(-(0.5**2) / 2), math.exp(-(1.5**2) / 2),
                         math.exp(-(2.5**2) / 2), math.exp(-(3.5**2) / 2)]),
        ("uniform", 4, [1.0, 1.0, 1.0, 1.0]),
    ],
    ids=["triangular-3", "triangular-2", "hann-1", "hann-3", "gaussian-1", "gaussian-8-sigma-1",
         "uniform-4"],
)  # fmt: skip
def test_worked_values(name, n, expected):
    np.testing.assert_allclose(pg.window(name, n), expected, rtol=1e-12)


@pytest.mark.parametrize(
    "size", [(3, 4), (1, 5), (2, 3, 4), (4, 1, 2, 3)], ids=["2d", "2d-unit", "3d", "4d"]
)
@pytest.mark.parametrize("name", NAMES)
def test_nd_window_is_the_product_of_the_formulas(name, size):
    np.testing.assert_allclose(pg.window(name, size), window_nd(name, size), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_nd_window_is_the_outer_product_of_1d_windows(name):
    expected = np.einsum("i,j,k->ijk", pg.window(name, 3), pg.window(name, 6), pg.window(name, 5))
    np.testing.assert_allclose(pg.window(name, (3, 6, 5)), expected, rtol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 257])
@pytest.mark.parametrize("name", NAMES)
def test_window_is_never_zero(name, n):
    assert pg.window(name, n).min() > 0


@pytest.mark.parametrize("name", NAMES)
def test_nd_window_is_never_zero(name):
    assert pg.window(name, (64, 1, 31)).min() > 0


@pytest.mark.parametrize("n", [2, 5, 8, 13])
@pytest.mark.parametrize("name", NAMES)
def test_window_is_symmetric(name, n):
    w = pg.window(name, n)
    np.testing.assert_allclose(w, w[::-1], rtol=1e-12)


@pytest.mark.parametrize("n", [1, 3, 5, 9, 31])
@pytest.mark.parametrize("name", NAMES)
def test_odd_window_peaks_at_one_in_the_centre(name, n):
    w = pg.window(name, n)
    assert (w[n // 2], w.max()) == (pytest.approx(1.0), pytest.approx(1.0))


@pytest.mark.parametrize("name", NAMES)
def test_window_is_float64(name):
    assert pg.window(name, (3, 4)).dtype == np.float64


@pytest.mark.parametrize(
    ("size", "shape"),
    [(5, (5,)), ((5,), (5,)), ([2, 3], (2, 3)), (np.int64(4), (4,))],
    ids=["int", "tuple", "list", "numpy-int"],
)
def test_window_shape(size, shape):
    assert pg.window("hann", size).shape == shape


@pytest.mark.parametrize("name", ["box", "Gaussian", "", "hamming"])
def test_unknown_name_raises(name):
    with pytest.raises(ValueError, match="window must be one of"):
        pg.window(name, 4)


def test_name_of_the_wrong_type_raises():
    with pytest.raises(ValueError, match="window must be one of"):
        pg.window(None, 4)


@pytest.mark.parametrize(
    ("size", "error", "match"),
    [
        (0, ValueError, "size must be positive"),
        (-3, ValueError, "size must be positive"),
        ((4, 0), ValueError, "size must be positive"),
        (4.0, TypeError, "size must be an integer"),
        (True, TypeError, "size must be an integer, got the bool"),
        ((4, 2.5), TypeError, r"size\[1\] must be an integer"),
    ],
    ids=["zero", "negative", "entry-zero", "float", "bool", "entry-float"],
)
def test_bad_size_raises(size, error, match):
    with pytest.raises(error, match=match):
        pg.window("hann", size)


def test_window_of_no_axes_raises():
    with pytest.raises(ValueError, match="at least one entry"):
        pg.window("hann", ())


def _monai_reference(size):
    """MONAI's importance map written out element by element in float64 (compute_importance_map
    of monai.data.utils: sigma = 0.125 n, the product, then a floor of max(min, 1e-3))."""
    out = np.empty(size)
    for index in np.ndindex(*size):
        w = 1.0
        for i, n in zip(index, size):
            x = i - (n - 1) / 2
            w *= math.exp(-(x * x) / (2 * (0.125 * n) ** 2))
        out[index] = w
    return np.maximum(out, max(out.min(), 1e-3))


@pytest.mark.parametrize("size", [(7,), (16, 16), (5, 9, 3), (24, 24, 24)], ids=str)
def test_monai_gaussian_matches_monais_formula_and_floor(size):
    got = pg.window("monai-gaussian", size)
    # MONAI makes it in float32: equal to the float64 formula within float32 rounding.
    np.testing.assert_allclose(got, _monai_reference(size), rtol=5e-7, atol=0)
    assert got.min() >= 1e-3 * (1 - 1e-6)


def test_monai_gaussian_floor_makes_it_not_separable():
    # Far from the centre the product falls below 1e-3 and is raised to it: corners and edges
    # hold the same weight, which no outer product of profiles gives.
    w = pg.window("monai-gaussian", (32, 32, 32))
    assert w[0, 0, 0] == w[0, 0, 16] == w.min()
    assert w[4, 16, 16] > w.min()
    assert w.min() == pytest.approx(1e-3, rel=1e-6)


@pytest.mark.parametrize("size", [(64, 64, 64), (96, 96), (16,), (5, 9, 3)], ids=str)
def test_monai_gaussian_equals_monais_own_map(size):
    torch = pytest.importorskip("torch")
    utils = pytest.importorskip("monai.data.utils")
    theirs = utils.compute_importance_map(size, "gaussian").to(torch.float64).numpy()
    # The same float32 steps; NumPy's exp and torch's differ by at most one float32 step per
    # axis, so the product of three by at most a few.
    np.testing.assert_allclose(pg.window("monai-gaussian", size), theirs, rtol=5e-7, atol=0)
