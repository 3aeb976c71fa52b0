"""torch datasets over many volumes: every patch of a grid, or random patches drawn forever.

This module imports torch; ``patchgrid`` imports it only when one of its names is asked for.
Volumes may be arrays, lazy arrays or paths. Workers of a ``DataLoader`` get the paths, file
names of memory maps, or zarr references, and open the files themselves: no volume is copied
into every worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ._checks import PatchgridError
from .grid import PatchGrid
from .sample import _read, _rng, label_weights, sample

__all__ = ["PatchDataset", "RandomPatchDataset"]


class _Volume:
    """A volume that reopens itself in each process instead of travelling as its data."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self._array: Any = None
        if isinstance(source, (str, os.PathLike)):
            self.reopen: tuple[Any, ...] | None = ("path", os.fspath(source))
        elif isinstance(source, np.memmap) and getattr(source, "filename", None):
            self.reopen = (
                "memmap",
                source.filename,
                source.dtype,
                source.shape,
                source.offset,
                "F" if source.flags.f_contiguous and not source.flags.c_contiguous else "C",
            )
        elif hasattr(source, "path") and hasattr(source, "format") and hasattr(source, "meta"):
            spec = (
                source.path
                if "dataset" not in source.meta
                else f"{source.path}:{source.meta['dataset']}"
            )
            self.reopen = ("path", spec)
        else:
            self.reopen = None
            self._array = source
        if self.reopen is not None and not isinstance(source, (str, os.PathLike)):
            self._array = source
        self.shape = tuple(int(s) for s in self.array.shape)

    @property
    def array(self) -> Any:
        if self._array is None:
            assert self.reopen is not None
            if self.reopen[0] == "path":
                from .io import open as open_image

                self._array = open_image(self.reopen[1])
            else:
                _, name, dtype, shape, offset, order = self.reopen
                self._array = np.memmap(
                    name, dtype=dtype, mode="r", shape=shape, offset=offset, order=order
                )
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.reopen is not None:
            state["_array"] = None
            state["source"] = None
        return state


def _volumes(items: Any, name: str) -> list[_Volume]:
    if isinstance(items, (str, os.PathLike)) or hasattr(items, "shape"):
        items = [items]
    volumes = [_Volume(v) for v in items]
    if not volumes:
        raise PatchgridError(f"{name} must hold at least one volume")
    return volumes


def _volumes_and_labels(volumes: Any, labels: Any) -> tuple[list[_Volume], list[_Volume] | None]:
    """The volumes and, when given, one label volume for each."""
    images = _volumes(volumes, "volumes")
    if labels is None:
        return images, None
    masks = _volumes(labels, "labels")
    if len(masks) != len(images):
        raise PatchgridError(f"labels has {len(masks)} volumes but volumes has {len(images)}")
    return images, masks


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


