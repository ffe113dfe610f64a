"""Write a container out as an Aperio-compatible SVS that OpenSlide and tiffslide read
as vendor ``aperio``.

The layout is the one OpenSlide's aperio driver and tifffile's SVS series expect (a
BigTIFF; every page's ImageDescription begins with ``Aperio `` and holds
``|``-separated ``Key = Value`` pairs after its first line)::

    page 0      level 0, tiled; ImageDescription with MPP, AppMag and the source's
                aperio.* properties; the ICC profile (tag 34675)
    page 1      the thumbnail, stripped (the container's, else made from the pyramid)
    pages 2..   levels 1.., tiled, NewSubfileType 0
    then        the label (stripped, NewSubfileType 1, lossless), the macro (stripped,
                NewSubfileType 9), each named on its description's second line

OpenSlide reports ``MPP`` as ``openslide.mpp-x/-y`` and ``AppMag`` as
``openslide.objective-power``; tiffslide reads the same keys.  Only ``aperio.*``
properties can be written back (another vendor's have no place in an Aperio
description); associated images other than label, macro and thumbnail are left out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from wsicodec.tiff import TiffSettings, TileIterator

#: the description's first word, which OpenSlide and tifffile detect an SVS by
HEADER = "Aperio Image Library compatible"
#: associated images an SVS holds, and their NewSubfileType
SUBFILE_TYPES = {"label": 1, "macro": 9}
#: longest side of a thumbnail made from the pyramid (Aperio's are about 1,000 px)
THUMBNAIL_SIDE = 1024
_THUMBNAIL_QUALITY = 90


def aperio_pairs(properties: Mapping[str, str], mpp: tuple[float, float] | None,
                 objective_power: float | None) -> dict[str, str]:
    """The ``Key = Value`` pairs of level 0's description: the ``aperio.*`` properties
    (those whose key or value would break the format left out), with ``MPP`` and
    ``AppMag`` the container's mpp and objective power (as the source wrote them when
    they agree; left out when the container has none)."""
    pairs = {}
    for key, value in properties.items():
        name = key[len("aperio."):] if key.startswith("aperio.") else None
        if not name or any(c in name + value for c in "|\r\n") or "=" in name:
            continue
        pairs[name.strip()] = value.strip()
    want = {"AppMag": objective_power,
            "MPP": (mpp[0] + mpp[1]) / 2 if mpp else None}   # Aperio: one MPP for both axes
    for key, value in want.items():
        if value is None:
            pairs.pop(key, None)
        elif not _same_number(pairs.get(key), value):       # else the source's own text
            pairs[key] = f"{value:.6g}"
    return pairs


def _same_number(text: str | None, value: float) -> bool:
    try:
        return text is not None and abs(float(text) - value) <= 1e-9 * max(1.0, abs(value))
    except ValueError:
        return False


def describe(first_line: str, pairs: Mapping[str, str] | None = None) -> str:
    """``Aperio ...\\r\\n<first_line>|Key = Value|...``."""
    from wsicodec import __version__

    text = f"{HEADER} (wsicodec {__version__})\r\n{first_line}"
    return text + "".join(f"|{k} = {v}" for k, v in (pairs or {}).items())


def write_svs(path: str | os.PathLike[str], level_dimensions: list[tuple[int, int]],
              tile_size: int, tiles: TileIterator, *, thumbnail: np.ndarray,
              associated: Mapping[str, np.ndarray], pairs: Mapping[str, str],
              icc_profile: bytes | None = None, settings: TiffSettings = TiffSettings()) -> None:
    """Write the SVS (streaming the levels' tiles, one at a time).

    ``thumbnail``: (h, w, 3) uint8; ``associated``: label and/or macro, (h, w, 3) uint8
    (other names are ignored); ``pairs``: level 0's description pairs
    (:func:`aperio_pairs`).  Raises OSError on write failures and whatever ``tiles``
    raises; the caller owns cleanup of a partial file.
    """
    import tifffile

    w0, h0 = level_dimensions[0]
    q = settings.quality
    codec = f"JPEG/RGB Q={q}" if settings.compression == "jpeg" else "Deflate/RGB"
    tiled = dict(tile=(tile_size, tile_size), photometric="rgb", metadata=None,
                 **settings.writer_kwargs())
    stripped = dict(photometric="rgb", metadata=None)
    with tifffile.TiffWriter(Path(path), bigtiff=True) as tw:
        tw.write(tiles(0), shape=(h0, w0, 3), dtype=np.uint8, **tiled,
                 description=describe(f"{w0}x{h0} [0,0 {w0}x{h0}] ({tile_size}x{tile_size}) "
                                      f"{codec}", pairs),
                 **({"iccprofile": icc_profile} if icc_profile else {}))
        th, tw_ = thumbnail.shape[:2]
        tw.write(np.ascontiguousarray(thumbnail), **stripped, compression="jpeg",
                 compressionargs={"level": _THUMBNAIL_QUALITY}, subsampling=(1, 1),
                 description=describe(f"{w0}x{h0} -> {tw_}x{th} - "))
        for level, (w, h) in enumerate(level_dimensions[1:], start=1):
            tw.write(tiles(level), shape=(h, w, 3), dtype=np.uint8, **tiled,
                     description=describe(f"{w0}x{h0} -> {w}x{h} ({tile_size}x{tile_size}) "
                                          f"{codec}"))
        for name, subfile in SUBFILE_TYPES.items():
            image = associated.get(name)
            if image is None:
                continue
            h, w = image.shape[:2]
            lossy = dict(compression="jpeg", compressionargs={"level": _THUMBNAIL_QUALITY},
                         subsampling=(1, 1))
            tw.write(np.ascontiguousarray(image), **stripped, subfiletype=subfile,
                     description=describe(f"{name} {w}x{h}"),
                     **(dict(compression="zlib") if name == "label" else lossy))


def write_container_svs(container: Any, path: str | os.PathLike[str], tiles: TileIterator, *,
                        settings: TiffSettings = TiffSettings(), deidentify: bool = False
                        ) -> None:
    """Write an open container as an SVS at ``path`` (:func:`write_svs`): its levels
    (``tiles``), mpp, objective power, ICC profile, ``aperio.*`` properties, label, macro
    and thumbnail (made from the pyramid when it has none).  ``deidentify``: without the
    images and properties ``compress --deidentify`` leaves out.

    Raises CorruptDataError / CorruptTileError (a damaged image or tile), OSError."""
    meta = container.metadata
    properties = dict(meta.properties)
    names = list(meta.associated_images)
    if deidentify:
        from wsicodec.deidentify import deidentify_properties, dropped_associated_images

        properties = deidentify_properties(properties, meta.source_vendor)[0]
        names = [n for n in names if n not in dropped_associated_images(names)]
    dims = [lv.dimensions for lv in meta.levels]
    if "thumbnail" in names:
        thumbnail = container.read_associated_image("thumbnail")
    else:
        thumbnail = level_image(container, thumbnail_from_levels(dims))
    associated = {n: container.read_associated_image(n) for n in SUBFILE_TYPES if n in names}
    write_svs(path, dims, meta.tile_size, tiles, thumbnail=thumbnail, associated=associated,
              pairs=aperio_pairs(properties, meta.mpp, meta.objective_power),
              icc_profile=meta.icc_profile, settings=settings)


def level_image(container: Any, level: int) -> np.ndarray:
    """One whole level of a container, decoded: (h, w, 3) uint8 (for small levels)."""
    grid = container.grid(level)
    t = container.tile_size
    keys = [(col, row) for col, row in grid]
    out = np.empty((grid.rows * t, grid.cols * t, 3), np.uint8)
    for (col, row), tile in zip(keys, container.read_tiles(level, keys)):
        out[row * t:(row + 1) * t, col * t:(col + 1) * t] = tile
    w, h = container.metadata.levels[level].dimensions
    return np.ascontiguousarray(out[:h, :w])


def thumbnail_from_levels(level_dimensions: list[tuple[int, int]]) -> int:
    """The level a thumbnail is made from when the container has none: the largest whose
    longer side is at most :data:`THUMBNAIL_SIDE` (the smallest level otherwise)."""
    fitting = [i for i, (w, h) in enumerate(level_dimensions) if max(w, h) <= THUMBNAIL_SIDE]
    return fitting[0] if fitting else len(level_dimensions) - 1


__all__ = ["HEADER", "SUBFILE_TYPES", "THUMBNAIL_SIDE", "aperio_pairs", "describe",
           "level_image", "thumbnail_from_levels", "write_container_svs", "write_svs"]
