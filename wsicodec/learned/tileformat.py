"""The learned codec's tile bitstream: header layout, versions, parsing.  No torch here.

Tile bitstream (little-endian)::

    offset size  field
    0      4     magic b"WSLT"
    4      1     format version: 3; 2 and 1 are still read (below)
    5      1     kind: 0 = network-coded, 1 = uniform background (glass), 2 = fix-up,
                 3 = plane glass, 4 = plane glass that also meets its bare neighbours,
                 5 = network-coded, and also meets its bare neighbours
    6      2     height
    8      2     width
    -- kind 1 (uniform, :mod:`wsicodec.learned.glass`): 3 bytes R, G, B, u16 count, then
       per outlier pixel u16 row, u16 col, 3 bytes R, G, B (kept exactly)
                                                              (15 bytes + 7 per outlier)
    -- kind 3 (plane glass, :mod:`wsicodec.learned.glass`): u16 mean R, G, B in 1/16
       levels, int8 change across the tile in x for R, G, B, then in y, in 1/8 levels,
       u16 count, then the outliers as kind 1's                (24 bytes + 7 per outlier)
    -- kind 4 (plane glass of a mixed grid, written by the ``auto`` codec since 2026-12):
       kind 3's layout; decoded as kind 3 and drawn toward its bare neighbours too
    -- kind 5 (network tile of a mixed grid, written by the ``auto`` codec since 2026-12):
       kind 0's layout; decoded as kind 0 and drawn toward its bare neighbours too
    -- kind 0 (network):
    10     4     quality (float32)
    14     8     first 8 bytes of the model's sha256
    22     4     CRC-32 of the decoded symbols (ẑ then ŷ, int32)
    26     4     length of the z stream
    30     1+1   top, left: where the tile sits inside the coded region (format 3: 0, 0)
    32     2+2   height, width of the coded region (format 3: the tile's, rounded up to 16;
                 format 2: the tile plus the context margin it was coded with)
    36     ...   z stream (factorized prior), then y stream (Gaussian, μ/σ from h_s(ẑ))
    -- kind 2 (fix-up, format 3 on; written by the ``auto`` codec): a tile whose own pixels
       are a bare codestream (JPEG-XL or JPEG 2000), and which gives its neighbours what its inner tile gives
    10     4     length n of the inner tile
    14     n     the inner tile: a whole network or glass tile of the same format and size
    14+n   ...   the bare codestream (the tile's pixels), to the end

Formats, all read by this release (:data:`READ_VERSIONS`):

* 3 (written since 2026-11-28), "stitched": a tile codes exactly its own latents; the
  decoder joins its neighbours' latents before g_s (:mod:`wsicodec.learned.decoder`).
* 2 (legacy): each tile coded with a margin of its neighbours' pixels and decoded on its
  own, cropped to ``top, left, height, width`` of its coded region.
* 1 (legacy): as 2, but its entropy parameters were computed by h_s in float64, not in
  exact integer arithmetic (:func:`exact_entropy`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from wsicodec.errors import CorruptDataError

MAGIC = b"WSLT"
#: the format new tiles are written in
VERSION = 3
#: tile formats this release reads: 3 stitched; 2 margin-coded; 1 as 2 with the entropy
#: parameters in float64
READ_VERSIONS = (1, 2, 3)
#: first format whose network tiles are decoded with their neighbours' latents
STITCH_VERSION = 3
KIND_NETWORK, KIND_UNIFORM, KIND_FIXUP = 0, 1, 2
FIXUP = struct.Struct("<I")              # length of a fix-up tile's inner tile
#: glass stored as a colour plane
KIND_PLANE = 3
#: glass stored as a colour plane that also meets its bare neighbours
KIND_PLANE_MIXED = 4
#: the plane glass kinds (one layout): network and plane neighbours are drawn toward either
PLANE_KINDS = (KIND_PLANE, KIND_PLANE_MIXED)
#: the glass kinds: decoded without the network
GLASS_KINDS = (KIND_UNIFORM, KIND_PLANE, KIND_PLANE_MIXED)
#: a network tile that is also drawn toward its bare neighbours (``auto`` grids)
KIND_NETWORK_MIXED = 5
#: the network kinds (one layout)
NETWORK_KINDS = (KIND_NETWORK, KIND_NETWORK_MIXED)
#: bytes of a plane glass tile before its outliers (header, plane, count)
PLANE_TILE_BYTES = 24
HEAD = struct.Struct("<4sBBHH")          # magic, version, kind, h, w
NET = struct.Struct("<f8sIIBBHH")       # quality, model id, symbol crc, len(z), top, left, coded h, w
#: bytes of a network-coded tile before its z and y streams
NETWORK_HEADER_BYTES = HEAD.size + NET.size
#: image side must be a multiple of this for g_a (four stride-2 layers)
PIXEL_STRIDE = 16
#: y side must be a multiple of this for h_a (two stride-2 layers)
LATENT_STRIDE = 4
#: the quality a tile header may carry (the public scale: :mod:`wsicodec.learned.ladder`)
QUALITY_RANGE = (1.0, 8.0)
#: largest tile side a header can hold
MAX_SIDE = 65535


@dataclass(frozen=True)
class TileHeader:
    """A parsed tile header (:func:`parse_header`)."""

    kind: int
    height: int
    width: int
    quality: float = 0.0
    model_prefix: bytes = b""
    crc: int = 0
    z_len: int = 0
    top: int = 0
    left: int = 0
    coded_height: int = 0
    coded_width: int = 0
    payload: int = 0                     #: offset of the payload
    version: int = VERSION               #: tile format (1: float64 entropy parameters)
    inner_len: int = 0                   #: a fix-up tile's inner tile (from ``payload``)

    @property
    def stitched(self) -> bool:
        """Whether this network tile is decoded with its neighbours' latents (format 3)."""
        return self.version >= STITCH_VERSION

    @property
    def latent_size(self) -> tuple[int, int]:
        """(h, w) of the coded region's latents y."""
        return ceil_to(self.coded_height, PIXEL_STRIDE) // 16, ceil_to(self.coded_width, PIXEL_STRIDE) // 16


