"""Layer L3: runs of ``apply`` into a zarr array that resume after a crash, or split in shards.

What lives here: :func:`part`, which settles ``resume=`` and ``shard=`` against ``out=`` once
(the rows of the output along its first tiled axis that this run writes, where a resumed run
starts, and the record it keeps), and :class:`Rows`, the output as that run writes it: writes
outside its rows are dropped, and each time the rows written reach a whole row of chunks, the
record in the store says so (a small JSON file in the array's folder, replaced atomically
after the chunks' data is written).

A part of the output is computed from every patch that reaches it, in grid order, so its
voxels are bit for bit those of one uninterrupted run; the patches of a part that reach
another part's rows are run by both (reported as recomputed at shard borders).

Imports: NumPy, the standard library, the L0 modules ``_checks``, ``_memory``, ``_progress``
and ``grid``, ``io`` (L1) and the L2 modules ``_batches`` and ``_merge``; zarr through ``io``.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, NamedTuple

import numpy as np

from . import _memory, io
from ._batches import Batches
from ._checks import PatchgridError
from ._merge import DiskMerger
from ._progress import steps
from .grid import PatchGrid

RECORD = "patchgrid-progress{}.json"


class Part(NamedTuple):
    """The rows ``[lo, hi)`` of the output along axis ``axis`` that a run writes, the row it
    starts from (``start``: ``lo``, or where a resumed run left off), the chunk height along
    that axis, and the record's path and settings."""

    axis: int
    lo: int
    hi: int
    start: int
    chunk: int
    record: str
    settings: dict[str, Any]


def _folder(out: Any) -> str:
    """The folder of a zarr array in a local store, where the record lives."""
    store, path = getattr(out, "store", None), getattr(out, "path", None)
    root = getattr(store, "root", None)
    if root is None or path is None or not hasattr(out, "chunks"):
        raise PatchgridError(
            f"resume= and shard= need out= a zarr array in a folder (zarr.open_array('x.zarr', "
            f"...)), which records the rows it finished; got {type(out).__name__}"
        )
    return os.path.normpath(os.path.join(os.fspath(root), str(path)))


def part(out: Any, axis: int, resume: bool, shard: Any, settings: dict[str, Any]) -> Part:
    """The part of ``out`` this run writes: shard ``i`` of ``n`` owns whole rows of chunks
    ``[i K / n, (i + 1) K / n)`` of the ``K`` along ``axis`` (the first tiled axis); with
    ``resume``, the run starts at the first row of chunks its record does not hold."""
    folder = _folder(out)
    i, n = _shard(shard)
    length, chunk = int(out.shape[axis]), int(out.chunks[axis])
    rows = math.ceil(length / chunk)
    lo, hi = min(i * rows // n * chunk, length), min((i + 1) * rows // n * chunk, length)
    name = RECORD.format("" if n == 1 else f"-shard-{i}-of-{n}")
    record = os.path.join(folder, name)
    settings = {**settings, "out": [list(map(int, out.shape)), str(out.dtype)], "shard": [i, n]}
    start = lo
    if resume and os.path.exists(record):  # else a first run: from the start
        with open(record) as f:
            kept = json.load(f)
        now = json.loads(json.dumps(settings))  # as the record holds it (lists, not tuples)
        if kept.get("settings") != now:
            diff = sorted(k for k in now if kept.get("settings", {}).get(k) != now[k])
            raise PatchgridError(
                f"cannot resume {folder}: it was written by a run with other settings "
                f"({', '.join(diff)} differ); resume with the same settings, or write a new output"
            )
        start = max(lo, min(int(kept["rows_done"]), hi))
    return Part(axis, lo, hi, start, chunk, record, settings)


def _shard(shard: Any) -> tuple[int, int]:
    if shard is None:
        return 0, 1
    try:
        i, n = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise PatchgridError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}") from None
    if not 0 <= i < n:
        raise PatchgridError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
    return i, n


def patches(grid: PatchGrid, lo: int, hi: int) -> np.ndarray:
    """Whether each patch of ``grid`` (of the output) reaches rows ``[lo, hi)`` of its first
    tiled axis: one bool per patch, in grid order."""
    starts = grid.axis_starts(0)
    rows = (starts < hi) & (starts + grid.size[0] > lo)
    rest = math.prod(grid.counts[1:])
    return np.repeat(rows, rest)


