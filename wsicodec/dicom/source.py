"""A container presented to wsidicom as a ``wsidicom.source.Source``, so that wsidicom
writes it as DICOM WSI (``WsiDicom(ContainerSource(...)).save(folder)``).

One :class:`wsidicom.instance.ImageData` per pyramid level (:class:`LevelFrames`, one
frame per container tile) and per associated image (:class:`ImageFrames`, one frame);
the DICOM attributes come from :func:`wsi_metadata` through wsidicom's own schema.
Frames are coded as :class:`wsicodec.dicom.DicomSettings` says: wsidicom's encoder
re-codes decoded tiles (``transcoder``), or, for ``jpegxl``, :meth:`LevelFrames.
get_encoded_tiles` hands over each stored JPEG-XL codestream as it is and codes the
other tiles with wsicodec's ``jpegxl`` codec.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from wsidicom.codec import Channels, Encoder, Jpeg2kSettings, JpegSettings, Subsampling
from wsidicom.codec.settings import JpegXlSettings
from wsidicom.geometry import Point, Size, SizeMm
from wsidicom.instance import ImageData, WsiDataset, WsiInstance
from wsidicom.metadata import (Equipment, Image, ImageType, Label, Objectives, OpticalPath, Overview,
                               Patient, PatientDeIdentification, Pyramid, Series, Slide, SlideSample, Study,
                               WsiMetadata)
from wsidicom.metadata.schema.dicom import WsiMetadataDicomSchema
from wsidicom.source import Source

from wsicodec.dicom import DicomSettings
from wsicodec.errors import InvalidSettingError

#: the container's associated images and the DICOM image types they are written as
ASSOCIATED_TYPES = {"label": ImageType.LABEL, "macro": ImageType.OVERVIEW,
                    "thumbnail": ImageType.THUMBNAIL}
#: per passthrough syntax, the tile codecs whose tiles may be codestreams of it
PASSTHROUGH_CODECS = {"jpegxl": ("jpegxl", "auto"), "jpeg2000": ("jpeg2000", "auto")}

#: what the container does not know and DICOM requires a value for (wsidicom's word)
UNKNOWN = "Unknown"
#: ``progress(n)``: n more frames read
Progress = Callable[[int], None]


def frame_encoder(settings: DicomSettings) -> Encoder:
    """wsidicom's encoder for ``settings``; for ``jpegxl`` the one whose transfer syntax
    and photometric interpretation (RGB: JPEG-XL decodes to RGB) the frames declare."""
    if settings.syntax == "jpeg":
        return Encoder.create_for_settings(JpegSettings(quality=int(settings.quality),  # type: ignore[arg-type]
                                                        subsampling=Subsampling.R444))
    if settings.syntax == "jpeg2000":
        return Encoder.create_for_settings(Jpeg2kSettings(levels=float(settings.quality)))  # type: ignore[arg-type]
    return Encoder.create_for_settings(JpegXlSettings(channels=Channels.RGB))


def stored_codestream(data: bytes, syntax: str) -> bytes | None:
    """The ``syntax`` ("jpegxl" or "jpeg2000") codestream that gives a stored tile its
    pixels, or None: the tile itself when it is one (a ``jpegxl`` / ``jpeg2000``
    container's, an ``auto`` container's bare tile), the codestream part of an ``auto``
    fix-up tile when it is one, else None (learned, glass, the other codec, and a
    scanner's JPEG carried in JPEG-XL: its pixels are libjpeg's decode of the JPEG it
    reconstructs, which a JPEG-XL decoder's own decode is not)."""
    from wsicodec.classical import CODESTREAM_SIGNATURES
    from wsicodec.learned.tileformat import KIND_FIXUP, MAGIC, fixup_parts, parse_header
    from wsicodec.scannertiles import is_carried

    signatures = CODESTREAM_SIGNATURES[syntax]
    if data[:4] == MAGIC:
        hd = parse_header(data)
        if hd.kind != KIND_FIXUP:
            return None
        data = fixup_parts(data, hd)[1]
    return data if data.startswith(signatures) and not is_carried(data) else None


class _Frames(ImageData):
    """What every frame set here shares: 8-bit RGB frames, one focal plane and optical
    path, coded by ``encoder`` (re-coded by wsidicom unless ``passthrough``)."""

    def __init__(self, encoder: Encoder, settings: DicomSettings, size: tuple[int, int],
                 tile: tuple[int, int], spacing_mm: tuple[float, float] | None) -> None:
        super().__init__(encoder)
        self._settings = settings
        self._size = Size(*size)
        self._tile = Size(*tile)
        self._spacing = SizeMm(*spacing_mm) if spacing_mm else None
        self._coder: Any = None

    @property
    def transfer_syntax(self) -> Any:
        return self.encoder.transfer_syntax

    @property
    def image_size(self) -> Size:
        return self._size

    @property
    def tile_size(self) -> Size:
        return self._tile

    @property
    def pixel_spacing(self) -> SizeMm | None:
        return self._spacing

    @property
    def imaged_size(self) -> SizeMm | None:
        return None

    @property
    def samples_per_pixel(self) -> int:
        return 3

    @property
    def photometric_interpretation(self) -> str:
        return self.encoder.photometric_interpretation

    @property
    def bits(self) -> int:
        return 8

    @property
    def image_coordinate_system(self) -> Any:
        return None

    @property
    def thread_safe(self) -> bool:
        return True

    @property
    def lossy_compression(self) -> list:
        return []        # lossy before (the container's codec), by no DICOM method

    @property
    def transcoder(self) -> Encoder | None:
        return None if self._settings.passthrough else self.encoder

    def get_decoded_tile(self, tile_point: Point, z: float, path: str,
                         cache: bool = True) -> np.ndarray:
        return next(iter(self.get_decoded_tiles([tile_point], z, path, cache)))

    def get_encoded_tile(self, tile: Point, z: float, path: str) -> bytes:
        return next(iter(self.get_encoded_tiles([tile], z, path)))

    def get_encoded_tiles(self, tiles: Iterable[Point], z: float, path: str) -> Iterator[bytes]:
        """Only for a passthrough syntax (wsidicom re-codes otherwise): each tile coded by
        wsicodec's codec of that syntax."""
        return iter([self._code(t) for t in self.get_decoded_tiles(list(tiles), z, path, False)])

    def _code(self, pixels: np.ndarray) -> bytes:
        """``pixels`` coded by wsicodec's ``jpegxl`` or ``jpeg2000`` codec at the
        settings' quality: the coding the stored codestreams passed through have."""
        if self._coder is None:
            from wsicodec.codecs import get_codec

            self._coder = get_codec(self._settings.syntax, self._settings.quality)
        return self._coder.encode(np.ascontiguousarray(pixels))


class LevelFrames(_Frames):
    """One pyramid level of a container: a frame per stored tile (tiles are stored
    padded to full squares, as a TILED_FULL frame is)."""

    def __init__(self, container: Any, level: int, encoder: Encoder, settings: DicomSettings,
                 spacing_mm: tuple[float, float] | None, progress: Progress | None) -> None:
        t = container.tile_size
        super().__init__(encoder, settings, container.metadata.levels[level].dimensions,
                         (t, t), spacing_mm)
        self._container = container
        self._level = level
        self._cols = container.grid(level).cols
        self._progress = progress
        codec = container.metadata.codec
        #: a JPEG 2000 tile with a margin (the auto codec's since 2026-12-05 22:00 UTC) is larger than
        #: its frame: re-coded like the others
        margin = (codec.get("configuration") or {}).get("jpeg2000_margin", 0)
        self._passthrough = (settings.passthrough and codec.get("name") in PASSTHROUGH_CODECS[settings.syntax]
                             and not (settings.syntax == "jpeg2000" and margin))

    @property
    def suggested_minimum_chunk_size(self) -> int:
        return self._cols            # a tile row per batch: the learned decoder's unit

    def get_decoded_tiles(self, tiles: Iterable[Point], z: float, path: str,
                          cache: bool = True) -> Iterator[np.ndarray]:
        keys = [(p.x, p.y) for p in tiles]
        out = self._container.read_tiles(self._level, keys)
        if self._progress and not self._settings.passthrough:
            self._progress(len(keys))
        return iter(out)

    def get_encoded_tiles(self, tiles: Iterable[Point], z: float, path: str) -> Iterator[bytes]:
        """Each tile's stored codestream of the settings' syntax as it is (checked against
        its CRC and digest on reading), the others decoded (with their neighbours, in one
        call) and coded in that syntax."""
        points = list(tiles)
        out: list[bytes | None] = [None] * len(points)
        if self._passthrough:
            for i, p in enumerate(points):
                out[i] = stored_codestream(self._container.read_encoded_tile(self._level, p.x, p.y),
                                           self._settings.syntax)
        rest = [p for p, o in zip(points, out) if o is None]
        if rest:
            coded = iter([self._code(px) for px in self.get_decoded_tiles(rest, z, path)])
            out = [o if o is not None else next(coded) for o in out]
        if self._progress:
            self._progress(len(points))
        return iter(out)  # type: ignore[arg-type]


class ImageFrames(_Frames):
    """An associated image (label, macro, thumbnail) as one frame."""

    def __init__(self, pixels: np.ndarray, encoder: Encoder, settings: DicomSettings,
                 spacing_mm: tuple[float, float] | None) -> None:
        h, w = pixels.shape[:2]
        super().__init__(encoder, settings, (w, h), (w, h), spacing_mm)
        self._pixels = np.ascontiguousarray(pixels)

    def get_decoded_tiles(self, tiles: Iterable[Point], z: float, path: str,
                          cache: bool = True) -> Iterator[np.ndarray]:
        for p in tiles:
            if p != Point(0, 0):
                raise ValueError(f"{p}: an associated image has one frame")
            yield self._pixels


def wsi_metadata(meta: Any, *, deidentify: bool = False, mpp: tuple[float, float] | None = None
                 ) -> WsiMetadata:
    """The DICOM attributes of a container (``meta``: its ContainerMetadata) as
    wsidicom's metadata: level 0's pixel spacing from the mpp, the ICC profile and the
    objective power in the optical path, a series description naming wsicodec, the
    source's file name (left out with ``deidentify``, which also sets Patient Identity
    Removed) and its codec.  Patient, study and specimen are left empty or "Unknown"
    (the container does not know them); the study, series, pyramid and specimen UIDs are
    derived from the container's id.  A container with
    no ICC profile gets wsidicom's default sRGB one where the file is written (DICOM
    requires one for colour images).  ``mpp``: the (x, y) µm to state instead of the
    container's.  Raises InvalidSettingError without an mpp: DICOM WSI requires the pixel
    spacing."""
    from wsicodec import __version__

    mpp = mpp or meta.mpp
    if not mpp:
        raise InvalidSettingError("DICOM WSI needs the pixel size, and this container has "
                                  "no mpp (its source slide did not say); state it with "
                                  "--mpp MICRONS, or write a TIFF or SVS instead")
    optical = OpticalPath(identifier="0", icc_profile=meta.icc_profile,
                          objective=(Objectives(objective_power=meta.objective_power)
                                     if meta.objective_power else None))
    source = None if deidentify else meta.source_name
    what = f"wsicodec {__version__} from {source or 'a container'} ({meta.codec.get('name')})"
    return WsiMetadata(
        study=Study(uid=_uid(meta, "study")),
        series=Series(uid=_uid(meta, "series"), number=1, description=what[:64]),
        patient=Patient(de_identification=(PatientDeIdentification(identity_removed=True)
                                            if deidentify else None)),
        equipment=Equipment(software_versions=[f"wsicodec {__version__}"]),
        slide=Slide(samples=[SlideSample(identifier=UNKNOWN, uid=_uid(meta, "specimen"))]),
        pyramid=Pyramid(image=Image(pixel_spacing=SizeMm(mpp[0] / 1000, mpp[1] / 1000)),
                        optical_paths=[optical], description=what, uid=_uid(meta, "pyramid")),
        label=Label(),
        overview=Overview(image=Image(), optical_paths=[optical]),
        frame_of_reference_uid=_uid(meta, "frame of reference"),
        dimension_organization_uids=[_uid(meta, "dimension organization")])


def _uid(meta: Any, what: str) -> Any:
    """A UID for ``what``: the same for every export of one container (a format-3
    container's id), random for an older container that has none."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[meta.container_id, what] if meta.container_id else None)


class ContainerSource(Source):
    """An open container as a wsidicom Source: its levels, and its label, macro (as the
    overview) and thumbnail where it has them (``deidentify``: without the label and
    macro).  Raises InvalidSettingError (no mpp), CorruptDataError (a damaged
    associated image); tiles are read, and their damage raised, as wsidicom writes."""

    def __init__(self, container: Any, settings: DicomSettings, *, deidentify: bool = False,
                 progress: Progress | None = None) -> None:
        super().__init__()
        meta = container.metadata
        mpp = (settings.mpp, settings.mpp) if settings.mpp else meta.mpp
        self._metadata = wsi_metadata(meta, deidentify=deidentify, mpp=mpp)
        self._encoder = frame_encoder(settings)
        w0, h0 = meta.levels[0].dimensions

        def spacing(w: int, h: int) -> tuple[float, float]:
            return (mpp[0] * w0 / w / 1000, mpp[1] * h0 / h / 1000)

        self._levels = [LevelFrames(container, i, self._encoder, settings,
                                    spacing(*lv.dimensions), progress)
                        for i, lv in enumerate(meta.levels)]
        names = list(meta.associated_images)
        if deidentify:
            from wsicodec.deidentify import dropped_associated_images

            names = [n for n in names if n not in dropped_associated_images(names)]
        self._associated: dict[ImageType, ImageFrames] = {}
        for name, kind in ASSOCIATED_TYPES.items():
            if name in names:
                px = container.read_associated_image(name)
                h, w = px.shape[:2]
                self._associated[kind] = ImageFrames(
                    px, self._encoder, settings,
                    spacing(w, h) if kind == ImageType.THUMBNAIL else None)

    def _dataset(self, kind: ImageType) -> Any:
        """A fresh dataset of the attributes common to images of ``kind`` (wsidicom
        completes it per instance, in place)."""
        return WsiMetadataDicomSchema().dump(self._metadata, kind, require_icc_profile=True)

    def _instance(self, data: ImageFrames | LevelFrames, kind: ImageType,
                  index: int | None = None) -> WsiInstance:
        return WsiInstance.create_instance(data, self._dataset(kind), kind, index)

    @property
    def base_dataset(self) -> WsiDataset:
        return WsiDataset(self._dataset(ImageType.VOLUME))

    @property
    def level_instances(self) -> Sequence[WsiInstance]:
        return [self._instance(lv, ImageType.VOLUME, i) for i, lv in enumerate(self._levels)]

    def _associated_instances(self, kind: ImageType) -> Sequence[WsiInstance]:
        data = self._associated.get(kind)
        return [] if data is None else [self._instance(data, kind)]

    @property
    def label_instances(self) -> Sequence[WsiInstance]:
        return self._associated_instances(ImageType.LABEL)

    @property
    def overview_instances(self) -> Sequence[WsiInstance]:
        return self._associated_instances(ImageType.OVERVIEW)

    @property
    def thumbnail_instances(self) -> Sequence[WsiInstance]:
        return self._associated_instances(ImageType.THUMBNAIL)

    @property
    def annotation_instances(self) -> list:
        return []

    def close(self) -> None:
        """The container is the caller's to close."""


__all__ = ["ASSOCIATED_TYPES", "ContainerSource", "ImageFrames",
           "LevelFrames", "frame_encoder", "stored_codestream", "wsi_metadata"]
