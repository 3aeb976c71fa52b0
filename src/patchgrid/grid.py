"""`PatchGrid`: where patches sit. Layout arithmetic only; it never touches array data.

L0 (imports only :mod:`patchgrid._checks`): the grid, a frozen and hashable value; the tiled
axes chosen from the arguments (:func:`tiled_axes`), one grid per layout kept between calls
(:func:`as_grid`), and the grid of some patches on a sub-region (:func:`sub_grid`, for tiles
and Dask chunks).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from . import _checks
from ._checks import PatchgridError

__all__ = ["PatchGrid"]


def _axis_starts(
    length: int, size: int, stride: int, edge: str, axis: int
) -> tuple[tuple[int, ...], int]:
    """Starts of the patches along one axis, and the padding the far end needs."""
    if length == 0:
        return (), 0  # an empty axis holds no patch, whatever the policy
    if length < size:
        if edge == "drop":
            raise PatchgridError(
                f"size {size} on axis {axis} is larger than the image there (length {length}); "
                f"edge='drop' keeps only patches that fit, so there would be none. Use "
                f"edge='pad', 'shift' or 'even' to pad that axis up to the patch size"
            )
        return (0,), size - length
    if edge == "drop":
        n = (length - size) // stride + 1
        return tuple(range(0, n * stride, stride)), 0
    n = -(-(length - size) // stride) + 1
    if edge == "pad":
        # With gaps (stride > size) a last patch starting past the image would hold only padding.
        n = min(n, -(-length // stride))
        starts = tuple(range(0, n * stride, stride))
        return starts, max(0, starts[-1] + size - length)
    if edge == "shift":
        shifted = [i * stride for i in range(n)]
        shifted[-1] = min(shifted[-1], length - size)
        return tuple(shifted), 0
    # "even": nnU-Net's steps, computed the way nnU-Net computes them so they match exactly.
    if n == 1:
        return (0,), 0
    step = (length - size) / (n - 1)
    return tuple(int(np.round(step * i)) for i in range(n)), 0


def tiled_axes(shape: tuple[int, ...], size: Any, stride: Any = None,
               axes: Any = None) -> tuple[int, ...]:  # fmt: skip
    """The axes a grid tiles, in the order given: ``axes`` checked against the image, else the
    last ``len(size)`` (or ``len(stride)``) axes for a sequence, every axis for an int."""
    ndim = len(shape)
    if axes is not None:
        return _checks.axes_tuple(axes, ndim)
    k = ndim
    for value, name in ((size, "size"), (stride, "stride")):
        if isinstance(value, (Sequence, np.ndarray)):
            k = len(value)
            if not 1 <= k <= ndim:
                raise PatchgridError(
                    f"{name} has {k} entries but the image has {ndim} dimensions "
                    f"(shape {shape}); give at most one entry per axis"
                )
            break
    return tuple(range(ndim - k, ndim))


def check_unchosen_axes(
    shape: tuple[int, ...], size: int, axes: tuple[int, ...], edges: tuple[str, ...]
) -> None:
    """An int ``size`` without ``axes=`` tiles every axis the user did not name: one shorter
    than the patch (a channel or time axis, most often) is an error, never padding."""
    short = [a for a, e in zip(axes, edges) if 0 < shape[a] < size and e != "drop"]
    if not short:
        return
    keep = tuple(a for a in range(len(shape)) if a not in short)
    what = (
        f"name the axes to tile with axes= (here perhaps axes={keep}), or give size as a tuple "
        f"to pad that axis on purpose"
        if keep
        else f"give size as a tuple (here {(size,) * len(axes)}) to pad on purpose, or a "
        f"smaller size"
    )
    raise PatchgridError(
        f"size {size} is larger than the image along axis {short[0]} (shape {shape}), and an "
        f"int size without axes= tiles every axis: that axis would be padded from "
        f"{shape[short[0]]} to {size}; {what}"
    )


class PatchGrid:
    """The layout of patches over an image: sizes, strides, positions. No array data.

    Parameters
    ----------
    shape : int or sequence of int
        Shape of the whole image, every axis included (channels, batch, ...).
    size : int or sequence of int
        Patch size along each tiled axis. An int applies to every tiled axis.
    stride : int or sequence of int, optional
        Step between the starts (equally, the centres) of neighbouring patches. Defaults to
        ``size``: tiles that touch without overlapping.
    axes : int or sequence of int, optional
        The tiled axes. By default the last ``len(size)`` axes when ``size`` is a sequence, else
        the last ``len(stride)`` axes when ``stride`` is one, else every axis. Axes that are not
        tiled are carried whole inside each patch. Entries of ``size``, ``stride`` and ``edge``
        follow the order of ``axes``; the grid keeps its axes in increasing order.
    edge : {"shift", "drop", "pad", "even"} or sequence of them
        What to do where the stride does not reach the end of an axis exactly (``"shift"`` by
        default, for :func:`extract`, :func:`merge`, :func:`apply` and the command line alike):

        - ``"drop"``: keep only the patches that fit; trailing voxels are left out.
        - ``"pad"``: pad the far end (with ``pad_mode``) so that the last patch fits.
        - ``"shift"``: move the last patch back so that it ends at the border.
        - ``"even"``: spread the patches evenly, first and last at the borders (nnU-Net).

        ``"pad"``, ``"shift"`` and ``"even"`` pad an axis shorter than the patch up to the
        patch size when the tiled axes were chosen (``axes=`` or a tuple ``size``); with an int
        ``size`` and no ``axes=`` such an axis (a channel or time axis, most often) is an error
        that names ``axes=``. ``"drop"`` refuses it. An axis of length 0 holds no patch.
    pad_mode : str
        A :func:`numpy.pad` mode for whatever padding the grid needs.
    pad_value : scalar
        The value of ``pad_mode="constant"``.

    Attributes
    ----------
    shape, size, stride, axes, edge, pad_mode, pad_value
        The normalised arguments: tuples with one entry per tiled axis for ``size``,
        ``stride`` and ``edge``.

    Notes
    -----
    A grid is a frozen, hashable value. Every grid, whatever its edge policy, is the Cartesian
    product of one list of starts per tiled axis; patches are numbered in C order over that
    product.

    Examples
    --------
    >>> import patchgrid as pg
    >>> grid = pg.PatchGrid((10, 20, 30), size=4, stride=2)
    >>> grid.counts, len(grid)
    ((4, 9, 14), 504)
    >>> grid.starts()[:2]
    array([[0, 0, 0],
           [0, 0, 2]])
    >>> grid.centers()[0]
    array([2, 2, 2])
    >>> grid.slices(1)
    (slice(0, 4, None), slice(0, 4, None), slice(2, 6, None))

    With channels first, only the last three axes are tiled:

    >>> grid = pg.PatchGrid((3, 10, 20, 30), size=(4, 4, 4), stride=2)
    >>> grid.axes, grid.patch_shape
    ((1, 2, 3), (3, 4, 4, 4))
    """

    __slots__ = (
        "_counts",
        "_derived",
        "_key",
        "_pad_after",
        "_starts",
        "axes",
        "edge",
        "pad_mode",
        "pad_value",
        "shape",
        "size",
        "stride",
    )

    shape: tuple[int, ...]
    size: tuple[int, ...]
    stride: tuple[int, ...]
    _derived: dict[str, Any]
    axes: tuple[int, ...]
    edge: tuple[str, ...]
    pad_mode: str
    pad_value: Any
    _starts: tuple[tuple[int, ...], ...]
    _pad_after: tuple[int, ...]
    _counts: tuple[int, ...]
    _key: tuple[Any, ...]

    @_checks.keyword_hints  # MONAI's patch_size= and roi_size=: one line names size
    def __init__(
        self,
        shape: int | Sequence[int],
        size: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
        *,
        axes: int | Sequence[int] | None = None,
        edge: str | Sequence[str] = "shift",
        pad_mode: str = "constant",
        pad_value: Any = 0,
    ) -> None:
        shape_t = _checks.shape_tuple(shape)
        axes_t = tiled_axes(shape_t, size, stride, axes)
        k = len(axes_t)
        size_t = _checks.per_axis(size, k, "size")
        stride_t = size_t if stride is None else _checks.per_axis(stride, k, "stride")
        edge_t = _checks.edge_tuple(edge, k)
        mode = _checks.pad_mode_str(pad_mode)
        if not np.isscalar(pad_value):
            raise TypeError(f"pad_value must be a scalar, got {pad_value!r}")
        order = sorted(range(k), key=lambda j: axes_t[j])

        def sort(t: tuple[Any, ...]) -> tuple[Any, ...]:
            return tuple(t[j] for j in order)

        axes_t, size_t, stride_t, edge_t = sort(axes_t), sort(size_t), sort(stride_t), sort(edge_t)
        if axes is None and not isinstance(size, (Sequence, np.ndarray)):
            check_unchosen_axes(shape_t, size_t[0], axes_t, edge_t)
        starts, pads = [], []
        for a, p, s, e in zip(axes_t, size_t, stride_t, edge_t):
            st, pad = _axis_starts(shape_t[a], p, s, e, a)
            starts.append(st)
            pads.append(pad)
        self._set(shape_t, size_t, stride_t, axes_t, edge_t, mode, pad_value, starts, pads)

    def _set(
        self,
        shape: tuple[int, ...],
        size: tuple[int, ...],
        stride: tuple[int, ...],
        axes: tuple[int, ...],
        edge: tuple[str, ...],
        pad_mode: str,
        pad_value: Any,
        starts: Sequence[tuple[int, ...]],
        pads: Sequence[int],
    ) -> None:
        set_ = object.__setattr__
        set_(self, "shape", tuple(shape))
        set_(self, "size", tuple(size))
        set_(self, "stride", tuple(stride))
        set_(self, "axes", tuple(axes))
        set_(self, "edge", tuple(edge))
        set_(self, "pad_mode", pad_mode)
        set_(self, "pad_value", pad_value)
        set_(self, "_starts", tuple(tuple(st) for st in starts))
        set_(self, "_pad_after", tuple(pads))
        set_(self, "_counts", tuple(len(st) for st in starts))
        set_(self, "_key", (*self._fields(), self._starts))
        padded = tuple(s + (self._pad_after[self.axes.index(a)] if a in self.axes else 0)
                       for a, s in enumerate(self.shape))  # fmt: skip
        # Values derived from the fields, worked out once (a grid never changes).
        set_(self, "_derived", {"padded_shape": padded})

    def _fields(self) -> tuple[Any, ...]:
        return (self.shape, self.size, self.stride, self.axes, self.edge, self.pad_mode,
                self.pad_value)  # fmt: skip

    def scaled(self, factor: Any) -> PatchGrid:
        """The same layout on an image ``factor`` times larger along each tiled axis.

        For a model whose output patch is its input patch times ``factor`` (2 for
        super-resolution, 1/4 for an encoder): shape, size, stride, starts and padding are all
        multiplied. ``factor`` is a number or one per tiled axis (ints, floats or
        :class:`fractions.Fraction`); every product must be a whole number of voxels.

        Examples
        --------
        >>> import patchgrid as pg
        >>> grid = pg.PatchGrid((10, 20), size=4, stride=2).scaled(2)
        >>> grid.shape, grid.size, grid.stride, grid.starts()[1].tolist()
        ((20, 40), (8, 8), (4, 4), [0, 4])
        """
        k = len(self.axes)
        values = factor if isinstance(factor, (Sequence, np.ndarray)) else [factor] * k
        if len(values) != k:
            raise PatchgridError(
                f"scale has {len(values)} entries but {k} axes are tiled; give one per tiled "
                f"axis or a single number"
            )
        fractions = []
        for v in values:
            if isinstance(v, (bool, np.bool_)) or not isinstance(
                v, (int, float, Fraction, np.integer, np.floating)
            ):
                raise TypeError(f"scale must be a positive number, got {v!r}")
            if isinstance(v, (float, np.floating)):
                if not math.isfinite(v):
                    raise PatchgridError(f"scale must be a finite positive number, got {v!r}")
                f = Fraction(float(v)).limit_denominator(1 << 16)
            else:
                f = Fraction(v) if isinstance(v, Fraction) else Fraction(int(v))
            if f <= 0:
                raise PatchgridError(f"scale must be positive, got {factor!r}")
            fractions.append(f)

        def whole(value: int, j: int, what: str) -> int:
            r = value * fractions[j]
            if r.denominator != 1:
                raise PatchgridError(
                    f"scale {factor!r} turns the {what} {value} on axis {self.axes[j]} into "
                    f"{float(r):g}, not a whole number of voxels"
                )
            return int(r)

        shape = list(self.shape)
        for j, a in enumerate(self.axes):
            shape[a] = whole(self.shape[a], j, "image length")
        size = [whole(p, j, "patch size") for j, p in enumerate(self.size)]
        stride = [whole(s, j, "stride") for j, s in enumerate(self.stride)]
        starts = [
            tuple(whole(s, j, "patch start") for s in st) for j, st in enumerate(self._starts)
        ]
        pads = [whole(p, j, "padding") for j, p in enumerate(self._pad_after)]
        grid = object.__new__(PatchGrid)
        grid._set(tuple(shape), tuple(size), tuple(stride), self.axes, self.edge, self.pad_mode,
                  self.pad_value, starts, pads)  # fmt: skip
        return grid

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"PatchGrid is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"PatchGrid is immutable; cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PatchGrid) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        def one(t: tuple[Any, ...]) -> Any:
            return t[0] if len(set(t)) == 1 else t

        extra = ""
        if any(e != "drop" for e in self.edge):
            extra += f", edge={one(self.edge)!r}"
        if any(self._pad_after) and self.pad_mode != "constant":
            extra += f", pad_mode={self.pad_mode!r}"
        if any(self._pad_after) and self.pad_mode == "constant" and self.pad_value != 0:
            extra += f", pad_value={self.pad_value!r}"
        return (
            f"PatchGrid(shape={self.shape}, size={one(self.size)}, stride={one(self.stride)}, "
            f"axes={self.axes}{extra}) with counts {self.counts}, {len(self)} patches"
        )

    def __len__(self) -> int:
        return math.prod(self._counts)

    def __iter__(self) -> Iterator[tuple[slice, ...]]:
        """The slices of every patch, in C order."""
        for i in range(len(self)):
            yield self.slices(i)

    def __reduce__(self) -> tuple[Any, ...]:
        return (restore, (*self._fields(), self._starts, self._pad_after))

    @property
    def ndim(self) -> int:
        """Number of dimensions of the image."""
        return len(self.shape)

    @property
    def counts(self) -> tuple[int, ...]:
        """Number of patches along each tiled axis."""
        return self._counts

    @property
    def patch_shape(self) -> tuple[int, ...]:
        """Shape of one patch: the image's shape with each tiled axis cut to the patch size."""
        shape = list(self.shape)
        for a, p in zip(self.axes, self.size):
            shape[a] = p
        return tuple(shape)

    @property
    def pad_width(self) -> tuple[tuple[int, int], ...]:
        """The padding the grid needs, as :func:`numpy.pad` takes it: (before, after) per axis."""
        pads = [(0, 0)] * self.ndim
        for a, pad in zip(self.axes, self._pad_after):
            pads[a] = (0, pad)
        return tuple(pads)

    @property
    def padded_shape(self) -> tuple[int, ...]:
        """Shape of the image after padding (the image's own shape where no padding is needed)."""
        padded: tuple[int, ...] = self._derived["padded_shape"]
        return padded

    @property
    def is_regular(self) -> bool:
        """True when every tiled axis steps by exactly ``stride``, so patches are a view."""
        return all(
            st == tuple(range(0, len(st) * s, s)) for st, s in zip(self._starts, self.stride)
        )

    @property
    def covers(self) -> bool:
        """True when every voxel of the image lies in at least one patch."""
        for a, st, p in zip(self.axes, self._starts, self.size):
            end = 0
            for s in st:
                if s > end:
                    return False
                end = max(end, s + p)
            if end < self.shape[a]:
                return False
        return True

    @property
    def overlap(self) -> int:
        """The most patches that meet at one voxel (a product of per-axis counts).

        Examples
        --------
        >>> import patchgrid as pg
        >>> pg.PatchGrid((10, 10), size=4, stride=2, edge="shift").overlap
        4
        """
        most = 1
        for st, p in zip(self._starts, self.size):
            starts = np.asarray(st)
            # Patches over voxel x: start <= x < start + size; the most is reached at a start.
            over = np.searchsorted(starts, starts, "right") - np.searchsorted(
                starts + p, starts, "right")  # fmt: skip
            most *= int(over.max()) if len(over) else 0
        return most

    @property
    def uncovered(self) -> int:
        """How many voxels of the image no patch covers (0 for a grid that covers it).

        Examples
        --------
        >>> import patchgrid as pg
        >>> pg.PatchGrid((10, 10), size=4, stride=3, edge="drop").uncovered
        0
        >>> pg.PatchGrid((10, 11), size=4, stride=3, edge="drop").uncovered
        10
        """
        if "uncovered" in self._derived:
            known: int = self._derived["uncovered"]
            return known
        covered = 1
        for a, st, p in zip(self.axes, self._starts, self.size):
            line = np.zeros(self.shape[a], dtype=bool)
            for s in st:
                line[s : s + p] = True
            covered *= int(np.count_nonzero(line))
        others = math.prod(n for a, n in enumerate(self.shape) if a not in self.axes)
        self._derived["uncovered"] = math.prod(self.shape) - covered * others
        return self.uncovered

    def axis_starts(self, j: int) -> np.ndarray:
        """Starts of the patches along the ``j``-th tiled axis (``j`` counts tiled axes only)."""
        return np.array(self._starts[j], dtype=np.intp)

    def starts(self) -> np.ndarray:
        """Corner of every patch, shaped ``(len(grid), k)``, in C order over the grid.

        Coordinates are along the tiled axes only, in the order of ``axes``.
        """
        mesh = np.meshgrid(*[self.axis_starts(j) for j in range(len(self.axes))], indexing="ij")
        return np.stack([m.ravel() for m in mesh], axis=-1)

    def centers(self) -> np.ndarray:
        """Centre voxel of every patch, ``start + size // 2``, shaped ``(len(grid), k)``."""
        return self.starts() + np.array(self.size, dtype=np.intp) // 2

    def position(self, index: int) -> tuple[int, ...]:
        """Grid position (one index per tiled axis) of patch number ``index``."""
        n = len(self)
        i = _checks.as_int(index, "index")
        if not -n <= i < n:
            raise IndexError(f"index {index} is out of range for a grid of {n} patches")
        return tuple(int(v) for v in np.unravel_index(i % n, self._counts))

    def index(self, position: Sequence[int]) -> int:
        """Patch number of a grid position (the inverse of :meth:`position`)."""
        pos = tuple(_checks.as_int(p, "position") for p in position)
        if len(pos) != len(self._counts) or not all(0 <= p < c for p, c in zip(pos, self._counts)):
            raise IndexError(
                f"position {tuple(position)} is outside the grid's counts {self._counts}"
            )
        return int(np.ravel_multi_index(pos, self._counts))

    def slices(self, index: int | Sequence[int]) -> tuple[slice, ...]:
        """The slices that cut patch ``index`` (a number or a grid position) out of the image.

        For a patch that reaches into the padding, the slices run past the image's end: they
        cut the patch out of the padded image.
        """
        pos = self.position(index) if np.ndim(index) == 0 else tuple(index)  # type: ignore[arg-type]
        if len(pos) != len(self.axes):
            raise IndexError(f"position {pos} needs {len(self.axes)} entries, one per tiled axis")
        out = [slice(None)] * self.ndim
        for j, (a, p) in enumerate(zip(self.axes, self.size)):
            c = self._counts[j]
            if not -c <= pos[j] < c:
                raise IndexError(f"position {pos} is outside the grid's counts {self._counts}")
            s = self._starts[j][pos[j]]
            out[a] = slice(s, s + p)
        return tuple(out)


