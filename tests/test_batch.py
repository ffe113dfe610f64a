"""The batched, cached tile decoder (wsicodec.batch) behind WsiSlide."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from wsicodec.batch import BatchDecoder, DecoderSettings, TileCache
from wsicodec.codecs import get_codec
from wsicodec.container import open_container
from wsicodec.errors import CorruptTileError, InvalidSettingError, RegionOutOfBoundsError
from wsicodec.pipeline import compress_source
from wsicodec.slide import open_slide
from wsicodec.tiling import ArraySource


def _image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 3 + y) % 256, 120 + (y % 64), (x ^ y) % 256], axis=-1)
    return np.clip(img + rng.integers(0, 6, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def jpeg_container(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("batch") / "odd.zarr.zip"
    compress_source(ArraySource(_image(301, 219, 2)), out, get_codec("jpeg", 90), tile_size=64,
                    workers=1)
    return out


@pytest.fixture(scope="module")
def learned_container(tmp_path_factory: pytest.TempPathFactory):
    """A small learned container: 150x100 image in 64-px tiles, one glass tile."""
    img = _image(150, 100, 3)
    img[:64, 64:] = 238  # a uniform tile: decoded without the network
    out = tmp_path_factory.mktemp("batch") / "learned.zarr.zip"
    compress_source(ArraySource(img), out, get_codec("learned", 4), tile_size=64, workers=1)
    return out


def test_cache_is_lru_bounded_in_bytes() -> None:
    tile = np.zeros((10, 10, 3), np.uint8)  # 300 bytes
    cache = TileCache(max_bytes=700)
    cache.put("a", tile.copy())
    cache.put("b", tile.copy())
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", tile.copy())        # evicts b
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    st = cache.stats()
    assert st.entries == 2 and st.nbytes == 600 and st.hits == 3 and st.misses == 1
    with pytest.raises(ValueError):
        cache.get("a")[0, 0, 0] = 1  # cached tiles are read-only
    cache.put("big", np.zeros((20, 20, 3), np.uint8))  # larger than the cache: not kept
    assert cache.get("big") is None and len(cache) == 2
    assert len(TileCache(0).__dict__) and TileCache(0).get("x") is None


def test_settings_are_validated() -> None:
    for bad in ({"cache_bytes": -1}, {"workers": 0}, {"max_batch": 0}, {"device": "tpu"}):
        with pytest.raises(InvalidSettingError):
            DecoderSettings(**bad)


@pytest.mark.parametrize("workers", [1, 3])
def test_classical_batch_equals_single_tile_decode(jpeg_container, workers: int) -> None:
    with open_container(jpeg_container) as c:
        dec = BatchDecoder(c, DecoderSettings(workers=workers))
        keys = [(col, row) for col, row in c.grid(0)]
        tiles = dec.decode(0, keys + keys[:2])  # duplicates are fine
        for (col, row), t in zip(keys, tiles):
            np.testing.assert_array_equal(t, c.read_tile(0, col, row))
        assert dec.stats().entries == len(keys)
        again = dec.decode(0, keys[:3])
        assert all(a is b for a, b in zip(again, tiles[:3]))  # served from the cache
        with pytest.raises(RegionOutOfBoundsError):
            dec.decode(0, [(99, 0)])
        dec.close()


def test_learned_batch_equals_codec_decode(learned_container) -> None:
    with open_container(learned_container) as c:
        dec = BatchDecoder(c, DecoderSettings(workers=2, device="auto", max_batch=2))
        assert dec.device in ("cpu", "cuda:0")
        keys = [(col, row) for col, row in c.grid(0)]
        tiles = dec.decode(0, keys)
        for (col, row), t in zip(keys, tiles):
            ref = c.read_tile(0, col, row)
            assert t.shape == ref.shape == (64, 64, 3)
            # g_s batched (max_batch 2) vs alone: pixels may differ by float rounding only
            assert np.abs(t.astype(int) - ref.astype(int)).max() <= 1
        assert (tiles[1] == 238).all()  # the glass tile
        dec.close()


def test_region_reads_only_the_tiles_it_needs(jpeg_container) -> None:
    with open_slide(jpeg_container) as slide:
        slide.read_region((70, 70), 0, (50, 50))  # inside tile (1, 1)
        assert slide.decoder.stats().entries == 1
        slide.read_region((60, 60), 0, (10, 10))  # tiles (0,0) (1,0) (0,1) (1,1)
        st = slide.decoder.stats()
        assert st.entries == 4 and st.hits == 1


def test_concurrent_reads_agree(jpeg_container) -> None:
    with open_slide(jpeg_container, cache_bytes=64 * 64 * 3 * 4, workers=2) as slide:
        ref = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))
        rng = np.random.default_rng(0)
        boxes = [(int(rng.integers(0, 200)), int(rng.integers(0, 280)), int(rng.integers(1, 90)),
                  int(rng.integers(1, 90))) for _ in range(60)]

        def read(box):
            x, y, w, h = box
            return box, slide.read_region((x, y), 0, (w, h), as_array=True)

        with ThreadPoolExecutor(8) as pool:
            for (x, y, w, h), arr in pool.map(read, boxes):
                part = ref[y:y + h, x:x + w, :3]          # as_array: RGB
                np.testing.assert_array_equal(arr[:part.shape[0], :part.shape[1]], part)


def _damage(path, tmp_path, member_hint="levels/0/tiles/c/1/1"):
    """Copy a zip container, flipping bytes inside one tile's chunk (its CRC fails)."""
    import zipfile

    out = tmp_path / "damaged.zarr.zip"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        names = src.namelist()
        assert member_hint in names, names[:20]
        for name in names:
            data = src.read(name)
            if name == member_hint:
                data = data[:-8] + bytes(b ^ 0x5A for b in data[-8:])
            dst.writestr(name, data)
    return out


