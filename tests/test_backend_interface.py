"""The backend interface: every operation of ``Backend`` raises until a backend implements it;
NumPy and torch implement every one, and the operations that replace "which backend is
this?" give the same answers for both."""

import contextlib
import inspect

import numpy as np
import pytest

from patchgrid.backends import (
    NUMPY,
    Backend,
    NumpyBackend,
    TorchBackend,
    backend_of,
    in_memory,
)

OPERATIONS = sorted(
    name
    for name, member in vars(Backend).items()
    if not name.startswith("_") and (callable(member) or isinstance(member, property))
)


def _torch():
    return pytest.importorskip("torch")


def _backends():
    return [
        pytest.param(NumpyBackend, id="numpy"),
        pytest.param(TorchBackend, id="torch"),
    ]


def test_the_interface_lists_the_operations_the_engine_uses():
    assert {"empty", "inplace", "host", "owns", "pad", "copy_fast", "host_loops"} <= set(OPERATIONS)


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("backend", _backends())
def test_every_backend_implements_every_operation(backend, operation):
    # Resolved on the class: an operation that falls through to the interface's would raise.
    assert inspect.getattr_static(backend, operation) is not vars(Backend)[operation]


@pytest.mark.parametrize("operation", OPERATIONS)
def test_every_operation_of_the_interface_raises(operation):
    class Empty(Backend):
        pass

    with pytest.raises(
        NotImplementedError, match=rf"Empty does not implement {operation}\(\) of backends.Backend"
    ):
        _use(Empty(), operation)


def _use(backend, operation):
    """Read an attribute, or call an operation with as many arguments as it needs."""
    member = inspect.getattr_static(type(backend), operation)
    if isinstance(member, property):
        return getattr(backend, operation)
    params = list(inspect.signature(member).parameters.values())[1:]
    needed = sum(p.default is inspect.Parameter.empty for p in params)
    return getattr(backend, operation)(*[None] * needed)


def test_a_backend_that_forgets_an_operation_says_which():
    class Partial(Backend):
        name = "partial"

        def shape(self, x):
            return tuple(x.shape)

    partial = Partial()
    assert partial.shape(np.zeros((2, 3))) == (2, 3)
    with pytest.raises(NotImplementedError, match=r"Partial does not implement empty\(\)"):
        partial.empty((2,), np.float32, None)
    with pytest.raises(NotImplementedError, match=r"Partial does not implement host_loops\(\)"):
        _ = partial.host_loops


def test_the_raising_operations_keep_their_signatures():
    assert list(inspect.signature(Backend.full).parameters) == [
        "self", "shape", "value", "dtype", "like",
    ]  # fmt: skip


# NumPy's answers.


def test_numpy_owns_ndarrays_and_plain_leaves_out_memmaps(tmp_path):
    mm = np.memmap(tmp_path / "m", dtype=np.float32, mode="w+", shape=(4,))
    assert NUMPY.owns(np.zeros(3))
    assert NUMPY.owns(mm)
    assert NUMPY.owns(np.zeros(3), plain=True)
    assert not NUMPY.owns(mm, plain=True)
    assert not NUMPY.owns([1, 2, 3])
    assert in_memory(mm)
    assert not in_memory(mm, plain=True)
    assert not in_memory([1.0])


def test_numpy_layout_is_a_key_of_plain_arrays_only():
    x = np.zeros((2, 3), np.int16)
    assert NUMPY.layout(x) == ((2, 3), (6, 2), np.dtype(np.int16))
    assert NUMPY.layout(np.ma.zeros(3)) is None
    assert NUMPY.layout([1, 2]) is None


def test_numpy_host_is_the_array_itself():
    x = np.zeros(3)
    assert NUMPY.host(x) is x
    assert NUMPY.host([1, 2]) is None


def test_numpy_from_host_is_a_view_that_holds_the_buffer():
    import sys

    buf = np.zeros(4)
    before = sys.getrefcount(buf)
    view = NUMPY.from_host(buf)
    assert view.base is buf
    assert sys.getrefcount(buf) > before
    assert NUMPY.host_dtype("float32", None) == np.float32


def test_numpy_index_is_the_positions_themselves():
    where = np.array([0, 2])
    assert NUMPY.index(where, np.zeros(3)) is where


