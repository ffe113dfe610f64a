"""The quality knob: public quality 1..8 → position on the λ ladder → gains, λ, κ.

One set of weights covers every rate: the network holds one gain vector per knot of its
λ ladder (:attr:`~wsicodec.learned.network.ModelConfig.lambdas`), the knots spread evenly
over the public scale :data:`QUALITY_MIN` .. :data:`QUALITY_MAX` whatever their number,
and a quality between two knots interpolates (the log-gains and log-λ linearly; the
decoder's reconstruction κ, which has knots of its own, linearly too)::

    quality q ─► position p = (clamp(q, 1, 8) − 1) · (knots − 1) / 7 ─► (lo, t = p − lo)
              ─► value = v[lo] · (1 − t) + v[lo + 1] · t

:class:`QualityLadder` is the one place that computes this, in two arithmetics that must
each stay as they are, bit for bit, because streams depend on them:

* tensors (:meth:`QualityLadder.knots`), a batch of qualities in the network's dtype:
  the gains of g_a/h_a/g_s and λ for training;
* Python floats (:meth:`QualityLadder.spread`), correctly rounded basic operations: the
  exact h_s engine's hyper gains (:mod:`wsicodec.learned.exact`) and κ.

A quality enters as anything number-like; :func:`check_quality` turns it into a Python
float once, at the codec's boundary.  A tile header stores it as float32, and the coder
computes with that float32 value (``torch.tensor([q])``), so encoder and decoder agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from wsicodec.errors import InvalidSettingError

#: the public quality scale: 1 (smallest) .. 8 (best), fractions allowed
QUALITY_MIN, QUALITY_MAX = 1.0, 8
#: the quality a learned codec gets when none is given
DEFAULT_QUALITY = 4.0


def check_quality(value: Any) -> float:
    """``value`` as a float in [QUALITY_MIN, QUALITY_MAX], or InvalidSettingError naming
    the range (``None``: :data:`DEFAULT_QUALITY`).  The codec's one conversion of the knob."""
    from wsicodec.codecs import as_number

    q = DEFAULT_QUALITY if value is None else as_number(value)
    if not (QUALITY_MIN <= q <= QUALITY_MAX) or q != q:
        raise InvalidSettingError(f"learned codec quality must be in {QUALITY_MIN:g}..{QUALITY_MAX:g} "
                                  f"(fractions allowed), got {value!r}")
    return float(q)


@dataclass(frozen=True)
class QualityLadder:
    """Quality → ladder position → λ, and the interpolation of per-knot values (gains, κ).

    Attributes:
        lambdas: λ per knot (loss = rate + λ·255²·MSE), knots spread evenly over 1..8.
        reconstruction: the decoder's κ at knots of its own, spread evenly over 1..8
            (empty: κ = 0, bin centres).
    """

    lambdas: tuple[float, ...]
    reconstruction: tuple[float, ...] = ()

    @property
    def levels(self) -> int:
        return len(self.lambdas)

    # ------------------------------------------------------------- floats
    @staticmethod
    def spread(quality: float, knots: int) -> tuple[int, float]:
        """(lo, t): ``quality`` between knot ``lo`` and ``lo + 1`` of ``knots`` spread evenly
        over 1..8, ``t`` in [0, 1] of the way; Python floats (the exact engine's arithmetic)."""
        p = (min(max(quality, 1.0), float(QUALITY_MAX)) - 1.0) * (knots - 1) / (QUALITY_MAX - 1)
        lo = min(int(math.floor(p)), knots - 2)
        return lo, p - lo

    @staticmethod
    def interpolate(rows: Sequence[Sequence[float]], quality: float, knots: int) -> list[float]:
        """Per-knot vectors ``rows`` (``knots`` × C, e.g. the log hyper gains) at
        ``quality``, in Python floats."""
        lo, t = QualityLadder.spread(quality, knots)
        return [a * (1.0 - t) + b * t for a, b in zip(rows[lo], rows[lo + 1])]

    def kappa(self, quality: float) -> float:
        """The decoder's reconstruction κ at ``quality`` (0 when none is configured)."""
        k = self.reconstruction
        if not k:
            return 0.0
        if len(k) == 1:
            return float(k[0])
        lo, t = self.spread(float(quality), len(k))
        return float(k[lo] * (1 - t) + k[lo + 1] * t)

    # ------------------------------------------------------------ tensors
    def position(self, quality, dtype):
        """Where each quality of a tensor sits on the λ ladder: 0 .. levels − 1, in ``dtype``."""
        q = quality.to(dtype).clamp(1, QUALITY_MAX) - 1
        return q * ((self.levels - 1) / (QUALITY_MAX - 1))

    def knots(self, quality, dtype):
        """(lo long, t) per quality of a tensor, as :meth:`spread` but in ``dtype``."""
        p = self.position(quality, dtype)
        lo = p.floor().long().clamp(max=self.levels - 2)
        return lo, p - lo.to(p.dtype)

    def gains(self, log_gain, log_hgain, quality, dtype=None):
        """Per-sample (gain, hyper gain) (B, M, 1, 1), (B, N, 1, 1) from the per-knot log
        gains (levels × M, levels × N), interpolated linearly in the log domain."""
        import torch

        lo, t = self.knots(quality, log_gain.dtype)
        t = t[:, None]
        lg = log_gain[lo] * (1 - t) + log_gain[lo + 1] * t
        lh = log_hgain[lo] * (1 - t) + log_hgain[lo + 1] * t
        g, h = torch.exp(lg)[:, :, None, None], torch.exp(lh)[:, :, None, None]
        if dtype is not None:
            g, h = g.to(dtype), h.to(dtype)
        return g, h

    def lambda_at(self, quality, dtype):
        """λ of each quality of a tensor: the ladder interpolated geometrically."""
        import torch

        lo, t = self.knots(quality, dtype)
        log_lam = torch.log(torch.tensor(self.lambdas, dtype=t.dtype, device=t.device))
        return torch.exp(log_lam[lo] * (1 - t) + log_lam[lo + 1] * t)
