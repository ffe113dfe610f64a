"""JPEG-XL at a PSNR target: a butteraugli distance whose decoded tile just reaches it.

The ``auto`` codec (:mod:`wsicodec.learned.choice`) stores a tile as JPEG-XL where the
network cannot reach the fidelity floor, or where JPEG-XL reaches the network's PSNR in
fewer bytes.  libjxl has no PSNR target, so :func:`fit_jpegxl` searches the distance:

1. **Search, at a cheaper effort** (:data:`SEARCH_EFFORT`, or the caller's effort when that
   is lower).  libjxl's efforts 5 and 7 make nearly the same bytes and PSNR at a distance on
   H&E (one effort-7 coding costs about two effort-5 ones with their decodes), so the search
   runs where it is cheap.  In x = log2(distance) PSNR falls about linearly
   (:data:`DB_PER_DOUBLING` as the prior slope): the first coding is at the distance the
   target and the tile's texture predict (:func:`start_distance`), then a secant step (the
   slope measured on the tile itself once two codings exist), then interpolation inside the
   bracket of the nearest passing and failing codings, until a passing one is within
   :data:`TOLERANCE` dB of the target.
2. **The coding kept is made at the caller's effort** at the largest passing distance found,
   and measured: its PSNR is exact, never the search's.  Where effort changes the PSNR
   enough to miss the target, the distance is lowered in small steps; lossless JPEG-XL is the
   last resort, so every target is reachable.

Every step is a function of the tile and the target alone: a tile codes the same in any run
(resume and cluster runs rely on it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

#: libjxl's distance range (0.1: nearly lossless; 25: the coarsest)
MIN_DISTANCE, MAX_DISTANCE = 0.1, 25.0
#: the least :func:`texture` a tile is given (a flat tile's log stays finite)
MIN_TEXTURE = 0.05
#: :func:`start_distance` from a tile's texture: log2 distance = a + b ln(texture) + c target
#: (``bench/results/jxl_start.json``: least squares on he/train crops at 1x, 2x and 4x with
#: stain and scanner-coding augmentation; on the evaluation sets' tiles its error is 0.3-0.7
#: in log2 distance, against 1.0-1.5 for the start from the target alone)
START_FIT = (16.8983, -1.6853, -0.3280)
#: the prior slope of PSNR against log2(distance) on H&E tiles, dB per doubling
DB_PER_DOUBLING = 3.0
#: the effort the search codes at (the kept coding uses the caller's effort)
SEARCH_EFFORT = 5
#: a passing search coding within this many dB above the target ends the search
TOLERANCE = 0.25
#: at most this many search codings per fit
MAX_SEARCH = 6
#: the step (in log2 distance) the kept coding backs off by when it misses the target
BACKOFF = 0.125

_X_MIN, _X_MAX = math.log2(MIN_DISTANCE), math.log2(MAX_DISTANCE)


def start_distance(target: float, tile_texture: float | None = None) -> float:
    """The distance a search for ``target`` dB starts at.  With the tile's
    :func:`texture`: log2 distance linear in the target and in ln(texture)
    (:data:`START_FIT`, fitted on augmented ``he/train`` crops by ``bench/jxl_start.py``);
    without: where JPEG-XL typically lands on H&E (distance 1.6 near 33 dB,
    :data:`DB_PER_DOUBLING` per doubling)."""
    if not math.isfinite(target):
        return MIN_DISTANCE
    if tile_texture is None:
        x = math.log2(1.6) + (33.0 - target) / DB_PER_DOUBLING
    else:
        a, b, c = START_FIT
        x = a + b * math.log(max(tile_texture, MIN_TEXTURE)) + c * target
    return min(max(2.0 ** x, MIN_DISTANCE), MAX_DISTANCE)


def texture(tile: np.ndarray, valid: tuple[int, int]) -> float:
    """A tile's texture: the mean absolute difference of neighbouring grey levels (mean of
    R, G, B) across and down its ``valid`` part, at least :data:`MIN_TEXTURE`.  JPEG-XL's
    error at a distance grows with it (:func:`start_distance`)."""
    h, w = valid
    g = tile[:h, :w, :3].astype(np.float32).mean(axis=2)
    t = 0.0
    if w > 1:
        t += float(np.abs(np.diff(g, axis=1)).mean())
    if h > 1:
        t += float(np.abs(np.diff(g, axis=0)).mean())
    return max(t, MIN_TEXTURE)


def tile_psnr(decoded: np.ndarray, source: np.ndarray, valid: tuple[int, int]) -> float:
    """PSNR (dB, RGB, peak 255) of ``decoded`` against ``source`` over their top-left
    ``valid`` = (height, width) pixels (a tile's part inside its level); inf when equal."""
    h, w = valid
    d = decoded[:h, :w, :3].astype(np.float64) - source[:h, :w, :3]
    mse = float(np.mean(d * d))
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0 ** 2 / mse)


