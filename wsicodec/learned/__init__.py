"""The ``learned`` tile codec: a variable-rate hyperprior network and rANS bitstreams.

Modules, each one concern::

    tileformat  the tile bitstream: header layout, versions (3; legacy 1-2 read), parsing
    glass       background tiles: a colour plane and exact outliers, no network pass
    ladder      the quality knob: quality → λ-ladder position → gains, λ, κ
    network     WsiHyperprior (g_a, h_a, h_s, g_s), ModelConfig, its blocks
    exact       h_s in exact integer arithmetic: the same entropy parameters everywhere
    fast        inference copies of g_a / g_s (channels-last, frozen GDN, bfloat16 body)
    refine      the encoder's latent search
    encoder     tiles (with context) → bytes
    decoder     bytes → tiles: entropy decoding, stitching, g_s passes, LatentCache
    codec       LearnedCodec: the above behind :class:`wsicodec.codecs.TileCodec`
    jxlfit      JPEG-XL at a PSNR target (the distance ladder, lossless last)
    j2kfit      JPEG 2000 at a PSNR target (OpenJPEG's fixed-quality level, measured)
    choice      the auto codec's per-tile choice: glass / network / JPEG 2000 / JPEG-XL over a floor
    seamsearch  its opt-in latent search of network tiles beside bare ones
    auto        AutoCodec ("auto"): the per-tile choice behind the same protocol

Importing this package registers the codecs ``learned`` and ``auto`` (``wsicodec.codecs``
imports it lazily, the first time either is asked for) and imports torch.
"""

from __future__ import annotations

from .auto import DEFAULT_MIN_PSNR, AutoCodec, check_min_psnr
from .auto import register as _register_auto
from .codec import (DEFAULT_MARGIN, DEFAULT_MAX_BATCH, LOCAL_OPTIONS, MAX_REFINE, LearnedCodec,
                    register, resolve_device)
from .decoder import TileDecoder
from .encoder import TileEncoder, hyper_symbols
from .glass import is_uniform, uniform_fit, uniform_latent
from .ladder import DEFAULT_QUALITY, QUALITY_MAX, QUALITY_MIN, QualityLadder, check_quality
from .network import ModelConfig, WsiHyperprior, pad_to_stride
from .synthesis import STITCH_RING, LatentCache, stitch_window
from .tileformat import (GLASS_KINDS, KIND_NETWORK, KIND_NETWORK_MIXED, KIND_PLANE, KIND_PLANE_MIXED, KIND_UNIFORM,
                         NETWORK_HEADER_BYTES, NETWORK_KINDS, PIXEL_STRIDE, PLANE_KINDS, TileHeader, parse_header)
from wsicodec.errors import ModelMismatchError

__all__ = ["AutoCodec", "DEFAULT_MIN_PSNR", "check_min_psnr", "LearnedCodec", "register", "LOCAL_OPTIONS", "DEFAULT_MARGIN", "DEFAULT_MAX_BATCH",
           "MAX_REFINE", "resolve_device", "LatentCache", "TileDecoder", "TileEncoder",
           "stitch_window", "STITCH_RING", "hyper_symbols", "is_uniform", "uniform_fit",
           "uniform_latent", "DEFAULT_QUALITY", "QUALITY_MIN", "QUALITY_MAX", "QualityLadder",
           "check_quality", "ModelConfig", "WsiHyperprior", "pad_to_stride", "KIND_NETWORK",
           "KIND_NETWORK_MIXED", "NETWORK_KINDS",
           "KIND_UNIFORM", "KIND_PLANE", "KIND_PLANE_MIXED", "PLANE_KINDS", "GLASS_KINDS", "NETWORK_HEADER_BYTES", "PIXEL_STRIDE", "TileHeader", "parse_header",
           "ModelMismatchError"]

register()
_register_auto()
