"""pg.apply on a Dask array over a LocalCluster of 2 workers, against the in-memory path.

A float32 zarr volume on disk (1 GiB by default: 1024 x 512 x 512), 64^3 patches at stride 32,
gaussian window, batch 4, an identity model. For two chunk sizes and both ways of writing the
result (the lazy result's ``.to_zarr()``, and ``out=`` a zarr array that the tasks write):
wall time of the cluster path (read from zarr, apply, write to zarr) and of the in-memory path
on the same machine, the peak memory of each worker process, and the extra work at chunk
borders (patches run twice, partial sums passed between chunks). Every run is checked against
the in-memory result on a few regions.

    python benchmarks/bench_dask.py            # 1 GiB
    python benchmarks/bench_dask.py --quick    # 128 MiB
    python benchmarks/bench_dask.py --markdown results.md
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

from _memory import peak_rss

MiB = 1 << 20


def identity(batch: Any) -> Any:
    return batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 128 MiB volume")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    parser.add_argument("--shape", help="the volume as D,H,W (default 1024,512,512)")
    parser.add_argument(
        "--chunks", default="128,256", help="Dask chunk sides to run, comma-separated"
    )
    args = parser.parse_args(argv)

    import dask.array as da
    import zarr
    from dask.distributed import Client, LocalCluster

    import patchgrid as pg

    redundancy = importlib.import_module("patchgrid.dask").redundancy
    shape = (256, 256, 512) if args.quick else (1024, 512, 512)
    if args.shape:
        shape = tuple(int(v) for v in args.shape.split(","))
    tmp = tempfile.mkdtemp(prefix="pg-dask-bench-")
    rows = []
    try:
        src = zarr.open_array(os.path.join(tmp, "in.zarr"), mode="w", shape=shape,
                              dtype="float32", chunks=(64, 64, 64))  # fmt: skip
        rng = np.random.default_rng(0)
        for z in range(0, shape[0], 64):
            src[z : z + 64] = rng.random((64, *shape[1:]), dtype=np.float32)
        size_gib = np.prod(shape) * 4 / 2**30
        kw = dict(edge="shift", window="gaussian", batch_size=4, progress=False)

        # In memory, for the reference time and result; then with reading and writing zarr.
        t0 = time.perf_counter()
        volume = src[...]
        t_read = time.perf_counter() - t0
        t0 = time.perf_counter()
        want = pg.apply(identity, volume, 64, 32, **kw)
        t_mem = time.perf_counter() - t0
        del volume
        t0 = time.perf_counter()
        written = zarr.open_array(os.path.join(tmp, "want.zarr"), mode="w", shape=shape,
                                  dtype="float32", chunks=(64, 64, 64))  # fmt: skip
        written[...] = want
        t_io = t_mem + t_read + time.perf_counter() - t0
        shutil.rmtree(os.path.join(tmp, "want.zarr"), ignore_errors=True)
        rows.append(("in memory (NumPy)", "-", f"{t_mem:.1f} s", "1.00x",
                     f"{peak_rss() / MiB:.0f} (this process)", "0%", "0%"))  # fmt: skip
        rows.append(("in memory, reading and writing the zarr stores", "-", f"{t_io:.1f} s",
                     f"{t_io / t_mem:.2f}x", "-", "0%", "0%"))  # fmt: skip

        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=50)  # fmt: skip
        client = Client(cluster)
        grid = pg.PatchGrid(shape, 64, 32, edge="shift")
        for chunk in (int(c) for c in args.chunks.split(",")):
            # Each Dask chunk reads its zarr chunks itself: no rechunk tasks in the graph.
            lazy_in = da.from_zarr(src, chunks=(chunk, chunk, chunk))
            for how in ("to_zarr", "out="):
                out_path = os.path.join(tmp, f"out{chunk}{how[:3]}.zarr")
                client.run(_reset_peak)
                t0 = time.perf_counter()
                if how == "out=":
                    out = zarr.open_array(out_path, mode="w", shape=shape, dtype="float32",
                                          chunks=(64, 64, 64))  # fmt: skip
                    pg.apply(identity, lazy_in, 64, 32, out=out, **kw)
                else:
                    pg.apply(identity, lazy_in, 64, 32, **kw).to_zarr(out_path)
                t_dask = time.perf_counter() - t0
                peaks = client.run(_peak_mib)
                got = zarr.open_array(out_path, mode="r")
                for z in (0, shape[0] // 2, shape[0] - 8):
                    if not np.allclose(got[z : z + 8], want[z : z + 8], rtol=1e-5, atol=1e-6):
                        print(f"CORRECTNESS FAILURE: {how}, chunk {chunk}, rows {z}",
                              file=sys.stderr)  # fmt: skip
                        return 1
                shutil.rmtree(out_path, ignore_errors=True)  # a 2 GiB volume makes 2 GiB each
                extra = redundancy(grid, lazy_in.chunks, threads=2, out=how == "out=")
                chunk_mib = chunk**3 * 4 / MiB
                label = ("lazy result, .to_zarr()" if how == "to_zarr"
                         else "pg.apply(..., out=zarr)")  # fmt: skip
                rows.append((f"{label}, chunks {chunk}^3 ({chunk // 64}x patch)",
                             f"{chunk_mib:.0f} MiB", f"{t_dask:.1f} s", f"{t_dask / t_mem:.2f}x",
                             ", ".join(f"{p:.0f}" for p in peaks.values()),
                             f"{extra.calls:.1%}", f"{extra.sums:.1%}"))  # fmt: skip
        client.close()
        cluster.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        f"pg.apply on a {' x '.join(map(str, shape))} float32 zarr volume ({size_gib:.2f} GiB), "
        f"64^3 patches, stride 32, gaussian, batch 4; {datetime.date.today()}, "
        f"{os.cpu_count()} CPUs",
        "",
        "| path (2 workers) | chunk | wall time | vs in memory | peak RSS per worker (MiB) "
        "| repeated fn calls | partial sums passed on |",
        "|---|---|---|---|---|---|---|",
        *[f"| {' | '.join(r)} |" for r in rows],
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss() / MiB


if __name__ == "__main__":
    sys.exit(main())
