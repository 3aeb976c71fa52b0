"""apply(resume=, shard=): runs that resume after a crash, and runs split across processes.

The reference is one uninterrupted ``apply`` into a zarr array of the same chunks; a resumed
or sharded run must give it bit for bit, and the model's calls show what was not redone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")

import patchgrid as pg  # noqa: E402

SHAPE, SIZE, STRIDE = (64, 40, 48), 12, 7


def _image():
    return np.random.default_rng(0).random(SHAPE).astype(np.float32)


def model(b):
    return np.sin(b * 3) * 2


def _out(path, shape=SHAPE, chunks=(8, 40, 48), dtype="float32"):
    return zarr.create_array(path, shape=shape, chunks=chunks, dtype=dtype)


def _reference(tmp_path, **kw):
    out = _out(tmp_path / "ref.zarr", **{k: v for k, v in kw.items() if k in ("shape", "dtype")})
    kw = {k: v for k, v in kw.items() if k not in ("shape", "dtype")}
    pg.apply(kw.pop("fn", model), _image(), SIZE, STRIDE, window="gaussian", out=out,
             progress=False, **kw)  # fmt: skip
    return out[...]


@pytest.mark.parametrize("n", [2, 3, 5])
def test_shards_in_any_order_give_the_one_process_result(tmp_path, n):
    want = _reference(tmp_path)
    out = _out(tmp_path / "s.zarr")
    calls = []

    def counted(b):
        calls.append(len(b))
        return model(b)

    for i in reversed(range(n)):
        pg.apply(counted, _image(), SIZE, STRIDE, window="gaussian", out=out, shard=(i, n),
                 progress=False)  # fmt: skip
    np.testing.assert_array_equal(out[...], want)
    # Patches that reach two shards' rows run in both; none runs more than twice here.
    total = len(pg.PatchGrid(SHAPE, SIZE, STRIDE))
    assert total <= sum(calls) <= 2 * total


def test_shards_with_labels_and_a_class_axis_the_model_adds(tmp_path):
    def three(b):
        return np.stack([b, 1 - b, np.sin(b * 5)], axis=1)

    want = _reference(tmp_path, fn=three, reduce="argmax", dtype="uint8")
    out = _out(tmp_path / "s.zarr", dtype="uint8")
    for i in range(3):
        pg.apply(three, _image(), SIZE, STRIDE, window="gaussian", reduce="argmax", out=out,
                 shard=(i, 3), progress=False)  # fmt: skip
    np.testing.assert_array_equal(out[...], want)


KILLED = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np, zarr, patchgrid as pg
    path, at = sys.argv[1], int(sys.argv[2])
    image = np.random.default_rng(0).random({shape}).astype(np.float32)
    out = zarr.open_array(path, mode="r+")
    calls = [0]

    def model(b):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)  # no clean-up of any kind
        return np.sin(b * 3) * 2

    pg.apply(model, image, {size}, {stride}, window="gaussian", out=out, resume=True,
             batch_size=4, progress=False)
    """
).format(shape=SHAPE, size=SIZE, stride=STRIDE)


@pytest.mark.parametrize("at", [3, 20, 41, 70])
def test_a_run_killed_at_any_moment_resumes_to_the_uninterrupted_result(tmp_path, at):
    want = _reference(tmp_path)
    path = tmp_path / "r.zarr"
    _out(path)
    script = tmp_path / "run.py"
    script.write_text(KILLED)
    proc = subprocess.run([sys.executable, str(script), str(path), str(at)], check=False)
    assert proc.returncode == -signal.SIGKILL
    record = path / "patchgrid-progress.json"
    done = json.loads(record.read_text())["rows_done"] if record.exists() else 0
    calls = []

    def counted(b):
        calls.append(len(b))
        return model(b)

    out = zarr.open_array(path, mode="r+")
    pg.apply(counted, _image(), SIZE, STRIDE, window="gaussian", out=out, resume=True,
             batch_size=4, progress=False)  # fmt: skip
    np.testing.assert_array_equal(out[...], want)
    grid = pg.PatchGrid(SHAPE, SIZE, STRIDE)
    reach = sum(
        1 for i in range(len(grid)) if grid.slices(i)[0].stop > done
    )  # the patches that reach a row not recorded as done
    assert sum(calls) == reach
    if at == 70:  # killed after half the patches: finished rows are not redone
        assert sum(calls) < 0.7 * len(grid)
    assert json.loads(record.read_text())["rows_done"] == SHAPE[0]


def test_a_resume_with_other_settings_is_refused(tmp_path):
    out = _out(tmp_path / "r.zarr")
    pg.apply(model, _image(), SIZE, STRIDE, window="gaussian", out=out, resume=True,
             progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"cannot resume .*other settings \(window differ\)"):
        pg.apply(model, _image(), SIZE, STRIDE, window="hann", out=out, resume=True)
    with pytest.raises(ValueError, match=r"other settings \(grid differ\)"):
        pg.apply(model, _image(), SIZE, 6, window="gaussian", out=out, resume=True)


