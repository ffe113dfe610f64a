"""rANS over frozen integer CDF tables: CompressAI's stream format, coded without the GIL.

A table set is a frozen :class:`CdfTables`: row ``i`` is a 16-bit quantised CDF of
``lengths[i]`` entries (the last symbol of each row is the escape symbol that
codes out-of-range values with Elias-gamma bypass bits) and ``offsets[i]`` is the
value of its first symbol.  Each symbol is coded with the row given by its
index.  Both sides must use identical tables *and* indexes; the caller stores a
:func:`symbol_checksum` beside the stream so that a mismatch is caught.

The streams are CompressAI's (``RansEncoder.encode_with_indexes``), byte for byte; the
coder is :mod:`wsicodec.entropy.kernels`, which releases the GIL, so threads code
streams in parallel, and :func:`decode_many` / :func:`encode_many` code many streams in
one call.
"""

from __future__ import annotations

import os
import threading
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from wsicodec.errors import CorruptDataError

#: what the kernels' error codes (:mod:`~wsicodec.entropy.kernels`) say
_ERRORS = {1: "the rANS stream ends before its symbols",
           2: "an escaped value the encoder cannot have written"}


def _kernels():
    """The compiled coder, imported on first use (numba loads in about a second)."""
    from . import kernels
    return kernels


_loading: dict[str, threading.Thread] = {}
_loading_lock = threading.Lock()


def load_in_background(encode: bool = True, decode: bool = False) -> None:
    """Import the coder and load (from numba's disk cache, or compile) its encoding and/or
    decoding kernel on a daemon thread, once per process, so that the first streams a
    codec codes do not wait for numba while the thread that will code them does other work
    (g_a, reading the slide). Safe to call any number of times; a failure there is left
    to the first real call to raise."""
    with _loading_lock:
        for name, wanted in (("encode", encode), ("decode", decode)):
            if wanted and name not in _loading:
                t = threading.Thread(target=_load, args=(name,), daemon=True,
                                     name=f"wsicodec-rans-{name}")
                _loading[name] = t
                t.start()


def _finish_loading() -> None:
    """Wait for the loading threads: a process forked while one holds numba's or an import's
    lock would find that lock held for ever in the child."""
    for t in list(_loading.values()):
        if t.is_alive():
            t.join()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_finish_loading)


def _load(which: str) -> None:
    """Code (``which`` "encode") or decode one symbol with a one-row table: the kernels'
    argument types are the real calls', so those find them compiled."""
    table = CdfTables(np.array([[0, 1 << 15, 1 << 16]], np.int32), np.array([3], np.int32),
                      np.zeros(1, np.int32))
    one = np.zeros(1, np.int32)
    try:
        data = encode_symbols(one, one, table)
        if which == "decode":
            decode_symbols(data, one, table)
    except Exception:  # noqa: BLE001 - the caller's first real call raises it
        pass


@dataclass(frozen=True, eq=False)
class CdfTables:
    """Quantised CDF rows with their lengths and offsets (all int32)."""

    cdfs: np.ndarray      #: (rows, max_length) int32; row i valid up to lengths[i]
    lengths: np.ndarray   #: (rows,) int32
    offsets: np.ndarray   #: (rows,) int32

    def __post_init__(self) -> None:
        if self.cdfs.ndim != 2 or self.lengths.shape != (self.cdfs.shape[0],) \
                or self.offsets.shape != (self.cdfs.shape[0],):
            raise ValueError("CdfTables: cdfs must be (rows, L), lengths and offsets (rows,)")
        for name in ("cdfs", "lengths", "offsets"):
            a = np.ascontiguousarray(getattr(self, name), dtype=np.int32)
            a.setflags(write=False)
            object.__setattr__(self, name, a)
        n = self.lengths
        if n.size and (n.min() < 2 or n.max() > self.cdfs.shape[1]):
            raise ValueError("CdfTables: each row needs 2..max_length entries")

    @property
    def rows(self) -> int:
        return int(self.cdfs.shape[0])


def _flat_int32(a: np.ndarray, what: str) -> np.ndarray:
    a = np.ascontiguousarray(a).reshape(-1)
    if a.dtype != np.int32:
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{what} must be integers, got {a.dtype}")
        a = a.astype(np.int32)
    return a


def _check_index(i: np.ndarray, tables: CdfTables) -> None:
    if i.size and (i.min() < 0 or i.max() >= tables.rows):
        raise ValueError(f"table index out of range 0..{tables.rows - 1}")


