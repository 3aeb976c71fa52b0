"""Test-time flips: the axis sets of ``tta=`` and the model wrapper that averages flips.

References are independent of the code under test: subsets by bit masks, and the mean of
``flip(fn(flip(patch)))`` computed patch by patch with ``np.flip``.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patchgrid import PatchgridError
from patchgrid._tta import flip_sets, with_flips


def _subsets(axes):
    """Every subset of ``axes``, by bit masks."""
    return {tuple(a for b, a in enumerate(axes) if m >> b & 1) for m in range(2 ** len(axes))}


def _reference(fn, batch, sets, class_axis=False):
    """Mean over sets of flip(fn(flip(patch))), one patch at a time, in float64."""
    at = 2 if class_axis else 1
    out = []
    for patch in batch:
        total = 0
        for s in sets:
            x = np.flip(patch[None], [a + 1 for a in s]).copy()
            total = total + np.flip(np.asarray(fn(x), dtype=np.float64), [a + at for a in s])
        out.append(total[0] / len(sets))
    return np.stack(out)


def _cumsum_all(x):
    """Not equivariant under any flip: cumulative sums along every patch axis."""
    for axis in range(1, x.ndim):
        x = np.cumsum(x, axis=axis)
    return x


class Counter:
    def __init__(self, fn):
        self.fn, self.sizes = fn, []
        self.__name__ = "counted"

    def __call__(self, x):
        self.sizes.append(len(x))
        return self.fn(x)


# flip_sets


@pytest.mark.parametrize(
    ("ndim", "axes"), [(1, (0,)), (2, (0, 1)), (3, (0, 1, 2)), (4, (1, 2, 3)), (3, (2,))],
    ids=["1d", "2d", "3d", "channel-first", "one-axis"],
)  # fmt: skip
def test_flips_are_every_subset_of_the_tiled_axes_identity_first(ndim, axes):
    sets = flip_sets("flips", ndim, axes)
    assert sets[0] == ()
    assert len(sets) == len(set(sets)) == 2 ** len(axes)
    assert set(sets) == _subsets(axes)


def test_three_tiled_axes_give_nnunets_eight_mirrorings():
    assert len(flip_sets("flips", 3, (0, 1, 2))) == 8


def test_none_is_the_identity_alone():
    assert flip_sets(None, 3, (0, 1, 2)) == [()]


@pytest.mark.parametrize(
    ("tta", "expected"),
    [
        ([(0,), (2, 1)], [(), (0,), (1, 2)]),
        ([(0,), (), (1,)], [(), (0,), (1,)]),
        ([(-1,), (0, -2)], [(), (2,), (0, 1)]),
        ([], [()]),
        ([()], [()]),
    ],
    ids=["no-identity", "identity-moved-first", "negative-axes", "empty", "identity-only"],
)
def test_a_list_of_sets_is_sorted_with_the_identity_first_once(tta, expected):
    assert flip_sets(tta, 3, (0, 1, 2)) == expected


@pytest.mark.parametrize(
    ("tta", "match"),
    [
        ("mirror", "tta must be None, \"flips\" or a list of axis sets, got 'mirror'"),
        (5, "tta must be None.*got 5 of type int"),
        ([(0,)], r"tta may flip only the tiled axes \(1, 2\), got axis 0"),
        ([(3,)], r"tta may flip only the tiled axes \(1, 2\), got axis 3"),
        ([(1,), (2,), (1,)], r"tta must not repeat an axis set, got \(1,\) twice"),
        ([(1, 2), (2, 1)], r"tta must not repeat an axis set, got \(1, 2\) twice"),
        ([(), ()], r"tta must not repeat an axis set, got \(\) twice"),
        ([(1, 1)], "tta must not repeat an axis within a set, got"),
        ([1, 2], "tta must be a list of axis sets, each a tuple.*got 1 in"),
        ([(1.0,)], "tta's axis sets must hold integers, got 1.0"),
        (["ab"], "tta must be a list of axis sets.*got 'ab'"),
    ],
    ids=["unknown-string", "not-a-list", "axis-not-tiled", "axis-out-of-range", "repeated-set",
         "repeated-set-reordered", "identity-twice", "repeated-axis", "bare-int", "float-axis",
         "string-set"],
)  # fmt: skip
def test_bad_tta_is_refused_naming_it(tta, match):
    with pytest.raises(PatchgridError, match=match):
        flip_sets(tta, 3, (1, 2))


# with_flips: equivariant and non-equivariant models


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16], ids=str)
def test_an_elementwise_model_gives_its_plain_output_exactly(dtype):
    batch = np.random.default_rng(0).standard_normal((5, 4, 6, 3)).astype(dtype)

    def model(x):
        return x * 2 + 1

    sets = flip_sets("flips", 3, (0, 1, 2))
    got = with_flips(model, sets, (0, 1, 2), batch_size=3)(batch)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, model(batch))


@pytest.mark.parametrize(
    ("tta", "axes"), [("flips", (0, 1, 2)), ("flips", (1, 2)), ([(2,), (0, 1)], (0, 1, 2))],
    ids=["all-axes", "two-axes", "a-list"],
)  # fmt: skip
@pytest.mark.parametrize("batch_size", [1, 3, 8, 100], ids=lambda b: f"b{b}")
def test_a_non_equivariant_model_gives_the_mean_of_flipped_predictions(tta, axes, batch_size):
    batch = np.random.default_rng(1).standard_normal((4, 3, 5, 4)).astype(np.float32)
    sets = flip_sets(tta, 3, axes)
    got = with_flips(_cumsum_all, sets, axes, batch_size)(batch)
    expected = _reference(_cumsum_all, batch, sets)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got, _cumsum_all(batch), atol=1e-3)  # the flips did something


def test_an_asymmetric_convolution_gives_the_mean_of_flipped_predictions():
    kernel = np.array([1.0, 2.0, -0.5])

    def conv(x):  # along the last axis, zero padded: not flip-equivariant
        return np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), -1, x)

    batch = np.random.default_rng(2).standard_normal((3, 4, 7))
    sets = flip_sets("flips", 2, (0, 1))
    got = with_flips(conv, sets, (0, 1), batch_size=5)(batch)
    np.testing.assert_allclose(got, _reference(conv, batch, sets), rtol=1e-12, atol=1e-12)


def test_a_model_that_adds_a_class_axis_in_front():
    def model(x):  # (n, *patch) -> (n, 3, *patch)
        return np.stack([np.cumsum(x, axis=1), np.cumsum(x, axis=2), -x], axis=1)

    batch = np.random.default_rng(3).standard_normal((4, 5, 6)).astype(np.float32)
    sets = flip_sets("flips", 2, (0, 1))
    got = with_flips(model, sets, (0, 1), batch_size=3)(batch)
    assert got.shape == (4, 3, 5, 6)
    expected = _reference(model, batch, sets, class_axis=True)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_a_model_that_changes_the_channel_axis_keeps_the_batchs_axes():
    def model(x):  # (n, 2, *patch) -> (n, 3, *patch): channels mixed, same number of axes
        c = np.cumsum(x, axis=2)
        return np.concatenate([c, x[:, :1] * c[:, 1:]], axis=1)

    batch = np.random.default_rng(4).standard_normal((3, 2, 5, 4))
    sets = flip_sets("flips", 3, (1, 2))
    got = with_flips(model, sets, (1, 2), batch_size=4)(batch)
    assert got.shape == (3, 3, 5, 4)
    np.testing.assert_allclose(got, _reference(model, batch, sets), rtol=1e-12, atol=1e-12)


# with_flips: the calls


@pytest.mark.parametrize(
    ("n", "n_sets", "batch_size"), [(5, 4, 3), (5, 8, 8), (2, 8, 5), (7, 2, 1), (3, 4, 100)],
    ids=["uneven", "one-patch-a-call", "patches-straddle-calls", "one-at-a-time", "one-call"],
)  # fmt: skip
def test_calls_are_full_batches_of_flipped_copies(n, n_sets, batch_size):
    batch = np.random.default_rng(5).standard_normal((n, 4, 4, 4)).astype(np.float32)
    sets = flip_sets("flips", 3, (0, 1, 2))[:n_sets]
    model = Counter(_cumsum_all)
    with_flips(model, sets, (0, 1, 2), batch_size)(batch)
    assert len(model.sizes) == math.ceil(n * n_sets / batch_size)
    assert max(model.sizes) <= batch_size
    assert sum(model.sizes) == n * n_sets
    assert all(s == batch_size for s in model.sizes[:-1])


def test_a_call_holds_copies_of_several_patches():
    batch = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
    seen = []

    def model(x):
        seen.append(x.copy())
        return x

    sets = flip_sets("flips", 2, (0, 1))
    with_flips(model, sets, (0, 1), batch_size=8)(batch)
    assert len(seen) == 1
    expected = [np.flip(p, s) for p in batch for s in sets]
    np.testing.assert_array_equal(seen[0], np.stack(expected))


def test_the_wrapper_keeps_the_models_name():
    def my_model(x):
        return x

    assert with_flips(my_model, [()], (0,), 2).__name__ == "my_model"


def test_an_empty_batch_goes_to_the_model_as_it_is():
    model = Counter(lambda x: x * 1.0)
    got = with_flips(model, flip_sets("flips", 2, (0, 1)), (0, 1), 4)(np.zeros((0, 3, 3)))
    assert got.shape == (0, 3, 3)
    assert model.sizes == [0]


# with_flips: errors


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.bool_], ids=str)
def test_integer_and_bool_outputs_are_refused(dtype):
    def labels(x):
        return (x > 0).astype(dtype)

    wrapped = with_flips(labels, flip_sets("flips", 2, (0, 1)), (0, 1), 4)
    with pytest.raises(PatchgridError, match=r"fn \(labels\) returned dtype .*needs floats"):
        wrapped(np.ones((2, 3, 3)))


def test_a_model_that_returns_no_array_is_refused():
    wrapped = with_flips(lambda x: x.tolist(), [(), (0,)], (0,), 4)
    with pytest.raises(PatchgridError, match=r"fn \(<lambda>\) must return .*got list"):
        wrapped(np.ones((2, 3)))


def test_a_model_whose_output_changes_between_calls_is_refused():
    calls = []

    def moody(x):
        calls.append(1)
        return x if len(calls) == 1 else x[:, :-1]

    wrapped = with_flips(moody, [(), (0,)], (0,), 2)
    with pytest.raises(PatchgridError, match=r"fn \(moody\) returned shape \(2, 2\)"):
        wrapped(np.ones((2, 3)))


def test_a_model_that_drops_the_batch_axis_is_refused():
    wrapped = with_flips(lambda x: x.sum(axis=0), [(), (0,)], (0,), 4)
    with pytest.raises(PatchgridError, match=r"returned shape \(3,\) for a batch of shape"):
        wrapped(np.ones((2, 3)))


@pytest.mark.parametrize(
    ("sets", "batch_size", "match"),
    [
        ([(0,)], 2, r"must start with \(\)"),
        ([(), (1,)], 2, r"only the tiled axes \(0,\)"),
        ([()], 0, "batch_size must be a positive integer, got 0"),
    ],
    ids=["no-identity", "untiled-axis", "batch-size"],
)
def test_bad_wrapper_arguments_are_refused(sets, batch_size, match):
    with pytest.raises(PatchgridError, match=match):
        with_flips(lambda x: x, sets, (0,), batch_size)


# A property over dimensions, tiled axes, sets and batch sizes


@st.composite
def _cases(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    axes = tuple(a for a in range(ndim) if draw(st.booleans())) or (ndim - 1,)
    every = flip_sets("flips", ndim, axes)
    chosen = draw(st.lists(st.sampled_from(every), unique=True))
    tta = draw(st.sampled_from(["flips", None, chosen]))
    return shape, axes, tta, draw(st.integers(1, 5)), draw(st.integers(1, 10))


@settings(max_examples=60, deadline=None)
@given(_cases())
def test_property_equals_the_patch_by_patch_mean(case):
    shape, axes, tta, n, batch_size = case
    sets = flip_sets(tta, len(shape), axes)
    batch = np.random.default_rng(len(shape) * n).standard_normal((n, *shape))
    model = Counter(_cumsum_all)
    got = with_flips(model, sets, axes, batch_size)(batch)
    expected = _reference(_cumsum_all, batch, sets)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert len(model.sizes) == math.ceil(n * len(sets) / batch_size)
    assert max(model.sizes) <= batch_size


# torch


def _torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_torch_elementwise_model_gives_its_plain_output_exactly(dtype):
    torch = _torch()
    dt = getattr(torch, dtype)
    batch = torch.randn(5, 4, 6, 3, generator=torch.Generator().manual_seed(0)).to(dt)

    def model(x):
        return x * 2 + 1

    sets = flip_sets("flips", 3, (0, 1, 2))[:4] if dtype == "float64" else None
    sets = sets or flip_sets("flips", 3, (0, 1, 2))
    got = with_flips(model, sets, (0, 1, 2), batch_size=3)(batch)
    assert isinstance(got, torch.Tensor)
    assert got.dtype == dt
    assert torch.equal(got, model(batch))


def test_torch_non_equivariant_model_with_a_class_axis():
    torch = _torch()

    def model(x):  # (n, *patch) -> (n, 2, *patch)
        return torch.stack([torch.cumsum(x, 1), torch.cumsum(torch.cumsum(x, 2), 3)], 1)

    batch = torch.randn(4, 3, 5, 4, generator=torch.Generator().manual_seed(1))
    sets = flip_sets("flips", 3, (0, 1, 2))
    counter = Counter(model)
    got = with_flips(counter, sets, (0, 1, 2), batch_size=5)(batch)
    assert got.dtype == torch.float32
    assert got.shape == (4, 2, 3, 5, 4)

    def reference_model(x):
        return model(torch.from_numpy(x)).numpy()

    expected = _reference(reference_model, batch.numpy(), sets, class_axis=True)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert counter.sizes == [5] * 6 + [2]


def test_torch_integer_output_is_refused():
    torch = _torch()

    def labels(x):
        return (x > 0).long()

    wrapped = with_flips(labels, [(), (1,)], (0, 1), 4)
    with pytest.raises(PatchgridError, match=r"fn \(labels\) returned dtype torch.int64"):
        wrapped(torch.ones(2, 3, 3))
