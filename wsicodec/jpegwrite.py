"""A baseline JPEG written from quantised DCT coefficients (numpy, no codec library).

libjpeg (through imagecodecs) codes pixels: it cannot be handed the coefficients a scan
was stored with.  :mod:`wsicodec.jpegrecover` finds them from the scan's decoded pixels,
even where the scanner's decode clipped a sample at 0 or 255 (which 8-bit input to libjpeg
cannot express), and writes them here.  What this writes: one frame, baseline (8-bit,
sequential, Huffman), every component at full resolution (sampling 1×1) and on one
quantisation table, the JPEG standard's Annex K Huffman tables (luminance), an Adobe
marker saying the components are R, G, B.  libjpeg-turbo decodes it to exactly what it
decodes from the scanner's own JPEG with those coefficients.
"""

from __future__ import annotations

import struct

import numpy as np

#: zigzag order: ZIGZAG[k] is the natural (row-major) index of the k-th coefficient coded
ZIGZAG = np.array([
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27,
    20, 13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58,
    59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63])
#: Annex K.3: the luminance DC table (code lengths' counts, symbols)
_DC_BITS = (0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0)
_DC_VALS = tuple(range(12))
#: Annex K.3: the luminance AC table
_AC_BITS = (0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7D)
_AC_VALS = bytes.fromhex(
    "01020300041105122131410613516107227114328191a1082342b1c11552d1f02433627282090a161718191a25262728"
    "292a3435363738393a434445464748494a535455565758595a636465666768696a737475767778797a838485868788"
    "898a92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9da"
    "e1e2e3e4e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9fa")
#: APP14 "Adobe", transform 0: the three components are R, G, B (no colour transform)
ADOBE_RGB = b"\xff\xee" + struct.pack(">H5sHHHB", 14, b"Adobe", 100, 0, 0, 0)
#: the largest coefficient magnitude baseline JPEG codes (DC differences up to 2047 too)
MAX_COEFFICIENT = 1023


def _codes(bits: tuple[int, ...], vals) -> tuple[np.ndarray, np.ndarray]:
    """A Huffman table's (code, length) per symbol 0..255 (length 0: no code)."""
    code, length = np.zeros(256, np.int64), np.zeros(256, np.int64)
    c, k = 0, 0
    for n, count in enumerate(bits, start=1):
        for _ in range(count):
            code[vals[k]], length[vals[k]] = c, n
            c, k = c + 1, k + 1
        c <<= 1
    return code, length


_DC_CODE, _DC_LEN = _codes(_DC_BITS, _DC_VALS)
_AC_CODE, _AC_LEN = _codes(_AC_BITS, _AC_VALS)


def _size(v: np.ndarray) -> np.ndarray:
    """The magnitude category of each value (bits of |v|; 0 for 0)."""
    a = np.abs(v).astype(np.int64)
    out = np.zeros(a.shape, np.int64)
    nz = a > 0
    out[nz] = np.floor(np.log2(a[nz])).astype(np.int64) + 1
    return out


