"""The fuzzing harness's codec-stream forgeries: valid or subtly wrong JPEG-XL tiles, edited
learned tiles (header fields, entropy-coded streams, glass tiles) and, in an ``auto``
container's mixed grid, edited bare JPEG 2000 / JPEG-XL tiles (their bytes, the JPEG 2000
image header, valid codestreams of another geometry), each written in place of a tile with
every digest forged (:func:`~bench.fuzz_store.forge`), so that only the decoder's own checks
(and OpenJPEG's and libjxl's) stand between the edit and the pixels. Mutation signature as in
``bench/fuzz_mutations.py``.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np

from bench.fuzz_bases import TILE
from bench.fuzz_store import (bytes_mutation, forge, level_count, level_grid, random_tile, read_tile,
                              tile_path, write_tile)


def _jxl(rgb: np.ndarray) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.jpegxl_encode(np.ascontiguousarray(rgb), distance=1.0, effort=3))


def jxl_wrong_size_forged(rng: random.Random, work: Path, ctx: dict) -> str:
    """A valid JPEG-XL tile of another geometry (size, channels), digests forged: the
    decode's geometry check must refuse it."""
    level, col, row = random_tile(rng, work)
    h, w = rng.choice(((32, 32), (64, 63), (63, 64), (128, 128), (65, 64), (64, 128), (1, 1),
                       (64, 64)))
    channels = rng.choice((1, 3, 4)) if (h, w) != (64, 64) else rng.choice((1, 2, 4))
    img = np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (h, w, channels), np.uint8)
    write_tile(tile_path(work, level, col, row), _jxl(img[..., 0] if channels == 1 else img))
    forge(work)
    return f"valid {w}x{h}x{channels} JPEG-XL at level {level} ({col},{row}), digests forged"


def jxl_valid_forged(rng: random.Random, work: Path, ctx: dict) -> str:
    """A valid 64x64 RGB JPEG-XL tile of other content, digests forged: undetectable by
    design (it is a tile as good as the original)."""
    level, col, row = random_tile(rng, work)
    img = np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (TILE, TILE, 3), np.uint8)
    write_tile(tile_path(work, level, col, row), _jxl(img))
    forge(work)
    return f"valid 64x64 JPEG-XL of other content at level {level} ({col},{row}), digests forged"


def _tiles_where(work: Path, keep) -> list[tuple[int, int, int]]:
    """(level, col, row) of every tile whose stored bytes ``keep`` accepts."""
    out = []
    for level in range(level_count(work)):
        rows, cols = level_grid(work, level)
        for row in range(rows):
            for col in range(cols):
                if keep(read_tile(tile_path(work, level, col, row))):
                    out.append((level, col, row))
    return out


def _learned_tiles(work: Path, *kinds: int) -> list[tuple[int, int, int]]:
    return _tiles_where(work, lambda d: len(d) > 5 and d[:4] == b"WSLT" and d[5] in kinds)


#: the learned tile kinds a network tile is stored as: 0, and 5 beside bare tiles (auto)
_NETWORK = (0, 5)


#: (offset, struct format, name) of a learned network tile's header fields
_LEARNED_FIELDS = [(4, "B", "version"), (5, "B", "kind"), (6, "<H", "height"), (8, "<H", "width"),
                   (10, "<f", "quality"), (14, "8s", "model"), (22, "<I", "crc"),
                   (26, "<I", "z_len"), (30, "B", "top"), (31, "B", "left"),
                   (32, "<H", "coded_height"), (34, "<H", "coded_width")]


def _edit_field(rng: random.Random, data: bytearray, off: int, fmt: str, choices) -> tuple[int, int]:
    """Set the unsigned integer field ``fmt`` at ``off`` of ``data`` to one of
    ``choices(old, limit)``, clamped to its range, and another value than it held:
    (old, new)."""
    (old,) = struct.unpack_from(fmt, data, off)
    lim = 2 ** (8 * struct.calcsize(fmt)) - 1
    new = min(max(rng.choice(choices(old, lim)), 0), lim)
    if new == old:
        new = (old + 1) % (lim + 1)
    struct.pack_into(fmt, data, off, new)
    return old, new


