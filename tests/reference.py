"""Independent references, written from DESIGN.md with plain loops and plain NumPy.

Nothing here calls patchgrid: the tests compare patchgrid against these.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def axis_starts(length: int, size: int, stride: int, edge: str) -> tuple[list[int], int]:
    """Starts of the patches along one axis and the padding after it, per DESIGN.md's table."""
    if length < size:
        if edge == "drop":
            raise AssertionError("the reference has no starts for drop on a short axis")
        return [0], size - length
    if edge == "drop":
        return list(range(0, length - size + 1, stride)), 0
    if edge == "pad":
        # Keep adding patches while the last one stops short of the border, but never start
        # one at or past the border (with gaps it would hold nothing but padding).
        starts = [0]
        while starts[-1] + size < length and starts[-1] + stride < length:
            starts.append(starts[-1] + stride)
        return starts, max(0, starts[-1] + size - length)
    if edge == "shift":
        starts = list(range(0, length - size + 1, stride))
        if starts[-1] + size < length:
            starts.append(length - size)
        return starts, 0
    if edge == "even":
        # nnU-Net's compute_steps_for_sliding_window, with the stride as the target step.
        n = math.ceil((length - size) / stride) + 1
        if n == 1:
            return [0], 0
        step = (length - size) / (n - 1)
        return [int(np.round(step * i)) for i in range(n)], 0
    raise AssertionError(f"unknown edge {edge!r}")


class Layout:
    """Where the patches of a grid sit, computed by the reference rules above.

    ``axes``, ``size``, ``stride`` and ``edge`` are per tiled axis, in any axis order (negative
    axes allowed); everything stored here is in increasing axis order.
    """

    def __init__(
        self,
        shape: Sequence[int],
        axes: Sequence[int],
        size: Sequence[int],
        stride: Sequence[int],
        edge: Sequence[str],
    ) -> None:
        self.shape = tuple(shape)
        ndim = len(self.shape)
        rows = sorted(zip([a % ndim for a in axes], size, stride, edge))
        self.axes = tuple(r[0] for r in rows)
        self.size = tuple(r[1] for r in rows)
        self.axis_starts: list[list[int]] = []
        self.pad_width = [(0, 0)] * ndim
        for a, p, s, e in rows:
            starts, pad = axis_starts(self.shape[a], p, s, e)
            self.axis_starts.append(starts)
            self.pad_width[a] = (0, pad)
        self.counts = tuple(len(s) for s in self.axis_starts)
        self.corners = list(itertools.product(*self.axis_starts))

    def slices(self, corner: Sequence[int]) -> tuple[slice, ...]:
        out = [slice(None)] * len(self.shape)
        for a, p, s in zip(self.axes, self.size, corner):
            out[a] = slice(s, s + p)
        return tuple(out)

    def padded(self, image: np.ndarray, mode: str = "constant", value: Any = 0) -> np.ndarray:
        if not any(after for _, after in self.pad_width):
            return image
        if mode == "constant":
            return np.pad(image, self.pad_width, mode="constant", constant_values=value)
        return np.pad(image, self.pad_width, mode=mode)

    def extract(self, image: np.ndarray, mode: str = "constant", value: Any = 0) -> np.ndarray:
        """``(*counts, *patch_shape)``: every patch sliced out of the (padded) image by a loop."""
        src = self.padded(image, mode, value)
        patches = [src[self.slices(c)] for c in self.corners]
        return np.stack(patches).reshape(*self.counts, *patches[0].shape)

    def merge(
        self,
        patches: np.ndarray,
        reduce: str = "mean",
        weight: np.ndarray | None = None,
        fill: Any = 0,
        keep: Sequence[int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Plain-loop merge of flat patches ``(N, *patch)``: ``out[sl] += w * p; count[sl] += w``.

        Returns the merged image in float64 (complex128 for complex patches) and the coverage
        (the sum of weights per voxel, or the patch count for max/min), both over the whole
        output. Voxels with no coverage get ``fill``. ``keep`` restricts the merge to those
        patch numbers.
        """
        patch_shape = patches.shape[1:]
        ndim = len(self.shape)
        full = [patch_shape[a] for a in range(ndim)]
        for a, (_, after) in zip(range(ndim), self.pad_width):
            if a in self.axes:
                full[a] = self.shape[a] + after
        # Sums in extended precision, as patchgrid's accumulators are wider than the patches;
        # the result rounded once to float64 (complex128).
        kind = np.clongdouble if patches.dtype.kind == "c" else np.longdouble
        w = np.ones(self.size) if weight is None else np.asarray(weight, dtype=np.float64)
        wshape = [1] * ndim
        for a, p in zip(self.axes, self.size):
            wshape[a] = p
        w = w.reshape(wshape)
        count = np.zeros(full)
        if reduce in ("mean", "sum"):
            out = np.zeros(full, dtype=kind)
        else:
            out = np.full(full, -np.inf if reduce == "max" else np.inf)
        numbers = range(len(self.corners)) if keep is None else keep
        for i in numbers:
            sl = self.slices(self.corners[i])
            p = patches[i].astype(kind)
            if reduce in ("mean", "sum"):
                out[sl] += w * p
            elif reduce == "max":
                out[sl] = np.maximum(out[sl], p)
            else:
                out[sl] = np.minimum(out[sl], p)
            count[sl] += w if reduce in ("mean", "sum") else 1
        if reduce == "mean":
            out = np.divide(out, count, out=np.zeros_like(out), where=count > 0)
        crop = tuple(
            slice(0, self.shape[a]) if a in self.axes else slice(None) for a in range(ndim)
        )
        out, count = out[crop], count[crop]
        out[count == 0] = fill
        return out.astype(np.complex128 if kind == np.clongdouble else np.float64), count


def window_1d(name: str, n: int) -> list[float]:
    """One axis of a named window, element by element, from the formulas in DESIGN.md."""
    c = (n - 1) / 2
    s = n / 8
    values = []
    for i in range(n):
        if name == "uniform":
            values.append(1.0)
        elif name == "gaussian":
            values.append(math.exp(-((i - c) ** 2) / (2 * s**2)))
        elif name == "hann":
            values.append(math.sin(math.pi * (i + 1) / (n + 1)) ** 2)
        elif name == "triangular":
            values.append(1 - abs(2 * i - (n - 1)) / (n + 1))
        else:
            raise AssertionError(f"unknown window {name!r}")
    return values


def window_nd(name: str, size: Sequence[int]) -> np.ndarray:
    """The N-D window as a product of per-axis values, voxel by voxel."""
    axes = [window_1d(name, n) for n in size]
    out = np.empty(tuple(size))
    for index in itertools.product(*[range(n) for n in size]):
        out[index] = math.prod(axes[j][i] for j, i in enumerate(index))
    return out


def coverage(layout: Layout, weight: np.ndarray | None = None) -> np.ndarray:
    """Sum of the weights of every patch over each voxel, by a loop: the image's shape on the
    tiled axes, 1 on the others."""
    ndim = len(layout.shape)
    patch = [1] * ndim
    for a, p in zip(layout.axes, layout.size):
        patch[a] = p
    zeros = np.zeros((len(layout.corners), *patch))
    return layout.merge(zeros, "sum", weight)[1]
