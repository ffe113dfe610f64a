"""The scanner's own tiles (wsicodec.scannertiles: JPEG carried in JPEG-XL, Aperio JPEG 2000 as
it is) and the ``auto`` codec's use of them: the source side, the stream, the choice, the
records, damage."""

from __future__ import annotations

import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_flush_denormal(True)

from conftest import SLIDES, need, textured  # noqa: E402

import wsicodec  # noqa: E402
from wsicodec.classical import Jpeg2000Codec, JpegXlCodec  # noqa: E402
from wsicodec.codecs import get_codec  # noqa: E402
from wsicodec.errors import CorruptDataError, InvalidSettingError  # noqa: E402
from wsicodec.fidelity import TileRecords  # noqa: E402
from wsicodec.pipeline import compress  # noqa: E402
from wsicodec.scannertiles import (carry, complete_jpeg, decode_carried, is_carried, jpeg_frame_size,  # noqa: E402
                                  jpegxl_declared_size, open_scanned)

T = 32


def _jpeg(img: np.ndarray, level: int = 80) -> bytes:
    import imagecodecs
    return bytes(imagecodecs.jpeg8_encode(img, level=level))


def _tiff(path, img: np.ndarray, tile: int = T) -> None:
    import tifffile
    tifffile.imwrite(path, img, tile=(tile, tile), compression="jpeg", compressionargs={"level": 60})


@pytest.fixture(scope="module")
def jpeg_tiff(tmp_path_factory, tissue):
    """A generic tiled TIFF of he/test tissue in 32-px JPEG tiles (as a scanner writes them),
    and its pixels as OpenSlide decodes them."""
    import openslide
    path = tmp_path_factory.mktemp("scanned") / "tissue.tif"
    _tiff(path, np.ascontiguousarray(tissue[:80, :112]))
    with openslide.OpenSlide(str(path)) as s:
        pixels = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    return path, pixels


# ---------------------------------------------------------------------------- the stream
def test_a_carried_jpeg_decodes_to_libjpegs_pixels_exactly():
    import imagecodecs
    jpeg = _jpeg(textured(240, 240, 1))
    data = carry(jpeg)
    assert is_carried(data) and data.startswith(b"\x00\x00\x00\x0cJXL ") and len(data) < len(jpeg)
    assert bytes(imagecodecs.jpegxl_decode_jpeg(data)) == jpeg
    np.testing.assert_array_equal(decode_carried(data, (240, 240)), imagecodecs.jpeg8_decode(jpeg))
    assert jpeg_frame_size(jpeg) == (240, 240, 3)


def test_a_jpeg_that_recompresses_to_more_bytes_is_carried_as_it_is():
    import imagecodecs
    jpeg = _jpeg(np.full((16, 16, 3), 200, np.uint8))       # tiny: JPEG-XL's own boxes cost more
    assert carry(jpeg) == jpeg and is_carried(jpeg)
    np.testing.assert_array_equal(decode_carried(jpeg, (16, 16)), imagecodecs.jpeg8_decode(jpeg))
    with pytest.raises(CorruptDataError, match="declares"):
        decode_carried(jpeg, (16, 32), "t")
    with pytest.raises(CorruptDataError, match="no JPEG"):
        carry(b"GIF89a")


def test_only_a_jpegxl_container_with_reconstruction_data_is_carried():
    img = textured(32, 32, 2)
    assert not is_carried(JpegXlCodec().encode(img))                    # a plain codestream
    assert not is_carried(b"\xff\xd8")                                  # no marker after SOI
    assert not is_carried(Jpeg2000Codec().encode(img))
    data = carry(_jpeg(textured(240, 240, 2)))
    assert not is_carried(data[:40])                                    # cut before its jbrd box
    assert not is_carried(data[:12] + struct.pack(">I4s", 0, b"jxlc"))  # a container without one
    assert not is_carried(b"")


