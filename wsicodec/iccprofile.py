"""The source's ICC colour profile, as a container keeps it.

A slide's ICC profile (OpenSlide's ``color_profile``; an Aperio SVS or a TIFF carries
it in tag 34675) says how its RGB values map to colour.  ``compress`` keeps it
byte-for-byte in the container's metadata (attribute ``icc_profile``, base64), so it is
covered by the format-3 ``metadata_digest`` like every other attribute, and
``open_slide(...).color_profile`` returns it as OpenSlide does, a
``PIL.ImageCms.ImageCmsProfile``.  Its size is bounded (:data:`MAX_ICC_BYTES`) and its
header checked (:func:`check_icc_profile`) before a container is trusted with it.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any

log = logging.getLogger(__name__)

#: the largest profile kept (the sample slides' sRGB profile is 3,144 bytes; scanner
#: profiles with large lookup tables reach about a megabyte)
MAX_ICC_BYTES = 4 << 20
_HEADER_BYTES = 128


def check_icc_profile(data: Any) -> bytes:
    """``data`` as the bytes of an ICC profile, after checking what a reader relies on:
    at most :data:`MAX_ICC_BYTES`, a 128-byte header whose size field is the length and
    whose signature is ``acsp``.

    Raises ValueError (the message says what is wrong)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"an ICC profile must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not _HEADER_BYTES <= len(data) <= MAX_ICC_BYTES:
        raise ValueError(f"an ICC profile of {len(data)} bytes (it must hold "
                         f"{_HEADER_BYTES}..{MAX_ICC_BYTES})")
    if int.from_bytes(data[:4], "big") != len(data) or data[36:40] != b"acsp":
        raise ValueError("not an ICC profile (its header's size or 'acsp' signature is wrong)")
    return data


def source_icc_profile(data: Any, where: object) -> bytes | None:
    """A source's profile if it passes :func:`check_icc_profile` and describes RGB data
    (the container's tiles are RGB: a grey or CMYK image's profile no longer applies),
    else None (logged as a warning naming ``where``): the slide still compresses."""
    if data is None:
        return None
    try:
        data = check_icc_profile(data)
        if data[16:20] != b"RGB ":
            raise ValueError(f"its colour space is {data[16:20]!r}, not RGB")
        return data
    except ValueError as e:
        log.warning("%s: ICC profile left out: %s", where, e)
        return None


def to_attr(data: bytes) -> str:
    """The profile as the container stores it (base64 text)."""
    return base64.b64encode(data).decode("ascii")


def from_attr(text: Any) -> bytes:
    """The profile from its stored text, checked. Raises ValueError."""
    if not isinstance(text, str) or len(text) > (MAX_ICC_BYTES + 2) // 3 * 4:
        raise ValueError("icc_profile must be base64 text of at most "
                         f"{MAX_ICC_BYTES} bytes")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("icc_profile is not base64 text") from None
    return check_icc_profile(data)


def as_image_cms_profile(data: bytes) -> Any:
    """The profile as OpenSlide's ``color_profile`` gives it: a new
    ``PIL.ImageCms.ImageCmsProfile``.  Raises ``PIL.ImageCms.PyCMSError`` if LittleCMS
    cannot parse it."""
    from io import BytesIO

    from PIL import ImageCms

    return ImageCms.getOpenProfile(BytesIO(data))


__all__ = ["MAX_ICC_BYTES", "as_image_cms_profile", "check_icc_profile", "from_attr",
           "source_icc_profile", "to_attr"]
