"""The container's metadata: one frozen value, one validation of the whole schema.

``ContainerMetadata`` is everything a container records besides its tiles; it is
serialised into the root group's attributes (``zarr.json``, key :data:`ATTRS_KEY`) by
:meth:`ContainerMetadata.to_attrs` and read back by :meth:`ContainerMetadata.from_attrs`,
which is the only place stored metadata is trusted from: every reader (the
container, the slide reader, the server, every command) goes through it.  It checks
types, ranges and the consistency of the levels and tile grid *before* anything is
sized from them, against the bounds below, so a crafted or damaged ``zarr.json`` is one
clear :class:`~wsicodec.errors.CorruptDataError` (or
:class:`~wsicodec.errors.UnsupportedFormatError`), never an allocation of gigabytes
or a raw ``TypeError``.

Format versions: 1 (PNG associated images), 2 (JPEG-XL associated images), 3 (adds
:mod:`wsicodec.integrity`'s digests: ``container_id``, a digest per tile bound to its
level, column, row and the container, one per level over those, one per associated
image, and ``metadata_digest`` over the rest of these attributes), 4 (format 3 plus a
per-tile fidelity map: ``tile_kinds`` names the kinds, each level holds ``kind`` /
``psnr`` / ``nbytes`` arrays covered by its digest; :mod:`wsicodec.fidelity`).  A
container without the map is written as format 3, exactly as before format 4 existed, so
only containers that carry one need a reader that knows 4.  Versions 1-2 still read;
they lack those guarantees (:func:`missing_guarantees` names them).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from wsicodec import iccprofile
from wsicodec.errors import CorruptDataError, RegionOutOfBoundsError, UnsupportedFormatError
from wsicodec.integrity import metadata_digest
from wsicodec.tiling.geometry import LevelInfo, TileGrid, validate_tile_size

FORMAT_NAME = "wsicodec"
#: 3: integrity digests (tiles bound to their place and container, metadata);
#: 2: associated images may be JPEG-XL ("associated_formats"); 1: PNG only
FORMAT_VERSION = 3
#: 4: format 3 plus the per-tile fidelity map (written only for ``tile_kinds``)
FIDELITY_FORMAT_VERSION = 4
SUPPORTED_VERSIONS = (1, 2, 3, 4)
ATTRS_KEY = "wsicodec"
ASSOCIATED_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: a tile kind's name (``tile_kinds``): short, lower case, e.g. "learned", "jpegxl-lossless"
TILE_KIND_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
#: how many tile kinds a container may name (a kind is a uint8 index)
MAX_TILE_KINDS = 16

# Bounds on what a container may claim, checked before anything is sized from it.
#: pixels per side of level 0 (the largest slides scanned today are ~250,000 wide)
MAX_DIMENSION = 1 << 20
#: pyramid levels (a halving pyramid of MAX_DIMENSION down to one 16-px tile has 17)
MAX_LEVELS = 32
#: tiles over all levels (a 250,000 x 250,000 slide in 256-px tiles has ~1.3 M)
MAX_TILES = 1 << 23
#: properties, and the length of one key / one value
MAX_PROPERTIES = 10_000
MAX_PROPERTY_KEY = 1024
MAX_PROPERTY_VALUE = 1 << 20
#: associated images, and the stored bytes of one
MAX_ASSOCIATED = 32
MAX_ASSOCIATED_BYTES = 256 << 20
#: the stored bytes of ``zarr.json`` files (the root one holds the properties)
MAX_JSON_BYTES = 64 << 20


def max_tile_bytes(tile_size: int) -> int:
    """The most bytes one stored tile may have: twice its raw RGB size plus 64 KiB
    (every codec, lossless ones included, stays well under that)."""
    return 2 * 3 * tile_size * tile_size + (64 << 10)


def missing_guarantees(version: int) -> list[str]:
    """What a container of format ``version`` cannot prove, in words (empty for formats
    3 and 4: format 4 adds the fidelity map, covered by the same digests, and proves
    nothing more about the tiles themselves)."""
    if version >= 3:
        return []
    return ["tiles are not bound to their level/column/row or to the container (a tile "
            "swapped or spliced in with its CRC32 reads as valid)",
            "metadata has no digest (an edit that keeps it well-formed is not detected)",
            "associated images have no digest"]


#: pixels of one associated image (a macro photograph of a whole glass slide is ~10 MP)
MAX_ASSOCIATED_PIXELS = 1 << 26


def check_image_header(data: bytes, fmt: str) -> tuple[int, int]:
    """(width, height) from a PNG's or a bare JPEG-XL codestream's header, checked
    against :data:`MAX_ASSOCIATED_PIXELS` before the image is decoded (a few bytes of
    flat colour can declare gigapixels).  Raises CorruptDataError."""
    if fmt == "png":
        if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
            raise CorruptDataError("not a PNG")
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    elif fmt == "jxl":
        w, h = _jxl_size(data)
    else:
        raise CorruptDataError(f"unknown image format {fmt!r}")
    if w < 1 or h < 1 or w * h > MAX_ASSOCIATED_PIXELS:
        raise CorruptDataError(f"image header declares {w}x{h} pixels (at most "
                               f"{MAX_ASSOCIATED_PIXELS} allowed)")
    return w, h


def _jxl_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a bare JPEG-XL codestream's SizeHeader (ISO/IEC 18181-1 D.2)."""
    if len(data) < 12 or data[:2] != b"\xff\x0a":
        raise CorruptDataError("not a bare JPEG-XL codestream")
    bits = int.from_bytes(data[2:12], "little")
    pos = 0

    def u(n: int) -> int:
        nonlocal pos
        v = (bits >> pos) & ((1 << n) - 1)
        pos += n
        return v

    def u32() -> int:
        return u((9, 13, 18, 30)[u(2)]) + 1

    small = u(1)
    height = (u(5) + 1) * 8 if small else u32()
    ratio = u(3)
    if ratio == 0:
        width = (u(5) + 1) * 8 if small else u32()
    else:
        num, den = ((1, 1), (12, 10), (4, 3), (3, 2), (16, 9), (5, 4), (2, 1))[ratio - 1]
        width = height * num // den
    return width, height


