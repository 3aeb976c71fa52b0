"""Layer L4: torch datasets over many volumes, every patch of a grid or random patches forever.

What lives here: :class:`PatchDataset` (every patch of each volume's grid, by index) and
:class:`RandomPatchDataset` (patches drawn with :func:`sample`, an iterable without end), and
the volumes that reopen themselves in each worker. Patches are read with
:func:`_regions.read_patch`, the region reader every path shares.

This module imports torch; ``patchgrid`` imports it only when one of its names is asked for.
Volumes may be arrays, lazy arrays or paths. Workers of a ``DataLoader`` get the paths, file
names of memory maps, or zarr references, and open the files themselves: no volume is copied
into every worker.

Imports: torch, and the layers below (``_checks``, ``grid``, ``io``, ``_regions``, ``_sample``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

try:
    import torch
    from torch.utils.data import Dataset, IterableDataset, get_worker_info
except ImportError as error:
    # A ModuleNotFoundError stays one, for code that catches it; a broken torch an ImportError.
    raise type(error)(
        f"PatchDataset and RandomPatchDataset need torch, which could not be imported ({error}): "
        f"pip install 'patchgrid[torch]' (or pip install torch)",
        name=error.name,
    ) from None

from . import _checks
from ._checks import PatchgridError
from ._regions import read_patch
from ._sample import label_weights, sample
from .grid import PatchGrid
from .io import open as open_image

__all__ = ["PatchDataset", "RandomPatchDataset"]


class _Volume:
    """A volume that reopens itself in each process instead of travelling as its data."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.opened: Any = None
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
            self.opened = source
        if self.reopen is not None and not isinstance(source, (str, os.PathLike)):
            self.opened = source
        self.shape = tuple(int(s) for s in self.array.shape)

    @property
    def array(self) -> Any:
        if self.opened is None:
            assert self.reopen is not None
            if self.reopen[0] == "path":
                self.opened = open_image(self.reopen[1])
            else:
                _, name, dtype, shape, offset, order = self.reopen
                self.opened = np.memmap(
                    name, dtype=dtype, mode="r", shape=shape, offset=offset, order=order
                )
        return self.opened

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.reopen is not None:
            state["opened"] = None
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


def _check_labels(grids: Sequence[PatchGrid], labels: list[_Volume] | None) -> None:
    """Each label volume must end with its volume's tiled shape (a channel axis may lead)."""
    for i, (g, lab) in enumerate(zip(grids, labels or [])):
        spatial = tuple(g.shape[a] for a in g.axes)
        if tuple(lab.shape[-len(g.axes) :]) != spatial:
            raise PatchgridError(
                f"labels[{i}] has shape {lab.shape}, which does not end with the "
                f"volume's tiled shape {spatial}"
            )


def _tensor(x: np.ndarray) -> torch.Tensor:
    """The patch as a tensor of its own: never a view of the volume, in native byte order.

    A read may be a view of an in-memory volume or of a read-only memory map, so it is always
    copied: a transform that works in place must not change the training data. torch takes
    only native byte order (a NIfTI file may be big-endian); the copy converts it.
    """
    x = np.asarray(x)
    return torch.from_numpy(np.array(x, dtype=x.dtype.newbyteorder("="), order="C", copy=True))


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
    ``"label"`` when labels are given, in grid order, volume after volume. Their tensors are
    their own, copied from the volume (never a view of it, even where a patch is contiguous),
    so a transform may work in place; in native byte order, also from a big-endian file.

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
        _check_labels(self.grids, self.labels)
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
            "patch": _tensor(read_patch(self.volumes[v].array, grid, start)),
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
    return read_patch(labels, lgrid, start)