def test_a_carried_jpeg_of_another_size_is_refused_before_it_decodes(monkeypatch):
    import imagecodecs
    data = carry(_jpeg(textured(48, 64, 3)))
    assert data.startswith(b"\x00\x00\x00\x0cJXL ") and jpegxl_declared_size(data) == (48, 64)
    assert jpegxl_declared_size(carry(_jpeg(textured(240, 320, 3)))) == (240, 320)    # a ratio code
    assert jpegxl_declared_size(JpegXlCodec().encode(textured(16, 16, 3))) is None    # no container
    called = []
    monkeypatch.setattr(imagecodecs, "jpegxl_decode_jpeg", lambda *a, **k: called.append(1))
    with pytest.raises(CorruptDataError, match="tile .0, 0.: not a carried JPEG of the tile's size"):
        decode_carried(data, (64, 48), "tile (0, 0)")
    with pytest.raises(CorruptDataError, match="not a carried JPEG"):
        decode_carried(JpegXlCodec().encode(textured(16, 16, 3)), (16, 16))
    assert not called                                                   # libjxl never saw them
    monkeypatch.undo()
    with pytest.raises(CorruptDataError, match="tile x"):
        decode_carried(data[:-200], (48, 64), "tile x")                 # truncated


def test_a_tiff_tile_is_completed_with_its_tables_and_colour_space():
    jpeg = _jpeg(textured(16, 16, 4))
    assert complete_jpeg(None, jpeg, 6) == jpeg                         # YCbCr, self-contained
    assert complete_jpeg(None, b"not a jpeg", 6) is None
    rgb = complete_jpeg(None, jpeg, 2)                                  # RGB with a JFIF marker: as is
    assert rgb == jpeg
    bare = b"\xff\xd8" + jpeg[20:]                                      # its JFIF APP0 taken out
    assert jpeg[2:4] == b"\xff\xe0" and jpeg[4:6] == b"\x00\x10"
    assert complete_jpeg(None, bare, 2)[2:11] == b"\xff\xee\x00\x0eAdobe"


# ---------------------------------------------------------------------------- the source
def test_the_tiles_of_a_jpeg_tiff_are_found_only_on_their_own_grid(jpeg_tiff, tmp_path):
    path, pixels = jpeg_tiff
    tiles = open_scanned(path, [(112, 80)], T)
    assert tiles is not None and tiles.levels() == [0]
    row = tiles.row(0, 1, 4)
    assert len(row) == 4 and all(j is not None for j in row)
    np.testing.assert_array_equal(decode_carried(carry(row[2]), (T, T)), pixels[T:2 * T, 2 * T:3 * T])
    tiles.close()
    assert open_scanned(path, [(112, 80)], 48) is None                  # another grid
    assert open_scanned(path, [(100, 80)], T) is None                   # another level size
    assert open_scanned(tmp_path / "missing.tif", [(112, 80)], T) is None
    assert open_scanned(tmp_path, [(112, 80)], T) is None               # a folder (DICOM)
    (tmp_path / "x.png").write_bytes(b"\x89PNG not really")
    assert open_scanned(tmp_path / "x.png", [(112, 80)], T) is None


def test_an_aperio_svs_gives_openslides_pixels_exactly():
    import openslide
    path = need(SLIDES / "cmu_small_region.svs")
    with openslide.OpenSlide(str(path)) as s:
        tiles = open_scanned(path, s.level_dimensions, 240)
        assert tiles is not None and tiles.levels() == [0]              # level 1 is one strip
        for col, row in ((0, 0), (4, 6), (9, 12)):                      # the last: an edge tile
            w, h = min(240, s.dimensions[0] - col * 240), min(240, s.dimensions[1] - row * 240)
            ref = np.asarray(s.read_region((col * 240, row * 240), 0, (w, h)).convert("RGB"))
            np.testing.assert_array_equal(decode_carried(carry(tiles.tile(0, col, row)), (240, 240))[:h, :w], ref)
        tiles.close()
        assert open_scanned(path, s.level_dimensions, 256) is None


# ---------------------------------------------------------------------------- the choice
@pytest.fixture(scope="module")
def carried_container(jpeg_tiff, tmp_path_factory):
    path, _ = jpeg_tiff
    out = tmp_path_factory.mktemp("carried") / "c.zarr"
    compress(path, out, get_codec("auto", min_psnr=60.0), tile_size=T)
    return out


