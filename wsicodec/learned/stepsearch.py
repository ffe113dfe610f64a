"""Stage 1's search over a tile's network qualities (:class:`StepSearch`).

The ``auto`` codec raises a tile's network quality from the asked one in quarter steps
(:func:`quality_steps`) until the tile's estimated PSNR clears a target.  Each estimate
costs one g_s pass, so the search jumps by the PSNR the tile gained per step so far, then
interpolates inside the bracket of the highest step that misses and the lowest that
reaches.  The search is a pure function of the estimates it is fed: the encoder feeds it
g_s estimates of many tiles at once (:class:`~wsicodec.learned.choice.TileChooser`), the
tests feed it known curves.
"""

from __future__ import annotations

import math
import struct

from .ladder import QUALITY_MAX

#: the quality steps stage 1 climbs by: fine enough that a tile raised to the floor lands
#: near it (whole steps overshot it by half a step on average, 0.5-1 dB of bytes)
QUALITY_STEP = 0.25
#: PSNR a tile gains per unit of quality, before a tile's own tries say (shipped network,
#: he/test and tcga: about 2 dB per unit in the middle of the scale, less near the top)
SLOPE_DB = 2.0
#: the search keeps a reaching step whose estimate is within this many dB above its target
#: without proving that the step below it misses
STEP_TOLERANCE_DB = 0.3
#: at most this many estimates (g_s passes) per tile
MAX_TRIES = 6
#: with no step reaching yet, the search gives up without trying the top where the last
#: estimate misses the target by more than this many dB and the line through the last two
#: (rising) estimates stays under the target at the top: the estimates flatten toward
#: the top, and a tile under its ceiling by more than this has never been seen to reach it
#: (``bench/step_curves.py``)
GIVE_UP_DB = 1.0


def quality_steps(quality: float) -> tuple[float, ...]:
    """The network qualities a tile may be coded at: ``quality``, then up by
    :data:`QUALITY_STEP` to the top of the scale (each as the float32 a header stores)."""
    steps = [quality]
    while steps[-1] < QUALITY_MAX:
        steps.append(min(float(QUALITY_MAX), quality + len(steps) * QUALITY_STEP))
    return tuple(struct.unpack("<f", struct.pack("<f", q))[0] for q in steps)


class StepSearch:
    """One tile's search for the lowest of ``n`` quality steps whose estimated PSNR reaches
    ``target``.  Start at :attr:`next` (step 0, the asked quality); after each
    :meth:`record` of the estimate at :attr:`next`, :attr:`next` is the step to estimate
    next, or None when the search is over.  Then :attr:`chosen` is the step to code at
    (None: no step reached the target) and :attr:`tried` every estimate made, by step."""

    def __init__(self, n: int, target: float) -> None:
        self.n, self.target = n, target
        self.lo = -1                    #: highest step known to miss (−1: none)
        self.hi = n                     #: lowest step known to reach (n: none)
        self.tried: dict[int, float] = {}
        self.next: int | None = 0

    @property
    def chosen(self) -> int | None:
        return self.hi if self.hi < self.n else None

    def record(self, estimate: float) -> int | None:
        """Take the estimate at step :attr:`next`; return the step to estimate next."""
        s = self.next
        if s is None:
            raise RuntimeError("the quality search is over")
        self.tried[s] = estimate
        if estimate >= self.target:
            self.hi = s
        else:
            self.lo = s
        self.next = self._next_step()
        return self.next

    def _next_step(self) -> int | None:
        """None when the search is over: the bracket closed, a reaching step's estimate
        within :data:`STEP_TOLERANCE_DB` of the target, the top missing or out of reach
        (:data:`GIVE_UP_DB`), or :data:`MAX_TRIES` made (``hi`` is then kept; none
        reaching: the top is tried last).

        Without a reaching step: a jump as far as the PSNR gained per step so far says
        (:data:`SLOPE_DB` per unit of quality before two tries).  Inside a bracket: where
        the line through its two ends crosses the target, rounded up (toward reaching)."""
        n, lo, hi, tried, target = self.n, self.lo, self.hi, self.tried, self.target
        if hi == lo + 1 or lo == n - 1:
            return None
        if hi < n and tried[hi] - target <= STEP_TOLERANCE_DB:
            return None
        if len(tried) >= MAX_TRIES:
            return n - 1 if hi == n and n - 1 not in tried else None
        if hi < n:                              # lo ≥ 0: step 0, tried first, missed
            t = (target - tried[lo]) / max(tried[hi] - tried[lo], 1e-9)
            return min(max(lo + math.ceil(t * (hi - lo)), lo + 1), hi - 1)
        est = tried[lo]
        below = [s for s in tried if s < lo]
        per_step = SLOPE_DB * QUALITY_STEP
        if not below:
            slope = per_step
        else:
            rise = (est - tried[max(below)]) / (lo - max(below))
            if target - est > GIVE_UP_DB and rise > 0 and est + rise * (n - 1 - lo) < target:
                return None                     # the top out of reach: the line says so
            slope = max(rise, per_step / 4)
        jump = max(1, math.ceil((target - est) / slope))
        return min(lo + jump, n - 1)