def restore(*args: Any) -> PatchGrid:
    """A grid from its fields, as pickled by :meth:`PatchGrid.__reduce__` (for pickling only)."""
    grid = object.__new__(PatchGrid)
    grid._set(*args)
    return grid


def sub_grid(grid: PatchGrid, starts: Sequence[Sequence[int] | np.ndarray], shape: Sequence[int],
             pads: Sequence[int]) -> PatchGrid:  # fmt: skip
    """The patches of ``grid`` that start at ``starts`` (per tiled axis, in the region's
    coordinates) on a region of the image of ``shape`` (all axes), padded at its far end by
    ``pads`` (per tiled axis): a tile of an out-of-core merge, a row of a Dask extract."""
    return restore(tuple(int(n) for n in shape), grid.size, grid.stride, grid.axes, grid.edge,
                   grid.pad_mode, grid.pad_value, [tuple(int(v) for v in s) for s in starts],
                   [int(p) for p in pads])  # fmt: skip


def with_leading_axis(grid: PatchGrid) -> PatchGrid:
    """The same patches over the image with one axis more in front, of length 1 and not tiled:
    where a model puts the class or channel axis it adds to an image that has none."""
    starts = [tuple(int(v) for v in grid.axis_starts(j)) for j in range(len(grid.axes))]
    return restore((1, *grid.shape), grid.size, grid.stride, tuple(a + 1 for a in grid.axes),
                   grid.edge, grid.pad_mode, grid.pad_value, starts,
                   [grid.padded_shape[a] - grid.shape[a] for a in grid.axes])  # fmt: skip