def test_corrupt_tile_fails_alone(jpeg_container, tmp_path) -> None:
    bad = _damage(jpeg_container, tmp_path)
    with open_slide(bad) as slide:
        with pytest.raises(CorruptTileError) as info:
            slide.read_region((0, 0), 0, (200, 200))
        assert (info.value.level, info.value.col, info.value.row) == (0, 1, 1)
        assert "level=0 col=1 row=1" in str(info.value)
        # the other tiles of that batch were decoded and cached; they still read
        assert slide.decoder.stats().entries == 15  # 4x4 tiles, one bad
        slide.read_region((0, 0), 0, (64, 64))
        with pytest.raises(CorruptTileError):
            slide.read_region((64, 64), 0, (1, 1))


def test_waiters_share_one_decode(jpeg_container) -> None:
    with open_container(jpeg_container) as c:
        calls = []
        real = c.read_encoded_tile
        gate = threading.Event()

        def slow(level, col, row):
            calls.append((level, col, row))
            gate.wait(2)
            return real(level, col, row)

        c.read_encoded_tile = slow  # type: ignore[method-assign]
        dec = BatchDecoder(c, DecoderSettings(workers=1))
        with ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(dec.decode, 0, [(0, 0)]) for _ in range(4)]
            gate.set()
            results = [f.result()[0] for f in futs]
        assert calls == [(0, 0, 0)]
        assert all(r is results[0] for r in results)
        dec.close()


