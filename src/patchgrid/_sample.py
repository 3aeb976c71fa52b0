"""Layer L2: random patches for training, uniform or with centres weighted by a map.

What lives here: :func:`sample` (patches at random corners, reaching into padding with
``edge="pad"``) and :class:`label_weights` (a lazy foreground/background weight map), with the
two-level draw that reads a weight map on disk slab by slab, never whole. Each patch is read
with :func:`_regions.read_patch`, the region reader every path shares.

Imports: NumPy and the layers below (``_checks``, ``grid``, ``_regions``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _checks
from ._checks import PatchgridError
from ._regions import INDEX_MODES, read_patch
from .grid import PatchGrid

__all__ = ["label_weights", "sample"]

SLAB_BYTES = 1 << 20  # how much of a weight map is read at a time


def _rng(rng: Any) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be None, an int seed or a numpy.random.Generator, got {rng!r}")


class label_weights:
    """A lazy weight map that puts ``pos`` of the centres on foreground and ``neg`` elsewhere.

    ``label_weights(labels, pos=2, neg=1)`` makes :func:`sample` draw two centres on voxels
    whose label is non-zero (``foreground``) for one elsewhere, whatever their proportions in
    the volume (MONAI's ``RandCropByPosNegLabel`` ratio). ``labels`` may be a lazy array
    (zarr, memmap, :func:`patchgrid.open`): it is read slab by slab, once to count the
    foreground and then only where centres fall, never whole.

    Examples
    --------
    >>> import numpy as np
    >>> import patchgrid as pg
    >>> labels = np.zeros((20, 20), dtype=np.uint8)
    >>> labels[5:8, 5:8] = 1
    >>> w = pg.label_weights(labels, pos=1, neg=0)
    >>> patches, starts = pg.sample(labels, 4, 10, weights=w, rng=0, edge="pad")
    >>> bool((patches[:, 2, 2] == 1).all())  # every centre on the foreground
    True
    """

    def __init__(self, labels: Any, pos: float = 1.0, neg: float = 1.0,
                 foreground: Any = None) -> None:  # fmt: skip
        if pos < 0 or neg < 0 or pos + neg == 0:
            raise PatchgridError(
                f"pos and neg must be non-negative and not both 0, got {pos}, {neg}"
            )
        self.labels = labels
        self.shape = tuple(int(s) for s in labels.shape)
        self.dtype = np.dtype(np.float64)
        self.ndim = len(self.shape)
        self._fg = foreground if foreground is not None else (lambda x: np.asarray(x) != 0)
        n_fg = 0
        for lo, hi in _slabs(self.shape, np.dtype(labels.dtype).itemsize):
            n_fg += int(np.count_nonzero(self._fg(labels[lo:hi])))
        n_bg = int(np.prod(self.shape)) - n_fg
        self._sums: dict[Any, tuple[list[tuple[int, int]], np.ndarray]] = {}
        self.pos = pos / n_fg if n_fg else 0.0
        self.neg = neg / n_bg if n_bg else 0.0
        if self.pos == 0 and self.neg == 0:
            raise PatchgridError(
                f"label_weights: no voxel can be drawn (foreground {n_fg}, background {n_bg}, "
                f"pos={pos}, neg={neg})"
            )

    def __getitem__(self, key: Any) -> np.ndarray:
        fg = self._fg(self.labels[key])
        return np.where(fg, self.pos, self.neg)


def _slabs(shape: Sequence[int], itemsize: int) -> list[tuple[int, int]]:
    plane = max(1, int(np.prod(shape[1:])) * itemsize)
    step = max(1, SLAB_BYTES // plane)
    return [(lo, min(lo + step, shape[0])) for lo in range(0, shape[0], step)]


def _summary(
    weights: Any, valid: Sequence[tuple[int, int]]
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The weight map in slabs along its first axis (inside the box ``valid``) and their sums."""
    lo0 = valid[0][0]
    box = tuple(slice(lo, hi) for lo, hi in valid[1:])
    slabs = [(lo0 + a, lo0 + b) for a, b in _slabs([hi - lo for lo, hi in valid], 8)]
    sums = np.empty(len(slabs))
    for i, (a, b) in enumerate(slabs):
        key = (slice(a, b), *box)
        w = np.asarray(weights[key], dtype=np.float64)
        if not np.all(np.isfinite(w)) or (w < 0).any():
            raise PatchgridError("weights must be finite and non-negative")
        with np.errstate(over="ignore"):
            sums[i] = w.sum()
    if not np.isfinite(sums).all():
        # Weights near the float64 maximum: their sums overflow. Only ratios matter, so scale
        # every slab alike (by 2**-64) and sum again.
        for i, (a, b) in enumerate(slabs):
            key = (slice(a, b), *box)
            sums[i] = (np.asarray(weights[key], dtype=np.float64) * 2.0**-64).sum()
    return slabs, sums


def _draw_centres(weights: Any, valid: Sequence[tuple[int, int]], n: int,
                  rng: np.random.Generator) -> np.ndarray:  # fmt: skip
    """``n`` voxels of ``weights`` (restricted to the box ``valid``), drawn in proportion.

    Two levels, so a weight map on disk is never read whole: slabs along the first axis are
    drawn by their sums, then voxels within the slabs drawn.
    """
    box = tuple(slice(lo, hi) for lo, hi in valid[1:])
    shape = [hi - lo for lo, hi in valid]
    cache = getattr(weights, "_sums", None)  # a label_weights map keeps its summary
    if cache is not None and tuple(valid) in cache:
        slabs, sums = cache[tuple(valid)]
    else:
        slabs, sums = _summary(weights, valid)
        if cache is not None:
            cache[tuple(valid)] = (slabs, sums)
    total = float(sums.sum())
    if total <= 0:
        raise PatchgridError(
            "weights are zero everywhere a patch centre may fall; nothing can be drawn"
        )
    which = rng.choice(len(slabs), size=n, p=sums / total)
    out = np.empty((n, len(valid)), dtype=np.intp)
    for s in np.unique(which):
        a, b = slabs[s]
        key = (slice(a, b), *box)
        w = np.asarray(weights[key], dtype=np.float64).ravel()
        picks = np.flatnonzero(which == s)
        p = w / w.max()  # first to at most 1: a sum of large weights would overflow
        flat = rng.choice(w.size, size=len(picks), p=p / p.sum())
        pos = np.unravel_index(flat, (b - a, *shape[1:]))
        out[picks, 0] = pos[0] + a
        for j in range(1, len(valid)):
            out[picks, j] = pos[j] + valid[j][0]
    return out


def sample(
    image: Any,
    size: int | Sequence[int],
    n: int,
    *,
    weights: Any = None,
    rng: Any = None,
    axes: int | Sequence[int] | None = None,
    edge: str = "drop",
    pad_mode: str = "constant",
    pad_value: Any = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` random patches of ``size`` from ``image``.

    Parameters
    ----------
    image : array_like
        NumPy array or a lazy array (zarr, memmap, h5py, :func:`patchgrid.open`): only the
        patches drawn are read.
    size : int or sequence of int
        Patch size per tiled axis.
    n : int
        How many patches.
    weights : array_like, optional
        A map of the image's shape along the tiled axes (a label mask, a probability map, or
        :func:`label_weights`): patch *centres* (``start + size // 2``) are drawn with
        probability proportional to it. Uniform over the allowed centres by default. A lazy
        map is summarised slab by slab, never read whole.
    rng : None, int or numpy.random.Generator
        The same seed gives the same patches.
    axes : int or sequence of int, optional
        The tiled axes, as for :class:`PatchGrid`.
    edge : {"drop", "pad"}
        ``"drop"`` keeps every patch inside the image (centres at least ``size // 2`` from the
        start); ``"pad"`` lets a centre fall on any voxel, the patch reaching into padding
        (``pad_mode``, ``pad_value``) on either side.

    Returns
    -------
    patches : numpy.ndarray
        ``(n, *patch_shape)``.
    starts : numpy.ndarray
        ``(n, k)`` corners along the tiled axes (negative where a patch starts in the padding).

    Examples
    --------
    >>> import numpy as np
    >>> import patchgrid as pg
    >>> volume = np.arange(10 * 20 * 30).reshape(10, 20, 30)
    >>> patches, starts = pg.sample(volume, 4, 5, rng=0)
    >>> patches.shape, starts.shape
    ((5, 4, 4, 4), (5, 3))
    >>> bool((patches[0] == volume[tuple(slice(s, s + 4) for s in starts[0])]).all())
    True
    """
    n = _checks.as_int(n, "n")
    if n < 1:
        raise PatchgridError(f"n must be at least 1, got {n}")
    edge = _checks.choice(edge, ("drop", "pad"), "edge")
    if edge == "pad" and pad_mode not in INDEX_MODES:
        raise PatchgridError(f"pad_mode must be one of {INDEX_MODES} for sample, got {pad_mode!r}")
    shape = tuple(int(s) for s in image.shape)
    grid = PatchGrid(shape, size, axes=axes, edge="pad", pad_mode=pad_mode, pad_value=pad_value)
    gen = _rng(rng)
    # Where a centre may fall, per tiled axis.
    valid = []
    for a, p in zip(grid.axes, grid.size):
        length = shape[a]
        if edge == "drop":
            if length < p:
                raise PatchgridError(
                    f"size {p} on axis {a} is larger than the image there (length {length}); "
                    f"use edge='pad' to draw patches that reach into padding"
                )
            valid.append((p // 2, length - p + p // 2 + 1))
        else:
            valid.append((0, length))
    if weights is not None:
        wshape = tuple(int(s) for s in weights.shape)
        want = tuple(shape[a] for a in grid.axes)
        if wshape != want:
            raise PatchgridError(
                f"weights must have the image's shape along the tiled axes {grid.axes}, {want}, "
                f"got {wshape}"
            )
        centres = _draw_centres(weights, valid, n, gen)
    else:
        centres = np.stack([gen.integers(lo, hi, size=n) for lo, hi in valid], axis=-1)
    starts = centres - np.array([p // 2 for p in grid.size])
    patches = np.empty((n, *grid.patch_shape), dtype=np.dtype(image.dtype))
    for i, start in enumerate(starts):
        patches[i] = read_patch(image, grid, start)
    return patches, starts