def _epoch_word(tag: int, epoch: int) -> int:
    """The iteration ``tag`` and its epoch in one int64, written and read in one step."""
    return (tag << 32) | (epoch + 1)


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
    seed : int, optional
        Item ``i`` of epoch ``e`` is drawn from a generator of its own, seeded by
        ``(seed, e, i)``: the whole run (every epoch) is reproducible from this one seed, and
        the items are the same whatever the number of ``DataLoader`` workers (in the same
        order with ``batch_size=None``). Without a seed, each epoch takes its seed from torch,
        as torch's own random transforms do: ``torch.manual_seed`` (or the ``DataLoader``'s
        ``generator=``) makes the run reproducible, and each epoch draws anew.
    axes, edge, pad_mode, pad_value
        As for :func:`sample`; ``edge="pad"`` by default, so centres may fall anywhere.

    Notes
    -----
    Volumes are chosen in proportion to their number of voxels. Items are dicts as for
    :class:`PatchDataset`, tensors of their own, in native byte order.

    The epoch advances each time an iteration starts, over this dataset and the copies of it
    in ``DataLoader`` workers, persistent or not: the workers share a counter in shared memory
    and tell a new epoch by the seed the loader gives them each epoch. :meth:`set_epoch` sets
    the next epoch, to resume a run (calling it before every epoch, as for torch's
    ``DistributedSampler``, gives the same draws). Run one iteration at a time: two at once
    share the counter. A loader that gives its workers the same seed every epoch (its
    ``generator=`` seeded anew before each) cannot be told from one epoch: call
    :meth:`set_epoch` then. Worker ``w`` of ``n`` draws items ``w, w + n, ...``. Give each
    process of a distributed run its own seed.

    There is no ``ds[i]``: iterate, or use :class:`PatchDataset` for indexed patches.

    Examples
    --------
    >>> import numpy as np
    >>> import patchgrid as pg
    >>> ds = pg.RandomPatchDataset(np.zeros((20, 20)), size=4, length=3, seed=0)
    >>> first, second = [[item["start"].tolist() for item in ds] for epoch in range(2)]
    >>> len(first), first != second  # a new draw every epoch
    (3, True)
    >>> ds.set_epoch(0)
    >>> [item["start"].tolist() for item in ds] == first  # the same seed and epoch: the same
    True
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
        seed: int | None = None,
        axes: Any = None,
        edge: str = "pad",
        pad_mode: str = "constant",
        pad_value: Any = 0,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.volumes, self.labels = _volumes_and_labels(volumes, labels)
        if (pos is not None or neg is not None) and self.labels is None:
            raise PatchgridError("pos and neg weight the draw by labels; give labels= too")
        self.size, self.length = size, _checks.as_int(length, "length")
        if self.length < 1:
            raise PatchgridError(f"length must be at least 1, got {length}")
        self.seed = None if seed is None else _checks.as_int(seed, "seed")
        if self.seed is not None and self.seed < 0:
            raise PatchgridError(f"seed must be a non-negative integer, got {seed}")
        self.grids = [PatchGrid(v.shape, size, axes=axes, edge="pad") for v in self.volumes]
        _check_labels(self.grids, self.labels)
        self.pos = 1.0 if pos is None else pos
        self.neg = 1.0 if neg is None else neg
        self.weighted = pos is not None or neg is not None
        self.kw = dict(axes=axes, edge=edge, pad_mode=pad_mode, pad_value=pad_value)
        self.transform = transform
        self._weights: dict[int, Any] = {}
        # The last iteration's tag and epoch, shared with the DataLoader's worker processes.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._iterations = 0  # iterations started on this copy (a persistent worker's count)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: Any) -> dict[str, Any]:
        raise TypeError(
            "RandomPatchDataset draws its patches as it is iterated and cannot be indexed: "
            "iterate over it (for item in dataset), or use PatchDataset for indexed patches"
        )

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch`` (and the ones after it ``epoch + 1``, ...)."""
        epoch = _checks.as_int(epoch, "epoch")
        if not 0 <= epoch < 1 << 31:
            raise PatchgridError(f"epoch must be in [0, 2**31), got {epoch}")
        self._epoch[0] = _epoch_word(0, epoch - 1)

    def _weight_map(self, v: int) -> Any:
        if not self.weighted or self.labels is None:
            return None
        if v not in self._weights:
            self._weights[v] = label_weights(self.labels[v].array, self.pos, self.neg)
        return self._weights[v]

    def _start_epoch(self) -> tuple[int, int, int, int]:
        """``(seed, epoch, worker, workers)`` for the iteration that starts now.

        In the main process every iteration is a new epoch. A worker tags its iteration with
        the loader's seed for this epoch and its own count of iterations (which advances in a
        persistent worker): the first worker of an epoch finds another tag and advances the
        epoch, the others find their own and join it.
        """
        info = get_worker_info()
        word = int(self._epoch[0])
        last = (word & 0xFFFFFFFF) - 1
        if info is None:
            worker, workers, epoch = 0, 1, last + 1
            self._epoch[0] = _epoch_word(0, epoch)
            base = 0 if self.seed is not None else int(torch.empty((), dtype=torch.int64).random_())
        else:
            worker, workers = int(info.id), int(info.num_workers)
            base = int(info.seed) - worker
            tag = hash((base, self._iterations)) & 0x7FFFFFFF or 1
            if word >> 32 == tag:
                epoch = last
            else:
                epoch = last + 1
                self._epoch[0] = _epoch_word(tag, epoch)
        self._iterations += 1
        return (base if self.seed is None else self.seed), epoch, worker, workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._draw(*self._start_epoch())

    def _draw(self, seed: int, epoch: int, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        sizes = np.array([np.prod(v.shape) for v in self.volumes], dtype=np.float64)
        for i in range(worker, self.length, workers):
            gen = np.random.default_rng(np.random.SeedSequence([seed, epoch, i]))
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
                item["label"] = _tensor(_read_label(self.labels[v].array, self.grids[v], starts[0]))
            yield self.transform(item) if self.transform is not None else item
