"""The few places where NumPy and torch differ, looked up by the type of the array.

Nothing here imports torch: a tensor can only reach us if the caller imported torch already,
so the lookup checks ``sys.modules`` (einops' habit).
"""

from __future__ import annotations

import sys
from functools import lru_cache
from typing import Any

import numpy as np

from ._checks import PatchgridError

__all__ = ["Backend", "backend_of", "check_cast", "check_exact_sum", "lossless"]


class Backend:
    """NumPy arrays. Strides are in the backend's own units (bytes for NumPy)."""

    name = "numpy"

    def asarray(self, x: Any) -> Any:
        return np.asarray(x)

    def shape(self, x: Any) -> tuple[int, ...]:
        return tuple(x.shape)

    def strides(self, x: Any) -> tuple[int, ...]:
        return tuple(x.strides)

    def as_strided(self, base: Any, shape: Any, strides: Any, writeable: bool) -> Any:
        from numpy.lib.stride_tricks import as_strided

        return as_strided(base, tuple(shape), tuple(strides), writeable=writeable)

    def writeable(self, x: Any) -> bool:
        return bool(x.flags.writeable)

    def readonly(self, x: Any) -> Any:
        x.flags.writeable = False
        return x

    def empty(self, shape: Any, dtype: Any, like: Any) -> Any:
        return np.empty(tuple(shape), dtype=dtype)

    def full(self, shape: Any, value: Any, dtype: Any, like: Any) -> Any:
        return np.full(tuple(shape), value, dtype=dtype)

    def constant(self, array: np.ndarray, dtype: Any, like: Any) -> Any:
        """A small NumPy array (a window, a profile) moved to the backend."""
        return np.asarray(array, dtype=dtype)

    def dtype(self, x: Any) -> Any:
        return x.dtype

    def itemsize(self, x: Any) -> int:
        return int(x.itemsize)

    def nbytes(self, x: Any) -> int:
        return int(x.nbytes)

    def kind(self, dtype: Any) -> str:
        """'b', 'i', 'u', 'f' or 'c', as NumPy's ``dtype.kind``."""
        return str(np.dtype(dtype).kind)

    def acc_dtype(self, dtype: Any, reduce: str) -> Any:
        """The accumulator of a merge: the patches' dtype for ``max``/``min``; for sums, a
        float with more mantissa bits than the patches carry, so that the sum of many equal
        values divided by their count is that value exactly and no sum of finite values
        overflows (float64 for float16/32 and integers up to 32 bits; the x87 extended
        ``longdouble``, where the platform has one, for float64 and 64-bit integers)."""
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

    def as_dtype(self, dtype: Any) -> Any:
        return np.dtype(dtype)

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
        """Whether ``value`` can be stored in ``dtype``: exactly for integers, without
        overflowing for floats (rounding is fine; inf and NaN stay themselves)."""
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
        if op == "add" and target.size >= TORCH_ADD_MIN and _torch_can(target, source):
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
        """``target += source * weight``, with a reusable scratch buffer.

        When the caller has imported torch already, its fused ``addcmul_`` does this in one
        pass over the same memory (about 3x faster than NumPy's two); nothing imports torch
        for it.
        """
        if _torch_can(target, source, weight):
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

    def numpy_dtype(self, dtype: Any) -> np.dtype:
        """The NumPy dtype that stands for ``dtype`` in the cast rule."""
        result: np.dtype = np.dtype(dtype)
        return result

    def value_range(self, x: Any) -> tuple[Any, Any]:
        """``(min, max)`` of ``x`` as numbers (NaN if ``x`` holds a NaN); for complex
        values, over the real and imaginary parts together (each must fit)."""
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


# The least items of an in-place add worth handing to torch (when the caller imported it).
TORCH_ADD_MIN = 1 << 16


def _torch_can(target: Any, *sources: Any) -> bool:
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


