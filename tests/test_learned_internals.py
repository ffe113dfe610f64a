"""The learned codec's inner parts: exact entropy parameters, the latent search (refine),
the rate accounting the benchmarks use, the fast transforms' layers and the reconstruction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import wsicodec
from conftest import psnr as _psnr
from wsicodec.checkpoint import DEFAULT_WEIGHTS, load_model
from wsicodec.errors import InvalidSettingError
from wsicodec.learned import LearnedCodec


pytestmark = pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped weights missing")


def _coded_cost(tile: np.ndarray, data: bytes, quality: float) -> float:
    """bits/pixel + λ(q)·255²·MSE of a stream, from its real bytes and decoded pixels."""
    lam = float(load_model(DEFAULT_WEIGHTS).model.lambda_at(torch.tensor([quality]))[0])
    out = LearnedCodec(quality).decode(data).astype(np.float64)
    mse = float(np.mean((out - tile.astype(np.float64)) ** 2))
    return 8 * len(data) / (tile.shape[0] * tile.shape[1]) + lam * mse


def _transposed(model):
    """The exact h_s with its transposed layers as conv_transpose2d takes them ((in, out,
    5, 5) weights, :class:`~wsicodec.learned.exact.ExactHyperSynthesis` ``phases=False``):
    the same integer weights as ``model.h_s_exact()``'s, not cut into phases."""
    from wsicodec.learned.exact import ExactHyperSynthesis
    return ExactHyperSynthesis(model.h_s, model.log_hgain, model.config.levels, phases=False)


def test_sub_pixel_phases_are_the_transposed_convolution_to_the_bit():
    """h_s's stride-2 layers run as four ordinary convolutions: on integer activations as
    large as the exact h_s allows, the same bits as conv_transpose2d; other geometries are
    left to it."""
    import torch.nn.functional as F
    from wsicodec.learned.exact import EXACT_ACT_BITS, sub_pixel_phases, transposed
    model = load_model().model
    h = model.h_s_exact()
    g = torch.Generator().manual_seed(11)
    deconvs = [layer for layer in h.layers if layer[0]]
    assert deconvs and all(isinstance(layer[1], tuple) for layer in deconvs)
    whole = [layer[1] for layer in _transposed(model).layers if layer[0]]
    for (_, wq, bq, stride, pad, opad, _, _), w in zip(deconvs, whole):
        assert all(torch.equal(a, b) for a, b in zip(sub_pixel_phases(w, stride, pad, opad), wq))
        for shape in ((3, w.shape[0], 4, 4), (1, w.shape[0], 5, 7), (2, w.shape[0], 1, 1)):
            a = torch.randint(-2 ** EXACT_ACT_BITS + 1, 2 ** EXACT_ACT_BITS, shape, generator=g).double()
            assert torch.equal(transposed(a, wq, bq, stride, pad, opad), F.conv_transpose2d(a, w, bq, stride, pad, opad))
    w = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    assert sub_pixel_phases(w, (2, 2), (1, 1), (1, 1)) is None and sub_pixel_phases(w[..., :3, :3], 2, 2, 1) is None
    a = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    assert torch.equal(transposed(a, w, torch.zeros(6, dtype=torch.float64), 2, 1, 1),
                       F.conv_transpose2d(a, w, torch.zeros(6, dtype=torch.float64), 2, 1, 1))


