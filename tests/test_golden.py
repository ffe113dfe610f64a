"""Golden bytes and pixels: what the learned codec writes and reads, pinned.

`tests/expected/learned_golden.json` records, for three crops of he/test images (odd
sizes, so edge tiles are exercised), the sha256 of the bytes :func:`wsicodec.encode`
writes at qualities 1, 4 and 8 and of the pixels :func:`wsicodec.decode` gives back, and
the same for a container written by ``compress`` (every tile's bytes, and a region read
through ``open_slide``).  A refactoring must keep them all; a change that means to alter
them (new weights, a new tile format) regenerates the file on purpose:

    WSICODEC_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py

The values hold for the shipped weights (their id is recorded; other weights skip) on
the CPU that recorded them: float32 convolutions may round differently on another
instruction set, which the entropy coding's checksums would catch but these hashes
cannot tell apart from a change of code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, need

EXPECTED = Path(__file__).resolve().parent / "expected" / "learned_golden.json"
CROPS = {  # image -> (top, left, height, width)
    "TCGA-2Z-A9J9-01A-01-TS1.png": (100, 200, 200, 300),
    "TCGA-44-2665-01B-06-BS6.png": (500, 37, 161, 290),
    "TCGA-69-7764-01A-01-TS1.png": (0, 600, 272, 144),
}
QUALITIES = (1, 4, 8)


def _sha(data: bytes | np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(data).tobytes() if isinstance(data, np.ndarray)
                          else data).hexdigest()


def _crop(name: str) -> np.ndarray:
    from PIL import Image

    top, left, h, w = CROPS[name]
    rgb = np.asarray(Image.open(need(DATA / "he" / "test" / name)).convert("RGB"))
    return np.ascontiguousarray(rgb[top:top + h, left:left + w])


def _measure(tmp_path: Path) -> dict:
    import wsicodec
    from wsicodec.checkpoint import load_model
    from wsicodec.codecs import get_codec
    from wsicodec.container import open_container
    from wsicodec.pipeline import compress_source
    from wsicodec.tiling import ArraySource

    out: dict = {"model_id": load_model().model_id, "streams": {}, "container": {}}
    for name in CROPS:
        rgb = _crop(name)
        for q in QUALITIES:
            data = wsicodec.encode(rgb, q, tile_size=128)
            out["streams"][f"{name} q{q}"] = {"bytes": _sha(data),
                                              "pixels": _sha(wsicodec.decode(data))}
    rgb = _crop(next(iter(CROPS)))
    box = tmp_path / "golden.zarr"
    compress_source(ArraySource(rgb), box, get_codec("learned", 4), tile_size=64, workers=1)
    with open_container(box) as c:
        out["container"]["tiles"] = [_sha(b) for lv in range(c.level_count)
                                     for _, _, b in c.iter_encoded_tiles(lv)]
    with wsicodec.open_slide(box) as s:
        out["container"]["region"] = _sha(np.asarray(s.read_region((0, 0), 0, s.dimensions)))
    return out


def test_learned_bytes_and_pixels_are_unchanged(tmp_path: Path) -> None:
    got = _measure(tmp_path)
    if os.environ.get("WSICODEC_REGEN_GOLDEN"):
        EXPECTED.parent.mkdir(exist_ok=True)
        EXPECTED.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"regenerated {EXPECTED}")
    want = json.loads(EXPECTED.read_text())
    if got["model_id"] != want["model_id"]:
        pytest.skip(f"golden values are for weights {want['model_id'][:12]}…, shipped are "
                    f"{got['model_id'][:12]}…: regenerate on purpose (module docstring)")
    for key, value in want["streams"].items():
        assert got["streams"][key]["bytes"] == value["bytes"], f"{key}: other bytes"
        assert got["streams"][key]["pixels"] == value["pixels"], f"{key}: other pixels"
    assert got["container"] == want["container"]
