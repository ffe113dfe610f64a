"""DICOM WSI output: ``decompress --format dicom OUT_DIR`` writes a container as a DICOM
whole-slide-microscopy series (one file per pyramid level and per associated image)
that OpenSlide's DICOM driver and wsidicom open.

wsidicom writes the files (:mod:`wsicodec.dicom.source` presents a container to it as a
``wsidicom.source.Source``; :mod:`wsicodec.dicom.write` runs it and publishes the folder
atomically).  It is an optional dependency: ``pip install 'wsicodec[dicom]'``.  This
module holds only the settings, so that the command line can check them without it.

How each frame is coded (:class:`DicomSettings`, ``--transfer-syntax``):

``jpeg`` (the default)
    every tile is decoded from the container and coded again by wsidicom's encoder:
    JPEG baseline 8-bit with full-resolution chroma (YCbCr 4:4:4: 4:2:2 costs H&E about
    6 dB at the same quality) at a quality of 1-100 (default 95, as the TIFF and SVS
    outputs).  OpenSlide 4.0's DICOM driver reads it.  The frames are declared
    ``YBR_FULL_422``, as wsidicom declares every YCbCr JPEG and as OpenSlide requires
    (it refuses ``YBR_FULL``, the strict name for unsubsampled YCbCr); decoders take
    the sampling from the JPEG stream itself.
``jpeg2000``
    irreversible JPEG 2000 (``YBR_ICT``; OpenSlide 4.0's DICOM driver reads it).  A tile
    the container already holds as a JPEG 2000 codestream (every tile of a ``jpeg2000``
    container; the JPEG 2000 tiles and fix-up tails of an ``auto`` one written without a
    margin, as before 2026-12-05 22:00 UTC) is written byte for byte, not re-coded a second time; a
    JPEG 2000 tile with a margin is larger than its frame, and like every other tile is
    decoded and coded by wsicodec's ``jpeg2000`` codec (the same OpenJPEG coding, with
    its colour transform: ``YBR_ICT``) at the target PSNR ``quality`` in dB.
``jpegxl``
    a tile the container already holds as a JPEG-XL codestream (every tile of a
    ``jpegxl`` container; the JPEG-XL and fix-up tiles of an ``auto`` one) is written
    byte for byte, not re-coded; every other tile (learned, glass) is decoded and coded
    as JPEG-XL by wsicodec's ``jpegxl`` codec at butteraugli distance ``quality``
    (default 1.0, that codec's default).  Transfer syntax JPEG XL
    (1.2.840.10008.1.2.4.112, DICOM since 2024): wsidicom reads it, OpenSlide 4.0 does
    not, which is why it is not the default.
"""

from __future__ import annotations

from dataclasses import dataclass

from wsicodec.errors import InvalidSettingError

#: frame codings offered (:class:`DicomSettings`)
DICOM_SYNTAXES = ("jpeg", "jpeg2000", "jpegxl")
DEFAULT_DICOM_SYNTAX = "jpeg"
#: per syntax: (default quality, lowest, highest, what the number means)
DICOM_QUALITY: dict[str, tuple[float, float, float, str]] = {
    "jpeg": (95, 1, 100, "JPEG quality"),
    "jpeg2000": (40.0, 20.0, 80.0, "JPEG 2000 target PSNR in dB"),
    "jpegxl": (1.0, 0.1, 25.0, "JPEG-XL butteraugli distance of the re-coded tiles"),
}
#: what to install when wsidicom is missing
INSTALL_HINT = "DICOM output needs wsidicom: pip install 'wsicodec[dicom]'"


@dataclass(frozen=True)
class DicomSettings:
    """How frames are coded: ``syntax`` one of :data:`DICOM_SYNTAXES`, ``quality`` its
    knob as :data:`DICOM_QUALITY` says (None: the syntax's default; an integer for
    ``jpeg``); ``mpp``: level 0's pixel size in µm (x = y) to state instead of the
    container's, for slides whose source did not say (DICOM WSI requires one; None: the
    container's).  Raises InvalidSettingError for anything else."""

    syntax: str = DEFAULT_DICOM_SYNTAX
    quality: float | None = None
    mpp: float | None = None

    def __post_init__(self) -> None:
        if self.syntax not in DICOM_SYNTAXES:
            raise InvalidSettingError(f"DICOM transfer syntax must be one of "
                                      f"{', '.join(DICOM_SYNTAXES)}, got {self.syntax!r}")
        default, lo, hi, what = DICOM_QUALITY[self.syntax]
        q = default if self.quality is None else self.quality
        integer = isinstance(default, int)
        if (isinstance(q, bool) or not isinstance(q, (int, float)) or not lo <= q <= hi
                or (integer and q != int(q))):
            kind = "an integer" if integer else "a number"
            raise InvalidSettingError(f"{what} must be {kind} in [{lo:g}, {hi:g}], got {q!r}")
        object.__setattr__(self, "quality", int(q) if integer else float(q))
        if self.mpp is not None:
            m = self.mpp
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.01 <= m <= 1000:
                raise InvalidSettingError(f"the pixel size (mpp) must be a number of µm in "
                                          f"[0.01, 1000], got {m!r}")
            object.__setattr__(self, "mpp", float(m))

    @property
    def passthrough(self) -> bool:
        """Whether the container's codestreams of this syntax (JPEG-XL, JPEG 2000) are
        written as they are."""
        return self.syntax in ("jpegxl", "jpeg2000")

    def describe(self) -> str:
        """"JPEG q95", "JPEG 2000 40 dB", "JPEG-XL (re-coded tiles: distance 1)"."""
        if self.syntax == "jpeg":
            return f"JPEG q{self.quality}"
        if self.syntax == "jpeg2000":
            return f"JPEG 2000 (JPEG 2000 tiles as stored, others at {self.quality:g} dB)"
        return f"JPEG-XL (JPEG-XL tiles as stored, others at distance {self.quality:g})"


def write_container_dicom(*args, **kwargs):  # type: ignore[no-untyped-def]
    """:func:`wsicodec.dicom.write.write_container_dicom` (imports wsidicom)."""
    from wsicodec.dicom.write import write_container_dicom as write

    return write(*args, **kwargs)


__all__ = ["DEFAULT_DICOM_SYNTAX", "DICOM_QUALITY", "DICOM_SYNTAXES", "DicomSettings",
           "INSTALL_HINT", "write_container_dicom"]
