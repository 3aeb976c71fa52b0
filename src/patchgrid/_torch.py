"""Layer L0: torch's implementation of the backend operations.

What lives here: :class:`TorchOps`, every operation of the :class:`patchgrid.backends.Backend`
interface written for torch tensors, on any device (strides in elements, as torch counts
them). :mod:`patchgrid.backends` puts it on the interface as ``backends.TorchBackend`` and
hands it out for tensors (``backend_of``); nothing else uses this module.

It may import NumPy and :mod:`patchgrid._checks` only. torch itself is imported when the
first tensor is seen (``TorchOps.__init__``): a tensor can only reach patchgrid if the caller
imported torch already. The few rules that NumPy settles for torch (whether an integer fits a
dtype; the range of the unsigned dtypes torch has few operations for) are delegated, by name,
to the NumPy backend handed to the constructor.

This module does not import :mod:`patchgrid.backends` (which imports it), so that the two
stay free of an import cycle; ``backends.TorchBackend(TorchOps, Backend)`` is where torch's
operations meet the interface, and any operation missing here falls through to the
interface's, which raises ``NotImplementedError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from ._checks import PatchgridError

__all__ = ["TorchOps"]


class TorchOps:
    """Every operation of :class:`patchgrid.backends.Backend` for torch tensors.

    ``host`` is the NumPy backend: ``fits`` of integer dtypes and ``value_range`` of uint16
    to uint64 tensors are its rules, applied to the NumPy counterparts.
    """

    name = "torch"
    host_loops = False
    wide_sums = False
    output_kind = "a tensor for a tensor image"

    def __init__(self, host: Any) -> None:
        import torch

        self.torch = torch
        self.numpy = host
        self._np_of = numpy_dtypes(torch)
        self._torch_of = {np.dtype(v): k for k, v in self._np_of.items()}
        self._real_of = {torch.complex64: torch.float32, torch.complex128: torch.float64}

    def asarray(self, x: Any) -> Any:
        return x

    def owns(self, x: object, plain: bool = False) -> bool:
        return isinstance(x, self.torch.Tensor)

    def layout(self, x: object) -> tuple[tuple[int, ...], tuple[int, ...], Any] | None:
        if not isinstance(x, self.torch.Tensor):
            return None
        return tuple(x.shape), x.stride(), x.dtype

    def shape(self, x: Any) -> tuple[int, ...]:
        return tuple(x.shape)

    def strides(self, x: Any) -> tuple[int, ...]:
        return tuple(x.stride())

    def dtype(self, x: Any) -> Any:
        return x.dtype

    def itemsize(self, x: Any) -> int:
        return int(x.element_size())

    def nbytes(self, x: Any) -> int:
        return int(x.element_size() * x.numel())

    def size(self, x: Any) -> int:
        return int(x.numel())

    def address(self, x: Any) -> int:
        return int(x.data_ptr())

    def writeable(self, x: Any) -> bool:
        return True

    def out_of_memory(self, exc: BaseException) -> bool:
        t = self.torch
        oom = getattr(t, "OutOfMemoryError", None) or t.cuda.OutOfMemoryError
        if not isinstance(exc, oom):
            return False
        if t.cuda.is_available():
            t.cuda.empty_cache()  # what the failed call held, back to the device
        return True

    def needs_grad(self, x: Any) -> bool:
        return bool(x.requires_grad)

    def pads_whole(self, x: object) -> bool:
        return False  # torch pads through index maps only

    def one_thread(self) -> bool:
        return False  # torch's kernels use its own threads

    def on_device(self, x: Any) -> bool:
        return bool(x.device.type != "cpu")

    def empty(self, shape: Sequence[int], dtype: Any, like: Any) -> Any:
        return self.torch.empty(tuple(shape), dtype=self.as_dtype(dtype), device=like.device)

    def full(self, shape: Sequence[int], value: Any, dtype: Any, like: Any) -> Any:
        dt = self.as_dtype(dtype)
        if like.device.type == "cpu":
            try:
                np_dtype = np.dtype(str(dt).replace("torch.", ""))
            except TypeError:  # bfloat16 and the like
                np_dtype = None
            if np_dtype is not None:
                # NumPy fills in one pass that also faults the pages in, on one thread; left
                # to torch's threads, first touches of fresh pages contend and cost ~5x more.
                return self.torch.from_numpy(np.full(tuple(shape), value, dtype=np_dtype))
        return self.torch.full(tuple(shape), value, dtype=dt, device=like.device)

    def constant(self, array: np.ndarray, dtype: Any, like: Any) -> Any:
        return self.torch.as_tensor(np.asarray(array), device=like.device).to(self.as_dtype(dtype))

    def index(self, where: np.ndarray, like: Any) -> Any:
        return self.constant(where, np.int64, like)

    def host(self, x: object) -> np.ndarray | None:
        t = self.torch
        if not isinstance(x, t.Tensor) or x.device.type != "cpu" or x.requires_grad:
            return None
        try:
            view: np.ndarray = x.numpy()
        except (RuntimeError, TypeError):  # a conjugate or negative view, bfloat16, ...
            return None
        return view

    def host_dtype(self, dtype: Any, like: Any) -> np.dtype | None:
        if like.device.type != "cpu":
            return None
        try:
            return np.dtype(str(dtype).replace("torch.", ""))
        except TypeError:  # a dtype NumPy does not have (bfloat16)
            return None

    def from_host(self, buf: np.ndarray) -> Any:
        return self.torch.from_numpy(buf)

    def from_any(self, x: Any) -> Any:
        if isinstance(x, self.torch.Tensor):
            return x
        return self.torch.from_numpy(np.ascontiguousarray(x))

    def as_output(self, x: object) -> Any | None:
        return x if isinstance(x, self.torch.Tensor) else None

    def no_grad(self) -> AbstractContextManager[Any]:
        result: AbstractContextManager[Any] = self.torch.no_grad()
        return result

    def as_strided(self, base: Any, shape: Sequence[int], strides: Sequence[int],
                   writeable: bool, at: tuple[slice, ...] | None = None) -> Any:  # fmt: skip
        # A view of the whole tensor from an offset, never of a slice of it: autograd takes
        # a strided view that reaches past its input for one that does not, and loses the
        # gradient of what lies beyond.
        offset = base.storage_offset()
        for sl, step in zip(at or (), base.stride()):
            offset += (sl.start or 0) * step
        return base.as_strided(tuple(shape), tuple(strides), offset)

    def readonly(self, x: Any) -> Any:
        return x  # torch has no read-only tensors

    def broadcast_to(self, x: Any, shape: Sequence[int]) -> Any:
        return x.expand(*shape)

    def reshape(self, x: Any, shape: Sequence[int]) -> Any:
        return x.view(tuple(shape))

    def pad(self, x: Any, pad_width: Any, mode: str, value: Any) -> Any | None:
        return None  # the caller pads through index maps (the modes that copy voxels)

    def as_dtype(self, dtype: Any) -> Any:
        if isinstance(dtype, self.torch.dtype):
            return dtype
        try:
            return self._torch_of[np.dtype(dtype)]
        except (KeyError, TypeError):
            raise TypeError(f"dtype {dtype!r} has no torch equivalent") from None

    def numpy_dtype(self, dtype: Any) -> np.dtype:
        dtype = self.as_dtype(dtype)
        # bfloat16 has NumPy's float32 range (and fewer bits): it stands in for the rule.
        return np.dtype(self._np_of.get(dtype, np.float32))

    def kind(self, dtype: Any) -> str:
        t = self.torch
        if dtype == t.bool:
            return "b"
        if dtype.is_complex:
            return "c"
        if dtype.is_floating_point:
            return "f"
        unsigned = (t.uint8, *(getattr(t, f"uint{b}", t.uint8) for b in (16, 32, 64)))
        return "u" if dtype in unsigned else "i"

    def real_dtype(self, dtype: Any) -> Any:
        dtype = self.as_dtype(dtype)
        return self._real_of.get(dtype, self.torch.float64) if dtype.is_complex else dtype

    def acc_dtype(self, dtype: Any, reduce: str) -> Any:
        # torch has no type wider than float64: 64-bit values are summed in float64 (exact
        # for the integers backends.check_exact_sum lets through).
        t = self.torch
        if reduce in ("max", "min"):
            return dtype
        return t.complex128 if self.kind(dtype) == "c" else t.float64

    def out_dtype(self, dtype: Any, reduce: str) -> Any:
        if reduce in ("max", "min") or self.kind(dtype) in "fc":
            return dtype
        return self.torch.float64

    def label_dtype(self, n_classes: int) -> Any:
        t = self.torch
        if n_classes <= 256:
            return t.uint8
        return t.int16 if n_classes <= 2**15 else t.int32 if n_classes <= 2**31 else t.int64

    def extreme(self, dtype: Any, big: bool) -> Any:
        t = self.torch
        kind = self.kind(dtype)
        if kind == "b":
            return big
        if kind in "iu":
            info = t.iinfo(dtype)
            return info.max if big else info.min
        if kind == "f":
            return float("inf") if big else float("-inf")
        raise PatchgridError(f"reduce='max' and 'min' need real patches, got dtype {dtype}")

    def fits(self, value: Any, dtype: Any) -> bool:
        t = self.torch
        dtype = self.as_dtype(dtype)
        if self.kind(dtype) in "fc":
            ref = np.array(value)
            big = np.finfo(np.float16).max if dtype == t.float16 else t.finfo(dtype).max
            return bool(not np.isfinite(ref).all() or np.abs(ref) <= big)
        fits: bool = self.numpy.fits(value, np.dtype(self._np_of[dtype]))
        return fits

    def inplace(self, op: str, target: Any, source: Any, order: str = "K") -> None:
        if op == "add":
            target.add_(source)
        elif op == "max":
            self.torch.maximum(target, source, out=target)
        else:
            self.torch.minimum(target, source, out=target)

    def add_product(self, target: Any, source: Any, weight: Any, scratch: list[Any]) -> None:
        if target.dtype == source.dtype:
            target.addcmul_(source, weight)
        else:
            target.add_(source * weight)

    def divide(self, target: Any, divisor: Any) -> None:
        if isinstance(divisor, np.ndarray):  # a host buffer beside a CPU tensor
            divisor = self.torch.from_numpy(divisor)
        target.div_(divisor)

    def assign(self, target: Any, source: Any) -> None:
        if isinstance(source, self.torch.Tensor):
            target.copy_(source)
        else:
            target.fill_(source)

    def copy_fast(self, dst: Any, src: Any) -> bool:
        self.assign(dst, src)  # torch copies on its own threads, or on the device
        return True

    def fill_where(self, target: Any, mask: Any, value: Any) -> None:
        target.masked_fill_(mask.expand_as(target) if mask.shape != target.shape else mask,
                            value)  # fmt: skip

    def argmax(self, x: Any, axis: int) -> Any:
        if x.shape[axis] > 16 or self.kind(x.dtype) not in "fiu":
            return self.torch.argmax(x.movedim(axis, -1).contiguous(), dim=-1)
        return argmax_by_planes(self.torch, x, axis, self.kind(x.dtype) == "f")

    def round(self, x: Any) -> Any:
        return self.torch.round(x)

    def astype(self, x: Any, dtype: Any) -> Any:
        return x.to(self.as_dtype(dtype))

    def copy(self, x: Any) -> Any:
        return x.clone()

    def stack(self, items: list[Any], out: Any) -> Any:
        return self.torch.stack(items, out=out)

    def take(self, x: Any, index: np.ndarray, axis: int) -> Any:
        return x.index_select(axis, self.torch.as_tensor(index, device=x.device))

    def to_numpy(self, x: Any) -> np.ndarray:
        x = x.detach().cpu()
        if x.dtype == self.torch.bfloat16:  # NumPy has none: float32 holds every value
            x = x.float()
        return np.asarray(x)

    def value_range(self, x: Any) -> tuple[Any, Any]:
        t = self.torch
        if self.kind(x.dtype) in "iu" and x.dtype not in (t.uint8, t.int8, t.int16, t.int32,
                                                          t.int64):  # fmt: skip
            # uint16 to uint64: few operations in torch; NumPy's rule on a host copy.
            low_high: tuple[Any, Any] = self.numpy.value_range(self.to_numpy(x))
            return low_high
        if x.dtype == t.bool:
            x = x.to(t.uint8)
        if x.is_complex():
            x = t.view_as_real(x.resolve_conj())  # real and imaginary parts
        return x.min().item(), x.max().item()

    def count_inf(self, x: Any) -> int:
        if x.is_complex():
            x = self.torch.view_as_real(x.resolve_conj())
        return int(self.torch.isinf(x).sum().item())


def numpy_dtypes(t: Any) -> dict[Any, type[np.generic]]:
    """The NumPy dtype of each torch dtype that has one."""
    table: dict[Any, type[np.generic]] = {
        t.bool: np.bool_, t.uint8: np.uint8, t.int8: np.int8, t.int16: np.int16,
        t.int32: np.int32, t.int64: np.int64, t.float16: np.float16,
        t.float32: np.float32, t.float64: np.float64, t.complex64: np.complex64,
        t.complex128: np.complex128,
    }  # fmt: skip
    for name in ("uint16", "uint32", "uint64"):  # torch 2.3 and newer
        if hasattr(t, name):
            table[getattr(t, name)] = getattr(np, name)
    return table


def argmax_by_planes(t: Any, x: Any, axis: int, floating: bool) -> Any:
    """Argmax over few classes: whole planes compared class by class, as the NumPy backend
    does (the first largest; NaN counts as largest)."""
    best = x.select(axis, 0).clone()
    index = t.zeros(best.shape, dtype=t.int64, device=x.device)
    for c in range(1, x.shape[axis]):
        value = x.select(axis, c)
        wins = value > best
        if floating:
            wins |= value.isnan() & ~best.isnan()
        best = t.where(wins, value, best)
        index.masked_fill_(wins, c)
    return index
