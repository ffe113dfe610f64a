"""CompressAI's rANS coder, compiled by numba without the GIL: the same bytes, arrays in.

A line-for-line port of ``compressai/cpp_exts/rans/rans_interface.cpp`` (compressai
1.2.8: ``RansEncoder.encode_with_indexes`` / ``RansDecoder.decode_with_indexes``) over
Fabian Giesen's ``rans64.h``: 64-bit state, 32-bit words, 16-bit CDF precision, and the
escape symbol (the last of each row) followed by Elias-gamma-like bypass groups of 4 bits.
Streams are interchangeable with CompressAI's in both directions
(``tests/test_entropy.py`` checks both on random and real streams).

Why a port: CompressAI's coder takes Python lists and holds the GIL, so threads decode
one tile at a time and every call converts tables and indexes to lists.  These kernels
take the tables as int32 arrays and release the GIL (``nogil``), so N threads decode N
streams at once, and :func:`decode_many` / :func:`encode_many` code many streams in one
call.  Unlike the C++ decoder (which reads past the end of a truncated stream), a stream
that ends early or whose bypass count cannot come from the encoder reports an error
instead of reading outside its bytes.

Every kernel is compiled on first use (about a second, cached on disk by numba where the
package directory is writable).
"""

from __future__ import annotations

import numpy as np
from numba import njit, uint32, uint64

PRECISION = 16
BYPASS_PRECISION = 4
MAX_BYPASS = (1 << BYPASS_PRECISION) - 1
#: the largest bypass count an encoder writes (a 32-bit raw value in 4-bit groups)
MAX_BYPASS_GROUPS = 8
_L = 1 << 31                      # RANS64_L
#: error codes of the kernels (0: fine; :mod:`~wsicodec.entropy.rans` words them)
OK, ERR_TRUNCATED, ERR_BYPASS, ERR_TABLE = 0, 1, 2, 3

_NB = dict(nogil=True, cache=True, boundscheck=False)


@njit(inline="always", **_NB)
def _bypass_bits(x, words, p, nwords):
    """``Rans64DecGetBits`` of BYPASS_PRECISION bits, then ``Rans64DecRenorm`` (below
    RANS64_L the state takes in the next 32-bit word): (bits, x, p), p -1 where the
    stream has no word left."""
    val = int(x & uint64(MAX_BYPASS))
    x = x >> uint64(BYPASS_PRECISION)
    if x < uint64(_L):
        if p >= nwords:
            return val, x, -1
        x = (x << uint64(32)) | uint64(words[p])
        p += 1
    return val, x, p


@njit(**_NB)
def _decode_one(words, nwords, indexes, cdfs, lengths, offsets, out):
    """Decode ``len(indexes)`` symbols of one stream (``nwords`` uint32 words) into ``out``.
    Returns an error code."""
    mask = uint64((1 << PRECISION) - 1)
    if nwords < 2:
        return ERR_TRUNCATED
    x = uint64(words[0]) | (uint64(words[1]) << uint64(32))
    p = 2
    for i in range(indexes.shape[0]):
        row = indexes[i]
        n = lengths[row]
        max_value = n - 2
        cum = uint32(x & mask)
        # the last entry at or below cum (the C++'s first entry above it, less one; the
        # rows are non-decreasing from 0 to 1 << 16): a binary search
        s, hi = 0, n - 1
        while hi - s > 1:
            mid = (s + hi) >> 1
            if cdfs[row, mid] <= cum:
                s = mid
            else:
                hi = mid
        start = uint64(cdfs[row, s])
        freq = uint64(cdfs[row, s + 1] - cdfs[row, s])
        x = freq * (x >> uint64(PRECISION)) + (x & mask) - start
        if x < uint64(_L):                # Rans64DecRenorm, inline: the hot path
            if p >= nwords:
                return ERR_TRUNCATED
            x = (x << uint64(32)) | uint64(words[p])
            p += 1
        value = s
        if value == max_value:            # bypass mode
            nb = 0
            val = MAX_BYPASS
            first = True
            while first or val == MAX_BYPASS:
                first = False
                val, x, p = _bypass_bits(x, words, p, nwords)
                if p < 0:
                    return ERR_TRUNCATED
                nb += val
                if nb > MAX_BYPASS_GROUPS:
                    return ERR_BYPASS
            raw = 0
            for j in range(nb):
                val, x, p = _bypass_bits(x, words, p, nwords)
                if p < 0:
                    return ERR_TRUNCATED
                raw |= val << (j * BYPASS_PRECISION)
            # the C++ takes raw as int32: a raw value with its top bit set is negative there
            raw32 = raw - (1 << 32) if raw >= (1 << 31) else raw
            value = raw32 >> 1
            if raw32 & 1:
                value = -value - 1
            else:
                value += max_value
            value = _wrap32(value)
        out[i] = _wrap32(value + offsets[row])
    return OK


@njit(**_NB)
def _wrap32(v):
    """``v`` as a C int32 (two's complement wrap-around)."""
    v = v & 0xFFFFFFFF
    return v - (1 << 32) if v >= (1 << 31) else v


