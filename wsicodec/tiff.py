"""Write a container out as a tiled pyramidal TIFF that OpenSlide, QuPath and libvips read.

Levels are successive pages of the main IFD chain (level 0 first, reduced levels with
NewSubfileType=1): OpenSlide's generic-tiff driver reads exactly that layout (it ignores
SubIFDs).  mpp goes into X/YResolution in pixels per centimetre, which OpenSlide reports
as ``openslide.mpp-x/-y``; the ICC profile into tag 34675 of level 0 (OpenSlide's
``color_profile``).  Tile compression: ``jpeg`` (4:4:4 RGB, quality 95, the
default) or ``zlib`` (lossless deflate with horizontal predictor).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from wsicodec.errors import InvalidSettingError

TIFF_COMPRESSIONS = ("jpeg", "zlib")
DEFAULT_TIFF_COMPRESSION = "jpeg"
DEFAULT_TIFF_QUALITY = 95


@dataclass(frozen=True)
class TiffSettings:
    """How tiles are compressed inside the TIFF.

    compression: ``jpeg`` (lossy, ``quality`` 1-100) or ``zlib`` (lossless).
    quality: JPEG quality; ignored for zlib.
    """

    compression: str = DEFAULT_TIFF_COMPRESSION
    quality: int = DEFAULT_TIFF_QUALITY

    def __post_init__(self) -> None:
        if self.compression not in TIFF_COMPRESSIONS:
            raise InvalidSettingError(f"TIFF compression must be one of "
                                      f"{', '.join(TIFF_COMPRESSIONS)}, got {self.compression!r}")
        if isinstance(self.quality, bool) or not (isinstance(self.quality, int)
                                                  and 1 <= self.quality <= 100):
            raise InvalidSettingError(f"TIFF JPEG quality must be an integer in [1, 100], "
                                      f"got {self.quality!r}")

    def writer_kwargs(self) -> dict:
        if self.compression == "jpeg":
            # tifffile defaults JPEG tiles to 4:2:0 chroma, which costs H&E ~10 dB (stain
            # edges are chroma edges): keep full-resolution chroma.
            return {"compression": "jpeg", "compressionargs": {"level": self.quality},
                    "subsampling": (1, 1)}
        return {"compression": "zlib", "predictor": True}


TileIterator = Callable[[int], Iterator[np.ndarray]]
"""level -> that level's (T, T, 3) uint8 tiles, row-major."""


def write_pyramidal_tiff(path: str | os.PathLike[str], level_dimensions: list[tuple[int, int]],
                         tile_size: int, tiles: TileIterator, *,
                         mpp: tuple[float, float] | None = None,
                         settings: TiffSettings = TiffSettings(),
                         description: str = "wsicodec pyramid",
                         icc_profile: bytes | None = None) -> None:
    """Write a tiled BigTIFF, one page per level (streaming: one tile at a time).

    Raises OSError on write failures and whatever ``tiles`` raises; the caller owns
    cleanup of a partial file.
    """
    import tifffile

    common = dict(tile=(tile_size, tile_size), photometric="rgb", metadata=None,
                  **settings.writer_kwargs())
    if mpp:
        common.update(resolution=(1e4 / mpp[0], 1e4 / mpp[1]), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(Path(path), bigtiff=True) as tw:
        for level, (w, h) in enumerate(level_dimensions):
            extra = {"description": description} if level == 0 else {"subfiletype": 1}
            if level == 0 and icc_profile:
                extra["iccprofile"] = icc_profile
            tw.write(tiles(level), shape=(h, w, 3), dtype=np.uint8, **common, **extra)
