"""A JPEG scan's JPEG made again from its decoded pixels (wsicodec.jpegrecover) and the
``auto`` codec's use of it: what the pixels tell, what they do not, the choice, the option,
the records."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_flush_denormal(True)

from conftest import REAL_SLIDES, need, textured  # noqa: E402

from wsicodec.codecs import codec_from_dict, get_codec  # noqa: E402
from wsicodec.errors import InvalidSettingError  # noqa: E402
from wsicodec.fidelity import TileRecords  # noqa: E402
from wsicodec.jpegrecover import JpegSetting, detect, ijg_table, recover  # noqa: E402
from wsicodec.learned.jxlfit import tile_psnr  # noqa: E402
from wsicodec.scannertiles import carry, decode_carried  # noqa: E402


def _scan(img: np.ndarray, quality: int, rgb: bool = False, subsampling: str = "420") -> np.ndarray:
    """``img`` as a scanner's JPEG decodes: R, G, B components (Aperio) or YCbCr."""
    import imagecodecs
    kw = {"colorspace": "RGB", "outcolorspace": "RGB"} if rgb else {"subsampling": subsampling}
    return imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(np.ascontiguousarray(img), level=quality, **kw))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return tile_psnr(a, b, b.shape[:2])


@pytest.fixture(scope="module")
def crop(tissue) -> np.ndarray:
    return np.ascontiguousarray(tissue[300:556, 300:556])


# ---------------------------------------------------------------------------- the pixels
def test_ijg_tables_are_libjpegs():
    import imagecodecs
    jpeg = bytes(imagecodecs.jpeg8_encode(np.zeros((16, 16, 3), np.uint8), level=30))
    i = jpeg.index(b"\xff\xdb")
    assert list(jpeg[i + 5:i + 5 + 64])[:3] == [27, 18, 20]       # zigzag: (0,0), (0,1), (1,0)
    t = ijg_table(30)
    assert (t[0, 0], t[0, 1], t[1, 0]) == (27, 18, 20)
    assert ijg_table(100).max() == 1


@pytest.mark.parametrize("quality,rgb,subsampling", [(30, True, "444"), (50, True, "444"), (80, False, "420"),
                                                     (60, False, "444"), (95, False, "444")])
def test_the_quality_and_colour_of_a_jpeg_decode_are_read_from_its_pixels(crop, quality, rgb, subsampling):
    got = detect(_scan(crop, quality, rgb, subsampling))
    assert got is not None and got.rgb == rgb
    assert (ijg_table(got.quality) == ijg_table(quality)).all()


def test_its_jpeg_made_again_decodes_to_the_scans_pixels_within_rounding(crop):
    for quality, rgb, subsampling in ((30, True, "444"), (80, False, "420")):
        scan = _scan(crop, quality, rgb, subsampling)
        best = max(_psnr(decode_carried(carry(j), scan.shape[:2]), scan) for j in recover(scan))
        assert best >= 50.0, (quality, rgb, best)             # the scan itself: ~30-36 dB from crop


def test_a_scan_of_r_g_b_components_is_written_again_exactly_where_it_clipped_little(crop):
    """Aperio's kind of JPEG: its coefficients written as they were, clipped blocks
    found again; a crop made bright (a sixth of it clipped at 255 after the scanner's
    decode) comes back but for a block or so, where several codings clip alike."""
    scan = _scan(crop, 30, rgb=True)
    np.testing.assert_array_equal(decode_carried(carry(recover(scan)[0]), scan.shape[:2]), scan)
    bright = _scan(np.clip(crop.astype(np.int16) + 60, 0, 255).astype(np.uint8), 30, rgb=True)
    assert (bright == 255).any(axis=2).mean() > 0.15
    px = decode_carried(carry(recover(bright)[0]), bright.shape[:2])
    assert (px != bright).any(axis=2).mean() < 0.001 and _psnr(px, bright) > 60.0


def test_the_jpeg_writer_refuses_what_baseline_jpeg_cannot_hold():
    from wsicodec.jpegwrite import write_rgb
    table = ijg_table(50)
    with pytest.raises(ValueError, match="range"):
        write_rgb(np.full((3, 1, 1, 8, 8), 2000), table, 8, 8)
    with pytest.raises(ValueError, match="shape"):
        write_rgb(np.zeros((3, 2, 1, 8, 8), np.int64), table, 8, 8)
    import imagecodecs
    empty = imagecodecs.jpeg8_decode(write_rgb(np.zeros((3, 2, 3, 8, 8), np.int64), table, 16, 20))
    assert empty.shape == (16, 20, 3) and (empty == 128).all()


def test_pixels_that_were_no_jpeg_on_this_grid_show_none(crop):
    scan = _scan(crop, 30, rgb=True)
    assert detect(crop) is None                                # he/test: from JPEG 2000 scans
    assert detect(np.ascontiguousarray(scan[3:, 5:])) is None  # off the block grid
    assert detect(np.full((256, 256, 3), 242, np.uint8)) is None        # glass
    assert detect(textured(256, 256, 3)) is None
    assert detect(scan[:8, :8]) is None and detect(scan[..., 0]) is None
    assert recover(crop) == []


