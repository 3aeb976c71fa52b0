"""The command line (issue #4, items 2 to 5): commands, bad input, atomic outputs, progress
bars and round trips through files.

Commands run in-process through ``patchgrid.cli.main`` (its exit code, with capsys), and as
``python -m patchgrid`` where what matters is what a user's terminal shows (no traceback).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tracemalloc
import warnings

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
tifffile = pytest.importorskip("tifffile")
zarr = pytest.importorskip("zarr")
h5py = pytest.importorskip("h5py")

from nibabel.testing import data_path  # noqa: E402

import patchgrid as pg  # noqa: E402
import patchgrid.cli as pcli  # noqa: E402
import patchgrid.io as pio  # noqa: E402
from patchgrid import _commands, _store  # noqa: E402
from patchgrid.cli import main  # noqa: E402

COMMANDS = ["info", "extract", "merge", "apply", "preview", "demo"]
ANATOMICAL = os.path.join(data_path, "anatomical.nii")  # (33, 41, 25) >i2, spacing 2 mm
EXAMPLE4D = os.path.join(data_path, "example4d.nii.gz")  # (128, 96, 24, 2) int16
SHAPE = (12, 16, 20)
SPACING = (2.0, 0.5, 0.25)
AFFINE = np.array(
    [
        [0.0, -0.5, 0.0, 10.0],
        [2.0, 0.0, 0.0, -3.0],
        [0.0, 0.0, 0.25, 7.5],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
MODELS = """
calls = [0]


def double(batch):
    return 2 * batch


def fails_on_third_batch(batch):
    calls[0] += 1
    if calls[0] == 3:
        raise ValueError("the model failed on its third batch")
    return batch


def crashes_on_third_batch(batch):
    calls[0] += 1
    if calls[0] == 3:
        raise RuntimeError("the model crashed on its third batch")
    return batch
"""


def cli(capsys, *argv):
    """Run the command line in-process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: --help, and usage errors
        code = 0 if exc.code is None else exc.code
    out, err = capsys.readouterr()
    return code, out, err


