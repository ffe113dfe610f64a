"""OpenSlide-compatible reader of wsicodec containers.

``open_slide(path)`` gives a :class:`WsiSlide` with OpenSlide's attributes and
``read_region`` semantics (level-0 coordinates, RGBA, transparent (0, 0, 0, 0) outside
the slide), plus tiffslide's ``as_array=True`` and a ``read_encoded_tile`` for tile
servers that pass bytes through.

Every tile decode goes through :meth:`WsiSlide._decode_tiles`, which hands the tiles
a region needs to a :class:`wsicodec.batch.BatchDecoder` (one batch, LRU cache, g_s on
the GPU when there is one)::

    read_region ─► tiles overlapping the region ─► _decode_tiles(level, [(col,row)]) ─►
        BatchDecoder.decode (cache, batch) ─► stitch_region (crop padding, place, alpha)
        ─► PIL RGBA / ndarray

A slide is thread-safe: a tile server may call ``read_region`` from many threads.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from wsicodec.batch import BatchDecoder, DecoderSettings
from wsicodec.container import Container, open_container
from wsicodec.errors import InvalidSettingError, RegionOutOfBoundsError
from wsicodec.tiling.geometry import Rect
from wsicodec.tiling.stitch import stitch_region

VENDOR = "wsicodec"


class _AssociatedImages(Mapping[str, Any]):
    """Lazy name -> PIL RGBA mapping (decoded on access), like OpenSlide's."""

    def __init__(self, container: Container) -> None:
        self._c = container

    def __getitem__(self, name: str) -> Any:
        from PIL import Image

        rgb = self._c.read_associated_image(name)
        return Image.fromarray(rgb, "RGB").convert("RGBA")

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._c.associated_image_names())

    def __len__(self) -> int:
        return len(self._c.associated_image_names())


