"""The fuzzing harness's codec-stream forgeries: valid or subtly wrong JPEG-XL tiles and edited
learned tiles (header fields, entropy-coded streams, glass tiles), each written in place of a
tile with every digest forged (:func:`~bench.fuzz_store.forge`), so that only the decoder's own
checks stand between the edit and the pixels. Mutation signature as in ``bench/fuzz_mutations.py``.
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


def _learned_tiles(work: Path, kind: int) -> list[tuple[int, int, int]]:
    out = []
    for level in range(level_count(work)):
        rows, cols = level_grid(work, level)
        for row in range(rows):
            for col in range(cols):
                data = read_tile(tile_path(work, level, col, row))
                if len(data) > 5 and data[:4] == b"WSLT" and data[5] == kind:
                    out.append((level, col, row))
    return out


#: (offset, struct format, name) of a learned network tile's header fields
_LEARNED_FIELDS = [(4, "B", "version"), (5, "B", "kind"), (6, "<H", "height"), (8, "<H", "width"),
                   (10, "<f", "quality"), (14, "8s", "model"), (22, "<I", "crc"),
                   (26, "<I", "z_len"), (30, "B", "top"), (31, "B", "left"),
                   (32, "<H", "coded_height"), (34, "<H", "coded_width")]


def learned_header_forged(rng: random.Random, work: Path, ctx: dict) -> str:
    """One header field of a network-coded learned tile changed, digests forged: what the
    decoder checks (header consistency, geometry, symbol checksum, model id, the tile
    format and quality the container was written with) must catch it."""
    level, col, row = rng.choice(_learned_tiles(work, 0))
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
        lim = {"B": 255, "<H": 65535, "<I": 2 ** 32 - 1}[fmt]
        choices = [old + 1, old - 1, 0, lim, old * 2, rng.randrange(lim + 1)]
        if name == "version":
            choices += [1, 2, 4]
        new = min(max(rng.choice(choices), 0), lim)
        if new == old:
            new = (old + 1) % (lim + 1)
        struct.pack_into(fmt, data, off, new)
    write_tile(p, bytes(data))
    forge(work)
    return f"learned tile level {level} ({col},{row}) {name} {old!r} -> {new!r}, digests forged"


def learned_stream_forged(rng: random.Random, work: Path, ctx: dict) -> str:
    """Bits of a network tile's z or y stream flipped (or the stream cut or grown), digests
    forged: the symbol checksum must catch it."""
    level, col, row = rng.choice(_learned_tiles(work, 0))
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
    level, col, row = rng.choice(_learned_tiles(work, 1) + _learned_tiles(work, 3) + _learned_tiles(work, 4))
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