def test_numpy_pads_in_every_mode_an_ndarray_only():
    x = np.arange(4.0)
    np.testing.assert_array_equal(NUMPY.pad(x, [(1, 1)], "mean", 0), np.pad(x, 1, "mean"))
    np.testing.assert_array_equal(NUMPY.pad(x, [(1, 0)], "constant", 7), [7, 0, 1, 2, 3])
    assert NUMPY.pads_whole(x)
    assert not NUMPY.pads_whole([1.0])


def test_numpy_output_takes_anything_with_array():
    class Wrapped:
        def __array__(self, dtype=None, copy=None):
            return np.ones(2)

    np.testing.assert_array_equal(NUMPY.as_output(Wrapped()), [1, 1])
    assert NUMPY.as_output("text") is None
    assert NUMPY.output_kind == "an array"


def test_numpy_has_no_grad_and_wide_sums_where_the_platform_has_them():
    from patchgrid.backends import WIDE

    assert isinstance(NUMPY.no_grad(), contextlib.nullcontext)
    assert not NUMPY.needs_grad(np.zeros(2))
    assert NUMPY.wide_sums is WIDE
    assert NUMPY.host_loops


@pytest.mark.parametrize(
    ("dtype", "real"),
    [("complex64", "float32"), ("complex128", "float64"), ("float32", "float32")],
)
def test_numpy_real_dtype(dtype, real):
    assert NUMPY.real_dtype(np.dtype(dtype)) == np.dtype(real)


def test_numpy_as_strided_over_a_readonly_contiguous_array_is_the_same_view():
    x = np.arange(12.0)
    x.flags.writeable = False
    fast = NUMPY.as_strided(x, (3, 4), (32, 8), writeable=False)
    np.testing.assert_array_equal(fast, x.reshape(3, 4))
    assert not fast.flags.writeable
    assert np.shares_memory(fast, x)
    objects = np.array([None] * 4, dtype=object)
    assert NUMPY.as_strided(objects, (2,), (8,), writeable=False).shape == (2,)


def test_numpy_reshape_and_broadcast():
    x = np.arange(6.0)
    assert np.shares_memory(NUMPY.reshape(x, (2, 3)), x)
    assert NUMPY.broadcast_to(np.ones((1, 3)), (4, 3)).shape == (4, 3)
    assert NUMPY.size(np.zeros((2, 5))) == 10
    assert NUMPY.address(x[2:]) == NUMPY.address(x) + 16


def test_numpy_copy_fast_without_torch_leaves_the_copy_to_the_caller(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)
    dst = np.zeros(4)
    assert NUMPY.copy_fast(dst, np.ones(4)) is False
    assert not dst.any()
    assert NUMPY.one_thread()


def test_numpy_as_dtype_reads_a_torch_dtype_by_name():
    torch = _torch()
    assert NUMPY.as_dtype(torch.float32) == np.dtype(np.float32)
    assert NUMPY.as_dtype("int16") == np.dtype(np.int16)


def test_numpy_from_any_brings_a_tensor_to_the_host():
    torch = _torch()
    got = NUMPY.from_any(torch.arange(3.0, requires_grad=True) * 2)
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, [0, 2, 4])


def test_numpy_copy_fast_with_torch_copies():
    _torch()
    dst = np.zeros((4, 4))
    src = np.arange(32.0).reshape(4, 8)[:, ::2]
    assert NUMPY.copy_fast(dst, src) is True
    np.testing.assert_array_equal(dst, src)
    assert not NUMPY.one_thread()


# torch's answers, and that they match NumPy's where torch used to inherit them.


def _tensor_backend():
    torch = _torch()
    return torch, backend_of(torch.zeros(1))


def test_torch_backend_is_found_by_type_and_cached():
    torch, xp = _tensor_backend()
    assert isinstance(xp, TorchBackend)
    assert backend_of(torch.ones(2)) is xp
    assert backend_of(np.ones(2)) is NUMPY
    assert backend_of([1, 2]) is NUMPY


def test_torch_shape_and_dtype_as_numpy_gave_them():
    torch, xp = _tensor_backend()
    t = torch.zeros(2, 3, dtype=torch.float16)
    assert xp.shape(t) == (2, 3)
    assert type(xp.shape(t)) is tuple
    assert xp.dtype(t) is torch.float16


def test_torch_owns_tensors_only():
    torch, xp = _tensor_backend()
    assert xp.owns(torch.zeros(2))
    assert xp.owns(torch.zeros(2), plain=True)
    assert not xp.owns(np.zeros(2))
    assert in_memory(torch.zeros(2), plain=True)
    assert xp.layout(torch.zeros(2, 3)) == ((2, 3), (3, 1), torch.float32)
    assert xp.layout(np.zeros(2)) is None