def test_auto_carries_the_scanners_tiles_where_they_are_the_fewest_bytes(jpeg_tiff, carried_container):
    path, pixels = jpeg_tiff
    with wsicodec.open_slide(carried_container) as s:
        rec = s.tile_records(0)
        kinds = [rec.kind_names[k] for k in rec.kind.ravel()]
        assert "scanner-jpeg" in kinds
        got = np.asarray(s.read_region((0, 0), 0, (112, 80)))[..., :3]
    scanned = open_scanned(path, [(112, 80)], T)
    for (row, col), k in np.ndenumerate(rec.kind):
        ys, xs = slice(row * T, (row + 1) * T), slice(col * T, (col + 1) * T)
        if rec.kind_names[k] == "scanner-jpeg":
            assert rec.psnr[row, col] == np.inf
            np.testing.assert_array_equal(got[ys, xs], pixels[ys, xs])
            assert rec.nbytes[row, col] == len(carry(scanned.tile(0, col, row)))    # that tile, carried
        assert rec.psnr[row, col] >= 60.0
    scanned.close()


def test_without_scanner_tiles_the_same_slide_carries_nothing(jpeg_tiff, tmp_path):
    path, _ = jpeg_tiff
    out = tmp_path / "off.zarr"
    compress(path, out, get_codec("auto", min_psnr=60.0, scanner_tiles=False), tile_size=T)
    with wsicodec.open_slide(out) as s:
        rec = s.tile_records(0)
        assert "scanner-jpeg" not in {rec.kind_names[k] for k in rec.kind.ravel()}


def test_the_option_is_recorded_and_checked():
    codec = get_codec("auto", min_psnr=40.0)
    assert codec.to_dict()["configuration"]["scanner_tiles"] is True
    assert get_codec("auto", scanner_tiles=0).to_dict()["configuration"]["scanner_tiles"] is False
    with pytest.raises(InvalidSettingError, match="scanner_tiles"):
        get_codec("auto", scanner_tiles=2)
    from wsicodec.codecs import codec_from_dict
    cfg = dict(codec.to_dict()["configuration"])
    del cfg["scanner_tiles"]                                             # an older container
    assert codec_from_dict({"name": "auto", "configuration": cfg}).scanner_tiles is False


def test_a_record_and_a_stream_that_disagree_on_carrying_are_refused():
    kinds = ("jpegxl", "scanner-jpeg")
    one = np.zeros((1, 1), np.uint8)
    rec = TileRecords(0, kinds, one, np.full((1, 1), np.inf, np.float32), np.ones((1, 1), np.uint32))
    carried = carry(_jpeg(textured(64, 64, 5)))
    plain = JpegXlCodec().encode(textured(16, 16, 5))
    assert "carries a JPEG" in rec.stream_mismatch(0, 0, carried, True)
    assert rec.stream_mismatch(0, 0, plain, True) is None
    rec2 = TileRecords(0, kinds, one + 1, rec.psnr, rec.nbytes)
    assert rec2.stream_mismatch(0, 0, carried, True) is None
    assert rec2.stream_mismatch(0, 0, plain, True) is not None


def test_a_carried_tile_forged_to_another_size_is_a_one_line_error(carried_container, tmp_path, capsys):
    """A carried tile replaced by another size's, digests recomputed on purpose: the
    level's fidelity map no longer adds up, and verify says so in one line (the stream's
    own size check: test_a_carried_jpeg_of_another_size_is_refused_before_it_decodes)."""
    import shutil

    import zarr
    from conftest import forge_digests
    from test_cli import assert_one_line_error, run
    with wsicodec.open_slide(carried_container) as s:
        rec = s.tile_records(0)
    row, col = map(int, np.argwhere(rec.kind == rec.kind_names.index("scanner-jpeg"))[0])
    bad = tmp_path / "bad.zarr"
    shutil.copytree(carried_container, bad)
    tiles = zarr.open_group(str(bad), mode="r+")["levels/0/tiles"]
    data = carry(_jpeg(textured(16, 16, 6)))
    tiles[row:row + 1, col:col + 1] = np.array([[data]], dtype=object)
    forge_digests(bad)
    code, out, err = run(capsys, "verify", "--decode", bad)
    assert_one_line_error(code, err)
    assert "level 0's tile digests or fidelity map" in out


