"""Tiling: slide sources, tile-grid geometry, the output pyramid, region stitching.

Data flow::

    open_source(path) ─► SlideSource.read_region(level, Rect) ─► iter_strips(source, plan)
        ─► iter_tiles(strip) ─► padded (T, T, 3) uint8 tiles ─► codec
    decoded tiles ─► stitch_region(grid, rect, tiles) ─► region (cropped, RGBA)
"""

from wsicodec.tiling.geometry import (LevelInfo, Rect, TileGrid, validate_tile_size)
from wsicodec.tiling.pyramid import (LevelPlan, PyramidPlan, Strip, downsample2, iter_strips,
                                     iter_tiles, pad_tile, plan_pyramid)
from wsicodec.tiling.sources import (ArraySource, OpenSlideSource, SlideSource, TiffFileSource,
                                     open_source, rgba_to_rgb, to_rgb_uint8)
from wsicodec.tiling.stitch import stitch_region

__all__ = [
    "LevelInfo", "Rect", "TileGrid", "validate_tile_size",
    "LevelPlan", "PyramidPlan", "Strip", "downsample2", "iter_strips", "iter_tiles", "pad_tile",
    "plan_pyramid",
    "ArraySource", "OpenSlideSource", "SlideSource", "TiffFileSource", "open_source",
    "rgba_to_rgb", "to_rgb_uint8",
    "stitch_region",
]