def cli_process(*argv, cwd):
    """Run ``python -m patchgrid`` in a fresh interpreter: (exit code, stdout, stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "patchgrid", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
    )
    return done.returncode, done.stdout, done.stderr


def error_lines(err):
    return [line for line in err.splitlines() if "error" in line.lower()]


def _volume(dtype="float32", shape=SHAPE, seed=0):
    return (np.random.default_rng(seed).random(shape) * 200).astype(dtype)


def _read(path):
    with pg.open(path) as img:
        return np.asarray(img)


def _snapshot(path):
    """Every file under ``path`` (or the file itself) with its bytes."""
    path = str(path)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return {"": f.read()}
    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                files[os.path.relpath(full, path)] = f.read()
    return files


@pytest.fixture
def nifti(tmp_path):
    """A float32 NIfTI volume with a non-diagonal affine."""
    path = tmp_path / "scan.nii.gz"
    pg.save(path, _volume(), affine=AFFINE, spacing=SPACING)
    return path


@pytest.fixture
def npy(tmp_path):
    path = tmp_path / "volume.npy"
    pg.save(path, _volume())
    return path


@pytest.fixture
def models(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    return path


@pytest.fixture
def store(tmp_path, nifti, capsys):
    """A patch store extracted from ``nifti`` with overlapping patches."""
    path = tmp_path / "patches.zarr"
    code, _, err = cli(
        capsys, "extract", nifti, "--size", 8, "--stride", 4, "--edge", "shift", "-o", path
    )
    assert code == 0, err
    return path


# ------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_zero(capsys, command):
    code, _, _ = cli(capsys, command, "--help")
    assert code == 0


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_an_example(capsys, command):
    _, out, _ = cli(capsys, command, "--help")
    assert "example" in out.lower()


def test_top_level_help_lists_every_command(capsys):
    code, out, _ = cli(capsys, "--help")
    assert code == 0
    assert all(command in out for command in COMMANDS)


def test_no_command_is_a_usage_error(capsys):
    code, _, err = cli(capsys)
    assert code != 0
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------- info


def test_info_shows_counts_and_number_of_patches(capsys, npy):
    code, out, _ = cli(capsys, "info", npy, "--size", 4, "--stride", 2)
    assert code == 0
    assert "counts (5, 7, 9), 315 patches" in out


def test_info_single_size_equals_per_axis_size(capsys, npy):
    _, one, _ = cli(capsys, "info", npy, "--size", 4, "--stride", 2)
    _, each, _ = cli(capsys, "info", npy, "--size", "4,4,4", "--stride", "2,2,2")
    assert one == each


def test_info_per_axis_size_and_stride(capsys, npy):
    _, out, _ = cli(capsys, "info", npy, "--size", "2,4,8", "--stride", "1,2,4")
    counts = pg.PatchGrid(SHAPE, (2, 4, 8), (1, 2, 4)).counts
    assert f"counts {counts}" in out


def test_info_edge_pad_reports_padding(capsys, npy):
    _, out, _ = cli(capsys, "info", npy, "--size", 5, "--edge", "pad")
    assert "3 voxels after axis 0" in out


def test_info_axes_keep_the_time_axis_whole(capsys):
    _, out, _ = cli(capsys, "info", EXAMPLE4D, "--size", "32,32,8", "--axes", "0,1,2")
    assert "36 patches of shape (32, 32, 8, 2)" in out


def test_info_shows_spacing(capsys):
    _, out, _ = cli(capsys, "info", ANATOMICAL, "--size", 8)
    assert "spacing (2.0, 2.0, 2.0)" in out


# ----------------------------------------------------------------------------------- extract


def test_extract_store_holds_patches_of_patch_shape(capsys, tmp_path, npy):
    cli(capsys, "extract", npy, "--size", "4,8,10", "-o", tmp_path / "p.zarr")
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    assert group["patches"].shape == (3 * 2 * 2, 4, 8, 10)


def test_extract_store_patches_equal_the_librarys(capsys, tmp_path, npy):
    cli(
        capsys,
        "extract",
        npy,
        "--size",
        8,
        "--stride",
        4,
        "--edge",
        "even",
        "-o",
        tmp_path / "p.zarr",
    )
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    expected = pg.extract(_volume(), 8, 4, edge="even", flatten=True)
    assert np.array_equal(group["patches"][...], expected)


def test_extract_store_starts_are_the_grids(capsys, tmp_path, npy):
    cli(
        capsys,
        "extract",
        npy,
        "--size",
        8,
        "--stride",
        4,
        "--edge",
        "shift",
        "-o",
        tmp_path / "p.zarr",
    )
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    starts = pg.PatchGrid(SHAPE, 8, 4, edge="shift").starts()
    assert np.array_equal(group["starts"][...], starts)


def test_extract_store_attrs_hold_the_grid(capsys, tmp_path, npy):
    cli(
        capsys,
        "extract",
        npy,
        "--size",
        "4,8,8",
        "--stride",
        "2,4,6",
        "--edge",
        "pad",
        "-o",
        tmp_path / "p.zarr",
    )
    grid = zarr.open_group(str(tmp_path / "p.zarr"), mode="r").attrs["patchgrid"]["grid"]
    assert (grid["shape"], grid["size"], grid["stride"], grid["edge"]) == (
        list(SHAPE),
        [4, 8, 8],
        [2, 4, 6],
        ["pad", "pad", "pad"],
    )


def test_extract_store_attrs_hold_the_sources_metadata(capsys, tmp_path, nifti):
    cli(capsys, "extract", nifti, "--size", 4, "-o", tmp_path / "p.zarr")
    source = zarr.open_group(str(tmp_path / "p.zarr"), mode="r").attrs["patchgrid"]["source"]
    assert source["spacing"] == list(SPACING)
    assert np.array_equal(source["affine"], AFFINE)


def test_merge_needs_nothing_but_the_store(capsys, tmp_path, nifti, store):
    os.remove(nifti)
    code, _, err = cli(capsys, "merge", store, "-o", tmp_path / "restored.nii.gz")
    assert code == 0, err
    with pg.open(tmp_path / "restored.nii.gz") as img:
        assert np.array_equal(img.affine, AFFINE)


def test_extract_prints_what_it_wrote(capsys, tmp_path, npy):
    code, out, _ = cli(capsys, "extract", npy, "--size", 4, "-o", tmp_path / "p.zarr")
    assert code == 0
    assert "patches (60, 4, 4, 4)" in out


FOLDER_FORMATS = [("nii", ".nii.gz"), ("tif", ".tif"), ("npy", ".npy")]


@pytest.mark.parametrize(("fmt", "suffix"), FOLDER_FORMATS, ids=[f[0] for f in FOLDER_FORMATS])
def test_extract_folder_names_files_by_position(capsys, tmp_path, npy, fmt, suffix):
    cli(capsys, "extract", npy, "--size", "6,8,10", "-o", f"{tmp_path / 'out'}/", "--format", fmt)
    expected = {
        f"patch_{i:03d}_{j:03d}_{k:03d}{suffix}"
        for i in range(2)
        for j in range(2)
        for k in range(2)
    }
    assert set(os.listdir(tmp_path / "out")) == expected | {"manifest.json"}


@pytest.mark.parametrize(("fmt", "suffix"), FOLDER_FORMATS, ids=[f[0] for f in FOLDER_FORMATS])
def test_extract_folder_patch_holds_its_region(capsys, tmp_path, npy, fmt, suffix):
    cli(capsys, "extract", npy, "--size", "6,8,10", "-o", f"{tmp_path / 'out'}/", "--format", fmt)
    patch = _read(tmp_path / "out" / f"patch_001_000_001{suffix}")
    assert np.array_equal(patch, _volume()[6:12, 0:8, 10:20])


def test_extract_folder_without_format_writes_npy(capsys, tmp_path, npy):
    cli(capsys, "extract", npy, "--size", "6,8,10", "-o", f"{tmp_path / 'out'}/")
    assert "patch_000_001_001.npy" in os.listdir(tmp_path / "out")


@pytest.mark.parametrize(("fmt", "suffix"), FOLDER_FORMATS[:2], ids=["nii", "tif"])
def test_extract_folder_patch_keeps_spacing(capsys, tmp_path, nifti, fmt, suffix):
    cli(capsys, "extract", nifti, "--size", 4, "-o", f"{tmp_path / 'out'}/", "--format", fmt)
    with pg.open(tmp_path / "out" / f"patch_001_002_003{suffix}") as img:
        assert img.spacing == SPACING


# anatomical.nii, size 16, edge pad: counts (3, 3, 2).
POSITIONS = [((0, 0, 0), "first"), ((1, 2, 1), "middle"), ((2, 2, 1), "last")]


@pytest.mark.parametrize(("pos", "_name"), POSITIONS, ids=[p[1] for p in POSITIONS])
def test_nifti_patch_origin_is_where_it_sits(capsys, tmp_path, pos, _name):
    cli(
        capsys,
        "extract",
        ANATOMICAL,
        "--size",
        16,
        "--edge",
        "pad",
        "-o",
        f"{tmp_path}/p/",
        "--format",
        "nii",
    )
    name = "patch_" + "_".join(f"{p:03d}" for p in pos) + ".nii.gz"
    start = [16 * p for p in pos]
    with pg.open(tmp_path / "p" / name) as patch, pg.open(ANATOMICAL) as source:
        assert np.allclose(patch.affine @ [0, 0, 0, 1], source.affine @ [*start, 1])


def test_nifti_patch_keeps_the_sources_orientation(capsys, tmp_path, nifti):
    cli(capsys, "extract", nifti, "--size", 4, "-o", f"{tmp_path}/p/", "--format", "nii")
    with pg.open(tmp_path / "p" / "patch_002_001_003.nii.gz") as patch:
        assert np.array_equal(patch.affine[:3, :3], AFFINE[:3, :3])


def test_nifti_patch_origin_with_a_rotated_affine(capsys, tmp_path, nifti):
    cli(capsys, "extract", nifti, "--size", 4, "-o", f"{tmp_path}/p/", "--format", "nii")
    with pg.open(tmp_path / "p" / "patch_002_001_003.nii.gz") as patch:
        assert np.allclose(patch.affine @ [0, 0, 0, 1], AFFINE @ [8, 4, 12, 1])


def test_nifti_patch_of_a_4d_scan_sits_at_its_start(capsys, tmp_path):
    cli(
        capsys,
        "extract",
        EXAMPLE4D,
        "--size",
        "32,32,8",
        "--axes",
        "0,1,2",
        "-o",
        f"{tmp_path}/p/",
        "--format",
        "nii",
    )
    with pg.open(tmp_path / "p" / "patch_003_001_002.nii.gz") as patch, pg.open(EXAMPLE4D) as src:
        assert patch.shape == (32, 32, 8, 2)
        assert np.allclose(patch.affine @ [0, 0, 0, 1], src.affine @ [96, 32, 16, 1])


@pytest.mark.parametrize("size", ["4", "4,4,4"])
def test_extract_accepts_one_size_or_one_per_axis(capsys, tmp_path, npy, size):
    cli(capsys, "extract", npy, "--size", size, "--stride", 4, "-o", tmp_path / "p.zarr")
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    assert group["patches"].shape == (3 * 4 * 5, 4, 4, 4)


# ------------------------------------------------------------------------------------- merge


MERGE_OUTPUTS = ["out.nii.gz", "out.nii", "out.tif", "out.zarr", "out.h5", "out.npy"]


@pytest.mark.parametrize("name", MERGE_OUTPUTS)
def test_merge_writes_each_format(capsys, tmp_path, store, name):
    code, _, err = cli(capsys, "merge", store, "-o", tmp_path / name)
    assert code == 0, err
    assert np.allclose(_read(tmp_path / name), _volume())


@pytest.mark.parametrize("name", [n for n in MERGE_OUTPUTS if n != "out.npy"])
def test_merge_keeps_the_sources_spacing(capsys, tmp_path, store, name):
    cli(capsys, "merge", store, "-o", tmp_path / name)
    with pg.open(tmp_path / name) as img:
        assert img.spacing == SPACING


@pytest.mark.parametrize("name", [n for n in MERGE_OUTPUTS if n != "out.npy"])
def test_merge_keeps_the_sources_affine(capsys, tmp_path, store, name):
    cli(capsys, "merge", store, "-o", tmp_path / name)
    with pg.open(tmp_path / name) as img:
        assert np.array_equal(img.affine, AFFINE)


def test_merge_into_a_named_h5_dataset(capsys, tmp_path, store):
    cli(capsys, "merge", store, "-o", f"{tmp_path / 'out.h5'}:volume")
    assert np.allclose(_read(f"{tmp_path / 'out.h5'}:volume"), _volume())


@pytest.mark.parametrize("window", ["gaussian", "hann", "triangular"])
def test_merge_with_a_window(capsys, tmp_path, store, window):
    cli(capsys, "merge", store, "-o", tmp_path / "out.npy", "--window", window)
    assert np.allclose(_read(tmp_path / "out.npy"), _volume(), atol=1e-5)


@pytest.mark.parametrize("reduce", ["max", "min"])
def test_merge_with_a_reduction(capsys, tmp_path, store, reduce):
    cli(capsys, "merge", store, "-o", tmp_path / "out.npy", "--reduce", reduce)
    assert np.array_equal(_read(tmp_path / "out.npy"), _volume())


def test_merge_prints_what_it_wrote(capsys, tmp_path, store):
    code, out, _ = cli(capsys, "merge", store, "-o", tmp_path / "out.npy")
    assert code == 0
    assert f"-> {tmp_path / 'out.npy'} {SHAPE}" in out


# ------------------------------------------------------------------------ round trips (item 5)


def _anatomical(tmp_path):
    return ANATOMICAL


def _example4d(tmp_path):
    return EXAMPLE4D


def _tiff(tmp_path):
    # Written by tifffile itself: ImageJ z spacing and x/y resolution tags, no patchgrid metadata.
    path = tmp_path / "stack.tif"
    tifffile.imwrite(
        path,
        _volume("uint8"),
        imagej=True,
        resolution=(1 / 0.25, 1 / 0.5),
        metadata={"spacing": 2.0, "unit": "um"},
    )
    return path


def _zarr(tmp_path):
    path = tmp_path / "volume.zarr"
    pg.save(path, _volume("float32"), spacing=SPACING, affine=AFFINE)
    return path


def _hdf5(tmp_path):
    path = tmp_path / "volume.h5"
    pg.save(f"{path}:raw", _volume("float64"), spacing=SPACING)
    return f"{path}:raw"


def _npy(tmp_path):
    path = tmp_path / "volume.npy"
    pg.save(path, _volume("int16"))
    return path


# (source, grid arguments, output name): tiles, stride == size, merged with the default window.
ROUND_TRIPS = [
    pytest.param(_anatomical, ["--size", 16, "--edge", "pad"], "out.nii.gz", id="nifti-3d-int16"),
    pytest.param(
        _example4d, ["--size", "32,32,8", "--axes", "0,1,2"], "out.nii.gz", id="nifti-4d-int16"
    ),
    pytest.param(_tiff, ["--size", "4,8,10"], "out.tif", id="tiff-uint8"),
    pytest.param(_zarr, ["--size", 5, "--edge", "pad"], "out.zarr", id="zarr-float32"),
    pytest.param(_hdf5, ["--size", "6,8,5"], "out.h5", id="hdf5-float64"),
    pytest.param(_npy, ["--size", 4], "out.npy", id="npy-int16"),
]


def _round_trip(capsys, tmp_path, make, grid_args, name, *merge_args):
    source = make(tmp_path)
    code, _, err = cli(capsys, "extract", source, *grid_args, "-o", tmp_path / "p.zarr")
    assert code == 0, err
    code, _, err = cli(capsys, "merge", tmp_path / "p.zarr", "-o", tmp_path / name, *merge_args)
    assert code == 0, err
    return source, tmp_path / name


@pytest.mark.parametrize(("make", "grid_args", "name"), ROUND_TRIPS)
def test_round_trip_gives_the_data_back_exactly(capsys, tmp_path, make, grid_args, name):
    source, out = _round_trip(capsys, tmp_path, make, grid_args, name)
    assert np.array_equal(_read(out), _read(source))


@pytest.mark.parametrize(("make", "grid_args", "name"), ROUND_TRIPS)
def test_round_trip_keeps_the_shape(capsys, tmp_path, make, grid_args, name):
    source, out = _round_trip(capsys, tmp_path, make, grid_args, name)
    with pg.open(out) as got, pg.open(source) as want:
        assert got.shape == want.shape


@pytest.mark.parametrize(("make", "grid_args", "name"), ROUND_TRIPS)
def test_round_trip_keeps_the_dtype(capsys, tmp_path, make, grid_args, name):
    source, out = _round_trip(capsys, tmp_path, make, grid_args, name)
    with pg.open(out) as got, pg.open(source) as want:
        # Byte order is the file's business (anatomical.nii is big-endian).
        assert got.dtype.newbyteorder("=") == want.dtype.newbyteorder("=")


@pytest.mark.parametrize(("make", "grid_args", "name"), ROUND_TRIPS)
def test_round_trip_keeps_the_spacing(capsys, tmp_path, make, grid_args, name):
    source, out = _round_trip(capsys, tmp_path, make, grid_args, name)
    with pg.open(out) as got, pg.open(source) as want:
        assert got.spacing == want.spacing


@pytest.mark.parametrize(("make", "grid_args", "name"), ROUND_TRIPS)
def test_round_trip_keeps_the_affine(capsys, tmp_path, make, grid_args, name):
    source, out = _round_trip(capsys, tmp_path, make, grid_args, name)
    with pg.open(out) as got, pg.open(source) as want:
        assert (got.affine is None) == (want.affine is None)
        assert want.affine is None or np.array_equal(got.affine, want.affine)


def test_round_trip_tiff_keeps_the_resolution_tags(capsys, tmp_path):
    source, out = _round_trip(capsys, tmp_path, _tiff, ["--size", "4,8,10"], "out.tif")
    with tifffile.TiffFile(out) as got, tifffile.TiffFile(source) as want:
        tags = [
            (t.pages[0].tags["XResolution"].value, t.pages[0].tags["YResolution"].value)
            for t in (got, want)
        ]
    assert tags[0] == tags[1]


OVERLAPS = [
    pytest.param(_anatomical, "out.nii.gz", id="nifti"),
    pytest.param(_zarr, "out.zarr", id="zarr"),
    pytest.param(_hdf5, "out.h5", id="hdf5"),
]


@pytest.mark.parametrize(("make", "name"), OVERLAPS)
@pytest.mark.parametrize("window", ["uniform", "gaussian"])
def test_round_trip_with_overlapping_patches(capsys, tmp_path, make, name, window):
    grid_args = ["--size", 8, "--stride", 5, "--edge", "shift"]
    source, out = _round_trip(capsys, tmp_path, make, grid_args, name, "--window", window)
    assert np.allclose(_read(out), _read(source))


# ------------------------------------------------------------------------------------- apply


@pytest.mark.parametrize("name", ["out.nii.gz", "out.zarr", "out.h5", "out.tif", "out.npy"])
def test_apply_runs_the_model_over_the_image(capsys, tmp_path, nifti, models, name):
    code, _, err = cli(
        capsys,
        "apply",
        nifti,
        "--model",
        f"{models}:double",
        "--size",
        8,
        "--stride",
        4,
        "-o",
        tmp_path / name,
    )
    assert code == 0, err
    assert np.allclose(_read(tmp_path / name), 2 * _volume())


def test_apply_output_keeps_spacing_and_affine(capsys, tmp_path, nifti, models):
    cli(
        capsys,
        "apply",
        nifti,
        "--model",
        f"{models}:double",
        "--size",
        8,
        "-o",
        tmp_path / "out.nii.gz",
    )
    with pg.open(tmp_path / "out.nii.gz") as img:
        assert img.spacing == SPACING
        assert np.array_equal(img.affine, AFFINE)


def test_apply_with_an_importable_module(capsys, tmp_path, nifti, models, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "models", raising=False)
    code, _, err = cli(
        capsys, "apply", nifti, "--model", "models:double", "--size", 8, "-o", tmp_path / "out.npy"
    )
    assert code == 0, err
    assert np.allclose(_read(tmp_path / "out.npy"), 2 * _volume())


def test_apply_over_the_4d_sample_keeps_time_whole(capsys, tmp_path, models):
    code, _, err = cli(
        capsys,
        "apply",
        EXAMPLE4D,
        "--model",
        f"{models}:double",
        "--size",
        "64,48,12",
        "--axes",
        "0,1,2",
        "-o",
        tmp_path / "out.npy",
    )
    assert code == 0, err
    assert np.allclose(_read(tmp_path / "out.npy"), 2 * _read(EXAMPLE4D))


BAD_MODELS = [
    pytest.param("{models}:missing", "has no function 'missing'", id="no-such-function"),
    pytest.param("{models}", "must look like module:function", id="no-colon"),
    pytest.param("{tmp}/nowhere.py:double", "no such model file", id="no-such-file"),
    pytest.param("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'", id="no-module"),
]


@pytest.mark.parametrize(("spec", "message"), BAD_MODELS)
def test_apply_bad_model(capsys, tmp_path, nifti, models, spec, message):
    spec = spec.format(models=models, tmp=tmp_path)
    code, _, err = cli(
        capsys, "apply", nifti, "--model", spec, "--size", 8, "-o", tmp_path / "out.npy"
    )
    assert code != 0
    assert len(error_lines(err)) == 1
    assert message in err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------------- preview

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(capsys, tmp_path, image, *args):
    code, _, err = cli(capsys, "preview", image, *args, "-o", tmp_path / "grid.png")
    assert code == 0, err
    return (tmp_path / "grid.png").read_bytes()


def test_preview_writes_a_png_of_a_volume(capsys, tmp_path, nifti):
    data = _png(capsys, tmp_path, nifti, "--size", 8, "--stride", 4)
    assert data.startswith(PNG_MAGIC)


def test_preview_writes_a_png_of_an_image(capsys, tmp_path):
    pg.save(tmp_path / "plane.npy", _volume(shape=(20, 30)))
    data = _png(capsys, tmp_path, tmp_path / "plane.npy", "--size", 8, "--stride", 6)
    assert data.startswith(PNG_MAGIC)


def test_preview_writes_a_png_of_a_4d_scan(capsys, tmp_path):
    data = _png(
        capsys,
        tmp_path,
        EXAMPLE4D,
        "--size",
        "32,32,8",
        "--stride",
        "24,24,6",
        "--axes",
        "0,1,2",
        "--edge",
        "shift",
    )
    assert data.startswith(PNG_MAGIC)


def test_preview_rejects_other_picture_formats(capsys, tmp_path, nifti):
    code, _, err = cli(capsys, "preview", nifti, "--size", 8, "-o", tmp_path / "grid.jpg")
    assert code != 0
    assert "must be a .png" in err
    assert os.listdir(tmp_path) == ["scan.nii.gz"]


# -------------------------------------------------------------------------------------- demo


def test_demo_succeeds(capsys, tmp_path):
    code, _, err = cli(capsys, "demo", "--dir", tmp_path / "demo", "--shape", "8,10,12")
    assert code == 0, err


def test_demo_says_what_it_did(capsys, tmp_path):
    _, out, _ = cli(capsys, "demo", "--dir", tmp_path / "demo")
    assert "patches.shape = (4, 9, 14, 4, 4, 4)" in out
    assert "round trip: exact" in out


def test_demo_writes_its_files(capsys, tmp_path):
    cli(capsys, "demo", "--dir", tmp_path / "demo", "--shape", "8,10,12")
    assert set(os.listdir(tmp_path / "demo")) == {
        "volume.nii.gz",
        "patches.zarr",
        "restored.nii.gz",
        "grid.png",
    }


def test_demo_files_are_consistent(capsys, tmp_path):
    cli(
        capsys, "demo", "--dir", tmp_path / "demo", "--shape", "8,12,16", "--size", 4, "--stride", 4
    )
    volume = _read(tmp_path / "demo" / "volume.nii.gz")
    assert np.allclose(_read(tmp_path / "demo" / "restored.nii.gz"), volume)


# ------------------------------------------------------------------------ bad input (item 3)


def _garbage(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not an image " * 10)
    return path


def _folder(tmp_path, name):
    path = tmp_path / name
    path.mkdir()
    return path


def _good(tmp_path):
    path = tmp_path / "good.npy"
    pg.save(path, _volume(shape=(8, 8, 8)))
    return path


# (build the arguments from tmp_path, words the error line must hold)
BAD_INPUT = [
    pytest.param(
        lambda t: ["info", t / "missing.nii.gz", "--size", 4], "no such file", id="missing-file"
    ),
    pytest.param(
        lambda t: ["extract", t / "missing.npy", "--size", 4, "-o", t / "p.zarr"],
        "no such file",
        id="extract-missing-file",
    ),
    pytest.param(
        lambda t: ["info", _garbage(t, "bad.nii.gz"), "--size", 4],
        "cannot read",
        id="corrupt-nifti",
    ),
    pytest.param(
        lambda t: ["info", _garbage(t, "bad.tif"), "--size", 4], "cannot read", id="corrupt-tiff"
    ),
    pytest.param(
        lambda t: ["info", _garbage(t, "bad.h5"), "--size", 4], "cannot read", id="corrupt-hdf5"
    ),
    pytest.param(
        lambda t: ["info", _garbage(t, "bad.npy"), "--size", 4], "cannot read", id="corrupt-npy"
    ),
    pytest.param(
        lambda t: ["info", _folder(t, "dir.npy"), "--size", 4], "cannot read", id="folder-not-file"
    ),
    pytest.param(
        lambda t: ["info", _garbage(t, "scan.png"), "--size", 4], "format", id="unknown-extension"
    ),
    pytest.param(lambda t: ["info", _good(t), "--size", 0], "size", id="size-zero"),
    pytest.param(lambda t: ["info", _good(t), "--size", -2], "size", id="size-negative"),
    pytest.param(lambda t: ["info", _good(t), "--size", "four"], "size", id="size-word"),
    pytest.param(lambda t: ["info", _good(t), "--size", "4,x"], "size", id="size-list-word"),
    pytest.param(lambda t: ["info", _good(t), "--size", "4,4,4,4"], "size", id="size-too-long"),
    pytest.param(
        lambda t: ["info", _good(t), "--size", 20, "--edge", "drop"], "size", id="size-too-large"
    ),
    pytest.param(
        lambda t: ["info", _good(t), "--size", 4, "--stride", 0], "stride", id="stride-zero"
    ),
    pytest.param(
        lambda t: ["info", _good(t), "--size", 4, "--stride", "2.5"], "stride", id="stride-fraction"
    ),
    pytest.param(
        lambda t: ["info", _good(t), "--size", 4, "--axes", 5], "axes", id="axis-out-of-range"
    ),
    pytest.param(
        lambda t: ["info", _good(t), "--size", 4, "--axes", "0,0"], "axes", id="axis-repeated"
    ),
    pytest.param(
        lambda t: ["info", _good(t), "--size", 4, "--edge", "wrap"], "edge", id="edge-unknown"
    ),
    pytest.param(
        lambda t: ["extract", _good(t), "--size", 4, "--edge", "fold", "-o", t / "p.zarr"],
        "edge",
        id="extract-edge-unknown",
    ),
    pytest.param(
        lambda t: ["extract", _good(t), "--size", 4, "-o", t / "p.txt"],
        "-o",
        id="extract-output-not-zarr",
    ),
    pytest.param(
        lambda t: ["merge", _good(t), "-o", t / "out.npy"],
        "not a patch store",
        id="merge-not-a-store",
    ),
    pytest.param(
        lambda t: ["merge", t / "missing.zarr", "-o", t / "out.npy"],
        "no such",
        id="merge-missing-store",
    ),
    pytest.param(
        lambda t: ["extract", _good(t), "--size", 4, "-o", t / "no" / "p.zarr"],
        "does not exist",
        id="output-folder-missing",
    ),
]


@pytest.mark.parametrize(("make_args", "words"), BAD_INPUT)
def test_bad_input_exits_non_zero(capsys, tmp_path, make_args, words):
    code, _, _ = cli(capsys, *make_args(tmp_path))
    assert code != 0


@pytest.mark.parametrize(("make_args", "words"), BAD_INPUT)
def test_bad_input_gives_one_clear_line(capsys, tmp_path, make_args, words):
    _, _, err = cli(capsys, *make_args(tmp_path))
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert words in lines[0]


@pytest.mark.parametrize(("make_args", "words"), BAD_INPUT)
def test_bad_input_writes_nothing(capsys, tmp_path, make_args, words):
    args = make_args(tmp_path)
    before = set(os.listdir(tmp_path))
    cli(capsys, *args)
    assert set(os.listdir(tmp_path)) == before


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root reads files whatever their permissions",
)
def test_unreadable_file(capsys, tmp_path):
    path = _good(tmp_path)
    path.chmod(0)
    code, _, err = cli(capsys, "info", path, "--size", 4)
    assert code != 0
    assert "Traceback" not in err
    assert len(error_lines(err)) == 1


PROCESS_CASES = [
    pytest.param(lambda t: ["info", t / "missing.nii.gz", "--size", 4], id="missing-file"),
    pytest.param(lambda t: ["info", _garbage(t, "bad.nii.gz"), "--size", 4], id="corrupt"),
    pytest.param(lambda t: ["info", _garbage(t, "bad.xyz"), "--size", 4], id="unknown-extension"),
    pytest.param(lambda t: ["info", _good(t), "--size", "4,x"], id="bad-size"),
    pytest.param(lambda t: ["merge", _good(t), "-o", t / "out.npy"], id="merge-not-a-store"),
]


@pytest.mark.parametrize("make_args", PROCESS_CASES)
def test_bad_input_in_a_terminal_shows_no_traceback(tmp_path, make_args):
    code, _, err = cli_process(*make_args(tmp_path), cwd=tmp_path)
    assert code != 0
    assert "Traceback" not in err
    assert len(error_lines(err)) == 1, err


def _truncated(tmp_path, ext):
    path = tmp_path / f"cut.{ext}"
    pg.save(path, _volume(shape=(16, 16, 16)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("ext", ["nii.gz", "nii", "npy", "tif", "h5"])
def test_truncated_file_gives_one_line_naming_it(tmp_path, ext):
    # In a fresh process: tifffile leaks file handles when several chunk reads fail at once.
    path = _truncated(tmp_path, ext)
    code, _, err = cli_process(
        "extract", path, "--size", 8, "-o", tmp_path / "p.zarr", cwd=tmp_path
    )
    assert code != 0
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert path.name in err


@pytest.mark.parametrize("ext", ["nii.gz", "nii", "npy", "tif", "h5"])
def test_truncated_file_leaves_no_output(tmp_path, ext):
    path = _truncated(tmp_path, ext)
    cli_process("extract", path, "--size", 8, "-o", tmp_path / "p.zarr", cwd=tmp_path)
    assert os.listdir(tmp_path) == [path.name]


# ------------------------------------------------------------- failures while writing (item 3)


@pytest.mark.parametrize("name", ["out.npy", "out.zarr", "out.h5", "out.nii.gz", "out.tif"])
def test_model_failing_on_third_batch_leaves_nothing(capsys, tmp_path, nifti, models, name):
    before = sorted(os.listdir(tmp_path))
    code, _, err = cli(
        capsys,
        "apply",
        nifti,
        "--model",
        f"{models}:fails_on_third_batch",
        "--size",
        4,
        "--batch-size",
        2,
        "-o",
        tmp_path / name,
    )
    assert code != 0
    assert "third batch" in err
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("name", ["out.npy", "out.zarr", "out.nii.gz"])
def test_model_crashing_in_a_process_leaves_nothing(tmp_path, nifti, models, name):
    before = sorted(os.listdir(tmp_path))
    code, _, _ = cli_process(
        "apply",
        nifti,
        "--model",
        f"{models}:crashes_on_third_batch",
        "--size",
        4,
        "--batch-size",
        2,
        "-o",
        tmp_path / name,
        cwd=tmp_path,
    )
    assert code != 0
    assert sorted(os.listdir(tmp_path)) == before


def test_model_failing_with_overwrite_keeps_the_old_output(capsys, tmp_path, nifti, models):
    old = tmp_path / "out.nii.gz"
    pg.save(old, _volume(seed=5))
    kept = old.read_bytes()
    cli(
        capsys,
        "apply",
        nifti,
        "--model",
        f"{models}:fails_on_third_batch",
        "--size",
        4,
        "--batch-size",
        2,
        "-o",
        old,
        "--overwrite",
    )
    assert old.read_bytes() == kept


def _fail_on_third_read(monkeypatch):
    from patchgrid._regions import Reader

    real = Reader.read
    calls = [0]

    def read(self, index):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError("the source went away")
        return real(self, index)

    monkeypatch.setattr(Reader, "read", read)


@pytest.mark.parametrize("output", ["p.zarr", "patches/"], ids=["store", "folder"])
def test_extract_failing_halfway_leaves_nothing(capsys, tmp_path, npy, monkeypatch, output):
    _fail_on_third_read(monkeypatch)
    code, _, err = cli(
        capsys, "extract", npy, "--size", 4, "--batch", 1, "-o", f"{tmp_path}/{output}"
    )
    assert code != 0
    assert "went away" in err
    assert os.listdir(tmp_path) == ["volume.npy"]


def test_extract_folder_failing_on_third_file_leaves_nothing(capsys, tmp_path, npy, monkeypatch):
    real = pio.WRITERS["npy"]
    calls = [0]

    def write(tmp, *args):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError("disk full")
        real(tmp, *args)

    monkeypatch.setitem(pio.WRITERS, "npy", write)
    code, _, err = cli(
        capsys, "extract", npy, "--size", 4, "-o", f"{tmp_path}/p/", "--format", "npy"
    )
    assert code != 0
    assert "disk full" in err
    assert os.listdir(tmp_path) == ["volume.npy"]


# ---------------------------------------------------------------------- existing outputs


def _make_existing(capsys, tmp_path, kind, nifti):
    """Run a command once so that its output exists; returns that output's path."""
    store = tmp_path / "existing.zarr"
    cli(capsys, "extract", nifti, "--size", 6, "-o", store)
    paths = {
        "extract-store": store,
        "extract-folder": tmp_path / "folder",
        "merge": tmp_path / "merged.nii.gz",
        "apply": tmp_path / "applied.npy",
        "preview": tmp_path / "grid.png",
    }
    if kind == "extract-folder":
        cli(capsys, "extract", nifti, "--size", 6, "-o", f"{paths[kind]}/", "--format", "nii")
    elif kind == "merge":
        cli(capsys, "merge", store, "-o", paths[kind])
    elif kind == "apply":
        np.save(paths[kind], np.zeros(3))
    elif kind == "preview":
        paths[kind].write_bytes(b"not really a png")
    return paths[kind]