def test_torch_host_is_a_view_of_cpu_tensors_without_grad():
    torch, xp = _tensor_backend()
    t = torch.zeros(3)
    view = xp.host(t)
    view[1] = 5
    assert t[1] == 5
    assert xp.host(torch.zeros(3, requires_grad=True)) is None
    assert xp.host(torch.zeros(3, dtype=torch.bfloat16)) is None
    assert xp.host(np.zeros(3)) is None


def test_torch_host_buffers_wrap_without_copy():
    torch, xp = _tensor_backend()
    like = torch.zeros(1)
    assert xp.host_dtype(torch.uint16, like) == np.uint16
    assert xp.host_dtype(torch.bfloat16, like) is None
    buf = np.zeros(3, np.float32)
    wrapped = xp.from_host(buf)
    wrapped[0] = 1
    assert buf[0] == 1


def test_torch_divides_by_a_host_buffer():
    torch, xp = _tensor_backend()
    t = torch.full((3,), 6.0, dtype=torch.float64)
    xp.divide(t, np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(t.numpy(), [6, 3, 2])


def test_torch_from_any_wraps_an_ndarray():
    torch, xp = _tensor_backend()
    got = xp.from_any(np.arange(6.0).reshape(2, 3)[:, ::2])
    assert isinstance(got, torch.Tensor)
    np.testing.assert_array_equal(got.numpy(), [[0, 2], [3, 5]])
    t = torch.ones(2)
    assert xp.from_any(t) is t


def test_torch_index_broadcast_reshape_and_size():
    torch, xp = _tensor_backend()
    like = torch.zeros(3)
    index = xp.index(np.array([0, 2]), like)
    assert index.dtype == torch.int64
    assert index.tolist() == [0, 2]
    assert tuple(xp.broadcast_to(torch.ones(1, 3), (4, 3)).shape) == (4, 3)
    x = torch.arange(6.0)
    assert xp.reshape(x, (2, 3)).data_ptr() == x.data_ptr()
    with pytest.raises(RuntimeError):
        xp.reshape(torch.zeros(3, 4).t(), (12,))  # no view: torch says so
    assert xp.size(torch.zeros(2, 5)) == 10
    assert xp.address(x[2:]) == xp.address(x) + 8


def test_torch_pads_through_index_maps_only():
    torch, xp = _tensor_backend()
    assert xp.pad(torch.zeros(3), [(1, 1)], "mean", 0) is None
    assert not xp.pads_whole(torch.zeros(3))


def test_torch_output_grad_and_threads():
    torch, xp = _tensor_backend()
    assert xp.as_output(np.ones(2)) is None
    t = torch.ones(2)
    assert xp.as_output(t) is t
    assert xp.output_kind == "a tensor for a tensor image"
    assert xp.needs_grad(torch.ones(2, requires_grad=True))
    with xp.no_grad():
        assert not torch.is_grad_enabled()
    assert not xp.one_thread()
    assert not xp.host_loops
    assert not xp.wide_sums


def test_torch_copy_fast_always_copies():
    torch, xp = _tensor_backend()
    dst = torch.zeros(3)
    assert xp.copy_fast(dst, torch.arange(3.0)) is True
    assert dst.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("dtype", "real"), [("complex64", "float32"), ("complex128", "float64"), ("int16", "int16")]
)
def test_torch_real_dtype(dtype, real):
    torch, xp = _tensor_backend()
    assert xp.real_dtype(getattr(torch, dtype)) is getattr(torch, real)


@pytest.mark.parametrize("value", [-1, 0, 255, 256, 2**40, 1.5, float("inf")])
@pytest.mark.parametrize("dtype", ["uint8", "int16", "int64", "float32", "float64"])
def test_torch_fits_as_numpy(dtype, value):
    torch, xp = _tensor_backend()
    assert xp.fits(value, getattr(torch, dtype)) == NUMPY.fits(value, np.dtype(dtype))


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "bool", "int8", "float32", "complex64"])
def test_torch_value_range_as_numpy(dtype):
    torch, xp = _tensor_backend()
    values = np.array([3, 0, 7, 1]).astype(dtype)
    if dtype == "complex64":
        values = values + 1j * np.array([0, -2, 1, 9], np.float32)
    assert xp.value_range(torch.from_numpy(values)) == NUMPY.value_range(values)
