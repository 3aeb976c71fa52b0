"""The one place where arguments are checked and normalised (L0; the standard library only).

Every public function calls these before doing any work, so that a bad value raises the same
error, naming the same parameter, whichever entry point it came through. :func:`keyword_hints`
points a keyword other libraries use (MONAI's ``roi_size=``) to patchgrid's name for it.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import numpy as np

F = TypeVar("F", bound=Callable[..., Any])


class PatchgridError(ValueError):
    """A value given to patchgrid breaks one of its rules.

    A subclass of :class:`ValueError`, so ``except ValueError`` catches it.
    """


class PatchgridWarning(UserWarning):
    """Something the user should know about a result that is nevertheless what was asked
    for: voxels that no patch covers, which hold ``fill``."""


EDGES = ("drop", "pad", "shift", "even")
PAD_MODES = (
    "constant",
    "edge",
    "linear_ramp",
    "maximum",
    "mean",
    "median",
    "minimum",
    "reflect",
    "symmetric",
    "wrap",
    "empty",
)


def as_int(value: Any, name: str) -> int:
    """Return ``value`` as a Python int, refusing bools, floats and strings."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an integer, got {value!r} of type {type(value).__name__}"
        ) from None


def shape_tuple(shape: Any, name: str = "shape") -> tuple[int, ...]:
    """Normalise an image shape: a sequence of non-negative ints (an int means 1-D)."""
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    if not isinstance(shape, (Sequence, np.ndarray)) or isinstance(shape, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of integers, got {shape!r}")
    out = tuple(as_int(s, f"{name}[{i}]") for i, s in enumerate(shape))
    if not out:
        raise PatchgridError(f"{name} must have at least one axis, got {shape!r}")
    bad = [s for s in out if s < 0]
    if bad:
        raise PatchgridError(f"{name} must not have negative lengths, got {out}")
    return out


def axes_tuple(axes: Any, ndim: int, name: str = "axes") -> tuple[int, ...]:
    """Normalise axes: ints in ``[-ndim, ndim)``, negatives wrapped, no repeats, order kept."""
    if isinstance(axes, (int, np.integer)) and not isinstance(axes, (bool, np.bool_)):
        axes = (axes,)
    if not isinstance(axes, (Sequence, np.ndarray)) or isinstance(axes, (str, bytes)):
        raise TypeError(f"{name} must be an integer or a sequence of integers, got {axes!r}")
    out = []
    for i, a in enumerate(axes):
        a = as_int(a, f"{name}[{i}]")
        if not -ndim <= a < ndim:
            raise PatchgridError(
                f"{name} has axis {a}, out of range for an image of {ndim} dimensions "
                f"(allowed: {-ndim} to {ndim - 1})"
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise PatchgridError(f"{name} must not repeat an axis, got {tuple(axes)}")
    if not out:
        raise PatchgridError(f"{name} must name at least one axis, got {tuple(axes)}")
    return tuple(out)


def per_axis(value: Any, k: int, name: str, *, positive: bool = True) -> tuple[int, ...]:
    """Broadcast an int to ``k`` entries, or check a sequence has ``k`` integer entries."""
    if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes)):
        values = tuple(as_int(v, f"{name}[{i}]") for i, v in enumerate(value))
        if len(values) != k:
            raise PatchgridError(
                f"{name} has {len(values)} entries but {k} axes are tiled; give one entry "
                f"per tiled axis or a single integer"
            )
    else:
        values = (as_int(value, name),) * k
    if positive:
        bad = [v for v in values if v < 1]
        if bad:
            raise PatchgridError(f"{name} must be positive integers, got {values}")
    return values


