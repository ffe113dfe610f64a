"""Output pyramid: which levels to write, and their pixels as a stream of tile rows.

Levels go in 2x steps from the source's level 0 down to the first level that fits in
one tile.  A level whose downsample matches one of the source's own levels (within 2 %)
is read from that level; the others are made by 2x2 area-averaging the level above.

Memory stays bounded by the level *width*, never its area: the source is read one
tile-row strip at a time (``tile_size`` rows x full width), and each generated level
keeps at most one pending half-height strip::

    source level j ──strip──► out level k ──2x2 mean each strip, pair them──► out level k+1 ──► ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from wsicodec.errors import InvalidSettingError
from wsicodec.tiling.geometry import LevelInfo, Rect, TileGrid, validate_tile_size
from wsicodec.tiling.sources import SlideSource

DOWNSAMPLE_TOLERANCE = 0.02


@dataclass(frozen=True)
class LevelPlan:
    """One output level and where its pixels come from.

    ``source_level`` is the source level it is read from, or ``None`` when it is made by
    downsampling the output level above it (index - 1).
    """

    index: int
    info: LevelInfo
    source_level: int | None
    tile_size: int

    @property
    def grid(self) -> TileGrid:
        return self.info.grid(self.tile_size)


@dataclass(frozen=True)
class PyramidPlan:
    """All output levels, finest first."""

    tile_size: int
    levels: tuple[LevelPlan, ...]

    @property
    def tile_count(self) -> int:
        return sum(lv.grid.tile_count for lv in self.levels)

    @property
    def pixel_count(self) -> int:
        return sum(lv.info.width * lv.info.height for lv in self.levels)


def plan_pyramid(level_dimensions: Sequence[tuple[int, int]],
                 level_downsamples: Sequence[float], tile_size: int) -> PyramidPlan:
    """Choose the output levels for a source with these levels.

    Raises:
        InvalidSettingError: bad tile size or an empty source.
    """
    validate_tile_size(tile_size)
    if not level_dimensions or min(level_dimensions[0]) < 1:
        raise InvalidSettingError(f"source has no pixels: levels {list(level_dimensions)}")
    w0, h0 = level_dimensions[0]
    levels = [LevelPlan(0, LevelInfo(w0, h0, 1.0), 0, tile_size)]
    while max(levels[-1].info.width, levels[-1].info.height) > tile_size:
        k = len(levels)
        target = 2.0 ** k
        prev = levels[-1].info
        source_level = None
        for j, ds in enumerate(level_downsamples):
            if j > 0 and abs(ds / target - 1.0) <= DOWNSAMPLE_TOLERANCE:
                source_level = j
                w, h = level_dimensions[j]
                break
        else:
            w, h = -(-prev.width // 2), -(-prev.height // 2)
        ds = (w0 / w + h0 / h) / 2.0
        levels.append(LevelPlan(k, LevelInfo(int(w), int(h), ds), source_level, tile_size))
    return PyramidPlan(tile_size, tuple(levels))


def downsample2(strip: np.ndarray, *, chunk: int = 4096) -> np.ndarray:
    """2x2 area mean (rounded) of an (h, w, c) uint8 array; odd edges are replicated,
    so the result is (ceil(h/2), ceil(w/2), c). Works in column chunks so the 16-bit
    temporaries stay small however wide the strip is."""
    h, w = strip.shape[:2]
    if h % 2 or w % 2:
        strip = np.pad(strip, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    out = np.empty((strip.shape[0] // 2, strip.shape[1] // 2, strip.shape[2]), np.uint8)
    step = max(2, chunk - chunk % 2)
    for x in range(0, strip.shape[1], step):
        s = strip[:, x:x + step].astype(np.uint16)
        total = s[0::2, 0::2] + s[1::2, 0::2] + s[0::2, 1::2] + s[1::2, 1::2]
        out[:, x // 2:(x + s.shape[1]) // 2] = (total + 2) >> 2
    return out


def pad_tile(tile: np.ndarray, tile_size: int) -> np.ndarray:
    """Pad an (h, w, 3) edge tile to (tile_size, tile_size, 3) by edge replication."""
    h, w = tile.shape[:2]
    if h == tile_size and w == tile_size:
        return np.ascontiguousarray(tile)
    return np.pad(tile, ((0, tile_size - h), (0, tile_size - w), (0, 0)), mode="edge")


@dataclass(frozen=True)
class Strip:
    """One tile row of one output level: ``pixels`` is (rows, level width, 3)."""

    level: int
    row: int
    pixels: np.ndarray


def iter_strips(source: SlideSource, plan: PyramidPlan) -> Iterator[Strip]:
    """Every tile row of every output level, each level's rows in order.

    Levels of one chain (a source-backed level and the generated levels below it) are
    interleaved. Raises whatever ``source.read_region`` raises.
    """
    t = plan.tile_size
    levels = plan.levels
    for start in (lv.index for lv in levels if lv.source_level is not None):
        end = start + 1
        while end < len(levels) and levels[end].source_level is None:
            end += 1
        chain = levels[start:end]
        pending: list[np.ndarray | None] = [None] * len(chain)
        rows_done = [0] * len(chain)

        def emit(pos: int, pixels: np.ndarray, last: bool) -> Iterator[Strip]:
            yield Strip(chain[pos].index, rows_done[pos], pixels)
            rows_done[pos] += 1
            nxt = pos + 1
            if nxt >= len(chain):
                return
            # Tile rows have even height (tile_size % 16 == 0) except a level's last one,
            # so halving each strip on its own equals halving the pair; only the halved
            # strip is kept while waiting for its partner.
            half = downsample2(pixels)
            if pending[nxt] is None and not last:
                pending[nxt] = half
                return
            below = half if pending[nxt] is None else np.concatenate([pending[nxt], half])
            pending[nxt] = None
            yield from emit(nxt, below, last)

        first = chain[0]
        grid = first.grid
        for row in range(grid.rows):
            rect = Rect(0, row * t, grid.width, min(t, grid.height - row * t))
            pixels = source.read_region(first.source_level, rect)  # type: ignore[arg-type]
            yield from emit(0, pixels, row == grid.rows - 1)


def iter_tiles(strip: Strip, tile_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(col, padded tile) for each tile of a strip, left to right."""
    w = strip.pixels.shape[1]
    for col in range(-(-w // tile_size)):
        x = col * tile_size
        yield col, pad_tile(strip.pixels[:, x:x + tile_size], tile_size)