def as_grid(
    shape: tuple[int, ...],
    size: int | Sequence[int] | PatchGrid,
    stride: int | Sequence[int] | None,
    *,
    axes: int | Sequence[int] | None,
    edge: str | Sequence[str],
    pad_mode: str,
    pad_value: Any,
    name: str = "image",
) -> PatchGrid:
    """Take a grid as given (checking it fits ``shape``) or build one from the arguments."""
    if isinstance(size, PatchGrid):
        if size.shape != tuple(shape):
            raise PatchgridError(
                f"the grid was made for shape {size.shape} but {name} has shape {tuple(shape)}"
            )
        return size
    key = grid_key(shape, size, stride, axes, edge, pad_mode, pad_value)
    if key is not None:
        return _cached_grid(key)
    return PatchGrid(
        shape, size, stride, axes=axes, edge=edge, pad_mode=pad_mode, pad_value=pad_value
    )


_PLAIN = frozenset({int, float, str, bool, type(None)})


def grid_key(*args: Any) -> tuple[Any, ...] | None:
    """The arguments as a hashable key when each is a plain int, float, str, bool or None, a
    tuple or list of them, or a grid; None otherwise.

    The key holds every value's type, inside tuples too: ``4``, ``4.0`` and ``True`` compare
    equal, but only one of them is a valid size, so they must never share a cached plan.
    """
    key: list[Any] = []
    for a in args:
        t = type(a)
        if t in _PLAIN or t is PatchGrid:
            key.append((t, a))
        elif (t is tuple or t is list) and all(type(v) in _PLAIN for v in a):
            key.append((t, tuple(a), tuple(map(type, a))))
        else:
            return None
    return tuple(key)


@functools.lru_cache(maxsize=64)
def _cached_grid(key: tuple[Any, ...]) -> PatchGrid:
    # A grid is a frozen value of its arguments: the same call gives the same grid, and
    # building one costs as much as cutting a small image.
    shape, size, stride, axes, edge, pad_mode, pad_value = (k[1] for k in key)
    return PatchGrid(
        shape, size, stride, axes=axes, edge=edge, pad_mode=pad_mode, pad_value=pad_value
    )