@dataclass(frozen=True)
class ContainerMetadata:
    """Everything the container records besides the tiles.  Serialised into the root
    group's attributes by :meth:`to_attrs`; read back, validated, by :meth:`from_attrs`."""

    codec: dict
    tile_size: int
    levels: tuple[LevelInfo, ...]
    model_id: str | None = None
    mpp: tuple[float, float] | None = None
    objective_power: float | None = None
    source_vendor: str = "unknown"
    source_name: str | None = None
    source_bytes: int | None = None
    properties: dict[str, str] = field(default_factory=dict)
    associated_images: tuple[str, ...] = ()
    associated_formats: dict[str, str] = field(default_factory=dict)   # name -> "png" / "jxl"
    associated_bytes: dict[str, int] = field(default_factory=dict)
    level_bytes: tuple[int, ...] = ()
    #: what ``--deidentify`` removed (names only, never values); None: not de-identified
    deidentified: dict | None = None
    #: format 3: 32 hex digits naming this container; its tile digests are bound to it
    container_id: str | None = None
    #: format 3: per level, the digest over that level's tile digests (hex)
    level_digests: tuple[str, ...] = ()
    #: format 3: per associated image, the digest of its stored bytes (hex)
    associated_digests: dict[str, str] = field(default_factory=dict)
    #: format 4: the names of the tile kinds the per-tile fidelity map indexes
    #: (:mod:`wsicodec.fidelity`); empty: the container carries no map (format 3)
    tile_kinds: tuple[str, ...] = ()
    #: the format version the file was written with (set by :meth:`from_attrs`)
    format_version: int = FORMAT_VERSION
    #: the source's ICC profile, byte for byte (:mod:`wsicodec.iccprofile`); None: none
    icc_profile: bytes | None = None

    def grid(self, level: int) -> TileGrid:
        """Raises RegionOutOfBoundsError for a level outside the pyramid."""
        if not 0 <= level < len(self.levels):
            raise RegionOutOfBoundsError(f"level {level} outside 0..{len(self.levels) - 1}")
        return self.levels[level].grid(self.tile_size)

    @property
    def has_digests(self) -> bool:
        """Whether tiles, associated images and metadata carry digests (format 3, 4)."""
        return self.container_id is not None

    @property
    def has_tile_records(self) -> bool:
        """Whether each level carries a per-tile fidelity map (format 4)."""
        return bool(self.tile_kinds)

    def to_attrs(self) -> dict[str, Any]:
        """The attributes as written; with a ``container_id``, in format 3 with its
        ``metadata_digest`` over everything else, or in format 4 when ``tile_kinds`` is
        set (then also a ``tile_kinds`` list; format 3 attributes never have that key)."""
        from wsicodec import __version__

        levels = []
        for i, lv in enumerate(self.levels):
            g = lv.grid(self.tile_size)
            entry = {"width": lv.width, "height": lv.height, "downsample": lv.downsample,
                     "cols": g.cols, "rows": g.rows}
            if i < len(self.level_digests):
                entry["tiles_digest"] = self.level_digests[i]
            levels.append(entry)
        attrs = {
            "format": FORMAT_NAME,
            "format_version": (2 if not self.has_digests else
                               FIDELITY_FORMAT_VERSION if self.tile_kinds else FORMAT_VERSION),
            "software": f"wsicodec {__version__}",
            "codec": self.codec,
            "model_sha256": self.model_id,
            "tile_size": self.tile_size,
            "tile_padding": "edge",
            "levels": levels,
            "level_bytes": list(self.level_bytes),
            "mpp": list(self.mpp) if self.mpp else None,
            "objective_power": self.objective_power,
            "source": {"name": self.source_name, "vendor": self.source_vendor,
                       "bytes": self.source_bytes},
            "properties": dict(self.properties),
            "associated_images": list(self.associated_images),
            "associated_formats": {n: self.associated_formats.get(n, "png")
                                   for n in self.associated_images},
            "associated_bytes": dict(self.associated_bytes),
        }
        if self.deidentified is not None:
            attrs["deidentified"] = self.deidentified
        if self.tile_kinds:
            attrs["tile_kinds"] = list(self.tile_kinds)
        if self.icc_profile is not None:     # absent, not null: older digests stay valid
            attrs["icc_profile"] = iccprofile.to_attr(self.icc_profile)
        if self.has_digests:
            attrs["container_id"] = self.container_id
            attrs["associated_digests"] = dict(self.associated_digests)
            attrs["metadata_digest"] = metadata_digest(attrs)
        return attrs

    @classmethod
    def from_attrs(cls, attrs: Any, *, where: str = "container") -> "ContainerMetadata":
        """Validate stored attributes and build the metadata from them.

        Raises:
            UnsupportedFormatError: not a wsicodec container, or an unknown version.
            CorruptDataError: anything malformed, out of bounds or inconsistent (the
                message says what), or a metadata digest that does not match.
        """
        if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
            raise UnsupportedFormatError(f"{where}: not a wsicodec container")
        version = attrs.get("format_version")
        if type(version) is not int or version not in SUPPORTED_VERSIONS:
            raise UnsupportedFormatError(
                f"{where}: container format version {version!r} is not supported by this "
                f"wsicodec (it reads version {', '.join(map(str, SUPPORTED_VERSIONS))}); "
                "use the wsicodec release that wrote it")
        try:
            return _parse(attrs, version)
        except _Bad as e:
            raise CorruptDataError(f"{where}: damaged container metadata: {e}") from None


