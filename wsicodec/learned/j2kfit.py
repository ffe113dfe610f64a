"""JPEG 2000 at a PSNR target: the OpenJPEG fixed-quality level whose decoded tile just reaches it.

The ``auto`` codec (:mod:`wsicodec.learned.choice`) fits both classical codecs to a tile's
target and keeps the one with fewer bytes at that PSNR.  OpenJPEG's fixed-quality mode
(the irreversible 9/7 wavelet, :class:`wsicodec.classical.Jpeg2000Codec`) already takes a
target in dB, but measures it in its own colour space per component, so the RGB PSNR of
the decoded tile lands a little off it: 0.8 dB under to 0.4 dB over on H&E tiles, about
the same offset for every level of one tile.  The search therefore measures each coding
and moves the level by what it missed (slope 1 dB per dB), then interpolates inside the
bracket of the nearest passing and failing codings, until a passing coding is within
:data:`TOLERANCE` dB of the target.  OpenJPEG truncates at coding-pass boundaries, so
nearby levels can make the very same coding (a plateau up to ~1 dB wide): a move that
changed nothing is doubled.

**Glass at its edges.** JPEG 2000 at a PSNR target spends its bits on texture and leaves
flat, bright areas (glass) further from the source than JPEG-XL does, each tile with its
own smooth offset, so where glass crosses from one JPEG 2000 tile into the next the tile
grid shows as steps of one or two grey levels in a viewer (``bench/grid_steps.py``).  A
coding is therefore also held on the glass (:func:`flat_bright`) within :data:`EDGE_BAND`
px of the tile's edges: its mean absolute grey error there must not exceed the JPEG-XL
coding's of the same tile (the caller's ``reference``), nor :data:`EDGE_TOLERANCE` where
that is lower or there is none; where the PSNR fit misses that, the level is raised in
:data:`EDGE_STEP` dB steps, and a tile that still misses it after :data:`EDGE_TRIES` steps
is left to JPEG-XL.  JPEG 2000 then never shows the grid more than JPEG-XL would.

**Its borders, in tissue too.** The wavelet's symmetric extension at a tile's edge leaves
JPEG 2000's outermost pixels further off than its interior, whose error is smooth: where
two independently coded tiles meet, the error jumps across the border far more than
between neighbouring pixels inside (``bench/error_steps.py``), and the seam shows.  A
coding's :func:`ring_ratio` (the error on its outermost pixels against the error step
between neighbouring pixels inside, ~ the border's step against the inside's) is
therefore held to the reference coding's, or :data:`RING_RATIO` where that is more or
there is none; a coding that misses it gives way at once (a higher level does not lower
the ratio: it measured flat or rising from 32 to 44 dB on tcga and he/test tiles).

Unlike JPEG-XL it has no lossless last resort here: irreversible JPEG 2000 tops out near
50 dB, and a target it cannot reach (or cannot reach under a caller's byte budget) gives
None, so the caller keeps JPEG-XL.  Every step is a function of the tile and the target
alone: a tile codes the same in any run (resume and cluster runs rely on it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .jxlfit import TileFit, equal_bytes, tile_psnr

#: the levels (dB) :class:`wsicodec.classical.Jpeg2000Codec` takes
MIN_LEVEL, MAX_LEVEL = 10.0, 80.0
#: the first coding's level above the target: OpenJPEG lands this far under it on H&E
#: tiles scanned as JPEG 2000, and about as far over on tiles scanned as JPEG
START_OFFSET = 0.5
#: a passing coding within this many dB above the target ends the search
TOLERANCE = 0.25
#: at most this many codings per fit
MAX_CODINGS = 5
#: a move of the level smaller than this (dB) is not tried
MIN_STEP = 0.05
#: glass (:func:`flat_bright`): grey (mean of R, G, B) at least this bright ...
GLASS_GREY = 200.0
#: ... and at most this local standard deviation of grey (5x5 window), levels
GLASS_FLAT = 3.0
#: the edge band a coding's glass accuracy is held in, px from each edge of the tile
EDGE_BAND = 2
#: the mean absolute grey error on the glass of that band always allowed, levels (about
#: JPEG-XL's median there at 32 dB on the shared slides' tiles); below
#: :data:`EDGE_MIN_PIXELS` glass pixels in the band nothing is held
EDGE_TOLERANCE = 0.45
EDGE_MIN_PIXELS = 64
#: the :func:`ring_ratio` always allowed (about JPEG-XL's median on tcga tiles at 32-40 dB,
#: 1.8-2.2 on he/test's; JPEG 2000's is 1.8-2.0 and 4-5.4 there)
RING_RATIO = 1.5
#: a first coding whose ratio exceeds the bound this many times over ends the fit there (the
#: ratio moves by less than that from level to level near a target)
RING_EARLY = 1.5
#: the level is raised by this many dB a step, at most :data:`EDGE_TRIES` times
EDGE_STEP = 1.5
EDGE_TRIES = 4
#: codings under the target that gain less than this per dB of level, over at least
#: :data:`SATURATION_SPAN` dB, end the search (the wavelet's top is near)
SATURATED = 0.25
SATURATION_SPAN = 2.0


def local_std(g: np.ndarray, k: int = 5) -> np.ndarray:
    """Standard deviation of ``g`` (2-D) over k x k windows (edge-replicated), by box sums."""
    pad = k // 2
    p = np.pad(g, pad, mode="edge")
    c1 = np.cumsum(np.cumsum(np.pad(p, ((1, 0), (1, 0))), 0), 1)
    c2 = np.cumsum(np.cumsum(np.pad(p * p, ((1, 0), (1, 0))), 0), 1)

    def box(c: np.ndarray) -> np.ndarray:
        return c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]

    n = k * k
    mean = box(c1) / n
    return np.sqrt(np.maximum(box(c2) / n - mean * mean, 0.0))


def flat_bright(grey: np.ndarray, bright: float = GLASS_GREY, flat: float = GLASS_FLAT) -> np.ndarray:
    """Where ``grey`` (2-D, levels) is glass: at least ``bright`` and locally flat (5x5
    standard deviation at most ``flat``)."""
    return (grey >= bright) & (local_std(grey) <= flat)


def edge_glass_mask(tile: np.ndarray, valid: tuple[int, int]) -> np.ndarray | None:
    """The glass pixels of ``tile`` within :data:`EDGE_BAND` px of the edges of its
    ``valid`` part, or None where there are fewer than :data:`EDGE_MIN_PIXELS`."""
    h, w = valid
    grey = tile[:h, :w, :3].astype(np.float64).mean(axis=2)
    band = np.zeros((h, w), bool)
    band[:EDGE_BAND], band[-EDGE_BAND:], band[:, :EDGE_BAND], band[:, -EDGE_BAND:] = True, True, True, True
    mask = flat_bright(grey) & band
    return mask if int(mask.sum()) >= EDGE_MIN_PIXELS else None


def edge_error(pixels: np.ndarray, tile: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute grey error of ``pixels`` against ``tile`` over ``mask``, levels."""
    h, w = mask.shape
    d = pixels[:h, :w, :3].astype(np.float64).mean(axis=2) - tile[:h, :w, :3].astype(np.float64).mean(axis=2)
    return float(np.abs(d[mask]).mean())