def edge_tuple(edge: Any, k: int) -> tuple[str, ...]:
    """Broadcast an edge policy to ``k`` tiled axes and check each one."""
    if isinstance(edge, str):
        edges: tuple[Any, ...] = (edge,) * k
    elif isinstance(edge, (Sequence, np.ndarray)):
        edges = tuple(edge)
    else:
        raise TypeError(
            f"edge must be one of {EDGES} or a sequence of them, got {edge!r} of type "
            f"{type(edge).__name__}"
        )
    if len(edges) != k:
        raise PatchgridError(
            f"edge has {len(edges)} entries but {k} axes are tiled; give one policy per "
            f"tiled axis or a single one of {EDGES}"
        )
    for e in edges:
        if e not in EDGES:
            raise PatchgridError(f"edge must be one of {EDGES}, got {e!r}")
    return edges


def pad_mode_str(mode: Any) -> str:
    if mode not in PAD_MODES:
        raise PatchgridError(
            f"pad_mode must be one of the numpy.pad modes {PAD_MODES}, got {mode!r}"
        )
    return str(mode)


def choice(value: Any, allowed: Sequence[str], name: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise PatchgridError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


# Keywords of MONAI's sliding_window_inference, TorchIO's GridSampler and nnU-Net for what
# patchgrid names otherwise: (patchgrid's parameter, the hint), the first the function has;
# the last one otherwise.
RENAMED: dict[str, tuple[tuple[str, str], ...]] = {
    "patch_size": (("size", "patchgrid calls it size"),),
    "roi_size": (("size", "patchgrid calls it size"),),
    "sw_batch_size": (
        ("batch_size", "patchgrid calls it batch_size"),
        ("", "patchgrid calls it batch_size, in pg.apply"),
    ),
    "sw_device": (("device", "patchgrid calls it device"), ("", "pg.apply takes device=")),
    "predictor": (("fn", "patchgrid calls it fn, the first argument"),),
    "inputs": (("image", "patchgrid calls it image"),),
    "mode": (
        (
            "window",
            "patchgrid calls it window (MONAI's mode='constant' is window='uniform', "
            "its 'gaussian' is 'monai-gaussian')",
        ),
        ("pad_mode", "patchgrid calls numpy.pad's mode pad_mode"),
    ),
    "padding_mode": (("pad_mode", "patchgrid calls it pad_mode"),),
    "cval": (("pad_value", "patchgrid calls it pad_value"),),
    "overlap": (
        (
            "stride",
            "patchgrid takes stride = int(size * (1 - overlap)) (and pg.apply takes overlap=)",
        ),
    ),
    "patch_overlap": (("stride", "patchgrid takes stride = size - patch_overlap"),),
    "tile_step_size": (
        (
            "stride",
            "patchgrid takes stride = int(size * tile_step_size), and edge='even' "
            "for nnU-Net's evenly spread steps",
        ),
    ),
}


def keyword_hints(func: F, module: str | None = None) -> F:
    """``func``, whose callers are told patchgrid's name for a keyword of :data:`RENAMED`.

    ``pg.apply(f, x, roi_size=64)`` raises "pg.apply() got an unexpected keyword argument
    'roi_size'; patchgrid calls it size" instead of Python's bare TypeError. Only the
    TypeError of the call itself is looked at (one raised inside ``func`` passes unchanged),
    so a correct call costs one more frame and nothing else. ``module`` is where the result
    is found by its name (pickle looks there), ``func``'s own by default.
    """
    code = func.__code__
    params = frozenset(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount])
    where = "pg." + func.__qualname__.removesuffix(".__init__")

    @functools.wraps(func)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except TypeError as exc:
            hint = _renamed(exc, params)
            if hint is None:
                raise
            raise TypeError(f"{where}() got an unexpected keyword argument {hint}") from None

    call.__module__ = module or func.__module__
    return cast(F, call)


def _renamed(exc: TypeError, params: frozenset[str]) -> str | None:
    """``'roi_size'; patchgrid calls it size`` for the call's own TypeError about a keyword of
    :data:`RENAMED`; None for any other."""
    tb = exc.__traceback__
    if tb is None or tb.tb_next is not None:  # raised inside the function, not by the call
        return None
    found = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
    if found is None or found.group(1) not in RENAMED:
        return None
    choices = RENAMED[found.group(1)]
    hint = next((h for name, h in choices if name in params), choices[-1][1])
    return f"{found.group(1)!r}; {hint}"
