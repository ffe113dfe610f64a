"""OpenSlide-compatible reader of wsicodec containers, and of every other slide.

``open_slide(path)`` gives, for a container, a :class:`WsiSlide` with OpenSlide's
attributes and ``read_region`` semantics (level-0 coordinates, RGBA, transparent
(0, 0, 0, 0) outside the slide and for a level outside the pyramid), plus tiffslide's
``as_array=True`` and a ``read_encoded_tile`` for tile servers that pass bytes through;
for any other file, an :class:`wsicodec.openslide_compat.OpenSlideFile`: OpenSlide
itself, with ``as_array=True`` too.  Where OpenSlide raises ``openslide.OpenSlideError``
the reader's errors are also OpenSlideErrors (:mod:`wsicodec.openslide_compat`).

Every tile decode goes through :meth:`WsiSlide._decode_tiles`, which hands the tiles
a region needs to a :class:`wsicodec.batch.BatchDecoder` (one batch, LRU cache, g_s on
the GPU when there is one)::

    read_region ─► tiles overlapping the region ─► _decode_tiles(level, [(col,row)]) ─►
        BatchDecoder.decode (cache, batch) ─► stitch_region (crop padding, place, alpha)
        ─► PIL RGBA / ndarray

A slide is thread-safe: a tile server may call ``read_region`` from many threads.
"""

from __future__ import annotations

import functools
import math
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np

from wsicodec.batch import BatchDecoder, DecoderSettings
from wsicodec.container import Container, open_container
from wsicodec.errors import InvalidSettingError, WsiCodecError
from wsicodec.slideprops import VENDOR, container_properties
from wsicodec.tiling.geometry import Rect
from wsicodec.tiling.stitch import stitch_region

_F = TypeVar("_F", bound=Callable[..., Any])


def _openslide_errors(method: _F) -> _F:
    """Raise ``method``'s wsicodec errors as their OpenSlide-compatible children
    (:func:`wsicodec.openslide_compat.as_openslide_error`)."""
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except WsiCodecError as e:
            from wsicodec.openslide_compat import as_openslide_error

            compatible = as_openslide_error(e)
            if compatible is e:
                raise
            raise compatible from e.__cause__
    return wrapper  # type: ignore[return-value]


