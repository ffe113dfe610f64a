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
that is lower or there is none; where the PSNR fit misses that (or the search's first
coding already does, which then ends the search: a lower level is, as a rule, no nearer the
glass), the level is raised in :data:`EDGE_STEP` dB steps, and a tile that still misses it
after :data:`EDGE_TRIES` steps is left to JPEG-XL.  JPEG 2000 then never shows the grid
more than JPEG-XL would.

**Its borders: a margin, and the ring hold.** The wavelet's symmetric extension at a
codestream's edge leaves its outermost pixels further off than its interior, whose error is
smooth: where two tiles coded on their own meet, the error jumps across the border far more
than between neighbouring pixels inside (``bench/error_steps.py``), and the seam shows.  So
a tile is coded with :data:`MARGIN` px of its surroundings beyond each edge
(:func:`with_margin`; the decoder crops them, :func:`crop_margin`): the tile's own edge is
then inside the codestream.  What is left at a border is two independent errors meeting,
as between two JPEG-XL tiles.  Where the source itself was cut into tiles on the same grid
(a slide scanned as JPEG 2000 in 256-px tiles: its seams are in the pixels, at the tile's
edge), coding across that edge costs more than stopping at it, so the auto codec fits a
tile both ways and keeps the smaller (:func:`fit_jpeg2000_tile`); readers tell the two
apart by the codestream's declared size.  A coding is held at its edge either way: the mean error on the tile's
outermost pixels where it meets another tile (:func:`ring_error`, :func:`tile_sides`: a
level's edge shows no seam) may not exceed :data:`RING_TOLERANCE` times the
JPEG-XL coding's of the same tile (the caller's ``reference``) or the coding's own error
inside, whichever is more (a lossless reference has none); a coding that misses it gives
way at once (a higher level lowers its inside error with it).

