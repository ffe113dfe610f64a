"""The ``auto`` codec's price of error beyond the source's codings: where a tile's error costs
more at its quality's λ than the bytes a classical coding would spend to buy it off, it is
coded higher (``wsicodec.learned.sourcefit.priced_target`` / ``priced_fit``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsicodec.learned.jxlfit import TileFit
from wsicodec.learned.sourcefit import (PRICE_MAX_STEP_DB, PRICE_MIN_STEP_DB, PRICE_PROBES_DB, PRICE_TRIES,
                                        PRIOR_RATE_SLOPE, cost, priced_fit, priced_target)

VALID = (256, 256)


def _model(nbytes: float, psnr: float, slope: float, bump=lambda target: 1.0):
    """A codec whose bytes grow exactly by ``slope`` (d ln bytes / d dB) from ``nbytes`` at
    ``psnr`` (times ``bump(target)``): its coding at a target, as a fit would return it,
    and the targets it was fitted to."""
    calls = []

    def fit_at(target: float) -> TileFit:
        calls.append(target)
        n = int(round(nbytes * math.exp(slope * (target - psnr)) * bump(target)))
        return TileFit(b"x" * n, np.zeros((1, 1, 3), np.uint8), target, 1.0, rate_slope=slope)
    return fit_at, calls


@pytest.mark.parametrize("slope", [0.08, 0.13, 0.2])
def test_the_priced_target_is_where_the_cost_is_least(slope):
    nbytes, psnr, price = 20_000, 30.0, 0.05
    target = priced_target(nbytes, psnr, VALID, price, slope)
    assert target is not None and PRICE_MIN_STEP_DB <= target - psnr <= PRICE_MAX_STEP_DB
    grid = np.linspace(psnr, psnr + PRICE_MAX_STEP_DB, 1601)
    costs = [cost(nbytes * math.exp(slope * (p - psnr)), p, VALID, price) for p in grid]
    assert abs(grid[int(np.argmin(costs))] - target) < 0.02


def test_a_coding_at_or_past_its_best_price_is_left_as_it_is():
    assert priced_target(20_000, 30.0, VALID, 0.0001, 0.13) is None      # a low quality's λ
    assert priced_target(20_000, 45.0, VALID, 0.05, 0.13) is None        # little error left
    assert priced_target(20_000, math.inf, VALID, 0.13, 0.13) is None    # exact
    far = priced_target(2_000, 20.0, VALID, 0.13, 0.13)                  # far under its best
    assert far == 20.0 + PRICE_MAX_STEP_DB
    # unmeasured slopes take the prior
    assert priced_target(20_000, 30.0, VALID, 0.05) == priced_target(20_000, 30.0, VALID, 0.05, PRIOR_RATE_SLOPE)
    assert priced_target(20_000, 30.0, VALID, 0.05, -1.0) == priced_target(20_000, 30.0, VALID, 0.05)


def test_priced_fit_keeps_a_coding_only_where_it_costs_less():
    price, slope = 0.05, 0.13
    most = PRICE_TRIES + 2 * len(PRICE_PROBES_DB)
    fit_at, calls = _model(20_000, 30.0, slope)
    now = cost(20_000, 30.0, VALID, price)
    found = priced_fit(fit_at, (20_000, 30.0, slope), now, VALID, price)
    assert found is not None and cost(len(found.data), found.psnr, VALID, price) < now
    # a smooth codec: the step lands on its least cost, which no probe beats
    assert found.psnr == calls[0] and len(calls) <= most
    # the chosen coding already costs less than anything the codec offers: none, one fit
    # made (its price keeps it: no probes)
    fit_at, calls = _model(20_000, 30.0, slope)
    assert priced_fit(fit_at, (20_000, 30.0, slope), 0.5, VALID, price) is None and len(calls) == 1
    # a low quality's price: no fit at all
    fit_at, calls = _model(20_000, 30.0, slope)
    assert priced_fit(fit_at, (20_000, 30.0, slope), now, VALID, 0.0001) is None and calls == []


def test_the_probes_find_what_the_step_misses_and_stay_over_the_floor():
    """A codec whose bytes are no smooth function of the target (JPEG 2000's rate control,
    the holds of its fit): where the step's coding is dear, a target a probe away is kept;
    no probe goes under the floor."""
    price, slope = 0.05, 0.13
    step = priced_target(20_000, 30.0, VALID, price, slope)
    dear = lambda target: 1.1 if abs(target - step) < 0.25 else 1.0         # noqa: E731
    now = cost(20_000, 30.0, VALID, price)
    at_step = cost(20_000 * 1.1 * math.exp(slope * (step - 30.0)), step, VALID, price)
    assert at_step < now                      # the step's coding is kept, then beaten
    fit_at, calls = _model(20_000, 30.0, slope, dear)
    found = priced_fit(fit_at, (20_000, 30.0, slope), now, VALID, price)
    assert calls[0] == step and found is not None and abs(found.psnr - step) >= 0.25
    assert cost(len(found.data), found.psnr, VALID, price) < at_step and len(calls) <= PRICE_TRIES + 4
    floor = step - 0.2
    fit_at, calls = _model(20_000, 30.0, slope, dear)
    found = priced_fit(fit_at, (20_000, 30.0, slope), now, VALID, price, floor)
    assert found is not None and found.psnr > step and min(calls) >= floor


def test_lossless_is_never_bought_by_the_price():
    lossless = TileFit(b"x" * 100, np.zeros((1, 1, 3), np.uint8), math.inf, None)
    assert priced_fit(lambda target: lossless, (20_000, 30.0, 0.13), 10.0, VALID, 0.13) is None


torch = pytest.importorskip("torch")
torch.set_flush_denormal(True)


def test_at_the_networks_ceiling_its_price_buys_a_classical_coding_above_it(tissue, monkeypatch):
    """he/test area-averaged 4x (10x-like tissue, where the network flattens under 28 dB):
    at quality 8, whose λ weighs error heavily, each tile goes to a classical codec well
    above the network's PSNR for less cost on the network's own scale; at quality 4 nothing
    changes; the floor holds as readers decode."""
    from test_auto import T, _check_floor_and_records, _encode
    from wsicodec.codecs import get_codec
    from wsicodec.learned import choice

    small = tissue[:4 * T, :6 * T].reshape(T, 4, 3 * T // 2, 4, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    priced = {q: _encode(get_codec("auto", quality=q, min_psnr=20.0), small) for q in (4, 8)}
    monkeypatch.setattr(choice, "priced_fit", lambda *a, **k: None)
    equal = {q: _encode(get_codec("auto", quality=q, min_psnr=20.0), small) for q in (4, 8)}
    monkeypatch.undo()
    assert priced[4][0].tiles == equal[4][0].tiles
    assert "learned" in [k for k, _ in equal[8][0].records]              # the network's ceiling
    price = get_codec("auto", quality=8).chooser.price
    for c, ((kind, p), (was, p0)) in enumerate(zip(priced[8][0].records, equal[8][0].records)):
        assert kind in ("jpegxl", "jpeg2000"), (kind, was)
        assert p > p0 + 2.0
        valid = (T, min(T, small.shape[1] - c * T))
        assert cost(len(priced[8][0].tiles[c]), p, valid, price) < cost(len(equal[8][0].tiles[c]), p0, valid, price)
    _check_floor_and_records(get_codec("auto", quality=8, min_psnr=20.0), small, priced[8], 20.0, 0.05)
