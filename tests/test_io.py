"""Files: pg.open and pg.save for every format, dtype and piece of metadata (issue #4, item 1).

Every file is written by the test into ``tmp_path`` (or is one of nibabel's own sample scans).
"Reads only the region" is checked with a wrapper that records every key it is indexed with;
"memory-mapped" by following the read array's ``base`` chain down to an ``mmap.mmap``.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
tifffile = pytest.importorskip("tifffile")
zarr = pytest.importorskip("zarr")
h5py = pytest.importorskip("h5py")

from nibabel.testing import data_path  # noqa: E402

import patchgrid as pg  # noqa: E402
import patchgrid.io as pio  # noqa: E402

EXTS = ["npy", "nii", "nii.gz", "tif", "tiff", "zarr", "h5", "hdf5"]
# Formats that store spacing and an affine (.npy has nowhere to put them).
META_EXTS = [e for e in EXTS if e != "npy"]
DTYPES = ["uint8", "int16", "float32", "float64"]
SHAPE = (5, 6, 7)  # no axis of 3 or 4: tifffile would take a uint8 one for colour samples
SPACING = (0.5, 1.5, 2.5)
# A rotation with a translation; every entry exact in float32, as NIfTI stores it.
AFFINE = np.array(
    [
        [0.0, -2.0, 0.0, 10.0],
        [1.5, 0.0, 0.0, -3.0],
        [0.0, 0.0, 3.0, 7.25],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
SAMPLES = ["anatomical.nii", "example4d.nii.gz"]


def _volume(dtype="float32", shape=SHAPE, seed=0):
    return (np.random.default_rng(seed).random(shape) * 200).astype(dtype)


def _path(tmp_path, ext, stem="image"):
    return str(tmp_path / f"{stem}.{ext}")


def _saved(tmp_path, ext, array, stem="image", **meta):
    path = _path(tmp_path, ext, stem)
    pg.save(path, array, **meta)
    return path


def _read(path):
    with pg.open(path) as img:
        return np.asarray(img)


def _sample(name):
    return os.path.join(data_path, name)


def _memory_mapped(array):
    """True when the array's memory is a file mapped into memory."""
    base = array
    while base is not None:
        if isinstance(base, mmap.mmap):
            return True
        base = getattr(base, "base", None)
    return False


class Recorder:
    """A lazy array that records every key it is indexed with ('whole' for np.asarray)."""

    def __init__(self, data):
        self.data = data
        self.shape = tuple(data.shape)
        self.dtype = data.dtype
        self.ndim = len(self.shape)
        self.keys = []
        self.sizes = []  # voxels returned by each read

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        block = np.asarray(self.data[key])
        self.keys.append(key)
        self.sizes.append(block.size)
        return block

    def __array__(self, dtype=None, copy=None):
        block = np.asarray(self.data, dtype=dtype)
        self.keys.append("whole")
        self.sizes.append(block.size)
        return block


class FailingArray:
    """An array-like whose every read raises, as a network file or a full disk would."""

    shape = SHAPE
    dtype = np.dtype("float32")
    ndim = 3

    def __getitem__(self, key):
        raise OSError("the source went away while it was being read")

    def __array__(self, dtype=None, copy=None):
        raise OSError("the source went away while it was being read")


# ------------------------------------------------------------------------ formats and dtypes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ext", EXTS)
def test_save_then_open_gives_the_array_back_exactly(tmp_path, ext, dtype):
    array = _volume(dtype)
    path = _saved(tmp_path, ext, array)
    got = _read(path)
    assert got.dtype == np.dtype(dtype)
    assert np.array_equal(got, array)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ext", EXTS)
def test_open_reports_shape_dtype_ndim(tmp_path, ext, dtype):
    path = _saved(tmp_path, ext, _volume(dtype))
    with pg.open(path) as img:
        assert (img.shape, img.dtype, img.ndim) == (SHAPE, np.dtype(dtype), 3)


@pytest.mark.parametrize("ext", META_EXTS)
def test_spacing_round_trips(tmp_path, ext):
    path = _saved(tmp_path, ext, _volume(), spacing=SPACING)
    with pg.open(path) as img:
        assert img.spacing == SPACING


@pytest.mark.parametrize("ext", META_EXTS)
def test_affine_round_trips(tmp_path, ext):
    path = _saved(tmp_path, ext, _volume(), affine=AFFINE, spacing=(1.5, 2.0, 3.0))
    with pg.open(path) as img:
        assert np.array_equal(img.affine, AFFINE)


