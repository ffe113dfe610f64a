"""Frozen value types for pyramid geometry: level sizes, tile grids, rectangles.

Everything here is pure arithmetic on validated integers; nothing reads pixels.
Coordinates are ``(x, y)`` = ``(column, row)`` in pixels of one level, as in OpenSlide;
arrays are indexed ``[y, x]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from wsicodec.errors import CorruptDataError, InvalidSettingError, RegionOutOfBoundsError

MIN_TILE_SIZE = 16
MAX_TILE_SIZE = 8192


def validate_tile_size(tile_size: int, largest: int = MAX_TILE_SIZE) -> int:
    """Return ``tile_size`` if it is a multiple of 16 in [16, ``largest``] (default 8192,
    what a container may hold; compress writes at most a smaller size).

    Multiples of 16 keep the tile size valid for tiled TIFF output.

    Raises:
        InvalidSettingError: outside that range or not a multiple of 16.
    """
    if (not isinstance(tile_size, int) or isinstance(tile_size, bool)
            or not MIN_TILE_SIZE <= tile_size <= largest or tile_size % 16):
        raise InvalidSettingError(
            f"tile size must be a multiple of 16 in [{MIN_TILE_SIZE}, {largest}], "
            f"got {tile_size!r}")
    return tile_size


def tile_shape(tile_size: int) -> tuple[int, int, int]:
    """The shape every stored tile decodes to: (tile_size, tile_size, 3) (edge tiles are
    stored padded)."""
    return (tile_size, tile_size, 3)


def check_decoded_tile(tile: object, tile_size: int) -> np.ndarray:
    """``tile`` if it is a (tile_size, tile_size, 3) uint8 array, else CorruptDataError:
    a decoded tile of another geometry is damage, never pixels to show."""
    if (not isinstance(tile, np.ndarray) or tile.dtype != np.uint8
            or tile.shape != tile_shape(tile_size)):
        raise CorruptDataError(
            f"decoded to {getattr(tile, 'shape', None)} {getattr(tile, 'dtype', type(tile).__name__)}, "
            f"but its place holds a {tile_size}x{tile_size} RGB uint8 tile")
    return tile


@dataclass(frozen=True)
class Rect:
    """An axis-aligned rectangle ``[x, x+width) x [y, y+height)`` in level pixels."""

    x: int
    y: int
    width: int
    height: int

    @property
    def x_end(self) -> int:
        return self.x + self.width

    @property
    def y_end(self) -> int:
        return self.y + self.height

    @property
    def empty(self) -> bool:
        return self.width <= 0 or self.height <= 0

    def intersect(self, other: "Rect") -> "Rect":
        """The overlap of two rectangles (width/height 0 when they do not overlap)."""
        x, y = max(self.x, other.x), max(self.y, other.y)
        return Rect(x, y, max(0, min(self.x_end, other.x_end) - x),
                    max(0, min(self.y_end, other.y_end) - y))


@dataclass(frozen=True)
class TileGrid:
    """A ``width`` x ``height`` image cut into ``tile_size`` squares, row-major.

    Edge tiles are stored padded to the full ``tile_size``; :meth:`tile_rect` gives
    the part of a tile that lies inside the image.
    """

    width: int
    height: int
    tile_size: int

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1 or self.tile_size < 1:
            raise InvalidSettingError(
                f"grid needs width, height, tile_size >= 1, got {self.width}x{self.height}"
                f" tiles of {self.tile_size}")

    @property
    def cols(self) -> int:
        return -(-self.width // self.tile_size)

    @property
    def rows(self) -> int:
        return -(-self.height // self.tile_size)

    @property
    def tile_count(self) -> int:
        return self.cols * self.rows

    @property
    def bounds(self) -> Rect:
        return Rect(0, 0, self.width, self.height)

    def check_tile(self, col: int, row: int) -> None:
        """Raises RegionOutOfBoundsError if (col, row) is outside the grid."""
        if not (0 <= col < self.cols and 0 <= row < self.rows):
            raise RegionOutOfBoundsError(
                f"tile (col={col}, row={row}) outside grid of {self.cols}x{self.rows} tiles")

    def tile_rect(self, col: int, row: int) -> Rect:
        """The image pixels covered by tile (col, row), clipped to the image.

        Raises:
            RegionOutOfBoundsError: (col, row) outside the grid.
        """
        self.check_tile(col, row)
        t = self.tile_size
        x, y = col * t, row * t
        return Rect(x, y, min(t, self.width - x), min(t, self.height - y))

    def tiles_overlapping(self, rect: Rect) -> Iterator[tuple[int, int]]:
        """(col, row) of every tile that overlaps ``rect`` (clipped to the image), row-major."""
        r = rect.intersect(self.bounds)
        if r.empty:
            return
        t = self.tile_size
        for row in range(r.y // t, (r.y_end - 1) // t + 1):
            for col in range(r.x // t, (r.x_end - 1) // t + 1):
                yield col, row

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """(col, row) of every tile, row-major."""
        for row in range(self.rows):
            for col in range(self.cols):
                yield col, row


@dataclass(frozen=True)
class LevelInfo:
    """One pyramid level: its size and its downsample against level 0."""

    width: int
    height: int
    downsample: float

    def grid(self, tile_size: int) -> TileGrid:
        return TileGrid(self.width, self.height, tile_size)

    @property
    def dimensions(self) -> tuple[int, int]:
        return (self.width, self.height)