def test_a_finished_run_resumed_does_nothing(tmp_path):
    out = _out(tmp_path / "r.zarr")
    pg.apply(model, _image(), SIZE, STRIDE, window="gaussian", out=out, resume=True,
             progress=False)  # fmt: skip

    def never(b):
        raise AssertionError("called")

    pg.apply(never, _image(), SIZE, STRIDE, window="gaussian", out=out, resume=True)
    np.testing.assert_array_equal(out[...], _reference(tmp_path))


def test_shards_resume_each_on_its_own(tmp_path):
    want = _reference(tmp_path)
    out = _out(tmp_path / "s.zarr")
    for i in range(2):
        pg.apply(model, _image(), SIZE, STRIDE, window="gaussian", out=out, shard=(i, 2),
                 resume=True, progress=False)  # fmt: skip
    assert set(os.listdir(tmp_path / "s.zarr")) >= {
        "patchgrid-progress-shard-0-of-2.json",
        "patchgrid-progress-shard-1-of-2.json",
    }
    np.testing.assert_array_equal(out[...], want)


def test_resume_and_shard_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match=r"need out= a zarr array in a folder"):
        pg.apply(model, _image(), SIZE, out=np.zeros(SHAPE, np.float32), resume=True)
    with pytest.raises(ValueError, match=r"need out="):
        pg.apply(model, _image(), SIZE, shard=(0, 2))
    out = _out(tmp_path / "s.zarr")
    with pytest.raises(ValueError, match=r"shard must be \(i, n\) with 0 <= i < n, got \(2, 2\)"):
        pg.apply(model, _image(), SIZE, out=out, shard=(2, 2))


def test_the_command_line_runs_in_parts_and_resumes(tmp_path, monkeypatch):
    import patchgrid.cli as pcli

    monkeypatch.chdir(tmp_path)
    np.save("vol.npy", _image())
    (tmp_path / "m.py").write_text(
        "import numpy as np\n\ndef run(b):\n    return np.sin(b * 3) * 2\n"
    )
    base = ["apply", "vol.npy", "--model", "m.py:run", "--size", str(SIZE), "--stride",
            str(STRIDE), "--window", "gaussian"]  # fmt: skip
    assert pcli.main([*base, "-o", "ref.zarr"], quiet=True) == 0
    want = zarr.open_array("ref.zarr")[...]
    for part in ("1/2", "0/2"):
        assert pcli.main([*base, "-o", "s.zarr", "--shard", part], quiet=True) == 0
    np.testing.assert_array_equal(zarr.open_array("s.zarr")[...], want)
    for _ in range(2):  # a finished run resumed does nothing more
        assert pcli.main([*base, "-o", "r.zarr", "--resume"], quiet=True) == 0
    np.testing.assert_array_equal(zarr.open_array("r.zarr")[...], want)
    with pytest.raises(ValueError, match="was not made by a 'patchgrid apply --resume'"):
        pcli.main([*base, "-o", "ref.zarr", "--resume"], quiet=True)
    with pytest.raises(ValueError, match=r"--resume and --shard write a \.zarr output"):
        pcli.main([*base, "-o", "r.npy", "--resume"], quiet=True)


def test_parts_of_a_scan_whose_model_adds_a_class_axis(tmp_path, monkeypatch):
    nib = pytest.importorskip("nibabel")
    import patchgrid.cli as pcli

    monkeypatch.chdir(tmp_path)
    nib.save(nib.Nifti1Image(_image(), np.diag([2.2, 1.0, 1.0, 1.0])), "scan.nii.gz")
    (tmp_path / "m.py").write_text(
        "import numpy as np\n\ndef run(b):\n    return np.stack([b, 1 - b], axis=1)\n"
    )
    base = ["apply", "scan.nii.gz", "--model", "m.py:run", "--size", str(SIZE), "--stride",
            str(STRIDE)]  # fmt: skip
    assert pcli.main([*base, "-o", "one.zarr"], quiet=True) == 0
    for part in ("0/3", "2/3", "1/3"):
        assert pcli.main([*base, "-o", "parts.zarr", "--shard", part], quiet=True) == 0
    one, parts = zarr.open_array("one.zarr")[...], zarr.open_array("parts.zarr")[...]
    assert one.shape == (2, *SHAPE)  # a zarr keeps the added axis in front, as pg.apply does
    np.testing.assert_array_equal(parts, one)


def test_a_dask_image_runs_in_parts_and_resumes(tmp_path):
    da = pytest.importorskip("dask.array")
    want = _reference(tmp_path)
    lazy = da.from_array(_image(), chunks=(16, 20, 24))
    out = _out(tmp_path / "d.zarr")
    for i in (1, 0):
        pg.apply(model, lazy, SIZE, STRIDE, window="gaussian", out=out, shard=(i, 2),
                 progress=False)  # fmt: skip
    np.testing.assert_array_equal(out[...], want)
    again = _out(tmp_path / "r.zarr")
    got = pg.apply(model, lazy, SIZE, STRIDE, window="gaussian", out=again, resume=True,
                   progress=False)  # fmt: skip
    assert got is again
    np.testing.assert_array_equal(again[...], want)
