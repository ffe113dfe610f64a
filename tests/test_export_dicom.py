"""``decompress --format dicom``: a DICOM WSI series, written by wsidicom, that OpenSlide's
DICOM driver and wsidicom open with the container's pyramid, mpp, ICC profile and
associated images; JPEG-XL and JPEG 2000 tiles written without re-coding; atomic, one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest

wsidicom = pytest.importorskip("wsidicom", reason="wsidicom is in the test extras")

from conftest import REAL_SLIDES, need, psnr, textured  # noqa: E402
from wsicodec.cli import main  # noqa: E402
from wsicodec.codecs import get_codec  # noqa: E402
from wsicodec.container import open_container  # noqa: E402
from wsicodec.dicom import DicomSettings  # noqa: E402
from wsicodec.dicom.source import stored_codestream  # noqa: E402
from wsicodec.pipeline import compress, compress_source  # noqa: E402
from wsicodec.readback import decompress  # noqa: E402
from wsicodec.slide import open_slide  # noqa: E402
from wsicodec.tiling import ArraySource  # noqa: E402

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_XL = "1.2.840.10008.1.2.4.112"
J2K_SIGNATURE = b"\xff\x4f\xff\x51"


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def dcm_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def as_fragment(data: bytes) -> bytes:
    """A frame as DICOM stores it: padded to an even length."""
    return data + b"\x00" * (len(data) % 2)


def srgb_profile() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.fixture(scope="module")
def cmu(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the cmu SVS, its jpegxl container): mpp, objective power, label, macro, thumbnail."""
    src = need(REAL_SLIDES["svs-jpeg"])
    box = tmp_path_factory.mktemp("dicom") / "c.zarr.zip"
    compress(src, box, get_codec("jpegxl", 1.0), tile_size=512, workers=2)
    return src, box


def test_openslide_and_wsidicom_read_the_default_series(cmu, tmp_path: Path, capsys) -> None:
    src, box = cmu
    out = tmp_path / "series"
    code, said, _ = run(capsys, "decompress", box, out, "--format", "dicom")
    assert code == 0 and "DICOM" in said and "JPEG q95" in said
    files = dcm_files(out)
    assert files and [p.name for p in tmp_path.iterdir()] == ["series"]   # no temp left
    with openslide.OpenSlide(src) as ref:
        mpp = float(ref.properties["openslide.mpp-x"])
    with openslide.OpenSlide(src) as ref, openslide.OpenSlide(files[0]) as dcm, \
            open_slide(box) as ours:
        props = dcm.properties
        assert props["openslide.vendor"] == "dicom"
        assert props["dicom.TransferSyntaxUID"] == JPEG_BASELINE
        for key in ("openslide.mpp-x", "openslide.mpp-y", "openslide.objective-power"):
            assert float(props[key]) == pytest.approx(float(ref.properties[key])), key
        assert dcm.level_dimensions == ours.level_dimensions
        assert sorted(dcm.associated_images) == sorted(ref.associated_images)
        for name in dcm.associated_images:
            assert dcm.associated_images[name].size == ref.associated_images[name].size, name
        for level in range(dcm.level_count):
            w, h = dcm.level_dimensions[level]
            a = np.asarray(dcm.read_region((0, 0), level, (w, h)))[..., :3]
            b = ours.read_region((0, 0), level, (w, h), as_array=True)
            assert psnr(a, b) > 40, level                   # JPEG q95 4:4:4 of the same pixels
    with wsidicom.WsiDicom.open(out) as w:
        assert len(w.levels) == len(dcm_files(out)) - 3     # + label, overview, thumbnail
        assert w.mpp.width == pytest.approx(mpp)
        with open_slide(box) as ours:
            for level, lv in enumerate(w.levels):
                size = lv.size.to_tuple()
                a = np.asarray(w.read_region((0, 0), level, size))[..., :3]
                b = ours.read_region((0, 0), level, size, as_array=True)
                assert psnr(a, b) > 40, level
        assert w.labels is not None and w.overviews is not None


