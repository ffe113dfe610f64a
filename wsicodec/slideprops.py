"""A container's properties as OpenSlide would report them for the source, made true of
the container.

``compress`` stores every property OpenSlide reported for the source (vendor ones such
as ``aperio.*``, ``hamamatsu.*``, ``dicom.*``, ``tiff.*``, and OpenSlide's own
``openslide.*``).  :func:`container_properties` gives them back for
:attr:`wsicodec.slide.WsiSlide.properties`:

- every vendor property, as the source had it;
- OpenSlide's properties that stay true of the container, as the source had them
  (:data:`KEPT`: bounds, mpp, objective power, comment, background colour) and the
  associated images' sizes for the images the container kept;
- what describes the container itself: ``openslide.vendor`` (``wsicodec``),
  ``openslide.level-count`` and ``openslide.level[i].*`` (its pyramid and tiles),
  ``openslide.icc-size`` (the profile it holds) and ``openslide.quickhash-1``
  (:func:`quickhash`: a digest of its own stored pixels, not the source's);
- ``wsicodec.*``: ``source-vendor``, ``codec``, ``model-sha256`` (learned codec), and
  ``source-quickhash-1``, the source's ``openslide.quickhash-1``.

What differs from OpenSlide on the source on purpose: :data:`DIFFERS`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any

from wsicodec.errors import CorruptDataError

log = logging.getLogger(__name__)

VENDOR = "wsicodec"
#: OpenSlide properties of the source that stay true of the container (same level-0
#: pixel grid, same scan): kept as the source wrote them
KEPT = ("openslide.bounds-x", "openslide.bounds-y", "openslide.bounds-width",
        "openslide.bounds-height", "openslide.mpp-x", "openslide.mpp-y",
        "openslide.objective-power", "openslide.comment", "openslide.background-color")
#: what :func:`container_properties` reports differently from OpenSlide on the source,
#: and why
DIFFERS = {
    "openslide.vendor": "'wsicodec' (the source's is wsicodec.source-vendor)",
    "openslide.quickhash-1": "a digest of the container's own stored pixels (the source's is "
                             "wsicodec.source-quickhash-1)",
    "openslide.level-count": "the container's pyramid (2x steps down to one tile)",
    "openslide.level[*]": "the container's levels and tile size",
    "openslide.icc-size": "absent when the profile was not kept (a source's invalid or "
                          "non-RGB profile)",
    "openslide.associated.*.icc-size": "associated images' own profiles are not kept",
    "openslide.associated.<name>.*": "absent for images left out (--associated none, "
                                     "--deidentify)",
}
#: the most tiles :func:`quickhash` reads (a container's smallest level is one tile)
QUICKHASH_MAX_TILES = 64
_ASSOCIATED_SIZE = re.compile(r"^openslide\.associated\.(.+)\.(width|height)$")


def quickhash(container: Any) -> str | None:
    """``openslide.quickhash-1`` of a container, as OpenSlide makes it for a slide: the
    SHA-256 of the stored bytes of every tile of the smallest level (in row order, each
    with its length), with the codec, its settings and the level's geometry.  The same
    source coded with the same settings gives the same hash; other pixels, another one.
    None when that level has more than :data:`QUICKHASH_MAX_TILES` tiles, or a tile of
    it cannot be read (logged)."""
    meta = container.metadata
    level = len(meta.levels) - 1
    grid = meta.grid(level)
    if grid.cols * grid.rows > QUICKHASH_MAX_TILES:
        return None
    h = hashlib.sha256(b"wsicodec quickhash-1\0")
    h.update(json.dumps([meta.codec, meta.tile_size, meta.levels[level].dimensions],
                        sort_keys=True, separators=(",", ":")).encode())
    try:
        for row in range(grid.rows):
            for col in range(grid.cols):
                data = container.read_encoded_tile(level, col, row)
                h.update(len(data).to_bytes(8, "little") + data)
    except CorruptDataError as e:
        log.warning("%s: no quickhash-1: %s", container.path, e)
        return None
    return h.hexdigest()


def container_properties(container: Any) -> dict[str, str]:
    """The properties :class:`wsicodec.slide.WsiSlide` reports (module docstring)."""
    meta = container.metadata
    source = meta.properties
    props = {k: v for k, v in source.items() if not k.startswith("openslide.")}
    props[f"{VENDOR}.source-vendor"] = meta.source_vendor
    props[f"{VENDOR}.codec"] = meta.codec.get("name", "")
    if meta.model_id:
        props[f"{VENDOR}.model-sha256"] = meta.model_id
    if "openslide.quickhash-1" in source:
        props[f"{VENDOR}.source-quickhash-1"] = source["openslide.quickhash-1"]
    kept = set(meta.associated_images)
    for key, value in source.items():
        m = _ASSOCIATED_SIZE.match(key)
        if key in KEPT or (m and m[1] in kept):
            props[key] = value
    if meta.mpp and "openslide.mpp-x" not in props:
        props["openslide.mpp-x"], props["openslide.mpp-y"] = (repr(meta.mpp[0]),
                                                              repr(meta.mpp[1]))
    if meta.objective_power and "openslide.objective-power" not in props:
        props["openslide.objective-power"] = f"{meta.objective_power:g}"
    if meta.icc_profile is not None:
        props["openslide.icc-size"] = str(len(meta.icc_profile))
    props["openslide.vendor"] = VENDOR
    props["openslide.level-count"] = str(len(meta.levels))
    for i, lv in enumerate(meta.levels):
        props[f"openslide.level[{i}].width"] = str(lv.width)
        props[f"openslide.level[{i}].height"] = str(lv.height)
        props[f"openslide.level[{i}].downsample"] = f"{lv.downsample:.17g}"   # as OpenSlide
        props[f"openslide.level[{i}].tile-width"] = str(meta.tile_size)
        props[f"openslide.level[{i}].tile-height"] = str(meta.tile_size)
    digest = quickhash(container)
    if digest is not None:
        props["openslide.quickhash-1"] = digest
    return props


__all__ = ["DIFFERS", "KEPT", "QUICKHASH_MAX_TILES", "container_properties", "quickhash"]