def _rerun(kind, path, nifti, models, store):
    """The arguments that write ``path`` again, with a different grid."""
    return {
        "extract-store": ["extract", nifti, "--size", 4, "-o", path],
        "extract-folder": ["extract", nifti, "--size", 4, "-o", f"{path}/", "--format", "nii"],
        "merge": ["merge", store, "-o", path, "--dtype", "float64"],
        "apply": ["apply", nifti, "--model", f"{models}:double", "--size", 8, "-o", path],
        "preview": ["preview", nifti, "--size", 4, "-o", path],
    }[kind]


KINDS = ["extract-store", "extract-folder", "merge", "apply", "preview"]


@pytest.mark.parametrize("kind", KINDS)
def test_existing_output_is_left_alone(capsys, tmp_path, nifti, models, kind):
    path = _make_existing(capsys, tmp_path, kind, nifti)
    before = _snapshot(path)
    cli(capsys, *_rerun(kind, path, nifti, models, tmp_path / "existing.zarr"))
    assert _snapshot(path) == before


@pytest.mark.parametrize("kind", KINDS)
def test_existing_output_error_mentions_overwrite(capsys, tmp_path, nifti, models, kind):
    path = _make_existing(capsys, tmp_path, kind, nifti)
    code, _, err = cli(capsys, *_rerun(kind, path, nifti, models, tmp_path / "existing.zarr"))
    assert code != 0
    assert "--overwrite" in err
    assert len(error_lines(err)) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_overwrite_replaces_the_output(capsys, tmp_path, nifti, models, kind):
    path = _make_existing(capsys, tmp_path, kind, nifti)
    before = _snapshot(path)
    code, _, err = cli(
        capsys, *_rerun(kind, path, nifti, models, tmp_path / "existing.zarr"), "--overwrite"
    )
    assert code == 0, err
    assert _snapshot(path) != before