class _Bad(Exception):
    """One malformed field (the message names it)."""


def _int(obj: dict, key: str, lo: int, hi: int, *, optional: bool = False) -> int | None:
    v = obj.get(key)
    if v is None and optional:
        return None
    if type(v) is not int or not lo <= v <= hi:
        raise _Bad(f"{key} must be an integer in {lo}..{hi}, got {_short(v)}")
    return v


def _num(obj: dict, key: str, lo: float, hi: float, *, optional: bool = False) -> float | None:
    v = obj.get(key)
    if v is None and optional:
        return None
    if type(v) not in (int, float) or not math.isfinite(v) or not lo <= v <= hi:
        raise _Bad(f"{key} must be a number in {lo:g}..{hi:g}, got {_short(v)}")
    return float(v)


def _str(obj: dict, key: str, max_len: int = 4096, *, optional: bool = False) -> str | None:
    v = obj.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or len(v) > max_len:
        raise _Bad(f"{key} must be a string of at most {max_len} characters, got {_short(v)}")
    return v


def _dict(obj: dict, key: str, *, optional: bool = True) -> dict:
    v = obj.get(key)
    if v is None and optional:
        return {}
    if not isinstance(v, dict):
        raise _Bad(f"{key} must be an object, got {_short(v)}")
    return v


def _list(obj: dict, key: str, max_len: int, *, optional: bool = True) -> list:
    v = obj.get(key)
    if v is None and optional:
        return []
    if not isinstance(v, list) or len(v) > max_len:
        raise _Bad(f"{key} must be a list of at most {max_len} items, got {_short(v)}")
    return v