def ceil_to(n: int, k: int) -> int:
    """``n`` rounded up to a multiple of ``k``."""
    return -(-n // k) * k


def exact_entropy(version: int) -> bool:
    """Whether tiles of this format compute their entropy parameters in exact integer
    arithmetic (format 2 on) rather than with the float64 h_s (format 1)."""
    return version >= 2


def pack_network_header(version: int, height: int, width: int, quality: float, model_id: str,
                        crc: int, z_len: int) -> bytes:
    """The header of a network-coded tile as this release writes it: the coded region is
    the tile itself, rounded up to 16 (``top = left = 0``)."""
    return HEAD.pack(MAGIC, version, KIND_NETWORK, height, width) + NET.pack(
        quality, bytes.fromhex(model_id[:16]), crc, z_len, 0, 0,
        ceil_to(height, PIXEL_STRIDE), ceil_to(width, PIXEL_STRIDE))


def pack_fixup(inner: bytes, pixels: bytes) -> bytes:
    """A fix-up tile (kind 2): ``pixels``, a bare codestream of the tile (JPEG-XL or JPEG 2000), as its own
    pixels, around ``inner``, a network or glass tile of format 3 or later that its
    neighbours see (its latents, its glass edges).  Raises ValueError for another inner
    tile or no pixels."""
    try:
        hd = parse_header(inner)
    except CorruptDataError as e:
        raise ValueError(f"a fix-up tile's inner tile: {e}") from None
    if hd.kind == KIND_FIXUP or hd.version < STITCH_VERSION:
        raise ValueError("a fix-up tile wraps one network or glass tile of format 3 or later")
    if not pixels:
        raise ValueError("a fix-up tile needs its pixels")
    return HEAD.pack(MAGIC, hd.version, KIND_FIXUP, hd.height, hd.width) + FIXUP.pack(len(inner)) \
        + bytes(inner) + bytes(pixels)


def fixup_parts(data: bytes, hd: "TileHeader") -> tuple[bytes, bytes]:
    """A fix-up tile's (inner tile, bare codestream); ``hd`` its parsed header."""
    end = hd.payload + hd.inner_len
    return data[hd.payload:end], data[end:]


def pack_uniform_header(version: int, height: int, width: int) -> bytes:
    """The first bytes of a glass tile (its colour and outliers follow)."""
    return HEAD.pack(MAGIC, version, KIND_UNIFORM, height, width)


def pack_plane_header(version: int, height: int, width: int, kind: int = KIND_PLANE) -> bytes:
    """The first bytes of a plane glass tile of ``kind`` (:data:`PLANE_KINDS`; its plane and
    outliers follow)."""
    if kind not in PLANE_KINDS:
        raise ValueError(f"not a plane glass kind: {kind!r}")
    return HEAD.pack(MAGIC, version, kind, height, width)


def with_kind(data: bytes, kind: int) -> bytes:
    """A tile's bytes relabelled as ``kind`` of the same layout (:data:`PLANE_KINDS`, or
    :data:`NETWORK_KINDS`: neither the symbols' checksum nor anything else covers the kind
    byte), the rest unchanged.  Raises ValueError for a kind of another layout
    (CorruptDataError, a ValueError, for bytes that are no tile)."""
    hd = parse_header(data)
    if not any(kind in family and hd.kind in family for family in (PLANE_KINDS, NETWORK_KINDS)):
        raise ValueError(f"a kind-{hd.kind} tile cannot be relabelled as kind {kind}")
    return bytes(data[:5]) + bytes([kind]) + bytes(data[6:])


def parse_header(data: bytes) -> TileHeader:
    """Parse and validate a tile header. Raises CorruptDataError."""
    if len(data) < HEAD.size:
        raise CorruptDataError(f"learned tile truncated ({len(data)} bytes)")
    magic, ver, kind, h, w = HEAD.unpack_from(data)
    if magic != MAGIC:
        raise CorruptDataError("not a learned tile (bad magic)")
    if ver not in READ_VERSIONS:
        raise CorruptDataError(f"learned tile format version {ver} is not supported (this wsicodec "
                               f"reads {', '.join(map(str, READ_VERSIONS))}; a newer release may read it)")
    if h == 0 or w == 0:
        raise CorruptDataError("learned tile with zero size")
    if kind == KIND_UNIFORM:
        if len(data) < HEAD.size + 5:
            raise CorruptDataError("uniform tile has the wrong length")
        return TileHeader(kind, h, w, payload=HEAD.size, version=ver)
    if kind == KIND_FIXUP:
        return _parse_fixup(data, ver, h, w)
    if kind in PLANE_KINDS:
        if len(data) < PLANE_TILE_BYTES:
            raise CorruptDataError("plane glass tile has the wrong length")
        return TileHeader(kind, h, w, payload=HEAD.size, version=ver)
    if kind not in NETWORK_KINDS:
        raise CorruptDataError(f"unknown tile kind {kind}")
    if len(data) < HEAD.size + NET.size:
        raise CorruptDataError("learned tile truncated in its header")
    q, prefix, crc, zlen, top, left, ch, cw = NET.unpack_from(data, HEAD.size)
    start = HEAD.size + NET.size
    if zlen > len(data) - start:
        raise CorruptDataError("learned tile truncated (z stream)")
    if top + h > ch or left + w > cw:
        raise CorruptDataError("learned tile header is inconsistent (tile outside its coded region)")
    if ver >= STITCH_VERSION and (top or left or ch != ceil_to(h, PIXEL_STRIDE) or cw != ceil_to(w, PIXEL_STRIDE)):
        raise CorruptDataError("learned tile header is inconsistent (stitched tile with a margin)")
    if not QUALITY_RANGE[0] <= q <= QUALITY_RANGE[1]:      # NaN fails too
        raise CorruptDataError(f"learned tile header is inconsistent (quality {q!r})")
    return TileHeader(kind, h, w, float(q), prefix, crc, zlen, top, left, ch, cw, start, ver)


def _parse_fixup(data: bytes, ver: int, h: int, w: int) -> TileHeader:
    """A fix-up tile's header: its inner tile parsed and matched to it."""
    if ver < STITCH_VERSION:
        raise CorruptDataError(f"fix-up tile in tile format {ver} (they exist from {STITCH_VERSION})")
    start = HEAD.size + FIXUP.size
    if len(data) < start:
        raise CorruptDataError("learned tile truncated in its header")
    (n,) = FIXUP.unpack_from(data, HEAD.size)
    if n == 0 or start + n >= len(data):
        raise CorruptDataError("fix-up tile truncated (inner tile or pixels)")
    inner = parse_header(data[start:start + n])
    if inner.kind == KIND_FIXUP or inner.version != ver or (inner.height, inner.width) != (h, w):
        raise CorruptDataError("fix-up tile's inner tile does not match it")
    return TileHeader(KIND_FIXUP, h, w, inner.quality, inner.model_prefix, payload=start,
                      version=ver, inner_len=n)


def parse_named(data: bytes, name: str, shape: tuple[int, ...] | None = None) -> TileHeader:
    """:func:`parse_header` with ``name`` (e.g. "tile level=0 col=3 row=4") in its errors;
    ``shape``: the (h, w, ...) the caller expects, checked against the header before
    anything is decoded.  Raises CorruptDataError."""
    try:
        hd = parse_header(data)
    except CorruptDataError as exc:
        raise CorruptDataError(f"{name}: {exc}") from None
    if shape is not None and (hd.height, hd.width) != tuple(shape[:2]):
        raise CorruptDataError(f"{name}: the tile's header says {hd.height}x{hd.width} pixels, "
                               f"its place holds {shape[0]}x{shape[1]}")
    return hd
