"""The learned codec: round trips, determinism, damage detection, model ids, background."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import wsicodec
from conftest import DATA, FIXTURES, HE_TEST_PNG, need, other_weights, psnr as _psnr
from wsicodec.checkpoint import DEFAULT_WEIGHTS, load_model
from wsicodec.errors import CorruptDataError, CorruptTileError, InvalidSettingError, ModelMismatchError
from wsicodec.learned import LearnedCodec, is_uniform, parse_header

TILES = DATA / "he" / "tiles"
TEST = DATA / "he" / "test"

pytestmark = pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped weights missing")


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    if not TEST.is_dir():
        pytest.skip(f"real H&E images not found at {TEST}")
    return _png(sorted(TEST.glob("*.png"))[0])


@pytest.mark.parametrize("shape", [(1, 1), (257, 3), (3, 257), (219, 301)])
def test_odd_sizes_round_trip(tissue, shape):
    img = np.ascontiguousarray(tissue[: shape[0], : shape[1]])
    out = wsicodec.decode(wsicodec.encode(img, quality=8))
    assert out.shape == img.shape and out.dtype == np.uint8
    if img.size > 3:
        assert _psnr(img, out) > 20


def test_1000x1000_round_trip_and_rate_ordering(tissue):
    small = wsicodec.encode(tissue, quality=1)
    big = wsicodec.encode(tissue, quality=8)
    assert len(small) < len(big)
    out = wsicodec.decode(big)
    assert out.shape == tissue.shape
    assert _psnr(tissue, out) > _psnr(tissue, wsicodec.decode(small))


def test_every_quality_step_costs_more_bytes_and_gives_more_psnr(tissue):
    """Quality 1 is the smallest setting: weights whose lowest knot coded bigger than quality 2
    (as one α > 0 continuation did) must not ship."""
    crop = np.ascontiguousarray(tissue[:512, :512])
    streams = [wsicodec.encode(crop, quality=q) for q in range(1, 9)]
    sizes = [len(s) for s in streams]
    assert sizes == sorted(sizes) and len(set(sizes)) == 8, sizes
    psnrs = [_psnr(crop, wsicodec.decode(s)) for s in streams]
    assert psnrs == sorted(psnrs), psnrs


def test_fractional_quality_between_neighbours(tissue):
    crop = np.ascontiguousarray(tissue[:256, :256])
    sizes = [len(LearnedCodec(q).encode(crop)) for q in (3.0, 3.5, 4.0)]
    assert sizes[0] <= sizes[1] <= sizes[2]


@pytest.mark.parametrize("name", ["tissue-level0-4302-10273-4814-10785.png", "tcga-lung-rgb.png",
                                  "high-nuclei-score-level2.png"])
def test_real_tiles_round_trip(name):
    path = TILES / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    img = _png(path)[:256, :256]
    codec = LearnedCodec(6)
    data = codec.encode(img)
    assert parse_header(data).kind == 0          # tissue is network-coded
    out = codec.decode(data)
    assert out.shape == img.shape
    assert _psnr(img, out) > 22


def test_decoding_is_identical_across_threads_and_batch_sizes(tissue):
    tiles = [np.ascontiguousarray(tissue[y:y + 256, x:x + 256]) for y in (0, 256, 512, 744)
             for x in (0, 256, 512, 744)]
    codec = LearnedCodec(5)
    streams = codec.encode_tiles(tiles)
    threads = torch.get_num_threads()
    try:
        results = []
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            # decode_batch raises if any tile's symbols differ from the encoder's
            results.append(codec.decode_alone(streams))                    # batch of 16
            results.append([codec.decode(s) for s in streams])             # batch of 1
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            # symbols are identical (checksummed); g_s float sums may move a pixel by 1
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA GPU here (bench/gpu_decode.py measured the last one lent)")
def test_tiles_cross_between_cpu_and_gpu(tissue):
    tiles = [np.ascontiguousarray(tissue[y:y + 256, x:x + 256]) for y in (0, 256) for x in (0, 256)]
    cpu, gpu = LearnedCodec(4, device="cpu"), LearnedCodec(4, device="cuda")
    streams = cpu.encode_tiles(tiles)
    # the symbols are checksummed; only g_s's float arithmetic differs between devices
    for a, b in zip(cpu.decode_alone(streams), gpu.decode_alone(streams)):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
    for tile, out in zip(tiles, cpu.decode_alone(gpu.encode_tiles(tiles))):
        assert _psnr(out, tile) > 25
    # stitched: a 2 x 2 grid decoded with its neighbours' latents on either device
    grid = {(c, r): s for (c, r), s in zip([(0, 0), (1, 0), (0, 1), (1, 1)], streams)}
    a = cpu.decode_tiles(list(grid), lambda c, r: grid[(c, r)], (2, 2))
    b = gpu.decode_tiles(list(grid), lambda c, r: grid[(c, r)], (2, 2))
    for x, y in zip(a, b):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 2
    # the entropy parameters stay on the CPU model, whatever device g_a/g_s ran on
    assert {p.device.type for p in cpu.loaded.model.parameters()} == {"cpu"}


def test_the_network_on_another_device_is_one_shared_copy():
    loaded = load_model()
    assert loaded.on(torch.device("cpu")) is loaded.model
    # "meta" stands in for a GPU here: same code path, no memory, no arithmetic
    other = loaded.on(torch.device("meta"))
    assert other is not loaded.model and loaded.on("meta") is other
    assert {p.device.type for p in other.parameters()} == {"meta"}
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}


def test_fast_transforms_match_g_a_and_g_s():
    """The inference copies of g_a and g_s (channels-last, frozen GDN) compute the same maps."""
    model = load_model().model
    y = torch.randn(2, model.config.M, 5, 7, generator=torch.Generator().manual_seed(0)) * 3
    q = torch.tensor([1.0, 6.5])
    with torch.no_grad():
        fast = model.synthesis(y, q)
        ref = model.g_s(y / model.gains(q)[0])
    assert fast.shape == ref.shape == (2, 3, 80, 112) and fast.is_contiguous()
    # same maps, other summation order: float32 rounding apart, relative to the output's scale
    assert (fast - ref).abs().max() <= 1e-5 * ref.abs().max()
    with torch.enable_grad():       # training keeps the autograd-friendly g_s
        assert model.synthesis(y, q).requires_grad
    x = torch.rand(2, 3, 64, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_fast, z_fast = model.analysis(x, q)
        gain, hgain = model.gains(q)
        y_ref = model.g_a(x) * gain
    assert (y_fast - y_ref).abs().max() <= 1e-5 * y_ref.abs().max()
    assert z_fast.shape == (2, model.config.N, 1, 2)


@pytest.mark.parametrize("version", [1, 2])
def test_entropy_parameter_mismatch_is_a_clear_error(tissue, monkeypatch, version):
    """A decoder whose entropy parameters differ from the encoder's (here: h_s's weights
    1 % off, in the path of the tile's format) fails the symbol CRC, naming the tile."""
    import wsicodec.learned.tileformat as learned
    codec = LearnedCodec(5)
    with monkeypatch.context() as mp:
        mp.setattr(learned, "VERSION", version)
        data = codec.encode(np.ascontiguousarray(tissue[:256, :256]))
    assert parse_header(data).version == version
    model = codec.loaded.model
    if version == 1:
        weights = [p for p in model.h_s_float64().parameters()]
    else:
        weights = [layer[1] for layer in model.h_s_exact().layers]
    saved = [w.detach().clone() for w in weights]
    try:
        with torch.no_grad():
            for w in weights:
                w.copy_(torch.round(w * 1.01) if version == 2 else w * 1.01)
        with pytest.raises(CorruptDataError, match=r"level 0 tile \(3, 4\): decoded symbols fail their checksum"):
            codec.decode_alone([data], names=["level 0 tile (3, 4)"])
    finally:
        with torch.no_grad():
            for w, s in zip(weights, saved):
                w.copy_(s)
    codec.decode(data)  # restored