def test_jpegxl_tiles_go_through_unchanged_and_openslide_refuses_them(cmu, tmp_path: Path) -> None:
    _, box = cmu
    out = tmp_path / "jxl"
    result = decompress(box, out, format="dicom", dicom=DicomSettings("jpegxl"))
    assert result.format == "dicom" and result.output_bytes == sum(
        p.stat().st_size for p in dcm_files(out))
    with wsidicom.WsiDicom.open(out) as w, open_container(box) as c:
        for level, lv in enumerate(w.levels):
            for col, row in c.grid(level):
                stored = c.read_encoded_tile(level, col, row)
                frame = w.read_encoded_tile(level, (col, row), crop_to_image_boundary=False)
                assert frame == as_fragment(stored), (level, col, row)
            with open_slide(box) as ours:
                size = lv.size.to_tuple()
                np.testing.assert_array_equal(
                    np.asarray(w.read_region((0, 0), level, size))[..., :3],
                    ours.read_region((0, 0), level, size, as_array=True))
    # OpenSlide 4.0's DICOM driver does not read JPEG-XL: why jpeg is the default
    with pytest.raises(openslide.OpenSlideError, match="transfer syntax"):
        openslide.OpenSlide(dcm_files(out)[0])


def test_jpeg2000_tiles_go_through_unchanged_and_openslide_reads_them(tmp_path: Path) -> None:
    """A ``jpeg2000`` container's tiles are the frames, byte for byte (no second lossy
    generation); OpenSlide's DICOM driver and wsidicom show the container's pixels."""
    box = tmp_path / "j.zarr"
    compress_source(ArraySource(textured(300, 420, seed=5), mpp=(0.5, 0.5)), box,
                    get_codec("jpeg2000", 38), tile_size=128, workers=1)
    out = tmp_path / "j2k"
    decompress(box, out, format="dicom", dicom=DicomSettings("jpeg2000"))
    with wsidicom.WsiDicom.open(out) as w, open_container(box) as c, open_slide(box) as ours:
        for level, lv in enumerate(w.levels):
            for col, row in c.grid(level):
                stored = c.read_encoded_tile(level, col, row)
                assert stored.startswith(J2K_SIGNATURE)
                frame = w.read_encoded_tile(level, (col, row), crop_to_image_boundary=False)
                assert frame == as_fragment(stored), (level, col, row)
            size = lv.size.to_tuple()
            np.testing.assert_array_equal(np.asarray(w.read_region((0, 0), level, size))[..., :3],
                                          ours.read_region((0, 0), level, size, as_array=True))
        with openslide.OpenSlide(dcm_files(out)[0]) as o:
            size = o.level_dimensions[0]
            np.testing.assert_array_equal(np.asarray(o.read_region((0, 0), 0, size))[..., :3],
                                          ours.read_region((0, 0), 0, size, as_array=True))