def test_concurrent_callers_share_g_s_passes(learned_container) -> None:
    """Many threads decoding at once: one g_s pass at a time, latents of waiting
    callers batched together, results equal to decoding alone."""
    with open_container(learned_container) as c:
        keys = [(col, row) for col, row in c.grid(0) if (col, row) != (1, 0)]  # network tiles
        ref = {k: c.read_tile(0, *k) for k in keys}
        dec = BatchDecoder(c, DecoderSettings(cache_bytes=0, workers=2, max_batch=3))
        dec.decode(0, keys[:1])
        synthesis = dec.codec.decoder.synthesis
        before = synthesis.passes
        with ThreadPoolExecutor(len(keys)) as pool:
            got = list(pool.map(lambda k: dec.decode(0, [k])[0], keys))
        for k, t in zip(keys, got):
            assert np.abs(t.astype(int) - ref[k].astype(int)).max() <= 1
        assert synthesis.passes - before <= len(keys)
        assert not synthesis._queue and not synthesis._busy
        dec.close()


def test_format_2_container_reads_tile_by_tile_as_before(format2):
    """tests/data/format2_q4.zarr.zip was written by the release before stitched tiles
    (each tile coded with an 8 px margin, decoded on its own).  The reader, the container
    and the codec's own one-tile decode give the same pixels for it."""
    from conftest import FIXTURES

    from wsicodec.learned import parse_header

    path = FIXTURES / "format2_q4.zarr.zip"
    with open_container(path) as c:
        g = c.grid(0)
        keys = list(g)
        datas = [c.read_encoded_tile(0, col, row) for col, row in keys]
        assert {parse_header(d).version for d in datas} == {2}
        alone = c.codec.decode_alone(datas)
        rows = c.read_tiles(0, keys)
    with open_slide(path, workers=2) as s:
        served = s._decode_tiles(0, keys)
    for a, b, d in zip(alone, rows, served):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
        assert np.abs(a.astype(int) - d.astype(int)).max() <= 1


def test_reader_stitches_tiles_the_same_in_any_order(tmp_path) -> None:
    """Stitched tiles (format 3) decode with their neighbours' latents: a tile asked for
    alone on a cold reader, the same tile after all others (neighbours' latents cached),
    and the container's own row decode agree; a region shows no grid at tile borders."""
    from conftest import HE_TEST_PNG, need, psnr
    from PIL import Image

    img = np.asarray(Image.open(need(HE_TEST_PNG)).convert("RGB"))[:512, :768].copy()
    out = tmp_path / "he.zarr.zip"
    compress_source(ArraySource(img), out, get_codec("learned", 4), tile_size=256, workers=1)
    with open_slide(out, workers=2) as s:
        first = s._decode_tiles(0, [(1, 0)])[0]
        region = s.read_region((0, 0), 0, (768, 512), as_array=True)[..., :3]
    with open_slide(out, workers=1, cache_bytes=0) as s:
        tiles = s._decode_tiles(0, [(0, 0), (2, 0), (0, 1), (1, 1), (2, 1)])
        again = s._decode_tiles(0, [(1, 0)])[0]
    with open_container(out) as c:
        rows = c.read_tiles(0, [(0, 0), (1, 0), (2, 0)])
    for other in (again, rows[1], region[:256, 256:512]):
        assert np.abs(first.astype(int) - other.astype(int)).max() <= 1
    assert np.abs(tiles[0].astype(int) - rows[0].astype(int)).max() <= 1
    border = np.zeros(img.shape[:2], bool)
    border[252:260] = True
    border[:, 252:260] = border[:, 508:516] = True
    gap = psnr(img[~border], region[~border]) - psnr(img[border], region[border])
    # the project's seam bound (bench/seams.py): e2802188 gave 0.22 dB here, 39f994f4 0.33;
    # the same tiles decoded alone give 11 dB
    assert gap < 0.5, gap