class WsiSlide:
    """A wsicodec container read like an ``openslide.OpenSlide``.

    Args:
        container: an open container (the slide closes it).
        settings: decoder settings (cache size, threads, device); defaults of
            :class:`wsicodec.batch.DecoderSettings`.
    """

    def __init__(self, container: Container, settings: DecoderSettings | None = None) -> None:
        self._c = container
        self._decoder = BatchDecoder(container, settings)
        meta = container.metadata
        self.dimensions: tuple[int, int] = meta.levels[0].dimensions
        self.level_count: int = len(meta.levels)
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            lv.dimensions for lv in meta.levels)
        self.level_downsamples: tuple[float, ...] = tuple(lv.downsample for lv in meta.levels)
        self.properties: Mapping[str, str] = self._build_properties()
        self.associated_images: Mapping[str, Any] = _AssociatedImages(container)

    @property
    def container(self) -> Container:
        return self._c

    @property
    def decoder(self) -> BatchDecoder:
        """The batched, cached tile decoder behind :meth:`read_region`."""
        return self._decoder

    @property
    def color_profile(self) -> None:
        """No embedded ICC profile (OpenSlide's attribute; tiles are stored as sRGB)."""
        return None

    @classmethod
    def detect_format(cls, filename: str | os.PathLike[str]) -> str | None:
        """``"wsicodec"`` if ``filename`` opens as a container, else None (never raises)."""
        try:
            with open_container(filename):
                return VENDOR
        except Exception:  # noqa: BLE001 - "not ours" whatever the reason
            return None

    def set_cache(self, cache: Any) -> None:
        """Accepted for OpenSlide compatibility and ignored: the decoded-tile cache is
        sized by ``open_slide(..., cache_bytes=...)``."""

    def _build_properties(self) -> dict[str, str]:
        meta = self._c.metadata
        props = {k: v for k, v in meta.properties.items() if not k.startswith("openslide.")}
        props[f"{VENDOR}.source-vendor"] = meta.source_vendor
        props[f"{VENDOR}.codec"] = meta.codec.get("name", "")
        if meta.model_id:
            props[f"{VENDOR}.model-sha256"] = meta.model_id
        props["openslide.vendor"] = VENDOR
        props["openslide.level-count"] = str(len(meta.levels))
        for i, lv in enumerate(meta.levels):
            props[f"openslide.level[{i}].width"] = str(lv.width)
            props[f"openslide.level[{i}].height"] = str(lv.height)
            props[f"openslide.level[{i}].downsample"] = repr(lv.downsample)
            props[f"openslide.level[{i}].tile-width"] = str(meta.tile_size)
            props[f"openslide.level[{i}].tile-height"] = str(meta.tile_size)
        if meta.mpp:
            props["openslide.mpp-x"], props["openslide.mpp-y"] = (repr(meta.mpp[0]),
                                                                  repr(meta.mpp[1]))
        if meta.objective_power:
            props["openslide.objective-power"] = f"{meta.objective_power:g}"
        for key in ("openslide.comment", "openslide.quickhash-1", "openslide.background-color"):
            if key in meta.properties:
                props[key] = meta.properties[key]
        return props

    # -- OpenSlide API
    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The largest level whose downsample is <= ``downsample`` (OpenSlide's rule)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample:
                best = i
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int], *,
                    as_array: bool = False) -> Any:
        """Read ``size`` = (w, h) pixels of ``level`` whose top-left is ``location`` in
        level-0 coordinates (x, y), as OpenSlide does.

        Pixels outside the slide are transparent (0, 0, 0, 0). Returns a PIL RGBA image,
        or with ``as_array=True`` an (h, w, 4) uint8 RGBA array.

        Raises:
            RegionOutOfBoundsError: ``level`` outside the pyramid.
            InvalidSettingError: negative size, or a region too big for memory.
            CorruptTileError: a tile inside the region is damaged.
            ClosedError: the slide was closed.
        """
        self._c._check_open()
        if not 0 <= level < self.level_count:
            raise RegionOutOfBoundsError(f"level {level} outside 0..{self.level_count - 1}")
        w, h = (int(v) for v in size)
        if w < 0 or h < 0:
            raise InvalidSettingError(f"region size must be non-negative, got {size}")
        ds = self.level_downsamples[level]
        rect = Rect(int(math.floor(location[0] / ds)), int(math.floor(location[1] / ds)), w, h)
        try:        # before any tile is decoded
            out = np.zeros((h, w, 4), np.uint8)
        except MemoryError:
            raise InvalidSettingError(
                f"a {w} x {h} px region of level {level} ({w * h * 4 / 2**30:.1f} GiB as RGBA) does "
                "not fit in memory: read it in pieces, or from a coarser level") from None
        grid = self._c.grid(level)
        keys = list(grid.tiles_overlapping(rect))
        tiles = dict(zip(keys, self._decode_tiles(level, keys))) if keys else {}
        stitch_region(grid, rect, tiles, channels=4, out=out)
        if as_array:
            return out
        from PIL import Image

        return Image.fromarray(out, "RGBA")

    def _decode_tiles(self, level: int, tiles: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Decode tiles (col, row) of ``level``, in order; each (T, T, 3) uint8, padded.

        One batch through the cached :class:`BatchDecoder`. Raises CorruptTileError.
        """
        return self._decoder.decode(level, tiles)

    def read_encoded_tile(self, level: int, col: int, row: int) -> bytes:
        """The stored (codec) bytes of one tile, CRC-checked, not decoded.

        Raises RegionOutOfBoundsError (outside the pyramid) and CorruptTileError.
        """
        return self._c.read_encoded_tile(level, col, row)

    def get_thumbnail(self, size: tuple[int, int]) -> Any:
        """A PIL RGB image fitting in ``size``, composited on the background (white)."""
        from PIL import Image

        if len(size) != 2 or min(size) < 1:
            raise InvalidSettingError(f"thumbnail size must be two positive ints, got {size}")
        downsample = max(d / s for d, s in zip(self.dimensions, size))
        level = self.get_best_level_for_downsample(downsample)
        tile = self.read_region((0, 0), level, self.level_dimensions[level])
        bg = "#" + self.properties.get("openslide.background-color", "ffffff")
        thumb = Image.new("RGB", tile.size, bg)
        thumb.paste(tile, None, tile)
        thumb.thumbnail(size, Image.Resampling.LANCZOS)
        return thumb

    def close(self) -> None:
        """Stop the decoder threads and close the container; later reads raise
        ClosedError. Safe to call twice."""
        self._decoder.close()
        self._c.close()

    def __enter__(self) -> "WsiSlide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"WsiSlide({str(self._c.path)!r})"


def open_slide(path: str | os.PathLike[str], *, cache_bytes: int | None = None,
               workers: int | None = None, device: str = "auto",
               precision: str = "float32") -> WsiSlide:
    """Open a wsicodec container (``.zarr`` directory or ``.zarr.zip``) as a slide.

    Args:
        cache_bytes: decoded-tile cache bound (default 256 MiB; 0: no cache).
        workers: decoder threads (default: CPU count, at most 8).
        device: where the learned codec's g_s runs: "auto" (CUDA when present), "cpu",
            "cuda".
        precision: how it runs: "float32" (the reference) or "bfloat16" (faster on
            hardware with bfloat16 arithmetic, pixels slightly different).

    Raises as :func:`wsicodec.container.open_container`; InvalidSettingError for bad
    settings.
    """
    defaults = DecoderSettings()
    settings = DecoderSettings(
        cache_bytes=defaults.cache_bytes if cache_bytes is None else cache_bytes,
        workers=workers, device=device, precision=precision)
    return WsiSlide(open_container(path), settings)
