"""Folders of one file per patch (issue #16, items 2 and 3): ``patchgrid extract -o dir/
--format nii|tif|npy`` writes the patches and a manifest; ``patchgrid merge dir/`` takes them
back, checks the folder against its manifest first, and keeps a NIfTI source's header.

Sources are written by the tests or are nibabel's own sample scans; each result is compared
with the source itself (the array written, or nibabel's reading of the sample), never with
patchgrid's own merge.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pytest.importorskip("zarr")
pytest.importorskip("tifffile")
pytest.importorskip("h5py")

from nibabel.testing import data_path  # noqa: E402

import patchgrid as pg  # noqa: E402
import patchgrid.io as pio  # noqa: E402
from patchgrid import _commands  # noqa: E402
from patchgrid.cli import main  # noqa: E402

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
FORMATS = sorted(_commands.SUFFIX)  # every --format extract takes
OUTPUTS = ["out.nii.gz", "out.tif", "out.zarr", "out.h5", "out.npy"]
# Header fields a patch changes: its shape, and its origin (qform offset and sform rows).
MOVED = {"dim", "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z"}
# nibabel's samples, with overlapping patches a few to an axis.
SAMPLES = [
    ("example4d.nii.gz", 40, 30),
    ("anatomical.nii", 12, 9),
    ("example_nifti2.nii.gz", 8, 6),
    ("standard.nii.gz", 3, 2),
]


def cli(capsys, *argv):
    """Run the command line in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _volume(shape=SHAPE, dtype="float32", seed=0):
    return (np.random.default_rng(seed).random(shape) * 200).astype(dtype)


def _read(path):
    with pg.open(path) as img:
        return np.asarray(img)


def _sample(name):
    return os.path.join(data_path, name)


def _fields(header):
    """Every field of a NIfTI header, by name, as arrays."""
    return {key: np.asarray(header[key]) for key in header}


def _differ(a, b):
    """The names of the header fields where ``a`` and ``b`` differ (NaN equal to NaN)."""
    fa, fb = _fields(a), _fields(b)
    return {k for k in fa if not np.array_equal(fa[k], fb[k], equal_nan=fa[k].dtype.kind == "f")}


@pytest.fixture
def nifti(tmp_path):
    path = tmp_path / "scan.nii.gz"
    pg.save(path, _volume(), affine=AFFINE, spacing=SPACING)
    return path


def _extract(capsys, source, folder, fmt, *more):
    code, out, err = cli(
        capsys, "extract", source, "--edge", "shift", *more, "-o", f"{folder}/", "--format", fmt
    )
    assert code == 0, err
    return out


# --------------------------------------------------------------------- a folder merges back


@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_takes_a_folder_of_each_format(capsys, tmp_path, nifti, fmt):
    _extract(capsys, nifti, tmp_path / "p", fmt, "--size", 8, "--stride", 4)
    code, _, err = cli(capsys, "merge", tmp_path / "p", "-o", tmp_path / "out.nii.gz")
    assert code == 0, err
    assert np.array_equal(_read(tmp_path / "out.nii.gz"), _volume())


@pytest.mark.parametrize("output", OUTPUTS)
def test_merge_of_a_folder_writes_each_output_format(capsys, tmp_path, nifti, output):
    _extract(capsys, nifti, tmp_path / "p", "npy", "--size", 6)
    code, _, err = cli(capsys, "merge", f"{tmp_path / 'p'}/", "-o", tmp_path / output)
    assert code == 0, err
    assert np.array_equal(_read(tmp_path / output), _volume())


@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_of_a_folder_keeps_the_sources_spacing_and_affine(capsys, tmp_path, nifti, fmt):
    _extract(capsys, nifti, tmp_path / "p", fmt, "--size", 6)
    cli(capsys, "merge", tmp_path / "p", "-o", tmp_path / "out.nii.gz")
    with pg.open(tmp_path / "out.nii.gz") as img:
        assert img.spacing == SPACING
        assert np.array_equal(img.affine, AFFINE)


