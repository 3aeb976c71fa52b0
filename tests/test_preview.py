"""``patchgrid preview`` and ``plot.preview``: the picture's geometry against the file's own
header (read with nibabel), its coverage against ``pg.coverage``, its layout (no overlaps, tight
margins, a legend), its atomic write, and the install hint without matplotlib."""

from __future__ import annotations

import builtins
import importlib.util
import itertools
import os
import pathlib
import re
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")
nib = pytest.importorskip("nibabel")

from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from nibabel.testing import data_path  # noqa: E402

import patchgrid as pg  # noqa: E402
from patchgrid import plot  # noqa: E402
from patchgrid.cli import main  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Real scans: (file, size, stride, axes); example4d is 4-D with 2.2 mm slices.
SCANS = {
    "anatomical": ("anatomical.nii", 16, 12, None),
    "example4d": ("example4d.nii.gz", (32, 32, 8), (24, 24, 6), (0, 1, 2)),
    "anisotropic": ("resampled_anat_moved.nii", (8, 8, 2), (6, 6, 1), None),
}


def _draw(name, **grid_args):
    file, size, stride, axes = SCANS[name]
    with pg.open(os.path.join(data_path, file)) as img:
        grid = pg.PatchGrid(img.shape, size=size, stride=stride, axes=axes, **grid_args)
        fig = plot.preview(img, grid)
    fig.canvas.draw()
    return fig, grid, os.path.join(data_path, file)


def _panels(fig, kind):
    return [ax for ax in fig.axes if ax.get_label().startswith(kind)]


def _axis_of(label):
    return int(re.match(r"axis (\d+)", label).group(1))


def _inches(fig, ax):
    box = ax.get_window_extent()
    return box.width / fig.dpi, box.height / fig.dpi


def _voxels(ax):
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    return abs(x1 - x0), abs(y1 - y0)


@pytest.mark.parametrize("name", list(SCANS))
def test_each_slice_is_drawn_at_its_true_aspect_on_one_scale(name):
    fig, _, path = _draw(name)
    zooms = nib.load(path).header.get_zooms()  # the reference: the file's own voxel sizes
    scales = []
    for ax in _panels(fig, "slice"):
        across, down = _axis_of(ax.get_xlabel()), _axis_of(ax.get_ylabel())
        nx, ny = _voxels(ax)
        width, height = _inches(fig, ax)
        assert width / height == pytest.approx((nx * zooms[across]) / (ny * zooms[down]), rel=0.01)
        scales.append(width / (nx * zooms[across]))
    assert max(scales) == pytest.approx(min(scales), rel=0.01)  # mm per inch, every panel


def test_thick_slices_make_flat_panels(tmp_path):
    path = tmp_path / "thick.nii.gz"
    pg.save(path, np.zeros((40, 40, 10), np.float32), spacing=(1.0, 1.0, 4.0))
    with pg.open(path) as img:
        fig = plot.preview(img, pg.PatchGrid(img.shape, size=8, stride=8))
    for ax in _panels(fig, "slice"):
        width, height = _inches(fig, ax)
        # 40 voxels of 1 mm against 10 of 4 mm: square; against 40 of 1 mm: square too.
        assert width / height == pytest.approx(1.0, rel=0.01)


def test_spacing_that_is_not_lengths_draws_square_voxels_and_says_so(tmp_path):
    path = tmp_path / "odd.nii.gz"
    pg.save(path, np.zeros((20, 30, 8), np.float32), spacing=(1.0, 1.0, 500.0))
    with pg.open(path) as img:
        fig = plot.preview(img, pg.PatchGrid(img.shape, size=4, stride=4))
    assert "voxels drawn square" in fig.texts[0].get_text()
    for ax in _panels(fig, "slice"):
        width, height = _inches(fig, ax)
        nx, ny = _voxels(ax)
        assert width / height == pytest.approx(nx / ny, rel=0.01)


