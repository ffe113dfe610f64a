"""bench/rd.py over the evaluation sets of bench/datasets.py (``--set``), the JPEG-XL range, the
``auto`` series and the tiled wrapper it is measured through."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # bench/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))

from bench import datasets, metrics, rd  # noqa: E402
from bench.rd_sweeps import TiledCodec  # noqa: E402
from conftest import textured  # noqa: E402


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return textured(h, w, seed, 30, 230)


@pytest.fixture()
def tiny_sets(monkeypatch, tmp_path):
    """Two stand-in sets: ``tiny_png`` reads PNGs from a folder under $WSICODEC_DATA (as he_test
    does), ``tiny_mem`` makes its image in memory (as the slide crops are named)."""
    from PIL import Image

    root = tmp_path / "data"
    (root / "pngs").mkdir(parents=True)
    for i, (h, w) in enumerate([(72, 90), (64, 64)]):
        Image.fromarray(_image(h, w, i)).save(root / "pngs" / f"img{i}.png")
    monkeypatch.setenv("WSICODEC_DATA", str(root))

    def png_load(r, limit):
        files = sorted((r / "pngs").glob("*.png"))
        for p in files[:limit] if limit else files:
            yield p.stem, datasets.area_downsample(datasets.load_png(p), 2)

    def mem_load(r, limit):
        yield "made_in_memory", _image(70, 66, seed=9)

    monkeypatch.setitem(datasets.DATASETS, "tiny_png",
                        datasets.Dataset("tiny_png", "PNGs halved", 1.0, "made up", ("pngs",), png_load))
    monkeypatch.setitem(datasets.DATASETS, "tiny_mem",
                        datasets.Dataset("tiny_mem", "one image in memory", 1.0, "made up", (), mem_load))
    return root


def _run(argv):
    import torch

    threads = torch.get_num_threads()
    try:
        return rd.main(argv + ["--no-visual", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)


def test_set_option_writes_one_result_per_set(tiny_sets, tmp_path, lpips_trunk):
    out = tmp_path / "out"
    assert _run(["--set", "tiny_png,tiny_mem", "--set", "tiny_png", "--codecs", "jpeg444,auto",
                 "--max-images", "1", "--out", str(out), "--tag", "scratch"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        f"rd_scratch_{s}.{ext}" for s in ("tiny_mem", "tiny_png") for ext in ("json", "md", "png")]

    png = json.loads((out / "rd_scratch_tiny_png.json").read_text())
    assert png["set"]["name"] == "tiny_png" and png["set"]["source_lossy"] is True
    assert png["images_dir"] == "tiny_png (bench/datasets.py)"
    # --max-images 1; named by its source file; the pixels coded are the set's (halved), not the file's
    [im] = png["images"]
    src = tiny_sets / "pngs" / "img0.png"
    halved = datasets.area_downsample(datasets.load_png(src), 2)
    assert im["name"] == "img0.png" and (im["width"], im["height"]) == (45, 36)
    assert im["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert im["pixels_sha256"] == hashlib.sha256(halved.tobytes()).hexdigest()
    assert im["source"] == "pngs/img0.png"
    entry = png["codecs"]["jpeg444"]
    assert entry["status"] == "ok"
    assert {r["image"] for p in entry["points"] for r in p["per_image"]} == {"img0.png"}
    # the psnr recorded is that of the set's pixels through the codec
    from wsicodec.codecs import get_codec

    q = entry["points"][-1]["quality"]
    codec = get_codec("jpeg", q, subsampling="444")
    assert entry["points"][-1]["per_image"][0]["psnr"] == pytest.approx(
        metrics.psnr(halved, codec.decode(codec.encode(halved))))
    # top PSNR: the highest mean PSNR of the curve, per codec, in the JSON and the table
    assert png["top_psnr"]["jpeg444"] == pytest.approx(max(p["mean"]["psnr"] for p in entry["points"]))
    assert entry["top_psnr"] == png["top_psnr"]["jpeg444"]
    md = (out / "rd_scratch_tiny_png.md").read_text()
    assert "Top PSNR" in md and "Set `tiny_png`" in md
    # each result names the command that regenerates it alone
    assert png["command"].endswith("--set tiny_png --tag scratch_tiny_png")
    # auto: swept like learned once registered, else skipped with the reason recorded
    auto = png["codecs"]["auto"]
    assert auto["status"] in ("ok", "partial", "skipped")
    if auto["status"] == "skipped":
        assert "auto" in auto["reason"] and "Not measured here" in md

    mem = json.loads((out / "rd_scratch_tiny_mem.json").read_text())
    assert [im["name"] for im in mem["images"]] == ["made_in_memory"]
    assert mem["images"][0]["sha256"] is None and mem["set"]["name"] == "tiny_mem"

    # --update merges only into results of the same set and images
    with pytest.raises(SystemExit, match="made on set tiny_png"):
        _run(["--set", "tiny_mem", "--tag", "scratch_tiny_png", "--update", "jpeg420",
              "--out", str(out), "--max-images", "1"])
    assert _run(["--set", "tiny_png", "--tag", "scratch_tiny_png", "--update", "jpeg420",
                 "--out", str(out), "--max-images", "1"]) == 0
    merged = json.loads((out / "rd_scratch_tiny_png.json").read_text())
    assert merged["codecs"]["jpeg444"]["points"] == entry["points"]
    assert "jpeg420" in merged["bd_rate"]["anchors"]["jpeg444"]


def test_set_parsing_and_defaults(tiny_sets):
    assert rd.plan_runs(rd.parse_args([])) == [rd.Run("he_test", "he_test")]   # today's rd_he_test.*
    runs = rd.plan_runs(rd.parse_args(["--set", "cmu, tcga", "--set", "cmu"]))
    assert runs == [rd.Run("cmu", "cmu"), rd.Run("tcga", "tcga")]
    assert rd.plan_runs(rd.parse_args(["--set", "cmu", "--tag", "x"])) == [rd.Run("x", "cmu")]
    assert rd.plan_runs(rd.parse_args(["--images", "a/b-c"])) == [rd.Run("a_b_c", folder="a/b-c")]
    with pytest.raises(SystemExit, match="unknown set 'nope'"):
        rd.plan_runs(rd.parse_args(["--set", "he_test,nope"]))
    with pytest.raises(SystemExit):
        rd.parse_args(["--set", "cmu", "--images", "x"])       # one source or the other
    assert rd.visual_name("he_test") == "visual.png" and rd.visual_name("cmu") == "visual_cmu.png"


def test_jpegxl_spans_its_range_and_auto_is_swept_like_learned():
    q = rd.SWEEPS["jpegxl"].qualities
    assert min(q) == 0.3 and max(q) == 25 and len(set(q)) == len(q) >= 10
    assert list(q) == sorted(q, reverse=True)          # bits grow along the sweep
    auto = rd.SWEEPS["auto"]
    # auto: the learned qualities with a floor that leaves the choice to bytes, then its floor
    # raised at the top quality to reach JPEG-XL's top
    assert auto.qualities[:8] == rd.SWEEPS["learned"].qualities == tuple(range(1, 9))
    floors = [o["min_psnr"] for o in auto.point_options]
    assert len(floors) == len(auto.qualities) and floors[8:] == sorted(floors[8:]) and max(floors) >= 45
    assert set(auto.qualities[8:]) == {8}
    assert "auto" in rd.select(None) and rd.select("auto") == ["auto"]


def test_tiled_codec_codes_a_container_grid():
    """TiledCodec (how auto is measured): 256² tiles through encode_tiles / decode_tiles; every
    byte counted, the pixels those of each tile coded alone."""
    from wsicodec.codecs import get_codec

    codec = get_codec("jpeg", 60, subsampling="444")
    img = _image(300, 270, seed=4)
    tiled = TiledCodec(codec)
    data = tiled.encode(img)
    out = tiled.decode(data)
    tiles = [(ys, xs) for ys in (slice(0, 256), slice(256, 300)) for xs in (slice(0, 256), slice(256, 270))]
    streams = [codec.encode(np.ascontiguousarray(img[ys, xs])) for ys, xs in tiles]
    assert len(data) == 10 + 4 * len(tiles) + sum(map(len, streams))
    for (ys, xs), st in zip(tiles, streams):
        assert np.array_equal(out[ys, xs], codec.decode(st))