@pytest.mark.parametrize("kind", KINDS)
def test_overwrite_leaves_no_temporary_files(capsys, tmp_path, nifti, models, kind):
    path = _make_existing(capsys, tmp_path, kind, nifti)
    before = set(os.listdir(tmp_path))
    cli(capsys, *_rerun(kind, path, nifti, models, tmp_path / "existing.zarr"), "--overwrite")
    assert set(os.listdir(tmp_path)) == before


def test_overwritten_store_is_still_a_store(capsys, tmp_path, nifti):
    store = tmp_path / "p.zarr"
    cli(capsys, "extract", nifti, "--size", 6, "-o", store)
    cli(capsys, "extract", nifti, "--size", 4, "-o", store, "--overwrite")
    code, _, err = cli(capsys, "merge", store, "-o", tmp_path / "out.nii.gz")
    assert code == 0, err


def test_overwritten_store_holds_the_new_patches(capsys, tmp_path, nifti):
    store = tmp_path / "p.zarr"
    cli(capsys, "extract", nifti, "--size", 6, "-o", store)
    cli(capsys, "extract", nifti, "--size", 4, "-o", store, "--overwrite")
    assert "patches" in os.listdir(store)


# ------------------------------------------------------------------------ progress (item 4)


def _progress_args(kind, tmp_path, nifti, models, store):
    return {
        "extract": ["extract", nifti, "--size", 4, "-o", tmp_path / "p2.zarr"],
        "merge": ["merge", store, "-o", tmp_path / "out.zarr"],
        "apply": [
            "apply",
            nifti,
            "--model",
            f"{models}:double",
            "--size",
            4,
            "-o",
            tmp_path / "out.zarr",  # keeps the spacing: no warning
        ],
    }[kind]


@pytest.mark.parametrize("kind", ["extract", "merge", "apply"])
def test_progress_bar_on_a_terminal(capsys, tmp_path, nifti, models, store, kind, monkeypatch):
    args = _progress_args(kind, tmp_path, nifti, models, store)
    capsys.readouterr()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # capsys's stream: a terminal
    code, _, err = cli(capsys, *args)
    assert code == 0
    assert "patch/s" in err


@pytest.mark.parametrize("kind", ["extract", "merge", "apply"])
def test_no_progress_bar_elsewhere(capsys, tmp_path, nifti, models, store, kind):
    args = _progress_args(kind, tmp_path, nifti, models, store)
    capsys.readouterr()
    code, _, err = cli(capsys, *args)
    assert code == 0
    assert err == ""


# ---------------------------------------- issue #13: nothing lost, nothing silently wrong (CLI)

# A store whose grid leaves a remainder on every axis, so that edge and shape matter.
STORE_SHAPE = (20, 30, 40)


@pytest.fixture
def checked_store(tmp_path, capsys):
    """A patch store of a (20, 30, 40) float32 volume, --size 8 --stride 6 (edge shift)."""
    source = tmp_path / "volume.npy"
    pg.save(source, _volume(shape=STORE_SHAPE))
    path = tmp_path / "p.zarr"
    code, _, err = cli(capsys, "extract", source, "--size", 8, "--stride", 6, "-o", path)
    assert code == 0, err
    return path


