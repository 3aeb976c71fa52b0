"""The plan cache: bounded in bytes and in number, and a repeated merge equals a fresh one."""

import importlib

import numpy as np
import pytest

import patchgrid as pg

PLAN = importlib.import_module("patchgrid._plan")


@pytest.fixture(autouse=True)
def empty_caches():
    PLAN.PLANS.clear()
    PLAN.WINDOWS.clear()
    yield
    PLAN.PLANS.clear()
    PLAN.WINDOWS.clear()


def _kept_bytes(cache):
    return sum(PLAN.nbytes(v) for v in cache.items.values())


@pytest.mark.parametrize("budget", [0, 1 << 20, 4 << 20], ids=["none", "1MiB", "4MiB"])
def test_plans_and_windows_keep_no_more_bytes_than_the_setting(monkeypatch, budget):
    monkeypatch.setattr(pg.settings, "CACHE_BYTES", budget)
    for i in range(12):  # each layout's weights: 24^3 in extended precision, about 216 KiB
        grid = pg.PatchGrid((24 + i, 24, 24), 24, 12)
        merger = pg.Merger(grid, window="gaussian")
        merger.add(np.ones((len(grid), 24, 24, 24)), np.arange(len(grid)))
        merger.result()
    assert _kept_bytes(PLAN.PLANS) <= budget
    assert _kept_bytes(PLAN.WINDOWS) <= budget
    if budget == 0:
        assert len(PLAN.PLANS.items) == 0


def test_the_cache_keeps_no_more_layouts_than_its_size(monkeypatch):
    monkeypatch.setattr(PLAN, "CACHE_SIZE", 3)
    for i in range(6):
        image = np.ones((5 + i, 6))
        pg.merge(pg.extract(image, 2, 1), image.shape, stride=1)
    assert len(PLAN.PLANS.items) == 3


@pytest.mark.parametrize("window", ["uniform", "gaussian", "hann"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "int16"])
def test_a_repeated_merge_equals_one_planned_afresh(monkeypatch, window, dtype):
    rng = np.random.default_rng(7)
    image = (rng.random((9, 11, 13)) * 100).astype(dtype)
    patches = pg.extract(image, 4, 3)
    first = pg.merge(patches, image.shape, stride=3, window=window)
    again = pg.merge(patches, image.shape, stride=3, window=window)
    monkeypatch.setattr(pg.settings, "CACHE_BYTES", 0)
    PLAN.PLANS.clear()
    fresh = pg.merge(patches, image.shape, stride=3, window=window)
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(fresh, first)
    assert len(PLAN.PLANS.items) == 0


def test_a_named_window_travels_as_its_name():
    import pickle

    window = PLAN.checked_window("gaussian", (32, 32, 32))
    assert len(pickle.dumps(window)) < 200  # the name and the size, not 256 KiB of weights
    back = pickle.loads(pickle.dumps(window))
    np.testing.assert_array_equal(back.array, window.array)