@dataclass(frozen=True)
class TileFit:
    """A classical coding of a tile at a PSNR target: its bytes, the decoded pixels, their
    PSNR against the tile, its ``codec`` ("jpegxl" or "jpeg2000", :mod:`.j2kfit`) and that
    codec's ``setting`` (JPEG-XL's distance, None: coded losslessly; JPEG 2000's target
    level in dB)."""

    data: bytes
    #: None once the auto encoder keeps the coding only for its bytes (a fix-up's stand-by)
    pixels: np.ndarray | None
    psnr: float
    setting: float | None
    #: the bytes this codec would take at exactly the target PSNR: this coding's size scaled
    #: down along the tile's own bytes-against-PSNR slope (log bytes linear in dB, measured
    #: between the search's nearest passing and failing codings); its own size where no
    #: slope was measured
    equal_bytes: float = math.nan
    codec: str = "jpegxl"
    #: how this codec's bytes grow with PSNR on this tile: d ln(bytes) / d dB between the
    #: search's nearest passing and failing codings (nan: not measured)
    rate_slope: float = math.nan

    def __post_init__(self) -> None:
        if math.isnan(self.equal_bytes):
            object.__setattr__(self, "equal_bytes", float(len(self.data)))

    @property
    def lossless(self) -> bool:
        return self.codec == "jpegxl" and self.setting is None


def encode_at(tile: np.ndarray, distance: float | None, valid: tuple[int, int], effort: int) -> TileFit:
    """``tile`` coded at ``distance`` (None: lossless) and decoded."""
    import imagecodecs

    if distance is None:
        data = bytes(imagecodecs.jpegxl_encode(tile, lossless=True, effort=effort, numthreads=1))
    else:
        data = bytes(imagecodecs.jpegxl_encode(tile, distance=distance, effort=effort, numthreads=1))
    pixels = np.asarray(imagecodecs.jpegxl_decode(data, numthreads=1))
    return TileFit(data, pixels, tile_psnr(pixels, tile, valid), distance)


def _x(f: TileFit) -> float:
    return math.log2(f.setting) if f.setting is not None else -math.inf


def _next_x(passing: TileFit | None, failing: TileFit | None, tried: list[TileFit], aim: float) -> float:
    """Where to code next, aiming at ``aim`` dB: inside the bracket when there is one, else
    a secant step from the nearest coding (the tile's own slope once two codings exist)."""
    if passing is not None and failing is not None:
        lo, hi = _x(passing), _x(failing)
        t = (passing.psnr - aim) / (passing.psnr - failing.psnr) if math.isfinite(passing.psnr) else 0.5
        return lo + (hi - lo) * min(max(t, 0.2), 0.8)
    slope = DB_PER_DOUBLING
    if len(tried) >= 2:
        a, b = tried[-2], tried[-1]
        if math.isfinite(a.psnr) and math.isfinite(b.psnr) and _x(a) != _x(b):
            slope = min(max((a.psnr - b.psnr) / (_x(b) - _x(a)), 1.0), 10.0)
    near = passing if passing is not None else failing
    assert near is not None
    if not math.isfinite(near.psnr):
        return _X_MAX
    step = (near.psnr - aim) / slope
    step = max(step, 0.25) if near is passing else min(step, -0.25)
    return min(max(_x(near) + step, _X_MIN), _X_MAX)


