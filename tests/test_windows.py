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