@pytest.mark.parametrize("name", list(SCANS))
def test_axes_are_labelled_with_the_direction_they_point(name):
    fig, _, path = _draw(name)
    codes = nib.aff2axcodes(nib.load(path).affine)  # the end each voxel axis points to
    for ax in _panels(fig, "slice"):
        for label in (ax.get_xlabel(), ax.get_ylabel()):
            assert label.endswith(codes[_axis_of(label)])
        # As scanners draw: the lower-numbered axis across, the other up.
        assert _axis_of(ax.get_xlabel()) < _axis_of(ax.get_ylabel())
        assert ax.get_ylim()[0] < ax.get_ylim()[1]
        cut = int(ax.get_label().split()[1])
        name = {"L": "sagittal", "R": "sagittal", "P": "coronal", "A": "coronal"}
        assert ax.get_title().startswith(name.get(codes[cut], "axial") + ":")


@pytest.mark.parametrize("name", list(SCANS))
def test_the_slices_are_grey_and_untinted(name):
    fig, _, _ = _draw(name)
    for ax in _panels(fig, "slice"):
        (image,) = ax.images  # nothing drawn over the slice but lines and hatching
        assert image.get_cmap().name.startswith("gray")


def _boxes(fig):
    """Every block of the picture: each panel with its ticks, labels and title, the colour
    bar, the legend, the header."""
    renderer = fig.canvas.get_renderer()
    blocks = {ax.get_label(): ax.get_tightbbox(renderer) for ax in fig.axes}
    blocks["legend"] = fig.legends[0].get_window_extent(renderer)
    blocks["header"] = fig.texts[0].get_window_extent(renderer)
    return blocks


@pytest.mark.parametrize("edge", ["shift", "drop", "pad"])
@pytest.mark.parametrize("name", list(SCANS))
def test_nothing_overlaps_and_everything_is_inside(name, edge):
    fig, _, _ = _draw(name, edge=edge)
    blocks = _boxes(fig)
    for (a, box_a), (b, box_b) in itertools.combinations(blocks.items(), 2):
        assert not box_a.overlaps(box_b), (a, b)
    width, height = fig.get_size_inches() * fig.dpi
    for label, box in blocks.items():
        assert min(box.x0, box.y0) >= 0, label
        assert box.x1 <= width, label
        assert box.y1 <= height, label


def _check_layout(fig):
    blocks = _boxes(fig)
    for (a, box_a), (b, box_b) in itertools.combinations(blocks.items(), 2):
        assert not box_a.overlaps(box_b), (a, b)
    width, height = fig.get_size_inches() * fig.dpi
    margins = [
        min(b.x0 for b in blocks.values()),
        min(b.y0 for b in blocks.values()),
        width - max(b.x1 for b in blocks.values()),
        height - max(b.y1 for b in blocks.values()),
    ]
    assert min(margins) >= 0  # everything inside
    assert max(margins) / fig.dpi < 0.2  # and no wide margin (inches)


@pytest.mark.parametrize(
    ("shape", "spacing", "size", "stride"),
    [
        ((10, 20, 30), (1.0, 1.0, 2.0), 4, 2),  # the demo's: tall, narrow slices
        ((8, 200, 200), (3.0, 0.5, 0.5), (4, 32, 32), (2, 24, 24)),  # thick, wide slices
        ((600, 600), (1.0, 1.0), 40, 4),  # a picture, densely tiled
        ((100,), (1.0,), 16, 12),  # a line
    ],
    ids=["tall", "flat", "plane", "line"],
)
def test_any_shape_is_laid_out_without_overlap_in_tight_margins(
    tmp_path, shape, spacing, size, stride
):
    path = tmp_path / ("v.nii.gz" if len(shape) == 3 else "v.npy")
    pg.save(path, np.random.default_rng(0).random(shape).astype(np.float32), spacing=spacing)
    with pg.open(path) as img:
        fig = plot.preview(img, pg.PatchGrid(img.shape, size=size, stride=stride))
    fig.canvas.draw()
    _check_layout(fig)


@pytest.mark.parametrize("name", list(SCANS))
def test_margins_are_tight(name):
    fig, _, _ = _draw(name)
    blocks = list(_boxes(fig).values())
    width, height = fig.get_size_inches() * fig.dpi
    margins = [
        min(b.x0 for b in blocks),
        min(b.y0 for b in blocks),
        width - max(b.x1 for b in blocks),
        height - max(b.y1 for b in blocks),
    ]
    assert max(margins) / fig.dpi < 0.2  # inches
    assert fig.get_size_inches()[0] < 11.5