def test_concurrent_requests_entropy_decode_each_tile_once(tmp_path, monkeypatch) -> None:
    """A viewer asks for neighbouring tiles in separate, concurrent requests: each needs
    its neighbours' latents, and a tile one request is decoding is waited for by the
    others (LatentCache.begin/settle), so every stream is entropy-decoded once."""
    from conftest import HE_TEST_PNG, need
    from PIL import Image

    img = np.asarray(Image.open(need(HE_TEST_PNG)).convert("RGB"))[:512, :768].copy()
    out = tmp_path / "he.zarr.zip"
    compress_source(ArraySource(img), out, get_codec("learned", 4), tile_size=256, workers=1)
    from wsicodec.learned.decoder import TileDecoder

    with open_slide(out, workers=2, cache_bytes=0) as s:
        calls: list[tuple[int, int]] = []
        lock = threading.Lock()
        original = TileDecoder.entropy_decode_many

        def counting(self, items):  # noqa: ANN001
            with lock:
                calls.extend(name for _, _, name in items)
            return original(self, items)

        monkeypatch.setattr(TileDecoder, "entropy_decode_many", counting)
        keys = [(c, r) for r in range(2) for c in range(3)]
        barrier = threading.Barrier(len(keys))

        def ask(key):  # noqa: ANN001
            barrier.wait()
            return s._decode_tiles(0, [key])[0]

        with ThreadPoolExecutor(len(keys)) as pool:
            tiles = list(pool.map(ask, keys))
    assert len(calls) == len(set(calls)) == len(keys), sorted(calls)
    with open_container(out) as c:
        for t, ref in zip(tiles, c.read_tiles(0, keys)):
            assert np.abs(t.astype(int) - ref.astype(int)).max() <= 1


def test_bfloat16_precision_runs_g_s_body_in_bfloat16_and_decodes_the_same_stream(
        learned_container, tmp_path) -> None:
    """``precision="bfloat16"``: g_s's inner layers in bfloat16 (its first convolution and
    GDN and its last layer in float32, as ``train.py --bf16-body`` trains), the same symbols (checks pass), pixels close to the float32 reference but
    not equal; on every read path (slide reader, decompress, the image API)."""
    import tifffile
    import torch

    import wsicodec
    from wsicodec.readback import decompress

    for bad in ("float16", "bf16", None):
        with pytest.raises(InvalidSettingError):
            DecoderSettings(precision=bad)
        with pytest.raises(InvalidSettingError):
            decompress(learned_container, tmp_path / "x.tiff", precision=bad)
        with pytest.raises(InvalidSettingError):
            get_codec("learned", 4, precision=bad)
    assert list(tmp_path.iterdir()) == []

    with open_container(learned_container) as c:
        model = c.codec.loaded.model
    body = model.fast_transform("g_s", torch.device("cpu"), torch.float32, bf16_body=True)
    convs = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    seen: dict[str, set] = {"ends": set(), "inner": set()}
    hooks = []
    for k, layer in enumerate(body.layers):
        part = "inner" if 2 <= k < len(body.layers) - 1 else "ends"
        for mod in layer.modules():
            if isinstance(mod, convs):
                hooks.append(mod.register_forward_hook(
                    lambda mod, inp, out, part=part: seen[part].add(out.dtype)))
    try:
        with open_slide(learned_container, device="cpu") as s32, \
                open_slide(learned_container, device="cpu", precision="bfloat16") as s16:
            a = np.asarray(s32.read_region((0, 0), 0, (100, 150)))
            b = np.asarray(s16.read_region((0, 0), 0, (100, 150)))
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"ends": {torch.float32}, "inner": {torch.bfloat16}}
    diff = np.abs(a.astype(int) - b.astype(int))[..., :3]
    assert 0 < diff.mean() < 1.0 and diff.max() <= 16
    assert (b[:64, 64:, :3] == 238).all()          # the glass tile takes no network pass

    decompress(learned_container, tmp_path / "f32.tiff")
    decompress(learned_container, tmp_path / "bf16.tiff", precision="bfloat16")
    t32, t16 = (tifffile.imread(tmp_path / n, key=0) for n in ("f32.tiff", "bf16.tiff"))
    assert not np.array_equal(t32, t16) and np.abs(t32.astype(int) - t16.astype(int)).mean() < 1.0

    img = _image(150, 100, 3)
    data = wsicodec.encode(img, 4, tile_size=64)
    d32, d16 = wsicodec.decode(data), wsicodec.decode(data, precision="bfloat16")
    assert not np.array_equal(d32, d16) and np.abs(d32.astype(int) - d16.astype(int)).mean() < 1.0


