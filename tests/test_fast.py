"""The optional compiled overlap-add (numba) against the plain-loop reference and NumPy's path."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import patchgrid as pg
from patchgrid import _compiled, backends
from patchgrid.backends import WIDE
from reference import Layout, window_nd

pytest.importorskip("numba")

# The fixture only patches module constants and counts calls; counting by difference is safe
# across examples.
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
def compiled(monkeypatch):
    """Send every eligible merge, however small, through the kernel; count the calls."""
    monkeypatch.setattr(_compiled, "MIN_BYTES", 0)
    monkeypatch.setattr(_compiled, "LOAD_BYTES", 0)
    monkeypatch.setattr(_compiled, "MIN_ROW", 1)
    calls = _spy(monkeypatch, "overlap_add")
    planes = _spy(monkeypatch, "merge_planes")
    return _Both(calls, planes)


class _Both(list):
    """The calls of either merge kernel (the whole-grid one and the one by rows of patches)."""

    def __init__(self, *lists):
        super().__init__()
        self._lists = lists

    def __len__(self):
        return sum(len(x) for x in self._lists)


def _spy(monkeypatch, name):
    calls = []
    real = getattr(_compiled, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(_compiled, name, spy)
    return calls


@st.composite
def cases(draw):
    """Shapes whose tiled axes are the last k (1 to 3), with up to one axis carried whole."""
    k = draw(st.integers(1, 3))
    n_lead = draw(st.integers(0, 1))
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=n_lead, max_size=n_lead)))
    shape, size, stride, edge = [], [], [], []
    for _ in range(k):
        n = draw(st.integers(1, 14))
        p = draw(st.integers(1, n + 2))
        s = draw(st.integers(1, p + 3))
        edges = ["pad", "shift", "even"] + (["drop"] if n >= p else [])
        shape.append(n)
        size.append(p)
        stride.append(s)
        edge.append(draw(st.sampled_from(edges)))
    axes = tuple(range(n_lead, n_lead + k))
    return lead + tuple(shape), axes, tuple(size), tuple(stride), tuple(edge)


@SETTINGS
@given(
    case=cases(),
    dtype=st.sampled_from(["float32", "float64"]),
    window=st.sampled_from(["uniform", "gaussian", "hann"]),
    reduce=st.sampled_from(["mean", "sum"]),
    seed=st.integers(0, 2**16),
)
def test_compiled_merge_equals_the_loop(compiled, case, dtype, window, reduce, seed):
    shape, axes, size, stride, edge = case
    grid = pg.PatchGrid(shape, size, stride, axes=axes, edge=edge)
    layout = Layout(shape, axes, size, stride, edge)
    patches = np.random.default_rng(seed).standard_normal((len(grid), *grid.patch_shape))
    patches = patches.astype(dtype)
    weight = None if window == "uniform" else window_nd(window, size)
    shaped = None if weight is None else weight.reshape(
        [size[axes.index(a)] if a in axes else 1 for a in range(len(shape))]
    )  # fmt: skip
    expected, _ = layout.merge(patches.astype(np.float64), reduce, shaped, fill=-5.0)
    before = len(compiled)
    got = pg.merge(patches, grid, reduce=reduce, window=window, fill=-5.0)
    rtol = 1e-4 if dtype == "float32" else 1e-10
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol)
    assert got.dtype == np.dtype(dtype)
    padded = grid.padded_shape != grid.shape
    # float64 patches sum in extended precision, which the kernels do not have.
    served = not padded and (dtype == "float32" or not WIDE)
    assert (len(compiled) - before >= 1) if served else (len(compiled) == before)


def test_compiled_merge_restores_the_image_exactly_where_numpy_does(compiled):
    image = np.random.default_rng(1).random((20, 24, 28)).astype(np.float32)
    grid = pg.PatchGrid(image.shape, (8, 8, 16), (4, 4, 8), edge="shift")
    merged = pg.merge(pg.extract(image, grid), grid)
    assert len(compiled) == 1
    np.testing.assert_allclose(merged, image, rtol=1e-6)


def test_compiled_merge_writes_into_out(compiled):
    image = np.random.default_rng(2).random((12, 30)).astype(np.float32)
    grid = pg.PatchGrid(image.shape, 6, 3)
    out = np.full(image.shape, np.nan)  # float64: the accumulator of float32 patches
    merger = pg.Merger(grid, window="gaussian", out=out)
    merger.add_all(pg.extract(image, grid))
    assert merger.result() is out
    assert len(compiled) == 1
    np.testing.assert_allclose(out, image, rtol=1e-12)


def test_compiled_merge_fills_the_gaps(compiled):
    grid = pg.PatchGrid((10, 10), 2, 4)  # stride > size: rows and columns no patch covers
    patches = np.ones((len(grid), 2, 2), np.float32)
    merged = pg.merge(patches, grid, fill=7)
    covered = pg.coverage(grid) > 0
    assert len(compiled) == 1
    np.testing.assert_array_equal(merged[covered], 1)
    np.testing.assert_array_equal(merged[~covered], 7)


def test_numpy_path_serves_what_the_kernel_does_not(compiled):
    image = np.arange(4 * 10 * 12, dtype=np.float32).reshape(4, 10, 12)
    grid = pg.PatchGrid(image.shape, 4, 2, axes=(0, 1))  # the last axis is carried, not tiled
    merged = pg.merge(pg.extract(image, grid), grid)
    assert compiled == []
    np.testing.assert_allclose(merged, image[:, :10])


def test_no_kernel_without_numba(compiled, monkeypatch):
    monkeypatch.setattr(_compiled, "available", lambda: False)
    image = np.random.default_rng(3).random((16, 16)).astype(np.float32)
    grid = pg.PatchGrid(image.shape, 8, 4)
    merged = pg.merge(pg.extract(image, grid), grid)
    assert compiled == []
    np.testing.assert_allclose(merged, image, rtol=1e-6)


def test_large_merges_take_the_loaded_kernels():
    image = np.random.default_rng(4).random((128, 128, 128)).astype(np.float32)
    grid = pg.PatchGrid(image.shape, 32, 16)
    patches = pg.extract(image, grid, copy=True)
    assert _compiled.MIN_BYTES <= patches.nbytes < _compiled.LOAD_BYTES
    assert _compiled.warm()
    assert _compiled.serves(np.empty(image.shape, np.float32), patches, 3, (0, 1, 2))
    np.testing.assert_allclose(pg.merge(patches, grid, window="hann"), image, rtol=1e-5)


# The batch kernels: Merger.add (and so apply) on large patches, apply's reading of patches,
# and the division by the coverage once rows are finished.


@pytest.fixture
def batched(monkeypatch):
    """Send every eligible batch, however small, through the batch kernels; count the calls."""
    monkeypatch.setattr(_compiled, "MIN_BYTES", 0)
    monkeypatch.setattr(_compiled, "LOAD_BYTES", 0)
    monkeypatch.setattr(_compiled, "MIN_ROW", 1)
    monkeypatch.setattr(_compiled, "MIN_PATCH", 0)
    monkeypatch.setattr(_compiled, "MIN_DIVIDE", 0)
    _compiled.warm()  # loaded, so that the division takes its kernel too
    return {name: _spy(monkeypatch, name) for name in ("add_batch", "gather", "divide")}


@SETTINGS
@given(
    case=cases(),
    dtype=st.sampled_from(["float32", "float64"]),
    window=st.sampled_from(["uniform", "gaussian", "triangular"]),
    reduce=st.sampled_from(["mean", "sum"]),
    batch=st.integers(1, 7),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_batch_kernel_merges_as_the_loop(batched, case, dtype, window, reduce, batch, shuffle,
                                         seed):  # fmt: skip
    shape, axes, size, stride, edge = case
    grid = pg.PatchGrid(shape, size, stride, axes=axes, edge=edge)
    layout = Layout(shape, axes, size, stride, edge)
    rng = np.random.default_rng(seed)
    patches = rng.standard_normal((len(grid), *grid.patch_shape)).astype(dtype)
    weight = None if window == "uniform" else window_nd(window, size)
    shaped = None if weight is None else weight.reshape(
        [size[axes.index(a)] if a in axes else 1 for a in range(len(shape))]
    )  # fmt: skip
    expected, _ = layout.merge(patches.astype(np.float64), reduce, shaped, fill=-5.0)
    order = rng.permutation(len(grid)) if shuffle else np.arange(len(grid))
    before = len(batched["add_batch"])
    merger = pg.Merger(grid, reduce=reduce, window=window, fill=-5.0)
    for i in range(0, len(order), batch):
        ids = order[i : i + batch]
        merger.add(patches[ids], ids)  # patches of one batch may overlap
    got = merger.result()
    rtol = 1e-4 if dtype == "float32" else 1e-10
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol)
    assert got.dtype == np.dtype(dtype)
    # One call a batch at least (a batch in grid order reaching into the next row of patches
    # is added row by row).
    # float64 patches sum in extended precision, which the kernels do not have.
    if dtype == "float32" or not WIDE:
        assert len(batched["add_batch"]) - before >= -(-len(order) // batch)


def _merge_in_batches(image, grid, window):
    merger = pg.Merger(grid, window=window)
    patches = pg.extract(image, grid, flatten=True)
    for i in range(0, len(grid), 3):
        merger.add(patches[i : i + 3], np.arange(i, min(i + 3, len(grid))))
    return merger.result()


@pytest.mark.parametrize("window", ["uniform", "gaussian", "hann"])
def test_batch_kernels_round_as_numpy_does(batched, monkeypatch, window):
    image = np.random.default_rng(5).random((2, 20, 24, 28)).astype(np.float32)
    grid = pg.PatchGrid(image.shape, (8, 8, 16), (4, 4, 8), axes=(1, 2, 3), edge="shift")
    compiled = _merge_in_batches(image, grid, window)
    assert batched["add_batch"]
    assert batched["divide"]
    monkeypatch.setattr(_compiled, "available", lambda: False)
    monkeypatch.setattr(_compiled, "loaded", lambda: False)
    monkeypatch.setattr(backends, "torch_can", lambda *a: False)  # NumPy's own ufuncs
    plain = _merge_in_batches(image, grid, window)
    # The same products, sums and divisions in the same order: equal, not merely close.
    np.testing.assert_array_equal(compiled, plain)
    np.testing.assert_allclose(compiled, image, rtol=1e-6)


@pytest.mark.parametrize("edge", ["shift", "pad"])
@pytest.mark.parametrize("scale", [1, 2])
def test_apply_reads_and_merges_through_the_kernels(batched, monkeypatch, edge, scale):
    image = np.random.default_rng(6).random((1, 18, 21, 40)).astype(np.float32)

    def fn(b):
        b = np.concatenate([b, 1 - b], axis=1)
        for a in (2, 3, 4):
            b = np.repeat(b, scale, axis=a)
        return b

    kw = dict(axes=(1, 2, 3), edge=edge, scale=scale, batch_size=3, progress=False)
    got = pg.apply(fn, image, (6, 8, 16), (3, 4, 8), **kw)
    assert batched["add_batch"]
    assert bool(batched["gather"]) == (edge == "shift")  # padding is read by the gathers
    monkeypatch.setattr(_compiled, "available", lambda: False)
    monkeypatch.setattr(_compiled, "loaded", lambda: False)
    want = pg.apply(fn, image, (6, 8, 16), (3, 4, 8), **kw)
    # Close, not equal: without the kernels, torch (when loaded) may fuse multiply and add.
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    up = image
    for a in (1, 2, 3):
        up = np.repeat(up, scale, axis=a)
    np.testing.assert_allclose(got[0], up[0], rtol=1e-5)


def test_apply_keeps_a_model_that_keeps_its_batches(batched):
    image = np.random.default_rng(7).random((1, 12, 12, 32)).astype(np.float64)
    kept = []

    def fn(b):
        kept.append(b)
        return b

    got = pg.apply(fn, image, (4, 4, 16), (2, 2, 8), axes=(1, 2, 3), batch_size=2,
                   progress=False)  # fmt: skip
    assert batched["gather"]
    grid = pg.PatchGrid(image.shape, (4, 4, 16), (2, 2, 8), axes=(1, 2, 3), edge="shift")
    patches = np.concatenate(kept)
    np.testing.assert_array_equal(patches, pg.extract(image, grid, flatten=True))
    np.testing.assert_allclose(got, image, rtol=1e-12)


def test_cpu_tensors_take_the_kernels_on_their_own_memory(batched):
    torch = pytest.importorskip("torch")
    image = torch.rand(1, 16, 20, 32, dtype=torch.float64)
    got = pg.apply(lambda b: 2 * b, image, (8, 8, 16), (4, 4, 8), axes=(1, 2, 3),
                   progress=False)  # fmt: skip
    assert isinstance(got, torch.Tensor)
    assert got.dtype == torch.float64
    assert batched["gather"]
    assert batched["add_batch"]
    torch.testing.assert_close(got, 2 * image)


def test_tensors_that_need_grad_stay_with_torch(batched):
    torch = pytest.importorskip("torch")
    x = torch.ones(3, requires_grad=True)
    assert _compiled.host(x) is None
    assert _compiled.host(x.detach()) is not None
    assert _compiled.host(torch.ones(3, dtype=torch.int32)) is None  # floats only


def test_the_batch_kernels_need_a_large_job():
    image = np.zeros((1, 64, 64, 64), np.float32)
    batch = np.zeros((4, 1, 32, 32, 32), np.float32)
    assert batch.nbytes // 4 >= _compiled.MIN_PATCH
    assert _compiled.warm()
    # 27 such patches are 3.4 MiB: NumPy's job; 1,000 of them, the kernel's.
    assert not _compiled.serves_batch(image, batch, (1, 2, 3), 27)
    assert _compiled.serves_batch(image, batch, (1, 2, 3), 1000)


@settings(SETTINGS, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                          HealthCheck.too_slow])  # fmt: skip
@given(
    case=cases(),
    dtype=st.sampled_from(["float32", "float64"]),
    into=st.sampled_from(["copy", "out", "flat out", "offset out"]),
    seed=st.integers(0, 2**16),
)
def test_compiled_extract_cuts_as_the_loop(batched, case, dtype, into, seed):
    shape, axes, size, stride, edge = case
    grid = pg.PatchGrid(shape, size, stride, axes=axes, edge=edge)
    image = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    expected = Layout(shape, axes, size, stride, edge).extract(image)
    before = len(batched["gather"])
    if into == "copy":
        got = pg.extract(image, grid, copy=True)
    else:
        full = (*grid.counts, *grid.patch_shape)
        wanted = full if into == "out" else (len(grid), *grid.patch_shape)
        n = int(np.prod(wanted))
        # "offset out" starts 4 bytes into its memory: never 16-byte aligned, so the copy
        # takes the kernel's plain stores rather than its streaming ones.
        base = np.full(n + 1, np.nan, dtype)
        out = (base[1:] if into == "offset out" else base[:n]).reshape(wanted)
        got = pg.extract(image, grid, out=out)
        assert got is out
    np.testing.assert_array_equal(got.reshape(expected.shape), expected)
    assert len(batched["gather"]) - before == 1


def test_compiled_extract_casts_with_numpy_and_writes_strided_outs(batched):
    image = np.random.default_rng(8).random((20, 24, 32)).astype(np.float32)
    grid = pg.PatchGrid(image.shape, (8, 8, 16), (4, 4, 8), edge="shift")
    out = np.zeros((*grid.counts, *grid.patch_shape), np.float64)  # a cast: NumPy's job
    pg.extract(image, grid, out=out)
    assert batched["gather"] == []
    strided = np.zeros((len(grid) * 2, *grid.patch_shape), np.float32)[::2]
    pg.extract(image, grid, out=strided)  # the kernel, with plain stores
    assert len(batched["gather"]) == 1
    reference = Layout(image.shape, (0, 1, 2), grid.size, grid.stride, ("shift",) * 3)
    expected = reference.extract(image)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(strided, expected.reshape(strided.shape))


def test_fresh_outputs_are_plain_empty_arrays(monkeypatch):
    monkeypatch.setattr(_compiled, "PREFAULT_BYTES", 0)
    a = _compiled.fresh((3, 1000, 7), np.float32)  # mapped up front where the OS allows
    assert a.shape == (3, 1000, 7)
    assert a.dtype == np.float32
    assert a.flags.c_contiguous
    assert a.flags.writeable
    a[...] = 2.5
    assert float(a.sum()) == 2.5 * a.size


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("loaded", [False, True])
def test_out_of_core_work_never_loads_the_kernels(batched, monkeypatch, tmp_path, loaded, tiled):
    """Files bound the work, memory is the budget: an ``out`` on disk, in tiles or not, takes
    the kernels only if the process has loaded them."""
    if tiled:
        monkeypatch.setattr(pg.settings, "TILE_BYTES", 40_000)
    monkeypatch.setattr(_compiled, "loaded", lambda: loaded)
    image = np.random.default_rng(9).random((1, 16, 40, 48)).astype(np.float32)
    out = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float32,
                                    shape=image.shape)  # fmt: skip
    kw = dict(axes=(1, 2, 3), batch_size=3, progress=False)
    pg.apply(lambda b: 2 * b, image, (8, 8, 16), (4, 4, 8), out=out, **kw)
    assert bool(batched["add_batch"]) == loaded
    assert bool(batched["gather"]) == loaded
    np.testing.assert_allclose(out, 2 * image, rtol=1e-6)


# Loading the kernels costs a process more than a one-shot job of a few hundred MiB saves
# (benchmarks/bench_oneshot.py): each case below runs in a fresh process and reports whether
# numba was imported. Counted, not timed.

CHILD_PRELUDE = """
import json, sys
import numpy as np
import patchgrid as pg
from patchgrid import _compiled
def report(**kw):
    kw["numba"] = "numba" in sys.modules
    print(json.dumps(kw))
