"""Slide sources: read RGB pixels of one level region by region.

A source hides where pixels come from (OpenSlide for every slide format it opens,
tifffile for other TIFFs, Pillow for PNG/JPEG, or an in-memory array).  All of them
answer :meth:`SlideSource.read_region` with an ``(h, w, 3)`` uint8 array in the
coordinates of the level asked for, so the pyramid code never needs a whole level.

``open_source(path)`` picks the reader.  Third-party libraries are imported lazily,
inside the functions that use them.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np

from wsicodec.errors import (CorruptDataError, RegionOutOfBoundsError, SlideNotFoundError,
                             UnsupportedFormatError)
from wsicodec.iccprofile import source_icc_profile
from wsicodec.tiling.geometry import Rect

log = logging.getLogger(__name__)

_TIFF_SUFFIXES = {".tif", ".tiff", ".btf", ".tf8"}


@runtime_checkable
class SlideSource(Protocol):
    """What the pyramid builder needs from an input slide or image."""

    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: Mapping[str, str]
    mpp: tuple[float, float] | None
    objective_power: float | None
    #: the image's ICC profile, checked (:func:`wsicodec.iccprofile.source_icc_profile`), or None
    icc_profile: bytes | None

    def associated_image_names(self) -> list[str]: ...

    def read_associated_image(self, name: str) -> np.ndarray: ...

    def read_region(self, level: int, rect: Rect) -> np.ndarray:
        """``(rect.height, rect.width, 3)`` uint8 RGB; ``rect`` in that level's pixels and
        inside the level. Raises RegionOutOfBoundsError or CorruptDataError."""
        ...

    def close(self) -> None: ...


def _check_rect(dims: tuple[int, int], level: int, rect: Rect) -> None:
    w, h = dims
    if rect.empty or rect.x < 0 or rect.y < 0 or rect.x_end > w or rect.y_end > h:
        raise RegionOutOfBoundsError(f"region {rect} outside level {level} of size {w}x{h}")


def rgba_to_rgb(rgba: np.ndarray, background: tuple[int, int, int] = (255, 255, 255)
                ) -> np.ndarray:
    """Composite non-premultiplied RGBA (as OpenSlide/PIL return it) onto ``background``."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:4]
    if alpha.min(initial=255) == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)
    bg = np.asarray(background, dtype=np.uint16)
    out = (rgb.astype(np.uint16) * a + bg * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def to_rgb_uint8(image: np.ndarray, *, what: str = "image") -> np.ndarray:
    """Normalise a gray, gray+alpha, RGB or RGBA array of uint8/uint16/bool to (h, w, 3) uint8.

    Raises:
        UnsupportedFormatError: other shapes or sample types.
    """
    a = np.asarray(image)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise UnsupportedFormatError(f"{what}: unsupported sample type {a.dtype} "
                                     "(need 8- or 16-bit unsigned)")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4) or min(a.shape[:2]) < 1:
        raise UnsupportedFormatError(f"{what}: unsupported array shape {a.shape} "
                                     "(need height x width [x 1-4 samples])")
    if a.shape[2] in (2, 4):
        a = rgba_to_rgb(np.concatenate([np.repeat(a[..., :-1], 3 // (a.shape[2] - 1), axis=2),
                                        a[..., -1:]], axis=2))
    elif a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)


class ArraySource:
    """An in-memory image (one level). Used for plain PNG/JPEG images and in tests."""

    def __init__(self, image: np.ndarray, *, vendor: str = "array",
                 properties: Mapping[str, str] | None = None,
                 mpp: tuple[float, float] | None = None,
                 associated: Mapping[str, np.ndarray] | None = None,
                 icc_profile: bytes | None = None) -> None:
        """Raises UnsupportedFormatError if ``image`` cannot be made (h, w, 3) uint8.
        An ``icc_profile`` that is not one is left out (a warning is logged)."""
        self._image = to_rgb_uint8(image)
        h, w = self._image.shape[:2]
        self.vendor = vendor
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)
        self.properties = dict(properties or {})
        self.mpp = mpp
        self.objective_power = None
        self.icc_profile = source_icc_profile(icc_profile, "image")
        self._associated = {k: to_rgb_uint8(v) for k, v in (associated or {}).items()}

    def associated_image_names(self) -> list[str]:
        return list(self._associated)

    def read_associated_image(self, name: str) -> np.ndarray:
        return self._associated[name]

    def read_region(self, level: int, rect: Rect) -> np.ndarray:
        if level != 0:
            raise RegionOutOfBoundsError(f"level {level} outside a 1-level image")
        _check_rect(self.level_dimensions[0], level, rect)
        return self._image[rect.y:rect.y_end, rect.x:rect.x_end]

    def close(self) -> None:
        self._image = np.zeros((1, 1, 3), np.uint8)

    def __enter__(self) -> "ArraySource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _float_or_none(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if f > 0 and np.isfinite(f) else None