def test_npy_has_unit_spacing_and_no_affine(tmp_path):
    path = _saved(tmp_path, "npy", _volume(), spacing=SPACING)
    with pg.open(path) as img:
        assert (img.spacing, img.affine) == ((1.0, 1.0, 1.0), None)


@pytest.mark.parametrize("ext", ["zarr", "h5", "tif"])
def test_affine_is_none_where_none_was_saved(tmp_path, ext):
    path = _saved(tmp_path, ext, _volume())
    with pg.open(path) as img:
        assert img.affine is None


def test_nifti_saved_with_spacing_only_gets_a_scaling_affine(tmp_path):
    path = _saved(tmp_path, "nii.gz", _volume(), spacing=(2.0, 3.0, 4.0))
    with pg.open(path) as img:
        assert np.array_equal(img.affine, np.diag([2.0, 3.0, 4.0, 1.0]))


def test_nifti_saved_with_affine_only_takes_its_spacing_from_the_affine(tmp_path):
    # The voxel size is in the affine; the header's pixdim must not contradict it.
    path = _saved(tmp_path, "nii.gz", _volume(), affine=np.diag([2.0, 3.0, 4.0, 1.0]))
    with pg.open(path) as img:
        assert img.spacing == (2.0, 3.0, 4.0)


@pytest.mark.parametrize("ext", META_EXTS)
def test_save_like_carries_spacing_and_affine_across_formats(tmp_path, ext):
    source = _saved(
        tmp_path, "nii.gz", _volume(), stem="source", affine=AFFINE, spacing=(1.5, 2.0, 3.0)
    )
    with pg.open(source) as like:
        path = _saved(tmp_path, ext, np.asarray(like), like=like)
    with pg.open(path) as img:
        assert img.spacing == (1.5, 2.0, 3.0)
        assert np.array_equal(img.affine, AFFINE)


def test_explicit_spacing_overrides_like(tmp_path):
    source = _saved(tmp_path, "zarr", _volume(), stem="source", spacing=SPACING)
    with pg.open(source) as like:
        path = _saved(tmp_path, "h5", np.asarray(like), like=like, spacing=(9.0, 8.0, 7.0))
    with pg.open(path) as img:
        assert img.spacing == (9.0, 8.0, 7.0)


@pytest.mark.parametrize("ext", EXTS)
def test_save_copies_a_lazy_image(tmp_path, ext):
    array = _volume("int16")
    source = _saved(tmp_path, "h5", array, stem="source")
    with pg.open(source) as img:
        path = _saved(tmp_path, ext, img)
    assert np.array_equal(_read(path), array)


# ------------------------------------------------------------------------ nibabel's samples


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_scan_opens_with_nibabels_shape_and_affine(name):
    scan = nib.load(_sample(name))
    with pg.open(_sample(name)) as img:
        assert img.shape == scan.shape
        assert np.array_equal(img.affine, scan.affine)


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_scan_spacing_is_the_header_zooms(name):
    zooms = tuple(float(z) for z in nib.load(_sample(name)).header.get_zooms())
    with pg.open(_sample(name)) as img:
        assert img.spacing == zooms


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_scan_data_equals_nibabels(name):
    expected = np.asanyarray(nib.load(_sample(name)).dataobj)
    assert np.array_equal(_read(_sample(name)), expected)


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_scan_saved_like_itself_round_trips(tmp_path, name):
    with pg.open(_sample(name)) as source:
        path = _saved(tmp_path, "nii.gz", source, like=source)
        with pg.open(path) as img:
            assert np.array_equal(np.asarray(img), np.asarray(source))
            assert np.array_equal(img.affine, source.affine)
            assert img.spacing == source.spacing


# ------------------------------------------------------------------------ lazy reads


REGIONS = [
    ((slice(1, 3), slice(2, 5), slice(0, 4)), "box"),
    ((2,), "one-plane"),
    ((slice(None), 3, slice(1, 6, 2)), "strided-line"),
]


@pytest.mark.parametrize(("key", "_name"), REGIONS, ids=[r[1] for r in REGIONS])
@pytest.mark.parametrize("ext", EXTS)
def test_slice_returns_that_region(tmp_path, ext, key, _name):
    array = _volume("int16")
    with pg.open(_saved(tmp_path, ext, array)) as img:
        assert np.array_equal(img[key], array[key])