def test_merge_of_a_folder_of_a_4d_scan_gives_it_back(capsys, tmp_path):
    source = _sample("example4d.nii.gz")
    _extract(capsys, source, tmp_path / "p", "nii", "--size", 32, "--stride", 24)
    code, _, err = cli(capsys, "merge", tmp_path / "p", "-o", tmp_path / "out.nii.gz")
    assert code == 0, err
    expected = np.asanyarray(nib.load(source).dataobj)
    assert np.array_equal(np.asanyarray(nib.load(tmp_path / "out.nii.gz").dataobj), expected)


def test_extract_says_it_wrote_the_manifest(capsys, tmp_path, nifti):
    out = _extract(capsys, nifti, tmp_path / "p", "nii", "--size", 6)
    assert "manifest.json" in out


def test_manifest_holds_the_grid_the_files_and_their_corners(capsys, tmp_path, nifti):
    _extract(capsys, nifti, tmp_path / "p", "tif", "--size", "6,8,10")
    meta = json.loads((tmp_path / "p" / "manifest.json").read_text())["patchgrid"]
    assert meta["grid"]["shape"] == list(SHAPE)
    assert meta["files"][5] == "patch_001_000_001.tif"
    assert meta["starts"][5] == [6, 0, 10]
    assert meta["source"]["spacing"] == list(SPACING)


def test_manifest_is_written_after_every_patch(capsys, tmp_path, nifti, monkeypatch):
    seen = []
    real = pio.save_patch

    def save_patch(path, *args):
        seen.append(os.listdir(os.path.dirname(path)))
        real(path, *args)

    monkeypatch.setattr(pio, "save_patch", save_patch)
    _extract(capsys, nifti, tmp_path / "p", "npy", "--size", 6)
    assert len(seen) == 2 * 3 * 4
    assert all("manifest.json" not in names for names in seen)
    assert "manifest.json" in os.listdir(tmp_path / "p")


def test_merge_without_zarr_installed_takes_a_folder(capsys, tmp_path, nifti, monkeypatch):
    _extract(capsys, nifti, tmp_path / "p", "nii", "--size", 6)
    monkeypatch.setitem(__import__("sys").modules, "zarr", None)
    code, _, err = cli(capsys, "merge", tmp_path / "p", "-o", tmp_path / "out.nii.gz")
    assert code == 0, err


# ------------------------------------------------------- a folder that disagrees is refused


def _folder(capsys, tmp_path, nifti, fmt="npy"):
    _extract(capsys, nifti, tmp_path / "p", fmt, "--size", 6)
    return tmp_path / "p"


def _lose(folder):
    os.remove(folder / "patch_001_002_003.npy")


def _add(folder):
    shutil.copy(folder / "patch_000_000_000.npy", folder / "patch_000_000_007.npy")


def _lose_and_add(folder):
    _lose(folder)
    _add(folder)


def _no_manifest(folder):
    os.remove(folder / "manifest.json")


def _not_json(folder):
    (folder / "manifest.json").write_text("{not json")


def _edit(change):
    def edit(folder):
        meta = json.loads((folder / "manifest.json").read_text())
        change(meta["patchgrid"])
        (folder / "manifest.json").write_text(json.dumps(meta))

    return edit


def _swap(meta):
    meta["files"][0], meta["files"][1] = meta["files"][1], meta["files"][0]


def _start(meta):
    meta["starts"][3][0] += 1


def _resized(folder):
    np.save(folder / "patch_000_001_000.npy", np.zeros((6, 6, 5), np.float32))


def _retyped(folder):
    np.save(folder / "patch_000_001_000.npy", np.zeros((6, 6, 5), np.float64))


