"""rANS over frozen integer CDF tables, through CompressAI's C++ coder.

A table set is a frozen :class:`CdfTables`: row ``i`` is a 16-bit quantised CDF of
``lengths[i]`` entries (the last symbol of each row is the escape symbol that
codes out-of-range values with Elias-gamma bypass bits) and ``offsets[i]`` is the
value of its first symbol.  Each symbol is coded with the row given by its
index.  Both sides must use identical tables *and* indexes; the caller stores a
:func:`symbol_checksum` beside the stream so that a mismatch is caught.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

PRECISION = 16


def _coder():
    from .._compressai import load

    load()
    from compressai import ans  # the C++ extension; imported on first use only
    return ans


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
        # The coder takes Python lists; convert once and keep them.
        object.__setattr__(self, "_lists", (
            [row[:n].tolist() for row, n in zip(self.cdfs, self.lengths)],
            self.lengths.tolist(), self.offsets.tolist()))

    @property
    def rows(self) -> int:
        return int(self.cdfs.shape[0])

    def as_lists(self) -> tuple[list[list[int]], list[int], list[int]]:
        return self._lists  # type: ignore[attr-defined]


def _flat_int32(a: np.ndarray, what: str) -> np.ndarray:
    a = np.ascontiguousarray(a).reshape(-1)
    if a.dtype != np.int32:
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{what} must be integers, got {a.dtype}")
        a = a.astype(np.int32)
    return a


def encode_symbols(symbols: np.ndarray, indexes: np.ndarray, tables: CdfTables) -> bytes:
    """Code ``symbols`` (any shape) with the CDF row ``indexes`` (same shape) of each."""
    s, i = _flat_int32(symbols, "symbols"), _flat_int32(indexes, "indexes")
    if s.shape != i.shape:
        raise ValueError(f"symbols {s.shape} and indexes {i.shape} differ in size")
    if i.size and (i.min() < 0 or i.max() >= tables.rows):
        raise ValueError(f"table index out of range 0..{tables.rows - 1}")
    cdfs, lengths, offsets = tables.as_lists()
    return _coder().RansEncoder().encode_with_indexes(s.tolist(), i.tolist(), cdfs, lengths, offsets)


def decode_symbols(data: bytes, indexes: np.ndarray, tables: CdfTables) -> np.ndarray:
    """Inverse of :func:`encode_symbols`: int32 symbols shaped like ``indexes``."""
    i = _flat_int32(indexes, "indexes")
    if i.size and (i.min() < 0 or i.max() >= tables.rows):
        raise ValueError(f"table index out of range 0..{tables.rows - 1}")
    cdfs, lengths, offsets = tables.as_lists()
    out = _coder().RansDecoder().decode_with_indexes(bytes(data), i.tolist(), cdfs, lengths, offsets)
    return np.asarray(out, dtype=np.int32).reshape(np.shape(indexes))


def symbol_checksum(*arrays: np.ndarray) -> int:
    """CRC-32 of the int32 little-endian bytes of the given symbol arrays, in order."""
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a, dtype="<i4").tobytes(), crc)
    return crc
