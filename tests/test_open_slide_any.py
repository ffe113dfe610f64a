"""``wsicodec.open_slide`` on every kind of file: a container (WsiSlide) or any slide
OpenSlide opens (OpenSlideFile, an ``openslide.OpenSlide``), one interface; errors that
are OpenSlideErrors where OpenSlide raises one; an out-of-range level as OpenSlide
reads it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest

from conftest import BAD_DICOM, REAL_SLIDES, need
from wsicodec.codecs import get_codec
from wsicodec.errors import (ClosedError, CorruptDataError, CorruptTileError, InvalidSettingError,
                             SlideNotFoundError, UnsupportedFormatError)
from wsicodec.pipeline import compress_source
from wsicodec.slide import WsiSlide, open_slide
from wsicodec.tiling import ArraySource

SURFACE = ("dimensions", "level_count", "level_dimensions", "level_downsamples", "properties",
           "associated_images", "color_profile")


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Path:
    y, x = np.mgrid[0:150, 0:200]
    rgb = np.stack([(x * 3) % 256, (y * 2) % 256, (x ^ y) % 256], -1).astype(np.uint8)
    out = tmp_path_factory.mktemp("any") / "c.zarr.zip"
    compress_source(ArraySource(rgb, mpp=(0.5, 0.5)), out, get_codec("jpeg", 90),
                    tile_size=64, workers=1)
    return out


@pytest.mark.parametrize("name", sorted(REAL_SLIDES))
def test_slide_files_open_through_openslide(name: str) -> None:
    path = need(REAL_SLIDES[name])
    with open_slide(path) as ours, openslide.OpenSlide(path) as ref:
        assert isinstance(ours, openslide.OpenSlide) and not isinstance(ours, WsiSlide)
        for attr in SURFACE[:4]:
            assert getattr(ours, attr) == getattr(ref, attr), attr
        assert dict(ours.properties) == dict(ref.properties)
        assert list(ours.associated_images) == list(ref.associated_images)
        assert (ours.color_profile is None) == (ref.color_profile is None)
        level = ours.level_count - 1
        w, h = (min(v, 300) for v in ours.level_dimensions[level])
        loc = (int(ours.dimensions[0] // 3), int(ours.dimensions[1] // 3))
        want = np.asarray(ref.read_region(loc, level, (w, h)))
        got = ours.read_region(loc, level, (w, h))
        assert got.mode == "RGBA" and np.array_equal(np.asarray(got), want)
        arr = ours.read_region(loc, level, (w, h), as_array=True)
        assert arr.dtype == np.uint8 and np.array_equal(arr, want[..., :3])   # RGB, as tiffslide
        assert np.array_equal(ours.read_region(loc, level, (w, h), as_array=True, rgba=True), want)
        assert ours.get_best_level_for_downsample(4) == ref.get_best_level_for_downsample(4)
        assert ours.get_thumbnail((64, 64)).size == ref.get_thumbnail((64, 64)).size
        assert type(ours).detect_format(path) == ref.properties["openslide.vendor"]


def test_deepzoom_over_a_slide_file() -> None:
    from openslide.deepzoom import DeepZoomGenerator

    path = need(REAL_SLIDES["generic-tiff"])
    with open_slide(path) as ours, openslide.OpenSlide(path) as ref:
        a, b = DeepZoomGenerator(ours), DeepZoomGenerator(ref)
        assert a.get_dzi("jpeg") == b.get_dzi("jpeg")
        top = a.level_count - 1
        assert np.array_equal(np.asarray(a.get_tile(top, (0, 0))), np.asarray(b.get_tile(top, (0, 0))))


def test_same_surface_for_a_container(container: Path) -> None:
    path = need(REAL_SLIDES["generic-tiff"])
    with open_slide(container) as box, open_slide(path) as file:
        for attr in SURFACE:
            getattr(box, attr), getattr(file, attr)
        for s in (box, file):
            assert s.read_region((0, 0), 0, (20, 10), as_array=True).shape == (10, 20, 3)
            assert s.read_region((0, 0), 0, (20, 10), as_array=True, rgba=True).shape == (10, 20, 4)
            assert s.get_thumbnail((32, 32)).mode == "RGB"


@pytest.mark.parametrize("level", [-1, 99])
def test_out_of_range_level_reads_transparent_like_openslide(container: Path, level: int) -> None:
    path = need(REAL_SLIDES["generic-tiff"])
    with openslide.OpenSlide(path) as ref:
        want = np.asarray(ref.read_region((5, 5), level, (7, 3)))
    assert want.shape == (3, 7, 4) and not want.any()        # OpenSlide's own behaviour
    for p in (container, path):
        with open_slide(p) as s:
            got = s.read_region((5, 5), level, (7, 3))
            assert np.array_equal(np.asarray(got), want), p


@pytest.mark.parametrize("kind", ["container", "file"])
def test_negative_size_is_an_openslide_error_as_in_openslide(container: Path, kind: str) -> None:
    path = container if kind == "container" else need(REAL_SLIDES["generic-tiff"])
    with openslide.OpenSlide(need(REAL_SLIDES["generic-tiff"])) as ref:
        with pytest.raises(openslide.OpenSlideError):
            ref.read_region((0, 0), 0, (-1, 5))
    with open_slide(path) as s:
        with pytest.raises(openslide.OpenSlideError) as info:
            s.read_region((0, 0), 0, (-1, 5))
        assert isinstance(info.value, InvalidSettingError) and "non-negative" in str(info.value)


def test_open_errors_are_openslide_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.svs"
    with pytest.raises(openslide.OpenSlideUnsupportedFormatError):
        openslide.OpenSlide(missing)
    for path in (missing, tmp_path / "nothing.zarr.zip"):
        with pytest.raises(openslide.OpenSlideUnsupportedFormatError) as info:
            open_slide(path)
        assert isinstance(info.value, SlideNotFoundError) and isinstance(info.value, FileNotFoundError)
    text = tmp_path / "notes.txt"
    text.write_text("not a slide")
    with pytest.raises(openslide.OpenSlideUnsupportedFormatError) as info:
        open_slide(text)
    assert isinstance(info.value, UnsupportedFormatError) and "notes.txt" in str(info.value)
    with pytest.raises(openslide.OpenSlideError) as info:       # OpenSlide refuses it too
        open_slide(need(BAD_DICOM))
    assert isinstance(info.value, CorruptDataError) and "nonconforming" in str(info.value)
    torn = tmp_path / "torn.zarr.zip"
    torn.write_bytes(b"PK\x03\x04" + b"\0" * 40)
    with pytest.raises(openslide.OpenSlideError) as info:
        open_slide(torn)
    assert isinstance(info.value, CorruptDataError)


def test_damaged_tile_is_both_errors(container: Path, tmp_path: Path) -> None:
    from test_batch import _damage

    bad = _damage(container, tmp_path, "levels/0/tiles/c/1/1")
    with open_slide(bad) as s:
        with pytest.raises(openslide.OpenSlideError) as info:
            s.read_region((64, 64), 0, (10, 10))
        e = info.value
        assert isinstance(e, CorruptTileError) and (e.level, e.col, e.row) == (0, 1, 1)
        assert "level=0 col=1 row=1" in str(e)
        with pytest.raises(CorruptTileError):
            s.read_encoded_tile(0, 1, 1)
        s.read_region((0, 0), 0, (10, 10))                      # the others still read


def test_closed_is_not_an_openslide_error(container: Path) -> None:
    s = open_slide(container)
    s.close()
    with pytest.raises(ClosedError) as info:
        s.read_region((0, 0), 0, (4, 4))
    assert not isinstance(info.value, openslide.OpenSlideError)   # OpenSlide: ctypes' error
