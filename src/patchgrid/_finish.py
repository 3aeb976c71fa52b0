"""The output spec and the one finishing step of every merge (L2).

Weights and coverages in the accumulator's precision, the division by the coverage, the hint of
the cast rule, and the warning for voxels no patch covers: shared by :class:`Merger` (in memory
and tiled) and by the Dask path, so that a rule holds on every path or on none.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from . import _compiled, _strided
from ._checks import PatchgridError, PatchgridWarning
from .backends import NUMPY, Backend, backend_of, check_cast, lossless
from .grid import PatchGrid

REDUCES = ("mean", "sum", "max", "min", "argmax")


def profile_sum(
    starts: np.ndarray, weights: np.ndarray, length: int, dtype: Any = np.float64
) -> np.ndarray:
    """Sum of a 1-D window placed at every start: one axis of the coverage, summed in ``dtype``
    (the accumulator's precision, so that a weighted mean of equal values is that value)."""
    out = np.zeros(length, dtype=dtype)
    w = np.asarray(weights, dtype=dtype)
    for s in starts.tolist():
        out[s : s + len(w)] += w
    return out


def weight_array(
    window: np.ndarray, profiles: list[np.ndarray] | None, grid: PatchGrid, dtype: Any
) -> np.ndarray:
    """The window shaped to broadcast against one patch (1 on the free axes), in ``dtype``.

    A separable window is the outer product of its profiles made in ``dtype``, as the coverage
    it is divided by is summed: equal values then come back exactly."""
    shape = [1] * grid.ndim
    for a, p in zip(grid.axes, grid.size):
        shape[a] = p
    if profiles is None or np.dtype(dtype) == np.float64:
        return np.asarray(window, dtype=dtype).reshape(shape)
    out = np.ones(shape, dtype=dtype)
    for a, prof in zip(grid.axes, profiles):
        out = out * shaped(np.asarray(prof, dtype=dtype), a, grid.ndim)
    return out


def sum_dtype(xp: Backend, acc_dtype: Any) -> np.dtype:
    """The real NumPy dtype in which weights and coverages are made for an accumulator: its
    own precision where NumPy has it (extended precision for longdouble), float64 else."""
    if xp.kind(acc_dtype) in "fc":
        real = xp.numpy_dtype(xp.real_dtype(acc_dtype))
        if real.itemsize > 8:  # NumPy's longdouble (torch has nothing wider than float64)
            return real
    return np.dtype(np.float64)


def warn_uncovered(grid: PatchGrid, fill: Any, stacklevel: int = 3) -> None:
    """Say, once per result, that voxels no patch covers hold ``fill`` (never silently)."""
    n = grid.uncovered
    if n:
        edges = grid.edge[0] if len(set(grid.edge)) == 1 else grid.edge
        warnings.warn(
            f"{n} of {math.prod(grid.shape)} voxels lie in no patch (edge={edges!r}, stride "
            f"{grid.stride}, size {grid.size}) and hold fill={fill!r}; edge='shift' covers "
            f"every voxel",
            PatchgridWarning,
            stacklevel=stacklevel,
        )


def cast_hint(reduce: str) -> str:
    """What to do instead, for an error of the cast rule in a merge."""
    if reduce == "argmax":
        return "give an out= or dtype= that holds every class number"
    return (
        "give a dtype= (or an out=) that holds the merged values, e.g. a wider integer or a float"
    )


def shaped(p: Any, a: int, ndim: int) -> Any:
    shape = [1] * ndim
    shape[a] = len(p)
    return p.reshape(shape)


def divide_by_profiles(
    acc: Any, axes: Sequence[int], profs: list[np.ndarray], xp: Backend = NUMPY
) -> None:
    """``acc /= outer(*profs)`` in one pass, chunk by chunk along the first tiled axis.

    Zeros in the profiles (voxels no patch covers) divide by 1; the caller fills them.
    """
    ndim = acc.ndim
    safe = [np.where(p > 0, p, 1) for p in profs]
    k = len(axes)
    host = _compiled.host(acc) if _compiled.loaded() else None
    if (
        host is not None
        and host.nbytes >= _compiled.MIN_DIVIDE
        and host.dtype in (np.float32, np.float64)
        and tuple(axes) == tuple(range(ndim - k, ndim))
        and host.flags.writeable
        and _compiled.divide(host, k, safe)
    ):
        return  # a large merge has the compiled kernels loaded: divide on all cores
    rest = np.ones([1] * ndim)
    for a, p in zip(axes[1:], safe[1:]):
        rest = rest * shaped(p, a, ndim)
    a0 = axes[0]
    n0 = acc.shape[a0]
    plane = xp.nbytes(acc) // max(n0, 1)
    # Small outputs go a row at a time: the temporaries stay small beside them.
    room = _strided.CHUNK_BYTES // 2 if xp.nbytes(acc) >= 1 << 20 else 0
    step = max(1, room // max(plane, 1))
    buf = None
    # None off the CPU (and for dtypes NumPy lacks): the divisor is then made on the device.
    buf_dtype = xp.host_dtype(xp.dtype(acc), acc) if xp.nbytes(acc) >= 1 << 20 else None
    if buf_dtype is not None:
        # The float64 product cast straight into one small host buffer of the accumulator's
        # dtype (a single rounding, as below), reused for every block of rows.
        shape = list(rest.shape)
        shape[a0] = min(step, n0)
        buf = np.empty(shape, dtype=buf_dtype)
    for lo in range(0, n0, step):
        hi = min(lo + step, n0)
        where: list[Any] = [slice(None)] * ndim
        where[a0] = slice(lo, hi)
        part = acc[tuple(where)]
        column = shaped(safe[0][lo:hi], a0, ndim)
        if buf is not None:
            cut: list[Any] = [slice(None)] * ndim
            cut[a0] = slice(0, hi - lo)
            divisor = buf[tuple(cut)]
            np.multiply(column, rest, out=divisor, casting="same_kind")
            xp.divide(part, divisor)
        else:
            xp.divide(part, xp.constant(column * rest, xp.dtype(acc), acc))


class OutputSpec(NamedTuple):
    """The output of a merge, settled by the first patches: shape, dtypes, class axis."""

    shape: tuple[int, ...]
    dtype: Any  # the output's (a NumPy dtype, or a torch dtype on torch)
    acc_dtype: Any  # the accumulator's
    patch_shape: tuple[int, ...]
    patch_dtype: Any
    reduce: str
    class_axis: int | None  # the axis argmax reduces and drops
    n_classes: int
    identity: Any  # the accumulator's starting value

    def real_dtype(self, xp: Backend) -> Any:
        """The weights' dtype: the accumulator's, or its real part's for complex patches."""
        return xp.real_dtype(self.acc_dtype)


def output_spec(grid: PatchGrid, patch_shape: tuple[int, ...], patch_dtype: Any, reduce: str,
                dtype: Any, sink_dtype: Any, xp: Backend) -> OutputSpec:  # fmt: skip
    """The output spec of merging patches of ``patch_shape`` and ``patch_dtype`` on ``grid``:
    ``dtype`` when given, else the output array's (``sink_dtype``), else the rule of
    :meth:`Backend.out_dtype` (argmax: the smallest label dtype)."""
    out_shape = list(grid.shape)
    for a in range(grid.ndim):
        if a not in grid.axes:
            out_shape[a] = patch_shape[a]
    class_axis, n_classes = None, 0
    if reduce == "argmax":
        free = [a for a in range(grid.ndim) if a not in grid.axes]
        if not free:
            raise PatchgridError(
                "reduce='argmax' needs a class axis that is not tiled (patches shaped "
                "(classes, *spatial)); every axis of these patches is tiled"
            )
        class_axis = free[-1]
        n_classes = out_shape.pop(class_axis)
        acc_dtype = xp.acc_dtype(patch_dtype, "mean")
        default = xp.label_dtype(n_classes)
    else:
        acc_dtype = xp.acc_dtype(patch_dtype, reduce)
        default = xp.out_dtype(patch_dtype, reduce)
    if dtype is not None:
        default = dtype
    elif sink_dtype is not None:
        default = sink_dtype
    out_dtype = xp.as_dtype(default)  # NumPy reads a tensor out='s dtype by its name
    if reduce == "argmax":
        # The labels are known before any work: check them against the output now.
        check_cast(NUMPY, np.arange(max(n_classes, 1)), xp.numpy_dtype(out_dtype),
                   what=f"class numbers of {n_classes} classes",
                   hint=cast_hint("argmax"))  # fmt: skip
    identity = 0 if reduce not in ("max", "min") else xp.extreme(acc_dtype, reduce == "min")
    return OutputSpec(tuple(out_shape), out_dtype, acc_dtype, patch_shape, patch_dtype, reduce,
                      class_axis, n_classes, identity)  # fmt: skip


def check_fill(xp: Backend, fill: Any, dtype: Any) -> None:
    """``fill`` must fit the output dtype."""
    if not xp.fits(fill, dtype):
        raise PatchgridError(
            f"fill={fill!r} cannot be stored in the output dtype {dtype}; "
            f"give a fill that fits or a dtype= that holds it"
        )


def check_values(xp: Backend, values: Any, spec: OutputSpec, dtype: Any = None,
                 patch_dtype: Any = None) -> None:  # fmt: skip
    """The cast rule for finished values going to the output dtype (or ``dtype``).

    A mean, max or min stays within the range of the patches, so only an output that cannot
    hold the patches' dtype needs a look at the values; a sum always does, and so do values
    whose patches' dtype is unknown (``patch_dtype`` False: a Dask chunk no patch reached).
    """
    dtype = spec.dtype if dtype is None else dtype
    seen = spec.patch_dtype if patch_dtype is None else patch_dtype
    force = spec.reduce == "sum" or patch_dtype is False
    if patch_dtype is False:
        seen = xp.dtype(values)
    src = seen if xp.kind(seen) in "iub" else xp.dtype(values)
    if not force and lossless(xp.numpy_dtype(seen), xp.numpy_dtype(dtype)):
        return
    hint = cast_hint(spec.reduce)
    if xp.kind(seen) in "iu" and xp.kind(dtype) == "f":
        plain = str(seen).replace("torch.", "")
        hint = (
            f"pass dtype={plain} to keep integers (a mean is rounded to the nearest), or "
            f"reduce='max' or 'min' for labels and IDs (exact)"
        )
    check_cast(xp, values, dtype, src=src, force=force,
               what=f"the merged result (reduce={spec.reduce!r})", hint=hint)  # fmt: skip


def labels(xp: Backend, scores: Any, spec: OutputSpec, a0: int, whole: bool = False) -> Any:
    """Argmax over the class axis, a few rows (along axis ``a0``) at a time (the ``whole``
    block at once for the device engine, whose operations are launches), straight into the
    label dtype.

    Whole, NumPy's argmax over a leading axis copies the scores and returns int64 labels:
    twice the block and eight bytes a voxel, where these are one.
    """
    ca = spec.class_axis
    assert ca is not None
    shape = list(scores.shape)
    shape.pop(ca)
    out = xp.empty(shape, spec.dtype, scores)
    at = a0 if a0 < ca else a0 - 1
    n = scores.shape[a0]
    step = max(1, _strided.CHUNK_BYTES // max(xp.nbytes(scores) // max(n, 1), 1))
    if whole:
        step = max(n, 1)
    for lo in range(0, n, step):
        src: list[Any] = [slice(None)] * scores.ndim
        dst: list[Any] = [slice(None)] * len(shape)
        src[a0] = dst[at] = slice(lo, lo + step)
        xp.assign(out[tuple(dst)], xp.astype(xp.argmax(scores[tuple(src)], ca), spec.dtype))
    return out


def finish_values(xp: Backend, block: Any, spec: OutputSpec, a0: int, patch_dtype: Any = None,
                  whole: bool = False) -> Any:  # fmt: skip
    """Normalised sums to output values: labels (argmax), or rounded where the output is an
    integer, checked by the cast rule, and cast. The one finishing step of every merge
    (in memory, tiled and Dask); ``patch_dtype`` as for :func:`check_values`, ``whole`` as
    for :func:`labels`."""
    if spec.class_axis is not None:
        result = labels(xp, block, spec, a0, whole)
    else:
        result = block
        if xp.kind(spec.dtype) in "iub" and xp.kind(xp.dtype(result)) == "f":
            result = xp.round(result)  # an integer output takes the nearest value
        check_values(xp, result, spec, patch_dtype=patch_dtype)
    return xp.astype(result, spec.dtype)


def normalise(xp: Backend, block: Any, axes: Sequence[int], kind: str, cov: Any,
              divide: bool) -> list[tuple[int, Any]]:  # fmt: skip
    """Divide sums by their coverage (``divide``), given per tiled axis (``kind``
    ``"profiles"``, ``axes`` saying where each goes) or as a volume that broadcasts against
    them; a zero coverage divides by one. Returns where no patch covers, as
    :func:`fill_masks` takes it: (axis, 1-D mask) pairs, or (-1, mask volume)."""
    if kind == "profiles":
        if divide:
            divide_by_profiles(block, axes, cov, xp)
        return [(a, p == 0) for a, p in zip(axes, cov) if (p == 0).any()]
    if divide:
        xp.divide(block, xp.constant(np.where(cov > 0, cov, 1), xp.dtype(block), block))
    return [(-1, cov == 0)] if (cov == 0).any() else []


def fill_masks(xp: Backend, result: Any, masks: list[tuple[int, Any]], fill: Any,
               class_axis: int | None) -> None:  # fmt: skip
    """Set ``fill`` where no patch covers: ``masks`` holds (axis, 1-D mask) pairs, or
    (-1, mask volume) (axes of the sums, before argmax drops the class axis)."""
    nd = result.ndim
    for a, mask in masks:
        if a == -1:
            m = mask
            if class_axis is not None:
                m = m.reshape(m.shape[:class_axis] + m.shape[class_axis + 1 :])
            # A mask of the device engine is on the device already.
            xp.fill_where(result, m if xp.owns(m) and not xp.host_loops else
                          xp.constant(m, bool, result), fill)  # fmt: skip
            continue
        axis = a if class_axis is None or a < class_axis else a - 1
        where: list[Any] = [slice(None)] * nd
        where[axis] = xp.index(np.flatnonzero(mask), result)
        result[tuple(where)] = fill


def write_rows(xp: Backend, sink: Any, block: Any, lo: int, hi: int, spec: OutputSpec,
               a0: int) -> None:  # fmt: skip
    """Put finished rows ``[lo, hi)`` (along the image's axis ``a0``) into the output, by the
    cast rule when the output's dtype is not the spec's."""
    ca = spec.class_axis
    axis = a0 if ca is None or a0 < ca else a0 - 1
    where: list[Any] = [slice(None)] * len(spec.shape)
    where[axis] = slice(lo, hi)
    sink_xp = backend_of(sink)
    into = sink_xp.numpy_dtype(sink.dtype)
    if into != xp.numpy_dtype(spec.dtype):
        check_cast(xp, block, into, what=f"the merged result (dtype {spec.dtype})",
                   hint=f"out= has dtype {into}; " + cast_hint(spec.reduce))  # fmt: skip
    sink[tuple(where)] = sink_xp.from_any(block)


class Finisher:
    """Finishes rows of a merge as they complete: divides the sums by the coverage, crops the
    padding, turns sums into output values (:func:`finish_values`), fills what no patch
    covers and writes the rows into the output. Every accumulator strategy goes through it.

    ``plan`` is the merge's :class:`~patchgrid._plan.MergePlan`; ``seen`` the grid's
    patches added so far (shaped like the counts).
    """

    def __init__(self, plan: Any, fill: Any, seen: np.ndarray) -> None:
        self.plan, self.xp, self.fill, self.seen = plan, plan.xp, fill, seen
        self.grid = plan.grid

    def coverage_block(self, wrows: Any, start: int, upto: int, complete: bool,
                       ones: bool) -> tuple[str, Any]:  # fmt: skip
        """Weights over padded rows ``[start, upto)``: per-axis profiles, the summed weights
        of an array window (``wrows``), or a volume added up patch by patch."""
        grid, a0 = self.grid, self.grid.axes[0]
        if complete and (ones or self.plan.window.profiles is not None):
            profs = self.plan.profile_coverage(ones)
            profs[0] = profs[0][start:upto]
            return "profiles", profs
        wide = sum_dtype(self.xp, self.plan.spec.acc_dtype)  # the weights' own precision
        if complete and not ones and wrows is not None:
            return "volume", self.xp.to_numpy(wrows).astype(wide)
        # Some patches are missing: add up the weights of those present, one by one.
        shape = [1] * grid.ndim
        for a in grid.axes:
            shape[a] = grid.padded_shape[a]
        shape[a0] = upto - start
        cov = np.zeros(shape)
        wshape = [p if a in grid.axes else 1 for a, p in enumerate(grid.patch_shape)]
        w = np.ones(wshape) if ones else self.plan.window.array.reshape(wshape)
        for i in np.flatnonzero(self.seen.ravel()).tolist():
            sl = list(grid.slices(i))
            first, last = sl[a0].start - start, sl[a0].stop - start
            if last <= 0 or first >= shape[a0]:
                continue
            lo, hi = max(first, 0), min(last, shape[a0])
            target = [s if a in grid.axes else slice(None) for a, s in enumerate(sl)]
            target[a0] = slice(lo, hi)
            wsl: list[Any] = [slice(None)] * grid.ndim
            wsl[a0] = slice(lo - first, hi - first)
            cov[tuple(target)] += w[tuple(wsl)]
        return "volume", cov

    def finish(self, acc: Any, start: int, upto: int, complete: bool) -> None:
        """Normalise, reduce, cast and write padded rows ``[start, upto)`` of accumulator
        ``acc`` (a strategy of :mod:`patchgrid._accumulate`); let them go."""
        grid, xp, a0, spec = self.grid, self.xp, self.grid.axes[0], self.plan.spec
        block, wrows = acc.rows(start, upto)
        ones = spec.reduce != "mean"
        divide = not ones and not acc.normalised
        empty = None
        if acc.fused:  # the device engine: its coverage lives on the device
            empty = acc.normalise(block, wrows, start, upto, complete, ones, divide)
        if empty is None:
            kind, cov = self.coverage_block(wrows, start, upto, complete, ones)
            empty = normalise(xp, block, grid.axes, kind, cov, divide)
        # Crop to the image (padding and rows past its end).
        stop = max(min(upto, grid.shape[a0]) - start, 0)
        crop = [slice(0, s) if a in grid.axes else slice(None) for a, s in enumerate(grid.shape)]
        crop[a0] = slice(0, stop)
        result = block[tuple(crop)]
        masks = []
        for a, mask in empty:
            if a == -1:
                masks.append((a, mask[tuple(crop)]))
            else:
                masks.append((a, mask[crop[a]] if a != a0 else mask[:stop]))
        if acc.direct:
            fill_masks(xp, result, masks, self.fill, None)
            return
        result = finish_values(xp, result, spec, a0, whole=acc.fused)
        fill_masks(xp, result, masks, self.fill, spec.class_axis)
        if stop > 0:
            if acc.sink is None:
                acc.sink = xp.empty(spec.shape, spec.dtype, acc.acc)
            write_rows(xp, acc.sink, result, start, start + stop, spec, a0)
        acc.drop(upto - acc.lo)