def test_format_1_tiles_still_decode(tissue, monkeypatch):
    """Tiles written before the exact entropy parameters (format 1: h_s in float64) decode
    through that path; an unknown format is a clear error."""
    import wsicodec.learned.tileformat as learned
    tile = np.ascontiguousarray(tissue[100:356, 200:456])
    codec = LearnedCodec(4)
    with monkeypatch.context() as mp:
        mp.setattr(learned, "VERSION", 1)
        old = codec.encode(tile)
    new = codec.encode(tile)
    assert (parse_header(old).version, parse_header(new).version) == (1, 3)
    assert abs(len(old) - len(new)) <= 0.01 * len(new)       # the same code, other last bits
    a, b = codec.decode(old), codec.decode(new)
    assert _psnr(tile, a) > 28 and abs(_psnr(tile, a) - _psnr(tile, b)) < 0.05
    future = bytearray(new)
    future[4] = 4
    with pytest.raises(CorruptDataError, match="format version 4 is not supported .*reads 1, 2, 3"):
        codec.decode(bytes(future))


def test_format_2_streams_decode_as_the_release_that_wrote_them(tmp_path, format2):
    """tests/data/format2_q4.wsim: a 300² he/test crop coded by the release before stitched
    tiles (format 2: each tile coded with an 8 px margin), with the pixels that release
    decoded it to (format2_q4.json says with which weights and κ).  This release reads it
    the old way (no stitching): with that κ, to the same pixels; with its weights' own κ, to
    nearly the same.  Those weights come back from the git history once a retrained network
    has shipped (the ``format2`` fixture), as users of old containers get them.  Once g_s itself has been retuned (``export --synthesis``:
    same symbols), to pixels as close to the source as that release's."""
    from wsicodec.export import export
    made = format2
    data = (FIXTURES / "format2_q4.wsim").read_bytes()
    want = _png(FIXTURES / "format2_q4_decoded.png")
    from wsicodec.image import read_stream
    hd = parse_header(read_stream(data).tiles[0])
    assert hd.version == 2 and (hd.top, hd.left, hd.coded_height) == (0, 0, 264)   # tile + 8 px below
    pinned = tmp_path / "pinned.pt"
    export(made["weights"], pinned, reconstruction=made["reconstruction"])
    got = wsicodec.decode(data, model=str(pinned))
    assert got.shape == want.shape == (300, 300, 3)
    if not made["same_g_s"]:
        source = _png(need(HE_TEST_PNG))[100:400, 200:500]
        assert _psnr(source, got) > made["psnr_decoded"] - 0.3
        assert _psnr(source, wsicodec.decode(data)) > made["psnr_decoded"] - 0.3
        return
    # g_s float sums may move a pixel by one level on another CPU
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert _psnr(want, wsicodec.decode(data)) > 40