REFUSED = [
    (
        _lose,
        r"does not match its manifest.json: 1 of its 24 patch files are missing "
        r"\(patch_001_002_003.npy\)",
        "missing",
    ),
    (_add, r"it holds 1 patch files that it does not list \(patch_000_000_007.npy\)", "extra"),
    (_lose_and_add, r"missing \(patch_001_002_003.npy\); it holds 1 patch files", "both"),
    (_no_manifest, r"has no manifest.json, which 'patchgrid extract' writes last", "no-manifest"),
    (_not_json, r"its manifest.json is not valid", "not-json"),
    (_edit(lambda m: m.pop("files")), r"manifest.json is not valid: it lacks 'files'", "no-files"),
    (_edit(_swap), r"the files its manifest.json lists are not those of its grid", "swapped"),
    (_edit(_start), r"1 stored patch corners differ from its grid's", "corner"),
    (
        _edit(lambda m: m["grid"].update(size=[0, 6, 6])),
        r"the grid in its manifest.json is not "
        r"valid",
        "bad-grid",
    ),
    (_edit(lambda m: m["source"].update(dtype="nope")), r"no valid dtype", "bad-dtype"),
    (
        _edit(lambda m: m["source"].update(nifti_header="AAAA")),
        r"the source's metadata it keeps "
        r"is not valid",
        "bad-header",
    ),
    (
        _resized,
        r"patch_000_001_000.npy' holds \(6, 6, 5\) float32 but the folder's manifest.json "
        r"says \(6, 6, 6\) float32",
        "resized",
    ),
    (_retyped, r"holds \(6, 6, 5\) float64 but .* says \(6, 6, 6\) float32", "retyped"),
]


@pytest.mark.parametrize(("spoil", "said"), [r[:2] for r in REFUSED], ids=[r[2] for r in REFUSED])
def test_a_folder_that_disagrees_with_its_manifest_is_refused_in_one_line(
    capsys, tmp_path, nifti, spoil, said
):
    folder = _folder(capsys, tmp_path, nifti)
    spoil(folder)
    code, _, err = cli(capsys, "merge", folder, "-o", tmp_path / "out.nii.gz")
    assert code == 1
    assert err.count("\n") == 1
    assert err.startswith("patchgrid merge: error: ")
    assert __import__("re").search(said, err), err
    assert not os.path.exists(tmp_path / "out.nii.gz")


def test_other_files_in_a_folder_do_not_stop_a_merge(capsys, tmp_path, nifti):
    folder = _folder(capsys, tmp_path, nifti)
    (folder / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, "merge", folder, "-o", tmp_path / "out.nii.gz")
    assert code == 0, err
    assert np.array_equal(_read(tmp_path / "out.nii.gz"), _volume())


def test_merge_refuses_to_write_over_a_patch_of_its_input(capsys, tmp_path, nifti):
    folder = _folder(capsys, tmp_path, nifti)
    patch = folder / "patch_000_000_000.npy"
    before = patch.read_bytes()
    code, _, err = cli(capsys, "merge", folder, "-o", patch, "--overwrite")
    assert code == 1
    assert "lies inside the input" in err
    assert patch.read_bytes() == before


def test_a_folder_of_patch_files_without_a_manifest_is_never_overwritten(capsys, tmp_path, nifti):
    folder = tmp_path / "p"
    folder.mkdir()
    np.save(folder / "patch_000_000_000.npy", np.ones(3))  # another tool's, named alike
    code, _, err = cli(
        capsys, "extract", nifti, "--size", 6, "-o", f"{folder}/", "--format", "npy", "--overwrite"
    )
    assert code == 1
    assert "has no manifest.json from 'patchgrid extract'" in err
    assert os.listdir(folder) == ["patch_000_000_000.npy"]


def test_a_folder_whose_manifest_is_not_patchgrids_is_never_overwritten(capsys, tmp_path, nifti):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"name": "my dataset"}')
    code, _, err = cli(
        capsys, "extract", nifti, "--size", 6, "-o", f"{folder}/", "--format", "npy", "--overwrite"
    )
    assert code == 1
    assert "has no manifest.json from 'patchgrid extract'" in err
    assert (folder / "manifest.json").read_text() == '{"name": "my dataset"}'


def test_a_folder_extract_wrote_is_overwritten(capsys, tmp_path, nifti):
    _folder(capsys, tmp_path, nifti, fmt="nii")
    _extract(capsys, nifti, tmp_path / "p", "tif", "--size", 12, "--overwrite")
    assert sorted(os.listdir(tmp_path / "p"))[0] == "manifest.json"
    assert len(os.listdir(tmp_path / "p")) == 1 + 1 * 2 * 2


