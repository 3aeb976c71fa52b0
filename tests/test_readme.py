"""Every command-line example of the README and the guides runs, on files the test writes.

The examples are read from the documents themselves (each line of a ``bash`` block that starts
with ``patchgrid``), so an example that stops working, or a new one, is tested without a
change here. They run in order, in one folder, as a reader would type them: ``scan.nii.gz`` is
a 3-D scan with a 2.2 mm axis, and ``models.py:segment`` a model that gives three class scores
per voxel of a scan that has no class axis.
"""

from __future__ import annotations

import pathlib
import re
import shlex

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pytest.importorskip("zarr")

import patchgrid.cli as pcli  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", ROOT / "docs" / "getting-started.md",
             *sorted((ROOT / "docs" / "guide").glob("*.md"))]  # fmt: skip

MODELS = '''
import numpy as np


def segment(batch):
    """Three class scores per voxel: (B, *patch) -> (B, 3, *patch)."""
    with open("calls.txt", "a") as log:  # one line per call: the batch's size
        log.write(f"{len(batch)}\\n")
    return np.stack([batch, 1 - batch, np.full_like(batch, 0.5)], axis=1)
'''


def examples(path: pathlib.Path) -> list[str]:
    """The ``patchgrid`` command lines of the ``bash`` blocks of one document."""
    text = path.read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            if line.startswith("patchgrid "):
                lines.append(line.split(" #")[0].strip())
    return lines


def _files(folder: pathlib.Path) -> np.ndarray:
    rng = np.random.default_rng(0)
    scan = rng.random((100, 104, 98)).astype(np.float32)
    nib.save(nib.Nifti1Image(scan, np.diag([2.2, 1.0, 1.0, 1.0])), folder / "scan.nii.gz")
    (folder / "models.py").write_text(MODELS)
    return scan


@pytest.mark.parametrize("path", [p for p in DOCUMENTS if examples(p)], ids=lambda p: p.name)
def test_every_command_line_example_runs(path, tmp_path, monkeypatch):
    lines = examples(path)
    monkeypatch.chdir(tmp_path)
    scan = _files(tmp_path)
    for line in lines:
        args = shlex.split(line)[1:]
        assert pcli.main(args, quiet=True) == 0, line
    if (tmp_path / "labels.nii.gz").exists():  # the README's segmentation of a 3-D scan
        labels = np.asarray(nib.load(tmp_path / "labels.nii.gz").dataobj)
        want = np.stack([scan, 1 - scan, np.full_like(scan, 0.5)]).argmax(axis=0)
        np.testing.assert_array_equal(labels, want)
    if (tmp_path / "restored.nii.gz").exists():
        restored = nib.load(tmp_path / "restored.nii.gz")
        np.testing.assert_allclose(restored.get_fdata(), scan, rtol=1e-6)
        np.testing.assert_allclose(restored.affine, np.diag([2.2, 1.0, 1.0, 1.0]))


def test_the_readme_has_examples_of_every_command():
    commands = {shlex.split(line)[1] for line in examples(ROOT / "README.md")}
    assert commands >= {"info", "extract", "merge", "apply", "preview", "demo"}


def test_apply_calls_the_model_once_per_batch(tmp_path, monkeypatch):
    # The output is sized from the first batch, which the run does not compute again.
    monkeypatch.chdir(tmp_path)
    _files(tmp_path)
    args = ["apply", "scan.nii.gz", "--model", "models.py:segment", "--size", "48", "--stride",
            "24", "--batch-size", "5", "-o", "probs.nii.gz"]  # fmt: skip
    assert pcli.main(args, quiet=True) == 0
    calls = [int(n) for n in (tmp_path / "calls.txt").read_text().split()]
    n = 4 * 4 * 4  # 100, 104 and 98 voxels: 4 patches of 48 each, stride 24 (shift)
    assert sum(calls) == n
    assert len(calls) == -(-n // 5)
    probs = nib.load(tmp_path / "probs.nii.gz")
    assert probs.shape == (100, 104, 98, 3)  # NIfTI keeps x, y, z first; the classes last
