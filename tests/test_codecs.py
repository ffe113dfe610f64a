"""Codec registry and the classical codecs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, psnr
from wsicodec import codecs
from wsicodec.codecs import (available_codecs, codec_from_dict, get_codec, known_codecs,
                             register_codec)
from wsicodec.errors import (CodecUnavailableError, CorruptDataError, InvalidSettingError,
                             UnsupportedFormatError)

CLASSICAL = ["jpeg", "jpegxl", "webp", "jpeg2000", "avif"]
USABLE = [n for n in CLASSICAL if n in available_codecs()]


@pytest.fixture
def tile() -> np.ndarray:
    y, x = np.mgrid[0:37, 0:53]
    return np.stack([x * 4, y * 6, (x + y) * 2], -1).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", USABLE)
def test_round_trip_keeps_shape_and_is_close(name: str, tile: np.ndarray) -> None:
    codec = get_codec(name)
    data = codec.encode(tile)
    assert isinstance(data, bytes) and data
    out = codec.decode(data)
    assert out.shape == tile.shape and out.dtype == np.uint8
    assert psnr(out, tile) > 30


@pytest.mark.parametrize("name", USABLE)
@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 7, 3), (5, 1, 3)])
def test_tiny_tiles(name: str, shape: tuple[int, int, int]) -> None:
    codec = get_codec(name)
    assert codec.decode(codec.encode(np.full(shape, 128, np.uint8))).shape == shape


@pytest.mark.parametrize("name", USABLE)
def test_to_dict_round_trips(name: str) -> None:
    codec = get_codec(name)
    d = codec.to_dict()
    assert d["name"] == name and isinstance(d["configuration"], dict)
    assert codec_from_dict(d) == codec
    assert get_codec(name, **d["configuration"]).to_dict() == d


@pytest.mark.parametrize("name, bad", [("jpeg", 0), ("jpeg", 101), ("jpeg", 50.5),
                                       ("jpegxl", 0.0), ("jpegxl", 26), ("webp", -1),
                                       ("jpeg2000", 5), ("avif", 101)])
def test_quality_out_of_range_names_the_range(name: str, bad: float) -> None:
    with pytest.raises(InvalidSettingError, match=r"\[.*, .*\]"):
        get_codec(name, bad)


def test_options_are_validated() -> None:
    with pytest.raises(InvalidSettingError, match="effort must be an integer in \\[1, 9\\]"):
        get_codec("jpegxl", effort=12)
    with pytest.raises(InvalidSettingError, match="subsampling must be one of 444, 420"):
        get_codec("jpeg", subsampling="411")
    with pytest.raises(InvalidSettingError, match="unknown option"):
        get_codec("jpeg", nonsense=1)


def test_unknown_codec_lists_known_names() -> None:
    with pytest.raises(InvalidSettingError) as info:
        get_codec("nope")
    for name in CLASSICAL + ["learned"]:
        assert name in str(info.value)


def test_jpeg_subsampling_420_is_smaller(tile: np.ndarray) -> None:
    big = np.tile(tile, (4, 4, 1))
    assert len(get_codec("jpeg", 90, subsampling="420").encode(big)) < len(
        get_codec("jpeg", 90).encode(big))


@pytest.mark.skipif("webp" not in USABLE, reason="webp not available")
def test_webp_is_lossy(tile: np.ndarray) -> None:
    import imagecodecs

    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert len(get_codec("webp", 50).encode(noisy)) < len(imagecodecs.webp_encode(noisy))


def test_quality_orders_size(tile: np.ndarray) -> None:
    big = np.tile(tile, (4, 4, 1))
    assert len(get_codec("jpeg", 30).encode(big)) < len(get_codec("jpeg", 95).encode(big))
    if "jpegxl" in USABLE:  # distance: larger is coarser
        assert len(get_codec("jpegxl", 4.0).encode(big)) < len(get_codec("jpegxl", 0.5).encode(big))


def test_bad_tiles_and_bytes_raise_library_errors() -> None:
    codec = get_codec("jpeg")
    with pytest.raises(UnsupportedFormatError):
        codec.encode(np.zeros((8, 8), np.uint8))
    with pytest.raises(UnsupportedFormatError):
        codec.encode(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(CorruptDataError):
        codec.decode(b"not a jpeg")


def test_register_custom_codec_and_unavailable(tile: np.ndarray) -> None:
    class Raw(codecs.TileCodec):
        name = "raw-test"

        def __init__(self, quality: float | None = None) -> None:
            self.quality = quality

        def encode(self, t: np.ndarray) -> bytes:
            return t.shape[0].to_bytes(4, "little") + t.shape[1].to_bytes(4, "little") + t.tobytes()

        def decode(self, d: bytes) -> np.ndarray:
            h, w = int.from_bytes(d[:4], "little"), int.from_bytes(d[4:8], "little")
            return np.frombuffer(d[8:], np.uint8).reshape(h, w, 3)

        def to_dict(self) -> dict:
            return {"name": self.name, "configuration": {"quality": self.quality}}

    register_codec("raw-test", Raw)
    register_codec("gone-test", Raw, available=lambda: False)
    try:
        codec = codec_from_dict(get_codec("raw-test", 3).to_dict())
        assert isinstance(codec, codecs.TileCodec)
        np.testing.assert_array_equal(codec.decode(codec.encode(tile)), tile)
        assert "raw-test" in available_codecs() and "gone-test" not in available_codecs()
        assert "gone-test" in known_codecs()
        with pytest.raises(CodecUnavailableError):
            get_codec("gone-test")
    finally:
        codecs._REGISTRY.pop("raw-test", None)
        codecs._REGISTRY.pop("gone-test", None)


def test_lazy_codec_module_that_fails_to_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(codecs._LAZY, "lazy-test",
                        codecs._LazyEntry("wsicodec._no_such_module", requires=()))
    with pytest.raises(CodecUnavailableError, match="lazy-test"):
        get_codec("lazy-test")
    assert "lazy-test" not in available_codecs()


def test_codec_from_dict_rejects_garbage() -> None:
    with pytest.raises(CorruptDataError):
        codec_from_dict({"configuration": {}})
    with pytest.raises(CorruptDataError):
        codec_from_dict("jpeg")  # type: ignore[arg-type]


def test_classical_use_never_imports_torch() -> None:
    code = ("import sys, numpy as np, wsicodec, wsicodec.cli, wsicodec.slide, wsicodec.pipeline\n"
            "import wsicodec.readback\n"
            "from wsicodec.codecs import get_codec, available_codecs\n"
            "c = get_codec('jpeg'); c.decode(c.encode(np.zeros((8, 8, 3), np.uint8)))\n"
            "available_codecs()\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert 'openslide' not in sys.modules or True\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_import_wsicodec_does_no_work() -> None:
    code = ("import sys, wsicodec\n"
            "heavy = {'torch', 'openslide', 'zarr', 'imagecodecs', 'tifffile'} & set(sys.modules)\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