def test_stitched_tiles_have_no_seams_and_decode_alone(tissue):
    """Format 3: each tile's stream holds only its own latents and decodes alone (the same
    symbols: checksummed), but the image decoder joins neighbours' latents before g_s, so
    the pixels within 4 px of the internal tile borders are as good as the interior, which
    decoding tiles alone is not (their border latents describe pixels on both sides)."""
    img = np.ascontiguousarray(tissue[:768, :768])
    data = wsicodec.encode(img, quality=4, tile_size=256)
    stitched = wsicodec.decode(data)
    from wsicodec.image import read_stream
    streams = read_stream(data).tiles
    assert {parse_header(s).version for s in streams} == {3}
    assert all((parse_header(s).coded_height, parse_header(s).top) == (256, 0) for s in streams)
    alone = np.zeros_like(img)
    for k, t in enumerate(LearnedCodec(4).decode_alone(streams)):
        r, c = divmod(k, 3)
        alone[r * 256:(r + 1) * 256, c * 256:(c + 1) * 256] = t
    border = np.zeros(img.shape[:2], bool)
    for b in (256, 512):
        border[b - 4:b + 4, :] = border[:, b - 4:b + 4] = True

    def gap(out: np.ndarray) -> float:      # dB: interior PSNR minus border PSNR
        return _psnr(img[~border], out[~border]) - _psnr(img[border], out[border])

    assert gap(stitched) < 0.3, gap(stitched)
    assert gap(alone) > 3, gap(alone)
    assert _psnr(img, stitched) > _psnr(img, alone) + 0.3     # tiles alone are weaker well inside too


def test_stitching_next_to_glass_and_a_damaged_neighbour(tissue):
    """A tissue tile beside a glass tile (no latents: g_a's latent of the glass colour takes
    their place) keeps its border as well as the same image coded as one tile; a damaged neighbour costs a tile only that side's
    stitching, never an error, while the damaged tile itself is named."""
    from wsicodec.image import read_stream
    img = np.ascontiguousarray(tissue[:256, :512])
    img[:, 256:] = (236, 231, 240)                          # right tile: glass
    data = wsicodec.encode(img, quality=4)
    out = wsicodec.decode(data)
    assert (out[:, 256:] == (236, 231, 240)).all()
    edge = np.s_[:, 248:256]                    # a hard tissue/glass edge: costly anyway
    whole = wsicodec.decode(wsicodec.encode(img, quality=4, tile_size=512))   # one tile, no seam
    assert _psnr(img[edge], out[edge]) > _psnr(img[edge], whole[edge]) - 0.5
    codec = LearnedCodec(4)
    streams = dict(zip([(0, 0), (1, 0)], read_stream(data).tiles))
    damaged = dict(streams)
    damaged[(1, 0)] = streams[(1, 0)][:5] + b"\xff" + streams[(1, 0)][6:]
    res = codec.decode_tiles([(0, 0), (1, 0)], lambda c, r: damaged[(c, r)], (2, 1))
    assert isinstance(res[1], CorruptDataError) and "col=1 row=0" in str(res[1])
    assert isinstance(res[0], np.ndarray) and _psnr(img[:, :256], res[0]) > 28


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
            for k, (deconv, wq, bq, stride, pad, opad, scale, slope) in enumerate(h.layers):
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


