"""patchgrid: cut N-dimensional images into patches, know where each sits, put them back."""

from ._checks import PatchgridError
from .apply import apply
from .extract import extract
from .grid import PatchGrid
from .io import Image, open, save
from .merge import Merger, coverage, merge
from .sample import label_weights, sample
from .windows import window

__all__ = [
    "Image",
    "Merger",
    "PatchGrid",
    "PatchgridError",
    "apply",
    "coverage",
    "extract",
    "label_weights",
    "merge",
    "open",
    "sample",
    "save",
    "window",
]
__version__ = "0.1.0"