def _hex(v: Any, digits: int, what: str) -> str:
    if not isinstance(v, str) or len(v) != digits or not re.fullmatch(r"[0-9a-f]+", v):
        raise _Bad(f"{what} must be {digits} lowercase hex digits, got {_short(v)}")
    return v


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse(attrs: dict, version: int) -> ContainerMetadata:
    if version >= 3:
        stored = _hex(attrs.get("metadata_digest"), 64, "metadata_digest")
        if metadata_digest(attrs) != stored:
            raise _Bad("metadata_digest does not match (metadata changed after it was written)")
    tile_size = _int(attrs, "tile_size", 16, 1 << 16)
    try:
        validate_tile_size(tile_size)
    except ValueError as e:
        raise _Bad(str(e)) from None
    levels = _parse_levels(attrs, tile_size, version)
    codec = _dict(attrs, "codec", optional=False)
    name = _str(codec, "name", 32)
    if not re.fullmatch(r"[a-z0-9_-]+", name or ""):
        raise _Bad(f"codec name {_short(name)} is not a codec name")
    config = _dict(codec, "configuration")
    if len(config) > 64 or not all(isinstance(k, str) and len(k) <= 64 for k in config):
        raise _Bad("codec configuration must map up to 64 option names to values")
    for k, v in config.items():
        if not (v is None or type(v) in (str, int, float, bool)) or (
                isinstance(v, str) and len(v) > 4096):
            raise _Bad(f"codec option {k!r} must be a plain value (a string, a number, true, "
                       f"false or null), got {_short(v)}")
    model_id = attrs.get("model_sha256")
    if model_id is not None:
        _hex(model_id, 64, "model_sha256")
    mpp_raw = attrs.get("mpp")
    mpp = None
    if mpp_raw is not None:
        if not isinstance(mpp_raw, list) or len(mpp_raw) != 2:
            raise _Bad(f"mpp must be null or [x, y], got {_short(mpp_raw)}")
        mpp = tuple(_num({"mpp": m}, "mpp", 1e-6, 1e6) for m in mpp_raw)
    source = _dict(attrs, "source")
    props = _dict(attrs, "properties")
    if len(props) > MAX_PROPERTIES:
        raise _Bad(f"properties holds {len(props)} entries (at most {MAX_PROPERTIES})")
    for k, v in props.items():
        if not isinstance(v, str) or len(k) > MAX_PROPERTY_KEY or len(v) > MAX_PROPERTY_VALUE:
            raise _Bad(f"property {_short(k)} must be a string of at most "
                       f"{MAX_PROPERTY_VALUE} characters, got {_short(v)}")
    names = _list(attrs, "associated_images", MAX_ASSOCIATED)
    if not all(isinstance(n, str) and ASSOCIATED_NAME.match(n) for n in names) or \
            len(set(names)) != len(names):
        raise _Bad(f"associated_images must be distinct names of [A-Za-z0-9_.-], got {_short(names)}")
    formats = _dict(attrs, "associated_formats")
    if not all(isinstance(v, str) and len(v) <= 16 for v in formats.values()):
        raise _Bad("associated_formats must map names to format names")
    nbytes = _dict(attrs, "associated_bytes")
    for n, b in nbytes.items():
        _int({f"associated_bytes[{n}]": b}, f"associated_bytes[{n}]", 0, MAX_ASSOCIATED_BYTES)
    level_bytes = _list(attrs, "level_bytes", len(levels))
    for b in level_bytes:
        _int({"level_bytes": b}, "level_bytes", 0, 1 << 50)
    deid = attrs.get("deidentified")
    if deid is not None and not isinstance(deid, dict):
        raise _Bad(f"deidentified must be an object, got {_short(deid)}")
    try:
        icc = attrs.get("icc_profile")
        icc = None if icc is None else iccprofile.from_attr(icc)
    except ValueError as e:
        raise _Bad(str(e)) from None
    container_id, level_digests, assoc_digests = None, (), {}
    if version >= 3:
        container_id = _hex(attrs.get("container_id"), 32, "container_id")
        level_digests = tuple(_hex(lv.get("tiles_digest"), 32, f"levels[{i}].tiles_digest")
                              for i, lv in enumerate(attrs["levels"]))
        assoc_digests = {n: _hex(d, 32, f"associated_digests[{n}]")
                         for n, d in _dict(attrs, "associated_digests").items()}
        if set(assoc_digests) != set(names):
            raise _Bad("associated_digests does not list exactly the associated images")
    tile_kinds = _parse_tile_kinds(attrs, version)
    return ContainerMetadata(
        codec={"name": name, "configuration": dict(config)},
        tile_size=tile_size,
        levels=levels,
        model_id=model_id,
        mpp=mpp,  # type: ignore[arg-type]
        objective_power=_num(attrs, "objective_power", 1e-3, 1e4, optional=True),
        source_vendor=_str(source, "vendor", 64, optional=True) or "unknown",
        source_name=_str(source, "name", optional=True),
        source_bytes=_int(source, "bytes", 0, 1 << 50, optional=True),
        properties=dict(props),
        associated_images=tuple(names),
        associated_formats={str(k): v for k, v in formats.items()},
        associated_bytes={str(k): v for k, v in nbytes.items()},
        level_bytes=tuple(level_bytes),
        deidentified=deid,
        container_id=container_id,
        level_digests=level_digests,
        associated_digests=assoc_digests,
        tile_kinds=tile_kinds,
        format_version=version,
        icc_profile=icc,
    )


