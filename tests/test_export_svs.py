"""``decompress`` to an Aperio-compatible SVS (OpenSlide and tiffslide open it as vendor
aperio with mpp, objective power, ICC profile and label / macro / thumbnail) and to a
generic TIFF with ICC profile and resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest

from conftest import REAL_SLIDES, psnr, need
from wsicodec.cli import main
from wsicodec.codecs import get_codec
from wsicodec.pipeline import compress, compress_source
from wsicodec.readback import decompress
from wsicodec.slide import open_slide
from wsicodec.tiling import ArraySource


@pytest.fixture(scope="module", params=["svs-jpeg", "svs-jpeg2000"])
def exported(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(source slide, its container, the container as SVS written by the CLI)."""
    src = need(REAL_SLIDES[request.param])
    d = tmp_path_factory.mktemp("svs")
    box = d / "c.zarr.zip"
    compress(src, box, get_codec("jpeg", 85), tile_size=512, workers=2)
    out = d / "c.svs"
    assert main(["decompress", str(box), str(out), "--quiet"]) == 0   # .svs: SVS by default
    return src, box, out


def test_openslide_reads_the_svs_as_aperio(exported) -> None:
    src, box, out = exported
    with openslide.OpenSlide(src) as ref, openslide.OpenSlide(out) as svs, \
            open_slide(box) as ours:
        props = svs.properties
        assert props["openslide.vendor"] == "aperio"
        for key in ("openslide.mpp-x", "openslide.mpp-y", "openslide.objective-power",
                    "openslide.icc-size"):
            assert props.get(key) == ref.properties.get(key), key
        for key, value in ref.properties.items():          # every aperio.* property
            if key.startswith("aperio."):
                assert props.get(key) == value, key
        assert (svs.color_profile is None) == (ref.color_profile is None)
        if ref.color_profile is not None:
            assert svs.color_profile.tobytes() == ref.color_profile.tobytes()
        assert sorted(svs.associated_images) == sorted(ref.associated_images)
        for name in svs.associated_images:
            assert svs.associated_images[name].size == ref.associated_images[name].size
        assert svs.level_dimensions == ours.level_dimensions
        for level in (0, svs.level_count - 1):
            w, h = (min(v, 512) for v in svs.level_dimensions[level])
            a = np.asarray(svs.read_region((0, 0), level, (w, h)))[..., :3]
            b = ours.read_region((0, 0), level, (w, h), as_array=True)[..., :3]
            assert psnr(a, b) > 40, level                   # JPEG q95 of the same pixels


def test_tiffslide_reads_the_svs_as_aperio(exported) -> None:
    tiffslide = pytest.importorskip("tiffslide", reason="tiffslide is in the test extras")
    src, _, out = exported
    with openslide.OpenSlide(src) as ref, tiffslide.TiffSlide(out) as ts:
        props = ts.properties
        assert props["tiffslide.vendor"] == "aperio"
        mpp = ref.properties.get("openslide.mpp-x")
        assert props["tiffslide.mpp-x"] == (float(mpp) if mpp else None)
        power = ref.properties.get("openslide.objective-power")
        assert props["tiffslide.objective-power"] == (float(power) if power else None)
        assert sorted(ts.associated_images) == sorted(ref.associated_images)
        if ref.color_profile is not None:
            assert ts.color_profile.tobytes() == ref.color_profile.tobytes()
        with openslide.OpenSlide(out) as svs:
            assert ts.level_dimensions == svs.level_dimensions


def test_generic_tiff_has_icc_and_resolution(exported, tmp_path: Path) -> None:
    src, box, _ = exported
    out = tmp_path / "c.svs"                                # --format beats the name
    assert main(["decompress", str(box), str(out), "--format", "tiff", "--quiet"]) == 0
    with openslide.OpenSlide(src) as ref, openslide.OpenSlide(out) as tif:
        assert tif.properties["openslide.vendor"] == "generic-tiff"
        assert not tif.associated_images
        for key in ("openslide.icc-size", "openslide.mpp-x"):
            want = ref.properties.get(key)
            got = tif.properties.get(key)
            assert (got is None) == (want is None), key
            if want and key == "openslide.mpp-x":
                assert float(got) == pytest.approx(float(want), rel=1e-6)
            elif want:
                assert got == want


def test_a_container_without_thumbnail_gets_one(tmp_path: Path) -> None:
    y, x = np.mgrid[0:700, 0:900]
    rgb = np.stack([(x * 3) % 256, (y * 2) % 256, (x ^ y) % 256], -1).astype(np.uint8)
    label = rgb[:50, :80].copy()
    box = tmp_path / "a.zarr.zip"
    compress_source(ArraySource(rgb, mpp=(0.25, 0.26), associated={"label": label}), box,
                    get_codec("jpeg", 90), tile_size=128, workers=1)
    out = tmp_path / "a.svs"
    decompress(box, out, workers=1)
    with openslide.OpenSlide(out) as svs:
        assert svs.properties["openslide.vendor"] == "aperio"
        assert sorted(svs.associated_images) == ["label", "thumbnail"]
        assert svs.associated_images["thumbnail"].size == (900, 700)   # level 0 fits 1,024
        got = np.asarray(svs.associated_images["label"].convert("RGB"))
        assert np.array_equal(got, label)                   # the label stays lossless
        assert float(svs.properties["openslide.mpp-x"]) == pytest.approx(0.255)
        assert "openslide.objective-power" not in svs.properties


def test_deidentified_svs(exported, tmp_path: Path) -> None:
    src, box, _ = exported
    out = tmp_path / "d.svs"
    assert main(["decompress", str(box), str(out), "--deidentify", "--quiet"]) == 0
    with openslide.OpenSlide(out) as svs, openslide.OpenSlide(src) as ref:
        assert "label" not in svs.associated_images and "macro" not in svs.associated_images
        assert ("thumbnail" in svs.associated_images) and "thumbnail" in ref.associated_images
        for key in ("aperio.Filename", "aperio.Date", "aperio.User", "aperio.ScanScope ID"):
            assert key not in svs.properties, key
        for key in ("openslide.mpp-x", "openslide.objective-power", "openslide.icc-size"):
            assert svs.properties.get(key) == ref.properties.get(key), key   # not identifying


def test_damaged_tile_leaves_no_svs(exported, tmp_path: Path, capsys) -> None:
    from test_batch import _damage

    _, box, _ = exported
    bad = _damage(box, tmp_path, "levels/0/tiles/c/1/1")
    out = tmp_path / "bad.svs"
    assert main(["decompress", str(bad), str(out)]) == 1
    err = capsys.readouterr().err
    assert "level=0 col=1 row=1" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".bad.svs*"))


def test_unknown_format_is_a_usage_error(exported, tmp_path: Path, capsys) -> None:
    _, box, _ = exported
    assert main(["decompress", str(box), str(tmp_path / "x.ome.tiff"), "--format", "ome"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wsicodec: error: ") and "--format" in err
