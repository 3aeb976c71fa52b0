"""Against MONAI itself, where it is installed (it is not a dependency: these tests skip
without it): the same placement, the same gaussian, the same blend."""

import pytest

torch = pytest.importorskip("torch")
inferers = pytest.importorskip("monai.inferers")

import patchgrid as pg  # noqa: E402


def _net(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(4, 3, 3, padding=1)
    ).double()
    return net.eval()


@pytest.mark.parametrize("shape", [(40, 44, 36), (16, 30, 23)], ids=str)
@pytest.mark.parametrize("roi", [16, 12])
def test_apply_with_monais_gaussian_equals_sliding_window_inference(shape, roi):
    net = _net()
    image = torch.rand(1, 1, *shape, dtype=torch.float64)
    with torch.no_grad():
        theirs = inferers.sliding_window_inference(
            image, (roi,) * 3, 4, net, overlap=0.5, mode="gaussian"
        )[0]
    ours = pg.apply(net, image[0], roi, roi // 2, axes=(1, 2, 3), window="monai-gaussian",
                    batch_size=4, progress=False)  # fmt: skip
    # The weights agree within float32 steps (MONAI makes them in float32, its exp is torch's);
    # the network's outputs are the same. Without the floor the two differ by up to 0.1.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    labels_ours, labels_theirs = ours.argmax(0), theirs.argmax(0)
    assert (labels_ours != labels_theirs).float().mean() < 1e-4


def test_monais_gaussian_is_not_the_plain_gaussian():
    # The reason the name exists: with the plain gaussian, blends of a real net differ from
    # MONAI's visibly, because of MONAI's floor alone.
    net = _net(1)
    image = torch.rand(1, 1, 40, 44, 36, dtype=torch.float64)
    with torch.no_grad():
        theirs = inferers.sliding_window_inference(image, (16,) * 3, 4, net, overlap=0.5,
                                                   mode="gaussian")[0]  # fmt: skip
    plain = pg.apply(net, image[0], 16, 8, axes=(1, 2, 3), window="gaussian", progress=False)
    assert float((plain - theirs).abs().max()) > 1e-4


@pytest.mark.parametrize("overlap", [0.25, 0.5, 0.6, 0.75])
def test_overlap_places_patches_where_monai_does(overlap):
    net = _net(2)
    image = torch.rand(1, 1, 37, 30, 26, dtype=torch.float64)
    with torch.no_grad():
        theirs = inferers.sliding_window_inference(image, (16, 12, 10), 3, net,
                                                   overlap=overlap, mode="gaussian")[0]  # fmt: skip
    ours = pg.apply(net, image[0], (16, 12, 10), overlap=overlap, axes=(1, 2, 3),
                    window="monai-gaussian", batch_size=3, progress=False)  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
