"""Layer L2: test-time flips, nnU-Net's mirroring inside the sliding window.

What lives here: :func:`flip_sets` (``tta=`` checked and turned into the axis sets to flip,
the identity first) and :func:`with_flips` (a model wrapper: the flipped copies of the patches
of a batch go through the model in calls of at most ``batch_size`` inputs, beside other
patches' copies; each output is flipped back and the mean over the sets is returned, with a
running sum per patch, so memory is one call's output plus one accumulator per patch).

Imports: NumPy and the layers below (``_checks``, ``backends``).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import _checks
from ._checks import PatchgridError
from .backends import Backend, backend_of

__all__ = ["flip_sets", "with_flips"]


def flip_sets(tta: Any, ndim: int, axes: Sequence[int]) -> list[tuple[int, ...]]:
    """The sets of image axes to flip for ``tta``, the identity ``()`` first, once.

    Parameters
    ----------
    tta : None, "flips" or a sequence of axis sets
        ``None``: no flips (``[()]``). ``"flips"``: every subset of the tiled axes (nnU-Net's
        mirroring: 8 sets for 3 tiled axes). A sequence: each item a tuple of tiled image
        axes (negative ones count from the end); the identity is added first if missing.
    ndim : int
        The number of image axes.
    axes : sequence of int
        The tiled axes; only these may be flipped.

    Returns
    -------
    list of tuple of int
        Sorted axis sets, the identity first, no set twice.

    Examples
    --------
    >>> flip_sets("flips", 3, (1, 2))
    [(), (1,), (2,), (1, 2)]
    >>> flip_sets([(2, 1), (1,)], 3, (1, 2))
    [(), (1, 2), (1,)]
    >>> len(flip_sets("flips", 3, (0, 1, 2)))
    8
    """
    tiled = _checks.axes_tuple(axes, ndim)
    if tta is None:
        return [()]
    if isinstance(tta, str):
        if tta != "flips":
            raise PatchgridError(f'tta must be None, "flips" or a list of axis sets, got {tta!r}')
        ordered = sorted(tiled)
        return [s for r in range(len(ordered) + 1) for s in itertools.combinations(ordered, r)]
    if not isinstance(tta, (Sequence, np.ndarray)):
        raise PatchgridError(
            f'tta must be None, "flips" or a list of axis sets, got {tta!r} of type '
            f"{type(tta).__name__}"
        )
    given = [_one_set(item, tta, ndim, tiled) for item in tta]
    for i, one in enumerate(given):
        if one in given[:i]:
            raise PatchgridError(f"tta must not repeat an axis set, got {one} twice in {tta!r}")
    return [(), *(one for one in given if one)]


def _one_set(item: Any, tta: Any, ndim: int, tiled: tuple[int, ...]) -> tuple[int, ...]:
    """One axis set of a ``tta`` list, checked and sorted."""
    if not isinstance(item, (Sequence, np.ndarray)) or isinstance(item, (str, bytes)):
        raise PatchgridError(
            f"tta must be a list of axis sets, each a tuple of tiled axes such as (0,) or "
            f"(0, 2); got {item!r} in {tta!r}"
        )
    out = []
    for a in item:
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)):
            raise PatchgridError(f"tta's axis sets must hold integers, got {a!r} in {tta!r}")
        if not -ndim <= a < ndim or int(a) % ndim not in tiled:
            raise PatchgridError(
                f"tta may flip only the tiled axes {tiled}, got axis {int(a)} in {tta!r}"
            )
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise PatchgridError(f"tta must not repeat an axis within a set, got {item!r}")
    return tuple(sorted(out))


def with_flips(
    fn: Callable[[Any], Any], sets: Sequence[tuple[int, ...]], axes: Sequence[int], batch_size: int
) -> Callable[[Any], Any]:
    """``fn`` averaged over flipped copies of its input: a model wrapper for ``apply``.

    Parameters
    ----------
    fn : callable
        The model: a batch ``(n, *patch)`` to ``(n, *out_patch)`` or, with a class axis added
        in front, ``(n, C, *out_patch)``; the tiled axes keep their order.
    sets : sequence of tuple of int
        Image axes to flip, as :func:`flip_sets` gives them (the identity first).
    axes : sequence of int
        The tiled image axes; every set must lie among them.
    batch_size : int
        The most inputs ``fn`` is given at once.

    Returns
    -------
    callable
        Takes a batch ``(B, *patch)`` (an ndarray or a tensor; image axis ``a`` is batch axis
        ``a + 1``) and returns what ``fn`` returns for it, shaped and typed alike, averaged
        over the sets: ``mean over s of flip_s(fn(flip_s(batch)))``.

    Notes
    -----
    The ``B * len(sets)`` inputs go to ``fn`` patch by patch, each patch's copies one after
    another, in ``ceil(B * len(sets) / batch_size)`` calls. Outputs are flipped back and summed
    per patch as they come, in the backend's accumulator dtype (float64 for float32 outputs,
    on NumPy and torch alike, so that an equivariant model's mean is its output exactly), and
    cast to ``fn``'s dtype at the end: memory is one call's output plus ``B`` sums.
    Integer and bool outputs are refused: flipped labels cannot be averaged.

    Examples
    --------
    >>> import numpy as np
    >>> def model(x):
    ...     return np.cumsum(x, axis=1)
    >>> batch = np.arange(6.0).reshape(2, 3)
    >>> with_flips(model, [(), (0,)], (0,), batch_size=3)(batch)
    array([[1.5, 2. , 2.5],
           [7.5, 8. , 8.5]])
    """
    sets = [tuple(s) for s in sets]
    tiled = set(axes)
    if not sets or sets[0] != () or any(not set(s) <= tiled for s in sets):
        raise PatchgridError(
            f"tta's axis sets must start with () and flip only the tiled axes {tuple(axes)}, "
            f"got {sets}"
        )
    size = _checks.as_int(batch_size, "batch_size")
    if size < 1:
        raise PatchgridError(f"batch_size must be a positive integer, got {size}")

    @functools.wraps(fn)
    def flipped(batch: Any) -> Any:
        n = int(batch.shape[0])
        if n == 0:
            return fn(batch)
        return _Averager(fn, sets, backend_of(batch)).run(batch, n, size)

    return flipped


class _Averager:
    """One batch through ``fn`` with flips: the running sums, one per patch."""

    def __init__(self, fn: Callable[[Any], Any], sets: list[tuple[int, ...]], xp: Backend):
        self.fn, self.sets, self.xp = fn, sets, xp
        self.name = getattr(fn, "__name__", type(fn).__name__)
        self.acc: Any = None
        self.dtype: Any = None
        self.tail: tuple[int, ...] = ()
        self.at = 1

    def run(self, batch: Any, n: int, size: int) -> Any:
        xp, s = self.xp, len(self.sets)
        for start in range(0, n * s, size):
            stop = min(start + size, n * s)
            inputs = xp.empty((stop - start, *batch.shape[1:]), xp.dtype(batch), like=batch)
            parts = self._parts(start, stop)
            for k, lo, hi, j in parts:
                source = _flip(xp, batch[lo:hi], [a + 1 for a in self.sets[k]])
                xp.assign(inputs[j : j + (hi - lo - 1) * s + 1 : s], source)
            out = self._output(self.fn(inputs), inputs, batch, n)
            for k, lo, hi, j in parts:
                back = _flip(xp, out[j : j + (hi - lo - 1) * s + 1 : s],
                             [a + self.at for a in self.sets[k]])  # fmt: skip
                if k == 0:
                    xp.assign(self.acc[lo:hi], back)
                else:
                    xp.inplace("add", self.acc[lo:hi], back)
        xp.divide(self.acc, s)
        return xp.astype(self.acc, self.dtype)

    def _parts(self, start: int, stop: int) -> list[tuple[int, int, int, int]]:
        """(set, first patch, end patch, first input) for each set among jobs start:stop,
        job ``t`` being set ``t % S`` of patch ``t // S``."""
        s, parts = len(self.sets), []
        for k in range(s):
            lo = -((k - start) // s)  # the first patch i with i * s + k >= start
            hi = (stop - 1 - k) // s + 1
            if hi > lo:
                parts.append((k, lo, hi, lo * s + k - start))
        return parts

    def _output(self, out: Any, inputs: Any, batch: Any, n: int) -> Any:
        """fn's output for ``inputs``, checked; the accumulator made on the first call."""
        xp = self.xp
        got = xp.as_output(out)
        if got is None:
            raise PatchgridError(
                f"fn ({self.name}) must return {xp.output_kind}, got {type(out).__name__}"
            )
        kind = xp.kind(xp.dtype(got))
        if kind not in "fc":
            raise PatchgridError(
                f"fn ({self.name}) returned dtype {got.dtype}; tta averages flipped "
                f"predictions, which needs floats: return probabilities or logits (and "
                f'reduce="argmax" for labels), or leave tta=None'
            )
        shape = tuple(got.shape)
        if self.acc is None:
            if len(shape) not in (inputs.ndim, inputs.ndim + 1) or shape[0] != len(inputs):
                raise PatchgridError(
                    f"fn ({self.name}) returned shape {shape} for a batch of shape "
                    f"{tuple(inputs.shape)}; with tta it must keep the batch's axes, or add "
                    f"one class axis after the batch axis"
                )
            self.at = 2 if len(shape) == inputs.ndim + 1 else 1
            self.tail, self.dtype = shape[1:], xp.dtype(got)
            acc_dtype = xp.acc_dtype(self.dtype, "mean")
            self.acc = xp.empty((n, *self.tail), acc_dtype, like=got)
        elif shape != (len(inputs), *self.tail) or xp.dtype(got) != self.dtype:
            raise PatchgridError(
                f"fn ({self.name}) returned shape {shape} ({got.dtype}) for {len(inputs)} "
                f"patches after {self.tail} ({self.dtype}) per patch before; with tta every "
                f"call must give the same output per patch"
            )
        return got


def _flip(xp: Backend, x: Any, dims: Sequence[int]) -> Any:
    """``x`` reversed along ``dims`` (the backend interface has no flip: a take per axis)."""
    for d in dims:
        x = xp.take(x, np.arange(x.shape[d] - 1, -1, -1), d)
    return x
