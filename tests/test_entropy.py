"""The rANS coder (wsicodec.entropy) against CompressAI's, and the batched entropy paths
(exact h_s, tile decoding and encoding over many tiles) against one tile at a time."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from conftest import HE_TEST_PNG, REPO, need, textured
from wsicodec.checkpoint import DEFAULT_WEIGHTS
from wsicodec.entropy import CdfTables, decode_many, decode_symbols, encode_many, encode_symbols
from wsicodec.errors import CorruptDataError


def _compressai():
    from wsicodec._compressai import load

    load()
    from compressai import ans
    return ans


def _lists(t: CdfTables):
    return ([row[:n].tolist() for row, n in zip(t.cdfs, t.lengths)], t.lengths.tolist(),
            t.offsets.tolist())


def _random_tables(rng, rows: int = 24, width: int = 48) -> CdfTables:
    cdfs = np.zeros((rows, width), np.int32)
    lengths = rng.integers(3, width + 1, rows).astype(np.int32)
    for r, n in enumerate(lengths):
        p = rng.random(n - 1) ** 3 + 1e-3                  # skewed, some tiny frequencies
        f = np.maximum(1, np.floor(p / p.sum() * (65536 - (n - 1)))).astype(np.int64)
        f[np.argmax(f)] += 65536 - f.sum()
        cdfs[r, 1:n] = np.cumsum(f)
        cdfs[r, n:] = 65536
    return CdfTables(cdfs, lengths, rng.integers(-30, 5, rows).astype(np.int32))


def _random_symbols(rng, n: int, rows: int):
    idx = rng.integers(0, rows, n).astype(np.int32)
    sym = rng.integers(-40, 40, n)
    far = rng.random(n) < 0.03                              # escapes: bypass-coded values
    sym[far] = rng.integers(-(1 << 20), 1 << 20, int(far.sum()))
    return sym.astype(np.int32), idx


def test_streams_are_compressai_streams_both_ways() -> None:
    """Random tables, indexes and symbols (escapes included): our bytes are CompressAI's,
    and each side decodes the other's stream to the same symbols."""
    ans = _compressai()
    rng = np.random.default_rng(7)
    for trial in range(60):
        t = _random_tables(rng)
        lists = _lists(t)
        sym, idx = _random_symbols(rng, int(rng.integers(0, 4000)), t.rows)
        ours = encode_symbols(sym, idx, t)
        theirs = ans.RansEncoder().encode_with_indexes(sym.tolist(), idx.tolist(), *lists)
        assert ours == theirs, trial
        assert np.array_equal(decode_symbols(theirs, idx, t), sym)
        assert ans.RansDecoder().decode_with_indexes(ours, idx.tolist(), *lists) == sym.tolist()


def test_many_streams_in_one_call_are_each_stream() -> None:
    rng = np.random.default_rng(3)
    t = _random_tables(rng)
    pairs = [_random_symbols(rng, int(n), t.rows) for n in (0, 1, 500, 37, 2000)]
    many = encode_many([s for s, _ in pairs], [i.reshape(-1, 1) for _, i in pairs], t)
    assert many == [encode_symbols(s, i, t) for s, i in pairs]
    back = decode_many(many, [i.reshape(-1, 1) for _, i in pairs], t)
    for (s, i), d in zip(pairs, back):
        assert d.shape == (len(i), 1) and np.array_equal(d[:, 0], s)


