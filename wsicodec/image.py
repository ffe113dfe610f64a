"""Whole-image API: ``encode(image) -> bytes`` and ``decode(bytes) -> image``.

The image is cut into independent tiles coded exactly as in a container (see
:mod:`wsicodec.learned`), and decoded as a container's are: each tile's latents joined
with its neighbours' before g_s, so the stitched image shows no tile grid.

Stream layout (little-endian)::

    magic b"WSIM" | version u8 (1: learned tiles; 2: the auto codec's, JPEG-XL tiles too)
    | reserved u8 | height u32 | width u32 | tile u16
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

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import CorruptDataError, CorruptTileError, InvalidSettingError

MAGIC = b"WSIM"
VERSION = 1
#: the stream version of the ``auto`` codec's streams (tiles of several kinds), JPEG 2000
#: tiles without a margin
MIXED_VERSION = 2
#: the ``auto`` codec's streams since JPEG 2000 tiles have a margin: the header's byte after
#: the version holds it (px; :attr:`wsicodec.learned.AutoCodec.jpeg2000_margin`)
MARGIN_VERSION = 3
#: the stream versions :func:`read_stream` reads
VERSIONS = (VERSION, MIXED_VERSION, MARGIN_VERSION)
#: the codecs :func:`encode` codes with
IMAGE_CODECS = ("learned", "auto")
_HEAD = struct.Struct("<4sBBIIH32sI")
_ENTRY = struct.Struct("<II")
DEFAULT_TILE = 256


#: pixels of one image stream (its decode allocates them at once: 3 bytes each)
MAX_IMAGE_PIXELS = 1 << 28


def tile_cells(height: int, width: int, tile: int):
    """The tiles of an image stream, row-major: ``(row, col, rows slice, cols slice)``
    of each ``tile``-px tile of a ``height`` x ``width`` image (edge tiles smaller)."""
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


def encode(image: np.ndarray, quality: float | None = None, *, tile_size: int = DEFAULT_TILE,
           model: str | None = None, batch: int = 16, margin: int | None = None,
           refine: int = 0, precision: str = "float32", codec: str = "learned",
           min_psnr: float | None = None, seam_search: int = 0, jpeg2000: bool = True,
           jpeg2000_margin: int | None = None, recovered_jpeg: bool = True) -> bytes:
    """Code an (H, W, 3) uint8 array of any size with the learned codec at ``quality``
    (1..8; None: the codec's default, :data:`wsicodec.learned.ladder.DEFAULT_QUALITY`).

    ``codec="auto"``: each tile glass, the network, JPEG 2000 or JPEG-XL, every tile's
    decoded PSNR at least ``min_psnr`` dB (:class:`~wsicodec.learned.AutoCodec`; its
    default floor without it; ``seam_search`` steps of its seam search, 0: off;
    ``jpeg2000=False``: JPEG-XL its only classical codec; ``jpeg2000_margin``: px of their
    surroundings JPEG 2000 tiles are coded with, None: the codec's default;
    ``recovered_jpeg=False``: no tile coded as the JPEG the pixels were decoded from,
    :mod:`wsicodec.jpegrecover`); ``refine`` is the network-only codec's.

    g_a sees each tile with ``margin`` pixels of its neighbours around it (default:
    the codec's, 16) and the stream holds the tile's latents only; :func:`decode`
    joins neighbouring tiles' latents, so stitched tiles show no seams.  ``tile_size``
    is a multiple of 16 in 16..4096 (y's grid).  ``refine``
    steps of the encoder's latent search (0: off) take fewer bits for the same
    PSNR at a much higher encode cost (:class:`~wsicodec.learned.LearnedCodec`);
    ``precision`` "bfloat16" runs g_a's inner layers in bfloat16 (faster where the
    hardware has it; rate-distortion as float32's within the noise of
    ``bench/results/precision_he_test.json``; any reader decodes it).
    ``model``: a weights file the caller chose (default: the shipped weights); the
    stream records its sha256, never its path.

    Raises:
        InvalidSettingError: wrong array shape/dtype, quality or tile size out of range,
            an unknown precision.
    """
    from .learned import LearnedCodec
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise InvalidSettingError(f"image must be (H, W, 3) uint8, got {a.shape} {a.dtype}")
    if a.shape[0] < 1 or a.shape[1] < 1 or a.shape[0] * a.shape[1] > MAX_IMAGE_PIXELS:
        raise InvalidSettingError(f"image must be 1 to {MAX_IMAGE_PIXELS} pixels, got "
                                  f"{a.shape[1]}x{a.shape[0]} (code larger images as a slide: "
                                  "wsicodec compress)")
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or not 16 <= tile_size <= 4096 \
            or tile_size % 16:
        raise InvalidSettingError(f"tile_size must be a multiple of 16 in 16..4096, got {tile_size!r}")
    if codec not in IMAGE_CODECS:
        raise InvalidSettingError(f"codec must be one of {', '.join(IMAGE_CODECS)}, got {codec!r}")
    kw = {} if margin is None else {"margin": margin}
    if codec == "auto":
        if refine:
            raise InvalidSettingError("refine is the learned codec's option, not the auto codec's")
        from .learned import AutoCodec
        if jpeg2000_margin is not None:
            kw["jpeg2000_margin"] = jpeg2000_margin
        coder: Any = AutoCodec(quality, min_psnr=min_psnr, seam_search=seam_search, jpeg2000=jpeg2000,
                               recovered_jpeg=recovered_jpeg, model=model, precision=precision, **kw)
    else:
        if min_psnr is not None:
            raise InvalidSettingError("min_psnr is the auto codec's option (codec='auto')")
        if seam_search:
            raise InvalidSettingError("seam_search is the auto codec's option (codec='auto')")
        if jpeg2000 is not True or jpeg2000_margin is not None or recovered_jpeg is not True:
            raise InvalidSettingError("jpeg2000, jpeg2000_margin and recovered_jpeg are the auto codec's "
                                      "options (codec='auto')")
        coder = LearnedCodec(quality, model=model, refine=refine, precision=precision, **kw)
    h, w = a.shape[:2]
    cells = list(tile_cells(h, w, tile_size))
    if codec == "auto":
        streams = _encode_levelwise(coder, a, cells)
    else:
        streams = []
        for i in range(0, len(cells), batch):
            regions, boxes = zip(*(context_region(a, ys, xs, coder.context)
                                   for _, _, ys, xs in cells[i:i + batch]))
            streams += coder.encode_tiles(list(regions), list(boxes))
    version, extra = (MARGIN_VERSION, coder.jpeg2000_margin) if codec == "auto" else (VERSION, 0)
    head = _HEAD.pack(MAGIC, version, extra, h, w, tile_size, bytes.fromhex(coder.model_id), len(streams))
    table = b"".join(_ENTRY.pack(len(s), zlib.crc32(s)) for s in streams)
    return head + table + b"".join(streams)


def _encode_levelwise(codec: Any, a: np.ndarray, cells: list) -> list[bytes]:
    """The tiles of ``a`` coded row by row through ``codec``'s level encoder, row-major."""
    enc = codec.level_encoder(0)
    rows: dict[int, list[bytes]] = {}
    by_row: dict[int, list] = {}
    for r, _, ys, xs in cells:
        by_row.setdefault(r, []).append((ys, xs))
    for r, row in by_row.items():
        regions, boxes = zip(*(context_region(a, ys, xs, codec.context) for ys, xs in row))
        for er in enc.push(r, list(regions), list(boxes)):
            rows[er.row] = er.tiles
    for er in enc.finish():
        rows[er.row] = er.tiles
    return [t for r in sorted(rows) for t in rows[r]]


@dataclass(frozen=True)
class ImageStream:
    """An image stream's header and its tile bitstreams (row-major), CRC-checked."""
    height: int
    width: int
    tile: int
    model_id: str
    tiles: list[bytes]
    version: int = VERSION
    #: px of margin in its JPEG 2000 tiles (version 3; 0 before)
    jpeg2000_margin: int = 0


def _max_margin() -> int:
    from .learned.j2kfit import MAX_MARGIN
    return MAX_MARGIN


def read_stream(data: bytes) -> ImageStream:
    """Split an image stream from :func:`encode` into its tiles.

    Raises:
        CorruptDataError: not a wsicodec image stream, or truncated.
        CorruptTileError: a tile fails its CRC (names row and column).
    """
    data = bytes(data)
    if len(data) < _HEAD.size or data[:4] != MAGIC:
        raise CorruptDataError("not a wsicodec image stream (bad magic or too short)")
    _, ver, extra, h, w, tile, model_id, n = _HEAD.unpack_from(data)
    if ver not in VERSIONS:
        raise CorruptDataError(f"image stream version {ver} is not supported (this wsicodec reads "
                               f"{', '.join(map(str, VERSIONS))})")
    if ver == MARGIN_VERSION and extra > _max_margin():
        raise CorruptDataError(f"image stream header is out of bounds (a {extra}-px JPEG 2000 margin; "
                               f"at most {_max_margin()})")
    if not (16 <= tile <= 4096 and tile % 16 == 0) or not 1 <= h * w <= MAX_IMAGE_PIXELS:
        raise CorruptDataError(f"image stream header is out of bounds ({w}x{h} pixels in "
                               f"{tile}-px tiles; at most {MAX_IMAGE_PIXELS} pixels)")
    if n != -(-h // tile) * -(-w // tile):
        raise CorruptDataError("image stream header is inconsistent (tile count)")
    pos = _HEAD.size + n * _ENTRY.size
    if len(data) < pos:
        raise CorruptDataError("image stream truncated (tile table)")
    streams: list[bytes] = []
    for k, (r, c, _, _) in enumerate(tile_cells(h, w, tile)):
        length, crc = _ENTRY.unpack_from(data, _HEAD.size + k * _ENTRY.size)
        s = data[pos:pos + length]
        if len(s) != length:
            raise CorruptDataError(f"image stream truncated at tile (row {r}, col {c})")
        if zlib.crc32(s) != crc:
            raise CorruptTileError(f"tile (row {r}, col {c}) is corrupt (CRC mismatch)", row=r, col=c)
        streams.append(s)
        pos += length
    if pos != len(data):
        raise CorruptDataError(f"image stream has {len(data) - pos} trailing bytes")
    return ImageStream(h, w, tile, model_id.hex(), streams, ver, extra if ver == MARGIN_VERSION else 0)


def decode(data: bytes, *, model: str | None = None, batch: int = 16,
           precision: str = "float32") -> np.ndarray:
    """Inverse of :func:`encode`: the tiles decoded with their neighbours' latents (a
    JPEG-XL tile of an ``auto`` stream as its own pixels, giving its neighbours g_a of them);
    ``precision``: how g_s runs (:data:`wsicodec.codecs.PRECISIONS`).

    ``model``: a weights file the caller chose; without it the weights are found by the
    model id the stream records, among trusted places only (the shipped weights,
    ``$WSICODEC_MODEL``, ``$WSICODEC_MODEL_DIR``: :func:`wsicodec.checkpoint.find_weights`).
    A stream names no file, and weights load as data only (``weights_only``).

    Raises:
        CorruptDataError: not a wsicodec image stream, or truncated.
        CorruptTileError: a tile fails its CRC or symbol checksum (names row and column).
        ModelMismatchError: the stream was made with other weights (names both ids and
            where to put the right ones).
        InvalidSettingError: the weights found for its id are not plain weights data.
    """
    from .learned import AutoCodec, LearnedCodec
    st = read_stream(data)
    h, w, tile, streams = st.height, st.width, st.tile, st.tiles
    if st.version == VERSION:
        codec: Any = LearnedCodec(model=model, model_id=st.model_id, precision=precision)
    else:
        codec = AutoCodec(model=model, model_id=st.model_id, precision=precision,
                          jpeg2000_margin=st.jpeg2000_margin)
    cells = list(tile_cells(h, w, tile))
    shapes = [(ys.stop - ys.start, xs.stop - xs.start, 3) for _, _, ys, xs in cells]   # row-major
    n = len(cells)
    rows, cols = -(-h // tile), -(-w // tile)
    cache = codec.new_cache(tile, 4 * cols + batch + 4)   # rows around a batch: each tile decoded once
    out = np.empty((h, w, 3), np.uint8)
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        def run(fn, items: list) -> list:  # noqa: ANN001 - the entropy work, on the pool
            return [f.exception() or f.result() for f in [pool.submit(fn, it) for it in items]]

        for i in range(0, n, batch):
            _decode_part(codec, cells[i:i + batch], streams, shapes, (cols, rows), cache, run, out)
    return out


def _decode_part(codec, part: list, streams: list, shapes: list, grid: tuple[int, int],  # noqa: ANN001
                 cache, run, out: np.ndarray) -> None:  # noqa: ANN001
    """One batch of :func:`decode`'s cells into ``out`` (``streams`` and each cell's
    ``shapes`` row-major)."""
    cols = grid[0]
    tiles = codec.decode_tiles([(c, r) for r, c, _, _ in part],
                               lambda c, r: streams[r * cols + c], grid,
                               lambda c, r: shapes[r * cols + c],
                               names=lambda c, r: f"tile (row {r}, col {c})", cache=cache, run=run)
    for (r, c, ys, xs), t in zip(part, tiles):
        if isinstance(t, CorruptDataError) and not isinstance(t, CorruptTileError):
            raise CorruptTileError(str(t), row=r, col=c) from t
        if isinstance(t, BaseException):
            raise t
        if t.shape[:2] != (ys.stop - ys.start, xs.stop - xs.start):
            raise CorruptDataError("a tile decoded to the wrong size")
        out[ys, xs] = t