class TorchBackend(Backend):
    """torch tensors, on any device; strides in elements, as torch counts them."""

    name = "torch"

    def __init__(self) -> None:
        import torch

        self.torch = torch
        t = torch
        self._np_of = {
            t.bool: np.bool_, t.uint8: np.uint8, t.int8: np.int8, t.int16: np.int16,
            t.int32: np.int32, t.int64: np.int64, t.float16: np.float16,
            t.float32: np.float32, t.float64: np.float64, t.complex64: np.complex64,
            t.complex128: np.complex128,
        }  # fmt: skip
        for name in ("uint16", "uint32", "uint64"):  # torch 2.3 and newer
            if hasattr(t, name):
                self._np_of[getattr(t, name)] = getattr(np, name)
        self._torch_of = {np.dtype(v): k for k, v in self._np_of.items()}

    def asarray(self, x: Any) -> Any:
        return x

    def strides(self, x: Any) -> tuple[int, ...]:
        return tuple(x.stride())

    def as_strided(self, base: Any, shape: Any, strides: Any, writeable: bool) -> Any:
        return base.as_strided(tuple(shape), tuple(strides))

    def writeable(self, x: Any) -> bool:
        return True

    def readonly(self, x: Any) -> Any:
        return x  # torch has no read-only tensors

    def as_dtype(self, dtype: Any) -> Any:
        if isinstance(dtype, self.torch.dtype):
            return dtype
        try:
            return self._torch_of[np.dtype(dtype)]
        except (KeyError, TypeError):
            raise TypeError(f"dtype {dtype!r} has no torch equivalent") from None

    def empty(self, shape: Any, dtype: Any, like: Any) -> Any:
        return self.torch.empty(tuple(shape), dtype=self.as_dtype(dtype), device=like.device)

    def full(self, shape: Any, value: Any, dtype: Any, like: Any) -> Any:
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

    def itemsize(self, x: Any) -> int:
        return int(x.element_size())

    def nbytes(self, x: Any) -> int:
        return int(x.element_size() * x.numel())

    def kind(self, dtype: Any) -> str:
        t = self.torch
        if dtype == t.bool:
            return "b"
        if dtype.is_complex:
            return "c"
        if dtype.is_floating_point:
            return "f"
        return (
            "u"
            if dtype in (t.uint8, *(getattr(t, f"uint{b}", t.uint8) for b in (16, 32, 64)))
            else "i"
        )

    def acc_dtype(self, dtype: Any, reduce: str) -> Any:
        # torch has no type wider than float64: 64-bit values are summed in float64 (exact
        # for the integers :func:`check_exact_sum` lets through).
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
        return Backend().fits(value, np.dtype(self._np_of[dtype]))

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
        target.div_(divisor)

    def assign(self, target: Any, source: Any) -> None:
        if isinstance(source, self.torch.Tensor):
            target.copy_(source)
        else:
            target.fill_(source)

    def fill_where(self, target: Any, mask: Any, value: Any) -> None:
        target.masked_fill_(mask.expand_as(target) if mask.shape != target.shape else mask,
                            value)  # fmt: skip

    def argmax(self, x: Any, axis: int) -> Any:
        t = self.torch
        if x.shape[axis] > 16 or self.kind(x.dtype) not in "fiu":
            return t.argmax(x.movedim(axis, -1).contiguous(), dim=-1)
        # Few classes: compare whole planes class by class, as the NumPy backend does.
        best = x.select(axis, 0).clone()
        index = t.zeros(best.shape, dtype=t.int64, device=x.device)
        for c in range(1, x.shape[axis]):
            value = x.select(axis, c)
            wins = value > best
            if self.kind(x.dtype) == "f":
                wins |= value.isnan() & ~best.isnan()
            best = t.where(wins, value, best)
            index.masked_fill_(wins, c)
        return index

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
        return np.asarray(x.detach().cpu())

    def numpy_dtype(self, dtype: Any) -> np.dtype:
        dtype = self.as_dtype(dtype)
        # bfloat16 has NumPy's float32 range (and fewer bits): it stands in for the rule.
        return np.dtype(self._np_of.get(dtype, np.float32))

    def value_range(self, x: Any) -> tuple[Any, Any]:
        if self.kind(x.dtype) in "iu" and x.dtype not in (self.torch.uint8, self.torch.int8,
                                                          self.torch.int16, self.torch.int32,
                                                          self.torch.int64):  # fmt: skip
            return Backend().value_range(self.to_numpy(x))  # uint16-64: few ops in torch
        if x.dtype == self.torch.bool:
            x = x.to(self.torch.uint8)
        if x.is_complex():
            x = self.torch.view_as_real(x.resolve_conj())  # real and imaginary parts
        return x.min().item(), x.max().item()

    def count_inf(self, x: Any) -> int:
        if x.is_complex():
            x = self.torch.view_as_real(x.resolve_conj())
        return int(self.torch.isinf(x).sum().item())


NUMPY = Backend()

# Whether this platform's ``longdouble`` has more mantissa bits than float64 (x86's 80-bit
# extended: 63 bits, every int64 and uint64 exactly; a quad on some others).
WIDE = np.finfo(np.longdouble).nmant > np.finfo(np.float64).nmant


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


def check_cast(
    xp: Backend,
    values: Any,
    dtype: Any,
    *,
    src: Any = None,
    force: bool = False,
    what: str = "the result",
    hint: str = "",
) -> None:
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
    size = values.numel() if xp.name == "torch" else values.size
    if not size:
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