def _extra(v: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The extra bits of each value of category ``s`` (negative: ones' complement)."""
    return np.where(v >= 0, v, v + (1 << s) - 1).astype(np.int64)


def _scan(blocks: np.ndarray) -> bytes:
    """The entropy-coded segment of ``blocks`` ((n, 64) int, zigzag order, in coding
    order: MCU by MCU, component by component; DC already differenced), byte-stuffed."""
    n = len(blocks)
    keys, values, lengths = [], [], []
    idx = np.arange(n, dtype=np.int64)
    # DC: code of its category, then its bits
    dc = blocks[:, 0]
    s = _size(dc)
    keys += [idx * 4096, idx * 4096 + 1]
    values += [_DC_CODE[s], _extra(dc, s)]
    lengths += [_DC_LEN[s], s]
    # AC: each nonzero after a run of zeros (a ZRL per 16 of them), then EOB unless at 63
    ac = blocks[:, 1:]
    b, p = np.nonzero(ac)
    v = ac[b, p]
    first = np.ones(len(b), bool)
    first[1:] = b[1:] != b[:-1]
    prev = np.where(first, -1, np.concatenate([[0], p[:-1]]))
    run = p - prev - 1
    zrl = run // 16
    r = run % 16
    s = _size(v)
    sym = (r << 4) | s
    base = b * 4096 + (p + 1) * 32
    zb = np.repeat(base, zrl) + (np.arange(zrl.sum()) - np.repeat(np.cumsum(zrl) - zrl, zrl))
    keys += [zb, base + 8, base + 9]
    values += [np.full(len(zb), _AC_CODE[0xF0]), _AC_CODE[sym], _extra(v, s)]
    lengths += [np.full(len(zb), _AC_LEN[0xF0]), _AC_LEN[sym], s]
    last = np.full(n, -1, np.int64)
    np.maximum.at(last, b, p)                                  # the last nonzero's position
    eob = idx[last < 62]
    keys.append(eob * 4096 + 64 * 32)
    values.append(np.full(len(eob), _AC_CODE[0x00]))
    lengths.append(np.full(len(eob), _AC_LEN[0x00]))
    key, val, ln = (np.concatenate(a) for a in (keys, values, lengths))
    order = np.argsort(key, kind="stable")
    val, ln = val[order], ln[order]
    keep = ln > 0
    val, ln = val[keep], ln[keep]
    # the bits, most significant first, padded with ones to a whole byte
    item = np.repeat(np.arange(len(ln)), ln)
    pos = np.arange(len(item)) - np.repeat(np.cumsum(ln) - ln, ln)
    bits = (val[item] >> (ln[item] - 1 - pos)) & 1
    bits = np.concatenate([bits, np.ones(-len(bits) % 8, np.int64)]).astype(np.uint8)
    data = np.packbits(bits)
    ff = np.flatnonzero(data == 0xFF)
    return np.insert(data, ff + 1, 0).tobytes()


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def write_rgb(coefficients: np.ndarray, table: np.ndarray, height: int, width: int) -> bytes:
    """A baseline JPEG of R, G, B components (Adobe transform 0), each at full resolution
    and quantised by ``table`` ((8, 8) int, natural order, 1..255), holding
    ``coefficients``: (3, rows, cols, 8, 8) int quantised coefficients, natural order, the
    blocks covering ``height`` × ``width``.  Raises ValueError for coefficients or sizes
    baseline JPEG cannot hold."""
    c = np.asarray(coefficients, np.int64)
    rows, cols = -(-height // 8), -(-width // 8)
    if c.shape != (3, rows, cols, 8, 8):
        raise ValueError(f"coefficients of shape {c.shape}, not (3, {rows}, {cols}, 8, 8)")
    if np.abs(c).max(initial=0) > MAX_COEFFICIENT or not (1 <= table.min() and table.max() <= 255):
        raise ValueError("a coefficient or table entry out of baseline JPEG's range")
    if not (0 < height <= 65535 and 0 < width <= 65535):
        raise ValueError(f"a {width} x {height} frame")
    z = c.reshape(3, rows * cols, 64)[:, :, ZIGZAG]
    z[:, :, 0] = np.diff(z[:, :, 0], axis=1, prepend=0)          # DC: from the last block's
    if np.abs(z[:, :, 0]).max(initial=0) > 2 * MAX_COEFFICIENT + 1:
        raise ValueError("a DC difference out of baseline JPEG's range")
    blocks = z.transpose(1, 0, 2).reshape(-1, 64)                # MCU by MCU: R, G, B
    dqt = bytes([0]) + bytes(np.asarray(table).reshape(64)[ZIGZAG].astype(np.uint8))
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"".join(bytes([i + 1, 0x11, 0]) for i in range(3))
    dht = (bytes([0x00]) + bytes(_DC_BITS) + bytes(_DC_VALS)
           + bytes([0x10]) + bytes(_AC_BITS) + _AC_VALS)
    sos = bytes([3]) + b"".join(bytes([i + 1, 0x00]) for i in range(3)) + bytes([0, 63, 0])
    return (b"\xff\xd8" + ADOBE_RGB + _segment(0xDB, dqt) + _segment(0xC0, sof)
            + _segment(0xC4, dht) + _segment(0xDA, sos) + _scan(blocks) + b"\xff\xd9")