def learned_header_forged(rng: random.Random, work: Path, ctx: dict) -> str:
    """One header field of a network-coded learned tile changed, digests forged: what the
    decoder checks (header consistency, geometry, symbol checksum, model id, the tile
    format and quality the container was written with) must catch it."""
    level, col, row = rng.choice(_learned_tiles(work, *_NETWORK))
    p = tile_path(work, level, col, row)
    data = bytearray(read_tile(p))
    off, fmt, name = rng.choice(_LEARNED_FIELDS)
    (old,) = struct.unpack_from(fmt, data, off)
    if name == "quality":
        bits = struct.unpack_from("<I", data, off)[0]
        new_bits = rng.choice((bits + 1, bits - 1, bits + 16, bits ^ (1 << rng.randrange(32))))
        struct.pack_into("<I", data, off, new_bits & 0xFFFFFFFF)
        new = struct.unpack_from("<f", data, off)[0]
    elif name == "model":
        new = bytes(rng.randrange(256) for _ in range(8))
        struct.pack_into(fmt, data, off, new)
    else:
        extra = [1, 2, 4] if name == "version" else []
        old, new = _edit_field(rng, data, off, fmt, lambda old, lim: [
            old + 1, old - 1, 0, lim, old * 2, rng.randrange(lim + 1)] + extra)
    write_tile(p, bytes(data))
    forge(work)
    return f"learned tile level {level} ({col},{row}) {name} {old!r} -> {new!r}, digests forged"


def learned_stream_forged(rng: random.Random, work: Path, ctx: dict) -> str:
    """Bits of a network tile's z or y stream flipped (or the stream cut or grown), digests
    forged: the symbol checksum must catch it."""
    level, col, row = rng.choice(_learned_tiles(work, *_NETWORK))
    p = tile_path(work, level, col, row)
    data = read_tile(p)
    head = 36
    how = rng.choice(("bitflip", "bitflip", "overwrite", "truncate", "extend"))
    body = bytes_mutation(rng, data[head:], how)
    write_tile(p, data[:head] + body)
    forge(work)
    return f"{how} in the stream of learned tile level {level} ({col},{row}), digests forged"


def learned_glass_forged(rng: random.Random, work: Path, ctx: dict) -> str:
    """A glass tile's colour (kind 1) or plane (kind 3 or 4), or its outlier list, edited, or
    the tile cut short, digests forged.  A glass tile carries no checksum: a well-formed
    edit (another colour or plane) is a valid stream of the right size (undetectable by
    design); a malformed one (count, size, length, a mean past 255) must be caught."""
    level, col, row = rng.choice(_learned_tiles(work, 1, 3, 4))
    p = tile_path(work, level, col, row)
    data = bytearray(read_tile(p))
    plane = data[5] in (3, 4)
    what = rng.choice(("colour", "colour", "count", "size", "append", "truncate"))
    if what == "colour":                  # kinds 3, 4: the means (u16) and gradients (int8)
        i = 10 + rng.randrange(12 if plane else 3)
        data[i] = (data[i] + rng.choice((1, 17, 128))) % 256
    elif what == "count":
        struct.pack_into("<H", data, 22 if plane else 13, rng.choice((1, 2, 65535)))
    elif what == "size":
        struct.pack_into("<H", data, rng.choice((6, 8)), rng.choice((1, 32, 63, 65, 65535)))
    elif what == "truncate":
        del data[rng.randrange(5, len(data)):]
    else:
        data += bytes(rng.randrange(256) for _ in range(rng.choice((1, 7))))
    write_tile(p, bytes(data))
    forge(work)
    return f"glass tile level {level} ({col},{row}) {what} changed, digests forged"


# -- bare tiles of an auto container's mixed grid: JPEG 2000 (J2K codestream), JPEG-XL, or a
# scanner's JPEG (carried in a JPEG-XL container, or as it is)

def _bare_tiles(work: Path, j2k_only: bool = False) -> list[tuple[int, int, int]]:
    from wsicodec.classical import BARE_SIGNATURES, J2K_SIGNATURE

    return _tiles_where(work, lambda d: d.startswith(J2K_SIGNATURE if j2k_only else BARE_SIGNATURES))


def bare_stream_forged(rng: random.Random, work: Path, ctx: dict) -> str:
    """Bytes of a bare JPEG 2000 or JPEG-XL tile flipped, overwritten, cut or grown,
    digests forged.  Neither codestream carries a checksum, so an edit that still decodes
    is a valid stream of the right size (undetectable by design); OpenJPEG and libjxl must
    refuse the rest cleanly, with no crash, hang or runaway allocation."""
    level, col, row = rng.choice(_bare_tiles(work))
    p = tile_path(work, level, col, row)
    data = read_tile(p)
    how = rng.choice(("bitflip", "bitflip", "overwrite", "truncate", "extend"))
    head = 4 if rng.random() < 0.8 else 0       # mostly past the signature that routes it
    write_tile(p, data[:head] + bytes_mutation(rng, data[head:], how))
    forge(work)
    return f"{how} in bare tile level {level} ({col},{row}) ({data[:2].hex()}...), digests forged"


