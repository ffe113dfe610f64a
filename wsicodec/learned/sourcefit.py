"""The source's own codings as ``auto`` candidates: a scanner's tile as it was stored, a JPEG
scan's JPEG recovered from the tile's pixels, and what a coding costs at the network's price
of error (and at which PSNR a classical codec's would cost least).

Both codings are (nearly) the source pixels, at bytes of their own.  The chooser
(:mod:`wsicodec.learned.choice`) keeps one where it reaches the tile's target in no more
bytes than the coding chosen otherwise, or where :func:`cost` says it is cheaper on the
network's own scale.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from wsicodec.classical import J2K_SIGNATURE
from wsicodec.errors import CorruptDataError
from wsicodec.jpegrecover import KIND as RECOVERED_JPEG, recover
from wsicodec.scannertiles import KIND_JPEG, KIND_JPEG2000, carry

from .jxlfit import TileFit, tile_psnr


def _measured(decoder: Any, data: bytes, source: np.ndarray, valid: tuple[int, int]
              ) -> tuple[np.ndarray, float]:
    """``data`` decoded as readers decode a bare tile (``decoder.bare_pixels``) and its
    PSNR against ``source`` over ``valid``."""
    px = decoder.bare_pixels(data, source.shape, "tile")
    return px, tile_psnr(px, source, valid)


def carried_fit(decoder: Any, source: np.ndarray, valid: tuple[int, int], stream: bytes,
                floor: float) -> TileFit | None:
    """The source's own tile ``stream`` as it is stored (a JPEG carried in JPEG-XL, a JPEG
    2000 codestream: :func:`~wsicodec.scannertiles.carry`), decoded as readers decode it
    and measured against ``source`` over ``valid``, where that reaches ``floor`` (it is
    the source pixels exactly unless the source reader decodes it otherwise); None where
    it does not, or it is no stream readers decode to the tile's size."""
    try:
        data = carry(stream)
        px, p = _measured(decoder, data, source, valid)
    except CorruptDataError:
        return None
    kind = KIND_JPEG2000 if data.startswith(J2K_SIGNATURE) else KIND_JPEG
    return TileFit(data, px, p, None, codec=kind) if p >= floor else None


def recovered_fit(decoder: Any, source: np.ndarray, valid: tuple[int, int], floor: float) -> TileFit | None:
    """The scan's JPEG made again from ``source``'s pixels
    (:func:`~wsicodec.jpegrecover.recover`): of the codings tried, the most faithful (then
    the fewest bytes), carried and decoded as readers decode it, where it reaches
    ``floor``; None where it does not, or the pixels show no JPEG scan.  The codings are
    compared as JPEGs, and only the one kept is carried: JPEG-XL's recompression is
    lossless and the costliest step."""
    best: tuple[float, int, bytes, np.ndarray] | None = None
    for jpeg in recover(source, valid):
        px, p = _measured(decoder, jpeg, source, valid)
        if best is None or (p, -len(jpeg)) > (best[0], -best[1]):
            best = (p, len(jpeg), jpeg, px)
    if best is None or best[0] < floor:
        return None
    p, _, jpeg, px = best
    data = carry(jpeg)
    if data != jpeg:                          # recompressed: measured as readers will see it
        px, p = _measured(decoder, data, source, valid)
    return TileFit(data, px, p, None, codec=RECOVERED_JPEG) if p >= floor else None


def price_of_error(net: Any, quality: float) -> float:
    """Bits per pixel one unit of 8-bit MSE is worth at ``quality``: the λ the network was
    trained to there (its loss: bpp + λ·255²·MSE on [0, 1])."""
    import torch

    return float(net.lambda_at(torch.tensor([float(quality)]))[0])


def _bpp_mse(nbytes: int, psnr: float, valid: tuple[int, int]) -> tuple[float, float]:
    """A coding's bits per pixel of the tile's ``valid`` part and its 8-bit mean squared
    error (from its PSNR; inf: exact, 0)."""
    return 8 * nbytes / (valid[0] * valid[1]), 0.0 if math.isinf(psnr) else 255.0 ** 2 / 10 ** (psnr / 10)


def cost(nbytes: int, psnr: float, valid: tuple[int, int], price: float) -> float:
    """A coding's cost on the network's scale: its bits per pixel of the tile's ``valid``
    part plus ``price`` times its 8-bit mean squared error (from its PSNR; inf: exact)."""
    bpp, mse = _bpp_mse(nbytes, psnr, valid)
    return bpp + price * mse