@pytest.mark.parametrize("syntax, margin", [("jpegxl", 8), ("jpeg2000", 0), ("jpeg2000", 8)])
def test_auto_container_passes_its_tiles_of_the_syntax_and_recodes_the_rest(syntax, margin, tissue,
                                                                             tmp_path: Path, monkeypatch) -> None:
    """An auto container's tiles that are codestreams of the frames' syntax (bare tiles,
    fix-up tails) keep their bytes; its other tiles (glass, network, the other codec) are
    coded in that syntax.  JPEG 2000 tiles with a margin are larger than a frame: re-coded."""
    pytest.importorskip("torch")
    from wsicodec.learned import j2kfit
    monkeypatch.setattr(j2kfit, "RING_TOLERANCE", float("inf"))    # he/test's JPEG 2000 tiles unheld
    img = np.full((256, 512, 3), 236, np.uint8)                 # glass on the right
    if syntax == "jpegxl":                                      # noise: JPEG-XL's at 60 dB
        img[:, :256] = textured(256, 256, seed=3)
        floor, quality, signature = 60.0, 1.0, b"\xff\x0a"
    else:                                                       # he/test: JPEG 2000 wins some
        img[:, :384] = tissue[:256, 64:448]
        floor, quality, signature = 38.0, 45.0, J2K_SIGNATURE
    box = tmp_path / "a.zarr"
    compress_source(ArraySource(img, mpp=(0.5, 0.5)), box,
                    get_codec("auto", 4, min_psnr=floor, jpeg2000_margin=margin), tile_size=128, workers=1)
    out = tmp_path / "auto"
    decompress(box, out, format="dicom", dicom=DicomSettings(syntax, quality))
    passed = recoded = 0
    with wsidicom.WsiDicom.open(out) as w, open_container(box) as c:
        records = c.tile_records(0)
        for col, row in c.grid(0):
            stored = c.read_encoded_tile(0, col, row)
            frame = w.read_encoded_tile(0, (col, row), crop_to_image_boundary=False)
            kind = records.record(col, row).kind
            if stored_codestream(stored, syntax) is not None and not (syntax == "jpeg2000" and margin):
                assert frame == as_fragment(stored_codestream(stored, syntax)), (col, row, kind)
                passed += 1
            else:
                assert frame.startswith(signature), (col, row, kind)   # coded in the syntax
                a = np.asarray(w.read_tile(0, (col, row), crop_to_image_boundary=False))[..., :3]
                assert psnr(a, c.read_tile(0, col, row)) > 40, (col, row)
                recoded += 1
                if stored_codestream(stored, syntax) is not None:
                    passed -= 1                                   # a tile of the syntax, re-coded
    assert recoded and (passed < 0 if syntax == "jpeg2000" and margin else passed > 0)


def test_icc_profile_reaches_openslide(tmp_path: Path) -> None:
    icc = srgb_profile()
    box = tmp_path / "i.zarr.zip"
    compress_source(ArraySource(textured(300, 400, seed=1), mpp=(0.25, 0.25), icc_profile=icc),
                    box, get_codec("jpegxl", 1.0), tile_size=128, workers=1)
    out = tmp_path / "icc"
    decompress(box, out, format="dicom")
    with openslide.OpenSlide(dcm_files(out)[0]) as s:
        assert s.color_profile is not None and s.color_profile.tobytes() == icc
        assert s.associated_images.keys() == set()


def test_deidentify_leaves_out_label_macro_and_source_name(cmu, tmp_path: Path, capsys) -> None:
    _, box = cmu
    out = tmp_path / "deid"
    assert run(capsys, "decompress", box, out, "--format", "dicom", "--deidentify",
               "--quiet")[0] == 0
    with openslide.OpenSlide(dcm_files(out)[0]) as s:
        assert sorted(s.associated_images) == ["thumbnail"]
        assert "cmu_small_region" not in s.properties.get("dicom.SeriesDescription", "")
        assert s.properties.get("dicom.PatientIdentityRemoved") == "YES"


def test_no_mpp_is_a_one_line_error_and_nothing_is_written(tmp_path: Path, capsys) -> None:
    box = tmp_path / "n.zarr.zip"
    compress_source(ArraySource(textured(200, 200, seed=2)), box, get_codec("jpegxl", 1.0),
                    tile_size=128, workers=1)
    code, _, err = run(capsys, "decompress", box, tmp_path / "out", "--format", "dicom")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "--mpp" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.zarr.zip"]


def test_a_pyramid_wsidicom_cannot_hold_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    box = tmp_path / "odd.zarr.zip"      # 500 px wide: 63 px at 1/8, not a power of two apart
    compress_source(ArraySource(textured(600, 500, seed=2), mpp=(0.5, 0.5)), box,
                    get_codec("jpegxl", 1.0), tile_size=128, workers=1)
    code, _, err = run(capsys, "decompress", box, tmp_path / "out", "--format", "dicom")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "cannot write this pyramid" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.zarr.zip"]