@pytest.mark.parametrize("ext", EXTS)
def test_slice_reads_only_that_region(tmp_path, ext, monkeypatch):
    key = (slice(1, 3), slice(2, 5), slice(0, 4))
    with pg.open(_saved(tmp_path, ext, _volume())) as img:
        # The wrapped file object (img.source); recording what it is asked for is the point.
        recorder = Recorder(img.source)
        monkeypatch.setattr(img, "source", recorder)
        img[key]
    assert recorder.sizes == [2 * 3 * 4]


@pytest.mark.parametrize("ext", ["npy", "tif"])
def test_uncompressed_file_is_memory_mapped(tmp_path, ext):
    with pg.open(_saved(tmp_path, ext, _volume())) as img:
        assert _memory_mapped(img[1:3])


def test_compressed_tiff_reads_regions(tmp_path):
    array = _volume("uint16", shape=(4, 32, 32))
    path = _path(tmp_path, "tif")
    tifffile.imwrite(path, array, compression="zlib", tile=(16, 16), photometric="minisblack")
    with pg.open(path) as img:
        assert np.array_equal(img[1:3, 5:20, 10:30], array[1:3, 5:20, 10:30])


def test_tiff_resolution_tags_give_spacing(tmp_path):
    path = _path(tmp_path, "tif")
    tifffile.imwrite(path, _volume("uint8"), resolution=(2.0, 4.0))  # pixels per unit, x then y
    with pg.open(path) as img:
        assert img.spacing == (1.0, 0.25, 0.5)


def test_imagej_tiff_z_spacing(tmp_path):
    path = _path(tmp_path, "tif")
    tifffile.imwrite(
        path,
        _volume("uint8"),
        imagej=True,
        resolution=(2.0, 4.0),
        metadata={"spacing": 3.0, "unit": "um"},
    )
    with pg.open(path) as img:
        assert img.spacing == (3.0, 0.25, 0.5)


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
@pytest.mark.parametrize(
    "shape", [(3, 8, 9), (4, 8, 9), (8, 9, 3)], ids=["3-planes", "4-planes", "3-last"]
)
def test_tiff_with_few_planes_is_a_volume_not_colour(tmp_path, shape, dtype):
    # filterwarnings=error: tifffile warns before it stores (3, y, x) uint8 as planar RGB.
    array = _volume(dtype, shape=shape)
    path = _saved(tmp_path, "tif", array, spacing=(2.0, 0.5, 0.25))
    with pg.open(path) as img:
        assert (img.shape, img.spacing) == (shape, (2.0, 0.5, 0.25))
        assert np.array_equal(np.asarray(img), array)


@pytest.mark.parametrize("name", ["g/b", "/g/b"], ids=["relative", "absolute"])
def test_h5_dataset_named_after_a_colon(tmp_path, name):
    path = _path(tmp_path, "h5")
    with h5py.File(path, "w") as f:
        f["a"] = np.zeros(3)
        f.create_group("g")["b"] = np.arange(4)
    assert np.array_equal(_read(f"{path}:{name}"), np.arange(4))


def test_h5_single_dataset_needs_no_name(tmp_path):
    path = _path(tmp_path, "h5")
    with h5py.File(path, "w") as f:
        f.create_group("deep")["raw"] = np.arange(6).reshape(2, 3)
    assert np.array_equal(_read(path), np.arange(6).reshape(2, 3))


def test_h5_element_size_um_gives_spacing(tmp_path):
    path = _path(tmp_path, "h5")
    with h5py.File(path, "w") as f:
        f["raw"] = _volume()
        f["raw"].attrs["element_size_um"] = [2.0, 0.5, 0.5]
    with pg.open(path) as img:
        assert img.spacing == (2.0, 0.5, 0.5)


def test_save_h5_into_a_named_dataset(tmp_path):
    path = _path(tmp_path, "h5")
    pg.save(f"{path}:volume", _volume())
    with h5py.File(path, "r") as f:
        assert list(f) == ["volume"]


def test_zarr_group_with_one_array_opens_it(tmp_path):
    path = _path(tmp_path, "zarr")
    group = zarr.open_group(path, mode="w")
    group.create_array("only", data=_volume())
    assert np.array_equal(_read(path), _volume())


# ------------------------------------------------------------------------ errors


@pytest.mark.parametrize("ext", EXTS)
def test_open_missing_file(tmp_path, ext):
    with pytest.raises(FileNotFoundError, match="no such file"):
        pg.open(_path(tmp_path, ext, "missing"))


@pytest.mark.parametrize("name", ["image.png", "image", "image.nii.bz2"])
def test_open_unknown_extension(tmp_path, name):
    (tmp_path / name).write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="format"):
        pg.open(str(tmp_path / name))