"""


def _child(code, tmp_path=None, **env):
    environ = {k: v for k, v in os.environ.items() if k != "PATCHGRID_NUMBA"}
    environ.update(env)
    done = subprocess.run([sys.executable, "-c", CHILD_PRELUDE + code], capture_output=True,
                          text=True, env=environ, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


# 128^3 float32, 32^3 patches, stride 16: 343 patches of 128 KiB, 43 MiB: a job every kernel
# takes once loaded (MIN_BYTES, MIN_PATCH), which loaded them before LOAD_BYTES.
SMALL_JOBS = """
v = np.random.default_rng(0).random((128, 128, 128), dtype=np.float32)
grid = pg.PatchGrid(v.shape, 32, 16)
view = pg.extract(v, grid)
assert _compiled.MIN_BYTES <= view.nbytes < _compiled.LOAD_BYTES
jobs = {
    "merge": lambda: pg.merge(view, grid),
    "merge gaussian": lambda: pg.merge(np.ascontiguousarray(view), grid, window="gaussian"),
    "extract copy": lambda: pg.extract(v, grid, copy=True).reshape(view.shape),
    "apply": lambda: pg.apply(lambda b: b, v, 32, 16, progress=False),
}
"""


@pytest.mark.parametrize("job", ["merge", "merge gaussian", "extract copy", "apply"])
def test_a_one_shot_job_under_load_bytes_never_loads_numba(job):
    got = _child(SMALL_JOBS + f"""