def test_bfloat16_encoding_keeps_rate_and_quality_and_any_reader_decodes_it() -> None:
    """``LearnedCodec(precision="bfloat16")`` runs g_a's inner layers in bfloat16: other
    latents, so other bytes, but the same rate and PSNR to within a few hundredths, and
    a float32 reader decodes them (the stream format does not know)."""
    import torch

    import wsicodec
    from wsicodec.learned import LearnedCodec

    img = _image(160, 200, 5)
    codec = LearnedCodec(4, precision="bfloat16")
    body = codec.loaded.model.fast_transform("g_a", torch.device("cpu"), torch.float32, bf16_body=True)
    conv = next(m for m in body.layers[2].modules() if isinstance(m, torch.nn.Conv2d))
    seen: list = []
    hook = conv.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    try:
        d16 = wsicodec.encode(img, 4, tile_size=64, precision="bfloat16")
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    d32 = wsicodec.encode(img, 4, tile_size=64)
    assert d16 != d32 and abs(len(d16) - len(d32)) <= 0.02 * len(d32)

    def psnr(data: bytes) -> float:
        rec = wsicodec.decode(data).astype(float)
        return float(10 * np.log10(255 ** 2 / np.mean((rec - img) ** 2)))

    assert abs(psnr(d16) - psnr(d32)) < 0.05
    assert get_codec("learned", 4, precision="bfloat16").to_dict() == get_codec("learned", 4).to_dict()


def test_a_prefetched_row_is_decoded_once_and_reads_the_same(tmp_path, monkeypatch) -> None:
    """Container.prefetch_tiles decodes a row's latents into the reader's cache: reading
    the rows then entropy-decodes none of its streams again, and every tile, read row by
    row or through decompress's prefetching row decode, is the same as without it.  A
    damaged tile in a prefetched row fails only where it is read, naming it."""
    from wsicodec.learned.decoder import TileDecoder
    from wsicodec.readback import _ordered_decode

    img = _image(150, 200, 5)
    out = tmp_path / "rows.zarr"
    compress_source(ArraySource(img), out, get_codec("learned", 4), tile_size=64, workers=1)
    rows = [[(c, r) for c in range(4)] for r in range(3)]
    with open_container(out) as c:
        ref = [t for keys in rows for t in c.read_tiles(0, keys)]
    calls: list[str] = []
    original = TileDecoder.entropy_decode_many

    def counting(self, items):  # noqa: ANN001
        calls.extend(name for _, _, name in items)
        return original(self, items)

    monkeypatch.setattr(TileDecoder, "entropy_decode_many", counting)
    with open_container(out) as c, ThreadPoolExecutor(2) as pool:
        c.prefetch_tiles(0, rows[2], run=lambda fn, items: list(pool.map(fn, items)))
        assert sorted(calls) == sorted(f"tile level=0 col={col} row=2" for col in range(4))
        got = [t for keys in rows for t in c.read_tiles(0, keys)]
    assert len(calls) == len(set(calls)) == 12
    assert all(np.array_equal(a, b) for a, b in zip(ref, got))
    with open_container(out) as c:
        assert all(np.array_equal(a, b) for a, b in zip(ref, _ordered_decode(c, 0, 2, None)))

    victim = out / "levels" / "0" / "tiles" / "c" / "2" / "1"  # row 2, col 1
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    with open_container(out) as c:
        c.prefetch_tiles(0, rows[2])
        with pytest.raises(CorruptTileError, match="col=1 row=2"):
            c.read_tiles(0, rows[2])
        assert np.array_equal(c.read_tiles(0, rows[0])[1], ref[1])
