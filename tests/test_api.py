"""The public face: ``__all__`` names exist, are documented, and nothing else is public."""

import inspect
import types

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
