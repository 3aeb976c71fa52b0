"""Module-level settings of patchgrid's out-of-core work, read at each call (L0).

Set them before a call to trade memory for speed::

    import patchgrid.settings
    patchgrid.settings.TILE_BYTES = 64 << 20  # larger tiles: fewer patches read twice

Each is read when a call starts, never copied at import time, so a change applies to the next
call.
"""

from __future__ import annotations

__all__ = ["FINISH_BYTES", "TILE_BYTES"]

#: Bytes of accumulator one tile may hold when ``apply`` or ``patchgrid merge`` fill an output
#: on disk tile by tile across the plane: a slab of patch + stride rows across the tile's
#: extent. ``apply`` tiles only when one slab across the whole plane would pass this.
TILE_BYTES: int = 24 << 20

#: Bytes of accumulator whose finished rows are normalised, cast and written at once.
FINISH_BYTES: int = 16 << 20