@njit(**_NB)
def decode_many(data, starts, ends, indexes, index_starts, cdfs, lengths, offsets, out, status):
    """Decode streams ``k`` = ``data[starts[k]:ends[k]]`` (uint8, each a multiple of 4
    bytes long or padded by the caller) with ``indexes[index_starts[k]:index_starts[k+1]]``
    into the same span of ``out``; ``status[k]``: the stream's error code."""
    for k in range(starts.shape[0]):
        a, b = starts[k], ends[k]
        nw = (b - a) // 4
        words = data[a:a + 4 * nw].view(np.uint32)
        i0, i1 = index_starts[k], index_starts[k + 1]
        status[k] = _decode_one(words, nw, indexes[i0:i1], cdfs, lengths, offsets, out[i0:i1])


@njit(**_NB)
def _symbols(symbols, indexes, cdfs, lengths, offsets, starts, freqs, bypass):
    """The (start, freq, bypass?) of each rANS symbol, in coding order, as CompressAI's
    ``encode_with_indexes`` pushes them; returns how many, or -1 for a zero-frequency
    symbol (tables that cannot code it)."""
    k = 0
    for i in range(symbols.shape[0]):
        row = indexes[i]
        max_value = lengths[row] - 2
        value = symbols[i] - offsets[row]
        raw = 0
        if value < 0:
            raw = (-2 * value - 1) & 0xFFFFFFFF
            value = max_value
        elif value >= max_value:
            raw = (2 * (value - max_value)) & 0xFFFFFFFF
            value = max_value
        f = cdfs[row, value + 1] - cdfs[row, value]
        if f <= 0:
            return -1
        starts[k] = cdfs[row, value]
        freqs[k] = f
        bypass[k] = False
        k += 1
        if value == max_value:
            nb = 0
            while (raw >> (nb * BYPASS_PRECISION)) != 0:
                nb += 1
            val = nb
            while val >= MAX_BYPASS:
                starts[k] = MAX_BYPASS
                freqs[k] = MAX_BYPASS + 1
                bypass[k] = True
                k += 1
                val -= MAX_BYPASS
            starts[k] = val
            freqs[k] = val + 1
            bypass[k] = True
            k += 1
            for j in range(nb):
                starts[k] = (raw >> (j * BYPASS_PRECISION)) & MAX_BYPASS
                freqs[k] = starts[k] + 1
                bypass[k] = True
                k += 1
    return k


@njit(**_NB)
def _flush(starts, freqs, bypass, n, buf):
    """rANS-encode symbols ``n-1 .. 0`` backwards into the end of ``buf`` (uint32);
    returns the index of the first word written."""
    L = uint64(_L)
    x = L
    p = buf.shape[0]
    for k in range(n - 1, -1, -1):
        if not bypass[k]:
            freq = uint64(freqs[k])
            x_max = ((L >> uint64(PRECISION)) << uint64(32)) * freq
            if x >= x_max:
                p -= 1
                buf[p] = uint32(x & uint64(0xFFFFFFFF))
                x = x >> uint64(32)
            x = ((x // freq) << uint64(PRECISION)) + (x % freq) + uint64(starts[k])
        else:
            freq = uint64(1 << (16 - BYPASS_PRECISION))
            x_max = ((L >> uint64(16)) << uint64(32)) * freq
            if x >= x_max:
                p -= 1
                buf[p] = uint32(x & uint64(0xFFFFFFFF))
                x = x >> uint64(32)
            x = (x << uint64(BYPASS_PRECISION)) | uint64(starts[k])
    p -= 2
    buf[p] = uint32(x & uint64(0xFFFFFFFF))
    buf[p + 1] = uint32(x >> uint64(32))
    return p


#: most rANS symbols one coded value can take: itself, its bypass count, 8 groups
MAX_SYMBOLS_PER_VALUE = 1 + 1 + MAX_BYPASS_GROUPS


@njit(**_NB)
def encode_many(symbols, indexes, index_starts, cdfs, lengths, offsets, out, out_starts, out_ends):
    """Encode the spans ``index_starts[k]:index_starts[k+1]`` of ``symbols`` / ``indexes``
    each into its own stream: stream ``k`` is ``out[out_starts[k]:out_ends[k]]`` (uint32
    words; ``out`` has ``MAX_SYMBOLS_PER_VALUE * len + 2`` words per span, from
    ``MAX_SYMBOLS_PER_VALUE * index_starts[k] + 2 * k`` on).  Returns 0, or
    ``ERR_TABLE`` for a value the tables give no room."""
    n_all = symbols.shape[0]
    starts = np.empty(MAX_SYMBOLS_PER_VALUE * n_all + 1, np.int32)
    freqs = np.empty(MAX_SYMBOLS_PER_VALUE * n_all + 1, np.int32)
    bypass = np.empty(MAX_SYMBOLS_PER_VALUE * n_all + 1, np.bool_)
    for k in range(index_starts.shape[0] - 1):
        i0, i1 = index_starts[k], index_starts[k + 1]
        n = _symbols(symbols[i0:i1], indexes[i0:i1], cdfs, lengths, offsets, starts, freqs, bypass)
        if n < 0:
            return ERR_TABLE
        w0 = MAX_SYMBOLS_PER_VALUE * i0 + 2 * k
        w1 = MAX_SYMBOLS_PER_VALUE * i1 + 2 * (k + 1)
        p = _flush(starts, freqs, bypass, n, out[w0:w1])
        out_starts[k] = w0 + p
        out_ends[k] = w1
    return OK
