"""Files and the command line: NIfTI in, patches on disk, NIfTI back, metadata kept.

``pg.save`` writes a volume with its voxel spacing; ``pg.open`` reads it lazily (slicing
reads only that region); ``pg.apply(..., out=zarr_array)`` writes its result into a zarr
array as it goes; then the ``patchgrid`` command line cuts the file into a patch store and
merges it back. Everything happens in a temporary folder. Run: python examples/files_roundtrip.py
"""

import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import zarr

import patchgrid as pg

volume = np.random.default_rng(0).random((24, 32, 40), dtype=np.float32)

with tempfile.TemporaryDirectory() as folder:
    tmp = pathlib.Path(folder)
    pg.save(tmp / "scan.nii.gz", volume, spacing=(2.0, 0.5, 0.5))
    img = pg.open(tmp / "scan.nii.gz")  # lazy: nothing read yet
    print(f"opened {img.shape} {img.dtype}, spacing {img.spacing}")
    assert img.spacing == (2.0, 0.5, 0.5)
    assert np.array_equal(img[10:12, :, 5], volume[10:12, :, 5])  # reads only that region

    patches = pg.extract(img, size=8, stride=4, edge="shift")  # read region by region
    assert np.array_equal(patches[0, 0, 0], volume[:8, :8, :8])

    out = zarr.open_array(tmp / "doubled.zarr", mode="w", shape=img.shape, dtype="float32")
    pg.apply(lambda b: 2 * b, img, size=16, stride=8, out=out)  # written row by row
    pg.save(tmp / "doubled.nii.gz", out, like=img)  # spacing and affine carried over
    doubled = pg.open(tmp / "doubled.nii.gz")
    assert doubled.spacing == img.spacing
    assert np.allclose(np.asarray(doubled), 2 * volume, atol=1e-5)

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "patchgrid", *args],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    print(cli("info", str(tmp / "scan.nii.gz"), "--size", "8", "--stride", "4").strip())
    cli("extract", str(tmp / "scan.nii.gz"), "--size", "8", "--stride", "4", "--edge", "shift",
        "-o", str(tmp / "patches.zarr"))  # fmt: skip
    cli("merge", str(tmp / "patches.zarr"), "-o", str(tmp / "restored.nii.gz"))
    restored = pg.open(tmp / "restored.nii.gz")
    assert restored.spacing == img.spacing
    assert restored.dtype == volume.dtype
    assert np.allclose(np.asarray(restored), volume)
    print("patchgrid extract + merge: restored.nii.gz equals scan.nii.gz, spacing kept")
