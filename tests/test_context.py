"""Tiles with neighbour context (the learned codec's seam guard) are cut correctly,
and the learned codec runs through the CLI on a real slide."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import openslide
import pytest

from conftest import REAL_SLIDES, need, psnr
from wsicodec.checkpoint import DEFAULT_WEIGHTS
from wsicodec.pipeline import iter_context_strips, iter_context_tiles
from wsicodec.tiling import ArraySource, iter_strips, plan_pyramid
from wsicodec.tiling.pyramid import downsample2


@pytest.mark.parametrize("shape,tile,margin", [((301, 219), 64, 8), ((130, 700), 32, 5), ((64, 64), 16, 16),
                                              ((100, 70), 32, 0)])
def test_context_regions_match_the_padded_level(shape, tile, margin):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    src = ArraySource(img)
    plan = plan_pyramid(src.level_dimensions, src.level_downsamples, tile)
    levels = [img]
    while len(levels) < len(plan.levels):
        levels.append(downsample2(levels[-1]))
    seen = set()
    for strip, ext, top in iter_context_strips(iter_strips(src, plan), plan, margin):
        lv = levels[strip.level]
        grid = plan.levels[strip.level].grid
        # the level padded by edge replication to whole tiles (what every codec sees)
        padded = np.pad(lv, ((0, grid.rows * tile - lv.shape[0]), (0, grid.cols * tile - lv.shape[1]), (0, 0)),
                        mode="edge")
        tiles = list(iter_context_tiles(ext, top, tile, margin))
        assert len(tiles) == grid.cols
        for t in tiles:
            y0, x0 = strip.row * tile, t.col * tile
            bt, bl, bh, bw = t.box
            assert (bh, bw) == (tile, tile)
            assert bt == min(margin, y0) and bl == min(margin, x0)
            core = t.region[bt:bt + bh, bl:bl + bw]
            assert np.array_equal(core, padded[y0:y0 + tile, x0:x0 + tile])
            # context comes from the real neighbours (rows above/below exist in the level)
            ya = y0 - bt
            rows = min(t.region.shape[0], lv.shape[0] - ya)
            xa = x0 - bl
            cols = min(t.region.shape[1], lv.shape[1] - xa)
            assert np.array_equal(t.region[:rows, :cols], lv[ya:ya + rows, xa:xa + cols])
            seen.add((strip.level, strip.row, t.col))
    assert len(seen) == plan.tile_count


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped weights missing")
def test_cli_learned_round_trip_on_a_real_slide(tmp_path):
    # real H&E (the generic-tiff sample is synthetic colour squares, not tissue)
    src = need(REAL_SLIDES["svs-jpeg"])
    out, tiff = tmp_path / "s.zarr.zip", tmp_path / "s.tiff"
    run = lambda *a: subprocess.run([sys.executable, "-m", "wsicodec", *a], capture_output=True, text=True)  # noqa: E731
    r = run("compress", str(src), str(out), "--codec", "learned", "--quality", "8")
    assert r.returncode == 0, r.stderr
    assert "with learned" in r.stdout
    r = run("decompress", str(out), str(tiff), "--tiff-compression", "zlib", "--quiet")
    assert r.returncode == 0, r.stderr
    with openslide.OpenSlide(str(src)) as a, openslide.OpenSlide(str(tiff)) as b:
        assert b.dimensions == a.dimensions
        assert b.level_count == 5
        # a 1024² window of tissue
        ref = np.asarray(a.read_region((600, 900), 0, (1024, 1024)).convert("RGB"))
        got = np.asarray(b.read_region((600, 900), 0, (1024, 1024)).convert("RGB"))
    assert psnr(ref, got) > 24


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped weights missing")
def test_learned_container_batch_reads_match_single_tiles_and_name_bad_tiles(tmp_path):
    from PIL import Image

    from conftest import HE_TEST_PNG
    import wsicodec
    from wsicodec.codecs import get_codec
    from wsicodec.container import open_container
    from wsicodec.errors import CorruptTileError
    from wsicodec.pipeline import compress_source

    img = np.asarray(Image.open(need(HE_TEST_PNG)).convert("RGB"))[:300, :420]
    out = tmp_path / "l.zarr"
    compress_source(ArraySource(img), out, get_codec("learned", 6), tile_size=128)
    with open_container(out) as c:
        keys = list(c.grid(0))
        batch = c.read_tiles(0, keys)
        for (col, row), t in zip(keys, batch):
            single = c.read_tile(0, col, row)
            assert np.abs(single.astype(int) - t).max() <= 1
    with wsicodec.open_slide(out) as s:
        region = s.read_region((100, 90), 0, (250, 200), as_array=True)
        assert region.shape == (200, 250, 3)
        assert psnr(region, img[90:290, 100:350]) > 22
    victim = out / "levels" / "0" / "tiles" / "c" / "1" / "2"   # row 1, col 2
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10
    victim.write_bytes(bytes(data))
    with open_container(out) as c:
        with pytest.raises(CorruptTileError, match="level=0 col=2 row=1"):
            c.read_tiles(0, keys)
        c.read_tiles(0, [k for k in keys if k != (2, 1)])


def test_an_interrupted_learned_compress_resumes_with_the_same_tiles(tmp_path, monkeypatch):
    """The batched context path skips the rows it took over, still feeding their pixels to
    the next rows as context: the resumed container's tiles are the uninterrupted one's."""
    from PIL import Image

    from conftest import HE_TEST_PNG
    from wsicodec.codecs import get_codec
    from wsicodec.container import open_container
    from wsicodec.errors import CompressInterrupted
    from wsicodec.learned import LearnedCodec
    from wsicodec.pipeline import compress_source

    img = np.asarray(Image.open(need(HE_TEST_PNG)).convert("RGB"))[:250, :200]
    ref = tmp_path / "ref.zarr"
    compress_source(ArraySource(img), ref, get_codec("learned", 3), tile_size=64)
    calls = {"n": 0, "stop": 3}
    real = LearnedCodec.encode_tiles

    def counted(self, regions, boxes):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == calls["stop"]:
            raise KeyboardInterrupt
        return real(self, regions, boxes)

    monkeypatch.setattr(LearnedCodec, "encode_tiles", counted)
    out = tmp_path / "l.zarr.zip"
    with pytest.raises(CompressInterrupted) as info:
        compress_source(ArraySource(img), out, get_codec("learned", 3), tile_size=64)
    assert 0 < info.value.done < info.value.total
    calls.update(n=0, stop=None)
    compress_source(ArraySource(img), out, get_codec("learned", 3), tile_size=64, resume=True)
    with open_container(out) as a, open_container(ref) as b:
        assert calls["n"] == sum(b.grid(lv).rows for lv in range(b.level_count)) - 2
        for level in range(a.level_count):
            assert list(a.iter_encoded_tiles(level)) == list(b.iter_encoded_tiles(level))


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped weights missing")
def test_cli_refine_option_reaches_the_codec_and_the_container(tmp_path):
    from PIL import Image

    from conftest import HE_TEST_PNG

    img = np.asarray(Image.open(need(HE_TEST_PNG)).convert("RGB"))[:200, :300]
    Image.fromarray(img).save(tmp_path / "he.png")
    run = lambda *a: subprocess.run([sys.executable, "-m", "wsicodec", *a], capture_output=True, text=True)  # noqa: E731
    sizes = {}
    for refine in (0, 3):
        out = tmp_path / f"r{refine}.zarr.zip"
        r = run("compress", str(tmp_path / "he.png"), str(out), "--codec", "learned", "--quality", "3",
                "--tile-size", "128",
                "--option", f"refine={refine}", "--quiet")
        assert r.returncode == 0, r.stderr
        info = json.loads(run("info", str(out), "--json").stdout)
        assert info["codec"]["configuration"].get("refine", 0) == refine
        r = run("decompress", str(out), str(tmp_path / f"r{refine}.tiff"), "--tiff-compression", "zlib", "--quiet")
        assert r.returncode == 0, r.stderr
        with openslide.OpenSlide(str(tmp_path / f"r{refine}.tiff")) as s:
            got = np.asarray(s.read_region((0, 0), 0, (300, 200)).convert("RGB"))
        assert psnr(img, got) > 24
        sizes[refine] = out.stat().st_size
    assert sizes[3] != sizes[0]


@pytest.mark.parametrize("args,message", [
    (["--quality", "9"], "quality must be in 1..8"),
    (["--option", "refine=-1"], "refine must be an integer in 0..1000"),
    (["--quality", "4"], "not a readable model checkpoint"),   # with WSICODEC_MODEL pointing at junk
])
def test_cli_learned_errors_are_one_line(tmp_path, args, message):
    import os

    src = need(REAL_SLIDES["generic-tiff"])
    junk = tmp_path / "junk.pt"
    junk.write_text("not a model")
    env = dict(os.environ, WSICODEC_MODEL=str(junk)) if "4" in args else None
    out = tmp_path / "o.zarr"
    r = subprocess.run([sys.executable, "-m", "wsicodec", "compress", str(src), str(out), "--codec",
                        "learned", *args], capture_output=True, text=True, env=env)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsicodec: error:") and message in lines[0], r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [junk]


def test_cli_decodes_a_container_made_with_earlier_weights_found_by_id(tmp_path):
    """Upgrading the shipped weights never strands a container: the error says where to
    put the old file, and with it in $WSICODEC_MODEL_DIR decompression works."""
    import os

    from conftest import other_weights

    src = need(REAL_SLIDES["generic-tiff"])
    folder = tmp_path / "models"
    earlier = other_weights(folder / "earlier.pt", "stands in for an earlier release")
    out, tiff = tmp_path / "o.zarr.zip", tmp_path / "o.tiff"
    base = {k: v for k, v in os.environ.items() if not k.startswith("WSICODEC_MODEL")}
    run = lambda *a, **env: subprocess.run([sys.executable, "-m", "wsicodec", *a, "--quiet"],  # noqa: E731
                                           capture_output=True, text=True, env={**base, **env})
    r = run("compress", str(src), str(out), "--quality", "2", WSICODEC_MODEL=str(earlier))
    assert r.returncode == 0, r.stderr
    r = run("decompress", str(out), str(tiff))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "WSICODEC_MODEL_DIR" in lines[0], r.stderr
    assert not tiff.exists()
    r = run("decompress", str(out), str(tiff), WSICODEC_MODEL_DIR=str(folder))
    assert r.returncode == 0, r.stderr
    assert tiff.stat().st_size > 0