def test_a_4d_scan_names_the_axis_it_holds_still():
    fig, _, _ = _draw("example4d")
    assert "axis 3 at 0 (of 2)" in fig.texts[0].get_text()


def _counts(fig):
    """The coverage each small panel shows, read back through the colour bar's labels."""
    (bar,) = _panels(fig, "coverage legend")
    labels = [int(t.get_text()) for t in bar.get_xticklabels()]
    shown = {}
    for ax in _panels(fig, "coverage "):
        if ax.get_label() == "coverage legend":
            continue
        index = np.asarray(ax.images[0].get_array()).astype(int)
        shown[ax.get_label()] = np.where(index < 0, 0, np.take(labels, np.maximum(index, 0)))
    return bar, shown


@pytest.mark.parametrize("edge", ["shift", "drop", "pad"])
def test_the_coverage_panels_show_how_many_patches_cover_each_voxel(edge):
    fig, grid, _ = _draw("anatomical", edge=edge)
    bar, shown = _counts(fig)
    reference = pg.coverage(grid)  # over the padded image
    for cut in range(3):
        plane = np.take(reference, grid.shape[cut] // 2, axis=cut).T
        # A NIfTI panel draws its first axis across and its second up: rows are the second;
        # the panel spans the padded image, the reference the image.
        rows, cols = plane.shape
        np.testing.assert_array_equal(shown[f"coverage {cut}"][:rows, :cols], plane)
    assert "patches over each voxel" in bar.get_xlabel()
    assert ("red: none" in bar.get_xlabel()) == (edge == "drop")


def test_an_array_is_drawn_rows_down(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros((10, 20, 30), np.float32))
    with pg.open(tmp_path / "v.npy") as img:
        grid = pg.PatchGrid(img.shape, size=(4, 6, 8), stride=(3, 5, 7), edge="drop")
        fig = plot.preview(img, grid)
    _, shown = _counts(fig)
    reference = pg.coverage(grid)
    for cut in range(3):
        np.testing.assert_array_equal(
            shown[f"coverage {cut}"], np.take(reference, grid.shape[cut] // 2, axis=cut)
        )
    (ax,) = [a for a in _panels(fig, "slice 2")]
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # rows grow downwards
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("axis 1", "axis 0")


def _edges(ax):
    """x of the vertical and y of the horizontal patch edges drawn in ``ax``."""
    (lines,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    xs, ys = set(), set()
    for (x0, y0), (x1, _) in (seg[[0, -1]] for seg in lines.get_segments()):
        (xs if x0 == x1 else ys).add(x0 if x0 == x1 else y0)
    return xs, ys


def test_patch_edges_sit_at_the_patch_borders():
    image = np.zeros((20, 26))
    grid = pg.PatchGrid(image.shape, size=8, stride=6, edge="drop")
    fig = plot.preview(image, grid)
    xs, ys = _edges(_panels(fig, "slice")[0])
    # Starts 0, 6, 12 (rows) and 0, 6, 12, 18 (columns); edges at start and start + 8.
    assert ys == {e - 0.5 for e in (0, 6, 8, 12, 14, 20)}
    assert xs == {e - 0.5 for e in (0, 6, 8, 12, 14, 18, 20, 26)}
    assert "no patch" not in [t.get_text() for t in fig.legends[0].get_texts()]


def _dense(size):
    image = np.zeros((600, 600))
    fig = plot.preview(image, pg.PatchGrid(image.shape, size=size, stride=4))
    (ax,) = _panels(fig, "slice")
    xs, _ = _edges(ax)
    legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    return np.array(sorted(xs)), _inches(fig, ax)[0] * fig.dpi / 600, legend


def test_a_dense_grid_of_large_patches_draws_edges_apart_and_says_so():
    xs, px, legend = _dense(40)
    assert np.diff(xs).min() * px >= 12  # pixels between drawn edges
    assert re.search(r"patch edges \(1 in \d+ along axes 0, 1\)", legend)


def test_a_dense_grid_of_small_patches_draws_boxes_apart_and_says_so():
    xs, px, legend = _dense(8)
    starts, ends = xs[0::2], xs[1::2]
    np.testing.assert_array_equal(ends - starts, 8)  # whole patches
    assert (starts[1:] - ends[:-1]).min() * px >= 24  # with room between them
    assert re.search(r"patch edges \(1 in \d+ along axes 0, 1\)", legend)


@pytest.mark.parametrize(
    ("edge", "entries"),
    [
        ("shift", ["patch edges", "one patch (8 x 8)"]),
        ("drop", ["patch edges", "one patch (8 x 8)", "no patch"]),
        ("pad", ["patch edges", "one patch (8 x 8)", "padding"]),
    ],
)
def test_the_legend_names_what_is_drawn(edge, entries):
    image = np.zeros((20, 27))
    fig = plot.preview(image, pg.PatchGrid(image.shape, size=8, stride=6, edge=edge))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == entries


def test_nan_voxels_and_a_constant_image_draw(tmp_path):
    image = np.full((12, 14, 16), np.nan)
    image[2:6] = 3.0
    fig = plot.preview(image, pg.PatchGrid(image.shape, size=4))
    assert len(_panels(fig, "slice")) == 3


def test_the_png_is_written(tmp_path):
    fig = plot.preview(np.zeros((10, 12)), pg.PatchGrid((10, 12), size=4), tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes().startswith(PNG_MAGIC)
    assert isinstance(fig, Figure)


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(self, target, **kwargs):
        with open(target, "wb") as f:
            f.write(PNG_MAGIC)  # half a picture, then the disk fails
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        plot.preview(np.zeros((10, 12)), pg.PatchGrid((10, 12), size=4), tmp_path / "g.png")
    assert os.listdir(tmp_path) == []


def test_an_existing_file_is_kept_without_overwrite(tmp_path):
    (tmp_path / "g.png").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        plot.preview(np.zeros((10, 12)), pg.PatchGrid((10, 12), size=4), tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes() == b"mine"
    plot.preview(
        np.zeros((10, 12)), pg.PatchGrid((10, 12), size=4), tmp_path / "g.png", overwrite=True
    )
    assert (tmp_path / "g.png").read_bytes().startswith(PNG_MAGIC)


def test_without_matplotlib_the_preview_names_the_plot_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(pg.PatchgridError, match=re.escape("pip install 'patchgrid[plot]'")):
        plot.preview(np.zeros((10, 12)), pg.PatchGrid((10, 12), size=4))


def test_without_matplotlib_the_command_names_the_plot_extra(monkeypatch, capsys, tmp_path):
    np.save(tmp_path / "v.npy", np.zeros((10, 12, 14), np.float32))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = main(["preview", str(tmp_path / "v.npy"), "--size", "4", "-o", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert code != 0
    assert "pip install 'patchgrid[plot]'" in err
    assert "patchgrid[io]" not in err
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["v.npy"]


def test_the_command_writes_a_png_of_a_4d_scan(capsys, tmp_path):
    source = os.path.join(data_path, "example4d.nii.gz")
    out = tmp_path / "grid.png"
    argv = ["preview", source, "--size", "32,32,8", "--stride", "24,24,6", "-o", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_the_docs_picture_builds(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "make_pictures", ROOT / "docs" / "make_pictures.py"
    )
    pictures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pictures)
    written = pictures.command_line(tmp_path)
    assert (tmp_path / "preview.png").read_bytes().startswith(PNG_MAGIC)
    assert tmp_path / "preview.png" in written


def test_a_broken_matplotlib_is_told_apart_from_a_missing_one(monkeypatch):
    def broken(name, *args, **kwargs):
        if name == "matplotlib":
            raise ModuleNotFoundError("No module named 'kiwisolver'", name="kiwisolver")
        return real(name, *args, **kwargs)

    real = builtins.__import__
    monkeypatch.delitem(sys.modules, "matplotlib")
    monkeypatch.setattr("builtins.__import__", broken)
    with pytest.raises(pg.PatchgridError, match=r"installed but cannot be imported.*kiwisolver"):
        plot.need_matplotlib()
