"""Tiles with neighbour context (the learned codec's seam guard) are cut correctly,
and the learned codec runs through the CLI on a real slide."""

from __future__ import annotations

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


@pytest.mark.parametrize("shape,tile,margin", [((301, 219), 64, 8), ((130, 700), 32, 5), ((64, 64), 16, 16)])
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
    src = need(REAL_SLIDES["generic-tiff"])
    out, tiff = tmp_path / "s.zarr.zip", tmp_path / "s.tiff"
    run = lambda *a: subprocess.run([sys.executable, "-m", "wsicodec", *a], capture_output=True, text=True)  # noqa: E731
    r = run("compress", str(src), str(out), "--quality", "8", "--tile-size", "128", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "learned" in r.stdout
    r = run("decompress", str(out), str(tiff), "--tiff-compression", "zlib", "--quiet")
    assert r.returncode == 0, r.stderr
    with openslide.OpenSlide(str(src)) as a, openslide.OpenSlide(str(tiff)) as b:
        assert b.dimensions == a.dimensions
        ref = np.asarray(a.read_region((0, 0), 0, a.dimensions).convert("RGB"))
        got = np.asarray(b.read_region((0, 0), 0, b.dimensions).convert("RGB"))
    assert psnr(ref, got) > 22
