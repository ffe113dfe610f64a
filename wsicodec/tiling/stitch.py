"""Assemble a region of one level from its (padded) decoded tiles."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from wsicodec.tiling.geometry import Rect, TileGrid


def stitch_region(grid: TileGrid, rect: Rect, tiles: Mapping[tuple[int, int], np.ndarray],
                  *, channels: int = 4, out: np.ndarray | None = None) -> np.ndarray:
    """Paste ``tiles`` (keyed by (col, row), each at least the tile's in-image size) into a
    ``(rect.height, rect.width, channels)`` uint8 array.

    ``rect`` may reach outside the level (negative or past the edge); those pixels stay
    0, i.e. transparent black with ``channels=4`` as OpenSlide returns them.  With 4
    channels alpha is 255 wherever a tile was pasted.  Tiles that overlap ``rect`` but
    are missing from ``tiles`` stay 0 too.

    ``out``: a zeroed array of that shape to paste into (a caller that allocates it
    before decoding the tiles learns that a region does not fit before the work).
    """
    shape = (max(rect.height, 0), max(rect.width, 0), channels)
    if out is None:
        out = np.zeros(shape, np.uint8)
    elif out.shape != shape or out.dtype != np.uint8:
        raise ValueError(f"out must be a {shape} uint8 array, got {out.shape} {out.dtype}")
    for (col, row), tile in tiles.items():
        trect = grid.tile_rect(col, row)
        part = trect.intersect(rect)
        if part.empty:
            continue
        src = tile[part.y - trect.y:part.y_end - trect.y, part.x - trect.x:part.x_end - trect.x]
        dst = out[part.y - rect.y:part.y_end - rect.y, part.x - rect.x:part.x_end - rect.x]
        dst[..., :3] = src[..., :3]
        if channels == 4:
            dst[..., 3] = 255
    return out