def _parse_color(hexstr: str | None) -> tuple[int, int, int]:
    try:
        v = int(str(hexstr), 16)
        return ((v >> 16) & 255, (v >> 8) & 255, v & 255)
    except ValueError:
        return (255, 255, 255)


class OpenSlideSource:
    """Every format OpenSlide opens (SVS, NDPI, DICOM, MRXS, generic tiled TIFF, ...).

    Transparent pixels (missing tiles, outside the scanned area) are composited on the
    slide's background colour (white unless the slide says otherwise).
    """

    READ_CHUNK = 4096
    """Widest region asked of OpenSlide at once (wider reads are split into columns)."""
    CACHE_BYTES = 4 << 20
    """OpenSlide's cache of decoded tiles (its default: 32 MiB).  Sources are read a strip
    at a time, so a scanner tile is decoded again only where its row straddles two strips,
    a whole strip later: past what a cache holds of a wide slide, and cheap on a narrow one."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Raises UnsupportedFormatError / CorruptDataError if OpenSlide refuses the file."""
        import openslide

        self.path = Path(path)
        try:
            self._slide = openslide.OpenSlide(str(path))
            try:
                self._slide.set_cache(openslide.OpenSlideCache(self.CACHE_BYTES))
            except openslide.OpenSlideVersionError:     # OpenSlide < 4 (a system library): its own
                pass
            props = dict(self._slide.properties)
            self.level_dimensions = tuple(tuple(int(v) for v in d)
                                          for d in self._slide.level_dimensions)
            self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
            self._associated_names = list(self._slide.associated_images.keys())
        except openslide.OpenSlideUnsupportedFormatError as e:
            raise UnsupportedFormatError(f"{path}: not a slide OpenSlide supports ({e})") from e
        except openslide.OpenSlideError as e:
            raise CorruptDataError(f"{path}: OpenSlide cannot read this slide: {e}") from e
        self.vendor = props.get("openslide.vendor", "unknown")
        self.properties = props
        mx, my = (_float_or_none(props.get("openslide.mpp-x")),
                  _float_or_none(props.get("openslide.mpp-y")))
        self.mpp = (mx, my) if mx and my else None
        self.objective_power = _float_or_none(props.get("openslide.objective-power"))
        self._background = _parse_color(props.get("openslide.background-color"))
        try:
            profile = self._slide.color_profile
            icc = profile.tobytes() if profile is not None else None
        except (OSError, ValueError) as e:      # PyCMSError is an OSError
            log.warning("%s: ICC profile unreadable, left out: %s", path, e)
            icc = None
        self.icc_profile = source_icc_profile(icc, path)

    def associated_image_names(self) -> list[str]:
        return list(self._associated_names)

    def read_associated_image(self, name: str) -> np.ndarray:
        """Raises CorruptDataError if OpenSlide fails to decode it."""
        import openslide

        try:
            img = self._slide.associated_images[name]
        except openslide.OpenSlideError as e:
            raise CorruptDataError(f"{self.path}: cannot read associated image {name!r}: {e}"
                                   ) from e
        return rgba_to_rgb(np.asarray(img.convert("RGBA")), self._background)

    def read_region(self, level: int, rect: Rect) -> np.ndarray:
        """Raises RegionOutOfBoundsError or CorruptDataError (OpenSlide read failure)."""
        import openslide

        if not 0 <= level < len(self.level_dimensions):
            raise RegionOutOfBoundsError(f"level {level} outside 0..{len(self.level_dimensions) - 1}")
        _check_rect(self.level_dimensions[level], level, rect)
        ds = self.level_downsamples[level]
        out = np.empty((rect.height, rect.width, 3), np.uint8)
        # column chunks keep OpenSlide's RGBA buffer and our copies small for wide strips
        for x in range(rect.x, rect.x_end, self.READ_CHUNK):
            w = min(self.READ_CHUNK, rect.x_end - x)
            location = (int(round(x * ds)), int(round(rect.y * ds)))
            try:
                img = self._slide.read_region(location, level, (w, rect.height))
            except openslide.OpenSlideError as e:
                raise CorruptDataError(f"{self.path}: OpenSlide failed reading level {level} "
                                       f"at {x},{rect.y}: {e}") from e
            out[:, x - rect.x:x - rect.x + w] = rgba_to_rgb(np.asarray(img), self._background)
        return out

    def close(self) -> None:
        self._slide.close()

    def __enter__(self) -> "OpenSlideSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TiffFileSource:
    """TIFFs OpenSlide does not open (e.g. stripped, untiled): read lazily via tifffile's
    zarr view, so a region read decodes only the strips/tiles it touches."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Raises UnsupportedFormatError if tifffile cannot read it as an image."""
        import tifffile
        import zarr

        self.path = Path(path)
        try:
            self._tif = tifffile.TiffFile(str(path))
            series = self._tif.series[0]
            axes = series.axes
            store = series.aszarr(level=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._array = zarr.open(store, mode="r")
        except (tifffile.TiffFileError, ValueError, IndexError, KeyError, OSError) as e:
            raise UnsupportedFormatError(f"{path}: not a TIFF image tifffile can read ({e})"
                                         ) from e
        self._axes = axes
        if axes not in ("YX", "YXS", "SYX"):
            self.close()
            raise UnsupportedFormatError(f"{path}: unsupported TIFF layout {axes!r} "
                                         "(need a 2-D gray or RGB image)")
        shape = self._array.shape
        h, w = (shape[1], shape[2]) if axes == "SYX" else (shape[0], shape[1])
        self.vendor = "tifffile"
        self.level_dimensions = ((int(w), int(h)),)
        self.level_downsamples = (1.0,)
        self.properties: dict[str, str] = {}
        self.mpp = None
        self.objective_power = None
        icc = self._tif.pages[0].tags.get(34675)      # InterColorProfile
        self.icc_profile = source_icc_profile(icc.value if icc else None, path)
        try:
            page = self._tif.pages[0]
            xr, yr = page.tags.get("XResolution"), page.tags.get("YResolution")
            unit = page.tags.get("ResolutionUnit")
            if xr and yr and unit and int(unit.value) == 3:  # centimeter
                mx = 1e4 * xr.value[1] / xr.value[0]
                my = 1e4 * yr.value[1] / yr.value[0]
                self.mpp = (mx, my)
        except (ZeroDivisionError, TypeError, IndexError, ValueError):
            log.debug("%s: no usable resolution tags", path)

    def associated_image_names(self) -> list[str]:
        return []

    def read_associated_image(self, name: str) -> np.ndarray:
        raise KeyError(name)

    def read_region(self, level: int, rect: Rect) -> np.ndarray:
        if level != 0:
            raise RegionOutOfBoundsError(f"level {level} outside a 1-level image")
        _check_rect(self.level_dimensions[0], level, rect)
        try:
            if self._axes == "SYX":
                a = np.moveaxis(self._array[:, rect.y:rect.y_end, rect.x:rect.x_end], 0, -1)
            else:
                a = self._array[rect.y:rect.y_end, rect.x:rect.x_end]
        except (ValueError, RuntimeError, OSError) as e:
            raise CorruptDataError(f"{self.path}: cannot decode region {rect}: {e}") from e
        return to_rgb_uint8(a, what=str(self.path))

    def close(self) -> None:
        self._tif.close()

    def __enter__(self) -> "TiffFileSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_with_pillow(path: Path) -> ArraySource:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow warns about damaged EXIF and the like on stderr; the error below,
            # or the pixels, are the answer the user gets
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.load()
                if im.mode not in ("RGB", "RGBA", "L", "LA"):
                    im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
                array = np.asarray(im)
                fmt = im.format or "image"
                icc = im.info.get("icc_profile")
    except UnidentifiedImageError as e:
        raise UnsupportedFormatError(
            f"{path}: not a slide or image that OpenSlide, tifffile or Pillow can read") from e
    except Image.DecompressionBombError as e:
        raise UnsupportedFormatError(
            f"{path}: too large to read whole (Pillow's limit is {2 * Image.MAX_IMAGE_PIXELS:,} "
            "pixels); write it as a tiled TIFF, which is read tile by tile") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise CorruptDataError(f"{path}: cannot decode image: {e}") from e
    return ArraySource(array, vendor=fmt.lower(), icc_profile=icc or None)


def open_source(path: str | os.PathLike[str]) -> SlideSource:
    """Open a slide (through OpenSlide) or a plain image (tifffile / Pillow).

    Raises:
        SlideNotFoundError: ``path`` does not exist.
        UnsupportedFormatError: no reader recognises it (text file, directory, ...).
        CorruptDataError: recognised but broken (e.g. a non-conforming DICOM).
    """
    p = Path(path)
    if not p.exists():
        raise SlideNotFoundError(f"{p}: no such file")
    if p.is_dir():
        raise UnsupportedFormatError(f"{p}: is a directory, not a slide file")
    import openslide

    try:
        fmt = openslide.OpenSlide.detect_format(str(p))
    except openslide.OpenSlideError:  # pragma: no cover - detect_format rarely raises
        fmt = None
    if fmt is not None:
        return OpenSlideSource(p)
    if p.suffix.lower() in _TIFF_SUFFIXES:
        try:
            return TiffFileSource(p)
        except UnsupportedFormatError:
            pass  # maybe Pillow knows it; its error message is the one we give
    return _open_with_pillow(p)


__all__ = ["SlideSource", "ArraySource", "OpenSlideSource", "TiffFileSource", "open_source",
           "rgba_to_rgb", "to_rgb_uint8"]
