"""The device engine's cost, counted: the torch operations and the host transfers of an apply
over N patches in batches of B.

On CUDA every torch operation is a kernel launch and every host array a synchronous copy, so
the engine is held to a number of operations that grows with the batches, not the patches,
and to host transfers that do not grow at all. The counts are made on the CPU with
``settings.DEVICE_ENGINE = "always"``, which runs CPU tensors through the engine CUDA tensors
take: the same Python, so the same operations.
"""

import collections

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import patchgrid as pg  # noqa: E402

# What brings host data to a device, or asks the device for a value: on CUDA, a copy or a
# synchronisation each.
HOST = ("aten.lift_fresh", "aten._local_scalar_dense", "aten.item")


class Count(TorchDispatchMode):
    """Counts every torch operation run under it, by name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        if func is torch.ops.aten.copy_.default and args[0].device != args[1].device:
            self.ops["h2d"] += 1  # a copy between devices
        return func(*args, **(kwargs or {}))

    def host(self):
        return sum(n for name, n in self.ops.items() if name.startswith(HOST) or name == "h2d")


def _run(monkeypatch, engine, length, batch, size=8, **kw):
    """Counts of an apply of an identity model (no operations of its own) over a volume of
    24 x 24 x ``length``; the number of patches; the conversions of host arrays to tensors."""
    monkeypatch.setattr(pg.settings, "DEVICE_ENGINE", engine)
    image = torch.rand(24, 24, length, generator=torch.Generator().manual_seed(length))
    grid = pg.PatchGrid(image.shape, size, size // 2)
    made = collections.Counter()
    for name in ("as_tensor", "tensor", "from_numpy"):
        real = getattr(torch, name)

        def spy(*a, _real=real, _name=name, **k):
            made[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(torch, name, spy)
    with Count() as count:
        out = pg.apply(lambda b: b, image, size, size // 2, batch_size=batch, progress=False, **kw)
    monkeypatch.undo()
    torch.testing.assert_close(out, image)  # an identity model gives the image back
    return count, len(grid), grid.counts, made


@pytest.mark.parametrize("window", [None, "gaussian"])
def test_operations_grow_with_the_batches_not_the_patches(monkeypatch, window):
    for length in (96, 320):
        for batch in (1, 4, 16):
            count, n, counts, _ = _run(monkeypatch, "always", length, batch, window=window)
            assert batch <= counts[-1]  # batches within a grid row: N / B bounds the rows too
            total = sum(count.ops.values())
            assert total <= 30 * n / batch + 300, (length, batch, n, total)


def test_the_bound_fails_for_an_engine_that_adds_patch_by_patch(monkeypatch):
    # The rows engine adds patches of 64 KiB or more one by one (on the CPU torch is faster
    # so); the device engine so made is caught by the bound above.
    from patchgrid._accumulate import Device

    monkeypatch.setattr(Device, "runs_below", 0)
    count, n, _, _ = _run(monkeypatch, "always", 320, 16)
    assert sum(count.ops.values()) > 30 * n / 16 + 300


@pytest.mark.parametrize("window", [None, "gaussian", "monai-gaussian"])
@pytest.mark.parametrize("reduce", ["mean", "argmax"])
def test_host_transfers_do_not_grow_with_the_patches(monkeypatch, window, reduce):
    def run(length):
        monkeypatch.setattr(pg.settings, "DEVICE_ENGINE", "always")
        image = torch.rand(2, 24, 24, length, generator=torch.Generator().manual_seed(0))
        made = collections.Counter()
        for name in ("as_tensor", "tensor"):
            real = getattr(torch, name)

            def spy(*a, _real=real, _name=name, **k):
                made[_name] += 1
                return _real(*a, **k)

            monkeypatch.setattr(torch, name, spy)
        with Count() as count:
            pg.apply(lambda b: b, image, (8, 8, 8), 4, batch_size=4, window=window,
                     reduce=reduce, progress=False)  # fmt: skip
        monkeypatch.undo()
        return count.host(), sum(made.values())

    small, large = run(48), run(192)  # 4x the patches
    assert small == large
    assert large[1] <= 6  # the window and the coverage's profiles, made once


def test_the_engines_agree_with_the_numpy_path(monkeypatch):
    rng = np.random.default_rng(3)
    image = rng.random((3, 21, 17, 30)).astype(np.float32)

    def model(b):
        return b[:, :2] * 2 - 1  # NumPy and torch alike

    want = pg.apply(model, image, (8, 6, 9), (5, 4, 6), window="gaussian", progress=False)
    for engine in ("never", "always"):
        monkeypatch.setattr(pg.settings, "DEVICE_ENGINE", engine)
        got = pg.apply(model, torch.from_numpy(image), (8, 6, 9), (5, 4, 6), window="gaussian",
                       progress=False)  # fmt: skip
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def test_a_wrong_engine_setting_is_named(monkeypatch):
    monkeypatch.setattr(pg.settings, "DEVICE_ENGINE", "cuda")
    with pytest.raises(ValueError, match=r"DEVICE_ENGINE must be 'auto', 'always' or 'never', "
                                         r"got 'cuda'"):  # fmt: skip
        pg.apply(lambda b: b, torch.zeros(8, 8), 4, progress=False)


# --- a batch of images, MONAI's (B, C, *spatial) -------------------------------------------


def _conv():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 1)
    ).eval()


def test_a_batch_of_images_gives_the_model_n_c_patch_batches():
    net = _conv()
    images = torch.rand(3, 2, 12, 14, 16, generator=torch.Generator().manual_seed(1))
    seen = []

    def model(b):
        seen.append(tuple(b.shape))
        return net(b)

    got = pg.apply(model, images, (8, 8, 8), overlap=0.5, batch_size=4, window="monai-gaussian",
                   batched=True, progress=False)  # fmt: skip
    assert got.shape == (3, 3, 12, 14, 16)
    assert all(len(s) == 5 and s[1:] == (2, 8, 8, 8) for s in seen)
    for i in range(3):  # each image as if given alone
        alone = pg.apply(net, images[i], (8, 8, 8), overlap=0.5, batch_size=4,
                         window="monai-gaussian", progress=False)  # fmt: skip
        torch.testing.assert_close(got[i], alone, rtol=0, atol=0)


def test_a_batch_of_images_against_monai():
    monai = pytest.importorskip("monai.inferers")
    net = _conv()
    images = torch.rand(2, 2, 20, 18, 22, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = monai.sliding_window_inference(images, (8, 8, 8), 4, net, overlap=0.25,
                                              mode="gaussian")  # fmt: skip
    got = pg.apply(net, images, (8, 8, 8), overlap=0.25, batch_size=4, window="monai-gaussian",
                   batched=True, progress=False)  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_batch_of_images_into_out_and_with_argmax(tmp_path):
    zarr = pytest.importorskip("zarr")
    rng = np.random.default_rng(4)
    images = rng.random((2, 3, 10, 12)).astype(np.float32)
    out = zarr.create_array(tmp_path / "o.zarr", shape=(2, 10, 12), chunks=(1, 5, 6),
                            dtype="uint8")  # fmt: skip
    got = pg.apply(lambda b: b, images, (4, 4), 2, reduce="argmax", batched=True, out=out,
                   progress=False)  # fmt: skip
    assert got is out
    np.testing.assert_array_equal(out[...], images.argmax(axis=1))
    mem = pg.apply(lambda b: b, images, (4, 4), 2, reduce="argmax", batched=True, progress=False)
    np.testing.assert_array_equal(mem, images.argmax(axis=1))


def test_a_batch_of_images_with_an_int_size_tiles_the_spatial_axes():
    images = torch.rand(2, 3, 9, 10, 11, generator=torch.Generator().manual_seed(7))
    seen = []

    def model(b):
        seen.append(tuple(b.shape[1:]))
        return b

    got = pg.apply(model, images, 4, overlap=0.5, batched=True, progress=False)
    assert set(seen) == {(3, 4, 4, 4)}  # MONAI's (B, C, *spatial): C is never tiled
    torch.testing.assert_close(got, images)


def test_a_batch_of_images_names_what_is_wrong():
    with pytest.raises(ValueError, match=r"axes=\(0, 2\) names it"):
        pg.apply(lambda b: b, np.zeros((2, 8, 8)), (4, 4), axes=(0, 2), batched=True)
    with pytest.raises(ValueError, match=r"needs at least one more axis"):
        pg.apply(lambda b: b, np.zeros(8), 4, batched=True)
    with pytest.raises(ValueError, match=r"out must have the batch of 2 images on axis 0"):
        pg.apply(lambda b: b, np.zeros((2, 8, 8)), (4, 4), batched=True, out=np.zeros((8, 8)))


# --- a model on a device over an image on the host ----------------------------------------


@pytest.mark.parametrize("engine", ["auto", "always"])
def test_device_runs_the_model_on_tensors_over_a_host_image(monkeypatch, engine, tmp_path):
    monkeypatch.setattr(pg.settings, "DEVICE_ENGINE", engine)
    rng = np.random.default_rng(5)
    image = rng.random((2, 30, 26, 22)).astype(np.float32)
    kinds = set()

    def model(b):
        kinds.add(type(b).__name__)
        return b * 2

    want = pg.apply(lambda b: b * 2, image, (8, 8, 8), 5, window="gaussian", progress=False)
    got = pg.apply(model, image, (8, 8, 8), 5, window="gaussian", device="cpu", progress=False)
    assert kinds == {"Tensor"}
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    memmap = np.lib.format.open_memmap(tmp_path / "o.npy", "w+", np.float32, image.shape)
    pg.apply(model, image, (8, 8, 8), 5, window="gaussian", device="cpu", out=memmap,
             progress=False)  # fmt: skip
    np.testing.assert_allclose(memmap, want, rtol=1e-6)
    tensor = pg.apply(model, torch.from_numpy(image), (8, 8, 8), 5, window="gaussian",
                      device="cpu", progress=False)  # fmt: skip
    np.testing.assert_allclose(tensor.numpy(), want, rtol=1e-6)


def test_device_from_a_file_to_a_file(tmp_path):
    zarr = pytest.importorskip("zarr")
    rng = np.random.default_rng(6)
    data = rng.random((1, 40, 24, 28)).astype(np.float32)
    src = zarr.create_array(tmp_path / "in.zarr", shape=data.shape, chunks=(1, 8, 24, 28),
                            dtype="float32")  # fmt: skip
    src[...] = data
    dst = zarr.create_array(tmp_path / "out.zarr", shape=(2, 40, 24, 28), chunks=(2, 8, 24, 28),
                            dtype="float32")  # fmt: skip

    def model(b):
        assert isinstance(b, torch.Tensor)
        return torch.cat([b, -b], dim=1)

    got = pg.apply(model, src, (8, 8, 8), 4, device="cpu", out=dst, progress=False)
    assert got is dst
    np.testing.assert_allclose(dst[...], np.concatenate([data, -data]), rtol=1e-6)


def test_device_names_what_is_wrong():
    with pytest.raises(ValueError, match=r"device must be a torch device .* got 'gpu0'"):
        pg.apply(lambda b: b, np.zeros((8, 8)), 4, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"torch sees no CUDA device"):
            pg.apply(lambda b: b, np.zeros((8, 8)), 4, device="cuda")


def test_a_batch_of_no_images_gives_an_empty_result_without_calling_fn():
    def never(b):
        raise AssertionError("fn called")

    got = pg.apply(never, np.zeros((0, 2, 12, 14), np.float32), 4, batched=True)
    assert got.shape == (0, 2, 12, 14)
    assert got.dtype == np.float32
    da = pytest.importorskip("dask.array")
    lazy = pg.apply(never, da.zeros((0, 2, 12, 14), dtype=np.float32), 4, batched=True)
    assert lazy.shape == (0, 2, 12, 14)


def test_a_batch_of_images_on_disk_is_read_region_by_region(tmp_path):
    zarr = pytest.importorskip("zarr")
    data = np.random.default_rng(8).random((2, 1, 16, 16, 20)).astype(np.float32)
    src = zarr.create_array(tmp_path / "in.zarr", shape=data.shape, chunks=(1, 1, 8, 8, 10),
                            dtype="float32")  # fmt: skip
    src[...] = data
    reads = []
    real = type(src).__getitem__

    def spy(self, key):
        reads.append(key)
        return real(self, key)

    import unittest.mock

    with unittest.mock.patch.object(type(src), "__getitem__", spy):
        got = pg.apply(lambda b: b * 2, src, 8, 4, batched=True, progress=False)
    np.testing.assert_allclose(got, 2 * data, rtol=1e-6)
    # Every read takes one image and a patch-sized region of it, never a whole image.
    assert all(isinstance(k[0], int) and k[3].stop - k[3].start <= 8 for k in reads)


def test_a_batch_of_images_counts_progress_to_its_total(tmp_path, monkeypatch):
    zarr = pytest.importorskip("zarr")
    monkeypatch.setattr(pg.settings, "TILE_BYTES", 4096)  # tiles: border patches read twice
    images = np.random.default_rng(9).random((2, 1, 32, 120)).astype(np.float32)
    out = zarr.create_array(tmp_path / "o.zarr", shape=images.shape, chunks=(1, 1, 16, 40),
                            dtype="float32")  # fmt: skip
    seen = []
    pg.apply(lambda b: b, images, (16, 16), 8, batched=True, out=out,
             progress=lambda done, total: seen.append((done, total)))  # fmt: skip
    assert seen[-1][0] == seen[-1][1]
    np.testing.assert_allclose(out[...], images, rtol=1e-6)


def test_device_takes_a_bfloat16_model_and_a_big_endian_image():
    image = np.random.default_rng(10).random((1, 20, 23)).astype(">f4")
    got = pg.apply(lambda b: (b * 2).bfloat16(), image, 8, 4, axes=(1, 2), device="cpu",
                   progress=False)  # fmt: skip
    np.testing.assert_allclose(got, 2 * image.astype(np.float32), rtol=1e-2)