def test_compress_says_which_tile_size_lets_auto_carry_the_scanners_tiles(jpeg_tiff, tmp_path, capsys):
    from test_cli import run
    path, _ = jpeg_tiff
    code, out, err = run(capsys, "compress", path, tmp_path / "a.zarr", "--tile-size", "16", "--min-psnr", "60",
                         "--option", "recovered_jpeg=false")
    assert code == 0, err
    assert "scanner tiles of 32 px: with --tile-size 32 auto can keep each as the scanner stored it" in out
    code, out, err = run(capsys, "compress", path, tmp_path / "r.zarr", "--tile-size", "16", "--min-psnr", "60")
    assert code == 0 and "--tile-size 32" not in out                 # its JPEG blocks recovered on any grid
    code, out, err = run(capsys, "compress", path, tmp_path / "b.zarr", "--tile-size", "32", "--min-psnr", "60")
    assert code == 0, err
    assert "--tile-size 32 auto" not in out
    code, out, _ = run(capsys, "info", tmp_path / "b.zarr")
    assert "scanner-jpeg " in out and "scanner_tiles=True" in out
    code, out, err = run(capsys, "compress", path, tmp_path / "c.zarr", "--tile-size", "16", "--codec", "jpegxl")
    assert code == 0 and "--tile-size 32" not in out                 # only auto carries them


def test_dicom_export_recodes_a_carried_tile_rather_than_pass_it_through():
    """A JPEG-XL decoder's own decode of a carried tile is not the scanner's pixels."""
    pytest.importorskip("wsidicom")
    from wsicodec.dicom.source import stored_codestream
    plain = JpegXlCodec().encode(textured(16, 16, 7))
    assert stored_codestream(plain, "jpegxl") == plain
    assert stored_codestream(carry(_jpeg(textured(240, 240, 7))), "jpegxl") is None
    assert stored_codestream(_jpeg(textured(16, 16, 7)), "jpegxl") is None


def test_bands_of_a_cluster_carry_as_one_process_does(jpeg_tiff, carried_container):
    """compress-many's bands read the scanner's tiles too: the same bytes as compress."""
    from test_cluster import tiles_of

    from wsicodec.cluster.bands import Segment, encode_band
    from wsicodec.tiling import open_source, plan_pyramid
    path, _ = jpeg_tiff
    ref = tiles_of(carried_container)
    codec = get_codec("auto", min_psnr=60.0)
    with open_source(path) as src:
        plan = plan_pyramid(src.level_dimensions, src.level_downsamples, T)
        rows = encode_band(codec, src, plan, Segment(0, 1, 3))
    assert [r.row for r in rows] == [1, 2]
    for r in rows:
        assert r.tiles == [ref[(0, c, r.row)] for c in range(len(r.tiles))]
    assert any(ref[(0, c, r)].startswith((b"\xff\xd8\xff", b"\x00\x00\x00\x0cJXL ")) for c in range(4) for r in (1, 2))