def test_save_unknown_extension_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="format"):
        pg.save(str(tmp_path / "image.png"), _volume())
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("ext", ["npy", "nii", "nii.gz", "tif", "h5"])
@pytest.mark.parametrize("content", [b"", b"this is not an image " * 20], ids=["empty", "garbage"])
def test_open_corrupt_file(tmp_path, ext, content):
    path = _path(tmp_path, ext)
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(ValueError, match="cannot read"):
        pg.open(path)


def test_open_corrupt_zarr(tmp_path):
    path = tmp_path / "image.zarr"
    path.mkdir()
    (path / "zarr.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        pg.open(str(path))


@pytest.mark.parametrize("ext", ["npy", "nii"])
def test_open_folder_named_like_a_file(tmp_path, ext):
    path = _path(tmp_path, ext)
    os.mkdir(path)
    with pytest.raises(ValueError, match="cannot read"):
        pg.open(path)


@pytest.mark.parametrize("ext", ["npy", "h5"])
def test_open_truncated_file(tmp_path, ext):
    path = _saved(tmp_path, ext, _volume(shape=(16, 16, 16)))
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read"):
        pg.open(path)


@pytest.mark.parametrize("ext", ["nii", "nii.gz", "tif"])
def test_read_truncated_file(tmp_path, ext):
    # Lazy formats may open a truncated file; reading what is missing must say what is wrong.
    # (One plane: tifffile leaks a file handle when several chunk reads fail at once.)
    path = _saved(tmp_path, ext, _volume(shape=(16, 16, 16)))
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read"), pg.open(path) as img:
        img[15]


def test_h5_with_two_datasets_and_no_name_lists_them(tmp_path):
    path = _path(tmp_path, "h5")
    with h5py.File(path, "w") as f:
        f["raw"] = np.zeros(3)
        f.create_group("labels")["seg"] = np.ones(3)
    with pytest.raises(ValueError, match=r"2 datasets.*\['labels/seg', 'raw'\]"):
        pg.open(path)


def test_h5_unknown_dataset_name(tmp_path):
    path = _saved(tmp_path, "h5", _volume())
    with pytest.raises(ValueError, match="no dataset 'nope'"):
        pg.open(f"{path}:nope")


def test_zarr_group_with_two_arrays_and_no_name_lists_them(tmp_path):
    path = _path(tmp_path, "zarr")
    group = zarr.open_group(path, mode="w")
    group.create_array("a", data=np.zeros(3))
    group.create_array("b", data=np.ones(3))
    with pytest.raises(ValueError, match=r"\['a', 'b'\]"):
        pg.open(path)


@pytest.mark.parametrize("ext", EXTS)
def test_save_over_existing_file_raises(tmp_path, ext):
    path = _saved(tmp_path, ext, _volume(seed=1))
    with pytest.raises(FileExistsError, match="overwrite"):
        pg.save(path, _volume(seed=2))


@pytest.mark.parametrize("ext", EXTS)
def test_save_over_existing_file_keeps_it(tmp_path, ext):
    path = _saved(tmp_path, ext, _volume(seed=1))
    with pytest.raises(FileExistsError, match="overwrite"):
        pg.save(path, _volume(seed=2))
    assert np.array_equal(_read(path), _volume(seed=1))


@pytest.mark.parametrize("ext", EXTS)
def test_save_overwrite_replaces(tmp_path, ext):
    path = _saved(tmp_path, ext, _volume(seed=1))
    pg.save(path, _volume(seed=2), overwrite=True)
    assert np.array_equal(_read(path), _volume(seed=2))


def test_save_into_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pg.save(str(tmp_path / "nowhere" / "image.npy"), _volume())


def test_save_spacing_of_wrong_length(tmp_path):
    with pytest.raises(ValueError, match="spacing must have one entry per axis"):
        pg.save(_path(tmp_path, "zarr"), _volume(), spacing=(1.0, 2.0))


def test_save_affine_of_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match="affine must be 4 x 4"):
        pg.save(_path(tmp_path, "nii.gz"), _volume(), affine=np.eye(3))


# ------------------------------------------------------------------------ atomic writes


