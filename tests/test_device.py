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