def test_a_real_jpeg_slide_shows_its_scanners_setting():
    """cmu_small_region.svs: Aperio JPEG q30 tiles of R, G, B components, 240 px; a 256-px
    tile of level 0 (on the 8-px grid, across the scanner's tile borders) shows it."""
    import openslide
    with openslide.OpenSlide(str(need(REAL_SLIDES["svs-jpeg"]))) as s:
        px = np.asarray(s.read_region((1024, 1280), 0, (256, 256)).convert("RGB"))
    assert detect(px) == JpegSetting(30, True)
    written, recoded = recover(px)            # its coefficients written; libjpeg's coding of it
    np.testing.assert_array_equal(decode_carried(carry(written), (256, 256)), px)
    assert _psnr(decode_carried(carry(recoded), (256, 256)), px) >= 50.0


def test_an_edge_tile_is_read_from_its_part_inside_the_level(crop):
    scan = _scan(crop, 30, rgb=True)
    padded = np.pad(scan[:200, :120], ((0, 56), (0, 136), (0, 0)), mode="edge")   # as the tiler pads
    assert recover(padded) == []
    jpeg = recover(padded, (200, 120))[0]
    px = decode_carried(carry(jpeg), (256, 256))
    assert tile_psnr(px, padded, (200, 120)) >= 50.0


# ---------------------------------------------------------------------------- the choice
def _encode_grid(codec, img):
    from test_auto import _grid_rows
    enc = codec.level_encoder(0)
    out = {}
    for r, regions, boxes, valid in _grid_rows(img, codec.context):
        for er in enc.push(r, regions, boxes, valid=valid):
            out[er.row] = er
    for er in enc.finish():
        out[er.row] = er
    return out


def test_auto_keeps_the_recovered_jpeg_where_it_is_the_fewest_bytes(crop):
    from test_auto import T as AT, _decode
    scan = _scan(crop, 30, rgb=True)[:AT, :2 * AT]
    codec = get_codec("auto", min_psnr=45.0)
    out = _encode_grid(codec, scan)
    kinds = [k for k, _ in out[0].records]
    assert kinds == ["recovered-jpeg"] * 2
    got = _decode(codec, scan, out)
    for (c, _), p in got.items():
        recorded = out[0].records[c][1]
        assert p >= 50.0 and (p == recorded or abs(p - recorded) < 0.01)   # recorded as readers decode
    off = _encode_grid(get_codec("auto", min_psnr=45.0, recovered_jpeg=False), scan)
    assert "recovered-jpeg" not in [k for k, _ in off[0].records]
    assert sum(map(len, out[0].tiles)) < sum(map(len, off[0].tiles))


def test_the_qualitys_price_of_error_decides_between_the_network_and_the_jpeg(crop):
    """At quality 1 the network's few bytes win; at 8, where a unit of squared error is
    worth 0.13 bpp to it, the recovered JPEG (≥ 50 dB) wins though the floor is low."""
    from test_auto import T as AT
    scan = _scan(crop, 30, rgb=True)[:AT, :2 * AT]
    low, high = (_encode_grid(get_codec("auto", quality=q, min_psnr=20.0), scan) for q in (1, 8))
    assert "recovered-jpeg" not in [k for k, _ in low[0].records]
    assert [k for k, _ in high[0].records] == ["recovered-jpeg"] * 2
    assert get_codec("auto", quality=8).chooser.price > 100 * get_codec("auto", quality=1).chooser.price


def test_the_option_is_recorded_and_checked():
    codec = get_codec("auto", min_psnr=40.0)
    assert codec.to_dict()["configuration"]["recovered_jpeg"] is True
    assert "recovered-jpeg" in codec.tile_kinds
    with pytest.raises(InvalidSettingError, match="recovered_jpeg"):
        get_codec("auto", recovered_jpeg="yes")
    cfg = dict(codec.to_dict()["configuration"])
    del cfg["recovered_jpeg"]                                            # an older container
    assert codec_from_dict({"name": "auto", "configuration": cfg}).recovered_jpeg is False


def test_a_recovered_record_must_hold_a_carried_jpeg(crop):
    from wsicodec.classical import JpegXlCodec
    kinds = ("jpegxl", "recovered-jpeg")
    rec = TileRecords(0, kinds, np.ones((1, 1), np.uint8), np.full((1, 1), 55.0, np.float32),
                      np.ones((1, 1), np.uint32))
    jpeg = recover(_scan(crop, 30, rgb=True))[0]
    assert rec.stream_mismatch(0, 0, carry(jpeg), True) is None
    assert rec.stream_mismatch(0, 0, JpegXlCodec().encode(textured(16, 16, 5)), True) is not None
    as_jpegxl = TileRecords(0, kinds, np.zeros((1, 1), np.uint8), rec.psnr, rec.nbytes)
    assert "carries a JPEG" in as_jpegxl.stream_mismatch(0, 0, carry(jpeg), True)