def test_damaged_streams_report_an_error_and_stay_inside_their_bytes() -> None:
    """A stream cut short or overwritten never reads outside its bytes: it decodes to
    some symbols (the caller's checksum fails) or reports a CorruptDataError, per stream."""
    rng = np.random.default_rng(5)
    t = _random_tables(rng)
    sym, idx = _random_symbols(rng, 3000, t.rows)
    good = encode_symbols(sym, idx, t)
    cut = [good[:k] for k in (0, 3, 8, len(good) // 2, len(good) - 4)]
    out = decode_many(cut + [good], [idx] * (len(cut) + 1), t)
    assert all(isinstance(o, CorruptDataError) for o in out[:3])
    assert isinstance(out[3], CorruptDataError) and "ends before" in str(out[3])
    assert np.array_equal(out[-1], sym)
    for seed in range(50):       # garbage of every length: an answer, never a crash or a hang
        junk = np.random.default_rng(seed).integers(0, 256, seed * 37).astype(np.uint8).tobytes()
        r = decode_many([junk], [idx], t)[0]
        assert isinstance(r, CorruptDataError) or r.shape == idx.shape
    with pytest.raises(CorruptDataError):
        decode_symbols(good[:8], idx, t)
    with pytest.raises(ValueError, match="table index"):
        decode_symbols(good, np.full(3, t.rows), t)


def test_threads_decode_streams_at_once() -> None:
    """The coder runs without the GIL: threads each decoding streams get every answer
    right (thread safety; the speed-up is bench/entropy_speed.py's)."""
    rng = np.random.default_rng(11)
    t = _random_tables(rng)
    data = [_random_symbols(rng, 5000, t.rows) for _ in range(8)]
    streams = [encode_symbols(s, i, t) for s, i in data]
    bad = []

    def work(k: int) -> None:
        for _ in range(20):
            if not np.array_equal(decode_symbols(streams[k], data[k][1], t), data[k][0]):
                bad.append(k)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not bad


def test_kernels_loaded_in_background_are_those_the_coding_calls_use() -> None:
    """load_in_background compiles (or loads) the very specialisations encode_many and
    decode_many then call: the calls after it compile nothing."""
    from wsicodec.entropy import load_in_background, rans
    load_in_background(encode=True, decode=True)
    load_in_background(encode=True, decode=True)           # once per process
    assert set(rans._loading) == {"encode", "decode"}
    for th in list(rans._loading.values()):
        th.join(60)
    kernels = rans._kernels()
    loaded = (list(kernels.encode_many.signatures), list(kernels.decode_many.signatures))
    assert all(loaded)
    rng = np.random.default_rng(5)
    t = _random_tables(rng)
    (s, i), (s2, i2) = _random_symbols(rng, 3000, t.rows), _random_symbols(rng, 10, t.rows)
    out = decode_many(encode_many([s, s2], [i, i2], t), [i, i2], t)
    assert np.array_equal(out[0], s) and np.array_equal(out[1], s2)
    assert (list(kernels.encode_many.signatures), list(kernels.decode_many.signatures)) == loaded


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no os.fork here")
def test_a_fork_waits_for_the_loading_threads(monkeypatch) -> None:
    """A process forked while the coder loads in the background would inherit numba's or
    an import's lock held by a thread it does not have: the fork waits for the loading."""
    import os
    import time

    from wsicodec.entropy import load_in_background, rans
    monkeypatch.setattr(rans, "_loading", {})
    monkeypatch.setattr(rans, "_load", lambda which: time.sleep(0.5))
    load_in_background(encode=True)
    pid = os.fork()
    if pid == 0:                                            # the child: leave at once
        os._exit(0)
    alive = [t.is_alive() for t in rans._loading.values()]
    assert os.waitpid(pid, 0)[1] == 0
    assert alive == [False]


# ---------------------------------------------------------------- the learned codec's paths
needs_weights = pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped weights missing")


@pytest.fixture(scope="module")
def codec():
    from wsicodec.learned import LearnedCodec
    return LearnedCodec(quality=4)


@pytest.fixture(scope="module")
def tiles(codec) -> list[bytes]:
    """Network tiles of real tissue at two sizes and qualities."""
    from PIL import Image

    from wsicodec.learned import LearnedCodec, parse_header
    img = np.asarray(Image.open(need(HE_TEST_PNG)).convert("RGB"))
    out = codec.encode_tiles([np.ascontiguousarray(img[r:r + 256, c:c + 256])
                              for r in (0, 256) for c in (0, 256, 512)])
    out += codec.encode_tiles([np.ascontiguousarray(img[600:600 + 100, 0:300])])
    out += LearnedCodec(quality=6.5).encode_tiles([np.ascontiguousarray(img[700:956, 700:956])])
    assert all(parse_header(d).kind == 0 for d in out)
    return out


@needs_weights
def test_decoder_warm_up_loads_the_rans_decoder(codec, monkeypatch) -> None:
    """warm_up leaves no first-tile surcharge: it starts loading numba's decoder too."""
    from wsicodec.entropy import rans
    monkeypatch.setattr(rans, "_loading", {})
    codec.warm_up()
    assert set(rans._loading) == {"decode"}
    rans._loading["decode"].join(60)


@needs_weights
def test_real_streams_are_compressai_streams(codec, tiles) -> None:
    """The codec's own z and y streams, decoded by CompressAI's coder with the codec's
    tables and indexes: the same symbols; CompressAI re-encodes them to the same bytes."""
    from wsicodec.learned import parse_header
    ans = _compressai()
    dec = codec.decoder
    tz, ty = (_lists(t) for t in dec.tables)
    for data in tiles:
        hd = parse_header(data)
        zs = dec.decode_z(data, hd)
        _, index = dec.hyper_parameters(zs, hd)
        ys = dec.decode_y(data, hd, index)
        zi = np.broadcast_to(np.arange(zs.shape[0], dtype=np.int32)[:, None, None], zs.shape)
        z_stream = data[hd.payload:hd.payload + hd.z_len]
        y_stream = data[hd.payload + hd.z_len:]
        assert ans.RansDecoder().decode_with_indexes(z_stream, zi.reshape(-1).tolist(), *tz) \
            == zs.reshape(-1).tolist()
        assert ans.RansDecoder().decode_with_indexes(y_stream, index[0].reshape(-1).tolist(), *ty) \
            == ys.reshape(-1).tolist()
        assert ans.RansEncoder().encode_with_indexes(ys.reshape(-1).tolist(),
                                                     index[0].reshape(-1).tolist(), *ty) == y_stream


@needs_weights
def test_exact_h_s_batched_is_tile_by_tile_to_the_bit(codec) -> None:
    """The exact h_s over a batch (mixed qualities, more tiles than one pass takes) gives
    the very bits of each tile alone."""
    from wsicodec.learned.network import EXACT_CHUNK
    model = codec.loaded.model
    rng = np.random.default_rng(2)
    n = EXACT_CHUNK + 5
    z = torch.from_numpy(rng.integers(-6, 7, (n, model.config.N, 5, 5))).double()
    q = torch.tensor(rng.choice([1.0, 3.25, 4.0, 8.0], n), dtype=torch.float32)
    mu, index = model.entropy_parameters(z, q, size=(17, 17))
    for i in range(n):
        m1, i1 = model.entropy_parameters(z[i:i + 1], q[i:i + 1], size=(17, 17))
        assert torch.equal(m1, mu[i:i + 1]) and torch.equal(i1, index[i:i + 1]), i
    full = model.h_s_exact()(z[:3], q[:3].tolist())
    assert torch.equal(full[1:2], model.h_s_exact()(z[1:2], float(q[1])))


@needs_weights
def test_tiles_decoded_together_are_tiles_decoded_alone(codec, tiles) -> None:
    """entropy_decode_many over tiles of mixed sizes and qualities with a damaged one
    among them: each good tile's ŷ is its own decode's, the damaged one alone fails."""
    from wsicodec.learned import parse_header
    dec = codec.decoder
    broken = bytearray(tiles[1])
    broken[len(broken) // 2] ^= 0x5A
    datas = tiles[:1] + [bytes(broken)] + tiles[1:]
    items = [(d, parse_header(d), f"tile {k}") for k, d in enumerate(datas)]
    out = dec.entropy_decode_many(items)
    assert isinstance(out[1], CorruptDataError) and "tile 1" in str(out[1])
    for k, (d, hd, name) in enumerate(items):
        if k != 1:
            assert torch.equal(out[k], dec.entropy_decode(d, hd, name)), k


@needs_weights
def test_tiles_encoded_together_are_tiles_encoded_alone(codec) -> None:
    """One encode_tiles call over many tiles (one h_s pass, one coder call) writes each
    tile's bytes exactly as coding it alone."""
    regions = [textured(256, 256, s) for s in range(5)] + [textured(96, 200, 9)]
    together = codec.encode_tiles(regions)
    assert together == [codec.encode(r) for r in regions]


@needs_weights
def test_g_a_runs_in_passes_of_a_few_regions_on_the_cpu(codec, monkeypatch) -> None:
    """On the CPU g_a takes at most CPU_G_A_BATCH regions a pass (larger passes map and
    unmap their activations each time), and the bytes are those of one pass."""
    from wsicodec.learned import encoder
    regions = [textured(256, 256, s) for s in range(5)]
    net = codec.loaded.on(codec.device)
    passes = []
    real = net.analysis_y

    def counted(x, *a, **k):
        passes.append(x.shape[0])
        return real(x, *a, **k)
    monkeypatch.setattr(net, "analysis_y", counted)
    monkeypatch.setattr(encoder, "CPU_G_A_BATCH", 5)
    whole = codec.encode_tiles(regions)
    assert passes == [5]
    passes.clear()
    monkeypatch.setattr(encoder, "CPU_G_A_BATCH", 2)
    assert codec.encode_tiles(regions) == whole and passes == [2, 2, 1]


@needs_weights
def test_a_device_whose_h_s_differed_falls_back_to_the_cpu(codec, tiles, monkeypatch) -> None:
    """Where the exact h_s runs on a GPU and a tile's symbols then fail their checksum (or
    its stream breaks off), that tile is decoded again with h_s on the CPU: a device that
    computed other tables costs time, never tiles.  The device is stood in for here by
    tables one row off whenever h_s is asked to run anywhere but the CPU."""
    from wsicodec.learned import parse_header
    dec = codec.decoder
    items = [(d, parse_header(d), f"tile {k}") for k, d in enumerate(tiles)]
    ref = dec.entropy_decode_many(items)
    model_type = type(dec.model)
    real = model_type.entropy_parameters

    def skewed(self, z_hat, quality, exact=True, size=None, device=None):  # noqa: ANN001
        mu, index = real(self, z_hat, quality, exact, size, "cpu")
        if str(device) != "cpu":
            index = (index + 1).clamp(max=dec.tables[1].rows - 1)
        return mu, index

    monkeypatch.setattr(model_type, "entropy_parameters", skewed)
    monkeypatch.setattr(dec, "entropy_device", torch.device("cuda"))   # only ever passed on
    out = dec.entropy_decode_many(items)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    monkeypatch.setattr(dec, "entropy_device", torch.device("cpu"))    # no fallback on the CPU
    monkeypatch.setattr(model_type, "entropy_parameters",
                        lambda self, *a, **k: skewed(self, *a, **{**k, "device": "x"}))
    assert all(isinstance(e, CorruptDataError) and "checksum" in str(e)
               for e in dec.entropy_decode_many(items))


def test_loading_the_learned_codec_leaves_scipy_stats_unimported() -> None:
    """compressai's entropy models import ``scipy.stats`` for ``GaussianConditional.update()``
    only (~0.6 s of a fresh process); ``wsicodec._compressai.load`` makes it lazy: a codec
    loads, encodes and decodes a tile without it, and ``update()``'s quantile is SciPy's."""
    code = ("import sys, numpy as np\n"
            "from wsicodec.learned import LearnedCodec\n"
            "c = LearnedCodec(4)\n"
            "tile = np.full((256, 256, 3), 180, np.uint8); tile[::7] = 90\n"
            "assert c.decode(c.encode(tile)).shape == tile.shape\n"
            "assert 'scipy.stats' not in sys.modules, 'scipy.stats imported'\n"
            "import compressai.entropy_models as em\n"
            "assert em.entropy_models.GaussianConditional is em.GaussianConditional\n"
            "q = em.GaussianConditional._standardized_quantile(0.05)\n"
            "import scipy.stats\n"
            "assert q == scipy.stats.norm.ppf(0.05), q\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
