"""Everything the source says survives into the container: OpenSlide on each shared slide
against ``open_slide`` on its container, property by property, with what differs on
purpose listed (wsicodec.slideprops.DIFFERS); the ICC profile byte for byte, covered by
the metadata digest and bounded; bounds; a quickhash-1 of the container's own pixels."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import ImageCms

from conftest import REAL_SLIDES, forge_digests, need
from wsicodec.cli import main
from wsicodec.codecs import get_codec
from wsicodec.container import open_container
from wsicodec.errors import CorruptDataError
from wsicodec.iccprofile import MAX_ICC_BYTES
from wsicodec.pipeline import compress, compress_source
from wsicodec.slide import open_slide
from wsicodec.slideprops import DIFFERS
from wsicodec.tiling import ArraySource

#: keys of OpenSlide on the source that the container reports otherwise, on purpose
ON_PURPOSE = re.compile(r"^openslide\.(vendor|quickhash-1|level-count|level\[\d+\]\..*|"
                        r"associated\.[^.]+\.icc-size)$")
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _image(w: int = 200, h: int = 150) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 3) % 256, (y * 2) % 256, (x ^ y) % 256], -1).astype(np.uint8)


@pytest.fixture(scope="module", params=sorted(REAL_SLIDES))
def pair(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    src = need(REAL_SLIDES[request.param])
    out = tmp_path_factory.mktemp("fidelity") / f"{request.param}.zarr.zip"
    compress(src, out, get_codec("jpeg", 80), tile_size=512, workers=2)
    return src, out


def test_every_property_survives_or_differs_on_purpose(pair) -> None:
    src, out = pair
    with openslide.OpenSlide(src) as ref, open_slide(out) as ours:
        theirs, mine = dict(ref.properties), dict(ours.properties)
        differs = sorted(k for k in theirs if ON_PURPOSE.match(k))
        for key, value in theirs.items():
            if key not in differs:
                assert mine.get(key) == value, key            # vendor, bounds, mpp, power...
        assert mine["openslide.vendor"] == "wsicodec"
        assert mine["wsicodec.source-vendor"] == theirs["openslide.vendor"]
        assert mine["wsicodec.source-quickhash-1"] == theirs["openslide.quickhash-1"]
        assert re.fullmatch(r"[0-9a-f]{64}", mine["openslide.quickhash-1"])
        assert mine["openslide.quickhash-1"] != theirs["openslide.quickhash-1"]
        assert int(mine["openslide.level-count"]) == ours.level_count
        for i, (w, h) in enumerate(ours.level_dimensions):
            assert (mine[f"openslide.level[{i}].width"], mine[f"openslide.level[{i}].height"]) \
                == (str(w), str(h))
        assert not any(k.endswith(".icc-size") and k.startswith("openslide.associated.")
                       for k in mine)
        extra = sorted(set(mine) - set(theirs))
        assert all(k.startswith(("wsicodec.", "openslide.level[")) for k in extra), extra
        # each difference is documented where users read it
        for key in differs:
            pattern = re.sub(r"^openslide\.level\[\d+\]\..*", "openslide.level[*]", key)
            pattern = re.sub(r"associated\.[^.]+\.icc-size", "associated.*.icc-size", pattern)
            assert pattern in DIFFERS, key
        assert list(ours.associated_images) == list(ref.associated_images)
        for name in ours.associated_images:
            assert ours.associated_images[name].size == ref.associated_images[name].size


def test_color_profile_as_openslide_gives_it(pair) -> None:
    src, out = pair
    with openslide.OpenSlide(src) as ref, open_slide(out) as ours:
        want, got = ref.color_profile, ours.color_profile
        assert (want is None) == (got is None)
        if want is not None:
            assert isinstance(got, ImageCms.ImageCmsProfile)
            assert got.tobytes() == want.tobytes()
            assert ours.properties["openslide.icc-size"] == ref.properties["openslide.icc-size"]
            assert got is not ours.color_profile        # a new object each time, as OpenSlide


def test_the_tcga_profile_is_kept() -> None:
    """The issue's example: tcga's 3,144-byte sRGB profile used to be dropped."""
    src = need(REAL_SLIDES["svs-jpeg2000"])
    with openslide.OpenSlide(src) as ref:
        assert ref.properties["openslide.icc-size"] == "3144"


def test_bounds_survive_and_limit_deepzoom(tmp_path: Path) -> None:
    from openslide.deepzoom import DeepZoomGenerator

    bounds = {"openslide.bounds-x": "20", "openslide.bounds-y": "10",
              "openslide.bounds-width": "150", "openslide.bounds-height": "120"}
    out = tmp_path / "b.zarr.zip"
    compress_source(ArraySource(_image(), properties={**bounds, "acme.Scanner": "X"},
                                mpp=(0.25, 0.25)), out, get_codec("jpeg", 90), tile_size=64,
                    workers=1)
    with open_slide(out) as s:
        assert {k: s.properties[k] for k in bounds} == bounds
        assert s.properties["acme.Scanner"] == "X"
        assert DeepZoomGenerator(s, limit_bounds=True).level_dimensions[-1] == (150, 120)
        assert DeepZoomGenerator(s, limit_bounds=False).level_dimensions[-1] == (200, 150)


def test_quickhash_follows_the_pixels(tmp_path: Path) -> None:
    def made(name: str, quality: int, image: np.ndarray) -> str:
        out = tmp_path / f"{name}.zarr.zip"
        compress_source(ArraySource(image), out, get_codec("jpeg", quality), tile_size=64,
                        workers=1)
        with open_slide(out) as s:
            return s.properties["openslide.quickhash-1"]

    image = _image()
    first = made("a", 90, image)
    assert made("b", 90, image) == first               # written again: the same pixels
    assert made("c", 60, image) != first               # other pixels
    other = image.copy()
    other[-1, -1] ^= 0xFF
    assert made("d", 90, other) != first


def test_icc_profile_kept_checked_and_digested(tmp_path: Path, capsys) -> None:
    out = tmp_path / "icc.zarr"
    compress_source(ArraySource(_image(), icc_profile=SRGB), out, get_codec("jpeg", 90),
                    tile_size=64, workers=1)
    with open_slide(out) as s:
        assert s.color_profile.tobytes() == SRGB
        assert s.properties["openslide.icc-size"] == str(len(SRGB))
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["icc_profile_bytes"] == len(SRGB) and "icc_profile" not in info
    doc_path = out / "zarr.json"
    original = doc_path.read_text()

    def stored(edit) -> None:
        doc = json.loads(original)
        edit(doc["attributes"]["wsicodec"])
        doc_path.write_text(json.dumps(doc))

    def swap(attrs, data: bytes) -> None:
        attrs["icc_profile"] = base64.b64encode(data).decode()

    other = bytearray(SRGB)
    other[-1] ^= 1
    stored(lambda a: swap(a, bytes(other)))             # a profile changed afterwards
    with pytest.raises(CorruptDataError, match="metadata_digest does not match"):
        open_container(out)
    stored(lambda a: a.pop("icc_profile"))              # or removed
    with pytest.raises(CorruptDataError, match="metadata_digest does not match"):
        open_container(out)
    big = (MAX_ICC_BYTES + 1).to_bytes(4, "big") + SRGB[4:] + bytes(MAX_ICC_BYTES + 1 - len(SRGB))
    for data, message in ((big, "ICC profile of"), (b"\0" * 200, "not an ICC profile")):
        stored(lambda a: swap(a, data))
        forge_digests(out)                              # even with digests made to match
        with pytest.raises(CorruptDataError, match=message):
            open_container(out)
    stored(lambda a: a.__setitem__("icc_profile", "not base64!"))
    forge_digests(out)
    with pytest.raises(CorruptDataError, match="icc_profile"):
        open_container(out)


def test_unusable_source_profiles_are_left_out(tmp_path: Path, caplog) -> None:
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    for i, icc in enumerate((lab, b"garbage" * 40)):
        out = tmp_path / f"{i}.zarr.zip"
        compress_source(ArraySource(_image(), icc_profile=icc), out, get_codec("jpeg", 90),
                        tile_size=64, workers=1)
        with open_slide(out) as s:
            assert s.color_profile is None and "openslide.icc-size" not in s.properties
    assert "ICC profile left out" in caplog.text


def test_deidentified_copy_keeps_the_profile(tmp_path: Path) -> None:
    src = need(REAL_SLIDES["svs-jpeg2000"])
    out = tmp_path / "d.zarr.zip"
    compress(src, out, get_codec("jpeg", 80), tile_size=1024, workers=2, deidentify=True)
    with openslide.OpenSlide(src) as ref, open_slide(out) as s:
        assert s.color_profile.tobytes() == ref.color_profile.tobytes()
        assert "wsicodec.source-quickhash-1" not in s.properties   # an identifier: removed


def test_serving_deidentified_drops_the_source_hash(pair) -> None:
    """``serve --deidentify`` filters what the reader reports: the source's quickhash-1,
    now reported as wsicodec.source-quickhash-1, is an identifier too."""
    from wsicodec.deidentify import deidentify_properties

    _, out = pair
    with open_slide(out) as s:
        kept, removed = deidentify_properties(dict(s.properties), s.properties["wsicodec.source-vendor"])
    assert "wsicodec.source-quickhash-1" in removed and "wsicodec.source-quickhash-1" not in kept


def test_a_custom_source_with_a_broken_profile_still_makes_a_readable_container(tmp_path) -> None:
    """The pipeline checks the profile of any SlideSource, not only of ours."""
    source = ArraySource(_image())
    source.icc_profile = b"\0" * 300                       # as a third-party source might
    out = tmp_path / "x.zarr.zip"
    compress_source(source, out, get_codec("jpeg", 90), tile_size=64, workers=1)
    with open_slide(out) as s:
        assert s.color_profile is None
