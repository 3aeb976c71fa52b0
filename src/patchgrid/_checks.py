"""The one place where arguments are checked and normalised (L0; the standard library only).

Every public function calls these before doing any work, so that a bad value raises the same
error, naming the same parameter, whichever entry point it came through.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np


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