def test_mpp_stated_on_the_command_line_reaches_both_readers(tmp_path: Path, capsys) -> None:
    """A container whose source gave no pixel size (the tcga slide) exports with --mpp:
    level 0 at that size, the coarser levels scaled, as OpenSlide and wsidicom read it."""
    import openslide
    from wsidicom import WsiDicom

    box = tmp_path / "n.zarr.zip"
    compress_source(ArraySource(textured(512, 640, seed=2)), box, get_codec("jpegxl", 1.0),
                    tile_size=128, workers=1)      # sides that halve exactly: wsidicom wants
    out = tmp_path / "out"                          # integer level steps within 1 %
    assert run(capsys, "decompress", box, out, "--format", "dicom", "--mpp", "0.252",
               "--quiet")[0] == 0
    with openslide.OpenSlide(str(next(iter(dcm_files(out))))) as s:
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.252)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.252)
    with WsiDicom.open(out) as w:
        assert w.mpp.width == pytest.approx(0.252)
        assert w.levels[-1].mpp.width == pytest.approx(0.252 * 640 / w.levels[-1].size.width)


def test_damaged_tile_leaves_no_series(tmp_path: Path, capsys) -> None:
    box = tmp_path / "d.zarr"
    compress_source(ArraySource(textured(300, 300, seed=4), mpp=(0.5, 0.5)), box,
                    get_codec("jpegxl", 1.0), tile_size=128, workers=1)
    victim = box / "levels" / "0" / "tiles" / "c" / "1" / "1"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    for syntax in ("jpeg", "jpegxl"):
        code, _, err = run(capsys, "decompress", box, tmp_path / "out", "--format", "dicom",
                           "--transfer-syntax", syntax)
        assert code != 0 and len(err.strip().splitlines()) == 1, err
        assert "level=0 col=1 row=1" in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d.zarr"], syntax


def test_overwrite_replaces_a_series_but_never_a_folder_of_other_files(cmu, tmp_path: Path,
                                                                      capsys) -> None:
    _, box = cmu
    out = tmp_path / "o"
    assert run(capsys, "decompress", box, out, "--format", "dicom", "--quiet")[0] == 0
    first = {p.name for p in dcm_files(out)}
    code, _, err = run(capsys, "decompress", box, out, "--format", "dicom")
    assert code == 1 and "already exists" in err
    assert run(capsys, "decompress", box, out, "--format", "dicom", "--overwrite",
               "--quiet")[0] == 0
    assert {p.name for p in dcm_files(out)}.isdisjoint(first)   # new instances, old ones gone
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    code, _, err = run(capsys, "decompress", box, other, "--format", "dicom", "--overwrite")
    assert code == 1 and "not replacing" in err and (other / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "o"]


@pytest.mark.parametrize("argv, fragment", [
    (["--format", "dicom", "--dicom-quality", "0"], "[1, 100]"),
    (["--format", "dicom", "--dicom-quality", "90.5"], "integer"),
    (["--format", "dicom", "--transfer-syntax", "jpeg2000", "--dicom-quality", "5"], "[20, 80]"),
    (["--dicom-quality", "90"], "--format dicom"),
    (["--transfer-syntax", "jpegxl"], "--format dicom"),
    (["--mpp", "0.25"], "--format dicom"),
    (["--format", "dicom", "--mpp", "0"], "mpp"),
])
def test_bad_options_are_one_line_errors(cmu, tmp_path: Path, capsys, argv, fragment) -> None:
    _, box = cmu
    code, _, err = run(capsys, "decompress", box, tmp_path / "x", *argv)
    assert code != 0 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert list(tmp_path.iterdir()) == []


def test_without_wsidicom_says_what_to_install(cmu, tmp_path: Path, capsys, monkeypatch) -> None:
    import sys

    _, box = cmu
    monkeypatch.setitem(sys.modules, "wsidicom", None)          # import fails
    code, _, err = run(capsys, "decompress", box, tmp_path / "x", "--format", "dicom")
    assert code == 1 and "wsicodec[dicom]" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
