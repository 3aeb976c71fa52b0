"""The plan of a merge, made once per layout and cached (L2).

Everything a merge decides before it touches data: the window as a checked value, the output
spec (shape, dtype, accumulator, class axis), the reduction's operation and identity, the
weights in the accumulator's precision, the coverage of a complete grid, and whether the
compiled kernels may serve. A :class:`Merger` asks for its plan when it sees the first patches;
every strategy below it reads the plan and decides nothing again.

Plans are cached per (grid, reduce, window, patch shape, patch dtype, backend, dtype, output
dtype, kernels), as einops caches its recipes: the second merge of the same layout pays only
for the data. An array window is checked on every call and not cached (arrays do not hash).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from . import settings, windows
from ._finish import OutputSpec, output_spec, profile_sum, sum_dtype, weight_array
from .backends import Backend
from .grid import PatchGrid

# How many layouts keep their plans (and windows) between calls, at most; the bytes of their
# arrays are bounded by settings.CACHE_BYTES.
CACHE_SIZE = 128


class Kept:
    """The plans (or windows) of recent layouts, least recently used first, bounded in number
    (:data:`CACHE_SIZE`) and in the bytes of the arrays they hold
    (:data:`patchgrid.settings.CACHE_BYTES`): a value larger than the budget is made for its
    call and not kept. Safe to share between threads (apply's reader, Dask's workers)."""

    def __init__(self) -> None:
        self.items: OrderedDict[Any, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        """The value kept for ``key``, or ``make()`` (kept while the budget allows)."""
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = make()
        with self.lock:
            self.items[key] = value
            self.trim()
        return value

    def trim(self) -> None:
        """Let the least recently used go until the rest fits the budget (values grow as
        plans fill their tables in, so the sizes are taken now)."""
        sizes = {k: nbytes(v) for k, v in self.items.items()}
        total = sum(sizes.values())
        while self.items and (total > settings.CACHE_BYTES or len(self.items) > CACHE_SIZE):
            key, _ = self.items.popitem(last=False)
            total -= sizes[key]

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


def nbytes(value: Any) -> int:
    """The bytes of the arrays a plan or a window holds."""
    arrays = value.arrays() if hasattr(value, "arrays") else []
    return sum(int(a.nbytes) for a in arrays if a is not None)


class Window(NamedTuple):
    """A checked window: per-axis profiles where it is separable, the array, and its form.

    A named window travels (to a Dask worker) as its name and size and is made again there,
    from the cache: every task of a job would otherwise carry its own copy of the array.
    """

    profiles: list[np.ndarray] | None
    array: np.ndarray
    uniform: bool
    name: tuple[str | None, tuple[int, ...]] | None = None  # (window, size) of a named one

    def __reduce__(self) -> Any:
        if self.name is not None:
            return (named_window, self.name)
        return (Window, tuple(self))

    def arrays(self) -> list[np.ndarray]:
        """The arrays it holds (for the cache's budget)."""
        return [self.array, *(self.profiles or [])]


WINDOWS = Kept()


def named_window(window: str | None, size: tuple[int, ...]) -> Window:
    """A named window (or None, uniform) for patches of ``size``, checked once, kept."""

    def make() -> Window:
        made = _make_window(window, size)
        return Window(made.profiles, made.array, made.uniform, (window, size))

    try:
        return WINDOWS.get((window, size), make)  # type: ignore[no-any-return]
    except TypeError:  # an unhashable size: made for this call
        return make()


def _make_window(window: Any, size: tuple[int, ...]) -> Window:
    profs = windows.profiles(window, size)
    array = windows.as_window_array(window, size)
    uniform = window is None or (isinstance(window, str) and window == "uniform")
    return Window(profs, array, uniform)


def checked_window(window: Any, size: Sequence[int]) -> Window:
    """The window checked against the patch size: cached for names, made anew for arrays."""
    if window is None or isinstance(window, str):
        return named_window(window, tuple(size))
    return _make_window(window, tuple(size))


class MergePlan:
    """What a merge of one layout decided, shared by every merge of that layout.

    Attributes
    ----------
    grid, reduce, xp
        The grid, the reduction and the backend of the patches.
    window : Window
        The checked window.
    spec : OutputSpec
        Output shape and dtype, accumulator dtype, class axis, identity of the reduction.
    op : {"add", "max", "min"}
        The accumulating operation.
    weighted : bool
        The window multiplies the patches (a mean, sum or argmax with a window that is not
        uniform).
    array_window : bool
        Weights are summed per voxel as patches come (a window that is not separable).
    kernels : bool
        The compiled kernels may be loaded for this merge (they serve when loaded otherwise).
    """

    __slots__ = ("_coverage", "_scatter", "array_window", "grid", "kept", "kernels", "op",
                 "reduce", "spec", "weight", "weighted", "window", "xp")  # fmt: skip

    def __init__(self, grid: PatchGrid, reduce: str, window: Window, spec: OutputSpec,
                 xp: Backend, kernels: bool) -> None:  # fmt: skip
        self.grid, self.reduce, self.window, self.spec, self.xp = grid, reduce, window, spec, xp
        self.kernels = kernels
        self.kept = False  # made for the cache: what it works out serves the next calls too
        self.op = {"max": "max", "min": "min"}.get(reduce, "add")
        self.weighted = not window.uniform and reduce not in ("max", "min")
        self.array_window = window.profiles is None and reduce in ("mean", "argmax")
        self.weight: np.ndarray | None = None
        if self.weighted:
            self.weight = weight_array(window.array, window.profiles, grid,
                                       sum_dtype(xp, spec.acc_dtype))  # fmt: skip
        self._coverage: dict[bool, list[np.ndarray]] = {}
        self._scatter: Scatter | None = None

    def arrays(self) -> list[np.ndarray | None]:
        """The arrays it holds (for the cache's budget)."""
        held: list[np.ndarray | None] = [self.weight, *self.window.arrays()]
        for profs in self._coverage.values():
            held += profs
        if self._scatter is not None:
            held += [t for t in self._scatter if isinstance(t, np.ndarray)]
        return held

    def scatter(self) -> Scatter:
        """Where every element of the flat patches lands in the output, sorted by voxel: the
        index tables of the scatter strategy (:func:`patchgrid._accumulate.scatter`), made
        once per plan. Only for grids whose every axis is tiled and nothing is padded."""
        if self._scatter is None:
            self._scatter = _scatter_tables(self)
        return self._scatter

    def profile_coverage(self, ones: bool) -> list[np.ndarray]:
        """Coverage along each tiled axis of a complete grid, for a separable window (or
        ``ones``: patch counts), in the weights' precision; made once per plan."""
        if ones not in self._coverage:
            grid = self.grid
            profs = (self.window.profiles if not ones and self.window.profiles is not None
                     else [np.ones(p) for p in grid.size])  # fmt: skip
            dtype = sum_dtype(self.xp, self.spec.acc_dtype)
            made = [profile_sum(grid.axis_starts(j), profs[j], grid.padded_shape[a], dtype)
                    for j, a in enumerate(grid.axes)]  # fmt: skip
            for p in made:
                p.flags.writeable = False
            self._coverage[ones] = made
        return list(self._coverage[ones])


PLANS = Kept()


def _cached_plan(grid: PatchGrid, reduce: str, window: str | None, patch_shape: tuple[int, ...],
                 patch_dtype: Any, xp: Backend, dtype: Any, sink_dtype: Any,
                 kernels: bool) -> MergePlan:  # fmt: skip
    key = (grid, reduce, window, patch_shape, patch_dtype, xp, dtype, sink_dtype, kernels)

    def make() -> MergePlan:
        plan = _make_plan(grid, reduce, named_window(window, grid.size), patch_shape,
                          patch_dtype, xp, dtype, sink_dtype, kernels)  # fmt: skip
        plan.kept = True
        return plan

    return PLANS.get(key, make)  # type: ignore[no-any-return]


def _make_plan(grid: PatchGrid, reduce: str, window: Window, patch_shape: tuple[int, ...],
               patch_dtype: Any, xp: Backend, dtype: Any, sink_dtype: Any,
               kernels: bool) -> MergePlan:  # fmt: skip
    spec = output_spec(grid, patch_shape, patch_dtype, reduce, dtype, sink_dtype, xp)
    return MergePlan(grid, reduce, window, spec, xp, kernels)


def merge_plan(grid: PatchGrid, reduce: str, window: Any, xp: Backend,
               patch_shape: tuple[int, ...], patch_dtype: Any, dtype: Any = None,
               sink_dtype: Any = None, kernels: bool = True) -> MergePlan:  # fmt: skip
    """The plan for merging patches of ``patch_shape`` and ``patch_dtype`` on ``grid``: from
    the cache when the layout was seen before (a named window and hashable dtypes)."""
    args = (patch_shape, patch_dtype, xp, dtype, sink_dtype, kernels)
    if window is None or isinstance(window, str):
        try:
            return _cached_plan(grid, reduce, window, *args)
        except TypeError:  # an unhashable dtype: planned without the cache
            pass
    checked = window if isinstance(window, Window) else checked_window(window, grid.size)
    return _make_plan(grid, reduce, checked, *args)


class Scatter(NamedTuple):
    """Index tables of a small merge. ``voxel_of`` is the output voxel (flat) of every element
    of the flat patches; ``order`` sorts them by voxel (stably: patch order within a voxel),
    ``starts`` begins each voxel's run in that order, ``voxels`` are those voxels, ``coverage``
    their summed weights (or counts; for a mean only, ones where they sum to zero); ``weights``
    is the window per element, in patch order (``by_index``) or in sorted order (None for a
    uniform window). ``by_index`` tables are for sums in float64 (:func:`numpy.bincount`):
    there ``order``, ``starts`` and ``voxels`` are None and ``coverage`` spans every voxel.
    ``weight_sums`` (a mean with an array window) is the weights summed over the image, zero
    where no patch covers: the finishing step's coverage, so that it need not add it up."""

    by_index: bool
    voxel_of: np.ndarray
    order: np.ndarray | None
    starts: np.ndarray | None
    voxels: np.ndarray | None
    coverage: np.ndarray | None
    weights: np.ndarray | None
    weight_sums: np.ndarray | None = None  # an array window's, over the image (0: uncovered)


def _scatter_tables(plan: MergePlan) -> Scatter:
    grid = plan.grid
    k = len(grid.axes)
    offsets = np.stack(np.meshgrid(*[np.arange(p) for p in grid.size], indexing="ij"), axis=-1)
    corners = grid.starts()
    points = (corners[:, None, :] + offsets.reshape(1, -1, k)).reshape(-1, k)
    index = np.ravel_multi_index(tuple(points.T), grid.shape)
    wide = sum_dtype(plan.xp, plan.spec.acc_dtype)
    # Sums in float64 in patch order are numpy.bincount's own: no sort, no gather.
    by_index = plan.op == "add" and np.dtype(plan.spec.acc_dtype) == np.float64
    weights = None
    if plan.weighted:
        per_patch = np.asarray(plan.weight, wide).reshape(1, -1)
        weights = np.broadcast_to(per_patch, (len(corners), per_patch.size)).reshape(-1)
    order = starts = voxels = coverage = weight_sums = None
    if by_index:
        if plan.reduce == "mean":
            if plan.window.profiles is not None:
                counted = _profile_product(plan, k).reshape(-1)
            else:
                counted = np.bincount(index, weights=weights, minlength=math.prod(grid.shape))
                weight_sums = counted.astype(wide).reshape(grid.shape)
            # Voxels no patch covers (or whose weights are all zero) divide by one; the
            # finishing step fills them.
            coverage = np.where(counted > 0, counted, 1).astype(wide)
    else:
        order = np.argsort(index, kind="stable")
        ordered = index[order]
        starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
        voxels = ordered[starts]
        if weights is not None:
            weights = weights[order]
        if plan.reduce == "mean":
            if plan.window.profiles is not None:
                counted = _profile_product(plan, k).reshape(-1)[voxels]
            else:
                assert weights is not None
                counted = np.add.reduceat(weights, starts)
                weight_sums = np.zeros(grid.shape, wide)
                weight_sums.reshape(-1)[voxels] = counted
            coverage = np.where(counted > 0, counted, 1).astype(wide)
    for table in (index, order, starts, voxels, coverage, weights, weight_sums):
        if table is not None:
            table.flags.writeable = False
    return Scatter(by_index, index, order, starts, voxels, coverage, weights, weight_sums)


def _profile_product(plan: MergePlan, k: int) -> np.ndarray:
    """The coverage of a complete grid and a separable window: the per-axis profiles' outer
    product, as the rows strategy divides by it."""
    profs = plan.profile_coverage(False)
    cov = profs[0].reshape((-1,) + (1,) * (k - 1))
    for j in range(1, k):
        cov = cov * profs[j].reshape((1,) * j + (-1,) + (1,) * (k - 1 - j))
    return cov
