"""Tiles with context: each tile of a strip together with up to ``margin`` pixels of its
neighbours, for a codec that asks for neighbour context
(:attr:`~wsicodec.codecs.TileCodec.context`: the learned codec).

::

    iter_strips ─► iter_context_strips (each strip grown by ``margin`` rows of the strips
        above and below) ─► iter_context_tiles ─► ContextTile (region, box of the tile)

:mod:`wsicodec.pipeline` feeds these to the codec, so its tile borders sit inside the
coded area and stitched tiles show no seams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from wsicodec.tiling.pyramid import PyramidPlan, Strip


@dataclass(frozen=True)
class ContextTile:
    """A padded tile with up to ``margin`` pixels of its neighbours around it."""

    col: int
    region: np.ndarray                   #: (h, w, 3) uint8, a read-only view of its strip
    box: tuple[int, int, int, int]       #: (top, left, height, width) of the tile in region


def iter_context_strips(strips: Iterator[Strip], plan: PyramidPlan, margin: int
                        ) -> Iterator[tuple[Strip, np.ndarray, int]]:
    """(strip, strip grown by ``margin`` rows of the strips above and below, rows added on top).

    Holds one strip per level until the next one of that level arrives, and ``margin``
    rows of the one before it (a copy); the strip yielded is a view of its rows in the
    grown one, so a consumer holding both holds the pixels once.  The strip's own rows
    are edge-padded to the tile size first.
    """
    t = plan.tile_size
    held: dict[int, tuple[Strip, np.ndarray]] = {}   # level -> (strip, rows of the strip above)
    empty = np.zeros((0, 0, 3), np.uint8)
    for s in strips:
        last_row = plan.levels[s.level].grid.rows - 1
        above = empty
        if s.level in held:
            h, prev = held.pop(s.level)
            out = _grown(h, prev, s.pixels[:margin], t)
            above = h.pixels[h.pixels.shape[0] - margin:].copy()    # not a view: the strip goes
            del h, prev
            yield out
            del out
        if s.row == last_row:
            yield _grown(s, above, empty, t)
        else:
            held[s.level] = (s, above)


def _grown(s: Strip, above: np.ndarray, below: np.ndarray, t: int) -> tuple[Strip, np.ndarray, int]:
    """``s`` with ``above`` and ``below`` stacked on it, and ``s`` as a view of its rows there."""
    ext = _stack(above, _pad_rows(s.pixels, t), below)
    top = len(above)
    return Strip(s.level, s.row, ext[top:top + s.pixels.shape[0]]), ext, top


def _pad_rows(p: np.ndarray, t: int) -> np.ndarray:
    return p if p.shape[0] >= t else np.pad(p, ((0, t - p.shape[0]), (0, 0), (0, 0)), mode="edge")


def _stack(above: np.ndarray, mid: np.ndarray, below: np.ndarray) -> np.ndarray:
    parts = [a for a in (above, mid, below) if a.size]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def iter_context_tiles(ext: np.ndarray, top: int, tile_size: int, margin: int
                       ) -> Iterator[ContextTile]:
    """Cut a context-grown strip (see :func:`iter_context_strips`) into tiles with margins.

    Columns are edge-padded to whole tiles first, like
    :func:`~wsicodec.tiling.pyramid.iter_tiles`.  Regions are read-only views of the
    strip, not copies: a row of a wide slide queued for coding holds its strip once.
    """
    t = tile_size
    w = ext.shape[1]
    cols = -(-w // t)
    if cols * t != w:
        ext = np.pad(ext, ((0, 0), (0, cols * t - w), (0, 0)), mode="edge")
    for col in range(cols):
        x0 = col * t
        xa, xb = max(0, x0 - margin), min(cols * t, x0 + t + margin)
        region = ext[:, xa:xb]
        region.flags.writeable = False
        yield ContextTile(col, region, (top, x0 - xa, t, t))