def check_tile_kinds(kinds: Any) -> tuple[str, ...]:
    """``kinds`` as a tuple of tile-kind names: 1 to :data:`MAX_TILE_KINDS` distinct
    names matching :data:`TILE_KIND_NAME`.  Raises ValueError saying what is wrong."""
    if isinstance(kinds, (str, bytes)) or not isinstance(kinds, (list, tuple)) \
            or not 1 <= len(kinds) <= MAX_TILE_KINDS:
        raise ValueError(f"tile_kinds must be a list of 1 to {MAX_TILE_KINDS} names, "
                         f"got {_short(kinds)}")
    for k in kinds:
        if not isinstance(k, str) or not TILE_KIND_NAME.match(k):
            raise ValueError(f"tile kind {_short(k)} is not a short lower-case name "
                             "([a-z][a-z0-9_-], at most 32 characters)")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"tile_kinds names a kind twice: {_short(kinds)}")
    return tuple(kinds)


def _parse_tile_kinds(attrs: dict, version: int) -> tuple[str, ...]:
    """Format 4 must name its tile kinds; earlier formats must not have the key."""
    if version < FIDELITY_FORMAT_VERSION:
        if "tile_kinds" in attrs:
            raise _Bad(f"tile_kinds in a format-{version} container (it needs format "
                       f"{FIDELITY_FORMAT_VERSION})")
        return ()
    try:
        return check_tile_kinds(attrs.get("tile_kinds"))
    except ValueError as e:
        raise _Bad(str(e)) from None


def _parse_levels(attrs: dict, tile_size: int, version: int) -> tuple[LevelInfo, ...]:
    raw = _list(attrs, "levels", MAX_LEVELS, optional=False)
    if not raw:
        raise _Bad("levels is empty")
    levels: list[LevelInfo] = []
    tiles = 0
    for i, lv in enumerate(raw):
        if not isinstance(lv, dict):
            raise _Bad(f"levels[{i}] must be an object, got {_short(lv)}")
        w = _int(lv, "width", 1, MAX_DIMENSION)
        h = _int(lv, "height", 1, MAX_DIMENSION)
        ds = _num(lv, "downsample", 1.0 - 1e-6, float(MAX_DIMENSION))
        info = LevelInfo(w, h, ds)  # type: ignore[arg-type]
        g = info.grid(tile_size)
        for key, want in (("cols", g.cols), ("rows", g.rows)):
            if key in lv and lv[key] != want:
                raise _Bad(f"levels[{i}].{key} is {_short(lv[key])}, but a {w}x{h} level in "
                           f"{tile_size}-px tiles has {want}")
        if i == 0 and abs(ds - 1.0) > 1e-6:
            raise _Bad(f"levels[0].downsample must be 1, got {ds!r}")
        if levels:
            prev = levels[-1]
            if ds < prev.downsample or w > prev.width or h > prev.height:
                raise _Bad(f"levels[{i}] ({w}x{h}, downsample {ds:g}) does not follow "
                           f"levels[{i - 1}] ({prev.width}x{prev.height}, downsample "
                           f"{prev.downsample:g}): levels must get smaller")
            w0, h0 = levels[0].width, levels[0].height
            if abs(w * ds - w0) > 0.05 * w0 + 2 * ds or abs(h * ds - h0) > 0.05 * h0 + 2 * ds:
                raise _Bad(f"levels[{i}] ({w}x{h}) is not level 0 ({w0}x{h0}) "
                           f"downsampled {ds:g}x")
        tiles += g.cols * g.rows
        if tiles > MAX_TILES:
            raise _Bad(f"the pyramid has more than {MAX_TILES} tiles")
        levels.append(info)
    return tuple(levels)


__all__ = ["ContainerMetadata", "FORMAT_NAME", "FORMAT_VERSION", "FIDELITY_FORMAT_VERSION",
           "SUPPORTED_VERSIONS", "TILE_KIND_NAME", "MAX_TILE_KINDS", "check_tile_kinds",
           "ATTRS_KEY", "MAX_DIMENSION", "MAX_LEVELS", "MAX_TILES", "MAX_JSON_BYTES",
           "MAX_ASSOCIATED_BYTES", "MAX_ASSOCIATED_PIXELS", "max_tile_bytes", "missing_guarantees",
           "check_image_header"]