@pytest.mark.parametrize("ext", EXTS)
def test_failed_write_leaves_nothing(tmp_path, ext, monkeypatch):
    fmt = pio.split_path(_path(tmp_path, ext))[1]
    real = pio.WRITERS[fmt]

    def write_then_fail(tmp, *args):
        real(tmp, *args)  # the whole temporary output exists when the failure comes
        raise OSError("disk full")

    monkeypatch.setitem(pio.WRITERS, fmt, write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        pg.save(_path(tmp_path, ext), _volume())
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("ext", EXTS)
def test_source_failing_halfway_leaves_nothing(tmp_path, ext):
    with pytest.raises(OSError, match="went away"):
        pg.save(_path(tmp_path, ext), FailingArray())
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("ext", EXTS)
def test_failed_overwrite_keeps_the_old_file(tmp_path, ext):
    path = _saved(tmp_path, ext, _volume(seed=1))
    with pytest.raises(OSError, match="went away"):
        pg.save(path, FailingArray(), overwrite=True)
    assert np.array_equal(_read(path), _volume(seed=1))


@pytest.mark.parametrize("ext", EXTS)
def test_failed_overwrite_leaves_no_temporary_files(tmp_path, ext):
    path = _saved(tmp_path, ext, _volume(seed=1))
    with pytest.raises(OSError, match="went away"):
        pg.save(path, FailingArray(), overwrite=True)
    assert os.listdir(tmp_path) == [os.path.basename(path)]


# ------------------------------------------------------------ lazy arrays in, regions read


def _double(batch):
    return 2 * batch


@pytest.mark.parametrize("ext", EXTS)
def test_apply_on_an_open_image_equals_apply_on_the_array(tmp_path, ext):
    array = _volume(shape=(12, 10, 9))
    with pg.open(_saved(tmp_path, ext, array)) as img:
        got = pg.apply(_double, img, size=4, stride=3, progress=False)
    assert np.array_equal(got, pg.apply(_double, array, size=4, stride=3, progress=False))


@pytest.mark.parametrize("ext", EXTS)
def test_extract_on_an_open_image_equals_extract_on_the_array(tmp_path, ext):
    array = _volume(shape=(12, 10, 9))
    with pg.open(_saved(tmp_path, ext, array)) as img:
        got = pg.extract(img, size=4, stride=3, edge="shift")
    assert np.array_equal(got, pg.extract(array, size=4, stride=3, edge="shift"))


@pytest.fixture(params=["zarr-array", "h5py-dataset", "memmap"])
def plain_lazy(request, tmp_path):
    """A lazy array from the libraries themselves (not a pg.Image) holding _volume((12, 10, 9))."""
    array = _volume(shape=(12, 10, 9))
    if request.param == "zarr-array":
        lazy = zarr.create_array(str(tmp_path / "a.zarr"), data=array, chunks=(4, 5, 9))
        yield lazy
    elif request.param == "h5py-dataset":
        with h5py.File(tmp_path / "a.h5", "w") as f:
            f.create_dataset("a", data=array, chunks=(4, 5, 9))
            yield f["a"]
    else:
        np.save(tmp_path / "a.npy", array)
        yield np.load(tmp_path / "a.npy", mmap_mode="r")


def test_apply_on_a_plain_lazy_array(plain_lazy):
    expected = pg.apply(_double, _volume(shape=(12, 10, 9)), size=4, stride=3, progress=False)
    assert np.array_equal(pg.apply(_double, plain_lazy, size=4, stride=3, progress=False), expected)


def test_extract_on_a_plain_lazy_array(plain_lazy):
    expected = pg.extract(_volume(shape=(12, 10, 9)), size=4, stride=3, edge="even")
    assert np.array_equal(pg.extract(plain_lazy, size=4, stride=3, edge="even"), expected)


def test_merge_of_lazy_patches(tmp_path):
    array = _volume(shape=(12, 10, 9))
    patches = pg.extract(array, size=4, stride=2, edge="shift", flatten=True)
    grid = pg.PatchGrid(array.shape, 4, 2, edge="shift")
    lazy = zarr.create_array(str(tmp_path / "p.zarr"), data=np.ascontiguousarray(patches))
    assert np.allclose(pg.merge(lazy, grid), array)


def test_apply_reads_no_more_than_a_row_of_a_batch_at_once(tmp_path):
    recorder = Recorder(_volume(shape=(12, 12, 12)))
    pg.apply(_double, recorder, size=4, stride=4, batch_size=2, progress=False)
    assert max(recorder.sizes) == 4 * 4 * 8  # two patches side by side


def test_apply_reads_each_voxel_once(tmp_path):
    recorder = Recorder(_volume(shape=(12, 12, 12)))
    pg.apply(_double, recorder, size=4, stride=4, progress=False)
    assert sum(recorder.sizes) == 12**3


def test_extract_never_reads_the_whole_lazy_image():
    # size 4 every 8 voxels on 12: voxels 4..7 of every axis are in no patch.
    recorder = Recorder(_volume(shape=(12, 12, 12)))
    pg.extract(recorder, size=4, stride=8)
    assert "whole" not in recorder.keys


def test_extract_reads_no_voxel_outside_the_patches():
    recorder = Recorder(_volume(shape=(12, 12, 12)))
    pg.extract(recorder, size=4, stride=8)
    assert sum(recorder.sizes) <= 8 * 4 * 4 * 4


def test_tune_allocator_sets_the_threshold_in_its_own_process():
    import subprocess
    import sys

    code = "import patchgrid as pg; print(pg.tune_allocator(8 << 20))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    glibc = sys.platform.startswith("linux") and "glibc" in " ".join(platform_libc())
    assert done.stdout.strip() == ("True" if glibc else "False")


def platform_libc():
    import platform

    return platform.libc_ver()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4M"])
def test_tune_allocator_refuses_a_bad_threshold(bad):
    with pytest.raises(TypeError, match="threshold must be a positive int"):
        pg.tune_allocator(bad)


def test_tiles_find_malloc_trim_where_glibc_runs():
    import importlib
    import sys

    memory = importlib.import_module("patchgrid._memory")
    glibc = sys.platform.startswith("linux") and "glibc" in " ".join(platform_libc())
    assert (getattr(memory.libc(), "malloc_trim", None) is not None) == glibc


# ------------------------------------------------------- arrays inside a zarr group (#16, 8)


def _group(tmp_path):
    path = _path(tmp_path, "zarr")
    group = zarr.open_group(path, mode="w")
    group.create_array("patches", data=_volume())
    group.create_array("starts", data=np.arange(6).reshape(2, 3))
    group.create_group("inner").create_array("deep", data=_volume(seed=3))
    return path


@pytest.mark.parametrize("form", ["{}/patches", "{}:patches", "{}/patches/"])
def test_an_array_of_a_zarr_group_opens_by_its_name(tmp_path, form):
    assert np.array_equal(_read(form.format(_group(tmp_path))), _volume())


def test_an_array_in_a_zarr_subgroup_opens_by_its_path(tmp_path):
    assert np.array_equal(_read(f"{_group(tmp_path)}/inner/deep"), _volume(seed=3))


def test_the_form_the_zarr_group_message_suggests_works(tmp_path):
    path = _group(tmp_path)
    with pytest.raises(ValueError, match="name one of its arrays as") as caught:
        pg.open(path)
    form = str(caught.value).split(" as ")[1].split(" ")[0]
    assert form == f"{path}/ARRAY"
    assert np.array_equal(_read(form.replace("ARRAY", "patches")), _volume())


def test_a_missing_array_of_a_zarr_group_is_named(tmp_path):
    path = _group(tmp_path)
    with pytest.raises(ValueError, match=r"with no array 'nope'.*'inner/deep', 'patches'"):
        pg.open(f"{path}/nope")


def test_a_name_after_a_zarr_array_is_refused(tmp_path):
    path = _saved(tmp_path, "zarr", _volume())
    with pytest.raises(ValueError, match="is a zarr array, not a group"):
        pg.open(f"{path}/x")


@pytest.mark.parametrize("form", ["{}/arr", "{}:arr"])
def test_save_into_an_array_of_a_zarr_group_is_refused_and_writes_nothing(tmp_path, form):
    with pytest.raises(ValueError, match="not an array inside a group"):
        pg.save(form.format(_path(tmp_path, "zarr")), _volume())
    assert os.listdir(tmp_path) == []


def test_a_file_inside_a_folder_named_zarr_keeps_its_own_format(tmp_path):
    os.mkdir(tmp_path / "data.zarr")
    path = str(tmp_path / "data.zarr" / "scan.nii.gz")
    pg.save(path, _volume())
    assert pg.open(path).format == "nifti"


# --------------------------------------------------------- install hints (#16, item 5)


def _extras():
    """The optional libraries each extra of pyproject.toml brings, read from the file."""
    tomllib = pytest.importorskip("tomllib")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    return {
        extra: {req.split("[")[0].split(">")[0].split("=")[0].strip() for req in reqs}
        for extra, reqs in extras.items()
    }


@pytest.mark.parametrize("module", sorted(pio.EXTRAS))
def test_each_hint_names_the_extra_that_brings_the_library(module):
    assert module in _extras()[pio.EXTRAS[module]]


# (format, library, what the message says first)
READERS = [
    ("nii.gz", "nibabel", "reading .nii/.nii.gz"),
    ("tif", "tifffile", "reading .tif/.tiff"),
    ("zarr", "zarr", "reading .zarr"),
    ("h5", "h5py", "reading .h5/.hdf5"),
]


@pytest.mark.parametrize(("ext", "module", "what"), READERS, ids=[r[1] for r in READERS])
def test_open_without_its_library_says_which_extra_brings_it(
    tmp_path, monkeypatch, ext, module, what
):
    path = _saved(tmp_path, ext, _volume())
    monkeypatch.setitem(__import__("sys").modules, module, None)
    with pytest.raises(
        ValueError, match=rf"^{what} needs {module}: pip install 'patchgrid\[io\]'$"
    ):
        pg.open(path)


@pytest.mark.parametrize(("ext", "module", "what"), READERS, ids=[r[1] for r in READERS])
def test_save_without_its_library_says_which_extra_brings_it(
    tmp_path, monkeypatch, ext, module, what
):
    monkeypatch.setitem(__import__("sys").modules, module, None)
    said = what.replace("reading", "writing")
    with pytest.raises(
        ValueError, match=rf"^{said} needs {module}: pip install 'patchgrid\[io\]'$"
    ):
        pg.save(_path(tmp_path, ext), _volume())
    assert os.listdir(tmp_path) == []


def test_a_compressed_tiff_without_zarr_says_which_extra_brings_it(tmp_path, monkeypatch):
    path = _path(tmp_path, "tif")
    tifffile.imwrite(path, _volume(), compression="zlib")
    monkeypatch.setitem(__import__("sys").modules, "zarr", None)
    with pytest.raises(ValueError, match=r"reading a compressed .tif needs zarr: .*\[io\]"):
        pg.open(path)


@pytest.mark.parametrize(
    ("module", "extra"), [("matplotlib", "plot"), ("torch", "torch"), ("numba", "fast")]
)
def test_need_names_the_extra_of_every_optional_library(monkeypatch, module, extra):
    monkeypatch.setitem(__import__("sys").modules, module, None)
    with pytest.raises(ValueError, match=rf"^{module} is not installed: .*\[{extra}\]'$"):
        pio.need(module)


def test_a_library_that_fails_to_import_is_not_called_missing(monkeypatch):
    def broken(name):
        raise ModuleNotFoundError("No module named 'numcodecs'", name="numcodecs")

    monkeypatch.setattr(pio.importlib, "import_module", broken)
    with pytest.raises(ValueError, match=r"zarr is installed but cannot be imported .*numcodecs"):
        pio.need("zarr", "writing .zarr")


@pytest.mark.parametrize(
    ("args", "module", "said"),
    [
        (["-o", "b.zarr"], "zarr", "writing .zarr needs zarr"),
        (["-o", "p/", "--format", "nii"], "nibabel", "writing .nii/.nii.gz needs nibabel"),
        (["-o", "p/", "--format", "tif"], "tifffile", "writing .tif/.tiff needs tifffile"),
    ],
    ids=["zarr", "nii", "tif"],
)
def test_extract_without_a_library_says_which_extra_brings_it(
    capsys, tmp_path, monkeypatch, args, module, said
):
    from patchgrid.cli import main

    np.save(tmp_path / "v.npy", _volume())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, module, None)
    code = main(["extract", "v.npy", "--size", "4", *args])
    err = capsys.readouterr().err
    assert code == 1
    assert err == f"patchgrid extract: error: {said}: pip install 'patchgrid[io]'\n"
    assert os.listdir(tmp_path) == ["v.npy"]


