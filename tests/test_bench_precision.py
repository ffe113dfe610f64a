"""bench/precision_tiles.py: the per-tile float32 / bfloat16 summaries and the auto floor."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # bench/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))

from bench import precision_tiles  # noqa: E402


def test_summaries_count_moved_tiles_and_the_floor() -> None:
    per_tile = {
        "0/0/0": {"float32": 40.0, "bfloat16": 39.85, "recorded": 40.0, "kind": "learned"},
        "0/1/0": {"float32": 32.03, "bfloat16": 31.99, "recorded": 32.03, "kind": "learned"},
        "0/2/0": {"float32": 33.0, "bfloat16": 33.01, "recorded": 33.0, "kind": "learned"},
        "0/3/0": {"float32": 32.1, "bfloat16": 32.1, "recorded": 32.1, "kind": "jpegxl"},
        "1/0/0": {"float32": None, "bfloat16": None, "recorded": None, "kind": "glass"},   # exact
    }
    s = precision_tiles.summarise(per_tile, 32.0)
    assert (s["tiles"], s["tiles_finite"], s["tiles_changed"]) == (5, 4, 3)
    assert s["tiles_moved_over_0.02_db"] == 2 and s["tiles_lowered_over_0.02_db"] == 2
    assert (s["tiles_lowered"], s["tiles_raised"]) == (2, 1)
    assert s["max_abs_delta_db"] == pytest.approx(0.15) and s["max_delta_db"] == pytest.approx(0.01)
    a = s["auto"]
    assert a["tiles_under_floor"] == {"float32": 0, "bfloat16": 1} and a["under_floor"]["bfloat16"] == ["0/1/0"]
    assert a["tiles_under_recorded_minus_slack"] == {"float32": 0, "bfloat16": 2}
    assert a["float32_vs_recorded_max_abs_db"] == 0.0
    learned = a["by_kind"]["learned"]
    assert learned["tiles"] == 3 and learned["moved_over_0.02_db"] == 2
    assert learned["min_margin_over_floor_db"]["bfloat16"] == pytest.approx(-0.01)
    assert a["by_kind"]["jpegxl"]["max_abs_delta_db"] == 0.0 and "glass" not in a["by_kind"]


def test_summaries_without_a_floor_have_no_auto_part() -> None:
    s = precision_tiles.summarise({"0/0/0": {"float32": 30.0, "bfloat16": 30.0}}, None)
    assert "auto" not in s and s["tiles_changed"] == 0 and s["max_abs_delta_db"] == 0.0


def test_source_tiles_are_what_compress_codes(tmp_path) -> None:
    """The source tiles cover every level's grid, unpadded, level 0 equal to the image."""
    import tifffile

    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)
    path = tmp_path / "img.tiff"
    tifffile.imwrite(path, img)
    tiles = precision_tiles.source_tiles(str(path), 128)
    assert tiles[(0, 1, 2)].shape == (300 - 256, 72, 3)
    np.testing.assert_array_equal(tiles[(0, 1, 1)], img[128:256, 128:])
    assert {k[0] for k in tiles} == {0, 1, 2} and tiles[(2, 0, 0)].shape == (75, 50, 3)