def _np_exact_h_s(h, z_hat: np.ndarray, quality: float) -> np.ndarray:
    """ExactHyperSynthesis written again in numpy: convolutions as window tensordots,
    which numpy sends to its own BLAS (OpenBLAS), not torch's."""
    from numpy.lib.stride_tricks import sliding_window_view
    from wsicodec.learned.exact import EXACT_ACT_BITS, EXACT_FRAC

    def correlate(x, w, pad_lo, pad_hi):          # x (Cin, H, W), w (Cout, Cin, k, k)
        xp = np.pad(x, ((0, 0), (pad_lo, pad_hi), (pad_lo, pad_hi)))
        win = sliding_window_view(xp, w.shape[-2:], axis=(1, 2))
        return np.tensordot(w, win, axes=([1, 2, 3], [0, 3, 4]))

    lim = float(2 ** EXACT_ACT_BITS - 1)
    a = np.clip(np.round(z_hat / h.hgain(quality).numpy()[0] * 2.0 ** EXACT_FRAC), -lim, lim)
    for k, (deconv, wq, bq, stride, pad, opad, scale, slope) in enumerate(h.layers):
        wq, bq, scale = wq.numpy(), bq.numpy()[:, None, None], scale.numpy()[0]
        if deconv:     # stride-2 transposed convolution = zeros between pixels, flipped kernel
            kk = wq.shape[-1]
            up = np.zeros((a.shape[0], 2 * a.shape[1] - 1, 2 * a.shape[2] - 1))
            up[:, ::2, ::2] = a
            acc = correlate(up, wq.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1], kk - 1 - pad[0],
                            kk - 1 - pad[0] + opad[0]) + bq
        else:
            acc = correlate(a, wq, pad[0], pad[0]) + bq
        if k == len(h.layers) - 1:
            return acc / (scale * 2.0 ** EXACT_FRAC)
        a = np.round(acc / scale)
        if slope is not None:
            a = np.where(a < 0, np.round(a * slope), a)
        a = np.clip(a, -lim, lim)