def _edit_attrs(path, change):
    """Change the store's 'patchgrid' attribute in place, as a hand edit would."""
    meta_file = path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    change(meta["attributes"]["patchgrid"])
    meta_file.write_text(json.dumps(meta))


def _lose_chunk(path):
    os.remove(path / "patches" / "c.50.0.0.0")  # what a crashed or partial copy leaves


def _edge_even(path):
    _edit_attrs(path, lambda m: m["grid"].update(edge=["even"] * 3))


def _shape_41(path):
    _edit_attrs(path, lambda m: m["grid"]["shape"].__setitem__(2, 41))


def _stride_5(path):
    _edit_attrs(path, lambda m: m["grid"].update(stride=[5, 5, 5]))


def _dtype_int16(path):
    _edit_attrs(path, lambda m: m["source"].update(dtype="int16"))


def _spacing_short(path):
    _edit_attrs(path, lambda m: m["source"].update(spacing=[1.0, 1.0]))


def _starts_moved(path):
    starts = zarr.open_group(str(path), mode="r+")["starts"]
    moved = starts[...]
    moved[3, 1] += 1
    starts[...] = moved


def _no_attrs(path):
    meta_file = path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    del meta["attributes"]["patchgrid"]
    meta_file.write_text(json.dumps(meta))


# (how the store is damaged, words of the one error line)
DAMAGED_STORES = [
    pytest.param(_lose_chunk, "lacks 1 of its 105 patches", id="lost-chunk"),
    pytest.param(_edge_even, "corners differ", id="edge-changed"),
    pytest.param(_shape_41, "corners differ", id="shape-changed"),
    pytest.param(_stride_5, "makes (192, 8, 8, 8)", id="stride-changed"),
    pytest.param(_dtype_int16, "source is int16", id="dtype-changed"),
    pytest.param(_spacing_short, "spacing has 2 entries", id="spacing-short"),
    pytest.param(_starts_moved, "first patch 3", id="starts-changed"),
    pytest.param(_no_attrs, "unfinished patch store", id="no-attributes"),
]


@pytest.mark.parametrize(("damage", "words"), DAMAGED_STORES)
def test_merge_refuses_a_damaged_store(capsys, tmp_path, checked_store, damage, words):
    damage(checked_store)
    code, _, err = cli(capsys, "merge", checked_store, "-o", tmp_path / "out.npy")
    assert code == 1
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert words in lines[0]
    assert str(checked_store) in lines[0]


@pytest.mark.parametrize(("damage", "words"), DAMAGED_STORES)
def test_merge_of_a_damaged_store_writes_nothing(capsys, tmp_path, checked_store, damage, words):
    damage(checked_store)
    cli(capsys, "merge", checked_store, "-o", tmp_path / "out.npy")
    assert not (tmp_path / "out.npy").exists()


def test_extract_stores_patches_of_zeros_too(capsys, tmp_path):
    # zarr leaves out chunks of fill value by default: merge could not tell them from lost ones.
    source = tmp_path / "zeros.npy"
    pg.save(source, np.zeros(STORE_SHAPE, np.float32))
    cli(capsys, "extract", source, "--size", 8, "--stride", 6, "-o", tmp_path / "p.zarr")
    patches = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")["patches"]
    assert patches.nchunks_initialized == patches.nchunks == 105


def test_merge_of_a_store_of_zeros_gives_zeros(capsys, tmp_path):
    source = tmp_path / "zeros.npy"
    pg.save(source, np.zeros(STORE_SHAPE, np.float32))
    cli(capsys, "extract", source, "--size", 8, "--stride", 6, "-o", tmp_path / "p.zarr")
    code, _, err = cli(capsys, "merge", tmp_path / "p.zarr", "-o", tmp_path / "out.npy")
    assert code == 0, err
    assert np.array_equal(_read(tmp_path / "out.npy"), np.zeros(STORE_SHAPE, np.float32))


def test_merge_of_a_store_checks_no_patch_data(capsys, tmp_path, checked_store, monkeypatch):
    # The checks list the chunks on disk; they read one patch (to learn the output's layout).
    reads = []
    real = zarr.Array.__getitem__

    def counting(self, key):
        if self.shape[0] == 105 and self.ndim == 4:
            reads.append(key)
        return real(self, key)

    monkeypatch.setattr(zarr.Array, "__getitem__", counting)
    _store.open_store(str(checked_store))
    assert reads == []


# --------------------------------------------------------------- defaults: edge shift (item 10)

GRID_COMMANDS = ["info", "extract", "apply", "preview", "demo"]


@pytest.mark.parametrize("command", GRID_COMMANDS)
def test_help_shows_edge_default_shift(capsys, command):
    _, out, _ = cli(capsys, command, "--help")
    assert "(default: shift" in " ".join(out.split())


def _defaults(command):
    parser = pcli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for action in sub.choices[command]._actions:
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            yield action


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_default(capsys, command):
    _, out, _ = cli(capsys, command, "--help")
    text = " ".join(out.split())
    for action in _defaults(command):
        shown = _commands.as_text(action.default)
        assert f"{action.option_strings[-1]}" in text
        assert f"(default: {shown}" in text, action.option_strings


def test_extract_default_edge_is_shift(capsys, tmp_path, checked_store):
    meta = zarr.open_group(str(checked_store), mode="r").attrs["patchgrid"]
    assert meta["grid"]["edge"] == ["shift", "shift", "shift"]


def test_info_default_edge_is_shift(capsys):
    _, out, _ = cli(capsys, "info", "--shape", "20,30,40", "--size", 8)
    assert "edge ('shift', 'shift', 'shift')" in out


def test_preview_default_edge_covers_every_voxel(capsys, tmp_path, monkeypatch):
    seen = []

    def fake(img, grid, path):
        seen.append(grid)
        open(path, "wb").close()

    monkeypatch.setattr("patchgrid.plot.preview", fake)
    source = tmp_path / "volume.npy"
    pg.save(source, _volume(shape=STORE_SHAPE))
    code, _, err = cli(capsys, "preview", source, "--size", 8, "-o", tmp_path / "g.png")
    assert code == 0, err
    assert seen[0].edge == ("shift",) * 3


def test_demo_default_edge_is_shift(capsys, tmp_path):
    _, out, _ = cli(capsys, "demo", "--dir", tmp_path / "demo", "--shape", "9,10,11")
    assert "edge='shift'" in out


def test_merge_says_how_many_voxels_get_fill(capsys, tmp_path, npy):
    cli(capsys, "extract", npy, "--size", 5, "--edge", "drop", "-o", tmp_path / "p.zarr")
    code, _, err = cli(capsys, "merge", tmp_path / "p.zarr", "-o", tmp_path / "out.npy")
    assert code == 0
    # (12, 16, 20) tiled by 5 without a remainder: 10 x 15 x 20 voxels covered.
    assert err.count("\n") == 1
    assert "840 of 3,840 voxels lie in no patch" in err
    assert "--fill 0" in err


def test_merge_with_full_coverage_says_nothing_on_stderr(capsys, tmp_path, checked_store):
    code, _, err = cli(capsys, "merge", checked_store, "-o", tmp_path / "out.npy")
    assert code == 0
    assert err == ""


def _uint64_near_2_60(shape):
    rng = np.random.default_rng(1)
    return (2**60 + rng.integers(0, 2**40, shape)).astype(np.uint64)


def _ints_of(dtype):
    def make(shape):
        info = np.iinfo(dtype)
        return np.random.default_rng(2).integers(
            info.min, info.max, shape, endpoint=True, dtype=dtype
        )

    return make


def _floats_of(dtype):
    def make(shape):
        rng = np.random.default_rng(3)
        return (rng.standard_normal(shape) * 1e3).astype(dtype)

    return make


# (values, grid arguments): the defaults otherwise; no axis is a multiple of the stride.
DEFAULT_ROUND_TRIPS = [
    pytest.param(_floats_of(np.float32), ["--size", 6, "--stride", 4], id="float32-overlapping"),
    pytest.param(_floats_of(np.float64), ["--size", 6, "--stride", 4], id="float64-overlapping"),
    pytest.param(_floats_of(np.float16), ["--size", 6, "--stride", 4], id="float16-overlapping"),
    pytest.param(_floats_of(np.float32), ["--size", 6], id="float32"),
    pytest.param(_uint64_near_2_60, ["--size", 6], id="uint64-near-2**60"),
    pytest.param(_uint64_near_2_60, ["--size", 6, "--stride", 4], id="uint64-overlapping"),
    pytest.param(_ints_of(np.int16), ["--size", 6], id="int16"),
    pytest.param(_ints_of(np.int16), ["--size", 6, "--stride", 4], id="int16-overlapping"),
    pytest.param(_ints_of(np.uint8), ["--size", 6, "--stride", 4], id="uint8-overlapping"),
    pytest.param(_ints_of(np.int32), ["--size", 6, "--stride", 4], id="int32-overlapping"),
    pytest.param(_ints_of(np.uint16), ["--size", 6], id="uint16"),
    pytest.param(lambda shape: _floats_of(np.float32)(shape) > 0, ["--size", 6], id="bool"),
]


@pytest.mark.parametrize(("make", "grid_args"), DEFAULT_ROUND_TRIPS)
def test_default_round_trip_is_bit_exact(capsys, tmp_path, make, grid_args):
    volume = make((11, 13, 17))
    pg.save(tmp_path / "volume.npy", volume)
    code, _, err = cli(
        capsys, "extract", tmp_path / "volume.npy", *grid_args, "-o", tmp_path / "p.zarr"
    )
    assert code == 0, err
    code, _, err = cli(capsys, "merge", tmp_path / "p.zarr", "-o", tmp_path / "out.npy")
    assert code == 0, err
    out = np.load(tmp_path / "out.npy")
    assert out.dtype == volume.dtype
    assert out.tobytes() == volume.tobytes()


# ------------------------------------------------------------ spatial axes by default (item 11)


def test_info_of_a_4d_nifti_tiles_its_spatial_axes(capsys):
    code, out, err = cli(capsys, "info", EXAMPLE4D, "--size", 32)
    assert code == 0, err
    assert "axes (0, 1, 2)" in out
    assert "12 patches of shape (32, 32, 32, 2)" in out


