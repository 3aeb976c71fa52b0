"""The public face: ``__all__`` names exist, are documented, and nothing else is public."""

import inspect
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest

import patchgrid as pg


def test_all_is_not_empty():
    assert len(pg.__all__) > 0


def test_all_has_no_duplicates():
    assert len(set(pg.__all__)) == len(pg.__all__)


@pytest.mark.parametrize(
    "name", ["Merger", "PatchGrid", "PatchgridError", "coverage", "extract", "merge", "window"]
)
def test_designed_name_is_in_all(name):
    assert name in pg.__all__


@pytest.mark.parametrize("name", pg.__all__)
def test_name_in_all_exists(name):
    assert hasattr(pg, name)


@pytest.mark.parametrize("name", pg.__all__)
def test_name_in_all_is_not_a_module(name):
    assert not isinstance(getattr(pg, name, None), types.ModuleType)


@pytest.mark.parametrize("name", pg.__all__)
def test_name_in_all_has_a_docstring(name):
    doc = inspect.getdoc(getattr(pg, name, None))
    assert doc is not None
    assert doc.strip()


def test_no_public_names_outside_all():
    public = {
        name
        for name, value in vars(pg).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public - set(pg.__all__) == set()


def test_version_is_a_string():
    assert isinstance(pg.__version__, str)
    assert pg.__version__


def test_patchgrid_error_is_a_value_error():
    assert issubclass(pg.PatchgridError, ValueError)


def _methods_and_properties(cls):
    """Public methods and properties; slot attributes are documented in the class docstring."""
    return [
        (cls, name)
        for name, value in vars(cls).items()
        if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, property))
    ]


@pytest.mark.parametrize(
    ("cls", "member"),
    _methods_and_properties(pg.PatchGrid) + _methods_and_properties(pg.Merger),
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)
def test_public_methods_and_properties_have_docstrings(cls, member):
    assert (inspect.getdoc(vars(cls)[member]) or "").strip()


@pytest.mark.parametrize("cls", [pg.PatchGrid, pg.Merger], ids=lambda c: c.__name__)
def test_classes_have_methods_to_check(cls):
    assert len(_methods_and_properties(cls)) >= 3


# Other libraries' keywords (MONAI's sliding_window_inference, TorchIO, nnU-Net): one line
# names patchgrid's (issue 16, item 10).


def _call(name, **kwargs):
    image = np.zeros((8, 8), dtype=np.float32)
    if name == "apply":
        return pg.apply(lambda batch: batch, image, 4, **kwargs)
    if name == "merge":
        return pg.merge(np.zeros((2, 2, 4, 4)), (8, 8), **kwargs)
    if name == "PatchGrid":
        return pg.PatchGrid((8, 8), 4, **kwargs)
    return pg.extract(image, 4, **kwargs)


RENAMED = [
    ("apply", "roi_size", "patchgrid calls it size"),
    ("apply", "patch_size", "patchgrid calls it size"),
    ("apply", "sw_batch_size", "patchgrid calls it batch_size"),
    ("apply", "mode", "patchgrid calls it window (MONAI's mode='constant' is window='uniform'"),
    ("apply", "patch_overlap", "patchgrid takes stride = size - patch_overlap"),
    ("apply", "padding_mode", "patchgrid calls it pad_mode"),
    ("apply", "cval", "patchgrid calls it pad_value"),
    ("apply", "sw_device", "patchgrid calls it device"),
    ("apply", "predictor", "patchgrid calls it fn, the first argument"),
    ("extract", "patch_size", "patchgrid calls it size"),
    ("extract", "roi_size", "patchgrid calls it size"),
    ("extract", "overlap", "patchgrid takes stride = int(size * (1 - overlap))"),
    ("extract", "patch_overlap", "patchgrid takes stride = size - patch_overlap"),
    ("extract", "mode", "patchgrid calls numpy.pad's mode pad_mode"),
    ("extract", "sw_batch_size", "patchgrid calls it batch_size, in pg.apply"),
    ("extract", "tile_step_size", "patchgrid takes stride = int(size * tile_step_size)"),
    ("merge", "patch_size", "patchgrid calls it size"),
    ("merge", "roi_size", "patchgrid calls it size"),
    ("merge", "overlap", "patchgrid takes stride = int(size * (1 - overlap))"),
    ("merge", "patch_overlap", "patchgrid takes stride = size - patch_overlap"),
    ("merge", "mode", "patchgrid calls it window"),
    ("merge", "sw_batch_size", "patchgrid calls it batch_size, in pg.apply"),
    ("PatchGrid", "patch_size", "patchgrid calls it size"),
    ("PatchGrid", "roi_size", "patchgrid calls it size"),
    ("PatchGrid", "overlap", "patchgrid takes stride = int(size * (1 - overlap))"),
    ("PatchGrid", "patch_overlap", "patchgrid takes stride = size - patch_overlap"),
    ("PatchGrid", "mode", "patchgrid calls numpy.pad's mode pad_mode"),
    ("PatchGrid", "padding_mode", "patchgrid calls it pad_mode"),
]


@pytest.mark.parametrize(("name", "keyword", "hint"), RENAMED, ids=lambda v: v)
def test_another_librarys_keyword_names_patchgrids(name, keyword, hint):
    with pytest.raises(TypeError) as raised:
        _call(name, **{keyword: 1})
    assert str(raised.value).startswith(
        f"pg.{name}() got an unexpected keyword argument {keyword!r}; {hint}"
    )


@pytest.mark.parametrize("name", ["apply", "extract", "merge", "PatchGrid"])
def test_an_unknown_keyword_keeps_pythons_message(name):
    with pytest.raises(TypeError, match=r"got an unexpected keyword argument 'sizes'$"):
        _call(name, sizes=4)


def test_a_type_error_inside_the_function_passes_unchanged():
    with pytest.raises(TypeError, match=r"^stride must be an integer, got 2.5 of type float$"):
        pg.extract(np.zeros((8, 8)), 4, stride=2.5)


def test_apply_still_takes_overlap():
    image = np.arange(64.0).reshape(8, 8)
    np.testing.assert_array_equal(pg.apply(lambda b: b, image, 4, overlap=0.5), image)


@pytest.mark.parametrize("name", ["apply", "extract", "merge"])
def test_public_functions_keep_their_signature_and_pickle(name):
    fn = getattr(pg, name)
    assert pickle.loads(pickle.dumps(fn)) is fn
    assert inspect.signature(fn) == inspect.signature(fn.__wrapped__)
    assert "stride" in inspect.signature(fn).parameters


NO_TORCH = """
import sys


class NoTorch:  # an environment without torch
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, NoTorch())
import numpy as np
import patchgrid as pg

pg.extract(np.zeros((8, 8)), 4)  # the rest of patchgrid works without torch
try:
    {how}
except ModuleNotFoundError as error:
    print(error)
"""


@pytest.mark.parametrize(
    "how",
    [
        "pg.RandomPatchDataset",
        "pg.PatchDataset",
        "from patchgrid import RandomPatchDataset",
        "from patchgrid.datasets import RandomPatchDataset",
    ],
)
def test_datasets_without_torch_name_the_extra(how):
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH.replace("{how}", how)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "RandomPatchDataset need torch" in done.stdout
    assert "pip install 'patchgrid[torch]'" in done.stdout