def ring_ratio(pixels: np.ndarray, tile: np.ndarray, valid: tuple[int, int]) -> float:
    """How far a coding's error at the tile's outermost pixels stands out: √2 × the mean
    absolute error on the 1-px ring of the ``valid`` part, over the mean absolute step of
    the error between horizontally and vertically adjacent pixels inside it (RGB means).
    Two tiles with independent errors of that size meet in steps about this many times
    their inside steps.  0 for a tile under 3x3 px or with no error inside."""
    h, w = valid
    if h < 3 or w < 3:
        return 0.0
    e = pixels[:h, :w, :3].astype(np.float64) - tile[:h, :w, :3]
    ring = np.ones((h, w), bool)
    ring[1:-1, 1:-1] = False
    inner = e[1:-1, 1:-1]
    steps = np.concatenate([np.abs(np.diff(inner, axis=1)).mean(axis=2).ravel(),
                            np.abs(np.diff(inner, axis=0)).mean(axis=2).ravel()])
    step = float(steps.mean()) if steps.size else 0.0
    edge = float(np.abs(e).mean(axis=2)[ring].mean())
    return math.sqrt(2.0) * edge / step if step > 0 else (0.0 if edge == 0 else math.inf)


@dataclass(frozen=True)
class _Hold:
    """What a kept coding must meet at the tile's edges: the glass there (``mask``, its
    ``tolerance`` in grey levels; None: no glass) and its :func:`ring_ratio`
    (``ring``)."""

    tile: np.ndarray
    valid: tuple[int, int]
    mask: np.ndarray | None
    tolerance: float
    ring: float

    def ring_met(self, pixels: np.ndarray) -> bool:
        return ring_ratio(pixels, self.tile, self.valid) <= self.ring

    def glass_met(self, pixels: np.ndarray) -> bool:
        return self.mask is None or edge_error(pixels, self.tile, self.mask) <= self.tolerance


def _hold(tile: np.ndarray, valid: tuple[int, int], reference: np.ndarray | None) -> _Hold:
    mask = edge_glass_mask(tile, valid)
    tolerance, ring = EDGE_TOLERANCE, RING_RATIO
    if reference is not None:
        ring = max(RING_RATIO, ring_ratio(reference, tile, valid))
        if mask is not None:
            tolerance = max(EDGE_TOLERANCE, edge_error(reference, tile, mask))
    return _Hold(tile, valid, mask, tolerance, ring)


def encode_at(tile: np.ndarray, level: float, valid: tuple[int, int]) -> TileFit:
    """``tile`` coded at fixed-quality ``level`` dB and decoded."""
    from wsicodec.classical import Jpeg2000Codec

    codec = Jpeg2000Codec(quality=level)
    data = codec.encode(tile)
    pixels = codec.decode(data)
    return TileFit(data, pixels, tile_psnr(pixels, tile, valid), level, codec="jpeg2000")


