"""Module-level settings of patchgrid's out-of-core work and plan cache, read at each call (L0).

Set them before a call to trade memory for speed::

    import patchgrid.settings
    patchgrid.settings.TILE_BYTES = 64 << 20  # larger tiles: fewer patches read twice

Each is read when a call starts, never copied at import time, so a change applies to the next
call.
"""

from __future__ import annotations

__all__ = ["CACHE_BYTES", "DEVICE_ENGINE", "FINISH_BYTES", "TILE_BYTES"]

#: Bytes of accumulator one tile may hold when ``apply`` or ``patchgrid merge`` fill an output
#: on disk tile by tile across the plane: a slab of patch + stride rows across the tile's
#: extent. ``apply`` tiles only when one slab across the whole plane would pass this.
TILE_BYTES: int = 24 << 20

#: Bytes of accumulator whose finished rows are normalised, cast and written at once.
FINISH_BYTES: int = 16 << 20

#: Bytes of arrays (weights, windows, coverages, the index tables of small merges) that the plans
#: of recent layouts keep between calls, so that a repeated call pays for its data only. The
#: least recently used go first; a plan larger than this is made for its call and not kept.
#: 0 keeps none.
CACHE_BYTES: int = 32 << 20

#: Which torch tensors the device engine merges: ``"auto"`` those on an accelerator (CUDA),
#: ``"always"`` every tensor, also on the CPU (to compare the engines, or count its operations),
#: ``"never"`` none. The device engine adds a batch in a few fused operations whatever its
#: patches' size, keeps the window and the coverage on the device, and finishes rows without
#: a host copy or a synchronisation; on the CPU, torch's rows engine is faster for large patches.
DEVICE_ENGINE: str = "auto"
