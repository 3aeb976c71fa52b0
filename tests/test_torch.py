"""extract, merge, Merger and apply on torch tensors, CPU and (where there is one) CUDA, through
both merge engines (rows, and the device engine CUDA tensors take).

Tensors in give tensors out, on the same device and of the same dtype, with the values the
plain-loop references in ``reference.py`` (or a whole-image torch computation) give.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import patchgrid as pg  # noqa: E402
from reference import Layout, window_nd  # noqa: E402

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]


@pytest.fixture(autouse=True, params=["auto", "always"], ids=["rows-engine", "device-engine"])
def engine(request, monkeypatch):
    """Every test once through torch's rows engine on the CPU and once through the device
    engine, which CUDA tensors take (``settings.DEVICE_ENGINE = "always"`` puts CPU tensors
    on it), so that the CUDA code path is checked on every machine."""
    monkeypatch.setattr(pg.settings, "DEVICE_ENGINE", request.param)
    return request.param


SHAPE = (2, 9, 11)
AXES = (1, 2)
SIZE, STRIDE = 4, 3

TORCH_OF = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
}


def _array(shape=SHAPE, seed=0):
    return np.random.default_rng(seed).random(shape)


def _tensor(array, device, dtype=torch.float64):
    return torch.from_numpy(np.array(array)).to(device=device, dtype=dtype)


def _numpy(tensor):
    return tensor.detach().cpu().to(torch.float64).numpy()


def _layout(edge, shape=SHAPE, axes=AXES, size=SIZE, stride=STRIDE):
    k = len(axes)
    return Layout(shape, axes, (size,) * k, (stride,) * k, (edge,) * k)


def _same_storage(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# extract

EXTRACT_CASES = [
    ("drop", "constant"),
    ("pad", "constant"),
    ("pad", "reflect"),
    ("pad", "edge"),
    ("pad", "wrap"),
    ("pad", "symmetric"),
    ("shift", "constant"),
    ("even", "constant"),
]
EXTRACT_IDS = [e if e != "pad" else f"pad-{m}" for e, m in EXTRACT_CASES]


@pytest.mark.parametrize(("edge", "pad_mode"), EXTRACT_CASES, ids=EXTRACT_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_extract_gives_a_tensor_on_the_device(device, edge, pad_mode):
    image = _tensor(_array(), device, torch.float32)
    patches = pg.extract(image, SIZE, STRIDE, axes=AXES, edge=edge, pad_mode=pad_mode)
    assert isinstance(patches, torch.Tensor)
    assert patches.device == image.device
    assert patches.dtype == torch.float32


@pytest.mark.parametrize(("edge", "pad_mode"), EXTRACT_CASES, ids=EXTRACT_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_extract_equals_the_reference(device, edge, pad_mode):
    array = _array()
    patches = pg.extract(_tensor(array, device), SIZE, STRIDE, axes=AXES, edge=edge,
                         pad_mode=pad_mode)  # fmt: skip
    np.testing.assert_array_equal(_numpy(patches), _layout(edge).extract(array, pad_mode))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64", "int32", "uint8"])
@pytest.mark.parametrize("device", DEVICES)
def test_extract_keeps_the_dtype(device, dtype):
    array = np.random.default_rng(0).integers(0, 100, SHAPE)
    patches = pg.extract(_tensor(array, device, TORCH_OF[dtype]), SIZE, STRIDE, axes=AXES,
                         edge="shift")  # fmt: skip
    assert patches.dtype == TORCH_OF[dtype]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int32", "uint8"])
@pytest.mark.parametrize("device", DEVICES)
def test_extract_of_other_dtypes_equals_the_reference(device, dtype):
    array = np.random.default_rng(0).integers(0, 100, SHAPE)
    patches = pg.extract(_tensor(array, device, TORCH_OF[dtype]), SIZE, STRIDE, axes=AXES,
                         edge="even")  # fmt: skip
    np.testing.assert_array_equal(_numpy(patches), _layout("even").extract(array))


@pytest.mark.parametrize("device", DEVICES)
def test_extract_of_a_regular_grid_is_a_view_of_the_tensor(device):
    image = _tensor(_array(), device)
    patches = pg.extract(image, SIZE, STRIDE, axes=AXES, edge="drop")
    assert _same_storage(patches, image)


@pytest.mark.parametrize("edge", ["drop", "shift"])
@pytest.mark.parametrize("device", DEVICES)
def test_extract_copy_gives_a_contiguous_copy(device, edge):
    image = _tensor(_array(), device)
    patches = pg.extract(image, SIZE, STRIDE, axes=AXES, edge=edge, copy=True)
    assert patches.is_contiguous()
    assert not _same_storage(patches, image)


@pytest.mark.parametrize("edge", ["drop", "pad", "shift"])
@pytest.mark.parametrize("device", DEVICES)
def test_extract_copy_equals_the_reference(device, edge):
    array = _array()
    patches = pg.extract(_tensor(array, device), SIZE, STRIDE, axes=AXES, edge=edge, copy=True)
    np.testing.assert_array_equal(_numpy(patches), _layout(edge).extract(array))


@pytest.mark.parametrize("edge", ["drop", "pad", "shift", "even"])
@pytest.mark.parametrize("device", DEVICES)
def test_extract_flatten_gives_patches_in_grid_order(device, edge):
    array = _array()
    patches = pg.extract(_tensor(array, device), SIZE, STRIDE, axes=AXES, edge=edge,
                         flatten=True)  # fmt: skip
    expected = _layout(edge).extract(array).reshape(-1, 2, SIZE, SIZE)
    np.testing.assert_array_equal(_numpy(patches), expected)


@pytest.mark.parametrize("flat", [False, True], ids=["counts", "flat"])
@pytest.mark.parametrize("edge", ["drop", "shift"])
@pytest.mark.parametrize("device", DEVICES)
def test_extract_into_a_tensor_buffer_returns_it(device, edge, flat):
    array = _array()
    expected = _layout(edge).extract(array)
    shape = (-1, 2, SIZE, SIZE) if flat else expected.shape
    buffer = torch.empty(expected.reshape(shape).shape, dtype=torch.float64, device=device)
    result = pg.extract(_tensor(array, device), SIZE, STRIDE, axes=AXES, edge=edge, out=buffer)
    assert result is buffer


@pytest.mark.parametrize("flat", [False, True], ids=["counts", "flat"])
@pytest.mark.parametrize("edge", ["drop", "shift"])
@pytest.mark.parametrize("device", DEVICES)
def test_extract_into_a_tensor_buffer_fills_it(device, edge, flat):
    array = _array()
    expected = _layout(edge).extract(array)
    shape = (-1, 2, SIZE, SIZE) if flat else expected.shape
    buffer = torch.full(expected.reshape(shape).shape, -1.0, dtype=torch.float64, device=device)
    pg.extract(_tensor(array, device), SIZE, STRIDE, axes=AXES, edge=edge, out=buffer)
    np.testing.assert_array_equal(_numpy(buffer), expected.reshape(shape))


@pytest.mark.parametrize("device", DEVICES)
def test_extract_into_an_ndarray_from_a_tensor_raises(device):
    out = np.empty((3, 3, 2, SIZE, SIZE))
    with pytest.raises(TypeError, match="out must be an array of the image's kind"):
        pg.extract(_tensor(_array(), device), SIZE, STRIDE, axes=AXES, out=out)


@pytest.mark.parametrize("pad_mode", ["mean", "median", "linear_ramp"])
@pytest.mark.parametrize("device", DEVICES)
def test_extract_with_a_numpy_only_pad_mode_raises(device, pad_mode):
    with pytest.raises(ValueError, match="pad_mode"):
        pg.extract(_tensor(_array(), device), SIZE, STRIDE, axes=AXES, edge="pad",
                   pad_mode=pad_mode)  # fmt: skip


# merge and Merger

MERGE_CASES = [
    ("mean", "uniform"),
    ("mean", "gaussian"),
    ("mean", "hann"),
    ("mean", "triangular"),
    ("sum", "uniform"),
    ("sum", "gaussian"),
    ("sum", "triangular"),
    ("max", "uniform"),
    ("min", "uniform"),
]
MERGE_IDS = [f"{r}-{w}" for r, w in MERGE_CASES]


def _merge_setup(edge="shift", shape=SHAPE, seed=1):
    """A grid, random flat patches (every overlap different) and the reference layout."""
    grid = pg.PatchGrid(shape, SIZE, STRIDE, axes=AXES, edge=edge)
    patches = np.random.default_rng(seed).standard_normal((len(grid), *grid.patch_shape))
    return grid, patches, _layout(edge, shape)


def _weight(window):
    return None if window == "uniform" else window_nd(window, (SIZE, SIZE))


@pytest.mark.parametrize(("reduce", "window"), MERGE_CASES, ids=MERGE_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_merge_gives_a_tensor_on_the_device(device, reduce, window):
    grid, patches, _ = _merge_setup()
    result = pg.merge(_tensor(patches, device, torch.float32), grid, reduce=reduce,
                      window=window)  # fmt: skip
    assert isinstance(result, torch.Tensor)
    assert result.device.type == torch.device(device).type
    assert result.dtype == torch.float32


@pytest.mark.parametrize("edge", ["drop", "pad", "shift", "even"])
@pytest.mark.parametrize(("reduce", "window"), MERGE_CASES, ids=MERGE_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_merge_equals_the_loop(device, reduce, window, edge):
    grid, patches, layout = _merge_setup(edge)
    result = pg.merge(_tensor(patches, device), grid, reduce=reduce, window=window)
    expected, _ = layout.merge(patches, reduce, _weight(window))
    np.testing.assert_allclose(_numpy(result), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_of_patches_with_counts_axes_and_a_shape(device):
    array = _array()
    patches = pg.extract(_tensor(array, device), SIZE, STRIDE, axes=AXES, edge="drop")
    result = pg.merge(patches, (2, 9, 11), STRIDE, axes=AXES, edge="drop")
    expected, _ = _layout("drop").merge(_layout("drop").extract(array).reshape(-1, 2, 4, 4))
    np.testing.assert_allclose(_numpy(result), expected, rtol=1e-12)


@pytest.mark.parametrize(("reduce", "window"), MERGE_CASES, ids=MERGE_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_merger_in_random_batches_equals_the_loop(device, reduce, window):
    grid, patches, layout = _merge_setup("even")
    merger = pg.Merger(grid, reduce=reduce, window=window)
    order = np.random.default_rng(2).permutation(len(grid))
    tensor = _tensor(patches, device)
    for ids in np.array_split(order, 4):
        merger.add(tensor[torch.from_numpy(ids).to(device)], ids)
    expected, _ = layout.merge(patches, reduce, _weight(window))
    np.testing.assert_allclose(_numpy(merger.result()), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_merger_gives_a_tensor_on_the_device(device):
    grid, patches, _ = _merge_setup()
    merger = pg.Merger(grid, window="hann")
    merger.add(_tensor(patches, device, torch.float32), np.arange(len(grid)))
    result = merger.result()
    assert isinstance(result, torch.Tensor)
    assert result.device.type == torch.device(device).type
    assert result.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_merger_into_a_tensor_out_returns_it(device):
    grid, patches, _ = _merge_setup()
    out = torch.full(SHAPE, float("nan"), dtype=torch.float64, device=device)
    merger = pg.Merger(grid, window="gaussian", out=out)
    merger.add(_tensor(patches, device), np.arange(len(grid)))
    assert merger.result() is out


@pytest.mark.parametrize("device", DEVICES)
def test_merger_into_a_tensor_out_fills_it(device):
    grid, patches, layout = _merge_setup()
    out = torch.full(SHAPE, float("nan"), dtype=torch.float64, device=device)
    merger = pg.Merger(grid, window="gaussian", out=out)
    for ids in np.array_split(np.arange(len(grid)), 3):
        merger.add(_tensor(patches[ids], device), ids)
    merger.result()
    expected, _ = layout.merge(patches, "mean", _weight("gaussian"))
    np.testing.assert_allclose(_numpy(out), expected, rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("reduce", ["mean", "sum", "max", "min"])
@pytest.mark.parametrize("device", DEVICES)
def test_merge_of_float_patches_keeps_their_dtype(device, reduce, dtype):
    grid, patches, _ = _merge_setup()
    result = pg.merge(_tensor(patches, device, TORCH_OF[dtype]), grid, reduce=reduce)
    assert result.dtype == TORCH_OF[dtype]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("device", DEVICES)
def test_merger_of_low_precision_patches_keeps_their_dtype(device, dtype):
    grid, patches, _ = _merge_setup()
    merger = pg.Merger(grid, window="gaussian")
    merger.add(_tensor(patches, device, TORCH_OF[dtype]), np.arange(len(grid)))
    assert merger.result().dtype == TORCH_OF[dtype]


# Dense overlaps (64 patches over most voxels): accumulating in the patches' own 16-bit dtype
# is off by several units in the last place; accumulating in float32 and rounding once is
# within one.
LOW_CASES = [("sum", "uniform"), ("sum", "hann"), ("mean", "gaussian"), ("mean", "triangular")]


@pytest.mark.parametrize(("reduce", "window"), LOW_CASES, ids=[f"{r}-{w}" for r, w in LOW_CASES])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_patches_are_accumulated_in_float32(device, dtype, reduce, window):
    shape, size = (16, 16), 8
    layout = Layout(shape, (0, 1), (size, size), (1, 1), ("drop", "drop"))
    array = np.random.default_rng(3).random(shape) + 0.5
    patches = _tensor(layout.extract(array).reshape(-1, size, size), device, TORCH_OF[dtype])
    grid = pg.PatchGrid(shape, size, 1)
    result = pg.merge(patches, grid, reduce=reduce, window=window)
    weight = None if window == "uniform" else window_nd(window, (size, size))
    expected, _ = layout.merge(_numpy(patches), reduce, weight)
    eps = torch.finfo(TORCH_OF[dtype]).eps
    np.testing.assert_allclose(_numpy(result), expected, rtol=eps, atol=0)


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8"])
@pytest.mark.parametrize("device", DEVICES)
def test_merge_of_integer_patches_under_mean_gives_float64(device, dtype):
    grid, _, _ = _merge_setup()
    patches = np.random.default_rng(0).integers(0, 100, (len(grid), *grid.patch_shape))
    result = pg.merge(_tensor(patches, device, TORCH_OF[dtype]), grid)
    assert result.dtype == torch.float64


@pytest.mark.parametrize("dtype", ["int32", "uint8"])
@pytest.mark.parametrize("device", DEVICES)
def test_merger_of_integer_patches_under_mean_equals_the_loop(device, dtype):
    grid, _, layout = _merge_setup()
    patches = np.random.default_rng(0).integers(0, 100, (len(grid), *grid.patch_shape))
    merger = pg.Merger(grid, window="hann")
    merger.add(_tensor(patches, device, TORCH_OF[dtype]), np.arange(len(grid)))
    result = merger.result()
    expected, _ = layout.merge(patches.astype(np.float64), "mean", _weight("hann"))
    assert result.dtype == torch.float64
    np.testing.assert_allclose(_numpy(result), expected, rtol=1e-12)


@pytest.mark.parametrize("reduce", ["max", "min"])
@pytest.mark.parametrize("device", DEVICES)
def test_merge_of_integer_patches_under_max_and_min_keeps_the_dtype(device, reduce):
    grid, _, layout = _merge_setup()
    patches = np.random.default_rng(0).integers(0, 100, (len(grid), *grid.patch_shape))
    result = pg.merge(_tensor(patches, device, torch.int32), grid, reduce=reduce)
    expected, _ = layout.merge(patches, reduce)
    assert result.dtype == torch.int32
    np.testing.assert_array_equal(_numpy(result), expected)


# apply


def _np_pad(array, widths, mode):
    """numpy.pad of the last len(widths) axes by (w, w)."""
    full = [(0, 0)] * (array.ndim - len(widths)) + [(w, w) for w in widths]
    return np.pad(array, full, mode=mode)


@pytest.mark.parametrize("window", ["uniform", "gaussian"])
@pytest.mark.parametrize("edge", ["shift", "even", "pad"])
@pytest.mark.parametrize("device", DEVICES)
def test_apply_identity_gives_the_image(device, edge, window):
    image = _tensor(_array(), device, torch.float32)
    result = pg.apply(lambda b: b, image, SIZE, STRIDE, axes=AXES, edge=edge, window=window,
                      progress=False)  # fmt: skip
    torch.testing.assert_close(result, image)


@pytest.mark.parametrize("device", DEVICES)
def test_apply_gives_a_tensor_on_the_device(device):
    image = _tensor(_array(), device, torch.float32)
    result = pg.apply(lambda b: b, image, SIZE, STRIDE, axes=AXES, progress=False)
    assert isinstance(result, torch.Tensor)
    assert result.device == image.device
    assert result.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_apply_gives_fn_tensors_on_the_device(device):
    image = _tensor(_array(), device, torch.float32)
    seen = []

    def fn(batch):
        seen.append((type(batch), batch.device, batch.dtype))
        return batch

    pg.apply(fn, image, SIZE, STRIDE, axes=AXES, progress=False)
    assert set(seen) == {(torch.Tensor, image.device, torch.float32)}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("device", DEVICES)
def test_apply_keeps_a_float_dtype(device, dtype):
    image = _tensor(_array(), device, TORCH_OF[dtype])
    result = pg.apply(lambda b: b, image, SIZE, STRIDE, axes=AXES, progress=False)
    assert result.dtype == TORCH_OF[dtype]


@pytest.mark.parametrize("pad_mode", ["reflect", "edge", "constant", "wrap", "symmetric"])
@pytest.mark.parametrize("device", DEVICES)
def test_apply_valid_conv2d_with_margin_equals_conv_of_the_padded_image(device, pad_mode):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, 3, padding="valid", dtype=torch.float64).to(device)
    array = _array((2, 13, 11))
    result = pg.apply(conv, _tensor(array, device), 6, axes=AXES, margin=1, pad_mode=pad_mode,
                      window="gaussian", progress=False)  # fmt: skip
    with torch.no_grad():
        expected = conv(_tensor(_np_pad(array, (1, 1), pad_mode), device)[None])[0]
    torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_apply_valid_conv2d_with_margin_and_overlap(device):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, 3, padding="valid", dtype=torch.float64).to(device)
    array = _array((2, 13, 11))
    result = pg.apply(conv, _tensor(array, device), 7, 3, axes=AXES, margin=1, pad_mode="edge",
                      window="hann", batch_size=3, progress=False)  # fmt: skip
    with torch.no_grad():
        expected = conv(_tensor(_np_pad(array, (1, 1), "edge"), device)[None])[0]
    torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_apply_valid_conv3d_with_margin_equals_conv_of_the_padded_volume(device):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 2, 3, padding="valid", dtype=torch.float64).to(device)
    array = _array((1, 9, 8, 7))
    result = pg.apply(conv, _tensor(array, device), 5, axes=(1, 2, 3), margin=1,
                      pad_mode="reflect", progress=False)  # fmt: skip
    with torch.no_grad():
        expected = conv(_tensor(_np_pad(array, (1, 1, 1), "reflect"), device)[None])[0]
    torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", ["uniform", "gaussian", "hann"])
@pytest.mark.parametrize("device", DEVICES)
def test_apply_same_conv2d_equals_a_blended_loop_over_patches(device, window):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, 3, padding="same", dtype=torch.float64).to(device)
    array = _array((2, 13, 11))
    size, stride = 6, 4
    result = pg.apply(conv, _tensor(array, device), size, stride, axes=AXES, edge="shift",
                      window=window, progress=False)  # fmt: skip
    layout = Layout(array.shape, AXES, (size, size), (stride, stride), ("shift", "shift"))
    w = np.ones((size, size)) if window == "uniform" else window_nd(window, (size, size))
    total, weight = np.zeros((3, 13, 11)), np.zeros((13, 11))
    with torch.no_grad():
        for corner in layout.corners:
            sl = layout.slices(corner)
            total[(slice(None), *sl[1:])] += w * _numpy(conv(_tensor(array[sl], device)[None])[0])
            weight[sl[1:]] += w
    np.testing.assert_allclose(_numpy(result), total / weight, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_apply_of_a_module_with_parameters_does_not_require_grad(device):
    conv = torch.nn.Conv2d(2, 3, 3, padding="same").to(device)
    result = pg.apply(conv, _tensor(_array(), device, torch.float32), SIZE, STRIDE, axes=AXES,
                      progress=False)  # fmt: skip
    assert not result.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_apply_runs_fn_without_grad(device):
    modes = []

    def fn(batch):
        modes.append(torch.is_grad_enabled())
        return batch

    pg.apply(fn, _tensor(_array(), device), SIZE, STRIDE, axes=AXES, progress=False)
    assert modes
    assert not any(modes)


@pytest.mark.parametrize("device", DEVICES)
def test_apply_on_an_input_that_requires_grad_gives_the_result(device):
    array = _array()
    image = _tensor(array, device).requires_grad_(True)
    result = pg.apply(lambda b: 2 * b, image, SIZE, STRIDE, axes=AXES, progress=False)
    np.testing.assert_allclose(_numpy(result), 2 * array, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_apply_on_an_input_that_requires_grad_stays_on_the_device(device):
    image = _tensor(_array(), device).requires_grad_(True)
    result = pg.apply(lambda b: 2 * b, image, SIZE, STRIDE, axes=AXES, progress=False)
    assert isinstance(result, torch.Tensor)
    assert result.device == image.device
    assert not result.requires_grad


CENTRES = (0.2, 0.5, 0.8)


def _scores(t, dim):
    return torch.cat([-((t - c) ** 2) for c in CENTRES], dim=dim)


@pytest.mark.parametrize("device", DEVICES)
def test_apply_argmax_gives_uint8_labels_on_the_device(device):
    image = _tensor(_array((1, 9, 11)), device, torch.float32)
    labels = pg.apply(lambda b: _scores(b, 1), image, SIZE, STRIDE, axes=AXES, reduce="argmax",
                      progress=False)  # fmt: skip
    assert labels.dtype == torch.uint8
    assert labels.device == image.device
    assert labels.shape == (9, 11)


@pytest.mark.parametrize("window", ["uniform", "gaussian"])
@pytest.mark.parametrize("device", DEVICES)
def test_apply_argmax_equals_argmax_of_the_full_scores(device, window):
    image = _tensor(_array((1, 9, 11)), device)
    labels = pg.apply(lambda b: _scores(b, 1), image, SIZE, STRIDE, axes=AXES, reduce="argmax",
                      window=window, progress=False)  # fmt: skip
    expected = torch.argmax(_scores(image, 0), dim=0)
    assert set(expected.unique().tolist()) == {0, 1, 2}
    assert torch.equal(labels.long(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_apply_nearest_upsampling_equals_repeat(device):
    array = _array()
    result = pg.apply(
        lambda b: b.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1),
        _tensor(array, device), SIZE, STRIDE, axes=AXES, scale=2, window="gaussian",
        progress=False,
    )  # fmt: skip
    expected = np.repeat(np.repeat(array, 2, axis=-2), 2, axis=-1)
    np.testing.assert_allclose(_numpy(result), expected, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_apply_into_a_tensor_out(device):
    array = _array()
    out = torch.full(SHAPE, float("nan"), dtype=torch.float64, device=device)
    result = pg.apply(lambda b: 2 * b, _tensor(array, device), SIZE, STRIDE, axes=AXES, out=out,
                      progress=False)  # fmt: skip
    assert result is out
    np.testing.assert_allclose(_numpy(out), 2 * array, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_apply_fn_returning_an_ndarray_raises(device):
    calls = []

    def fn(batch):
        calls.append(1)
        return batch.cpu().numpy()

    with pytest.raises(ValueError, match="must return a tensor"):
        pg.apply(fn, _tensor(_array(), device), SIZE, STRIDE, axes=AXES, progress=False)
    assert len(calls) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_apply_fn_returning_the_wrong_shape_raises(device):
    with pytest.raises(ValueError, match="returned shape"):
        pg.apply(lambda b: b[:, :, 1:], _tensor(_array(), device), SIZE, STRIDE, axes=AXES,
                 progress=False)  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_apply_pad_batch_gives_full_batches_and_the_image(device):
    array = _array()
    sizes = []

    def fn(batch):
        sizes.append(len(batch))
        return 3 * batch

    result = pg.apply(fn, _tensor(array, device), SIZE, STRIDE, axes=AXES, batch_size=4,
                      pad_batch=True, progress=False)  # fmt: skip
    assert set(sizes) == {4}
    np.testing.assert_allclose(_numpy(result), 3 * array, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_apply_with_a_numpy_only_pad_mode_raises(device):
    with pytest.raises(ValueError, match="pad_mode"):
        pg.apply(lambda b: b, _tensor(_array(), device), SIZE, STRIDE, axes=AXES, edge="pad",
                 pad_mode="mean", progress=False)  # fmt: skip


@pytest.mark.parametrize("classes", [2, 3, 20], ids=lambda c: f"{c}-classes")
def test_backend_argmax_matches_numpy_with_ties_and_nans(classes):
    from patchgrid.backends import backend_of

    rng = np.random.default_rng(classes)
    scores = rng.integers(0, 3, size=(classes, 5, 6)).astype(np.float32)  # many ties
    scores[classes - 1, 0, 0] = np.nan
    scores[0, 1, 1] = np.nan
    tensor = torch.from_numpy(scores)
    got = backend_of(tensor).argmax(tensor, 0)
    np.testing.assert_array_equal(got.numpy(), np.argmax(scores, axis=0))


@pytest.mark.parametrize("device", DEVICES)
def test_apply_leaves_the_batches_fn_keeps_intact(device):
    image = torch.rand(40, 44, device=device)
    kept = []

    def fn(batch):
        kept.append(batch[:, 1:])  # a view: it shares the batch's storage
        return batch

    pg.apply(fn, image, 8, 4, batch_size=3, pad_batch=True, progress=False)
    patches = pg.extract(image, pg.PatchGrid(image.shape, 8, 4, edge="shift"), flatten=True)
    got = torch.cat(kept)[: len(patches)]
    assert torch.equal(got, patches[:, 1:])


# The one rule on torch too (issue #13).


def test_extract_into_a_narrower_tensor_refuses_values_it_cannot_hold():
    image = torch.full((8, 8), 300, dtype=torch.int16)
    with pytest.raises(ValueError, match="which dtype=int8 cannot hold"):
        pg.extract(image, 4, out=torch.zeros((2, 2, 4, 4), dtype=torch.int8))


def test_extract_of_floats_into_an_integer_tensor_is_refused():
    with pytest.raises(TypeError, match="'same_kind' rule"):
        pg.extract(torch.ones(8, 8), 4, out=torch.zeros((2, 2, 4, 4), dtype=torch.int32))


def test_apply_out_that_is_the_tensor_is_refused():
    image = torch.rand(40, 40)
    with pytest.raises(ValueError, match="out shares memory with the image"):
        pg.apply(lambda b: b, image, 16, 8, out=image)


def test_a_narrowing_max_of_tensors_is_refused():
    patches = torch.full((4, 4, 4), 300, dtype=torch.int16)
    with pytest.raises(ValueError, match="dtype=uint8 cannot hold"):
        pg.merge(patches, (8, 8), reduce="max", dtype=torch.uint8)


def test_64_bit_integer_tensors_the_accumulator_cannot_sum_exactly_are_refused():
    image = torch.full((24, 30), 2**60, dtype=torch.int64)
    with pytest.raises(ValueError, match="reduce='max' or 'min'"):
        pg.merge(pg.extract(image, 16, 8), image.shape, stride=8, dtype=torch.int64)


def test_float32_tensors_come_back_exactly_through_an_overlapping_merge():
    image = torch.rand(23, 29)
    merged = pg.merge(pg.extract(image, 8, 3), image.shape, stride=3, window="gaussian")
    assert merged.dtype == torch.float32
    assert torch.equal(merged, image)


def test_a_model_returning_a_tensor_that_requires_grad_is_refused():
    weight = torch.nn.Parameter(torch.ones(1))

    def model(batch):
        with torch.enable_grad():
            return batch * weight

    with pytest.raises(ValueError, match="requires grad"):
        pg.apply(model, torch.ones(8, 8), 4)


def test_views_of_a_tensor_share_its_memory_and_a_copy_does_not():
    # torch has no read-only tensors: the documented behaviour is that views share the
    # image's memory (so in-place work on them changes the image) and copy=True does not.
    image = torch.arange(100.0).reshape(10, 10)
    view = pg.extract(image, 4, 2)
    assert view.untyped_storage().data_ptr() == image.untyped_storage().data_ptr()
    copy = pg.extract(image, 4, 2, copy=True)
    copy.sub_(1)
    assert torch.equal(image, torch.arange(100.0).reshape(10, 10))


@pytest.mark.parametrize("edge", ["drop", "shift", "pad"])
def test_gradients_through_extract_equal_the_loop_on_every_call(edge):
    # The first call of a layout and the cached ones make their views alike: a view that
    # reached past a slice of the image once lost the gradient of what lay beyond.
    x = torch.rand(10, 13, dtype=torch.float64, requires_grad=True)
    grid = pg.PatchGrid((10, 13), 4, 2, edge=edge)
    grads = []
    for _ in range(3):
        patches = pg.extract(x, grid)
        weights = torch.arange(patches.numel(), dtype=torch.float64).reshape(patches.shape)
        (patches * weights).sum().backward()
        grads.append(x.grad.clone())
        x.grad = None
    expected = torch.zeros(10, 13, dtype=torch.float64)
    for i in range(len(grid)):
        sl = grid.slices(i)
        inside = tuple(slice(s.start, min(s.stop, n)) for s, n in zip(sl, (10, 13)))
        cut = tuple(slice(0, s.stop - s.start) for s in inside)
        expected[inside] += weights[grid.position(i)][cut]
    for got in grads:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _oom_model(limit, calls):
    def model(batch):
        calls.append(len(batch))
        if len(batch) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.tanh(batch * 2)

    return model


@pytest.mark.parametrize(("batch_size", "limit"), [(8, 3), (8, 4), (5, 1), (16, 7)])
@pytest.mark.parametrize("pad_batch", [False, True], ids=["plain", "pad-batch"])
def test_out_of_memory_halves_the_batch_and_gives_the_smaller_batchs_result(
    batch_size, limit, pad_batch
):
    image = torch.rand(1, 30, 26, dtype=torch.float64)
    kw = dict(axes=(1, 2), window="gaussian", pad_batch=pad_batch, progress=False)
    calls = []
    with pytest.warns(pg.PatchgridWarning, match=r"ran out of device memory on a batch of"):
        got = pg.apply(_oom_model(limit, calls), image, 8, 4, batch_size=batch_size, **kw)
    final = batch_size
    while final > limit:
        final //= 2
    expected = pg.apply(_oom_model(limit, []), image, 8, 4, batch_size=final, **kw)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert max(calls[-3:]) <= final  # it went on with the smaller batches
    grid = pg.PatchGrid((1, 30, 26), 8, 4, axes=(1, 2))
    assert sum(n for n in calls if n <= limit) >= len(grid)  # every patch ran once it fit


def test_out_of_memory_on_one_patch_is_raised():
    image = torch.rand(1, 20, 20, dtype=torch.float64)
    with pytest.raises(torch.cuda.OutOfMemoryError), pytest.warns(pg.PatchgridWarning):
        pg.apply(_oom_model(0, []), image, 8, 4, axes=(1, 2), batch_size=4, progress=False)


def test_other_errors_of_the_model_are_not_retried():
    calls = []

    def broken(batch):
        calls.append(len(batch))
        raise RuntimeError("shape mismatch in the model")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        pg.apply(broken, torch.rand(1, 20, 20), 8, 4, axes=(1, 2), batch_size=4, progress=False)
    assert calls == [4]


def test_the_hosts_memory_error_is_not_retried():
    def greedy(batch):
        raise MemoryError("no more host memory")

    with pytest.raises(MemoryError):
        pg.apply(greedy, np.zeros((20, 20)), 8, 4, batch_size=4, progress=False)