def _next_level(passing: TileFit | None, failing: TileFit | None, tried: list[TileFit], aim: float) -> float:
    """Where to code next, aiming at ``aim`` dB: inside the bracket when there is one, else
    the last level moved by what its coding missed the aim by (at least twice the last
    move where that made the same coding)."""
    last = tried[-1]
    if passing is not None and failing is not None:
        lo, hi = failing.setting, passing.setting
        t = (aim - failing.psnr) / (passing.psnr - failing.psnr) if passing.psnr > failing.psnr else 0.5
        return lo + (hi - lo) * min(max(t, 0.2), 0.8)
    step = abs(aim - last.psnr)
    if len(tried) >= 2 and tried[-2].data == last.data:             # a plateau
        step = max(step, 2 * abs(last.setting - tried[-2].setting))
    step = max(step, MIN_STEP) if last.psnr < aim else -max(step, MIN_STEP)
    return min(max(last.setting + step, MIN_LEVEL), MAX_LEVEL)


def _saturated(tried: list[TileFit]) -> bool:
    """The last two codings missed, :data:`SATURATION_SPAN` dB of level or more apart, and
    the higher gained under :data:`SATURATED` dB per dB: the wavelet's top is near
    (irreversible JPEG 2000 stops near 50 dB)."""
    if len(tried) < 2:
        return False
    a, b = tried[-2], tried[-1]
    span = b.setting - a.setting
    return span >= SATURATION_SPAN and (b.psnr - a.psnr) < SATURATED * span


def fit_jpeg2000(tile: np.ndarray, target: float, valid: tuple[int, int] | None = None, *,
                 budget: float | None = None, reference: np.ndarray | None = None) -> TileFit | None:
    """A JPEG 2000 coding of ``tile`` ((h, w, 3) uint8) whose PSNR over ``valid`` reaches
    ``target`` dB at the lowest level the search found, and keeps the glass at its edges
    as close as ``reference`` (another coding's pixels of the tile: JPEG-XL's) or
    :data:`EDGE_TOLERANCE`, and its :func:`ring_ratio` within the reference's or
    :data:`RING_RATIO` (module docstring), or None when no level up to :data:`MAX_LEVEL`
    reaches the target, or the edges are not held after :data:`EDGE_TRIES` raises.

    ``budget``: the caller has another coding of this many bytes; None is also returned
    where JPEG 2000 cannot undercut it: as soon as a coding that misses the target takes
    ``budget`` bytes or more (higher levels only take more), or when the kept coding's
    :attr:`~wsicodec.learned.jxlfit.TileFit.equal_bytes` do.
    """
    valid = valid or tile.shape[:2]
    if not target < MAX_LEVEL:
        return None
    aim = target + TOLERANCE / 2
    hold = _hold(tile, valid, reference)
    tried: list[TileFit] = []
    level = min(max(target + START_OFFSET, MIN_LEVEL), MAX_LEVEL)
    passing = failing = None
    for _ in range(MAX_CODINGS):
        f = encode_at(tile, level, valid)
        tried.append(f)
        if f.psnr < target and budget is not None and len(f.data) >= budget:
            return None
        if len(tried) == 1 and ring_ratio(f.pixels, tile, valid) > RING_EARLY * hold.ring:
            return None                 # far over the ring hold: no level near the target meets it
        ok = [g for g in tried if g.psnr >= target]
        passing = min(ok, key=lambda g: g.setting) if ok else None
        under = [g for g in tried if g.psnr < target and (passing is None or g.setting < passing.setting)]
        failing = max(under, key=lambda g: g.setting) if under else None
        if passing is not None and (passing.psnr - target <= TOLERANCE
                                    or (failing is not None and passing.setting - failing.setting < MIN_STEP)):
            break
        if passing is None and (f.setting >= MAX_LEVEL or _saturated(tried)):
            break
        nxt = _next_level(passing, failing, tried, aim)
        if any(abs(nxt - g.setting) < 1e-3 for g in tried):
            break
        level = nxt
    if passing is None:
        return None
    kept = replace(passing, equal_bytes=equal_bytes(passing, passing, failing, target))
    if budget is not None and kept.equal_bytes >= budget:
        return None                     # a raised coding only takes more
    if not hold.ring_met(kept.pixels):
        return None                     # a higher level does not lower it (measured)
    return kept if hold.glass_met(kept.pixels) else _raise_for_glass(kept, hold, budget)


def _raise_for_glass(kept: TileFit, hold: _Hold, budget: float | None) -> TileFit | None:
    """``kept`` coded at levels :data:`EDGE_STEP` dB higher until the glass at its edges
    meets ``hold`` (and its ring still does); its own bytes then count whole (the PSNR
    above the target buys the glass: its ``equal_bytes`` are its size).  None after
    :data:`EDGE_TRIES` steps, or once over ``budget``."""
    level = kept.setting
    for _ in range(EDGE_TRIES):
        level = min(level + EDGE_STEP, MAX_LEVEL)
        f = encode_at(hold.tile, level, hold.valid)
        if budget is not None and len(f.data) >= budget:
            return None
        if hold.glass_met(f.pixels):
            return f if hold.ring_met(f.pixels) else None
        if level >= MAX_LEVEL:
            break
    return None