# -------------------------------------------------- NIfTI headers and .npy files (#16, 3)


def _fields(header):
    return {key: np.asarray(header[key]) for key in header}


def _differ(a, b):
    fa, fb = _fields(a), _fields(b)
    return {k for k in fa if not np.array_equal(fa[k], fb[k], equal_nan=fa[k].dtype.kind == "f")}


NIFTI_SAMPLES = ["anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz", "functional.nii"]


@pytest.mark.parametrize("name", NIFTI_SAMPLES)
def test_save_like_a_nifti_keeps_its_whole_header(tmp_path, name):
    with pg.open(_sample(name)) as img:
        pg.save(tmp_path / "out.nii.gz", np.asarray(img), like=img)
    source, saved = nib.load(_sample(name)), nib.load(tmp_path / "out.nii.gz")
    # functional.nii's values are scaled int16: they are kept as floats, unscaled.
    changed = {"datatype", "bitpix"} if name == "functional.nii" else set()
    assert _differ(source.header, saved.header) == changed
    assert type(saved) is type(source)
    assert np.array_equal(saved.get_fdata(), source.get_fdata())


def test_a_scaled_nifti_reads_as_its_scaled_values():
    # functional.nii: int16 on disk, with a slope and an intercept.
    with pg.open(_sample("functional.nii")) as img:
        assert img.dtype.kind == "f"
        assert np.array_equal(np.asarray(img), nib.load(_sample("functional.nii")).get_fdata())