out = jobs[{job!r}]()
want = view if {job!r} == "extract copy" else v
report(equal=bool(np.allclose(out, want, rtol=1e-6, atol=0)), loaded=_compiled.loaded())
""")  # fmt: skip
    assert got == {"equal": True, "loaded": False, "numba": False}


def test_jobs_load_numba_once_the_work_done_without_reaches_load_bytes():
    got = _child(
        SMALL_JOBS
        + """
runs = []
for _ in range(-(-_compiled.LOAD_BYTES // view.nbytes) + 2):
    jobs["merge"]()
    runs.append(_compiled.loaded())
report(runs=runs, job=view.nbytes, load=_compiled.LOAD_BYTES)
"""
    )
    without = math.ceil(got["load"] / got["job"])  # merges whose sum reaches LOAD_BYTES
    assert got["runs"] == [False] * without + [True] * 2
    assert got["numba"]


LARGE_JOB = """
# 224^3 float32 (43 MiB), 64^3 patches, stride 16: 1,331 patches, 1.3 GiB of views.
v = np.random.default_rng(1).random((224, 224, 224), dtype=np.float32)
view = pg.extract(v, 64, 16)
assert view.nbytes >= _compiled.LOAD_BYTES
out = pg.merge(view, v.shape, stride=16)
report(equal=bool(np.allclose(out, v, rtol=1e-6, atol=0)), loaded=_compiled.loaded())
"""


def test_a_job_over_load_bytes_loads_numba():
    assert _child(LARGE_JOB) == {"equal": True, "loaded": True, "numba": True}


def test_patchgrid_numba_0_never_loads_numba():
    got = _child(LARGE_JOB, PATCHGRID_NUMBA="0")
    assert got == {"equal": True, "loaded": False, "numba": False}


def test_patchgrid_numba_1_loads_numba_for_the_first_job_it_serves():
    got = _child(SMALL_JOBS + """
jobs["merge"]()
report(loaded=_compiled.loaded())
""", PATCHGRID_NUMBA="1")  # fmt: skip
    assert got == {"loaded": True, "numba": True}


def test_the_command_line_never_loads_numba(tmp_path):
    got = _child("""
from patchgrid.cli import main
v = np.random.default_rng(2).random((128, 128, 128), dtype=np.float32)
np.save("v.npy", v)
codes = [main(["extract", "v.npy", "--size", "32", "--stride", "16", "-o", "p.zarr"],
              quiet=True),
         main(["merge", "p.zarr", "-o", "r.npy"], quiet=True)]
report(codes=codes, equal=bool(np.allclose(np.load("r.npy"), v, rtol=1e-6, atol=0)))
""", tmp_path)  # fmt: skip
    assert got == {"codes": [0, 0], "equal": True, "numba": False}
