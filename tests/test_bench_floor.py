"""bench/floor.py: per-tile PSNR of the archive codecs (issue #28's fidelity floor), on tiny tiles."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # bench/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))

from bench import datasets, floor  # noqa: E402
from conftest import textured  # noqa: E402


def _texture(h: int, w: int, seed: int) -> np.ndarray:
    return textured(h, w, seed, 40, 220)


def _direct_psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255.0 ** 2 / mse)


@pytest.fixture()
def tiny_set(monkeypatch):
    """One image with two full 32² tiles and a partial row, one glass image, one image smaller
    than a tile."""
    textured = _texture(40, 64, seed=1)
    glass = np.full((32, 32, 3), 231, np.uint8)
    small = _texture(20, 24, seed=2)
    images = [("textured", textured), ("glass", glass), ("small", small)]

    def load(root, limit):
        yield from images[:limit] if limit else images

    ds = datasets.Dataset("tiny", "test images", 1.0, "made up", (), load)
    monkeypatch.setitem(datasets.DATASETS, "tiny", ds)
    return dict(images)


def test_floor_json_fields_and_psnr_match_a_direct_computation(tiny_set, tmp_path):
    from wsicodec.codecs import get_codec

    assert floor.main(["--sets", "tiny", "--tile", "32", "--out", str(tmp_path), "--tag", "t"]) == 0
    r = json.loads((tmp_path / "t.json").read_text())
    assert r["schema"] == floor.SCHEMA and r["tile"] == 32
    assert r["thresholds"] == [30, 32, 34, 36, 38, 40]
    assert list(r["codecs"]) == ["jpeg420_q80", "jpeg444_q80", "jpegxl_d1"]
    assert r["codecs"]["jpeg420_q80"]["codec"]["configuration"]["subsampling"] == "420"
    assert r["codecs"]["jpegxl_d1"]["codec"]["configuration"] == {"quality": 1.0, "effort": 7}
    s = r["sets"]["tiny"]
    # two full tiles of `textured`, its two partial ones skipped, glass skipped, `small` whole
    assert s["n_tiles"] == 3 and s["partial_skipped"] == 2 and s["glass_skipped"] == 1
    assert s["whole_image_tiles"] == 1
    assert [(t["image"], t["y"], t["x"], t["height"], t["width"]) for t in s["tiles"]] == [
        ("textured", 0, 0, 32, 32), ("textured", 0, 32, 32, 32), ("small", 0, 0, 20, 24)]

    builders = {"jpeg420_q80": ("jpeg", 80, {"subsampling": "420"}),
                "jpeg444_q80": ("jpeg", 80, {"subsampling": "444"}),
                "jpegxl_d1": ("jpegxl", 1.0, {"effort": 7})}
    for key, (name, q, opts) in builders.items():
        codec = get_codec(name, q, **opts)
        psnrs = []
        for t in s["tiles"]:
            px = tiny_set[t["image"]][t["y"]:t["y"] + t["height"], t["x"]:t["x"] + t["width"]]
            data = codec.encode(np.ascontiguousarray(px))
            expected = _direct_psnr(px, codec.decode(data))
            rec = t["codecs"][key]
            assert rec["psnr"] == pytest.approx(expected, abs=1e-9), (key, t["image"])
            assert rec["bytes"] == len(data)
            assert rec["bpp"] == pytest.approx(8 * len(data) / px.shape[0] / px.shape[1])
            psnrs.append(expected)
        summ = s["summary"][key]
        assert summ["n"] == 3
        assert summ["psnr_min"] == pytest.approx(min(psnrs))
        assert summ["psnr_median"] == pytest.approx(float(np.median(psnrs)))
        assert summ["psnr_p5"] == pytest.approx(float(np.percentile(psnrs, 5)))
        assert summ["psnr_mean"] == pytest.approx(float(np.mean(psnrs)))
        assert summ["bpp_mean"] == pytest.approx(np.mean([t["codecs"][key]["bpp"] for t in s["tiles"]]))
        assert set(summ["share_at_least"]) == {"30", "32", "34", "36", "38", "40"}
        for thr, share in summ["share_at_least"].items():
            assert share == pytest.approx(np.mean(np.array(psnrs) >= float(thr)))
        assert r["pooled"][key] == summ          # one set: pooled is that set
        assert r["recommendation"]["per_codec"][key]["p5_by_set"] == {"tiny": summ["psnr_p5"]}
    cand = r["recommendation"]["candidates_db"]
    p5s = [s["summary"][k]["psnr_p5"] for k in builders]
    assert cand["every_reference_reaches_on_95pct_of_every_set"] == pytest.approx(min(p5s))
    assert cand["at_least_each_reference_p5_in_every_set"] == pytest.approx(max(p5s))
    md = (tmp_path / "t.md").read_text()
    assert "JPEG q80 4:2:0" in md and "Recommendation" in md and "| tiny |" in md


def test_floor_cut_tiles_counts():
    rgb = _texture(600, 520, seed=3)
    tiles, counts = floor.cut_tiles(rgb, 256)
    assert [(y, x) for y, x, _ in tiles] == [(0, 0), (0, 256), (256, 0), (256, 256)]
    assert counts == {"full": 4, "glass": 0, "partial_skipped": 5, "whole_image": 0}
    with pytest.raises(KeyError, match="unknown dataset"):
        floor.main(["--sets", "no_such_set"])