def test_extract_of_a_4d_nifti_keeps_time_whole(capsys, tmp_path):
    code, _, err = cli(capsys, "extract", EXAMPLE4D, "--size", 32, "-o", tmp_path / "p.zarr")
    assert code == 0, err
    patches = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")["patches"]
    assert patches.shape == (12, 32, 32, 32, 2)


def test_round_trip_of_a_4d_nifti_with_one_size(capsys, tmp_path):
    source, out = _round_trip(capsys, tmp_path, _example4d, ["--size", 32], "out.nii.gz")
    assert np.array_equal(_read(out), _read(source))


def test_apply_over_a_4d_nifti_with_one_size_keeps_time_whole(capsys, tmp_path, models):
    out = tmp_path / "out.nii.gz"
    code, _, err = cli(
        capsys, "apply", EXAMPLE4D, "--model", f"{models}:double", "--size", 32, "-o", out
    )
    assert code == 0, err
    assert np.array_equal(_read(out), 2 * _read(EXAMPLE4D).astype(np.float64))


def test_info_of_a_4d_npy_tiles_every_axis(capsys, tmp_path):
    pg.save(tmp_path / "v.npy", np.zeros((6, 8, 8, 8), np.float32))
    _, out, _ = cli(capsys, "info", tmp_path / "v.npy", "--size", 4)
    assert "axes (0, 1, 2, 3)" in out


def test_axes_flag_still_chooses_for_a_nifti(capsys):
    _, out, _ = cli(capsys, "info", EXAMPLE4D, "--size", "32,8", "--axes", "1,2")
    assert "axes (1, 2)" in out


# ------------------------------------------------------------- summaries and memory (item 19)

SUMMARY_GRIDS = [
    pytest.param(["--shape", 7, "--size", 3, "--stride", 2, "--edge", "drop"], id="1d-overlap"),
    pytest.param(["--shape", 7, "--size", 2, "--stride", 3, "--edge", "drop"], id="1d-gaps"),
    pytest.param(["--shape", "9,10,11", "--size", 4, "--stride", 3], id="3d-shift"),
    pytest.param(
        ["--shape", "9,10,11", "--size", "4,5,3", "--stride", "2,3,3", "--edge", "even"],
        id="3d-even",
    ),
    pytest.param(
        ["--shape", "9,10,11", "--size", 4, "--stride", 5, "--edge", "drop"], id="3d-drop-gaps"
    ),
    pytest.param(
        ["--shape", "3,9,10", "--size", 4, "--axes", "1,2", "--edge", "pad"], id="channels-pad"
    ),
]


def _summary_grid(args):
    shape = tuple(int(v) for v in str(args[args.index("--shape") + 1]).split(","))
    parsed = pcli.build_parser().parse_args(["info", *map(str, args)])
    return _commands.make_grid(shape, parsed)


@pytest.mark.parametrize("args", SUMMARY_GRIDS)
def test_info_coverage_equals_the_coverage_volume(capsys, args):
    cover = np.broadcast_to(pg.coverage(_summary_grid(args)), _summary_grid(args).shape)
    _, out, _ = cli(capsys, "info", *args)
    line = next(x for x in out.splitlines() if x.startswith("coverage:"))
    summary = (
        f"{int(cover.min())} to {int(cover.max())} patches per voxel, {cover.mean():.2f} on average"
    )
    assert summary in line


@pytest.mark.parametrize("args", SUMMARY_GRIDS)
def test_info_counts_the_voxels_in_no_patch(capsys, args):
    grid = _summary_grid(args)
    cover = np.broadcast_to(pg.coverage(grid), grid.shape)
    _, out, _ = cli(capsys, "info", *args)
    missing = int((cover == 0).sum())
    assert (f"{missing:,} of {cover.size:,} lie in no patch" in out) == (missing > 0)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--shape", "512,512,512", "--size", 64, "--stride", 32], id="512**3"),
        pytest.param(["--shape", "4096,4096,4096", "--size", 64, "--stride", 32], id="4096**3"),
        pytest.param(
            ["--shape", "10,10,10", "--size", "400,400,400", "--edge", "pad"],
            id="huge-patch-pad",
        ),
    ],
)
def test_info_allocates_nothing_like_the_image(capsys, args):
    tracemalloc.start()
    try:
        code, _, err = cli(capsys, "info", *args)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == 0, err
    assert peak < 8 << 20


def test_info_says_when_a_copy_is_more_than_memory(capsys, monkeypatch):
    monkeypatch.setattr(_commands, "memory_available", lambda: 1 << 30)
    _, out, _ = cli(capsys, "info", "--shape", "1024,1024,1024", "--size", 64, "--stride", 32)
    assert "more than the 1.0 GiB of memory available here" in out


def _tiny_nifti(tmp_path):
    path = tmp_path / "scan.nii.gz"
    pg.save(path, _volume(shape=(32, 32, 32)))
    return path


# (arguments from tmp_path and the models file, words of the one error line)
TOO_BIG = [
    pytest.param(
        lambda t, m: ["extract", _tiny_nifti(t), "--size", 64, "--edge", "pad", "-o", t / "p.zarr"],
        "--batch",
        id="extract",
    ),
    pytest.param(
        lambda t, m: [
            "extract",
            _tiny_nifti(t),
            "--size",
            64,
            "--edge",
            "pad",
            "-o",
            f"{t / 'f'}/",
        ],
        "--size",
        id="extract-folder",
    ),
    pytest.param(
        lambda t, m: [
            "apply",
            _tiny_nifti(t),
            "--model",
            f"{m}:double",
            "--size",
            64,
            "--edge",
            "pad",
            "-o",
            t / "o.nii.gz",
        ],
        "--batch-size",
        id="apply",
    ),
    pytest.param(
        lambda t, m: ["preview", _tiny_nifti(t), "--size", 64, "--edge", "pad", "-o", t / "g.png"],
        "smaller image",
        id="preview",
    ),
    pytest.param(
        lambda t, m: ["demo", "--shape", "64,64,64", "--dir", t / "demo"],
        "--shape",
        id="demo",
    ),
]


@pytest.mark.parametrize(("make_args", "words"), TOO_BIG)
def test_a_job_larger_than_memory_is_refused_in_one_line(
    capsys, tmp_path, models, monkeypatch, make_args, words
):
    args = make_args(tmp_path, models)
    monkeypatch.setattr(_commands, "memory_available", lambda: 256 << 10)
    code, _, err = cli(capsys, *args)
    assert code == 1
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert "more than the 256.0 KiB" not in lines[0]
    assert "of memory, more than the" in lines[0]
    assert words in lines[0]


@pytest.mark.parametrize(("make_args", "words"), TOO_BIG)
def test_a_job_larger_than_memory_writes_nothing(
    capsys, tmp_path, models, monkeypatch, make_args, words
):
    args = make_args(tmp_path, models)
    before = set(os.listdir(tmp_path))
    monkeypatch.setattr(_commands, "memory_available", lambda: 256 << 10)
    cli(capsys, *args)
    assert set(os.listdir(tmp_path)) == before


def test_merge_into_memory_larger_than_memory_is_refused(
    capsys, tmp_path, checked_store, monkeypatch
):
    monkeypatch.setattr(_commands, "memory_available", lambda: 64 << 10)
    code, _, err = cli(capsys, "merge", checked_store, "-o", tmp_path / "out.nii.gz")
    assert code == 1
    assert "built in memory" in err
    assert not (tmp_path / "out.nii.gz").exists()


def test_extract_beyond_any_machine_is_refused_before_work(capsys, tmp_path, npy):
    code, _, err = cli(
        capsys,
        "extract",
        npy,
        "--size",
        "30000,30000,30000",
        "--edge",
        "pad",
        "-o",
        tmp_path / "p.zarr",
    )
    assert code == 1
    assert "TiB of memory" in err
    assert "--size" in err


def test_memory_available_reads_the_system():
    have = _commands.memory_available()
    assert have is None or have > 0


def test_memory_available_without_proc_meminfo(monkeypatch):
    def no_proc(path, *args, **kwargs):
        raise OSError(f"no {path}")

    monkeypatch.setattr(_commands, "open", no_proc, raising=False)
    have = _commands.memory_available()
    assert have is None or have > 0


# ------------------------------------------------------------ bad values, said clearly (item 21)

# (arguments from tmp_path, words the one error line must hold: flag or file, value, rule)
BAD_VALUES = [
    pytest.param(
        lambda t: ["extract", _good(t), "--size", 4, "--batch", 0, "-o", t / "p.zarr"],
        ["--batch", "'0'", "at least 1"],
        id="extract-batch-zero",
    ),
    pytest.param(
        lambda t: ["extract", _good(t), "--size", 4, "--batch", -5, "-o", t / "p.zarr"],
        ["--batch", "'-5'", "at least 1"],
        id="extract-batch-negative",
    ),
    pytest.param(
        lambda t: ["merge", t / "p.zarr", "--batch", 0, "-o", t / "out.npy"],
        ["--batch", "'0'", "at least 1"],
        id="merge-batch-zero",
    ),
    pytest.param(
        lambda t: [
            "apply",
            _good(t),
            "--model",
            "m:f",
            "--size",
            4,
            "--batch-size",
            0,
            "-o",
            t / "o.npy",
        ],
        ["--batch-size", "'0'", "at least 1"],
        id="apply-batch-size-zero",
    ),
    pytest.param(
        lambda t: ["info", "--shape", 0, "--size", 4, "--edge", "pad"],
        ["--shape", "'0'", "at least 1"],
        id="info-shape-zero",
    ),
    pytest.param(
        lambda t: ["demo", "--shape", "10,0,4", "--dir", t / "demo"],
        ["--shape", "'10,0,4'", "at least 1"],
        id="demo-shape-zero",
    ),
    pytest.param(
        lambda t: ["info", _zarr_without_metadata(t), "--size", 4],
        ["bare.zarr", "not a zarr store", "zarr.json"],
        id="zarr-without-metadata",
    ),
    pytest.param(
        lambda t: ["info", _npy_bad_header(t), "--size", 4],
        ["bad.npy", "header", "'descr'", "got"],
        id="npy-corrupt-header",
    ),
    pytest.param(
        lambda t: ["info", _npy_short_data(t), "--size", 4],
        ["short.npy", "(8, 8, 8) float32", "2,048 bytes", "holds"],
        id="npy-short-data",
    ),
    pytest.param(
        lambda t: ["info", _garbage(t, "junk.npy"), "--size", 4],
        ["junk.npy", "signature"],
        id="npy-not-npy",
    ),
]


def _zarr_without_metadata(tmp_path):
    path = tmp_path / "bare.zarr"
    pg.save(path, _volume(shape=(8, 8, 8)))
    os.remove(path / "zarr.json")
    return path


