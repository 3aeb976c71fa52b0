"""Layer L0: the array operations patchgrid needs, one interface, looked up by array type.

What lives here:

- :class:`Backend`, the interface (einops' ``AbstractBackend``). Every operation of the base
  raises ``NotImplementedError`` naming the backend class and the operation, so a backend that
  forgets one fails loudly where it is called, never quietly through another backend's code.
  No operation of the base is concrete.
- :class:`NumpyBackend` (the instance :data:`NUMPY`): NumPy's implementation. Where the caller
  has imported torch, a few in-place operations on large NumPy arrays borrow torch's
  multi-threaded kernels (:data:`TORCH_ADD_MIN`); nothing here imports torch for it.
- :class:`TorchBackend`: torch's operations (:class:`patchgrid._torch.TorchOps`) on the
  interface; torch is imported when the first tensor is seen.
- :func:`backend_of`, the lookup by type (cached), and the questions asked of any array:
  :func:`in_memory`, :func:`is_tensor`, :func:`is_dask`.
- The one range-and-cast rule: :func:`lossless`, :func:`check_cast`, :func:`check_exact_sum`,
  and :data:`WIDE`.
- The types: :class:`SupportsArray` and :data:`ArrayT`, "an ndarray in gives an ndarray out,
  a tensor gives a tensor".

Code outside the backends never asks which backend it holds; it asks the backend.

It may import NumPy, :mod:`patchgrid._checks` and :mod:`patchgrid._torch` (torch's
implementation, same layer, which imports nothing of this module). torch itself is never
imported here: a tensor can only reach patchgrid if the caller imported torch already, so
the lookup checks ``sys.modules`` (einops' habit).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

import numpy as np

from ._checks import PatchgridError
from ._torch import TorchOps

__all__ = [
    "NUMPY", "WIDE", "ArrayT", "Backend", "NumpyBackend", "SupportsArray", "TorchBackend",
    "backend_of", "check_cast", "check_exact_sum", "in_memory", "is_dask", "is_tensor",
    "lossless",
]  # fmt: skip

# Whether this platform's ``longdouble`` has more mantissa bits than float64 (x86's 80-bit
# extended: 63 bits, every int64 and uint64 exactly; a quad on some others).
WIDE = np.finfo(np.longdouble).nmant > np.finfo(np.float64).nmant


class SupportsArray(Protocol):
    """What patchgrid needs of an array held in memory: NumPy arrays and torch tensors have
    it; lazy arrays (zarr, HDF5, ``pg.open`` images) have no in-place arithmetic."""

    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> Any: ...
    @property
    def ndim(self) -> int: ...
    def __getitem__(self, key: Any, /) -> Any: ...
    def __setitem__(self, key: Any, value: Any, /) -> None: ...
    def __iadd__(self, other: Any, /) -> Any: ...


#: An array of one backend: an ndarray in gives an ndarray out, a tensor gives a tensor.
ArrayT = TypeVar("ArrayT", bound=SupportsArray)


def _raising(cls: _C) -> _C:
    """The interface made loud: each operation declared in ``cls`` (a signature with an empty
    body) replaced by one that raises ``NotImplementedError`` naming the backend's class and
    the operation, so that a backend that does not implement it fails where it is called."""
    for name, member in list(vars(cls).items()):
        if isinstance(member, property):
            setattr(cls, name, property(_missing(name, member.fget)))
        elif callable(member) and not name.startswith("_"):
            setattr(cls, name, _missing(name, member))
    return cls


def _missing(operation: str, declared: Any) -> Any:
    @functools.wraps(declared)
    def missing(self: object, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__} does not implement {operation}() of backends.Backend"
        )

    return missing


_C = TypeVar("_C", bound=type)


@_raising
class Backend(Protocol):
    """The interface: every array operation patchgrid's engine performs (einops'
    ``AbstractBackend``).

    Every operation here raises ``NotImplementedError`` naming the backend and the operation;
    an implementation subclasses ``Backend`` and overrides each of them (:class:`NumpyBackend`,
    :class:`TorchBackend`), and mypy refuses to instantiate one that misses any. None is
    concrete on the base, the three attributes included (properties that raise); only
    ``__hash__`` is, by identity (backends are keys of cached plans). Strides are
    in the backend's own units (bytes for NumPy, elements for torch); ``dtype`` arguments take
    the backend's dtypes or NumPy's; ``like`` is an array of the backend that a new one is
    made beside (on its device).

    Attributes

    - ``name``: "numpy", "torch"; for messages only, never to branch on.
    - ``host_loops``: whether operations run as NumPy loops on the host, one thread each,
      releasing the GIL: patchgrid's strided loops then pay off (rows copied as opaque items,
      short rows reordered, chunks on threads), and the compiled kernels take its arrays.
      False for torch, whose kernels run on their own threads or on the device.
    - ``wide_sums``: whether sums of 64-bit integers are exact (NumPy's x87 extended
      ``longdouble`` accumulator, :data:`WIDE`).
    - ``output_kind``: what a model must return for an image of this backend, in words.

    What an array is

    - ``asarray(x)``: a region read from an image of this backend, as one of its arrays.
    - ``owns(x, plain=False)``: whether ``x`` is an array of this backend held in memory
      (``plain``: not an ndarray subclass such as ``np.memmap``, whose pages live in a file).
    - ``layout(x)``: ``(shape, strides, dtype)`` of a plain array of this backend, a key for
      cached plans; None for anything else.
    - ``shape``, ``strides``, ``dtype``, ``itemsize``, ``nbytes``, ``size`` (elements),
      ``address`` (of the first element), ``writeable``.
    - ``needs_grad(x)``: whether ``x`` is part of an autograd graph (never for NumPy).
    - ``pads_whole(x)``: whether :meth:`pad` takes ``x`` in every ``numpy.pad`` mode, those
      that read the whole image (``mean``, ``median``...) included: an ndarray for NumPy;
      never for torch.
    - ``on_device(x)``: whether ``x`` lives off the host, on an accelerator (a CUDA tensor):
      the device engine merges it (:data:`patchgrid.settings.DEVICE_ENGINE`). Never for NumPy.
    - ``one_thread()``: whether accumulating runs on one thread, so that a reader thread
      beside it helps: NumPy's ufuncs, unless the caller has imported torch (whose fused adds
      NumPy arrays borrow, on all cores); never torch's.

    Making arrays

    - ``empty``, ``full``; ``constant(array, dtype, like)``: a small NumPy array (a window,
      a profile) moved to the backend.
    - ``index(where, like)``: integer positions as an index into arrays like ``like``
      (``x[..., index] = v``): the ndarray itself for NumPy, an int64 tensor for torch.
    - ``host(x)``: a NumPy view of ``x``'s own memory (no copy: writes go through), or None:
      an ndarray itself; a CPU tensor that needs no grad, where ``Tensor.numpy`` serves.
    - ``host_dtype(dtype, like)``: the NumPy dtype of a host buffer that stands for arrays of
      ``dtype`` beside ``like`` (``from_host`` wraps it, ``divide`` takes it); None off the CPU
      or for a dtype NumPy does not have (bfloat16).
    - ``from_host(buf)``: an array over a NumPy buffer's memory, no copy (a view for NumPy,
      so that the buffer's reference count shows it in use).
    - ``from_any(x)``: an array of any backend as one this backend's arrays are assigned from
      (``out[...] = from_any(x)``): NumPy brings a tensor to the host, torch wraps an ndarray.
    - ``as_output(x)``: a model's output as an array of this backend, or None where it is not
      one (NumPy takes anything with ``__array__``; torch only tensors).
    - ``no_grad()``: the context a model runs in (no autograd graph; nothing for NumPy).
    - ``out_of_memory(exc)``: whether ``exc``, raised by a model, is the device running out of
      memory, which a smaller batch may avoid (torch's CUDA out-of-memory error; the device's
      cache is emptied then). Never for NumPy: the host's ``MemoryError`` is not retried.

    Views

    - ``as_strided``, ``readonly`` (torch has no read-only tensors), ``broadcast_to``.
    - ``reshape(x, shape)``: a view where the memory allows (torch raises where it does not).
    - ``pad(x, pad_width, mode, value)``: ``numpy.pad`` where the backend has it, any mode
      (NumPy); None where the caller pads through index maps (torch).

    Dtypes

    - ``as_dtype`` (the backend's dtype for a NumPy one, or for the other backend's by name),
      ``numpy_dtype`` (the NumPy dtype that stands for it in the cast rule), ``kind`` ('b',
      'i', 'u', 'f' or 'c'), ``real_dtype`` (of a complex dtype's parts).
    - ``acc_dtype(dtype, reduce)``: a merge's accumulator; ``out_dtype``: its result where
      nothing says; ``label_dtype(n)``: the smallest that holds ``argmax``'s labels;
      ``extreme(dtype, big)``: the identity of ``min`` (``big``) or ``max``;
      ``fits(value, dtype)``: whether ``value`` can be stored in ``dtype``.

    Arithmetic in place

    - ``inplace(op, target, source)``: ``add``, ``max`` or ``min`` into ``target``;
      ``add_product``: ``target += source * weight``; ``divide``: ``target /= divisor`` (a
      host buffer from ``host_dtype`` too); ``assign``: ``target[...] = source``;
      ``fill_where``.
    - ``copy_fast(dst, src)``: ``dst[...] = src`` where the backend has a fast whole-array
      copy (torch: always; NumPy: on torch's threads when the caller has imported torch);
      False, nothing done, leaves it to the caller's strided loops.

    Finishing and moving data

    - ``argmax`` (the first largest, NaN counting as largest), ``round`` (half to even),
      ``astype``, ``copy``, ``stack``, ``take``, ``to_numpy`` (on the host),
      ``value_range`` (``(min, max)``, NaN if any; complex: over both parts),
      ``count_inf``.
    """

    name: str = "abstract"

    def __hash__(self) -> int:
        """By identity: a backend is part of the key of cached plans."""
        return object.__hash__(self)

    @property
    def host_loops(self) -> bool: ...
    @property
    def wide_sums(self) -> bool: ...
    @property
    def output_kind(self) -> str: ...

    def asarray(self, x: Any) -> Any: ...
    def owns(self, x: object, plain: bool = False) -> bool: ...
    def layout(self, x: object) -> tuple[tuple[int, ...], tuple[int, ...], Any] | None: ...
    def shape(self, x: SupportsArray) -> tuple[int, ...]: ...
    def strides(self, x: SupportsArray) -> tuple[int, ...]: ...
    def dtype(self, x: SupportsArray) -> Any: ...
    def itemsize(self, x: SupportsArray) -> int: ...
    def nbytes(self, x: SupportsArray) -> int: ...
    def size(self, x: SupportsArray) -> int: ...
    def address(self, x: SupportsArray) -> int: ...
    def writeable(self, x: SupportsArray) -> bool: ...
    def needs_grad(self, x: SupportsArray) -> bool: ...
    def pads_whole(self, x: object) -> bool: ...
    def one_thread(self) -> bool: ...
    def on_device(self, x: SupportsArray) -> bool: ...

    def empty(self, shape: Sequence[int], dtype: Any, like: Any) -> Any: ...
    def full(self, shape: Sequence[int], value: Any, dtype: Any, like: Any) -> Any: ...
    def constant(self, array: np.ndarray, dtype: Any, like: Any) -> Any: ...
    def index(self, where: np.ndarray, like: Any) -> Any: ...
    def host(self, x: object) -> np.ndarray | None: ...
    def host_dtype(self, dtype: Any, like: Any) -> np.dtype | None: ...
    def from_host(self, buf: np.ndarray) -> Any: ...
    def from_any(self, x: Any) -> Any: ...
    def as_output(self, x: object) -> Any | None: ...
    def no_grad(self) -> contextlib.AbstractContextManager[Any]: ...

    def as_strided(self, base: ArrayT, shape: Sequence[int], strides: Sequence[int],
                   writeable: bool, at: tuple[slice, ...] | None = None) -> ArrayT: ...  # fmt: skip
    def readonly(self, x: ArrayT) -> ArrayT: ...
    def broadcast_to(self, x: ArrayT, shape: Sequence[int]) -> ArrayT: ...
    def reshape(self, x: ArrayT, shape: Sequence[int]) -> ArrayT: ...
    def pad(self, x: ArrayT, pad_width: Any, mode: str, value: Any) -> ArrayT | None: ...

    def as_dtype(self, dtype: Any) -> Any: ...
    def numpy_dtype(self, dtype: Any) -> np.dtype: ...
    def kind(self, dtype: Any) -> str: ...
    def real_dtype(self, dtype: Any) -> Any: ...
    def acc_dtype(self, dtype: Any, reduce: str) -> Any: ...
    def out_dtype(self, dtype: Any, reduce: str) -> Any: ...
    def label_dtype(self, n_classes: int) -> Any: ...
    def extreme(self, dtype: Any, big: bool) -> Any: ...
    def fits(self, value: Any, dtype: Any) -> bool: ...

    def inplace(self, op: str, target: SupportsArray, source: Any, order: str = "K") -> None: ...
    def add_product(self, target: SupportsArray, source: Any, weight: Any,
                    scratch: list[Any]) -> None: ...  # fmt: skip
    def divide(self, target: SupportsArray, divisor: Any) -> None: ...
    def assign(self, target: SupportsArray, source: Any) -> None: ...
    def copy_fast(self, dst: SupportsArray, src: Any) -> bool: ...
    def fill_where(self, target: SupportsArray, mask: Any, value: Any) -> None: ...

    def argmax(self, x: ArrayT, axis: int) -> ArrayT: ...
    def round(self, x: ArrayT) -> ArrayT: ...
    def astype(self, x: ArrayT, dtype: Any) -> ArrayT: ...
    def copy(self, x: ArrayT) -> ArrayT: ...
    def stack(self, items: list[ArrayT], out: ArrayT) -> ArrayT: ...
    def take(self, x: ArrayT, index: np.ndarray, axis: int) -> ArrayT: ...
    def to_numpy(self, x: Any) -> np.ndarray: ...
    def value_range(self, x: SupportsArray) -> tuple[Any, Any]: ...
    def count_inf(self, x: SupportsArray) -> int: ...
    def out_of_memory(self, exc: BaseException) -> bool: ...


class NumpyBackend(Backend):
    """NumPy arrays (:data:`NUMPY`). Strides in bytes."""

    name = "numpy"
    host_loops = True
    wide_sums = WIDE
    output_kind = "an array"

    def asarray(self, x: Any) -> Any:
        return np.asarray(x)

    def owns(self, x: object, plain: bool = False) -> bool:
        return type(x) is np.ndarray if plain else isinstance(x, np.ndarray)

    def layout(self, x: Any) -> tuple[tuple[int, ...], tuple[int, ...], Any] | None:
        return (x.shape, x.strides, x.dtype) if type(x) is np.ndarray else None

    def shape(self, x: Any) -> tuple[int, ...]:
        return tuple(x.shape)

    def strides(self, x: Any) -> tuple[int, ...]:
        return tuple(x.strides)

    def dtype(self, x: Any) -> Any:
        return x.dtype

    def itemsize(self, x: Any) -> int:
        return int(x.itemsize)

    def nbytes(self, x: Any) -> int:
        return int(x.nbytes)

    def size(self, x: Any) -> int:
        return int(x.size)

    def address(self, x: Any) -> int:
        return int(x.ctypes.data)

    def writeable(self, x: Any) -> bool:
        return bool(x.flags.writeable)

    def needs_grad(self, x: Any) -> bool:
        return False

    def pads_whole(self, x: object) -> bool:
        return isinstance(x, np.ndarray)

    def one_thread(self) -> bool:
        return sys.modules.get("torch") is None

    def on_device(self, x: Any) -> bool:
        return False

    def empty(self, shape: Sequence[int], dtype: Any, like: Any) -> Any:
        return np.empty(tuple(shape), dtype=dtype)

    def full(self, shape: Sequence[int], value: Any, dtype: Any, like: Any) -> Any:
        return np.full(tuple(shape), value, dtype=dtype)

    def constant(self, array: np.ndarray, dtype: Any, like: Any) -> Any:
        return np.asarray(array, dtype=dtype)

    def index(self, where: np.ndarray, like: Any) -> Any:
        return where

    def host(self, x: object) -> np.ndarray | None:
        return x if isinstance(x, np.ndarray) else None

    def host_dtype(self, dtype: Any, like: Any) -> np.dtype | None:
        return self.numpy_dtype(dtype)

    def from_host(self, buf: np.ndarray) -> Any:
        return buf[...]

    def from_any(self, x: Any) -> Any:
        return backend_of(x).to_numpy(x)

    def as_output(self, x: object) -> Any | None:
        if not (isinstance(x, np.ndarray) or hasattr(x, "__array__")):
            return None
        return np.asarray(x)

    def no_grad(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def as_strided(self, base: Any, shape: Sequence[int], strides: Sequence[int],
                   writeable: bool, at: tuple[slice, ...] | None = None) -> Any:  # fmt: skip
        # ``at``: the view starts at the first element of ``base[at]``.
        if at is not None:
            base = base[at]
        shape, strides = tuple(shape), tuple(strides)
        if not writeable and base.flags.c_contiguous and not base.dtype.hasobject:
            # The ndarray constructor over the base's buffer: a third of as_strided's cost.
            view = np.ndarray(shape, base.dtype, base, 0, strides)
            view.flags.writeable = False
            return view
        return np.lib.stride_tricks.as_strided(base, shape, strides, writeable=writeable)

    def readonly(self, x: Any) -> Any:
        x.flags.writeable = False
        return x

    def broadcast_to(self, x: Any, shape: Sequence[int]) -> Any:
        return np.broadcast_to(x, tuple(shape))

    def reshape(self, x: Any, shape: Sequence[int]) -> Any:
        return x.reshape(shape)

    def pad(self, x: Any, pad_width: Any, mode: str, value: Any) -> Any | None:
        if mode == "constant":
            return np.pad(x, pad_width, mode="constant", constant_values=value)
        return np.pad(x, pad_width, mode=mode)  # type: ignore[call-overload]

    def as_dtype(self, dtype: Any) -> Any:
        try:
            return np.dtype(dtype)
        except TypeError:  # a torch dtype (a tensor out= beside NumPy patches), by its name
            return np.dtype(str(dtype).replace("torch.", ""))

    def numpy_dtype(self, dtype: Any) -> np.dtype:
        result: np.dtype = np.dtype(dtype)
        return result

    def kind(self, dtype: Any) -> str:
        return str(np.dtype(dtype).kind)

    def real_dtype(self, dtype: Any) -> Any:
        dtype = np.dtype(dtype)
        return np.finfo(dtype).dtype if dtype.kind == "c" else dtype

    def acc_dtype(self, dtype: Any, reduce: str) -> Any:
        """The patches' dtype for ``max``/``min``; for sums, a float with more mantissa bits
        than the patches carry, so that the sum of many equal values divided by their count
        is that value exactly and no sum of finite values overflows (float64 for float16/32
        and integers up to 32 bits; the x87 extended ``longdouble``, where the platform has
        one, for float64 and 64-bit integers)."""
        dtype = np.dtype(dtype)
        if reduce in ("max", "min"):
            return dtype
        if dtype.kind == "c":
            return np.dtype(np.clongdouble) if dtype.itemsize >= 16 and WIDE else np.dtype(
                np.complex128)  # fmt: skip
        if dtype.itemsize >= 8 and WIDE:
            return np.dtype(np.longdouble)
        return np.dtype(np.float64)

    def out_dtype(self, dtype: Any, reduce: str) -> Any:
        dtype = np.dtype(dtype)
        if reduce in ("max", "min") or dtype.kind in "fc":
            return dtype
        return np.dtype(np.float64)

    def label_dtype(self, n_classes: int) -> Any:
        for t in (np.uint8, np.uint16, np.uint32):
            if n_classes - 1 <= np.iinfo(t).max:
                return np.dtype(t)
        return np.dtype(np.int64)

    def extreme(self, dtype: Any, big: bool) -> Any:
        dtype = np.dtype(dtype)
        if dtype.kind == "b":
            return big
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            return info.max if big else info.min
        if dtype.kind == "f":
            return np.inf if big else -np.inf
        raise PatchgridError(f"reduce='max' and 'min' need real patches, got dtype {dtype}")

    def fits(self, value: Any, dtype: Any) -> bool:
        """Exactly for integers, without overflowing for floats (rounding is fine; inf and NaN
        stay themselves)."""
        dtype = np.dtype(dtype)
        ref = np.array(value)
        with np.errstate(invalid="ignore", over="ignore"):
            cast = ref.astype(dtype)
            if dtype.kind in "fc":
                return bool(np.isfinite(cast).all() or not np.isfinite(ref).all())
            if ref.dtype.kind in "fc" and not np.isfinite(ref).all():
                return False
            return bool(cast == ref)

    def inplace(self, op: str, target: Any, source: Any, order: str = "K") -> None:
        if op == "add" and target.size >= TORCH_ADD_MIN and torch_can(target, source):
            # As for add_product: NumPy adds into a strided view through buffers, torch's
            # in-place add does not; used only when the caller has imported torch.
            torch = sys.modules["torch"]
            torch.from_numpy(target).add_(torch.from_numpy(source))
            return
        ufunc = {"add": np.add, "max": np.maximum, "min": np.minimum}[op]
        if target.dtype != source.dtype and source.size >= TORCH_ADD_MIN:
            # Mixed dtypes (float32 patches into a float64 accumulator): one contiguous cast
            # first, which NumPy does far faster than casting through its ufunc buffers.
            source = source.astype(target.dtype)
        ufunc(target, source, out=target, order=order)

    def add_product(self, target: Any, source: Any, weight: Any, scratch: list[Any]) -> None:
        """When the caller has imported torch already, its fused ``addcmul_`` does this in one
        pass over the same memory (about 3x faster than NumPy's two); nothing imports torch
        for it."""
        if torch_can(target, source, weight):
            torch = sys.modules["torch"]
            out = torch.from_numpy(target)
            out.addcmul_(torch.from_numpy(source), torch.from_numpy(weight))
            return
        n = source.size
        dtype = np.result_type(source, weight)
        if not scratch or scratch[0].size < n or scratch[0].dtype != dtype:
            scratch[:] = [np.empty(n, dtype=dtype)]
        buf = scratch[0][:n].reshape(source.shape)
        np.multiply(source, weight, out=buf)
        np.add(target, buf, out=target)

    def divide(self, target: Any, divisor: Any) -> None:
        np.divide(target, divisor, out=target)

    def assign(self, target: Any, source: Any) -> None:
        target[...] = source

    def copy_fast(self, dst: Any, src: Any) -> bool:
        """On torch's threads (a strided patch copied on all cores) where the caller has
        imported torch, the dtypes agree and ``src`` is writeable (torch warns on read-only
        arrays)."""
        torch = sys.modules.get("torch")
        if torch is not None and src.dtype == dst.dtype and src.flags.writeable:
            try:
                torch.from_numpy(dst).copy_(torch.from_numpy(src))
                return True
            except TypeError:  # a dtype torch does not have
                pass
        return False

    def fill_where(self, target: Any, mask: Any, value: Any) -> None:
        np.copyto(target, value, where=mask, casting="unsafe")

    def argmax(self, x: Any, axis: int) -> Any:
        return np.argmax(x, axis=axis)

    def round(self, x: Any) -> Any:
        return np.rint(x)

    def astype(self, x: Any, dtype: Any) -> Any:
        return x.astype(dtype, copy=False)

    def copy(self, x: Any) -> Any:
        return np.array(x, copy=True)

    def stack(self, items: list[Any], out: Any) -> Any:
        for i, item in enumerate(items):
            out[i] = item
        return out

    def take(self, x: Any, index: np.ndarray, axis: int) -> Any:
        return np.take(x, index, axis=axis)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def value_range(self, x: Any) -> tuple[Any, Any]:
        if x.dtype.kind == "c":
            parts = (x.real, x.imag)
            lows = [p.min().item() for p in parts]
            highs = [p.max().item() for p in parts]
            nan = any(v != v for v in (*lows, *highs))
            return (np.nan, np.nan) if nan else (min(lows), max(highs))
        return x.min().item(), x.max().item()

    def count_inf(self, x: Any) -> int:
        if x.dtype.kind == "c":
            return int(np.isinf(x.real).sum() + np.isinf(x.imag).sum())
        return int(np.isinf(x).sum())

    def out_of_memory(self, exc: BaseException) -> bool:
        return False


# The least items of an in-place add worth handing to torch (when the caller imported it).
TORCH_ADD_MIN = 1 << 16


def torch_can(target: Any, *sources: Any) -> bool:
    """Whether torch, already imported by the caller, can work on these NumPy arrays in place:
    one float dtype of 4 bytes or more, writeable (torch warns on read-only arrays), no
    negative strides."""
    if sys.modules.get("torch") is None:
        return False
    arrays = (target, *sources)
    return (
        all(isinstance(a, np.ndarray) and a.dtype == target.dtype for a in arrays)
        and target.dtype.kind == "f"
        and target.dtype.itemsize >= 4
        and all(a.flags.writeable and all(st >= 0 for st in a.strides) for a in arrays)
    )


NUMPY = NumpyBackend()


class TorchBackend(TorchOps, Backend):
    """torch tensors, on any device: the operations are :class:`patchgrid._torch.TorchOps`;
    any it lacks falls through to the interface's, which raises."""

    def __init__(self) -> None:
        super().__init__(NUMPY)


def lossless(src: np.dtype, dst: np.dtype) -> bool:
    """Whether every value of dtype ``src`` is held by ``dst`` (floats may round, but never
    overflow; integers and booleans are held exactly)."""
    src, dst = np.dtype(src), np.dtype(dst)
    if src == dst or src.kind == "b":
        return True
    if dst.kind == "b":
        return False
    if src.kind in "iu" and dst.kind in "iu":
        return bool(np.can_cast(src, dst, "safe"))
    if src.kind in "iu" and dst.kind in "fc":
        info = np.iinfo(src)
        limit = 2 ** (np.finfo(dst).nmant + 1)
        return bool(info.max <= limit and info.min >= -limit)
    if (src.kind == "f" and dst.kind in "fc") or (src.kind == "c" and dst.kind == "c"):
        return bool(np.finfo(dst).max >= np.finfo(src).max)
    return False


def check_cast(xp: Backend, values: SupportsArray, dtype: Any, *, src: Any = None,
               force: bool = False, what: str = "the result", hint: str = "") -> None:  # fmt: skip
    """The one range-and-cast rule: refuse to cast ``values`` into ``dtype`` where a value
    would not be held (no wrapping, no NaN turned into an integer, no overflow to inf, no
    integer beyond the range a float holds exactly, no complex into real).

    Every path that casts (merges in memory, out of core and on Dask, extract's ``out=``, NumPy
    and torch) goes through this. Integer targets take values already rounded. The values are
    looked at only where the dtypes alone do not settle it.

    ``src`` is the dtype the values stand for when they are held in another (integer
    patches averaged in a float accumulator); ``force`` looks at the values even where the
    dtypes would settle it (sums, which may leave the range of what they add).
    """
    dst = xp.numpy_dtype(dtype)
    src = xp.numpy_dtype(xp.dtype(values)) if src is None else xp.numpy_dtype(src)
    if not force and lossless(src, dst):
        return
    tail = f"; {hint}" if hint else ""
    if src.kind == "c" and dst.kind != "c":
        raise PatchgridError(
            f"{what} is complex ({src}) and dtype {dst} is not: the imaginary part would be "
            f"dropped; take .real or .imag first, or use a complex dtype{tail}"
        )
    if not xp.size(values):
        return
    lo, hi = xp.value_range(values)
    if lo != lo or hi != hi:  # NaN
        if dst.kind in "iub":
            raise PatchgridError(
                f"{what} holds NaN, which dtype {dst} cannot store; fill or mask the NaN "
                f"first, or use a floating dtype{tail}"
            )
        return  # NaN stays NaN in a float
    if dst.kind in "iub":
        low, high = (0, 1) if dst.kind == "b" else (np.iinfo(dst).min, np.iinfo(dst).max)
        if not (low <= lo and hi <= high):
            raise PatchgridError(
                f"{what} runs from {lo} to {hi}, which dtype={dst} cannot hold ({low} to "
                f"{high}); values outside it would wrap{tail}"
            )
        return
    if src.kind in "iub":
        limit = 2 ** (np.finfo(dst).nmant + 1)
        if lo < -limit or hi > limit:
            raise PatchgridError(
                f"{what} runs from {lo} to {hi}; dtype={dst} holds integers exactly only up to "
                f"2**{np.finfo(dst).nmant + 1} in size, so these would be rounded{tail}"
            )
        return
    big = float(np.finfo(dst).max)
    if np.isfinite(lo) and np.isfinite(hi):
        over = abs(lo) > big or abs(hi) > big
    else:  # infinities are held; finite values between them must not become more of them
        with np.errstate(over="ignore"):
            over = xp.count_inf(xp.astype(values, dtype)) > xp.count_inf(values)
    if over:
        raise PatchgridError(
            f"{what} runs from {lo} to {hi}, beyond what dtype={dst} holds (largest "
            f"{big:g}): values would overflow to inf{tail}"
        )


def check_exact_sum(xp: Backend, values: SupportsArray, acc: Any, overlap: int, weighted: bool,
                    *, what: str = "patches") -> None:  # fmt: skip
    """Refuse integer patches too large to be summed exactly in the accumulator ``acc``.

    ``overlap`` patches at most meet at a voxel; their sum must stay within the integers the
    accumulator holds exactly (with a window, whose weights are not integers, 2**10 less, so
    that the rounded mean of equal values is that value).
    """
    src, dst = xp.numpy_dtype(xp.dtype(values)), xp.numpy_dtype(acc)
    if src.kind not in "iu" or dst.kind not in "fc":
        return
    bits = np.finfo(dst).nmant + 1 - (10 if weighted else 0)
    limit = 2**bits // max(overlap, 1)
    info = np.iinfo(src)
    if info.max <= limit and info.min >= -limit:
        return
    if not xp.size(values):
        return
    lo, hi = xp.value_range(values)
    if lo < -limit or hi > limit:
        wide = "" if xp.wide_sums else (
            " (NumPy arrays on x86 sum in 80-bit extended precision, exact to 2**64)")  # fmt: skip
        raise PatchgridError(
            f"{what} run from {lo} to {hi}; up to {overlap} of them meet at a voxel, and their "
            f"sum is exact in {dst} only for values up to {limit} in size{wide}. For labels or "
            f"IDs use reduce='max' or 'min' (exact for every dtype), or patches that do not "
            f"overlap"
        )


@functools.lru_cache(maxsize=1)
def _torch_backend() -> TorchBackend:
    return TorchBackend()


def is_tensor(x: object) -> bool:
    """True for a torch tensor (checked without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def is_dask(x: object) -> bool:
    """True for a Dask array (checked without importing dask)."""
    module = sys.modules.get("dask.array")
    return module is not None and isinstance(x, module.Array)


def backend_of(x: object) -> Backend:
    """The backend for ``x``: torch for a tensor, NumPy for everything else."""
    if isinstance(x, np.ndarray) or not is_tensor(x):  # ndarrays first: the common case
        return NUMPY
    return _torch_backend()


def in_memory(x: object, plain: bool = False) -> bool:
    """Whether ``x`` is an array held in memory, read and written directly: an ndarray or a
    tensor (``plain``: not an ndarray subclass such as ``np.memmap``, whose pages live in a
    file). Lazy arrays (zarr, HDF5, ``pg.open`` images) and lists are not."""
    return backend_of(x).owns(x, plain)