#: d ln(bytes) / d dB a classical codec is taken to have on a tile before a fit measures it
#: (JPEG-XL and JPEG 2000 on the shared slides' H&E between 30 and 42 dB: 0.10-0.19)
PRIOR_RATE_SLOPE = 0.13
#: a priced target closer than this above the coding it starts from is not tried
PRICE_MIN_STEP_DB = 0.5
#: nor one further than this above it (the next try goes on from the coding found)
PRICE_MAX_STEP_DB = 8.0
#: at most this many classical codings a tile is fitted to above its chosen one
PRICE_TRIES = 2
#: then targets this far above and below the cheapest one found are tried, in turn
PRICE_PROBES_DB = (1.0, 0.5)


def priced_target(nbytes: int, psnr: float, valid: tuple[int, int], price: float,
                  slope: float = math.nan, min_step: float = PRICE_MIN_STEP_DB) -> float | None:
    """The PSNR at which a coding whose bytes grow from ``nbytes`` at ``psnr`` dB by
    ``slope`` (d ln bytes / d dB; nan: :data:`PRIOR_RATE_SLOPE`) costs least at ``price``
    (:func:`cost`): where its next dB's bits equal the error they buy off, bytes being
    exponential and MSE a power of ten in dB.  None where that lies less than
    :data:`PRICE_MIN_STEP_DB` above ``psnr`` (the coding is at or past its best price),
    else at most :data:`PRICE_MAX_STEP_DB` above it."""
    k = slope if math.isfinite(slope) and slope > 0 else PRIOR_RATE_SLOPE
    if not math.isfinite(psnr) or nbytes <= 0 or price <= 0:
        return None
    c = math.log(10) / 10                       # d ln MSE / d dB, negated
    bpp, mse = _bpp_mse(nbytes, psnr, valid)
    step = math.log(price * c * mse / (k * bpp)) / (k + c)
    return None if step < min_step else psnr + min(step, PRICE_MAX_STEP_DB)


def priced_fit(fit_at: Callable[[float], TileFit], start: tuple[int, float, float], now: float,
               valid: tuple[int, int], price: float, floor: float = -math.inf) -> TileFit | None:
    """A classical coding that costs less than ``now`` (:func:`cost` of the coding chosen)
    at ``price``, or None: ``fit_at(target)`` (the codec's fewest bytes reaching ``target``
    dB) at the :func:`priced_target` of ``start`` = (bytes, PSNR, rate slope) of a coding
    near the chosen one, then again from each coding found that costs less (at most
    :data:`PRICE_TRIES` fits); then targets :data:`PRICE_PROBES_DB` above and below the
    cheapest one's target (or, where the step was too short to try, the least cost's),
    none under ``floor``, each kept where it costs less (a codec's bytes are no smooth
    function of the target: JPEG 2000's rate control, its fit's holds).  Where the
    step's coding costs more than the chosen one, no probe is made: the price keeps it.
    Where the network is at its ceiling (its next bytes buy next to no PSNR) such a
    coding costs less than its tile; where it codes the tissue well, its price keeps the
    tile as it is, with no fit made."""
    best, tried = None, set()

    def take(target: float) -> bool:
        nonlocal best, now
        tried.add(round(target, 3))
        found = fit_at(target)
        c = cost(len(found.data), found.psnr, valid, price)
        if found.lossless or c >= now or found.psnr < floor:
            return False
        best, now = found, c
        return True

    first, centre = start, None       # centre: the cheapest coding's target
    for _ in range(PRICE_TRIES):
        target = priced_target(start[0], start[1], valid, price, start[2])
        if target is None:
            break
        if not take(target):
            if best is None:        # the step's coding costs more: the price keeps the tile
                return None
            break
        centre, start = target, (len(best.data), best.psnr, best.rate_slope)
    if centre is None:          # no step tried: probe around its least cost unless that is below it
        centre = priced_target(first[0], first[1], valid, price, first[2], min_step=0.0)
        if centre is None:
            return None
    for step in PRICE_PROBES_DB:       # the codecs' bytes are no smooth function of the target
        for target in (centre + step, centre - step):
            if target >= floor and round(target, 3) not in tried and take(target):
                centre = target
                break
    return best