class PatchDataset(Dataset):  # type: ignore[misc]
    """Every patch of a grid over each of many volumes, as a map-style torch ``Dataset``.

    Parameters
    ----------
    volumes : array, path, lazy array, or a sequence of them
        The images. Paths and memory maps are opened in each ``DataLoader`` worker.
    size, stride, axes, edge, pad_mode, pad_value
        As for :class:`PatchGrid`; one grid per volume.
    labels : like ``volumes``, optional
        Label volumes of the same spatial shape; their patches come as ``"label"``.
    transform : callable, optional
        Takes the item (a dict) and returns it, applied to image and label together.

    Notes
    -----
    Items are dicts ``{"patch": tensor, "start": tensor (k,), "volume": int}``, plus
    ``"label"`` when labels are given, in grid order, volume after volume.

    Examples
    --------
    >>> import numpy as np
    >>> import patchgrid as pg
    >>> ds = pg.PatchDataset([np.zeros((8, 8)), np.ones((8, 12))], size=4)
    >>> len(ds), ds[4]["patch"].shape, int(ds[4]["volume"]), ds[4]["start"].tolist()
    (10, torch.Size([4, 4]), 1, [0, 0])
    """

    def __init__(
        self,
        volumes: Any,
        size: int | Sequence[int],
        stride: Any = None,
        *,
        labels: Any = None,
        axes: Any = None,
        edge: Any = "shift",
        pad_mode: str = "constant",
        pad_value: Any = 0,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.volumes, self.labels = _volumes_and_labels(volumes, labels)
        self.grids = [
            PatchGrid(
                v.shape, size, stride, axes=axes, edge=edge, pad_mode=pad_mode, pad_value=pad_value
            )
            for v in self.volumes
        ]
        if self.labels is not None:
            for i, (g, lab) in enumerate(zip(self.grids, self.labels)):
                spatial = tuple(g.shape[a] for a in g.axes)
                if tuple(lab.shape[-len(g.axes) :]) != spatial:
                    raise PatchgridError(
                        f"labels[{i}] has shape {lab.shape}, which does not end with the "
                        f"volume's tiled shape {spatial}"
                    )
        self.transform = transform
        self._ends = np.cumsum([len(g) for g in self.grids])

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for {n} patches")
        index %= n
        v = int(np.searchsorted(self._ends, index, side="right"))
        local = index - (int(self._ends[v - 1]) if v else 0)
        grid = self.grids[v]
        start = np.array([int(grid.axis_starts(j)[p]) for j, p in enumerate(grid.position(local))])
        item: dict[str, Any] = {
            "patch": _tensor(_read(self.volumes[v].array, grid, start)),
            "start": torch.as_tensor(start),
            "volume": v,
        }
        if self.labels is not None:
            item["label"] = _tensor(_read_label(self.labels[v].array, grid, start))
        return self.transform(item) if self.transform is not None else item


def _read_label(labels: Any, grid: PatchGrid, start: np.ndarray) -> np.ndarray:
    """The label patch at ``start``: labels cover the tiled axes (and maybe a channel axis)."""
    k = len(grid.axes)
    shape = tuple(int(s) for s in labels.shape)
    lgrid = PatchGrid(
        shape,
        grid.size,
        axes=tuple(range(len(shape) - k, len(shape))),
        edge="pad",
        pad_mode="constant",
        pad_value=0,
    )
    return _read(labels, lgrid, start)


class RandomPatchDataset(IterableDataset):  # type: ignore[misc]
    """Random patches drawn with :func:`sample` from many volumes, as a torch ``IterableDataset``.

    Parameters
    ----------
    volumes, labels, transform
        As for :class:`PatchDataset`.
    size : int or sequence of int
        Patch size per tiled axis.
    length : int
        Patches per epoch (over all workers together).
    pos, neg : float, optional
        With labels, draw centres ``pos`` : ``neg`` on foreground and background (see
        :func:`label_weights`); uniform without them.
    seed : int
        Reproducible from this one seed; each ``DataLoader`` worker draws its own stream.
    axes, edge, pad_mode, pad_value
        As for :func:`sample`; ``edge="pad"`` by default, so centres may fall anywhere.

    Notes
    -----
    Volumes are chosen in proportion to their number of voxels.
    """

    def __init__(
        self,
        volumes: Any,
        size: int | Sequence[int],
        length: int,
        *,
        labels: Any = None,
        pos: float | None = None,
        neg: float | None = None,
        seed: int = 0,
        axes: Any = None,
        edge: str = "pad",
        pad_mode: str = "constant",
        pad_value: Any = 0,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.volumes, self.labels = _volumes_and_labels(volumes, labels)
        if (pos is not None or neg is not None) and self.labels is None:
            raise PatchgridError("pos and neg weight the draw by labels; give labels= too")
        self.size, self.length, self.seed = size, int(length), int(seed)
        if self.length < 1:
            raise PatchgridError(f"length must be at least 1, got {length}")
        self.pos = 1.0 if pos is None else pos
        self.neg = 1.0 if neg is None else neg
        self.weighted = pos is not None or neg is not None
        self.kw = dict(axes=axes, edge=edge, pad_mode=pad_mode, pad_value=pad_value)
        self.transform = transform
        self._weights: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.length

    def _weight_map(self, v: int) -> Any:
        if not self.weighted or self.labels is None:
            return None
        if v not in self._weights:
            self._weights[v] = label_weights(self.labels[v].array, self.pos, self.neg)
        return self._weights[v]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        count = self.length // workers + (1 if worker < self.length % workers else 0)
        gen = _rng(np.random.default_rng(np.random.SeedSequence([self.seed, worker])))
        sizes = np.array([np.prod(v.shape) for v in self.volumes], dtype=np.float64)
        for _ in range(count):
            v = int(gen.choice(len(self.volumes), p=sizes / sizes.sum()))
            volume = self.volumes[v].array
            patches, starts = sample(
                volume, self.size, 1, weights=self._weight_map(v), rng=gen, **self.kw
            )
            item: dict[str, Any] = {
                "patch": _tensor(patches[0]),
                "start": torch.as_tensor(starts[0]),
                "volume": v,
            }
            if self.labels is not None:
                grid = PatchGrid(tuple(volume.shape), self.size, axes=self.kw["axes"], edge="pad")
                item["label"] = _tensor(_read_label(self.labels[v].array, grid, starts[0]))
            yield self.transform(item) if self.transform is not None else item
