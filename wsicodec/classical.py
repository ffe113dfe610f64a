"""Classical tile codecs, from imagecodecs: ``jpeg``, ``jpegxl``, ``webp``, ``jpeg2000``,
``avif``.

Each is a frozen dataclass :class:`~wsicodec.codecs.TileCodec` with the plain behaviour
of the base class (each tile on its own); importing this module registers them
(:mod:`wsicodec.codecs` imports it, so the registry always lists them).  A backend
missing from this installation of imagecodecs makes its codec unavailable, not an
import error; imagecodecs itself is imported only when a codec codes.

Quality knobs (each validated when the codec is built):

========== ======================================== ======== ========================
codec      quality means                            range    default / options
========== ======================================== ======== ========================
jpeg       libjpeg-turbo quality                    1-100    90; subsampling 444|420
jpegxl     butteraugli distance (lower = better)    0.1-25   1.0; effort 1-9 (7)
webp       lossy WebP quality                       0-100    90; method 0-6 (4)
jpeg2000   target PSNR in dB (OpenJPEG fixed qual.) 10-80    40
avif       AVIF quality, 4:4:4                      0-100    80; speed 0-10 (6)
========== ======================================== ======== ========================
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

from wsicodec.codecs import TileCodec, as_number, register_codec
from wsicodec.errors import CorruptDataError, InvalidSettingError, UnsupportedFormatError


def _number(codec: str, knob: str, value: Any, lo: float, hi: float, *,
            integer: bool) -> Any:
    """Return ``value`` (as int when ``integer``) if it lies in [lo, hi], else raise."""
    kind = "an integer" if integer else "a number"
    v = as_number(value)
    if not (lo <= v <= hi and (not integer or v == int(v))):
        raise InvalidSettingError(f"{codec}: {knob} must be {kind} in [{lo:g}, {hi:g}], "
                                  f"got {value!r}")
    return int(v) if integer else v


def _choice(codec: str, knob: str, value: Any, allowed: tuple[str, ...]) -> str:
    if str(value) not in allowed:
        raise InvalidSettingError(f"{codec}: {knob} must be one of {', '.join(allowed)}, "
                                  f"got {value!r}")
    return str(value)


def _check_tile(codec: str, tile: np.ndarray) -> np.ndarray:
    if (not isinstance(tile, np.ndarray) or tile.dtype != np.uint8 or tile.ndim != 3
            or tile.shape[2] != 3 or tile.shape[0] < 1 or tile.shape[1] < 1):
        raise UnsupportedFormatError(
            f"{codec}: tile must be an (h, w, 3) uint8 array with h, w >= 1, got "
            f"{getattr(tile, 'shape', None)} {getattr(tile, 'dtype', type(tile).__name__)}")
    return np.ascontiguousarray(tile)


def _check_decoded(codec: str, data: bytes, decode: Callable[..., np.ndarray],
                   shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """``decode(data, out=...)`` with every error a CorruptDataError.  With ``shape``,
    the pixels go into an array of that shape allocated here, and a stream whose header
    declares another size is refused before anything of its size is allocated."""
    try:
        out = decode(data, out=None if shape is None else np.empty(shape, np.uint8))
    except Exception as e:  # imagecodecs raises its own per-codec error types
        raise CorruptDataError(f"{codec}: cannot decode {len(data)} bytes: {e}") from e
    if out.ndim != 3 or out.shape[2] != 3 or out.dtype != np.uint8:
        raise CorruptDataError(f"{codec}: decoded {out.shape} {out.dtype}, expected (h, w, 3) "
                               "uint8")
    return out


#: first bytes of a JPEG-XL codestream and of a JPEG-XL container
JXL_SIGNATURES = (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")
#: first bytes of a JPEG 2000 codestream (SOC and SIZ markers), as :class:`Jpeg2000Codec` writes
J2K_SIGNATURE = b"\xff\x4f\xff\x51"
#: the first bytes a codestream of each of these codecs starts with, by codec name
CODESTREAM_SIGNATURES = {"jpegxl": JXL_SIGNATURES, "jpeg2000": (J2K_SIGNATURE,)}
#: first bytes of a JPEG (SOI and the next marker's 0xFF): a scanner's JPEG tile kept as
#: it is in a mixed grid (:mod:`wsicodec.scannertiles`)
JPEG_SIGNATURE = b"\xff\xd8\xff"
#: what a bare codestream of a mixed grid may start with (JPEG-XL, JPEG 2000, a JPEG)
BARE_SIGNATURES = JXL_SIGNATURES + (J2K_SIGNATURE, JPEG_SIGNATURE)


def jpeg2000_declared_size(data: bytes) -> tuple[int, int] | None:
    """The (width, height) a JPEG 2000 codestream's SIZ marker declares (its image area:
    Xsiz − XOsiz, Ysiz − YOsiz), or None where ``data`` does not start with
    :data:`J2K_SIGNATURE` and a whole SIZ.  Read from the header only: nothing decoded."""
    if len(data) < 24 or not data.startswith(J2K_SIGNATURE):
        return None
    xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", data, 8)
    return xsiz - xo, ysiz - yo


def _imagecodecs_has(attr: str) -> bool:
    """The one place backend availability is probed."""
    try:
        import imagecodecs
    except ImportError:
        return False
    backend = getattr(imagecodecs, attr, None)
    return bool(getattr(backend, "available", False))


class _ClassicalCodec(TileCodec):
    """Shared plumbing of the imagecodecs codecs (frozen dataclasses below)."""

    name: ClassVar[str]
    backend: ClassVar[str]

    @classmethod
    def is_available(cls) -> bool:
        return _imagecodecs_has(cls.backend)

    @classmethod
    def build(cls, **settings: Any) -> "TileCodec":
        """Factory for the registry. Raises InvalidSettingError on unknown options."""
        fields = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(settings) - set(fields))
        if unknown:
            raise InvalidSettingError(f"{cls.name}: unknown option(s) {', '.join(unknown)}; "
                                      f"options are {', '.join(fields)}")
        return cls(**settings)  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return {"name": self.name, "configuration": dataclasses.asdict(self)}  # type: ignore


@dataclass(frozen=True)
class JpegCodec(_ClassicalCodec):
    """Baseline JPEG through libjpeg-turbo; 4:4:4 unless ``subsampling="420"``."""

    quality: int = 90
    subsampling: str = "444"
    name: ClassVar[str] = "jpeg"
    backend: ClassVar[str] = "JPEG8"

    def __post_init__(self) -> None:
        object.__setattr__(self, "quality", _number("jpeg", "quality", self.quality, 1, 100,
                                                    integer=True))
        object.__setattr__(self, "subsampling", _choice("jpeg", "subsampling", self.subsampling,
                                                        ("444", "420")))

    def encode(self, tile: np.ndarray) -> bytes:
        import imagecodecs

        return bytes(imagecodecs.jpeg8_encode(_check_tile(self.name, tile), level=self.quality,
                                              subsampling=self.subsampling))

    def decode(self, data: bytes, shape: tuple[int, int, int] | None = None) -> np.ndarray:
        import imagecodecs

        return _check_decoded(self.name, data, imagecodecs.jpeg8_decode, shape)


@dataclass(frozen=True)
class JpegXlCodec(_ClassicalCodec):
    """JPEG XL (libjxl). ``quality`` is the butteraugli distance: 1.0 ~ visually lossless."""

    quality: float = 1.0
    effort: int = 7
    name: ClassVar[str] = "jpegxl"
    backend: ClassVar[str] = "JPEGXL"

    def __post_init__(self) -> None:
        object.__setattr__(self, "quality", _number("jpegxl", "quality (distance)", self.quality,
                                                    0.1, 25, integer=False))    # libjxl's own limits
        object.__setattr__(self, "effort", _number("jpegxl", "effort", self.effort, 1, 9,
                                                   integer=True))

    def encode(self, tile: np.ndarray) -> bytes:
        import imagecodecs

        return bytes(imagecodecs.jpegxl_encode(_check_tile(self.name, tile),
                                               distance=self.quality, effort=self.effort,
                                               numthreads=1))

    def decode(self, data: bytes, shape: tuple[int, int, int] | None = None) -> np.ndarray:
        import imagecodecs

        return _check_decoded(self.name, data,
                              lambda b, out: imagecodecs.jpegxl_decode(b, numthreads=1, out=out),
                              shape)


@dataclass(frozen=True)
class WebpCodec(_ClassicalCodec):
    """Lossy WebP (imagecodecs' default would be lossless; we pass ``lossless=False``)."""

    quality: float = 90
    method: int = 4
    name: ClassVar[str] = "webp"
    backend: ClassVar[str] = "WEBP"

    def __post_init__(self) -> None:
        object.__setattr__(self, "quality", _number("webp", "quality", self.quality, 0, 100,
                                                    integer=False))
        object.__setattr__(self, "method", _number("webp", "method", self.method, 0, 6,
                                                   integer=True))

    def encode(self, tile: np.ndarray) -> bytes:
        import imagecodecs

        return bytes(imagecodecs.webp_encode(_check_tile(self.name, tile), level=self.quality,
                                             lossless=False, method=self.method))

    def decode(self, data: bytes, shape: tuple[int, int, int] | None = None) -> np.ndarray:
        import imagecodecs

        return _check_decoded(self.name, data, imagecodecs.webp_decode, shape)


@dataclass(frozen=True)
class Jpeg2000Codec(_ClassicalCodec):
    """JPEG 2000 codestream (OpenJPEG), irreversible wavelet, fixed-quality mode:
    ``quality`` is the target PSNR in dB."""

    quality: float = 40
    name: ClassVar[str] = "jpeg2000"
    backend: ClassVar[str] = "JPEG2K"

    def __post_init__(self) -> None:
        object.__setattr__(self, "quality", _number("jpeg2000", "quality (target PSNR dB)",
                                                    self.quality, 10, 80, integer=False))

    def encode(self, tile: np.ndarray) -> bytes:
        import imagecodecs

        return bytes(imagecodecs.jpeg2k_encode(_check_tile(self.name, tile), level=self.quality,
                                               codecformat="j2k", reversible=False,
                                               numthreads=1))

    def decode(self, data: bytes, shape: tuple[int, int, int] | None = None) -> np.ndarray:
        import imagecodecs

        return _check_decoded(self.name, data, imagecodecs.jpeg2k_decode, shape)


@dataclass(frozen=True)
class AvifCodec(_ClassicalCodec):
    """AVIF (libavif/aom), 4:4:4 8-bit."""

    quality: int = 80
    speed: int = 6
    name: ClassVar[str] = "avif"
    backend: ClassVar[str] = "AVIF"

    def __post_init__(self) -> None:
        object.__setattr__(self, "quality", _number("avif", "quality", self.quality, 0, 100,
                                                    integer=True))
        object.__setattr__(self, "speed", _number("avif", "speed", self.speed, 0, 10,
                                                  integer=True))

    def encode(self, tile: np.ndarray) -> bytes:
        import imagecodecs

        return bytes(imagecodecs.avif_encode(_check_tile(self.name, tile), level=self.quality,
                                             speed=self.speed, pixelformat="444",
                                             numthreads=1))

    def decode(self, data: bytes, shape: tuple[int, int, int] | None = None) -> np.ndarray:
        import imagecodecs

        return _check_decoded(self.name, data,
                              lambda b, out: imagecodecs.avif_decode(b, numthreads=1, out=out),
                              shape)


CLASSICAL_CODECS: tuple[type[_ClassicalCodec], ...] = (
    JpegCodec, JpegXlCodec, WebpCodec, Jpeg2000Codec, AvifCodec)

for _cls in CLASSICAL_CODECS:
    register_codec(_cls.name, _cls.build, available=_cls.is_available,
                   options=tuple(f.name for f in dataclasses.fields(_cls)))
del _cls


__all__ = ["CLASSICAL_CODECS", "AvifCodec", "Jpeg2000Codec", "JpegCodec", "JpegXlCodec",
           "WebpCodec"]