def test_save_like_a_nifti_with_a_new_affine_moves_both_forms(tmp_path):
    source = nib.load(_sample("anatomical.nii"))
    move = np.diag([0.5, 0.5, 0.5, 1.0])  # voxels half as large, as a finer output has
    with pg.open(_sample("anatomical.nii")) as img:
        data = np.zeros((66, 82, 50), np.int16)
        pg.save(tmp_path / "out.nii", data, like=img, affine=img.affine @ move, spacing=(1, 1, 1))
    saved = nib.load(tmp_path / "out.nii").header
    assert np.allclose(saved.get_qform(), source.header.get_qform() @ move)
    assert np.allclose(saved.get_sform(), source.header.get_sform() @ move)
    assert (int(saved["qform_code"]), int(saved["sform_code"])) == (2, 2)
    assert saved["descrip"] == source.header["descrip"]


def test_save_like_a_nifti_into_labels_clears_the_display_range(tmp_path):
    with pg.open(_sample("example4d.nii.gz")) as img:
        pg.save(tmp_path / "out.nii.gz", np.zeros(img.shape, np.uint8), like=img)
    saved = nib.load(tmp_path / "out.nii.gz").header
    assert (float(saved["cal_min"]), float(saved["cal_max"])) == (0.0, 0.0)
    assert saved.get_data_dtype() == np.uint8
    assert int(saved["xyzt_units"]) == 10


