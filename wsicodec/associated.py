"""Associated images (label, macro, thumbnail): the formats a container stores them in,
the policy ``compress --associated`` names (:data:`ASSOCIATED_POLICIES`,
:func:`associated_format`), and their encoders.

:class:`~wsicodec.writer.ContainerWriter` stores them with these;
:meth:`~wsicodec.container.Container.read_associated_image` reads them back.
"""

from __future__ import annotations

import numpy as np

from wsicodec.errors import InvalidSettingError

#: the formats an associated image may be stored in
ASSOCIATED_FORMATS = ("png", "jxl")

#: What ``compress --associated`` may ask for:
#: ``auto``: the label lossless (PNG: barcodes and handwriting are read by machines and
#: people, exactly), every other associated image (thumbnail, macro: overviews the source
#: itself usually stores as JPEG) JPEG-XL at distance ASSOCIATED_JXL_DISTANCE;
#: ``lossless``: all PNG; ``none``: no associated images at all (e.g. to leave the label,
#: which often carries the patient's name, out of a shared copy).
ASSOCIATED_POLICIES = ("auto", "lossless", "none")
ASSOCIATED_LOSSLESS_NAMES = ("label",)
#: JPEG-XL distance for overview images: half of libjxl's "visually lossless" 1.0
#: (its size and PSNR against PNG on the sample slides: docs/results.md).
ASSOCIATED_JXL_DISTANCE = 0.5
ASSOCIATED_JXL_EFFORT = 7


def associated_format(name: str, policy: str) -> str | None:
    """How ``compress`` stores the associated image ``name`` under ``policy``:
    "png", "jxl", or None (left out). Raises InvalidSettingError for an unknown policy."""
    if policy not in ASSOCIATED_POLICIES:
        raise InvalidSettingError(f"associated images: {policy!r} is not one of "
                                  f"{', '.join(ASSOCIATED_POLICIES)}")
    if policy == "none":
        return None
    if policy == "lossless" or name.lower() in ASSOCIATED_LOSSLESS_NAMES:
        return "png"
    return "jxl"


def encode_png(rgb: np.ndarray) -> bytes:
    """An associated image as PNG (lossless)."""
    import imagecodecs

    return bytes(imagecodecs.png_encode(np.ascontiguousarray(rgb)))


def encode_jxl(rgb: np.ndarray) -> bytes:
    """An associated image as JPEG-XL (distance ASSOCIATED_JXL_DISTANCE)."""
    import imagecodecs

    return bytes(imagecodecs.jpegxl_encode(np.ascontiguousarray(rgb),
                                           distance=ASSOCIATED_JXL_DISTANCE,
                                           effort=ASSOCIATED_JXL_EFFORT))
