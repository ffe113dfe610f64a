"""Tiling: geometry, sources for every format, the streamed pyramid."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import BAD_DICOM, HE_TEST_PNG, REAL_SLIDES, need
from wsicodec.errors import (CorruptDataError, InvalidSettingError, RegionOutOfBoundsError,
                             SlideNotFoundError, UnsupportedFormatError)
from wsicodec.tiling import (ArraySource, Rect, TileGrid, downsample2, iter_strips, iter_tiles,
                             open_source, pad_tile, plan_pyramid, stitch_region,
                             validate_tile_size)


# --- geometry

def test_grid_of_odd_size() -> None:
    g = TileGrid(219, 301, 64)
    assert (g.cols, g.rows, g.tile_count) == (4, 5, 20)
    assert g.tile_rect(3, 4) == Rect(192, 256, 27, 45)
    assert list(g)[:5] == [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1)]
    with pytest.raises(RegionOutOfBoundsError):
        g.tile_rect(4, 0)
    assert list(g.tiles_overlapping(Rect(-10, -10, 80, 20))) == [(0, 0), (1, 0)]
    assert list(g.tiles_overlapping(Rect(500, 0, 10, 10))) == []
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.width = 3  # type: ignore[misc]


@pytest.mark.parametrize("bad", [0, 8, 100, 16384, 256.0, True])
def test_tile_size_validation(bad: object) -> None:
    with pytest.raises(InvalidSettingError, match="multiple of 16"):
        validate_tile_size(bad)  # type: ignore[arg-type]


def test_downsample2_and_pad() -> None:
    a = np.array([[[0], [2], [9]], [[4], [6], [9]], [[1], [1], [1]]], np.uint8).repeat(3, 2)
    d = downsample2(a)
    assert d.shape == (2, 2, 3)
    assert d[0, 0, 0] == 3 and d[0, 1, 0] == 9 and d[1, 0, 0] == 1
    p = pad_tile(np.arange(6, dtype=np.uint8).reshape(1, 2, 3), 4)
    assert p.shape == (4, 4, 3) and (p[3, 3] == [3, 4, 5]).all()


# --- pyramid planning

def test_plan_uses_source_levels_when_they_match() -> None:
    plan = plan_pyramid([(4443, 3567), (2221, 1783)], [1.0, 2.0005], 256)
    dims = [lv.info.dimensions for lv in plan.levels]
    assert dims == [(4443, 3567), (2221, 1783), (1111, 892), (556, 446), (278, 223), (139, 112)]
    assert [lv.source_level for lv in plan.levels] == [0, 1, None, None, None, None]
    assert max(dims[-1]) <= 256 < max(dims[-2])


def test_plan_skips_non_power_of_two_levels() -> None:
    plan = plan_pyramid([(4096, 4096), (1365, 1365)], [1.0, 3.0], 256)
    assert [lv.source_level for lv in plan.levels] == [0, None, None, None, None]


def test_plan_single_tile() -> None:
    plan = plan_pyramid([(100, 30)], [1.0], 256)
    assert len(plan.levels) == 1 and plan.tile_count == 1


# --- streamed pyramid against a whole-image reference

class RecordingSource(ArraySource):
    """Records the size of every region request."""

    def __init__(self, image: np.ndarray) -> None:
        super().__init__(image)
        self.requests: list[Rect] = []

    def read_region(self, level: int, rect: Rect) -> np.ndarray:
        self.requests.append(rect)
        return super().read_region(level, rect)


def test_strips_match_whole_image_reference(odd_image: np.ndarray) -> None:
    source = RecordingSource(odd_image)
    plan = plan_pyramid(source.level_dimensions, source.level_downsamples, 64)
    assert [lv.info.dimensions for lv in plan.levels] == [(219, 301), (110, 151), (55, 76),
                                                           (28, 38)]
    rebuilt = {lv.index: [] for lv in plan.levels}
    for strip in iter_strips(source, plan):
        assert strip.row == len(rebuilt[strip.level])
        rebuilt[strip.level].append(strip.pixels)
    reference = odd_image
    for lv in plan.levels:
        whole = np.concatenate(rebuilt[lv.index])
        np.testing.assert_array_equal(whole, reference)
        reference = downsample2(reference)
    # never more than one tile row of the source in one read
    assert max(r.height for r in source.requests) <= 64
    assert len(source.requests) == plan.levels[0].grid.rows


def test_tiles_are_padded_by_edge_replication(odd_image: np.ndarray) -> None:
    source = ArraySource(odd_image)
    plan = plan_pyramid(source.level_dimensions, source.level_downsamples, 64)
    strip = next(iter_strips(source, plan))
    tiles = dict(iter_tiles(strip, 64))
    assert len(tiles) == 4 and all(t.shape == (64, 64, 3) for t in tiles.values())
    last = tiles[3]
    np.testing.assert_array_equal(last[:, :27], odd_image[:64, 192:219])
    np.testing.assert_array_equal(last[:, 63], odd_image[:64, 218])


def test_stitch_region_crops_and_leaves_outside_transparent(odd_image: np.ndarray) -> None:
    grid = TileGrid(219, 301, 64)
    tiles = {(c, r): pad_tile(odd_image[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64], 64)
             for c, r in grid}
    out = stitch_region(grid, Rect(-5, 290, 30, 20), tiles)
    assert out.shape == (20, 30, 4)
    np.testing.assert_array_equal(out[:11, 5:, :3], odd_image[290:, :25])
    assert (out[:11, 5:, 3] == 255).all() and (out[:, :5] == 0).all() and (out[11:] == 0).all()


# --- sources

@pytest.mark.parametrize("name", sorted(REAL_SLIDES))
def test_openslide_sources_read_levels(name: str) -> None:
    import openslide

    path = need(REAL_SLIDES[name])
    with open_source(path) as src, openslide.OpenSlide(str(path)) as ref:
        assert src.level_dimensions == ref.level_dimensions
        assert src.vendor == ref.properties["openslide.vendor"]
        w, h = src.level_dimensions[-1]
        region = src.read_region(len(src.level_dimensions) - 1, Rect(0, 0, w, h))
        assert region.shape == (h, w, 3) and region.dtype == np.uint8
        for assoc in src.associated_image_names():
            assert src.read_associated_image(assoc).shape[2] == 3
        with pytest.raises(RegionOutOfBoundsError):
            src.read_region(0, Rect(src.level_dimensions[0][0], 0, 4, 4))


def test_svs_metadata() -> None:
    with open_source(need(REAL_SLIDES["svs-jpeg"])) as src:
        assert src.mpp == (0.499, 0.499) and src.objective_power == 20
        assert set(src.associated_image_names()) == {"label", "macro", "thumbnail"}


def test_png_through_pillow() -> None:
    with open_source(need(HE_TEST_PNG)) as src:
        assert src.level_dimensions == ((1000, 1000),)
        assert src.read_region(0, Rect(990, 995, 10, 5)).shape == (5, 10, 3)


def test_stripped_tiff_through_tifffile(tmp_path, odd_image: np.ndarray) -> None:
    import tifffile

    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, odd_image, resolution=(1e4 / 0.5, 1e4 / 0.5),
                     resolutionunit="CENTIMETER")
    with open_source(path) as src:
        assert src.vendor == "tifffile" and src.level_dimensions == ((219, 301),)
        assert src.mpp == pytest.approx((0.5, 0.5))
        np.testing.assert_array_equal(src.read_region(0, Rect(200, 290, 19, 11)),
                                      odd_image[290:301, 200:219])


def test_gray_and_rgba_images_become_rgb(tmp_path) -> None:
    from PIL import Image

    Image.fromarray(np.full((5, 6), 7, np.uint8)).save(tmp_path / "g.png")
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    with open_source(tmp_path / "g.png") as src:
        assert (src.read_region(0, Rect(0, 0, 6, 5)) == 7).all()
    with open_source(tmp_path / "a.png") as src:  # transparent -> white
        assert (src.read_region(0, Rect(0, 0, 4, 4)) == 255).all()


def test_source_errors(tmp_path) -> None:
    with pytest.raises(SlideNotFoundError):
        open_source(tmp_path / "missing.svs")
    text = tmp_path / "notes.txt"
    text.write_text("not a slide\n")
    with pytest.raises(UnsupportedFormatError, match="not a slide or image"):
        open_source(text)
    with pytest.raises(UnsupportedFormatError, match="directory"):
        open_source(tmp_path)
    with pytest.raises(CorruptDataError, match="OpenSlide cannot read"):
        open_source(need(BAD_DICOM))


def test_downsample2_chunking_is_exact(odd_image: np.ndarray) -> None:
    np.testing.assert_array_equal(downsample2(odd_image, chunk=6), downsample2(odd_image))


def test_openslide_wide_reads_are_split(monkeypatch: pytest.MonkeyPatch) -> None:
    from wsicodec.tiling.sources import OpenSlideSource

    with open_source(need(REAL_SLIDES["svs-jpeg"])) as src:
        whole = src.read_region(0, Rect(3, 5, 700, 40))
        monkeypatch.setattr(OpenSlideSource, "READ_CHUNK", 64)
        np.testing.assert_array_equal(src.read_region(0, Rect(3, 5, 700, 40)), whole)