def check_exact_sum(
    xp: Backend, values: Any, acc: Any, overlap: int, weighted: bool, *, what: str = "patches"
) -> None:
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
    size = values.numel() if xp.name == "torch" else values.size
    if not size:
        return
    lo, hi = xp.value_range(values)
    if lo < -limit or hi > limit:
        wide = "" if xp.name == "numpy" and WIDE else (
            " (NumPy arrays on x86 sum in 80-bit extended precision, exact to 2**64)")  # fmt: skip
        raise PatchgridError(
            f"{what} run from {lo} to {hi}; up to {overlap} of them meet at a voxel, and their "
            f"sum is exact in {dst} only for values up to {limit} in size{wide}. For labels or "
            f"IDs use reduce='max' or 'min' (exact for every dtype), or patches that do not "
            f"overlap"
        )


@lru_cache(maxsize=1)
def _torch_backend() -> TorchBackend:
    return TorchBackend()


def is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def is_dask(x: Any) -> bool:
    """True for a Dask array (checked without importing dask)."""
    module = sys.modules.get("dask.array")
    return module is not None and isinstance(x, module.Array)


TOO_HARD = getattr(np, "exceptions", np).TooHardError  # NumPy 1.24 has it at the top


def shares_memory(a: Any, b: Any) -> bool:
    """Whether two arrays may hold the same data: NumPy's exact test where it is quick (else
    its bounds), the byte ranges of tensors and of a tensor beside a NumPy array, and for
    arrays backed by files (memmaps, zarr, HDF5, ``pg.open`` images) the same file and array
    in it, however many handles or mappings there are."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        try:
            if np.shares_memory(a, b, max_work=1 << 20):  # type: ignore[arg-type]
                return True
        except TOO_HARD:
            return True if np.may_share_memory(a, b) else _same_file(a, b)
        return _same_file(a, b)
    ra, rb = _byte_range(a), _byte_range(b)
    if ra is not None and rb is not None:
        return ra[0] == rb[0] and ra[1] < rb[2] and rb[1] < ra[2]
    return _same_file(a, b)


def _byte_range(x: Any) -> tuple[str, int, int] | None:
    """``(device, lo, hi)``: the addresses of a NumPy array's bytes or a tensor's storage
    (host memory is device "cpu"); None for anything else."""
    if is_tensor(x):
        storage = x.untyped_storage()
        return str(x.device), storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    if isinstance(x, np.ndarray):
        lo, hi = _BYTE_BOUNDS(x)
        return "cpu", int(lo), int(hi)
    return None


try:  # NumPy 2 keeps byte_bounds in np.lib.array_utils, NumPy 1 at the top
    from numpy.lib.array_utils import byte_bounds as _BYTE_BOUNDS
except ImportError:  # pragma: no cover - NumPy 1
    from numpy import byte_bounds as _BYTE_BOUNDS  # type: ignore[attr-defined,no-redef]


def _file_of(x: Any) -> tuple[str, str] | None:
    """The file (and the array inside it) behind a memmap, zarr array, h5py dataset or
    ``pg.open`` image; None for an array in memory."""
    import os

    name = getattr(x, "filename", None)  # np.memmap
    if isinstance(x, np.ndarray) and isinstance(name, (str, os.PathLike)):
        return os.path.realpath(name), ""
    base = getattr(x, "base", None)  # a view of a memmap (np.load gives one)
    if isinstance(x, np.ndarray) and isinstance(base, np.ndarray):
        return _file_of(base)
    store = getattr(x, "store", None)
    root = getattr(store, "root", None)  # zarr's LocalStore
    if root is not None:
        return os.path.realpath(str(root)), str(getattr(x, "path", ""))
    h5 = getattr(getattr(x, "file", None), "filename", None)  # h5py
    if isinstance(h5, str):
        return os.path.realpath(h5), str(getattr(x, "name", ""))
    inner = getattr(x, "_data", None)  # a pg.open image: the array it reads
    if inner is not None and inner is not x:
        return _file_of(inner)
    return None


def _same_file(a: Any, b: Any) -> bool:
    fa, fb = _file_of(a), _file_of(b)
    if fa is None or fb is None or fa[0] != fb[0]:
        return False
    pa, pb = fa[1].strip("/"), fb[1].strip("/")
    return not pa or not pb or pa == pb or pa.startswith(pb + "/") or pb.startswith(pa + "/")


def backend_of(x: Any) -> Backend:
    """The backend for ``x``: torch for a tensor, NumPy for everything else."""
    if isinstance(x, np.ndarray):
        return NUMPY
    if is_tensor(x):
        return _torch_backend()
    return NUMPY