def test_an_aperio_jpeg2000_svs_gives_its_codestreams_as_they_are():
    """The tcga slide: Aperio JPEG 2000 (33005, RGB) in 256-px tiles on levels 0 and 1, the
    container's own grid; a bare JPEG 2000 tile to readers, OpenSlide's pixels exactly."""
    from wsicodec.tiling import Rect, open_source
    path = need(SLIDES / "tcga-cr-7395-01a-01-ts1.svs")
    with open_source(path) as src:
        tiles = open_scanned(path, src.level_dimensions, 256)
        assert tiles is not None and tiles.levels() == [0, 1]
        for level, col, row in ((0, 0, 0), (0, 7, 5), (0, 17, 13), (1, 3, 2), (1, 8, 6)):
            data = tiles.tile(level, col, row)
            assert carry(data) == data and data[:4] == b"\xff\x4f\xff\x51" and not is_carried(data)
            w, h = src.level_dimensions[level]
            vw, vh = min(256, w - col * 256), min(256, h - row * 256)
            px = Jpeg2000Codec().decode(data)
            assert px.shape == (256, 256, 3)
            if level == 0:     # level 1 through OpenSlide: read at level-0 coordinates / 2.0004
                ref = src.read_region(level, Rect(col * 256, row * 256, vw, vh))
                np.testing.assert_array_equal(px[:vh, :vw], ref)
        tiles.close()
    assert open_scanned(path, src.level_dimensions, 240) is None
    from wsicodec.scannertiles import scanner_tile_size
    assert scanner_tile_size(path) == 256


def test_auto_keeps_a_scanners_jpeg2000_tile_as_it_is(tissue):
    """The level encoder given a JPEG 2000 codestream whose pixels are the tile's: kept as
    it is (exact) where it is the fewest bytes over the floor, recorded as scanner-jpeg2000."""
    from test_auto import T as AT, _decode, _grid_rows
    img = np.ascontiguousarray(tissue[200:200 + AT, 200:200 + 2 * AT])
    j2k = [Jpeg2000Codec(38).encode(np.ascontiguousarray(img[:, c * AT:(c + 1) * AT])) for c in range(2)]
    img = np.concatenate([Jpeg2000Codec().decode(d) for d in j2k], axis=1)     # the scan's pixels
    codec = get_codec("auto", min_psnr=45.0)
    enc = codec.level_encoder(0)
    out = {}
    for r, regions, boxes, valid in _grid_rows(img, codec.context):
        for er in enc.push(r, regions, boxes, valid=valid, scanned=j2k):
            out[er.row] = er
    for er in enc.finish():
        out[er.row] = er
    assert out[0].tiles == j2k
    assert [k for k, _ in out[0].records] == ["scanner-jpeg2000"] * 2
    assert all(p == np.inf for _, p in out[0].records)
    assert all(p == np.inf for p in _decode(codec, img, out).values())


def test_an_interrupted_compress_resumes_to_the_same_carried_container(tissue, tmp_path, monkeypatch):
    """A resumed run takes its stored rows, carried tiles among them, as their neighbours'
    context, and writes the container an uninterrupted run writes."""
    from wsicodec.container import open_container
    from wsicodec.errors import CompressInterrupted
    from wsicodec.learned import levelencoder
    path = tmp_path / "scan.tif"
    _tiff(path, np.ascontiguousarray(tissue[:128, :160]))              # level 0: 5 x 4 tiles
    codec = get_codec("auto", min_psnr=60.0)
    ref = tmp_path / "ref.zarr.zip"
    compress(path, ref, codec, tile_size=T)
    with open_container(ref) as c:
        rec = c.tile_records(0)
        assert rec.kind_names.index("scanner-jpeg") in rec.kind[:2]    # carried in the stored rows
    real_push, calls = levelencoder.MixedLevelEncoder.push, []

    def push(self, row, *a, **kw):
        calls.append(row)
        if len(calls) == 4:            # level 0's rows 0-1 out, rows 2-3 coded but not, Ctrl-C
            raise KeyboardInterrupt
        return real_push(self, row, *a, **kw)

    monkeypatch.setattr(levelencoder.MixedLevelEncoder, "push", push)
    out = tmp_path / "run.zarr.zip"
    with pytest.raises(CompressInterrupted):
        compress(path, out, codec, tile_size=T)
    monkeypatch.setattr(levelencoder.MixedLevelEncoder, "push", real_push)
    result = compress(path, out, codec, tile_size=T, resume=True)
    assert result.resumed_tiles > 0
    with open_container(ref) as a, open_container(out) as b:
        for lv in range(a.level_count):
            assert list(a.iter_encoded_tiles(lv)) == list(b.iter_encoded_tiles(lv))
            np.testing.assert_array_equal(a.tile_records(lv).kind, b.tile_records(lv).kind)