def _spans(arrays: Sequence[np.ndarray]) -> np.ndarray:
    starts = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([a.size for a in arrays], out=starts[1:])
    return starts


def encode_many(symbols: Sequence[np.ndarray], indexes: Sequence[np.ndarray],
                tables: CdfTables) -> list[bytes]:
    """One stream per pair: ``symbols[k]`` (any shape) coded with the CDF rows
    ``indexes[k]`` (same size), as :func:`encode_symbols` does each; one call, no GIL."""
    if len(symbols) != len(indexes):
        raise ValueError("encode_many: as many index arrays as symbol arrays")
    s = [_flat_int32(a, "symbols") for a in symbols]
    i = [_flat_int32(a, "indexes") for a in indexes]
    for a, b in zip(s, i):
        if a.shape != b.shape:
            raise ValueError(f"symbols {a.shape} and indexes {b.shape} differ in size")
    spans = _spans(s)
    flat_i = np.concatenate(i) if i else np.zeros(0, np.int32)
    _check_index(flat_i, tables)
    flat_s = np.concatenate(s) if s else np.zeros(0, np.int32)
    kernels = _kernels()
    out = np.empty(kernels.MAX_SYMBOLS_PER_VALUE * flat_s.size + 2 * len(s), dtype="<u4")
    w0, w1 = np.zeros(len(s), np.int64), np.zeros(len(s), np.int64)
    err = kernels.encode_many(flat_s, flat_i, spans, tables.cdfs, tables.lengths, tables.offsets,
                              out, w0, w1)
    if err:
        raise ValueError("a symbol falls on a zero-frequency entry of its CDF row")
    raw = out.view(np.uint8)
    return [raw[4 * a:4 * b].tobytes() for a, b in zip(w0, w1)]


def encode_symbols(symbols: np.ndarray, indexes: np.ndarray, tables: CdfTables) -> bytes:
    """Code ``symbols`` (any shape) with the CDF row ``indexes`` (same shape) of each."""
    return encode_many([symbols], [indexes], tables)[0]


def decode_many(datas: Sequence[bytes], indexes: Sequence[np.ndarray],
                tables: CdfTables) -> list[np.ndarray]:
    """Inverse of :func:`encode_many`: int32 symbols shaped like each ``indexes[k]``, or
    a CorruptDataError in its place for a stream that breaks off or escapes a value no
    encoder writes (a damaged stream may also decode to wrong symbols: check them); one
    call, no GIL."""
    if len(datas) != len(indexes):
        raise ValueError("decode_many: as many index arrays as streams")
    i = [_flat_int32(a, "indexes") for a in indexes]
    spans = _spans(i)
    flat_i = np.concatenate(i) if i else np.zeros(0, np.int32)
    _check_index(flat_i, tables)
    lens = [-(-len(d) // 4) * 4 for d in datas]
    starts = np.zeros(len(datas) + 1, dtype=np.int64)
    np.cumsum(lens, out=starts[1:])
    buf = np.zeros(int(starts[-1]), dtype=np.uint8)     # 4-byte aligned streams, zero-padded
    for d, a in zip(datas, starts):
        buf[a:a + len(d)] = np.frombuffer(d, dtype=np.uint8)
    ends = starts[:-1] + np.asarray(lens, dtype=np.int64)
    out = np.empty(flat_i.size, dtype=np.int32)
    status = np.zeros(len(datas), dtype=np.int32)
    _kernels().decode_many(buf, starts[:-1].copy(), ends, flat_i, spans, tables.cdfs, tables.lengths,
                        tables.offsets, out, status)
    return [CorruptDataError(_ERRORS.get(int(st), "damaged rANS stream")) if st
            else out[a:b].reshape(np.shape(ix))
            for a, b, ix, st in zip(spans[:-1], spans[1:], indexes, status)]


def decode_symbols(data: bytes, indexes: np.ndarray, tables: CdfTables) -> np.ndarray:
    """Inverse of :func:`encode_symbols`: int32 symbols shaped like ``indexes``.  Raises
    CorruptDataError as :func:`decode_many` reports it."""
    out = decode_many([data], [indexes], tables)[0]
    if isinstance(out, CorruptDataError):
        raise out
    return out


def symbol_checksum(*arrays: np.ndarray) -> int:
    """CRC-32 of the int32 little-endian bytes of the given symbol arrays, in order."""
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a, dtype="<i4").tobytes(), crc)
    return crc
