"""JPEG-XL at a PSNR target: the largest butteraugli distance whose decoded tile reaches it.

The ``auto`` codec (:mod:`wsicodec.learned.choice`) stores a tile as JPEG-XL where the
network cannot reach the fidelity floor, or where JPEG-XL reaches the network's PSNR in
fewer bytes.  libjxl has no PSNR target, so :func:`fit_jpegxl` walks a fixed ladder of
distances (:data:`DISTANCES`, √2 apart, 0.1 to 25) from a starting rung, measuring the
decoded tile each time, tries the geometric mean of the last two rungs it brackets the
target with, and falls back to lossless JPEG-XL: every target is reachable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: the distances tried, smallest (best) first: 0.1 · √2^k, and libjxl's largest, 25
DISTANCES = tuple(round(0.1 * 2 ** (k / 2), 4) for k in range(16)) + (25.0,)
#: where a search starts when the caller has no better guess: distance 1.6
DEFAULT_START = 8


def start_for(target: float) -> int:
    """The rung a search for ``target`` dB starts at: where JPEG-XL typically lands on H&E
    (distance 1.6 near 33 dB, a rung (√2) per 1.5 dB).  A function of the target alone,
    so a tile's coding never depends on the tiles coded before it."""
    if not math.isfinite(target):
        return 0
    return min(max(round(DEFAULT_START + (33.0 - target) / 1.5), 0), len(DISTANCES) - 1)


def tile_psnr(decoded: np.ndarray, source: np.ndarray, valid: tuple[int, int]) -> float:
    """PSNR (dB, RGB, peak 255) of ``decoded`` against ``source`` over their top-left
    ``valid`` = (height, width) pixels (a tile's part inside its level); inf when equal."""
    h, w = valid
    d = decoded[:h, :w, :3].astype(np.float64) - source[:h, :w, :3]
    mse = float(np.mean(d * d))
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0 ** 2 / mse)


@dataclass(frozen=True)
class JxlFit:
    """A JPEG-XL coding of a tile: its bytes, the decoded pixels, their PSNR against the
    tile, and the rung of :data:`DISTANCES` (``lossless``: none, coded losslessly)."""

    data: bytes
    pixels: np.ndarray
    psnr: float
    index: int
    lossless: bool = False
    #: the bytes JPEG-XL would take at exactly the target PSNR: interpolated (log bytes,
    #: linear in dB) between this coding and the nearest one missing the target; its own
    #: size where none was made
    equal_bytes: float = math.nan

    def __post_init__(self) -> None:
        if math.isnan(self.equal_bytes):
            object.__setattr__(self, "equal_bytes", float(len(self.data)))


def encode_at(tile: np.ndarray, index: int, valid: tuple[int, int], effort: int,
              distance: float | None = None) -> JxlFit:
    """``tile`` coded at distance ``DISTANCES[index]`` (``index`` -1: lossless; ``distance``:
    that distance instead, the fit still filed under rung ``index``) and decoded."""
    import imagecodecs

    if index < 0:
        data = bytes(imagecodecs.jpegxl_encode(tile, lossless=True, effort=effort, numthreads=1))
    else:
        d = DISTANCES[index] if distance is None else distance
        data = bytes(imagecodecs.jpegxl_encode(tile, distance=d, effort=effort, numthreads=1))
    pixels = np.asarray(imagecodecs.jpegxl_decode(data, numthreads=1))
    return JxlFit(data, pixels, tile_psnr(pixels, tile, valid), index, index < 0)


def _between(tile: np.ndarray, passing: JxlFit, failing: JxlFit, target: float,
             valid: tuple[int, int], effort: int) -> JxlFit:
    """``passing`` (a rung reaching ``target``), or the coding at the geometric mean of its
    distance and ``failing``'s (the next rung up) when that reaches it in fewer bytes."""
    d = math.sqrt(DISTANCES[passing.index] * DISTANCES[failing.index])
    mid = encode_at(tile, passing.index, valid, effort, distance=d)
    if mid.psnr >= target and len(mid.data) < len(passing.data):
        return _with_equal_bytes(mid, failing, target)
    return _with_equal_bytes(passing, mid if mid.psnr < target else failing, target)


def _with_equal_bytes(passing: JxlFit, failing: JxlFit, target: float) -> JxlFit:
    """``passing`` with :attr:`JxlFit.equal_bytes` interpolated toward ``failing``."""
    from dataclasses import replace

    bp, bf = len(passing.data), len(failing.data)
    if not (math.isfinite(passing.psnr) and passing.psnr > failing.psnr and bf > 0):
        return passing
    t = (passing.psnr - target) / (passing.psnr - failing.psnr)
    return replace(passing, equal_bytes=bp * (bf / bp) ** min(max(t, 0.0), 1.0))


def fit_jpegxl(tile: np.ndarray, target: float, valid: tuple[int, int] | None = None, *,
               effort: int = 7, start: int = DEFAULT_START, budget: int | None = None
               ) -> JxlFit | None:
    """The coding of ``tile`` ((h, w, 3) uint8) at the largest distance of
    :data:`DISTANCES` whose PSNR over ``valid`` reaches ``target`` dB, or lossless when
    none does (so never None without a ``budget``).  The walk starts at rung ``start``.

    ``budget``: the caller has another coding of this many bytes; None is returned as
    soon as no coding reaching ``target`` can be smaller (a rung that misses the target
    already takes ``budget`` bytes or more: smaller distances only take more).
    """
    valid = valid or tile.shape[:2]
    i = min(max(int(start), 0), len(DISTANCES) - 1)
    f = encode_at(tile, i, valid, effort)
    if f.psnr >= target:
        while f.index + 1 < len(DISTANCES):
            g = encode_at(tile, f.index + 1, valid, effort)
            if g.psnr < target:
                return _between(tile, f, g, target, valid, effort)
            if len(g.data) > len(f.data):
                break
            f = g
        return f
    while True:
        if budget is not None and len(f.data) >= budget:
            return None
        if f.index <= 0:
            break
        g = encode_at(tile, f.index - 1, valid, effort)
        if g.psnr >= target:
            return _between(tile, g, f, target, valid, effort)
        f = g
    g = encode_at(tile, -1, valid, effort)
    if budget is not None and len(g.data) >= budget:
        return None
    return g