def test_exact_exp_is_exp():
    import math
    from wsicodec.learned.exact import exact_exp
    for v in np.linspace(-40.0, 40.0, 4001).tolist() + [0.0, -1e-300, 1e-12, 700.0, -700.0]:
        assert exact_exp(v) == pytest.approx(math.exp(v), rel=4e-16, abs=0)


def test_flipped_byte_is_detected(tissue):
    data = bytearray(wsicodec.encode(np.ascontiguousarray(tissue[:300, :600]), quality=4))
    data[-10] ^= 0x40
    with pytest.raises(CorruptTileError, match=r"tile \(row 1, col 2\)"):
        wsicodec.decode(bytes(data))


def test_truncated_and_foreign_streams(tissue):
    data = wsicodec.encode(np.ascontiguousarray(tissue[:100, :100]))
    with pytest.raises(CorruptDataError):
        wsicodec.decode(data[:-5])
    with pytest.raises(CorruptDataError):
        wsicodec.decode(b"\x89PNG not ours")


@pytest.mark.parametrize("quality", [float("nan"), 0.5, 9.0, float("inf")])
def test_a_tile_header_with_an_impossible_quality_is_corrupt(tissue, quality):
    import struct
    data = bytearray(LearnedCodec(3).encode(np.ascontiguousarray(tissue[:64, :64])))
    data[10:14] = struct.pack("<f", quality)
    with pytest.raises(CorruptDataError, match="quality"):
        LearnedCodec(3).decode_alone([bytes(data)], names=["tile (0, 0)"])


def test_other_weights_are_refused_naming_both_ids(tissue, tmp_path):
    other = other_weights(tmp_path / "other.pt", "same network, different file")
    data = wsicodec.encode(np.ascontiguousarray(tissue[:64, :64]), model=str(other))
    ours, theirs = load_model().model_id, load_model(other).model_id
    with pytest.raises(ModelMismatchError) as exc:
        wsicodec.decode(data)
    assert theirs[:16] in str(exc.value) and ours[:16] in str(exc.value)
    assert wsicodec.decode(data, model=str(other)).shape == (64, 64, 3)
    assert "WSICODEC_MODEL_DIR" in str(exc.value)


def test_weights_are_found_by_id(tissue, tmp_path, monkeypatch):
    """Data made with earlier weights decodes once their file is in $WSICODEC_MODEL_DIR."""
    from wsicodec.checkpoint import find_weights, load_model_for, shipped_history
    folder = tmp_path / "models"
    other = other_weights(folder / "earlier.pt", "an earlier release")
    theirs = load_model(other).model_id
    tile = np.ascontiguousarray(tissue[:80, :96])
    data = wsicodec.encode(tile, model=str(other))
    monkeypatch.delenv("WSICODEC_MODEL_DIR", raising=False)
    assert find_weights(theirs) is None
    with pytest.raises(ModelMismatchError):
        wsicodec.decode(data)
    monkeypatch.setenv("WSICODEC_MODEL_DIR", str(folder))
    assert find_weights(theirs[:16]) == other.resolve()
    assert load_model_for(theirs).model_id == theirs
    assert np.array_equal(wsicodec.decode(data), wsicodec.decode(data, model=str(other)))
    # a path is the caller's own choice: one that does not exist is an error, never a
    # reason to look elsewhere (containers no longer record one: codec_from_dict drops it)
    with pytest.raises(InvalidSettingError, match="not found"):
        load_model_for(theirs, str(tmp_path / "gone" / "earlier.pt"))
    # every shipped model id is on record, the current one included
    assert load_model().model_id in [m["model_id"] for m in shipped_history()]


def test_settings_are_validated():
    for q in (0, 8.5, float("nan"), True, "four", [4]):
        with pytest.raises(InvalidSettingError, match="1..8"):
            LearnedCodec(q)
    with pytest.raises(InvalidSettingError, match="not found"):
        LearnedCodec(4, model="/nonexistent/weights.pt")
    with pytest.raises(InvalidSettingError):
        wsicodec.encode(np.zeros((10, 10), np.uint8))


def test_refine_is_validated():
    for bad in (-1, 1001, 2.5, True, "40"):
        with pytest.raises(InvalidSettingError, match="refine"):
            LearnedCodec(4, refine=bad)