def test_create_output_like_a_nifti_keeps_its_header(tmp_path):
    with (
        pg.open(_sample("example4d.nii.gz")) as img,
        pio.create_output(
            tmp_path / "out.nii.gz", img.shape, img.dtype, img.spacing, img.affine, like=img
        ) as out,
    ):
        out[...] = np.asarray(img)
    source, saved = nib.load(_sample("example4d.nii.gz")), nib.load(tmp_path / "out.nii.gz")
    assert _differ(source.header, saved.header) == set()


@pytest.mark.parametrize("name", NIFTI_SAMPLES)
def test_a_header_kept_as_json_comes_back_whole(name):
    with pg.open(_sample(name)) as img:
        kept = pio.Metadata.from_dict(pio.describe(img), img.ndim)
        header = img.meta["header"]
        assert _differ(header, kept.meta["header"]) <= {"vox_offset"}
        assert len(kept.meta["header"].extensions) == len(header.extensions)
        assert kept.dtype == img.dtype


@pytest.mark.parametrize(
    ("meta", "lost"),
    [
        ({"spacing": (1.0, 2.0, 3.0)}, r"the spacing \(1, 2, 3\) is not saved"),
        # The spacing of an affine is the length of its columns.
        ({"affine": AFFINE}, r"the spacing \(1.5, 2, 3\) and the affine are not saved"),
        ({"spacing": SPACING, "affine": AFFINE}, r"the spacing .* and the affine are not saved"),
    ],
    ids=["spacing", "affine", "both"],
)
def test_save_npy_warns_what_it_cannot_keep(tmp_path, meta, lost):
    with pytest.warns(
        pg.PatchgridWarning, match=f"image.npy: a .npy file holds no spacing.*{lost}"
    ):
        pg.save(_path(tmp_path, "npy"), _volume(), **meta)


def test_save_npy_like_a_nifti_warns_what_it_cannot_keep(tmp_path):
    with (
        pg.open(_sample("anatomical.nii")) as img,
        pytest.warns(pg.PatchgridWarning, match="affine"),
    ):
        pg.save(_path(tmp_path, "npy"), np.asarray(img), like=img)


@pytest.mark.parametrize("meta", [{}, {"spacing": (1.0, 1.0, 1.0)}, {"affine": np.eye(4)}])
def test_save_npy_with_nothing_to_lose_says_nothing(tmp_path, meta):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pg.save(_path(tmp_path, "npy"), _volume(), **meta)
