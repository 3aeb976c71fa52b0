"""patchgrid: cut N-dimensional images into patches, know where each sits, put them back.

L5, the public face: the names of ``__all__``, re-exported from the private modules that hold
them (``pg.merge`` is :func:`patchgrid._merge.merge`; ``apply``, ``extract`` and ``merge``
through :func:`patchgrid._checks.keyword_hints`), and :mod:`patchgrid.settings`. The torch
datasets load on first use. The layers below are described in ``docs/design.md``.
"""

import typing as _typing

from . import _checks
from . import settings as settings  # the module, for its settings: pg.settings.TILE_BYTES
from ._apply import apply
from ._checks import PatchgridError, PatchgridWarning
from ._extract import extract
from ._mask import coarse_mask
from ._merge import Merger, coverage, merge
from ._sample import label_weights, sample
from .grid import PatchGrid
from .io import Image, open, save, tune_allocator
from .windows import window

__all__ = [
    "Image",
    "Merger",
    "PatchDataset",
    "PatchGrid",
    "PatchgridError",
    "PatchgridWarning",
    "RandomPatchDataset",
    "apply",
    "coarse_mask",
    "coverage",
    "extract",
    "label_weights",
    "merge",
    "open",
    "sample",
    "save",
    "tune_allocator",
    "window",
]
__version__ = "0.1.0"

if not _typing.TYPE_CHECKING:
    # MONAI's keywords (roi_size=, sw_batch_size=, ...) get a line naming patchgrid's. Only the
    # public names are wrapped, so the library's own calls skip it; type checkers and the API
    # pages see the functions themselves.
    apply = _checks.keyword_hints(apply, module=__name__)
    extract = _checks.keyword_hints(extract, module=__name__)
    merge = _checks.keyword_hints(merge, module=__name__)


def __getattr__(name: str) -> object:
    # The torch datasets load torch, so they load only when asked for.
    if name in ("PatchDataset", "RandomPatchDataset"):
        from . import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module 'patchgrid' has no attribute {name!r}")