def _npy_bytes():
    buffer = io.BytesIO()
    np.save(buffer, _volume(shape=(8, 8, 8)))
    return buffer.getvalue()


def _npy_bad_header(tmp_path):
    data = _npy_bytes()
    end = data.index(b"}")
    (tmp_path / "bad.npy").write_bytes(data[:end] + b" " + data[end + 1 :])
    return tmp_path / "bad.npy"


def _npy_short_data(tmp_path):
    data = _npy_bytes()
    (tmp_path / "short.npy").write_bytes(data[: len(data) - 2048])
    return tmp_path / "short.npy"


@pytest.fixture
def stored(tmp_path, capsys):
    """``p.zarr`` in tmp_path, for the merge cases of BAD_VALUES."""
    pg.save(tmp_path / "source.npy", _volume(shape=(8, 8, 8)))
    cli(capsys, "extract", tmp_path / "source.npy", "--size", 4, "-o", tmp_path / "p.zarr")
    capsys.readouterr()


@pytest.mark.parametrize(("make_args", "words"), BAD_VALUES)
def test_bad_value_names_the_flag_what_came_and_the_rule(
    capsys, tmp_path, stored, make_args, words
):
    code, _, err = cli(capsys, *make_args(tmp_path))
    assert code != 0
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize(("make_args", "words"), BAD_VALUES)
def test_bad_value_writes_nothing(capsys, tmp_path, stored, make_args, words):
    args = make_args(tmp_path)
    before = _snapshot(tmp_path)
    cli(capsys, *args)
    assert _snapshot(tmp_path) == before


def test_open_names_the_zarr_store_without_metadata(tmp_path):
    with pytest.raises(pg.PatchgridError, match=r"bare\.zarr' is not a zarr store: .*zarr\.json"):
        pg.open(_zarr_without_metadata(tmp_path))


def test_open_says_what_is_wrong_with_an_npy_header(tmp_path):
    with pytest.raises(
        pg.PatchgridError, match=r"bad\.npy' as npy: its header is not a \.npy header"
    ):
        pg.open(_npy_bad_header(tmp_path))


def test_demo_of_a_2d_shape(capsys, tmp_path):
    code, out, err = cli(capsys, "demo", "--shape", "10,10", "--dir", tmp_path / "demo")
    assert code == 0, err
    assert "round trip: exact" in out
    assert _read(tmp_path / "demo" / "restored.nii.gz").shape == (10, 10)


def test_demo_of_a_2d_shape_keeps_a_spacing_per_axis(capsys, tmp_path):
    cli(capsys, "demo", "--shape", "10,12", "--dir", tmp_path / "demo")
    with pg.open(tmp_path / "demo" / "volume.nii.gz") as img:
        assert img.spacing == (1.0, 2.0)


# --------------------------------------------- errors in the user's model (issue 16, item 4)

FAULTY = """import numpy as np

WEIGHTS = np.ones((3, 5))


def project(x):
    return x @ WEIGHTS


def segment(batch):
    return project(batch)
"""


@pytest.fixture
def faulty(tmp_path):
    path = tmp_path / "faulty.py"
    path.write_text(FAULTY)
    return path


def _apply_args(tmp_path, model, size=4):
    pg.save(tmp_path / "scan.npy", _volume(shape=(8, 8, 8)))
    return [
        "apply",
        tmp_path / "scan.npy",
        "--model",
        model,
        "--size",
        size,
        "-o",
        tmp_path / "o.npy",
    ]


def test_error_in_the_model_shows_its_frames(capsys, tmp_path, faulty):
    code, _, err = cli(capsys, *_apply_args(tmp_path, f"{faulty}:segment"))
    assert code == 1
    assert f'File "{faulty}", line 11, in segment\n    return project(batch)' in err
    assert f'File "{faulty}", line 7, in project\n    return x @ WEIGHTS' in err
    assert err.rstrip().splitlines()[-1].startswith("ValueError: matmul: Input operand 1")


def test_error_in_the_model_leaves_out_patchgrids_frames(capsys, tmp_path, faulty):
    _, _, err = cli(capsys, *_apply_args(tmp_path, f"{faulty}:segment"))
    assert os.path.dirname(pg.__file__) not in err
    assert err.count('File "') == 2