class Rows:
    """``out`` as a part of a run writes it: rows ``[start, hi)`` along ``axis`` go through,
    others are dropped; rows written in order from ``start`` are recorded each time they fill a
    row of chunks (after the data), so a resumed run starts there."""

    def __init__(self, out: Any, p: Part) -> None:
        self.out, self.p = out, p
        self.shape, self.dtype = tuple(out.shape), out.dtype
        self.chunks = tuple(out.chunks)
        self._upto = p.start  # rows written without a gap from the start
        self._done = p.start  # rows recorded as done

    def __getitem__(self, key: Any) -> Any:
        return self.out[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        a, p = self.p.axis, self.p
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (len(self.shape) - len(key))
        sl = key[a]
        lo, hi, _ = sl.indices(self.shape[a]) if isinstance(sl, slice) else (sl, sl + 1, 1)
        keep_lo, keep_hi = max(lo, p.start), min(hi, p.hi)
        if keep_hi <= keep_lo:
            return
        value = np.asarray(value) if not hasattr(value, "shape") else value
        if value.shape != () and len(getattr(value, "shape", ())) == len(self.shape):
            cut: list[Any] = [slice(None)] * len(self.shape)
            cut[a] = slice(keep_lo - lo, keep_hi - lo)
            value = value[tuple(cut)]
        where = list(key)
        where[a] = slice(keep_lo, keep_hi)
        self.out[tuple(where)] = value
        if keep_lo <= self._upto < keep_hi or keep_lo == self._upto:
            self._upto = max(self._upto, keep_hi)
            self._record()

    def _record(self) -> None:
        """Say in the record how far whole rows of chunks are written (atomically)."""
        p = self.p
        done = self._upto if self._upto >= p.hi else self._upto // p.chunk * p.chunk
        if done <= self._done:
            return
        self._done = done
        tmp = f"{p.record}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"settings": p.settings, "rows_done": done, "rows": [p.lo, p.hi]}, f)
        os.replace(tmp, p.record)


def run_part(batches: Batches, out_grid: PatchGrid, out: Any, merge_kw: dict[str, Any],
              progress: Any, keep: np.ndarray | None, more: dict[str, Any], resume: bool,
              shard: Any) -> Any:  # fmt: skip
    """A run that writes part of ``out`` (a shard, or what a resumed run has left): the patches
    that reach its rows, the others counted as added (:meth:`Merger.skip`), writes outside
    its rows dropped, and each whole row of chunks recorded in the store once written."""
    if out is None:
        raise PatchgridError("resume= and shard= need out= (a zarr array in a folder)")
    a0, n_out = out_grid.axes[0], len(out.shape)
    axis = a0 + 1 if n_out == out_grid.ndim + 1 else a0  # behind an axis the model added
    if merge_kw["reduce"] == "argmax" and n_out == out_grid.ndim - 1:
        free = [a for a in range(out_grid.ndim) if a not in out_grid.axes]
        axis = a0 - (free[-1] < a0)  # the class axis is dropped
    window = merge_kw["window"]
    settings = {"grid": repr(out_grid), "reduce": merge_kw["reduce"],
                "fill": repr(merge_kw["fill"]), "dtype": repr(merge_kw["dtype"]),
                "window": window if window is None or isinstance(window, str) else "array",
                **more}  # fmt: skip
    p = part(out, axis, resume, shard, settings)
    if p.start > p.lo:
        # The two rows of chunks after the record may hold a write cut short: written anew,
        # whole (a chunk written whole is never read back).
        clear: list[Any] = [slice(None)] * n_out
        clear[axis] = slice(p.start, min(p.start + 2 * p.chunk, p.hi))
        out[tuple(clear)] = merge_kw["fill"]
    reach = patches(out_grid, p.start, p.hi)
    run = reach if keep is None else reach & keep
    ids = np.flatnonzero(run)
    step, close = steps(progress, len(ids), "patchgrid.apply")
    try:
        with batches.model_xp.no_grad(), _memory.bound(batches.image, out):
            # Rows wait for whole chunk rows (a chunk written in parts is read back each time),
            # then go to the part, which writes them and records them.
            sink = _memory.staged(Rows(out, p), axis)
            merger = DiskMerger(out_grid, out=sink, **merge_kw)
            merger.skip(np.flatnonzero(~reach))
            if len(ids):  # else every row of this part is written already
                batches.run(merger, ids, ids, step, True)
    finally:
        close()
    return out


MARK = "patchgrid-run.json"


def part_output(path: str, shape: tuple[int, ...], dtype: Any, spacing: Any, affine: Any) -> Any:
    """The zarr output of a run in parts (``patchgrid apply --resume`` or ``--shard``): made
    at ``path`` by the first part, with a mark that patchgrid made it, and opened by the others
    (at once or later). Anything else at ``path`` is refused, never written into."""
    zarr = io.need("zarr", "--resume and --shard")
    dtype = np.dtype(dtype)
    if not os.path.exists(path):
        try:
            out = zarr.create_array(path, shape=shape, dtype=dtype,
                                    chunks=io.chunks_for(shape, dtype))  # fmt: skip
        except (FileExistsError, getattr(zarr.errors, "ContainsArrayError", FileExistsError)):
            for _ in range(100):  # another part made it a moment ago: its mark follows
                if os.path.exists(os.path.join(path, MARK)):
                    break
                time.sleep(0.05)
        else:
            out.attrs.update(io.meta_attrs(spacing, affine))
            tmp = os.path.join(path, f"{MARK}.{os.getpid()}.tmp")
            with open(tmp, "w") as f:
                json.dump({"shape": list(shape), "dtype": str(dtype)}, f)
            os.replace(tmp, os.path.join(path, MARK))
            return out
    if not os.path.exists(os.path.join(path, MARK)):
        raise PatchgridError(
            f"{path} exists and was not made by a 'patchgrid apply --resume' or '--shard' run; "
            f"give another -o (patchgrid never writes into what it did not make)"
        )
    out = zarr.open_array(path, mode="r+")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise PatchgridError(
            f"{path} holds {tuple(out.shape)} {out.dtype}, this run makes {tuple(shape)} {dtype}: "
            f"resume with the same settings, or give another -o"
        )
    return out