#: (offset from the codestream's start, struct format, name) of the JPEG 2000 main header's
#: SIZ fields (the image and tile geometry, components, precision, subsampling) and of the
#: COD marker segment that follows it in OpenJPEG's codestreams
_SIZ_FIELDS = [(6, ">H", "Rsiz"), (8, ">I", "Xsiz"), (12, ">I", "Ysiz"), (16, ">I", "XOsiz"),
               (20, ">I", "YOsiz"), (24, ">I", "XTsiz"), (28, ">I", "YTsiz"), (32, ">I", "XTOsiz"),
               (36, ">I", "YTOsiz"), (40, ">H", "Csiz"), (42, "B", "Ssiz0"), (43, "B", "XRsiz0"),
               (44, "B", "YRsiz0"), (45, "B", "Ssiz1"), (48, "B", "Ssiz2"), (50, "B", "YRsiz2")]
_COD_FIELDS = [(5, "B", "Scod"), (6, "B", "progression"), (7, ">H", "layers"), (9, "B", "mct"),
               (10, "B", "levels"), (11, "B", "xcb"), (12, "B", "ycb"), (13, "B", "cbstyle"),
               (14, "B", "transform")]


def j2k_header_forged(rng: random.Random, work: Path, ctx: dict) -> str:
    """One field of a bare JPEG 2000 tile's main header (SIZ: sizes, offsets, tiling,
    components, precision, subsampling; COD: layers, decomposition levels, code-block size,
    transform) set to an edge value, digests forged.  The declared geometry is checked before
    anything of its size is allocated; an edit that still decodes to a 3-channel 8-bit image
    of the tile's size is a valid stream (undetectable by design)."""
    level, col, row = rng.choice(_bare_tiles(work, j2k_only=True))
    p = tile_path(work, level, col, row)
    data = bytearray(read_tile(p))
    cod = data.find(b"\xff\x52")
    fields = _SIZ_FIELDS + ([(cod + o, f, n) for o, f, n in _COD_FIELDS] if cod > 0 else [])
    off, fmt, name = rng.choice(fields)
    old, new = _edit_field(rng, data, off, fmt, lambda old, lim: [
        0, 1, old + 1, old - 1, old * 2, old * 1000, lim, lim // 2, rng.randrange(lim + 1)])
    write_tile(p, bytes(data))
    forge(work)
    return f"bare JPEG 2000 tile level {level} ({col},{row}) {name} {old} -> {new}, digests forged"


def bare_wrong_size_forged(rng: random.Random, work: Path, ctx: dict) -> str:
    """A valid JPEG 2000 or JPEG-XL codestream, or a scanner's JPEG carried (in a JPEG-XL
    container or as it is), of another geometry (size, channels) or with 16-bit samples
    (not the JPEGs) in place of a bare tile, digests forged: the decode's geometry and
    sample checks must refuse it."""
    import imagecodecs

    from wsicodec.classical import J2K_SIGNATURE
    from wsicodec.scannertiles import carry, decode_carried, is_carried

    level, col, row = rng.choice(_bare_tiles(work))
    p = tile_path(work, level, col, row)
    data = read_tile(p)
    decode = decode_carried if is_carried(data) else \
        imagecodecs.jpeg2k_decode if data.startswith(J2K_SIGNATURE) else imagecodecs.jpegxl_decode
    h0, w0 = (decode(data, None) if is_carried(data) else decode(data)).shape[:2]
    h, w = rng.choice(((32, 32), (1, 1), (128, 128), (h0, w0 + 1), (h0 + 1, w0), (h0, w0), (h0, w0)))
    deep = rng.random() < 0.3
    channels = rng.choice((1, 3, 4)) if (h, w) != (h0, w0) or deep else rng.choice((1, 4))
    img = np.random.default_rng(rng.getrandbits(32)).integers(0, 65536 if deep else 256, (h, w, channels),
                                                              np.uint16 if deep else np.uint8)
    img = np.ascontiguousarray(img[..., 0] if channels == 1 else img)
    what = rng.choice(("JPEG 2000", "JPEG-XL", "carried JPEG", "JPEG"))
    if what == "JPEG 2000":
        new = bytes(imagecodecs.jpeg2k_encode(img, level=40))
    elif what == "JPEG-XL":
        new = _jxl(img)
    else:                   # 8-bit, 1 or 3 channels: what JPEG holds
        img8 = (img >> 8).astype(np.uint8) if deep else img
        img8 = (img8[..., :3] if img8.ndim == 3 and img8.shape[2] == 4 else img8).copy()   # plain strides
        if (h, w) == (h0, w0) and img8.ndim == 3:       # the tile's size: grey, so another geometry
            img8 = img8[..., 0].copy()                  # (an RGB JPEG of its size is a valid forgery)
        jpeg = bytes(imagecodecs.jpeg8_encode(img8, level=rng.choice((30, 90))))
        new = carry(jpeg) if what == "carried JPEG" else jpeg
        deep, channels = False, 1 if img8.ndim == 2 else 3
    write_tile(p, new)
    forge(work)
    return (f"valid {w}x{h}x{channels} {'16' if deep else '8'}-bit {what} "
            f"in place of bare tile level {level} ({col},{row}), digests forged")