def test_syntax_error_in_the_model_file_shows_its_line(capsys, tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def segment(batch):\n    return batch +\n")
    code, _, err = cli(capsys, *_apply_args(tmp_path, f"{path}:segment"))
    assert code == 1
    assert f'File "{path}", line 2' in err
    assert "SyntaxError" in err
    assert os.path.dirname(pg.__file__) not in err


def test_import_error_in_the_model_file_shows_its_line(capsys, tmp_path):
    path = tmp_path / "needs.py"
    path.write_text("import no_such_module_here\n\n\ndef segment(batch):\n    return batch\n")
    _, _, err = cli(capsys, *_apply_args(tmp_path, f"{path}:segment"))
    assert f'File "{path}", line 1, in <module>' in err
    assert "ModuleNotFoundError: No module named 'no_such_module_here'" in err


def test_an_error_of_patchgrid_stays_one_line(capsys):
    code, _, err = cli(capsys, "info", "--shape", "8,8,8", "--size", 4, "--axes", "0,0")
    assert code == 1
    assert err == "patchgrid info: error: --axes must not repeat an axis, got 0,0\n"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_flag_shows_the_whole_traceback(capsys, where):
    args = ["info", "--shape", "8,8,8", "--size", 4, "--axes", "0,0"]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    code, _, err = cli(capsys, *args)
    assert code == 1
    assert err.startswith("Traceback (most recent call last):")
    assert os.path.join("patchgrid", "_checks.py") in err
    assert "PatchgridError: axes must not repeat an axis, got (0, 0)" in err


def test_debug_environment_variable_shows_the_whole_traceback(
    capsys, tmp_path, faulty, monkeypatch
):
    monkeypatch.setenv("PATCHGRID_DEBUG", "1")
    code, _, err = cli(capsys, *_apply_args(tmp_path, f"{faulty}:segment"))
    assert code == 1
    assert os.path.join("patchgrid", "cli.py") in err
    assert f'File "{faulty}", line 7, in project' in err


def test_debug_off_by_default(capsys, monkeypatch):
    monkeypatch.delenv("PATCHGRID_DEBUG", raising=False)
    _, _, err = cli(capsys, "info", "--shape", "8,8,8", "--size", 4, "--axes", "0,0")
    assert "Traceback" not in err


def test_error_in_the_model_through_the_console_script(tmp_path, faulty):
    code, _, err = cli_process(*_apply_args(tmp_path, f"{faulty}:segment"), cwd=tmp_path)
    assert code == 1
    assert f'File "{faulty}", line 7, in project' in err
    assert "ValueError: matmul" in err


# ------------------------------------------------------- defaults and --help (issue 16, item 6)


def _parsers():
    parser = pcli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return [("patchgrid", parser), *sub.choices.items()]


def _options():
    """(action, its entry in --help) for every option of every command a user may leave out."""
    options = []
    for name, parser in _parsers():
        text = parser.format_help()
        entries = re.split(r"\n  (?=-)", text[text.index("options:") :])[1:]
        shown = {e.split()[0].rstrip(","): " ".join(e.split()) for e in entries}
        for action in parser._actions:
            if (
                action.option_strings
                and not action.required
                and action.dest
                not in (
                    "help",
                    "version",
                )
            ):
                entry = shown[action.option_strings[0]]
                options.append(pytest.param(action, entry, id=f"{name}{action.option_strings[-1]}"))
    return options


@pytest.mark.parametrize(("action", "entry"), _options())
def test_every_option_shows_its_default(action, entry):
    assert "(default: " in entry
    if action.default not in (None, False, "==SUPPRESS=="):
        assert f"(default: {_commands.as_text(action.default)}" in entry


def _api_default(fn, name):
    import inspect

    return inspect.signature(fn).parameters[name].default


# (command, dest, the Python API's functions with the same parameter)
SAME_DEFAULTS = [
    *[(c, "edge", [pg.PatchGrid, pg.extract, pg.merge, pg.apply]) for c in GRID_COMMANDS],
    *[(c, "pad_mode", [pg.PatchGrid, pg.extract, pg.apply]) for c in GRID_COMMANDS[:-1]],
    *[(c, "pad_value", [pg.PatchGrid, pg.extract, pg.apply]) for c in GRID_COMMANDS[:-1]],
    *[(c, "stride", [pg.PatchGrid, pg.extract, pg.merge, pg.apply]) for c in GRID_COMMANDS[:-1]],
    *[(c, "window", [pg.merge, pg.apply, pg.Merger]) for c in ("merge", "apply", "demo")],
    *[(c, "reduce", [pg.merge, pg.apply, pg.Merger]) for c in ("merge", "apply")],
    ("merge", "fill", [pg.merge, pg.apply, pg.Merger]),
    ("merge", "dtype", [pg.merge, pg.apply, pg.Merger]),
    ("apply", "dtype", [pg.merge, pg.apply, pg.Merger]),
    ("apply", "batch_size", [pg.apply]),
    ("apply", "margin", [pg.apply]),
    ("apply", "scale", [pg.apply]),
]


@pytest.mark.parametrize(
    ("command", "dest", "functions"), SAME_DEFAULTS, ids=[f"{c}-{d}" for c, d, _ in SAME_DEFAULTS]
)
def test_command_defaults_agree_with_the_python_api(command, dest, functions):
    parser = dict(_parsers())[command]
    cli_default = parser.get_default(dest)
    for fn in functions:
        api = _api_default(fn, dest)
        # The command line spells the library's window=None as its name, uniform.
        assert cli_default == ("uniform" if dest == "window" and api is None else api), fn


def test_version_prints_the_version_without_a_command(capsys):
    code, out, _ = cli(capsys, "--version")
    assert code == 0
    assert out == f"patchgrid {pg.__version__}\n"


def test_version_of_the_console_script(tmp_path):
    code, out, _ = cli_process("--version", cwd=tmp_path)
    assert (code, out) == (0, f"patchgrid {pg.__version__}\n")


# ------------------------------------------------------ messages name flags (issue 16, item 7)

PYTHON_FORM = re.compile(r"\b[a-z_]+=")  # edge='pad', overwrite=True, axes=(0, 1, 2), dtype=


def _made(t, name, dtype="float32", shape=(8, 8, 8)):
    pg.save(t / name, _volume(dtype, shape=shape))
    return t / name


def _hdf5_with_data(t):
    pg.save(t / "o.h5:data", _volume(shape=(8, 8, 8)))
    return f"{t / 'o.h5'}:data"


def _model(t):
    (t / "models.py").write_text(MODELS)
    return f"{t / 'models.py'}:double"


# (the command line, what the message must say); every message comes from the library.
FLAG_MESSAGES = [
    pytest.param(
        lambda t: ["extract", t / "source.npy", "--size", 4, "-o", t / "p.zarr"],
        ["exists; pass --overwrite to replace it"],
        id="output-exists",
    ),
    pytest.param(
        lambda t: ["merge", t / "p.zarr", "-o", _hdf5_with_data(t)],
        ["o.h5:data exists; pass --overwrite"],
        id="hdf5-dataset-exists",
    ),
    pytest.param(
        lambda t: ["info", "--shape", "6,6,6", "--size", 8, "--edge", "drop"],
        ["--size 8 on axis 0", "--edge drop keeps", "Use --edge pad, shift or even", "--axes"],
        id="drop-patch-too-large",
    ),
    pytest.param(
        lambda t: ["info", "--shape", "20,20,20,3", "--size", 8],
        ["a single --size without --axes", "--axes 0,1,2", "--size per axis"],
        id="4d-int-size",
    ),
    pytest.param(
        lambda t: ["info", "--shape", "20,20,20,3", "--size", 8, "--edge", "drop"],
        ["axis 3", "if axis 3 holds channels or time", "with --axes"],
        id="4d-drop",
    ),
    pytest.param(
        lambda t: ["info", "--shape", "3,3", "--size", 4],
        ["--size 4 is larger", "give --size per axis (here 4,4)"],
        id="2d-too-small",
    ),
    pytest.param(
        lambda t: ["info", "--shape", "8,8,8", "--size", "4,4", "--stride", "2,2,2"],
        ["--stride has 3 entries but 2 axes are tiled"],
        id="stride-entries",
    ),
    pytest.param(
        lambda t: ["info", "--shape", "8,8,8", "--size", 4, "--edge", "shift,pad"],
        ["--edge has 2 entries", "one of drop, pad, shift, even"],
        id="edge-entries",
    ),
    pytest.param(
        lambda t: ["info", "--shape", "8,8,8", "--size", 4, "--edge", "side"],
        ["--edge must be one of drop, pad, shift, even, got 'side'"],
        id="edge-unknown",
    ),
    pytest.param(
        lambda t: ["info", "--shape", "8,8,8", "--size", 3, "--edge", "pad", "--pad-mode", "x"],
        ["--pad-mode must be one of the numpy.pad modes constant, edge"],
        id="pad-mode-unknown",
    ),
    pytest.param(
        lambda t: ["info", "--shape", "8,8,8", "--size", 4, "--axes", "1,1"],
        ["--axes must not repeat an axis, got 1,1"],
        id="axes-repeat",
    ),
    pytest.param(
        lambda t: ["info", "--shape", "8,8,8", "--size", 4, "--stride", "0"],
        ["--stride must be positive integers, got 0,0,0"],
        id="stride-zero",
    ),
    pytest.param(
        lambda t: [
            "extract",
            _made(t, "u8.npy", "uint8"),
            "--size",
            3,
            "--edge",
            "pad",
            "--pad-value",
            300,
            "-o",
            t / "q.zarr",
        ],
        ["--pad-value 300 cannot be stored", "give a --pad-value that fits"],
        id="pad-value-too-large",
    ),
    pytest.param(
        lambda t: [
            "merge",
            t / "p.zarr",
            "-o",
            t / "o.npy",
            "--reduce",
            "max",
            "--window",
            "hann",
        ],
        [
            "--window applies to --reduce mean, sum and argmax only",
            "got --window hann with --reduce max",
        ],
        id="window-with-max",
    ),
    pytest.param(
        lambda t: ["merge", t / "p.zarr", "-o", t / "o.npy", "--reduce", "argmax"],
        ["--reduce argmax needs a class axis"],
        id="argmax-without-classes",
    ),
    pytest.param(
        lambda t: [
            "merge",
            t / "p.zarr",
            "-o",
            t / "o.npy",
            "--reduce",
            "max",
            "--dtype",
            "uint8",
            "--fill",
            300,
        ],
        ["--fill 300 cannot be stored", "give a --fill that fits or a --dtype that holds it"],
        id="fill-too-large",
    ),
    pytest.param(
        lambda t: ["merge", t / "p.zarr", "-o", t / "o.npy", "--dtype", "int8"],
        ["(--reduce mean) runs from", "which --dtype int8 cannot hold", "give a --dtype that"],
        id="dtype-too-narrow",
    ),
    pytest.param(
        lambda t: [*_apply_args(t, _model(t)), "--margin", 2],
        ["--margin 2 leaves no core in a patch of size 4"],
        id="margin-too-large",
    ),
    pytest.param(
        lambda t: [*_apply_args(t, _model(t)), "--scale", "1/3"],
        ["--scale 1/3 turns"],
        id="scale-not-whole",
    ),
    pytest.param(
        lambda t: [*_apply_args(t, _model(t)), "--window", "flat"],
        ["--window must be one of uniform, gaussian, hann, triangular, monai-gaussian"],
        id="window-unknown",
    ),
]


@pytest.mark.parametrize(("make_args", "words"), FLAG_MESSAGES)
def test_library_messages_name_the_flags(capsys, tmp_path, stored, make_args, words):
    code, _, err = cli(capsys, *make_args(tmp_path))
    assert code == 1
    for word in words:
        assert word in err
    assert PYTHON_FORM.search(err) is None, err


def test_warnings_name_the_flags_in_one_line(capsys, tmp_path):
    args = [*_apply_args(tmp_path, _model(tmp_path), size=3), "--stride", 5, "--edge", "drop"]
    with warnings.catch_warnings():
        warnings.simplefilter("always", pg.PatchgridWarning)
        code, _, err = cli(capsys, *args)
    assert code == 0
    assert err.startswith("patchgrid apply: warning: ")
    assert "lie in no patch (--edge drop, stride 5,5,5, size 3,3,3) and hold --fill 0" in err
    assert "--edge shift covers every voxel" in err
    assert PYTHON_FORM.search(err) is None, err
    assert err.count("\n") == 1


def test_batch_size_message_names_the_flag():
    with pytest.raises(pg.PatchgridError) as raised:
        pg.apply(lambda b: b, np.zeros((4, 4)), 2, batch_size=0)
    assert pcli.shell_words(str(raised.value)).startswith("--batch-size must be")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("edge=('shift', 'pad') here", "--edge shift,pad here"),
        ("give a dtype= (or an out=) that holds", "give a --dtype that holds"),
        ("overwrite=True (--overwrite) replaces only", "--overwrite replaces only"),
        ("hold fill=nan;", "hold --fill nan;"),
        ("the merged result (reduce='sum') runs", "the merged result (--reduce sum) runs"),
    ],
)
def test_shell_words_forms(text, words):
    assert pcli.shell_words(text) == words


# ------------------------------------------------------------ small things (issue 16, item 10)


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize(
    "args",
    [["demo", "--shape", "12,12,12"], ["info", "--shape", "8,8,8", "--size", "4"]],
    ids=["demo", "info"],
)
def test_a_closed_pipe_ends_quietly(tmp_path, args, buffered):
    """``patchgrid demo | head``: the reader is gone before the command writes (a buffered
    stdout fails on its last flush, an unbuffered one on its first line)."""
    read, write = os.pipe()
    os.close(read)
    env = {**os.environ, "PYTHONUNBUFFERED": "" if buffered else "1"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "patchgrid", *args],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=60,
        )
    finally:
        os.close(write)
    assert done.stderr == ""
    assert done.returncode == 141  # 128 + SIGPIPE, as a Unix tool killed by it


def _no_work(monkeypatch):
    """Reading an input fails the test: a refusal must come before any work."""

    def work(*args, **kwargs):
        raise AssertionError("the command started work")

    monkeypatch.setattr(pg, "open", work)
    monkeypatch.setattr(_store, "open_store", work)


@pytest.mark.parametrize(
    ("make_args", "name"),
    [
        (lambda t: ["merge", t / "p.zarr"], "link.zarr"),
        (lambda t: ["merge", t / "p.zarr"], "link.npy"),
        (lambda t: ["merge", t / "p.zarr"], "link.h5"),
        (lambda t: ["extract", t / "source.npy", "--size", 4], "link.zarr"),
        (lambda t: ["apply", t / "source.npy", "--size", 4, "--model", _model(t)], "link.zarr"),
        (lambda t: ["apply", t / "source.npy", "--size", 4, "--model", _model(t)], "link.nii.gz"),
        (lambda t: ["preview", t / "source.npy", "--size", 4], "link.png"),
    ],
    ids=["merge-zarr", "merge-npy", "merge-h5", "extract", "apply-zarr", "apply-nii", "preview"],
)
def test_output_through_a_symlink_is_refused_before_any_work(
    capsys, tmp_path, stored, monkeypatch, make_args, name
):
    target = tmp_path / ("real" + name[4:])
    target.write_bytes(b"kept")
    (tmp_path / name).symlink_to(target)
    args = [*make_args(tmp_path), "-o", tmp_path / name, "--overwrite"]
    _no_work(monkeypatch)
    code, _, err = cli(capsys, *args)
    assert code == 1
    assert f"{name}' is a symbolic link; patchgrid writes no output through a link" in err
    assert target.read_bytes() == b"kept"
    assert os.readlink(tmp_path / name) == str(target)


def test_apply_fill_is_the_value_of_voxels_no_patch_covers(tmp_path):
    image = np.arange(20 * 22, dtype=np.float32).reshape(20, 22)
    np.save(tmp_path / "in.npy", image)
    (tmp_path / "ident.py").write_text("def run(b):\n    return b\n")
    args = ["apply", str(tmp_path / "in.npy"), "--model", f"{tmp_path / 'ident.py'}:run",
            "--size", "8", "--stride", "12", "--edge", "drop", "--fill", "-1",
            "-o", str(tmp_path / "out.npy")]  # fmt: skip
    assert pcli.main(args, quiet=True) == 0
    out = np.load(tmp_path / "out.npy")
    covered = np.zeros(image.shape, bool)
    for y in (0, 12):  # the patches a drop edge keeps: starts 0 and 12 on both axes
        for x in (0, 12):
            covered[y : y + 8, x : x + 8] = True
    np.testing.assert_array_equal(out[covered], image[covered])
    assert (out[~covered] == -1).all()