def _search(tile: np.ndarray, target: float, valid: tuple[int, int], effort: int, start: float,
            budget: int | None) -> tuple[TileFit | None, TileFit | None, bool]:
    """(largest passing, smallest failing above it) search codings, and whether the budget
    ruled JPEG-XL out.  ``passing`` is None when even :data:`MIN_DISTANCE` misses."""
    aim = target + TOLERANCE / 2
    tried: list[TileFit] = []
    x = math.log2(min(max(start, MIN_DISTANCE), MAX_DISTANCE))
    passing = failing = None
    for _ in range(MAX_SEARCH):
        f = encode_at(tile, 2.0 ** x, valid, effort)
        tried.append(f)
        if f.psnr < target and budget is not None and len(f.data) >= budget:
            return None, f, True        # smaller distances only take more bytes
        ok = [g for g in tried if g.psnr >= target]
        passing = max(ok, key=_x) if ok else None
        above = [g for g in tried if g.psnr < target and (passing is None or _x(g) > _x(passing))]
        failing = min(above, key=_x) if above else None
        if passing is not None and (passing.psnr - target <= TOLERANCE or _x(passing) >= _X_MAX
                                    or (failing is not None and _x(failing) - _x(passing) < 0.05)):
            break
        if passing is None and failing is not None and _x(failing) <= _X_MIN:
            break
        nx = _next_x(passing, failing, tried, aim)
        if any(abs(nx - _x(g)) < 1e-3 for g in tried):
            break
        x = nx
    return passing, failing, False


def rate_slope(passing: TileFit, failing: TileFit | None) -> float:
    """d ln(bytes) / d dB between two codings of a tile (:attr:`TileFit.rate_slope`): nan
    where they cannot say (no failing coding, an exact one, no PSNR between them)."""
    if failing is None or not (math.isfinite(passing.psnr) and math.isfinite(failing.psnr)) \
            or passing.psnr <= failing.psnr or len(failing.data) <= 0:
        return math.nan
    return math.log(len(passing.data) / len(failing.data)) / (passing.psnr - failing.psnr)


def equal_bytes(kept: TileFit, passing: TileFit, failing: TileFit | None, target: float) -> float:
    """:attr:`TileFit.equal_bytes` of ``kept``: its size at exactly ``target`` along the slope
    of log bytes against PSNR between the search's ``passing`` and ``failing`` codings."""
    k = rate_slope(passing, failing)
    if math.isnan(k) or not math.isfinite(kept.psnr):
        return float(len(kept.data))
    return len(kept.data) * math.exp(-max(k, 0.0) * max(kept.psnr - target, 0.0))


def measured(kept: TileFit, passing: TileFit, failing: TileFit | None, target: float) -> TileFit:
    """``kept`` with its :attr:`TileFit.equal_bytes` at ``target`` and its
    :attr:`TileFit.rate_slope`, from the search's ``passing`` and ``failing`` codings."""
    return replace(kept, equal_bytes=equal_bytes(kept, passing, failing, target),
                   rate_slope=rate_slope(passing, failing))


def fit_jpegxl(tile: np.ndarray, target: float, valid: tuple[int, int] | None = None, *,
               effort: int = 7, start: float | None = None, budget: int | None = None
               ) -> TileFit | None:
    """A coding of ``tile`` ((h, w, 3) uint8) at ``effort`` whose PSNR over ``valid`` reaches
    ``target`` dB, at the largest distance the search found (module docstring), or lossless
    when no distance reaches it (so never None without a ``budget``).  ``start``: the
    distance the search begins at (default :func:`start_distance` from the tile's texture).

    ``budget``: the caller has another coding of this many bytes; None is returned where
    JPEG-XL cannot undercut it: as soon as a coding that misses the target takes ``budget``
    bytes or more (smaller distances only take more), or when the kept coding's
    :attr:`TileFit.equal_bytes` do.
    """
    valid = valid or tile.shape[:2]
    search = min(effort, SEARCH_EFFORT)
    passing, failing, over = _search(tile, target, valid, search,
                                     start_distance(target, texture(tile, valid)) if start is None else start,
                                     budget)
    if over:
        return None
    kept = None
    if passing is not None:
        kept = passing if search == effort else encode_at(tile, passing.setting, valid, effort)
        x = _x(passing)
        while kept.psnr < target and x - BACKOFF >= _X_MIN:
            x -= BACKOFF
            kept = encode_at(tile, 2.0 ** x, valid, effort)
            if budget is not None and len(kept.data) >= budget and kept.psnr < target:
                return None
        if kept.psnr >= target:
            kept = measured(kept, passing, failing, target)
    if kept is None or kept.psnr < target:
        kept = encode_at(tile, None, valid, effort)
    return None if budget is not None and kept.equal_bytes >= budget else kept