class _AssociatedImages(Mapping[str, Any]):
    """Lazy name -> PIL RGBA mapping (decoded on access), like OpenSlide's."""

    def __init__(self, container: Container) -> None:
        self._c = container

    @_openslide_errors
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
        self.properties: Mapping[str, str] = container_properties(container)
        self.associated_images: Mapping[str, Any] = _AssociatedImages(container)

    @property
    def container(self) -> Container:
        return self._c

    @property
    def decoder(self) -> BatchDecoder:
        """The batched, cached tile decoder behind :meth:`read_region`."""
        return self._decoder

    @property
    def color_profile(self) -> Any:
        """The source's ICC profile as OpenSlide gives it, a new
        ``PIL.ImageCms.ImageCmsProfile``, or None when the container holds none."""
        icc = self._c.metadata.icc_profile
        if icc is None:
            return None
        from wsicodec.iccprofile import as_image_cms_profile

        return as_image_cms_profile(icc)

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

    # -- OpenSlide API
    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The largest level whose downsample is <= ``downsample`` (OpenSlide's rule)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample:
                best = i
        return best

    @_openslide_errors
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int], *,
                    as_array: bool = False, rgba: bool = False) -> Any:
        """Read ``size`` = (w, h) pixels of ``level`` whose top-left is ``location`` in
        level-0 coordinates (x, y), as OpenSlide does.

        Pixels outside the slide are transparent (0, 0, 0, 0), and so is the whole region
        for a ``level`` outside the pyramid (as OpenSlide reads it). Returns a PIL RGBA
        image, or with ``as_array=True`` an (h, w, 3) uint8 RGB array as tiffslide does
        (black outside the slide), (h, w, 4) RGBA with ``rgba=True``.

        Raises (the first three are also ``openslide.OpenSlideError``):
            InvalidSettingError: negative size, or a region too big for memory.
            CorruptTileError: a tile inside the region is damaged.
            CorruptDataError: the tile's stored bytes cannot be read.
            ClosedError: the slide was closed.
        """
        self._c._check_open()
        w, h = (int(v) for v in size)
        if w < 0 or h < 0:
            raise InvalidSettingError(f"region size must be non-negative, got {size}")
        inside = 0 <= level < self.level_count
        ds = self.level_downsamples[level] if inside else 1.0
        rect = Rect(int(math.floor(location[0] / ds)), int(math.floor(location[1] / ds)), w, h)
        try:        # before any tile is decoded
            out = np.zeros((h, w, 4), np.uint8)
        except MemoryError:
            raise InvalidSettingError(
                f"a {w} x {h} px region of level {level} ({w * h * 4 / 2**30:.1f} GiB as RGBA) does "
                "not fit in memory: read it in pieces, or from a coarser level") from None
        if inside:
            self.read_level_into(level, rect, out)
        if as_array:
            return out if rgba else np.ascontiguousarray(out[..., :3])
        from PIL import Image

        return Image.fromarray(out, "RGBA")

    def read_level_into(self, level: int, rect: Rect, out: np.ndarray) -> np.ndarray:
        """Stitch ``rect`` (in ``level``'s own pixels) of ``level`` into ``out``, an
        (h, w, 4) uint8 array of the rect's size, as :meth:`read_region` does: decoded
        tiles opaque, pixels outside the level left as they are.  Returns ``out``.
        Raises as :meth:`read_region`."""
        grid = self._c.grid(level)
        keys = list(grid.tiles_overlapping(rect))
        tiles = dict(zip(keys, self._decode_tiles(level, keys))) if keys else {}
        stitch_region(grid, rect, tiles, channels=4, out=out)
        return out

    def to_dask(self, level: int = 0, chunks: int | tuple[int, int] | None = None) -> Any:
        """``level`` as a lazy ``dask.array`` of shape (height, width, 4), uint8 RGBA,
        equal pixel for pixel to :meth:`read_region` ``(..., as_array=True, rgba=True)``
        of the same pixels.  Chunks (default: whole tiles, about 1024 px) are decoded
        through this slide's batch decoder (stitched, cached); on a distributed cluster
        a worker reopens the container by its path (:mod:`wsicodec.cluster.arrays`).
        Raises RegionOutOfBoundsError for a level outside the pyramid,
        InvalidSettingError for bad chunks."""
        from wsicodec.cluster.arrays import level_array

        return level_array(self, level, chunks)

    def _decode_tiles(self, level: int, tiles: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Decode tiles (col, row) of ``level``, in order; each (T, T, 3) uint8, padded.

        One batch through the cached :class:`BatchDecoder`. Raises CorruptTileError.
        """
        return self._decoder.decode(level, tiles)

    @_openslide_errors
    def tile_records(self, level: int) -> Any:
        """The fidelity map of ``level`` (:class:`wsicodec.fidelity.TileRecords`: each
        tile's kind, decoded PSNR against the source and bytes), or None for a container
        without one (written by a codec that does not choose per tile).  Raises
        CorruptDataError for a damaged map, RegionOutOfBoundsError for a bad level."""
        return self._c.tile_records(level)

    def read_encoded_tile(self, level: int, col: int, row: int) -> bytes:
        """The stored (codec) bytes of one tile, CRC-checked, not decoded.

        Raises RegionOutOfBoundsError (outside the pyramid) and CorruptTileError (also an
        OpenSlideError).
        """
        return self._c.read_encoded_tile(level, col, row)

    @_openslide_errors
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
               precision: str = "float32") -> Any:
    """Open a slide: a wsicodec container (``.zarr`` directory or ``.zarr.zip``) as a
    :class:`WsiSlide`, any other file through OpenSlide as an
    :class:`wsicodec.openslide_compat.OpenSlideFile` (an ``openslide.OpenSlide``).

    A directory, a ``.zip`` name or a file that is a zip is taken for a container (and
    its errors are a container's), anything else for a slide file.

    Args:
        cache_bytes: decoded-tile cache bound (default 256 MiB; 0: no cache); for a
            slide file, the size of OpenSlide's tile cache (default OpenSlide's).
        workers: decoder threads (default: CPU count, at most 8); a container's only.
        device: where the learned codec's g_s runs: "auto" (CUDA when present), "cpu",
            "cuda"; a container's only.
        precision: how it runs: "float32" (the reference) or "bfloat16" (faster on
            hardware with bfloat16 arithmetic, pixels slightly different).

    Raises, each also an ``openslide.OpenSlideError`` (the first two an
    ``OpenSlideUnsupportedFormatError``, as OpenSlide raises for a missing file too):
        SlideNotFoundError: no such path.
        UnsupportedFormatError: neither a container nor a slide OpenSlide opens, or a
            container of an unknown format version.
        CorruptDataError: a damaged container, or a slide OpenSlide cannot read.
        InvalidSettingError: bad settings.
    """
    return _open_slide(Path(path), cache_bytes, workers, device, precision)


@_openslide_errors
def _open_slide(path: Path, cache_bytes: int | None, workers: int | None, device: str,
                precision: str) -> Any:
    defaults = DecoderSettings()
    settings = DecoderSettings(
        cache_bytes=defaults.cache_bytes if cache_bytes is None else cache_bytes,
        workers=workers, device=device, precision=precision)
    if path.is_dir() or path.suffix.lower() == ".zip" or (
            path.is_file() and zipfile.is_zipfile(path)):
        return WsiSlide(open_container(path), settings)
    from wsicodec.openslide_compat import OpenSlideFile

    slide = OpenSlideFile(path)
    if cache_bytes is not None:
        import openslide

        slide.set_cache(openslide.OpenSlideCache(cache_bytes))
    return slide