def _coded_cost(tile: np.ndarray, data: bytes, quality: float) -> float:
    """bits/pixel + λ(q)·255²·MSE of a stream, from its real bytes and decoded pixels."""
    lam = float(load_model(DEFAULT_WEIGHTS).model.lambda_at(torch.tensor([quality]))[0])
    out = LearnedCodec(quality).decode(data).astype(np.float64)
    mse = float(np.mean((out - tile.astype(np.float64)) ** 2))
    return 8 * len(data) / (tile.shape[0] * tile.shape[1]) + lam * mse


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


def test_refine_keeps_the_best_latents_and_only_counts_shown_pixels(tissue):
    from wsicodec.learned.refine import refine_latents
    m = load_model(DEFAULT_WEIGHTS).model
    x = torch.from_numpy(np.ascontiguousarray(tissue[:128, :128])).permute(2, 0, 1)[None].float() / 255
    q = torch.tensor([4.0])
    with torch.inference_mode():
        y, z = m.analysis(x, q)
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


def _tissue_pixels(t: np.ndarray) -> int:
    """Independent tissue detector (histolab-like): stained or dark pixels."""
    f = t.astype(np.float32)
    mx, mn = f.max(2), f.min(2)
    saturation = (mx - mn) / np.maximum(mx, 1)
    return int(((saturation > 0.12) | (f.mean(2) < 200)).sum())


def test_background_rule_is_conservative():
    """Glass takes the few-byte path; no 256² tile with tissue in it ever does."""
    if not TILES.is_dir():
        pytest.skip(f"{TILES} not found")
    glass = tissue_tiles = tissue_hits = 0
    for path in sorted(TILES.glob("*.png")):
        img = _png(path)
        for y in range(0, img.shape[0] - 255, 256):
            for x in range(0, img.shape[1] - 255, 256):
                t = img[y:y + 256, x:x + 256]
                if _tissue_pixels(t) >= 500:
                    tissue_tiles += 1
                    tissue_hits += is_uniform(t)
                elif path.name.startswith(("no-tissue.png", "no-tissue2.png", "almost-white-1")):
                    glass += is_uniform(t)
    assert tissue_tiles >= 60
    assert tissue_hits == 0
    assert glass >= 10, glass
    codec = LearnedCodec(4)
    blank = np.full((256, 256, 3), 236, np.uint8)
    blank[::7, ::5] = 233
    blank[100, 100] = (40, 20, 90)                 # a speck is kept exactly
    data = codec.encode(blank)
    assert len(data) <= 32
    out = codec.decode(data)
    assert (out[100, 100] == (40, 20, 90)).all()
    assert np.abs(out.astype(int) - blank).max() <= 10
    assert _psnr(blank, codec.decode(data)) > 40


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


def test_compressai_is_loaded_without_its_eager_imports() -> None:
    """The learned codec needs compressai's entropy models, GDN and rANS only; its package
    __init__ would also import torch_geometric (half the load time).  compressai itself
    stays whole for code in the same process that uses the rest of it."""
    import subprocess
    import sys

    code = """
import sys, numpy as np, wsicodec
img = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
assert wsicodec.decode(wsicodec.encode(img, quality=3)).shape == img.shape
heavy = sorted(m for m in sys.modules if m.startswith(("torch_geometric", "compressai.datasets", "compressai.zoo")))
assert not heavy, heavy[:5]
import compressai
from compressai import datasets
from compressai.zoo import bmshj2018_factorized
assert compressai.get_entropy_coder() == "ans" and "ans" in compressai.available_entropy_coders()
assert compressai.models.__name__ == "compressai.models" and compressai.__version__.startswith("1.2")
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


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
        other = _np_exact_h_s(h, z_hat[0].numpy(), quality)
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


def test_an_image_stream_header_claiming_gigapixels_is_refused_at_once() -> None:
    """A few bytes whose header declares a 2**32-pixel-wide image: refused from the header,
    before the tile grid is enumerated or the output allocated."""
    import time

    from wsicodec.image import _HEAD, MAGIC, VERSION, decode
    for h, w, tile in ((2**32 - 1, 2**32 - 1, 16), (1000, 1000, 1), (100_000, 100_000, 4096)):
        head = _HEAD.pack(MAGIC, VERSION, 0, h, w, tile, bytes(32), 1)
        t0 = time.perf_counter()
        with pytest.raises(CorruptDataError, match="out of bounds"):
            decode(head + bytes(8))
        assert time.perf_counter() - t0 < 1.0
