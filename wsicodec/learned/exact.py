"""The exact h_s engine: ẑ → (σ, μ) in integer arithmetic, the same bits on any machine.

Used by every tile of format 2 and later, at encode and decode time
(:meth:`wsicodec.learned.network.WsiHyperprior.entropy_parameters`).  Its hyper gains
come from :meth:`wsicodec.learned.ladder.QualityLadder.interpolate` and
:func:`exact_exp`: basic, correctly rounded IEEE operations only.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ladder import QualityLadder

#: Fixed point of :class:`ExactHyperSynthesis`: activations are integers |a| < 2**EXACT_ACT_BITS
#: standing for a / 2**EXACT_FRAC (±256 in steps of 2**-16; h_s's largest activation on
#: he/test and he/tiles, all qualities, is under 50).
EXACT_FRAC, EXACT_ACT_BITS = 16, 24
_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10   # Cody & Waite


def exact_exp(v: float) -> float:
    """exp(v) from IEEE-754 basic operations alone (+ − × ÷ and scaling by 2**n).

    libm's exp may differ in its last bit between platforms; these operations are
    correctly rounded everywhere, so this gives the same bits on every machine.
    Within a few ulp of exp for |v| < 700: range reduction v = n·ln 2 + r, |r| ≤ ln 2 / 2,
    then Taylor to degree 13 (remainder < 1e-17 relative).
    """
    n = round(v / (_LN2_HI + _LN2_LO))
    r = (v - n * _LN2_HI) - n * _LN2_LO
    p = 1.0
    for k in range(13, 0, -1):
        p = 1.0 + r * p / k
    return math.ldexp(p, n)


class ExactHyperSynthesis:
    """h_s in integer arithmetic, so (μ, σ) and the table index are the same bits everywhere.

    The float64 h_s of tile format 1 is deterministic on one machine, but a convolution's
    sum may be taken in another order by another BLAS or CPU family, and a last-bit
    difference in σ that crosses a table boundary makes the tile undecodable (its CRC
    catches it).  Here every value that reaches a convolution is an integer and every
    product and partial sum stays below 2**53 (checked when the weights are converted),
    so float64 holds them exactly and the order of summation cannot matter; the rest is
    rounding, division by powers of two and correctly rounded elementwise operations.

    * input: ``round(ẑ / hgain · 2**EXACT_FRAC)``, clamped to |a| < 2**EXACT_ACT_BITS, with
      hgain from the gains' log-linear interpolation evaluated by :func:`exact_exp`
      (quality taken as its float32, as stored in the tile);
    * each layer: integer weights ``round(W · 2**s_c)`` and bias ``round(b · 2**(s_c +
      EXACT_FRAC))``, with s_c per output channel the largest that keeps the channel's
      worst case (Σ|w| times the largest activation, plus |b|) under 2**53 (19 … 25 for the
      shipped h_s); the result divided by ``2**s_c`` and rounded, LeakyReLU as
      ``round(slope · a)`` below zero, clamped;
    * output: the last layer's integers divided by ``2**(s_c + EXACT_FRAC)`` (exact), σ then μ.

    Against the float h_s it differs by fixed-point rounding only: on a 512² he/test crop
    at five qualities, 99.993 % of the table indexes are the same and μ moves by at most
    6e-4 (on values up to ~60); coded on all 14 he/test images, qualities 1-8, the rate
    and PSNR curves agree to a BD-rate of 0.00 % (``train/eval_bytes.py``).
    """

    def __init__(self, h_s: nn.Sequential, log_hgain: torch.Tensor, levels: int, phases: bool = True) -> None:
        """``phases``: run h_s's stride-2 transposed layers as :func:`sub_pixel_phases` (the
        same bits, faster); False keeps conv_transpose2d (for comparison)."""
        self.log_hgain = log_hgain.detach().cpu().to(torch.float32).tolist()
        self.levels = levels
        self.layers = []        # [transposed?, weight, bias, stride, padding, output padding, 2**s_c, slope]
        lim = 2 ** EXACT_ACT_BITS - 1
        for layer in h_s:
            if isinstance(layer, nn.LeakyReLU):
                self.layers[-1][-1] = float(layer.negative_slope)
                continue
            if not isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) or layer.groups != 1:
                raise ValueError(f"no exact form for {layer}")
            deconv = isinstance(layer, nn.ConvTranspose2d)
            w = layer.weight.detach().cpu().to(torch.float64)
            w = w.transpose(0, 1) if deconv else w                 # (out, in, k, k)
            b = (layer.bias.detach().cpu().to(torch.float64) if layer.bias is not None
                 else torch.zeros(w.shape[0], dtype=torch.float64))
            wq, bq, scale = torch.empty_like(w), torch.empty_like(b), torch.empty_like(b)
            for c in range(w.shape[0]):
                total = float(w[c].abs().sum()) + abs(float(b[c])) * 2.0 ** EXACT_FRAC / lim + 1e-300
                e = min(53 - EXACT_ACT_BITS - math.frexp(total)[1], 60)
                while True:   # the largest power of two whose worst case, in integers, fits
                    wq[c] = torch.round(w[c] * 2.0 ** e)
                    bq[c] = round(float(b[c]) * 2.0 ** (e + EXACT_FRAC))
                    if int(wq[c].abs().sum()) * lim + abs(int(bq[c])) < 2 ** 53:
                        break
                    e -= 1
                scale[c] = 2.0 ** e
            stride, pad, opad = layer.stride, layer.padding, getattr(layer, "output_padding", (0, 0))
            if deconv:              # (in, out, k, k) as conv_transpose2d takes it, or its phases
                wq = wq.transpose(0, 1).contiguous()
                if phases:
                    wq = sub_pixel_phases(wq, stride, pad, opad) or wq
            self.layers.append([deconv, wq, bq, stride, pad, opad, scale.reshape(1, -1, 1, 1), None])
        self._hgain: dict[float, torch.Tensor] = {}

    def hgain(self, quality: float) -> torch.Tensor:
        """(1, N, 1, 1) float64 hyper gains of a quality, from basic operations only."""
        g = self._hgain.get(quality)          # decoder threads share this cache
        if g is None:
            lg = QualityLadder.interpolate(self.log_hgain, quality, self.levels)
            with torch.inference_mode(False):     # a normal tensor, whatever mode asked first
                g = torch.tensor([exact_exp(v) for v in lg], dtype=torch.float64).reshape(1, -1, 1, 1)
            if len(self._hgain) > 256:
                self._hgain = {}
            self._hgain[quality] = g
        return g

    def _layers_on(self, device: torch.device) -> list:
        """The integer layers with their tensors on ``device`` (copied once per device)."""
        if device.type == "cpu":
            return self.layers

        def to(t):
            if isinstance(t, tuple):
                return tuple(to(u) for u in t)
            return t.to(device) if isinstance(t, torch.Tensor) else t

        on = self.__dict__.setdefault("_on", {})
        if device not in on:
            on[device] = [[to(t) for t in layer] for layer in self.layers]
        return on[device]

    @torch.no_grad()
    def __call__(self, z_hat: torch.Tensor, quality: float | Sequence[float],
                 size: tuple[int, int] | None = None) -> torch.Tensor:
        """ẑ (B, N, h, w) float64 of B tiles → h_s's output (σ then μ) float64, exact,
        on ẑ's device (a CUDA device too: float64 sums of integers below 2**53 are exact
        in any order and any batch, so every device and batch size gives the same bits).
        ``quality``: one for all tiles, or one per tile.

        ``size`` (h, w): only that top-left part of the output is wanted (y's size, 17² of
        the 20² h_s makes for a 272² tile); a stride-1 last layer then computes just it,
        with the very values the full output has there (exact arithmetic), ~30 % less work
        in that layer.
        """
        lim = float(2 ** EXACT_ACT_BITS - 1)
        qs = [quality] * z_hat.shape[0] if isinstance(quality, (int, float)) else list(quality)
        if len(qs) != z_hat.shape[0]:
            raise ValueError(f"{len(qs)} qualities for {z_hat.shape[0]} tiles")
        gain = torch.cat([self.hgain(float(q)) for q in qs]).to(z_hat.device)
        a = torch.round(z_hat.to(torch.float64) / gain * 2.0 ** EXACT_FRAC).clamp_(-lim, lim)
        layers = self._layers_on(z_hat.device)
        last = len(layers) - 1
        for k, (deconv, wq, bq, stride, pad, opad, scale, slope) in enumerate(layers):
            if deconv:
                acc = transposed(a, wq, bq, stride, pad, opad)
            elif k == last and size is not None and _same_stride1(wq, stride, pad):
                ph, pw = pad if isinstance(pad, tuple) else (pad, pad)
                # a "same" stride-1 conv: output row i reads input rows i-ph .. i+ph
                h = min(size[0], a.shape[-2]) + ph
                w = min(size[1], a.shape[-1]) + pw
                part = a[..., :h, :w]
                part = F.pad(part, (pw, w - part.shape[-1], ph, h - part.shape[-2]))
                acc = F.conv2d(part, wq, bq, 1, 0)
            else:
                acc = F.conv2d(a, wq, bq, stride, pad)
            if k == last:
                return acc / (scale * 2.0 ** EXACT_FRAC)
            a = torch.round(acc / scale)
            if slope is not None:
                a = torch.where(a < 0, torch.round(a * slope), a)
            a.clamp_(-lim, lim)
        raise AssertionError("unreachable: h_s has layers")


#: the sub-pixel taps of a 5-tap, stride-2 transposed convolution with padding 2 and output
#: padding 1, per output phase: output 2m reads inputs m − 1, m, m + 1 through taps 4, 2, 0;
#: output 2m + 1 reads m, m + 1 through taps 3, 1
_PHASE_TAPS = ((4, 2, 0), (3, 1))


def sub_pixel_phases(weight: torch.Tensor, stride, pad, opad) -> tuple[torch.Tensor, ...] | None:
    """A transposed convolution's (in, out, 5, 5) ``weight`` as the four ordinary
    convolutions that make its even and odd output rows and columns ((out, in, 3 or 2,
    3 or 2), phases (0, 0), (0, 1), (1, 0), (1, 1)), for h_s's stride-2 layers (padding 2,
    output padding 1); None for any other geometry.  Each output is the sum of the same
    products either way, so in :class:`ExactHyperSynthesis`'s integer arithmetic the
    results are the same bits; the phases skip the zeros a transposed convolution's
    scatter works around (its upsampling layers ~1.5x faster on a CPU in float64)."""
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)    # noqa: E731
    if weight.shape[-2:] != (5, 5) or pair(stride) != (2, 2) or pair(pad) != (2, 2) or pair(opad) != (1, 1):
        return None
    w = weight.transpose(0, 1)
    return tuple(w[:, :, list(_PHASE_TAPS[ry])][:, :, :, list(_PHASE_TAPS[rx])].contiguous()
                 for ry in (0, 1) for rx in (0, 1))


def transposed(a: torch.Tensor, weight, bias: torch.Tensor, stride, pad, opad) -> torch.Tensor:
    """``conv_transpose2d(a, weight, bias, stride, pad, opad)``, ``weight`` either as
    conv_transpose2d takes it or as :func:`sub_pixel_phases` of it (then each phase a
    convolution of ``a`` padded by one, written into every other row and column)."""
    if isinstance(weight, torch.Tensor):
        return F.conv_transpose2d(a, weight, bias, stride, pad, opad)
    n, _, h, w = a.shape
    out = a.new_empty((n, weight[0].shape[0], 2 * h, 2 * w))
    padded = F.pad(a, (1, 1, 1, 1))
    for k, phase in enumerate(weight):
        ry, rx = divmod(k, 2)
        kh, kw = phase.shape[-2:]
        out[:, :, ry::2, rx::2] = F.conv2d(padded[:, :, ry:ry + h + kh - 1, rx:rx + w + kw - 1], phase)
    return out + bias.reshape(1, -1, 1, 1)


def _same_stride1(weight: torch.Tensor, stride, pad) -> bool:
    """Whether a convolution with this (out, in, kh, kw) weight, stride and padding keeps
    the input's size with output (i, j) centred on input (i, j): the case in which
    :class:`ExactHyperSynthesis` may compute a top-left part of the output alone."""
    kh, kw = weight.shape[-2:]
    ph, pw = pad if isinstance(pad, tuple) else (pad, pad)
    return stride in (1, (1, 1)) and kh % 2 == 1 and kw % 2 == 1 and (ph, pw) == (kh // 2, kw // 2)

