"""The one range-and-cast rule (backends.check_cast) and the accumulator dtypes, on NumPy."""

import numpy as np
import pytest

from patchgrid._memory import shares_memory
from patchgrid.backends import NUMPY, WIDE, check_cast, check_exact_sum, lossless


@pytest.mark.parametrize(
    ("src", "dst", "expected"),
    [
        ("int16", "int32", True),
        ("int16", "uint8", False),
        ("uint8", "int16", True),
        ("int32", "float64", True),
        ("int64", "float64", False),  # NumPy calls this safe; 2**53 + 1 is not held
        ("uint64", "float64", False),
        ("float32", "float64", True),
        ("float64", "float32", False),
        ("float32", "int64", False),
        ("bool", "uint8", True),
        ("uint8", "bool", False),
        ("complex64", "float64", False),
    ],
)
def test_lossless_says_whether_every_value_is_held(src, dst, expected):
    assert lossless(np.dtype(src), np.dtype(dst)) is expected


def test_a_value_that_would_wrap_is_refused():
    with pytest.raises(ValueError, match=r"runs from 0 to 300, which dtype=uint8 cannot hold"):
        check_cast(NUMPY, np.array([0, 300], np.int16), np.uint8)


def test_values_that_fit_a_narrower_dtype_pass():
    check_cast(NUMPY, np.array([0, 255], np.int16), np.uint8)


def test_nan_into_an_integer_is_refused():
    with pytest.raises(ValueError, match="holds NaN, which dtype int16 cannot store"):
        check_cast(NUMPY, np.array([1.0, np.nan]), np.int16)


def test_inf_into_an_integer_is_refused():
    with pytest.raises(ValueError, match="cannot hold"):
        check_cast(NUMPY, np.array([1.0, np.inf]), np.int32)


def test_overflow_to_inf_is_refused():
    with pytest.raises(ValueError, match="would overflow to inf"):
        check_cast(NUMPY, np.array([1e39, 0.0]), np.float32)


def test_an_inf_already_there_stays_inf():
    check_cast(NUMPY, np.array([np.inf, -np.inf, 1.0]), np.float32)


def test_a_finite_value_beyond_the_range_beside_an_inf_is_refused():
    with pytest.raises(ValueError, match="would overflow to inf"):
        check_cast(NUMPY, np.array([np.inf, 1e39]), np.float32)


def test_integers_beyond_the_float_mantissa_are_refused():
    with pytest.raises(ValueError, match=r"holds integers exactly only up to 2\*\*53"):
        check_cast(NUMPY, np.array([2**60 + 1], np.int64), np.float64)


def test_complex_into_real_is_refused():
    with pytest.raises(ValueError, match="imaginary part would be dropped"):
        check_cast(NUMPY, np.array([1 + 2j]), np.float64)


def test_the_rule_looks_at_values_only_where_dtypes_do_not_settle_it():
    class Untouchable(np.ndarray):
        def min(self, *a, **k):  # pragma: no cover - must not be called
            raise AssertionError("looked at the values")

        max = min

    check_cast(NUMPY, np.zeros(3, np.int16).view(Untouchable), np.int32)


@pytest.mark.parametrize(
    ("dtype", "acc"),
    [
        ("float16", "float64"),
        ("float32", "float64"),
        ("int16", "float64"),
        ("uint32", "float64"),
        ("bool", "float64"),
        ("float64", "longdouble" if WIDE else "float64"),
        ("int64", "longdouble" if WIDE else "float64"),
        ("complex64", "complex128"),
    ],
)
def test_accumulators_are_wider_than_the_patches(dtype, acc):
    assert NUMPY.acc_dtype(np.dtype(dtype), "mean") == np.dtype(acc)


@pytest.mark.parametrize("reduce", ["max", "min"])
def test_max_and_min_accumulate_in_the_patches_dtype(reduce):
    assert NUMPY.acc_dtype(np.dtype(np.int16), reduce) == np.dtype(np.int16)


def test_integer_sums_beyond_the_accumulator_are_refused():
    values = np.array([2**52], np.int64)
    with pytest.raises(ValueError, match="reduce='max' or 'min'"):
        check_exact_sum(NUMPY, values, np.dtype(np.float64), overlap=4, weighted=False)


def test_integer_sums_within_the_accumulator_pass():
    check_exact_sum(NUMPY, np.array([2**50], np.int64), np.dtype(np.float64), 4, False)


def test_a_block_that_is_all_inf_passes_a_narrowing_float_cast():
    check_cast(NUMPY, np.full(3, np.inf), np.float32)
    check_cast(NUMPY, np.full(3, -np.inf), np.float32)


def test_a_large_imaginary_part_is_seen_by_the_rule():
    with pytest.raises(ValueError, match="would overflow to inf"):
        check_cast(NUMPY, np.array([0, 1 + 1e39j, 2]), np.complex64)


def test_memory_shared_across_numpy_and_torch_is_seen():
    torch = pytest.importorskip("torch")
    image = np.zeros((4, 4), np.float32)
    assert shares_memory(image, torch.from_numpy(image))
    assert not shares_memory(image, torch.zeros(4, 4))


def test_two_mappings_of_one_file_share_it(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 4)))
    one = np.load(tmp_path / "a.npy", mmap_mode="r")
    two = np.load(tmp_path / "a.npy", mmap_mode="r+")
    assert shares_memory(one, two)


def test_two_handles_on_one_zarr_array_share_it(tmp_path):
    zarr = pytest.importorskip("zarr")
    a = zarr.open_array(str(tmp_path / "z.zarr"), mode="w", shape=(4,), dtype="f4")
    b = zarr.open_array(str(tmp_path / "z.zarr"), mode="r+")
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    assert shares_memory(a, b)
    assert not shares_memory(group.create_array("x", shape=(3,), dtype="f4"),
                             group.create_array("y", shape=(3,), dtype="f4"))  # fmt: skip