Unlike JPEG-XL it has no lossless last resort here: irreversible JPEG 2000 tops out near
50 dB, and a target it cannot reach (or cannot reach under a caller's byte budget) gives
None, so the caller keeps JPEG-XL.  Every step is a function of the tile and the target
alone: a tile codes the same in any run (resume and cluster runs rely on it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .jxlfit import TileFit, measured, tile_psnr

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
#: px of its surroundings a JPEG 2000 tile is coded with beyond each of its edges (the
#: ``auto`` codec's ``jpeg2000_margin``; containers written before 2026-12-05 22:00 UTC: 0)
MARGIN = 8
#: the largest margin a reader takes (the encoder's context around a tile)
MAX_MARGIN = 16
#: a coding's :func:`ring_error` may be this many times the reference's or its own inside
#: error, whichever is more (JPEG-XL's own ring over its inside: median 1.07-1.24 on tiles
#: of cmu, tcga and he/test at 32 and 40 dB; JPEG 2000's without a margin 1.2-2.6, with one
#: 1.03-1.14 where the source's tiles do not end at the tile's edge)
RING_TOLERANCE = 1.25
#: a first coding whose ring error exceeds the bound this many times over ends the fit (the
#: first codings of the fits that met the hold on both shared slides: at most 1.02 times)
RING_EARLY = 1.15
#: the most a tile's JPEG 2000 bytes fall per dB of PSNR, d ln(bytes) / dB (measured between
#: a fit's codings: 0.06-0.3 on the shared slides); a passing coding whose bytes, cut at this
#: rate down to the target, still take the caller's budget ends the fit
RATE_SLOPE_MAX = 0.5
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


#: which edges of a tile meet another tile: (top, bottom, left, right)
Sides = tuple[bool, bool, bool, bool]
ALL_SIDES: Sides = (True, True, True, True)


def ring_error(pixels: np.ndarray, tile: np.ndarray, valid: tuple[int, int],
               sides: Sides = ALL_SIDES) -> tuple[float, float]:
    """A coding's mean absolute error (levels, RGB means) on the outermost pixels of
    ``tile``'s ``valid`` part along its ``sides`` that meet another tile (0 where none
    does: no border to show), and inside that part.  Two tiles meet in error steps about
    √2 times their ring errors (two independent errors).  (0, 0) for a part under 3x3 px."""
    h, w = valid
    if h < 3 or w < 3:
        return 0.0, 0.0
    e = np.abs(pixels[:h, :w, :3].astype(np.float64) - tile[:h, :w, :3]).mean(axis=2)
    ring = np.zeros((h, w), bool)
    for on, edge in zip(sides, (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1])):
        ring[edge] |= on
    return (float(e[ring].mean()) if ring.any() else 0.0), float(e[1:-1, 1:-1].mean())


def tile_sides(region: np.ndarray, box: tuple[int, int, int, int], valid: tuple[int, int]) -> Sides:
    """Which edges of the tile ``box`` of a level encoder's ``region`` (its context, clipped
    at the level's edges) meet another tile of the level: (top, bottom, left, right)."""
    top, left, h, w = box
    return (top > 0, valid[0] == h and region.shape[0] > top + h,
            left > 0, valid[1] == w and region.shape[1] > left + w)


def with_margin(region: np.ndarray, box: tuple[int, int, int, int], margin: int) -> np.ndarray:
    """The tile ``box`` (top, left, height, width) of ``region`` with ``margin`` px of the
    region around it on each side, the region's edge pixels repeated where it has fewer
    (a slide's or an image's edge): what a JPEG 2000 tile is coded from."""
    top, left, h, w = box
    y0, x0 = top - margin, left - margin
    part = region[max(y0, 0):top + h + margin, max(x0, 0):left + w + margin, :3]
    pads = ((max(-y0, 0), top + h + margin - min(top + h + margin, region.shape[0])),
            (max(-x0, 0), left + w + margin - min(left + w + margin, region.shape[1])), (0, 0))
    return np.ascontiguousarray(np.pad(part, pads, mode="edge") if any(sum(p) for p in pads) else part)


def crop_margin(pixels: np.ndarray, margin: int) -> np.ndarray:
    """A decoded JPEG 2000 tile's own pixels: ``pixels`` without ``margin`` px on each side."""
    if margin == 0:
        return pixels
    return np.ascontiguousarray(pixels[margin:pixels.shape[0] - margin, margin:pixels.shape[1] - margin])


@dataclass(frozen=True)
class _Hold:
    """What a kept coding must meet at the tile's edges: the glass there (``mask``, its
    ``tolerance`` in grey levels; None: no glass) and its :func:`ring_error`: at most
    :data:`RING_TOLERANCE` times ``ring`` (the reference's, 0 with none) or its own error
    inside, whichever is more."""

    tile: np.ndarray
    valid: tuple[int, int]
    mask: np.ndarray | None
    tolerance: float
    ring: float
    around: np.ndarray | None = None
    sides: Sides = ALL_SIDES

    def ring_bound(self, pixels: np.ndarray) -> tuple[float, float]:
        """A coding's ring error and the most it may be."""
        ring, inner = ring_error(pixels, self.tile, self.valid, self.sides)
        return ring, RING_TOLERANCE * max(self.ring, inner)

    def ring_met(self, pixels: np.ndarray) -> bool:
        ring, bound = self.ring_bound(pixels)
        return ring <= bound

    def glass_met(self, pixels: np.ndarray) -> bool:
        return self.mask is None or edge_error(pixels, self.tile, self.mask) <= self.tolerance


def _hold(tile: np.ndarray, valid: tuple[int, int], reference: np.ndarray | None,
          around: np.ndarray | None = None, sides: Sides = ALL_SIDES) -> _Hold:
    mask = edge_glass_mask(tile, valid)
    tolerance, ring = EDGE_TOLERANCE, 0.0
    if reference is not None:
        ring = ring_error(reference, tile, valid, sides)[0]
        if mask is not None:
            tolerance = max(EDGE_TOLERANCE, edge_error(reference, tile, mask))
    return _Hold(tile, valid, mask, tolerance, ring, around, sides)


def encode_at(tile: np.ndarray, level: float, valid: tuple[int, int], around: np.ndarray | None = None) -> TileFit:
    """``tile`` coded at fixed-quality ``level`` dB and decoded: from ``around`` (the tile
    with a margin, :func:`with_margin`) where given, its decoded margin cropped."""
    from wsicodec.classical import Jpeg2000Codec

    codec = Jpeg2000Codec(quality=level)
    data = codec.encode(tile if around is None else around)
    pixels = crop_margin(codec.decode(data), 0 if around is None else (around.shape[0] - tile.shape[0]) // 2)
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
                 budget: float | None = None, reference: np.ndarray | None = None,
                 around: np.ndarray | None = None, sides: Sides = ALL_SIDES) -> TileFit | None:
    """A JPEG 2000 coding of ``tile`` ((h, w, 3) uint8) whose PSNR over ``valid`` reaches
    ``target`` dB at the lowest level the search found, and keeps the glass at its edges
    as close as ``reference`` (another coding's pixels of the tile: JPEG-XL's) or
    :data:`EDGE_TOLERANCE`, and its :func:`ring_error` within :data:`RING_TOLERANCE` of
    the reference's or of its own inside, whichever is more (module docstring), or None when no level up to
    :data:`MAX_LEVEL` reaches the target, or the edges are not held after
    :data:`EDGE_TRIES` raises.  ``around``: the tile with a margin (:func:`with_margin`),
    coded in its place (the codestream is ``around``'s size; its pixels are the tile's).
    ``sides``: the tile's edges that meet another tile (:func:`tile_sides`), where the ring
    is held.

    ``budget``: the caller has another coding of this many bytes; None is also returned
    where JPEG 2000 cannot undercut it: as soon as a coding that misses the target takes
    ``budget`` bytes or more (higher levels only take more), or one that passes it does
    even cut down to the target at :data:`RATE_SLOPE_MAX`, or when the kept coding's
    :attr:`~wsicodec.learned.jxlfit.TileFit.equal_bytes` do.
    """
    if not target < MAX_LEVEL:
        return None
    valid = valid or tile.shape[:2]
    return _fit(_hold(tile, valid, reference, _checked(tile, around), sides), target, budget)[0]


def _checked(tile: np.ndarray, around: np.ndarray | None) -> np.ndarray | None:
    """``around``, once it is ``tile`` grown by the same margin on every side."""
    if around is not None and (around.shape[0] - tile.shape[0] != around.shape[1] - tile.shape[1]
                               or (around.shape[0] - tile.shape[0]) % 2 or around.shape[0] < tile.shape[0]):
        raise ValueError(f"a tile of {tile.shape[:2]} with a margin cannot be {around.shape[:2]}")
    return around


#: why :func:`_fit` gave no coding: a coding that misses the target, or the kept one at the
#: target, takes the caller's budget or more
OVER_BUDGET = "over budget"


def _fit(hold: _Hold, target: float, budget: float | None) -> tuple[TileFit | None, str]:
    """:func:`fit_jpeg2000` of ``hold``'s tile (from its ``around`` where it has one), and
    why it gave None (:data:`OVER_BUDGET` or another reason)."""
    tile, valid, around = hold.tile, hold.valid, hold.around
    aim = target + TOLERANCE / 2
    tried: list[TileFit] = []
    level = min(max(target + START_OFFSET, MIN_LEVEL), MAX_LEVEL)
    passing = failing = None
    for _ in range(MAX_CODINGS):
        f = encode_at(tile, level, valid, around)
        tried.append(f)
        # a miss over the budget (higher levels only take more), or a pass over it even cut
        # down to the target at the steepest slope
        if budget is not None and len(f.data) * math.exp(-RATE_SLOPE_MAX * max(f.psnr - target, 0.0)) >= budget:
            return None, OVER_BUDGET
        if len(tried) == 1:
            ring, bound = hold.ring_bound(f.pixels)
            if ring > RING_EARLY * bound:
                return None, "ring"     # over the ring hold: no level near the target meets it
        ok = [g for g in tried if g.psnr >= target]
        passing = min(ok, key=lambda g: g.setting) if ok else None
        under = [g for g in tried if g.psnr < target and (passing is None or g.setting < passing.setting)]
        failing = max(under, key=lambda g: g.setting) if under else None
        if len(tried) == 1 and passing is not None and not hold.glass_met(f.pixels):
            break                       # the glass is raised for from this coding
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
        return None, "out of reach"
    kept = measured(passing, passing, failing, target)
    if budget is not None and kept.equal_bytes >= budget:
        return None, OVER_BUDGET        # a raised coding only takes more
    if not hold.ring_met(kept.pixels):
        return None, "ring"             # a higher level does not lower it (measured)
    return (kept, "") if hold.glass_met(kept.pixels) else (_raise_for_glass(kept, hold, budget), "glass")


def fit_jpeg2000_tile(tile: np.ndarray, target: float, valid: tuple[int, int] | None = None, *,
                      budget: float | None = None, reference: np.ndarray | None = None,
                      around: np.ndarray | None = None, sides: Sides = ALL_SIDES) -> TileFit | None:
    """The auto codec's JPEG 2000 coding of a tile: :func:`fit_jpeg2000` without the tile's
    margin and with it (``around``), the one with fewer
    :attr:`~wsicodec.learned.jxlfit.TileFit.equal_bytes` kept (None: neither undercuts
    ``budget`` or meets the holds).  Without a margin the codestream's edge is the tile's,
    which costs less (fewer pixels) and shows no seam where the source's own tiles end
    there (a slide scanned as JPEG 2000 in tiles on the same grid: its seams are already in
    the pixels); with one the tile's edge lies inside the codestream.  The margin is not
    tried where the tile alone already takes the budget or more (the margin only adds
    pixels), and must undercut the coding without it."""
    if not target < MAX_LEVEL:
        return None
    hold = _hold(tile, valid or tile.shape[:2], reference, None, sides)     # the same both ways
    plain, why = _fit(hold, target, budget)
    if around is None or (plain is None and why == OVER_BUDGET):
        return plain
    bound = budget if plain is None else (plain.equal_bytes if budget is None else min(budget, plain.equal_bytes))
    margin = _fit(replace(hold, around=_checked(tile, around)), target, bound)[0]
    return margin if margin is not None and (plain is None or margin.equal_bytes < plain.equal_bytes) else plain


def _raise_for_glass(kept: TileFit, hold: _Hold, budget: float | None) -> TileFit | None:
    """``kept`` coded at levels :data:`EDGE_STEP` dB higher until the glass at its edges
    meets ``hold`` (and its ring still does); its own bytes then count whole (the PSNR
    above the target buys the glass: its ``equal_bytes`` are its size).  None after
    :data:`EDGE_TRIES` steps, or once over ``budget``."""
    level = kept.setting
    for _ in range(EDGE_TRIES):
        level = min(level + EDGE_STEP, MAX_LEVEL)
        f = encode_at(hold.tile, level, hold.valid, hold.around)
        if budget is not None and len(f.data) >= budget:
            return None
        if hold.glass_met(f.pixels):
            return f if hold.ring_met(f.pixels) else None
        if level >= MAX_LEVEL:
            break
    return None