# ------------------------------------------------------------------ NIfTI headers, carried


def _first_patch(folder, name):
    return nib.load(folder / name)


@pytest.mark.parametrize(("name", "size", "stride"), SAMPLES, ids=[s[0] for s in SAMPLES])
def test_merge_of_a_folder_keeps_the_whole_header(capsys, tmp_path, name, size, stride):
    source = nib.load(_sample(name))
    _extract(capsys, _sample(name), tmp_path / "p", "nii", "--size", size, "--stride", stride)
    cli(capsys, "merge", tmp_path / "p", "-o", tmp_path / "out.nii")
    merged = nib.load(tmp_path / "out.nii")
    assert _differ(source.header, merged.header) == set()
    assert type(merged) is type(source)
    assert np.array_equal(np.asanyarray(merged.dataobj), np.asanyarray(source.dataobj))


@pytest.mark.parametrize(("name", "size", "stride"), SAMPLES, ids=[s[0] for s in SAMPLES])
def test_merge_of_a_store_keeps_the_whole_header(capsys, tmp_path, name, size, stride):
    source = nib.load(_sample(name))
    cli(
        capsys,
        "extract",
        _sample(name),
        "--size",
        size,
        "--stride",
        stride,
        "-o",
        tmp_path / "p.zarr",
    )
    cli(capsys, "merge", tmp_path / "p.zarr", "-o", tmp_path / "out.nii.gz")
    assert _differ(source.header, nib.load(tmp_path / "out.nii.gz").header) == set()


def test_merge_keeps_the_header_extensions(capsys, tmp_path):
    source = nib.load(_sample("example4d.nii.gz"))
    cli(capsys, "extract", _sample("example4d.nii.gz"), "--size", 16, "-o", tmp_path / "p.zarr")
    cli(capsys, "merge", tmp_path / "p.zarr", "-o", tmp_path / "out.nii.gz")
    merged = nib.load(tmp_path / "out.nii.gz").header.extensions
    assert [(e.get_code(), e.get_content()) for e in merged] == [
        (e.get_code(), e.get_content()) for e in source.header.extensions
    ]


# anatomical.nii, (33, 41, 25): 16-voxel patches, the last on each axis shifted back.
PATCHES = [("patch_000_000_000.nii.gz", (0, 0, 0)), ("patch_001_002_001.nii.gz", (16, 25, 9))]


@pytest.mark.parametrize(("name", "corner"), PATCHES, ids=["first", "shifted"])
def test_a_nifti_patch_has_the_sources_header_moved_to_its_corner(capsys, tmp_path, name, corner):
    source = nib.load(_sample("anatomical.nii"))
    _extract(capsys, _sample("anatomical.nii"), tmp_path / "p", "nii", "--size", 16)
    patch = nib.load(tmp_path / "p" / name)
    assert _differ(source.header, patch.header) <= MOVED
    assert patch.header["qform_code"] == 2
    assert patch.header["sform_code"] == 2
    assert np.allclose(patch.header.get_qform(), source.header.get_qform() @ _shift(corner))
    assert np.allclose(patch.header.get_sform(), source.header.get_sform() @ _shift(corner))
    assert np.array_equal(np.asanyarray(patch.dataobj), _crop(source, corner, 16))


def _shift(corner):
    move = np.eye(4)
    move[:3, 3] = corner[:3]
    return move


def _crop(img, corner, size):
    return np.asanyarray(img.dataobj)[tuple(slice(c, c + size) for c in corner)]


def test_a_4d_patch_keeps_units_codes_description_and_display_range(capsys, tmp_path):
    source = nib.load(_sample("example4d.nii.gz")).header
    _extract(capsys, _sample("example4d.nii.gz"), tmp_path / "p", "nii", "--size", 16)
    patch = nib.load(tmp_path / "p" / "patch_001_001_000.nii.gz").header
    for key in ("qform_code", "sform_code", "xyzt_units", "descrip", "dim_info", "cal_max"):
        assert np.array_equal(patch[key], source[key]), key
    assert patch.get_xyzt_units() == ("mm", "sec")


