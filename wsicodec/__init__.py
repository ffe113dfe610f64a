"""wsicodec: learned (and classical) compression of whole-slide pathology images.

Public entry points (imported lazily, so ``import wsicodec`` loads no codec library,
no OpenSlide and no torch)::

    wsicodec.open_slide(path)            # OpenSlide-compatible reader: container or slide file
    wsicodec.compress(src, out, codec)   # slide/image -> zarr v3 container
    wsicodec.decompress(src, out_tiff)   # container -> pyramidal TIFF
    wsicodec.get_codec(name, quality)    # tile codec registry
    wsicodec.encode(image, quality)      # (H, W, 3) uint8 -> bytes, learned codec
    wsicodec.decode(data)                # bytes -> (H, W, 3) uint8
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "open_slide": "wsicodec.slide",
    "WsiSlide": "wsicodec.slide",
    "compress": "wsicodec.pipeline",
    "decompress": "wsicodec.readback",
    "get_codec": "wsicodec.codecs",
    "codec_from_dict": "wsicodec.codecs",
    "register_codec": "wsicodec.codecs",
    "available_codecs": "wsicodec.codecs",
    "open_container": "wsicodec.container",
    "encode": "wsicodec.image",
    "decode": "wsicodec.image",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'wsicodec' has no attribute {name!r}")
