"""What makes :func:`wsicodec.open_slide` interchangeable with ``openslide.OpenSlide``.

1. Ordinary slide files (SVS, NDPI, DICOM, MRXS, generic TIFF, ...: anything but a
   container) open through OpenSlide as an :class:`OpenSlideFile`, which *is* an
   ``openslide.OpenSlide`` plus what :class:`wsicodec.slide.WsiSlide` adds
   (``read_region(..., as_array=True)``), so a pipeline reads containers and the
   archive they came from with the same code::

       open_slide(path) ─┬─ container (.zarr directory, zip)  → WsiSlide (decoder, cache)
                         └─ any other file                    → OpenSlideFile (OpenSlide)

2. Where OpenSlide raises ``openslide.OpenSlideError``, the reader's errors are also
   ``OpenSlideError`` (:func:`as_openslide_error`): a container's damaged tile or
   metadata, a negative region size, a file that is neither a container nor a slide
   (``OpenSlideUnsupportedFormatError``, as OpenSlide says for a missing file too).
   They stay :class:`~wsicodec.errors.WsiCodecError` children (``CorruptTileError``
   still names the tile), so ``except`` clauses written for either library work.

Importing this module loads OpenSlide's C library; :mod:`wsicodec.slide` imports it
only when it opens an ordinary slide file or converts an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import openslide
from openslide import OpenSlideError, OpenSlideUnsupportedFormatError

from wsicodec.errors import (CorruptDataError, CorruptTileError, InvalidSettingError,
                             SlideNotFoundError, UnsupportedFormatError, WsiCodecError)


class SlideCorruptTileError(CorruptTileError, OpenSlideError):
    """A container tile's bytes are damaged (OpenSlide: a tile it cannot decode)."""


class SlideCorruptDataError(CorruptDataError, OpenSlideError):
    """Damaged data: container metadata or an associated image, or a slide file OpenSlide
    recognises but cannot read."""


class SlideInvalidSettingError(InvalidSettingError, OpenSlideError):
    """A read OpenSlide refuses too (a negative region size)."""


class SlideUnsupportedFormatError(UnsupportedFormatError, OpenSlideUnsupportedFormatError):
    """Neither a wsicodec container nor a slide OpenSlide opens."""


class SlideMissingError(SlideNotFoundError, OpenSlideUnsupportedFormatError):
    """No such file (OpenSlide: "Unsupported or missing image file"); still a
    FileNotFoundError."""


#: wsicodec error -> its OpenSlide-compatible child, most specific first
_COMPATIBLE: tuple[tuple[type[WsiCodecError], type[WsiCodecError]], ...] = (
    (CorruptTileError, SlideCorruptTileError),
    (CorruptDataError, SlideCorruptDataError),
    (SlideNotFoundError, SlideMissingError),
    (UnsupportedFormatError, SlideUnsupportedFormatError),
    (InvalidSettingError, SlideInvalidSettingError),
)


def as_openslide_error(error: BaseException) -> BaseException:
    """``error`` as its OpenSlide-compatible class (same message, attributes and cause),
    or ``error`` itself when it already is an OpenSlideError or has no counterpart
    (ClosedError: OpenSlide raises a ctypes ArgumentError there)."""
    if isinstance(error, OpenSlideError):
        return error
    for base, compatible in _COMPATIBLE:
        if isinstance(error, base):
            new = compatible.__new__(compatible)
            new.args = error.args
            new.__dict__.update(error.__dict__)
            new.__cause__ = error.__cause__
            new.__suppress_context__ = True
            return new.with_traceback(error.__traceback__)
    return error


class OpenSlideFile(openslide.OpenSlide):
    """An ordinary slide file read through OpenSlide, as :func:`wsicodec.open_slide`
    gives it: an ``openslide.OpenSlide`` (every attribute, method and error as
    OpenSlide's own), plus ``read_region(..., as_array=True)`` as
    :class:`wsicodec.slide.WsiSlide` has it.  An out-of-range level reads as a
    transparent region, as in OpenSlide; a negative size raises
    :class:`SlideInvalidSettingError` (an OpenSlideError)."""

    def __init__(self, filename: str | os.PathLike[str]) -> None:
        """Raises SlideMissingError (no such file), SlideUnsupportedFormatError (not a
        slide OpenSlide opens), SlideCorruptDataError (one it cannot read)."""
        path = Path(filename)
        if not path.exists():
            raise SlideMissingError(f"{path}: no such file or directory")
        try:
            super().__init__(path)
        except OpenSlideUnsupportedFormatError:
            raise SlideUnsupportedFormatError(
                f"{path}: neither a wsicodec container (.zarr directory or .zarr.zip) nor a "
                "slide OpenSlide opens") from None
        except OpenSlideError as e:
            raise SlideCorruptDataError(f"{path}: OpenSlide cannot read this slide: {e}") from e
        self.path = path

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int], *,
                    as_array: bool = False, rgba: bool = False) -> Any:
        """OpenSlide's ``read_region`` (a PIL RGBA image), or with ``as_array=True`` an
        (h, w, 3) uint8 RGB array (``rgba=True``: (h, w, 4) RGBA), as
        :meth:`wsicodec.slide.WsiSlide.read_region`."""
        w, h = (int(v) for v in size)
        if w < 0 or h < 0:
            raise SlideInvalidSettingError(f"region size must be non-negative, got {size}")
        image = super().read_region(location, level, (w, h))
        if not as_array:
            return image
        array = np.asarray(image)
        return array if rgba else np.ascontiguousarray(array[..., :3])

    def __repr__(self) -> str:
        return f"OpenSlideFile({str(self.path)!r})"


__all__ = ["OpenSlideFile", "SlideCorruptDataError", "SlideCorruptTileError",
           "SlideInvalidSettingError", "SlideMissingError", "SlideUnsupportedFormatError",
           "as_openslide_error"]