def test_slice_timing_is_cleared_where_a_patch_cuts_the_slice_axis(capsys, tmp_path):
    # example4d: slices along axis 2 (dim_info), slice_end 23 of 24 slices.
    _extract(capsys, _sample("example4d.nii.gz"), tmp_path / "p", "nii", "--size", 16)
    patch = nib.load(tmp_path / "p" / "patch_000_000_001.nii.gz").header
    assert (int(patch["slice_start"]), int(patch["slice_end"])) == (0, 0)


def test_slice_timing_is_kept_where_a_patch_holds_every_slice(capsys, tmp_path):
    _extract(capsys, _sample("example4d.nii.gz"), tmp_path / "p", "nii", "--size", "32,32,24")
    patch = nib.load(tmp_path / "p" / "patch_001_002_000.nii.gz").header
    assert int(patch["slice_end"]) == 23


def test_a_patch_of_a_later_time_point_starts_later(capsys, tmp_path):
    source = nib.load(_sample("example4d.nii.gz")).header
    _extract(
        capsys,
        _sample("example4d.nii.gz"),
        tmp_path / "p",
        "nii",
        "--size",
        "64,48,24,1",
        "--axes",
        "0,1,2,3",
    )
    later = nib.load(tmp_path / "p" / "patch_000_000_000_001.nii.gz").header
    assert later["toffset"] == source["toffset"] + source["pixdim"][4]


def test_a_scaled_nifti_round_trips_to_its_values(capsys, tmp_path):
    # functional.nii stores int16 with a slope and an intercept: its values are floats.
    name = _sample("functional.nii")
    source = nib.load(name)
    _extract(capsys, name, tmp_path / "p", "nii", "--size", "8,8,3")
    cli(capsys, "merge", tmp_path / "p", "-o", tmp_path / "out.nii.gz")
    merged = nib.load(tmp_path / "out.nii.gz")
    assert np.array_equal(merged.get_fdata(), source.get_fdata())
    assert _differ(source.header, merged.header) == {"datatype", "bitpix"}


def test_merge_into_another_dtype_clears_the_display_range(capsys, tmp_path):
    source = _sample("example4d.nii.gz")
    cli(capsys, "extract", source, "--size", 16, "-o", tmp_path / "p.zarr")
    cli(capsys, "merge", tmp_path / "p.zarr", "-o", tmp_path / "out.nii.gz", "--dtype", "float32")
    merged = nib.load(tmp_path / "out.nii.gz").header
    assert (float(merged["cal_min"]), float(merged["cal_max"])) == (0.0, 0.0)
    assert merged.get_data_dtype() == np.float32
    assert merged["descrip"] == nib.load(source).header["descrip"]


# ------------------------------------------------------------------------------ .npy outputs


def test_merge_to_npy_says_what_the_file_cannot_keep(capsys, tmp_path, nifti):
    cli(capsys, "extract", nifti, "--size", 6, "-o", tmp_path / "p.zarr")
    code, _, err = cli(capsys, "merge", tmp_path / "p.zarr", "-o", tmp_path / "out.npy")
    assert code == 0
    assert err == (
        f"patchgrid merge: warning: {tmp_path / 'out.npy'}: a .npy file holds no spacing or "
        f"affine: the spacing (2, 0.5, 0.25) and the affine are not saved (.nii.gz, .tif, "
        f".zarr and .h5 keep them)\n"
    )


def test_merge_to_npy_of_an_image_without_metadata_says_nothing(capsys, tmp_path):
    pg.save(tmp_path / "v.npy", _volume())
    cli(capsys, "extract", tmp_path / "v.npy", "--size", 6, "-o", tmp_path / "p.zarr")
    code, _, err = cli(capsys, "merge", tmp_path / "p.zarr", "-o", tmp_path / "out.npy")
    assert (code, err) == (0, "")
