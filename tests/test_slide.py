"""The OpenSlide-compatible reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REAL_SLIDES, need
from wsicodec.codecs import get_codec
from wsicodec.errors import ClosedError, InvalidSettingError
from wsicodec.pipeline import compress, compress_source
from wsicodec.readback import decompress
from wsicodec.slide import open_slide
from wsicodec.tiff import TiffSettings
from wsicodec.tiling import ArraySource


@pytest.fixture(scope="module")
def odd_slide(tmp_path_factory: pytest.TempPathFactory):
    """A 219x301 image, tile size 64, coded with JPEG; yields (slide, decoded level arrays)."""
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (301, 219, 3), dtype=np.uint8)
    out = tmp_path_factory.mktemp("slide") / "odd.zarr.zip"
    compress_source(ArraySource(image, mpp=(0.5, 0.5), associated={"label": image[:9, :9]}),
                    out, get_codec("jpeg", 90), tile_size=64, workers=1)
    slide = open_slide(out)
    # reference: decode every tile and paste, crop to the level size
    levels = []
    for level, (w, h) in enumerate(slide.level_dimensions):
        grid = slide.container.grid(level)
        full = np.zeros((grid.rows * 64, grid.cols * 64, 3), np.uint8)
        for col, row in grid:
            full[row * 64:(row + 1) * 64, col * 64:(col + 1) * 64] = \
                slide.container.read_tile(level, col, row)
        levels.append(full[:h, :w])
    yield slide, levels
    slide.close()


def test_openslide_attributes(odd_slide) -> None:
    slide, _ = odd_slide
    assert slide.dimensions == (219, 301)
    assert slide.level_count == 4
    assert slide.level_dimensions[:2] == ((219, 301), (110, 151))
    assert slide.level_downsamples[0] == 1.0
    assert slide.properties["openslide.vendor"] == "wsicodec"
    assert float(slide.properties["openslide.mpp-x"]) == 0.5
    assert slide.properties["openslide.level[1].tile-width"] == "64"
    assert slide.get_best_level_for_downsample(1.5) == 0
    assert slide.get_best_level_for_downsample(3) == 1
    assert slide.get_best_level_for_downsample(1000) == 3
    assert list(slide.associated_images) == ["label"]
    assert slide.associated_images["label"].mode == "RGBA"
    assert slide.associated_images["label"].size == (9, 9)
    thumb = slide.get_thumbnail((50, 50))
    assert thumb.mode == "RGB" and max(thumb.size) == 50


def test_read_region_pil_matches_array(odd_slide) -> None:
    slide, _ = odd_slide
    img = slide.read_region((200, 290), 0, (40, 30))
    assert img.mode == "RGBA" and img.size == (40, 30)
    arr = slide.read_region((200, 290), 0, (40, 30), as_array=True, rgba=True)
    np.testing.assert_array_equal(np.asarray(img), arr)
    rgb = slide.read_region((200, 290), 0, (40, 30), as_array=True)   # RGB, as tiffslide
    assert rgb.shape == (30, 40, 3) and rgb.flags.c_contiguous
    np.testing.assert_array_equal(rgb, arr[..., :3])
    assert (arr[:11, :19, 3] == 255).all() and (arr[11:] == 0).all() and (arr[:, 19:] == 0).all()


def test_bad_level_reads_transparent_as_in_openslide(odd_slide) -> None:
    slide, _ = odd_slide
    for level in (9, -1, slide.level_count):
        region = slide.read_region((3, 4), level, (5, 2), as_array=True, rgba=True)
        assert region.shape == (2, 5, 4) and not region.any(), level


def test_a_region_too_big_for_memory_is_a_clear_error(odd_slide) -> None:
    slide, _ = odd_slide
    with pytest.raises(InvalidSettingError, match=r"1000000 x 1000000 px region .* does not fit in memory"):
        slide.read_region((0, 0), 0, (10**6, 10**6))      # 4 TB of RGBA, mostly outside the slide
    with pytest.raises(InvalidSettingError, match="non-negative"):
        slide.read_region((0, 0), 0, (-1, 5))


def test_bad_thumbnail_size(odd_slide) -> None:
    slide, _ = odd_slide
    for size in ((0, 0), (50, 0), (-1, 50)):
        with pytest.raises(InvalidSettingError, match="thumbnail size"):
            slide.get_thumbnail(size)


def test_reading_a_closed_slide_raises(tmp_path: Path) -> None:
    image = np.random.default_rng(2).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    out = tmp_path / "c.zarr"
    compress_source(ArraySource(image, associated={"label": image[:9, :9]}), out,
                    get_codec("jpeg", 90), tile_size=64, workers=1)
    slide = open_slide(out)
    slide.read_region((0, 0), 0, (10, 10))   # decoded and cached
    slide.close()
    slide.close()   # twice is fine
    for read in (lambda: slide.read_region((0, 0), 0, (10, 10)),   # cached before close
                 lambda: slide.read_region((64, 0), 0, (10, 10)),
                 lambda: slide.read_encoded_tile(0, 1, 0),
                 lambda: slide.associated_images["label"],
                 lambda: slide.get_thumbnail((20, 20))):
        with pytest.raises(ClosedError, match="c.zarr: read after close"):
            read()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(level=st.integers(0, 3), x=st.integers(-80, 320), y=st.integers(-80, 400),
       w=st.integers(0, 150), h=st.integers(0, 150))
def test_read_region_equals_decode_and_slice(odd_slide, level: int, x: int, y: int, w: int,
                                             h: int) -> None:
    slide, levels = odd_slide
    ds = slide.level_downsamples[level]
    got = slide.read_region((x, y), level, (w, h), as_array=True, rgba=True)
    assert got.shape == (h, w, 4)
    ref = levels[level]
    lx, ly = int(np.floor(x / ds)), int(np.floor(y / ds))
    expected = np.zeros((h, w, 4), np.uint8)
    ys, xs = np.arange(ly, ly + h), np.arange(lx, lx + w)
    iy, ix = (ys >= 0) & (ys < ref.shape[0]), (xs >= 0) & (xs < ref.shape[1])
    expected[np.ix_(iy, ix)] = np.concatenate(
        [ref[np.ix_(ys[iy], xs[ix])], np.full((iy.sum(), ix.sum(), 1), 255, np.uint8)], axis=-1)
    np.testing.assert_array_equal(got, expected)


def test_read_encoded_tile(odd_slide) -> None:
    slide, levels = odd_slide
    data = slide.read_encoded_tile(0, 1, 1)
    np.testing.assert_array_equal(get_codec("jpeg").decode(data)[:64, :64], levels[0][64:128, 64:128])


def test_read_region_matches_openslide_on_exported_tiff(tmp_path: Path) -> None:
    """Lossless TIFF export: OpenSlide reading the TIFF must agree with our reader exactly.

    Reduced levels are compared where level-0 coordinates map to whole level pixels:
    elsewhere OpenSlide interpolates sub-pixel offsets when the downsample is not an
    integer (4.016 here), while we take the floor, as tiffslide does.
    """
    import openslide

    src = need(REAL_SLIDES["generic-tiff"])
    container = tmp_path / "s.zarr"
    compress(src, container, get_codec("jpeg", 90), tile_size=64, workers=1)
    tiff = tmp_path / "s.tiff"
    decompress(container, tiff, settings=TiffSettings("zlib"), workers=1)
    with open_slide(container) as ours, openslide.OpenSlide(str(tiff)) as ref:
        assert ref.level_dimensions == ours.level_dimensions
        for location, level, size in [((0, 0), 0, (300, 250)), ((-20, 230), 0, (70, 40)),
                                      ((250, 5), 0, (80, 80)), ((0, 0), 1, (150, 125)),
                                      ((0, 0), 2, (30, 30)), ((64, 32), 1, (50, 40))]:
            a = ours.read_region(location, level, size, as_array=True, rgba=True)
            b = np.asarray(ref.read_region(location, level, size))
            np.testing.assert_array_equal(a, b, err_msg=f"{location} {level} {size}")