def test_exact_entropy_parameters_do_not_depend_on_summation_order(tissue):
    """Format 2's h_s sums integers below 2**53 in float64, so any order gives the same
    bits: here each layer's sum is split over its input channels in three parts, added
    last part first, and must match to the last bit (and stay near the float h_s)."""
    import torch.nn.functional as F
    from wsicodec.learned.exact import EXACT_ACT_BITS, EXACT_FRAC
    model = load_model().model
    h = model.h_s_exact()
    g = torch.Generator().manual_seed(3)
    med = model.entropy_bottleneck._get_medians().reshape(1, -1, 1, 1).double()
    z_hat = torch.round(torch.randn(1, model.config.N, 6, 5, generator=g, dtype=torch.float64) * 4) + med
    with torch.no_grad():
        for quality in (1.0, 3.7, 8.0):
            ref = h(z_hat, quality)
            lim = float(2 ** EXACT_ACT_BITS - 1)
            a = torch.round(z_hat / h.hgain(quality) * 2.0 ** EXACT_FRAC).clamp(-lim, lim)
            for k, (deconv, wq, bq, stride, pad, opad, scale, slope) in enumerate(_transposed(model).layers):
                cin = a.shape[1]
                parts = [slice(0, cin // 3), slice(cin // 3, 2 * cin // 3), slice(2 * cin // 3, cin)]
                acc = bq.reshape(1, -1, 1, 1)
                for sl in reversed(parts):
                    if deconv:
                        acc = F.conv_transpose2d(a[:, sl], wq[sl], None, stride, pad, opad) + acc
                    else:
                        acc = F.conv2d(a[:, sl], wq[:, sl], None, stride, pad) + acc
                assert torch.equal(acc, torch.round(acc)) and acc.abs().max() < 2.0 ** 53
                if k == len(h.layers) - 1:
                    out = acc / (scale * 2.0 ** EXACT_FRAC)
                    break
                a = torch.round(acc / scale)
                if slope is not None:
                    a = torch.where(a < 0, torch.round(a * slope), a)
                a = a.clamp(-lim, lim)
            assert torch.equal(out, ref)
            _, hgain = model.gains(torch.tensor([quality]), torch.float64)
            flt = model.h_s_float64()(z_hat / hgain.double())
            assert (ref - flt).abs().max() < 1e-2 and (ref - flt).abs().mean() < 1e-4


def test_exact_h_s_computes_only_the_part_asked_for_with_the_same_bits():
    """The last layer computes just y's size (17² of 20² for a real tile): the values are
    those of the full output there, to the last bit, at every size and position."""
    model = load_model().model
    h = model.h_s_exact()
    g = torch.Generator().manual_seed(5)
    med = model.entropy_bottleneck._get_medians().reshape(1, -1, 1, 1).double()
    z_hat = torch.round(torch.randn(1, model.config.N, 6, 5, generator=g, dtype=torch.float64) * 4) + med
    full = h(z_hat, 4.0)
    assert full.shape[-2:] == (24, 20)
    for size in ((21, 17), (24, 20), (1, 1), (23, 20), (24, 3), (30, 30)):
        part = h(z_hat, 4.0, size)
        want = full[..., :size[0], :size[1]]
        assert part.shape == want.shape and torch.equal(part, want), size
    mu, index = model.entropy_parameters(z_hat, torch.tensor([4.0]), size=(21, 17))
    mu_full, index_full = model.entropy_parameters(z_hat, torch.tensor([4.0]))
    assert torch.equal(mu, mu_full[..., :21, :17]) and torch.equal(index, index_full[..., :21, :17])
    mu1, _ = model.entropy_parameters(z_hat, torch.tensor([4.0]), exact=False, size=(21, 17))
    assert mu1.shape == mu.shape                       # format 1 (float64 h_s) is cropped too
    # a last layer that is not a centred stride-1 conv is computed whole, never cut wrongly
    from wsicodec.learned.exact import ExactHyperSynthesis
    odd = torch.nn.Sequential(torch.nn.ConvTranspose2d(4, 6, 5, 2, 2, 1), torch.nn.LeakyReLU(),
                              torch.nn.Conv2d(6, 4, 3, 1, 0))
    hx = ExactHyperSynthesis(odd, torch.zeros(2, 4), 2)
    zx = torch.round(torch.randn(1, 4, 5, 5, generator=g, dtype=torch.float64) * 4)
    assert torch.equal(hx(zx, 1.0, (3, 3)), hx(zx, 1.0))


def test_entropy_chunks_spread_a_grid_over_the_cores():
    """A cold tile's 9 streams go in one chunk per core (one batched h_s pass each, on a
    2-core CPU 5 + 4); a whole level's in chunks of at most ENTROPY_CHUNK."""
    from wsicodec.learned.grid import ENTROPY_CHUNK, chunk_size
    assert chunk_size(9, 2) == 5 and chunk_size(9, 16) == 1 and chunk_size(9, 1) == ENTROPY_CHUNK
    assert chunk_size(256, 2) == chunk_size(256, 64) == ENTROPY_CHUNK
    assert chunk_size(0, 2) == chunk_size(1, 2) == 1 and chunk_size(9) >= 1


def test_exact_exp_is_exp():
    import math
    from wsicodec.learned.exact import exact_exp
    for v in np.linspace(-40.0, 40.0, 4001).tolist() + [0.0, -1e-300, 1e-12, 700.0, -700.0]:
        assert exact_exp(v) == pytest.approx(math.exp(v), rel=4e-16, abs=0)


def test_refine_is_validated():
    for bad in (-1, 1001, 2.5, True, "40"):
        with pytest.raises(InvalidSettingError, match="refine"):
            LearnedCodec(4, refine=bad)


@pytest.mark.parametrize("quality,kappa", [(2, None), (7, None), (3, 0.5)])
def test_refine_codes_a_real_tile_cheaper_and_decodes_with_any_decoder(tissue, quality, kappa,
                                                                      monkeypatch):
    """Also with the decoder's reconstruction κ (the search scores the pixels it shows)."""
    if kappa is not None:
        from dataclasses import replace

        m = load_model(DEFAULT_WEIGHTS).model
        monkeypatch.setattr(m, "config", replace(m.config, reconstruction=(kappa,)))
    tile = np.ascontiguousarray(tissue[256:512, 256:512])
    plain = LearnedCodec(quality).encode(tile)
    refined = LearnedCodec(quality, refine=12).encode(tile)
    assert refined != plain
    assert LearnedCodec(quality, refine=12).encode(tile) == refined   # the search is seeded
    out = LearnedCodec(quality).decode(refined)                       # a decoder without refine
    assert out.shape == tile.shape and out.dtype == np.uint8
    # measured on the real bytes and pixels, not on the search's own estimate
    assert _coded_cost(tile, refined, quality) < 0.99 * _coded_cost(tile, plain, quality)


def _refine_inputs(tissue: np.ndarray):
    """(model, x, quality, y, z): the shipped network, the image's top-left 128² and g_a's
    latents of it at quality 4, as refine_latents takes them (y, z plain tensors)."""
    m = load_model(DEFAULT_WEIGHTS).model
    x = torch.from_numpy(np.ascontiguousarray(tissue[:128, :128])).permute(2, 0, 1)[None].float() / 255
    q = torch.tensor([4.0])
    with torch.inference_mode():
        y, z = m.analysis(x, q)
    return m, x, q, y.clone(), z.clone()


def test_refine_keeps_the_best_latents_and_only_counts_shown_pixels(tissue):
    from wsicodec.learned.refine import refine_latents
    m, x, q, y, z = _refine_inputs(tissue)
    shown = torch.zeros(1, 1, 128, 128)
    shown[..., 8:120, 8:120] = 1
    y2, z2, info = refine_latents(m, x, q, y, z, shown, steps=6)
    hist = info["history"][0]
    assert hist.shape == (7,) and float(info["loss0"][0]) == float(hist[0])
    assert float(info["loss"][0]) == float(hist.min()) < float(hist[0])
    assert y2.shape == y.shape and z2.shape == z.shape and not torch.equal(y2, y)
    # pixels outside `shown` do not count: a garbage margin costs nothing
    x_bad = x.clone()
    x_bad[..., :8, :] = 1 - x_bad[..., :8, :]
    _, _, info_bad = refine_latents(m, x_bad, q, y, z, shown, steps=0)
    assert torch.allclose(info_bad["loss0"], info["loss0"])


def test_refine_holds_the_latents_it_is_told_to_and_z(tissue):
    from wsicodec.learned.refine import refine_latents
    m, x, q, y, z = _refine_inputs(tissue)
    hold = torch.zeros_like(y, dtype=torch.bool)
    hold[..., :2, :] = True                                  # the two rows a neighbour above sees
    shown = torch.ones(1, 1, 128, 128)
    shown[..., :16, :] = 5                                   # weights are allowed
    y2, z2, info = refine_latents(m, x, q, y, z, shown, steps=6, hold=hold)
    assert torch.equal(y2[hold], y[hold]) and torch.equal(z2, z)
    assert not torch.equal(y2[~hold], y[~hold])
    assert float(info["loss"][0]) < float(info["loss0"][0])


def test_quality_scale_spans_the_whole_ladder_whatever_its_length():
    """Quality 1..8 maps onto the λ knots evenly; with 8 knots it is the knot index itself,
    so containers written by 8-level weights decode with exactly the gains they were coded with."""
    from wsicodec.learned.network import ModelConfig, WsiHyperprior

    eight = WsiHyperprior(ModelConfig(N=8, M=12, lambdas=(1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2, 0.128)))
    q = torch.tensor([1.0, 2.0, 3.5, 8.0])
    assert torch.equal(eight.position(q), q - 1)
    g, _ = eight.gains(torch.tensor([3.0]))
    assert torch.equal(g[0, :, 0, 0], torch.exp(eight.log_gain[2]))
    ten = WsiHyperprior(ModelConfig(N=8, M=12, lambdas=tuple(1e-3 * 2 ** i for i in range(10))))
    pos = ten.position(torch.tensor([0.0, 1.0, 4.5, 8.0, 9.0]))      # clamped to 1..8
    assert torch.allclose(pos, torch.tensor([0.0, 0.0, 4.5, 9.0, 9.0]))
    lam = ten.lambda_at(torch.tensor([1.0, 8.0, 1 + 7 / 9]))         # ends and the 2nd knot
    assert torch.allclose(lam, torch.tensor([1e-3, 0.512, 2e-3]), rtol=1e-5)
    mid = ten.lambda_at(torch.tensor([1 + 3.5 * 7 / 9]))            # halfway between knots 4 and 5
    assert torch.allclose(mid, torch.tensor([1e-3 * 2 ** 3.5]), rtol=1e-5)


def test_hard_rate_is_the_coders_rate(tissue):
    """``forward(hard=True)`` prices the rounded symbols: the bytes the coder writes
    (tile headers and rANS flush apart); the noisy training estimate is not that."""
    model = load_model().model
    crop = np.ascontiguousarray(tissue[:512, :512])
    x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255
    for q in (2.0, 8.0):
        with torch.no_grad():
            out = model(x, torch.tensor([q]), hard=True)
        est = (out["bits_y"] + out["bits_z"]).item()
        real = 8 * len(LearnedCodec(q, margin=0).encode(crop))
        assert 0.97 * real < est < real, (q, est, real)


def test_bench_tile_path_prices_and_scores_tiles_as_the_codec_codes_them(tissue):
    """bench/tilecode.py (the experiments' copy of the encoder path up to y's symbols):
    with plain rounding, its bytes per tile are the codec's stream lengths, and its whole-
    plane decode the pixels wsicodec.decode stitches, glass tiles included."""
    import sys
    from wsicodec.image import read_stream
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import tilecode

    img = np.full((512, 300, 3), 228, np.uint8)        # glass below, tissue above
    img[:256] = tissue[:256, :300]
    codec = LearnedCodec(quality=3.5)
    m = codec.loaded.model
    tables = codec.loaded.model.coding_tables()
    got = list(tilecode.tiles(m, tables, img, 3.5))
    assert sum(isinstance(t, tilecode.Glass) for t in got) == 2 and len(got) == 4
    data = wsicodec.encode(img, quality=3.5)
    parts = []
    for t, stream in zip(got, read_stream(data).tiles):
        if isinstance(t, tilecode.Glass):
            assert t.nbytes == len(stream)
            parts.append((t, None))
        else:
            y_sym = torch.round(t.y - t.mu)
            assert t.side_bytes + tilecode.stream_bytes(y_sym[0], t.index[0], tables[1]) == len(stream)
            parts.append((t, m.reconstruct(y_sym, t.mu, t.index, 3.5)))    # as the decoder does
    mine = tilecode.image_pixels(m, img.shape, parts)
    theirs = wsicodec.decode(data).astype(np.float64)
    assert np.abs(mine - theirs).max() <= 2            # a whole-plane g_s vs the 2-latent ring
    assert tilecode.image_sse(m, img, parts) == pytest.approx(float(((theirs - img) ** 2).sum()), rel=2e-3)


def test_rate_budget_splits_every_byte_and_prices_symbols_as_the_gaussian_does(tissue):
    """bench/rate_budget.py: the parts of a stream add up to its length, with one header per
    network tile and glass tiles whole; its ideal code length is −log2 of the discretised
    Gaussian's mass (checked against the normal CDF directly) and the coded y streams sit
    just above the ideal length under the table's σ."""
    import math
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import rate_budget
    from wsicodec.learned import NETWORK_HEADER_BYTES

    img = np.full((512, 300, 3), 228, np.uint8)        # two glass tiles, two with tissue
    img[:256] = tissue[:256, :300]
    data = wsicodec.encode(img, quality=3)
    split = rate_budget.split_stream(data)
    assert (split["network_tiles"], split["glass_tiles"]) == (2, 2)
    assert split["stream"] == 52 + 8 * 4 and split["header"] == 2 * NETWORK_HEADER_BYTES
    assert sum(split[k] for k in ("stream", "header", "z", "y", "glass")) == len(data)
    assert 0 < split["glass"] < 2 * 40 and split["y"] > 10 * split["z"] > 0

    upper = lambda v: 0.5 * math.erfc(v / math.sqrt(2))      # noqa: E731  P(X > v), X ~ N(0, 1)
    s = torch.tensor([0.0, 2.0, -3.0, 40.0])
    sig = torch.tensor([1.0, 0.7, 2.5, 3.0])
    want = sum(-math.log2(upper((abs(a) - 0.5) / b) - upper((abs(a) + 0.5) / b)) if a else
               -math.log2(1 - 2 * upper(0.5 / b)) for a, b in zip(s.tolist(), sig.tolist()))
    assert math.isfinite(want) and want > 100                # 40 at σ 3 lies 13σ out: ~1e-39
    assert rate_budget.ideal_bits(s, sig) == pytest.approx(want, rel=1e-9)

    codec = LearnedCodec(quality=3)
    priced = rate_budget.model_prices(codec.loaded.model, codec.loaded.model.coding_tables(), img, 3)
    assert priced["y"] == split["y"]
    assert 1.0 < 8 * priced["y"] / priced["ideal_table_bits"] < 1.05
    assert 0.99 < priced["ideal_table_bits"] / priced["ideal_exact_bits"] < 1.02


@pytest.mark.parametrize("cin,cout,shape", [(96, 3, (9, 13)), (5, 7, (1, 1)), (4, 16, (6, 3))])
def test_subpixel_form_is_the_transposed_convolution(cin, cout, shape):
    """FastTransform's rewrite of a 5x5 stride-2 transposed convolution (3x3 conv + pixel
    shuffle) computes the same map, borders included, whatever the sizes."""
    from wsicodec.learned.fast import SubPixelDeconv
    from wsicodec.learned.network import _deconv
    g = torch.Generator().manual_seed(cin * cout)
    deconv = _deconv(cin, cout)
    with torch.no_grad():
        for p in deconv.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        x = torch.randn(2, cin, *shape, generator=g)
        ref = deconv(x)
        out = SubPixelDeconv(deconv)(x)
    assert out.shape == ref.shape == (2, cout, 2 * shape[0], 2 * shape[1])
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    with pytest.raises(ValueError):
        SubPixelDeconv(torch.nn.ConvTranspose2d(3, 3, 3, stride=2, padding=1, output_padding=1))


def test_exact_entropy_parameters_are_the_same_bits_from_another_blas(tissue):
    """The tile format 2 promise, checked against a second implementation: numpy with
    OpenBLAS gives the very bits torch (MKL) gives, on ẑ of a real tile at 3 qualities."""
    model = load_model().model
    h = model.h_s_exact()
    x = torch.from_numpy(np.ascontiguousarray(tissue[:272, :272])).permute(2, 0, 1)[None].float() / 255
    med = model.entropy_bottleneck._get_medians().reshape(1, -1, 1, 1)
    for quality in (1.0, 4.5, 8.0):
        with torch.no_grad():
            _, z = model.analysis(x, torch.tensor([quality]))
            z_hat = (torch.round(z - med) + med).double()
            ref = h(z_hat, quality)
        other = _np_exact_h_s(_transposed(model), z_hat[0].numpy(), quality)   # its weights whole
        assert other.shape == tuple(ref.shape[1:])
        assert np.array_equal(other, ref[0].numpy())


def test_bin_centroid_offset_is_the_gaussian_bin_mean():
    from wsicodec.learned.network import bin_centroid_offset

    s = torch.tensor([0.0, 1.0, -1.0, 2.0, -3.0, 1.0, 4.0], dtype=torch.float64)
    sigma = torch.tensor([0.3, 0.3, 0.3, 1.0, 2.5, 100.0, 0.5], dtype=torch.float64)
    got = bin_centroid_offset(s, sigma)
    for si, sg, g in zip(s.tolist(), sigma.tolist(), got.tolist()):
        v = torch.linspace(si - 0.5, si + 0.5, 400001, dtype=torch.float64)
        w = torch.exp(-0.5 * (v / sg) ** 2)
        assert g == pytest.approx(float(torch.trapezoid(v * w, v) / torch.trapezoid(w, v)) - si, abs=1e-7)
    assert got[0] == 0 and got[1] == -got[2] and got[1] < -0.3 and abs(got[5]) < 1e-4
    assert bin_centroid_offset(torch.tensor([9.0], dtype=torch.float64),     # beyond float64's
                               torch.tensor([0.11], dtype=torch.float64)).item() == 0   # tail


def test_reconstruction_of_large_symbols_uses_the_formula_for_them_alone():
    """Symbols beyond the centroid table (|s| ≥ 32) get the formula, the rest the table:
    together what the formula gives every symbol, each in its own place."""
    from wsicodec.learned.network import bin_centroid_offset

    m = LearnedCodec(quality=2).loaded.model
    gen = torch.Generator().manual_seed(7)
    shape = (1, m.config.M, 8, 8)
    s = torch.randint(-3, 4, shape, generator=gen).to(torch.int32)
    far = torch.rand(shape, generator=gen) < 0.02
    s[far] = torch.randint(32, 300, (int(far.sum()),), generator=gen).to(torch.int32) \
        * torch.where(torch.rand(int(far.sum()), generator=gen) < 0.5, -1, 1).to(torch.int32)
    tables = m.gaussian_conditional.scale_table.numel()
    index = torch.randint(0, tables, shape, generator=gen).to(torch.int32)
    mu = torch.randn(shape, generator=gen, dtype=torch.float64) * 5
    kappa = 0.5
    got = m.reconstruct(s, mu, index, 2.0, kappa=kappa)
    sigma = m.gaussian_conditional.scale_table.to(torch.float64)[index.long()]
    want = s.double() + mu + kappa * bin_centroid_offset(s.double(), sigma)
    assert far.any() and (s.abs() >= 32).sum() == far.sum()
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_reconstruction_moves_pixels_never_symbols(tissue, monkeypatch):
    """κ > 0 (ModelConfig.reconstruction) decodes the same stream (symbol checksum holds)
    to other pixels, closer to the source at a low quality; κ interpolates over 1..8."""
    from dataclasses import replace

    codec = LearnedCodec(quality=2)
    m = codec.loaded.model
    tile = tissue[:256, :256]
    data = codec.encode(tile)
    plain = codec.decode(data)
    monkeypatch.setattr(m, "config", replace(m.config, reconstruction=(0.6, 0.5, 0.5, 0.5, 0.4, 0.2, 0.0, 0.0)))
    assert m.reconstruction_kappa(1) == 0.6 and m.reconstruction_kappa(8) == 0.0
    assert m.reconstruction_kappa(5.5) == pytest.approx(0.3) and m.reconstruction_kappa(0.5) == 0.6
    moved = codec.decode(data)
    assert (moved != plain).any()
    assert _psnr(moved, tile) > _psnr(plain, tile)
    assert codec.encode(tile) == data                       # the encoder does not use it


def test_latents_kept_for_neighbours_hold_no_autograd_graph(tissue):
    """A loaded model needs no gradients, so what is derived from it and kept (a reader's
    latent cache, the auto encoder's rows of latents) is the tensor alone: a latent
    divided by its gain once kept the gained latent alive beside it, twice the memory."""
    from wsicodec.learned.tileformat import parse_header

    codec = LearnedCodec(4)
    data = codec.encode(np.ascontiguousarray(tissue[:256, :256]))
    lat = codec.decoder.latents(data, parse_header(data), "tile")
    assert lat.shape[1] == codec.decoder.model.config.M
    assert not lat.requires_grad and lat.grad_fn is None
    assert not any(p.requires_grad for p in load_model().model.parameters())


def test_a_bare_neighbours_second_pass_latents_read_only_its_pixels_near_the_seam(tissue, monkeypatch):
    """side_latents codes a bare neighbour's SIDE_REACH px nearest the seam, not all of it:
    the stitched window's rows of it come out bit for bit as from the whole neighbour, on
    every side (a partial neighbour below, a full one above); a crop inside g_a's reach
    (80 px) would change them, so the test sees a reach too short."""
    from wsicodec.learned import secondpass as dec
    from wsicodec.learned.decoder import TileDecoder
    from wsicodec.learned.synthesis import STITCH_RING
    shipped = dec.SIDE_REACH
    codec = LearnedCodec()
    d = TileDecoder(codec.loaded, codec.device, codec.precision, 2, mixed=True)
    first = np.ascontiguousarray(tissue[:256, :256])
    near = {(1, 0): tissue[256:256 + 176, :256], (-1, 0): tissue[400:656, :256],
            (0, 1): tissue[:256, 256:512], (0, -1): tissue[:256, 600:856]}

    def ring(side, reach):
        monkeypatch.setattr(dec, "SIDE_REACH", reach)
        y = dec.side_latents(d, first, side, np.ascontiguousarray(near[side]))
        dr, dc = side
        cut = slice(0, STITCH_RING) if dr + dc > 0 else slice(-STITCH_RING, None)
        return y[..., cut, :] if dr else y[..., cut]

    for side in near:
        whole = ring(side, 10_000)
        assert torch.equal(ring(side, shipped), whole), side
    assert any(not torch.equal(ring(s, 80), ring(s, 10_000)) for s in ((-1, 0), (0, -1)))


def test_stitching_crop_is_the_part_of_a_tile_its_stitched_neighbours_read():
    """Along each axis, the reach at the edge every reading neighbour faces, where they
    all lie on one side and the crop starts on the latent grid; else the whole axis."""
    from wsicodec.learned.grid import stitching_crop

    def crop(shape, toward):
        return stitching_crop(shape, toward, 128, 16)

    assert crop((256, 256), None) == ((0, 256), (0, 256))
    assert crop((256, 256), [(-1, 0)]) == ((0, 128), (0, 256))               # above: top rows
    assert crop((256, 256), [(0, 1), (1, 1)]) == ((0, 256), (128, 256))      # right side and corner
    assert crop((256, 256), [(1, 1)]) == ((128, 256), (128, 256))             # a corner alone
    assert crop((256, 256), [(-1, 0), (1, 0)]) == ((0, 256), (0, 256))       # both sides
    assert crop((256, 256), [(-1, -1), (1, 1)]) == ((0, 256), (0, 256))
    assert crop((208, 256), [(1, 0)]) == ((80, 208), (0, 256))
    assert crop((200, 256), [(1, 0)]) == ((0, 200), (0, 256))                # 72: off the grid
    assert crop((200, 256), [(-1, 0)]) == ((0, 128), (0, 256))
    assert crop((128, 256), [(-1, 0)]) == ((0, 128), (0, 256))               # no more than the tile
    assert crop((256, 256), []) == ((0, 256), (0, 256))


def test_a_bare_tiles_latents_are_coded_only_where_its_stitched_neighbours_read_them(tissue, monkeypatch):
    """pixel_latents toward some neighbours codes the part of the tile they read: their
    rows of it are bit for bit those of the whole tile (every side and corner, a full and a
    partial tile), the rest is zeros; a reach inside g_a's (80 px) would change them, so
    the test sees a reach too short."""
    from wsicodec.learned import decoder as dec
    from wsicodec.learned.decoder import TileDecoder
    from wsicodec.learned.synthesis import STITCH_RING as S
    shipped = dec.SIDE_REACH
    codec = LearnedCodec()
    d = TileDecoder(codec.loaded, codec.device, codec.precision, 2, mixed=True)
    dirs = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc]

    def read(y, toward):                       # what the neighbours toward there read of y
        rows = {-1: slice(0, S), 0: slice(None), 1: slice(-S, None)}
        return [y[..., rows[dr], rows[dc]] for dr, dc in toward]

    def latents(tile, toward, reach):
        monkeypatch.setattr(dec, "SIDE_REACH", reach)
        return d.pixel_latents(tile, toward)

    too_short = False
    for tile in (np.ascontiguousarray(tissue[100:356, 300:556]), np.ascontiguousarray(tissue[:208, 600:840])):
        whole = d.pixel_latents(tile)
        for toward in [[t] for t in dirs] + [[(-1, 0), (-1, 1), (0, 1)], [(1, -1), (1, 0)], [(-1, 0), (1, 0)]]:
            y = latents(tile, toward, shipped)
            assert y.shape == whole.shape
            assert all(torch.equal(a, b) for a, b in zip(read(y, toward), read(whole, toward))), toward
            if toward in ([(-1, 0)], [(0, 1)], [(1, 1)]):
                assert (y == 0).any(dim=1).any() and not torch.equal(y, whole)    # cut, not whole
            short = latents(tile, toward, 80)
            too_short |= not all(torch.equal(a, b) for a, b in zip(read(short, toward), read(whole, toward)))
    assert too_short


def test_a_reader_caches_a_bare_tiles_latents_cut_to_its_stitched_neighbours(tissue, monkeypatch):
    """In a mixed grid a bare tile's latents are coded toward the stitched tiles beside it
    only (network tiles to its left, glass to its right): the grid decodes to the same
    pixels as with its whole latents, and the cache holds the cut ones."""
    import imagecodecs

    from wsicodec.codecs import get_codec
    from wsicodec.image import context_region
    from wsicodec.learned import decoder as dec
    t = 256
    img = np.ascontiguousarray(tissue[:2 * t, :3 * t])
    learned = LearnedCodec(4)
    regions, boxes = zip(*(context_region(img, slice(r * t, (r + 1) * t), slice(c * t, (c + 1) * t),
                                          learned.context) for r in range(2) for c in range(2)))
    net = learned.encode_tiles(list(regions), list(boxes))
    glass = get_codec("auto", 4).encode_tiles([np.full((t, t, 3), 235, np.uint8)])[0]
    bare = imagecodecs.jpegxl_encode(np.ascontiguousarray(img[:t, 2 * t:]), distance=1.0)
    tiles = {(0, 0): net[0], (1, 0): net[1], (2, 0): bare, (0, 1): net[2], (1, 1): glass, (2, 1): glass}
    auto = get_codec("auto", 4)
    keys = sorted(tiles)

    def decode(cache=None):
        return auto.decode_tiles(keys, lambda c, r: tiles[(c, r)], (3, 2), cache=cache, cache_tag="l0")

    cache = auto.new_cache(t, 8)
    cut = decode(cache)
    lat = cache.begin(("l0", 2, 0))
    assert lat is not None and (lat[..., :, :8] != 0).any() and (lat[..., :, 8:] == 0).all()
    monkeypatch.setattr(dec, "stitching_crop", lambda shape, toward, reach, stride: ((0, shape[0]), (0, shape[1])))
    for a, b in zip(cut, decode()):
        assert np.array_equal(a, b)
