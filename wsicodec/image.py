"""Whole-image API: ``encode(image) -> bytes`` and ``decode(bytes) -> image``.

The image is cut into independent tiles coded exactly as in a container (see
:mod:`wsicodec.learned`).  Stream layout (little-endian)::

    magic b"WSIM" | version u8 | reserved u8 | height u32 | width u32 | tile u16
    | model sha256 (32 bytes) | tile count u32
    | per tile: length u32, CRC-32 u32        (row-major)
    | tile bitstreams, concatenated

>>> import numpy as np, wsicodec
>>> img = np.full((300, 200, 3), 235, np.uint8)   # glass: coded as background
>>> data = wsicodec.encode(img, quality=4)
>>> wsicodec.decode(data).shape
(300, 200, 3)
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from .errors import CorruptDataError, CorruptTileError, InvalidSettingError

MAGIC = b"WSIM"
VERSION = 1
_HEAD = struct.Struct("<4sBBIIH32sI")
_ENTRY = struct.Struct("<II")
DEFAULT_TILE = 256


def _grid(height: int, width: int, tile: int):
    for r in range(-(-height // tile)):
        for c in range(-(-width // tile)):
            yield r, c, slice(r * tile, min((r + 1) * tile, height)), slice(c * tile, min((c + 1) * tile, width))


def context_region(a: np.ndarray, ys: slice, xs: slice, margin: int
                   ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The tile ``a[ys, xs]`` grown by ``margin`` on each side (clipped to ``a``).

    Returns the region and the tile's box ``(top, left, height, width)`` in it.
    """
    y0, x0 = max(ys.start - margin, 0), max(xs.start - margin, 0)
    y1, x1 = min(ys.stop + margin, a.shape[0]), min(xs.stop + margin, a.shape[1])
    box = (ys.start - y0, xs.start - x0, ys.stop - ys.start, xs.stop - xs.start)
    return np.ascontiguousarray(a[y0:y1, x0:x1]), box


def encode(image: np.ndarray, quality: float = 4.0, *, tile_size: int = DEFAULT_TILE,
           model: str | None = None, batch: int = 16, margin: int | None = None,
           refine: int = 0) -> bytes:
    """Code an (H, W, 3) uint8 array of any size with the learned codec.

    Each tile is coded with ``margin`` pixels of its neighbours around it
    (default: the codec's) so that stitched tiles show no seams.  ``refine``
    steps of the encoder's latent search (0: off) take fewer bits for the same
    PSNR at a much higher encode cost (:class:`~wsicodec.learned.LearnedCodec`).

    Raises:
        InvalidSettingError: wrong array shape/dtype, quality or tile size out of range.
    """
    from .learned import DEFAULT_MARGIN, LearnedCodec
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise InvalidSettingError(f"image must be (H, W, 3) uint8, got {a.shape} {a.dtype}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise InvalidSettingError(f"image must be at least 1x1, got {a.shape[:2]}")
    if not 16 <= tile_size <= 4096:
        raise InvalidSettingError(f"tile_size must be in 16..4096, got {tile_size}")
    codec = LearnedCodec(quality, model=model, refine=refine,
                         margin=DEFAULT_MARGIN if margin is None else margin)
    h, w = a.shape[:2]
    cells = list(_grid(h, w, tile_size))
    streams: list[bytes] = []
    for i in range(0, len(cells), batch):
        regions, boxes = [], []
        for _, _, ys, xs in cells[i:i + batch]:
            region, box = context_region(a, ys, xs, codec.margin)
            regions.append(region)
            boxes.append(box)
        streams += codec.encode_batch(regions, boxes)
    head = _HEAD.pack(MAGIC, VERSION, 0, h, w, tile_size, bytes.fromhex(codec.model_id), len(streams))
    table = b"".join(_ENTRY.pack(len(s), zlib.crc32(s)) for s in streams)
    return head + table + b"".join(streams)


def decode(data: bytes, *, model: str | None = None, batch: int = 16) -> np.ndarray:
    """Inverse of :func:`encode`.

    Raises:
        CorruptDataError: not a wsicodec image stream, or truncated.
        CorruptTileError: a tile fails its CRC or symbol checksum (names row and column).
        ModelMismatchError: the stream was made with other weights (names both ids).
    """
    from .learned import LearnedCodec
    data = bytes(data)
    if len(data) < _HEAD.size or data[:4] != MAGIC:
        raise CorruptDataError("not a wsicodec image stream (bad magic or too short)")
    _, ver, _, h, w, tile, model_id, n = _HEAD.unpack_from(data)
    if ver != VERSION:
        raise CorruptDataError(f"image stream version {ver} is not supported (expected {VERSION})")
    cells = list(_grid(h, w, tile))
    if n != len(cells) or h == 0 or w == 0:
        raise CorruptDataError("image stream header is inconsistent (tile count)")
    codec = LearnedCodec(4.0, model=model, model_id=model_id.hex())
    pos = _HEAD.size + n * _ENTRY.size
    if len(data) < pos:
        raise CorruptDataError("image stream truncated (tile table)")
    streams, names = [], []
    for k, (r, c, _, _) in enumerate(cells):
        length, crc = _ENTRY.unpack_from(data, _HEAD.size + k * _ENTRY.size)
        s = data[pos:pos + length]
        if len(s) != length:
            raise CorruptDataError(f"image stream truncated at tile (row {r}, col {c})")
        if zlib.crc32(s) != crc:
            raise CorruptTileError(f"tile (row {r}, col {c}) is corrupt (CRC mismatch)", row=r, col=c)
        streams.append(s)
        names.append(f"tile (row {r}, col {c})")
        pos += length
    if pos != len(data):
        raise CorruptDataError(f"image stream has {len(data) - pos} trailing bytes")
    out = np.empty((h, w, 3), np.uint8)
    for i in range(0, n, batch):
        tiles = codec.decode_batch(streams[i:i + batch], names[i:i + batch])
        for (_, _, ys, xs), t in zip(cells[i:i + batch], tiles):
            if t.shape[:2] != (ys.stop - ys.start, xs.stop - xs.start):
                raise CorruptDataError("a tile decoded to the wrong size")
            out[ys, xs] = t
    return out
