"""The per-tile fidelity map of a format-4 container: what each tile is, and how close.

A codec that chooses per tile (glass, the learned network, JPEG-XL, ...) names the kinds
it may store in ``ContainerMetadata.tile_kinds`` and hands the writer one
:class:`TileRecord` per tile (:meth:`wsicodec.writer.ContainerWriter.write_row`).  The
container keeps, per level, three (rows, cols) arrays beside the tiles' CRC32s and
digests, each in one uncompressed chunk::

    levels/<i>/kind      uint8    index into tile_kinds
    levels/<i>/psnr      float32  the decoded tile's PSNR in dB against the source pixels
                                  (RGB, peak 255, over the tile's pixels inside the level,
                                  as readers show them); +inf: the tile decodes exactly
    levels/<i>/nbytes    uint32   the tile's stored bytes

The level digest (:func:`wsicodec.integrity.level_digest`) covers them, so an edited PSNR
or kind fails like an edited tile digest.  :class:`TileRecords` is one level's map as
read back (:meth:`wsicodec.container.Container.tile_records`); :func:`summarize` condenses
a container's maps into what ``wsicodec info`` prints.

JSON (``summarize``, :meth:`TileRecords.to_json`): a PSNR is a number of dB, or ``null``
where it is infinite (the tile, or every tile at that rank, decodes exactly); no JSON
here ever holds Infinity or NaN.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from wsicodec.classical import BARE_SIGNATURES, CODESTREAM_SIGNATURES
from wsicodec.jpegrecover import KIND as KIND_RECOVERED
from wsicodec.scannertiles import CARRIED_SIGNATURES, KIND_JPEG, KIND_JPEG2000, is_carried
from wsicodec.errors import CorruptDataError, InvalidSettingError
from wsicodec.store import plain_array

#: the arrays of a level's map: (name, dtype, bytes per tile)
RECORD_ARRAYS = (("kind", np.uint8, 1), ("psnr", np.float32, 4), ("nbytes", np.uint32, 4))
#: the largest finite PSNR a record may hold (an 8-bit tile one level off in one sample
#: of 65536² pixels is ~144 dB); larger finite values would be indistinguishable from
#: "exact" in float32
MAX_PSNR = 1000.0
#: the kinds whose tiles are bare classical codestreams, and the signatures those start with
BARE_KIND_SIGNATURES = {**CODESTREAM_SIGNATURES, "jpegxl-lossless": CODESTREAM_SIGNATURES["jpegxl"],
                        KIND_JPEG: CARRIED_SIGNATURES, KIND_RECOVERED: CARRIED_SIGNATURES,
                        KIND_JPEG2000: CODESTREAM_SIGNATURES["jpeg2000"]}
#: the kinds whose tiles are carried JPEGs (:func:`wsicodec.scannertiles.is_carried`)
CARRIED_KINDS = (KIND_JPEG, KIND_RECOVERED)


@dataclass(frozen=True)
class TileRecord:
    """What the writer records of one tile: its ``kind`` (one of the container's
    ``tile_kinds``) and ``psnr``, the decoded tile's PSNR in dB (RGB, peak 255, over
    the tile's pixels inside the level, as readers show them) against the source pixels;
    ``math.inf`` when the tile decodes exactly."""

    kind: str
    psnr: float


def _check_psnr(value: Any) -> float:
    """``value`` as a float if it is a PSNR a record may hold (a real number, not a
    bool, in 0..MAX_PSNR or +inf); else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"psnr must be a number of dB, got {value!r}")
    v = float(value)
    if not (v == math.inf or 0.0 <= v <= MAX_PSNR):
        raise ValueError(f"psnr must be in 0..{MAX_PSNR:g} dB or inf (exact), got {v!r}")
    return v


def check_writer_kinds(kinds: tuple[str, ...]) -> None:
    """Raises InvalidSettingError unless ``kinds`` is empty or valid ``tile_kinds``
    (:func:`wsicodec.metadata.check_tile_kinds`)."""
    from wsicodec.metadata import check_tile_kinds

    if kinds:
        try:
            check_tile_kinds(kinds)
        except ValueError as e:
            raise InvalidSettingError(str(e)) from None


def record_row(records: Sequence[TileRecord] | None, kinds: tuple[str, ...], cols: int,
               where: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A row's records as (kind uint8, psnr float32) arrays of length ``cols``, checked:
    one :class:`TileRecord` per tile, each kind among ``kinds``, each psnr a number in
    0..MAX_PSNR or inf (never NaN); (None, None) when ``kinds`` is empty and there are
    no records.  Raises InvalidSettingError naming ``where``."""
    if not kinds:
        if records is not None:
            raise InvalidSettingError(f"{where}: tile records given, but the container's "
                                      "metadata names no tile_kinds")
        return None, None
    if records is None or isinstance(records, (str, bytes)) or len(records) != cols:
        n = "none" if records is None else len(records)
        raise InvalidSettingError(f"{where}: {cols} tile records needed (the container "
                                  f"records tile kinds {', '.join(kinds)}), got {n}")
    kind = np.zeros(cols, np.uint8)
    psnr = np.zeros(cols, np.float32)
    for col, rec in enumerate(records):
        if not isinstance(rec, TileRecord):
            raise InvalidSettingError(f"{where} col {col}: not a TileRecord: {rec!r}")
        if rec.kind not in kinds:
            raise InvalidSettingError(f"{where} col {col}: tile kind {rec.kind!r} is not one "
                                      f"of {', '.join(kinds)}")
        try:
            psnr[col] = _check_psnr(rec.psnr)
        except ValueError as e:
            raise InvalidSettingError(f"{where} col {col}: {e}") from None
        kind[col] = kinds.index(rec.kind)
    return kind, psnr


def journal_entry(kind: np.ndarray, psnr: np.ndarray) -> dict[str, list]:
    """A row's records as the writer's journal keeps them (JSON: psnr null for inf)."""
    return {"kind": [int(k) for k in kind],
            "psnr": [None if math.isinf(p) else float(p) for p in psnr.tolist()]}


def from_journal(entry: Any, kinds: tuple[str, ...], cols: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`journal_entry`, checked as :func:`record_row` checks a
    row.  Raises ValueError for anything else (a torn or edited line)."""
    k, p = entry["kind"], entry["psnr"]
    if not isinstance(k, list) or not isinstance(p, list) or len(k) != cols or len(p) != cols:
        raise ValueError("journalled records do not fit the row")
    if not all(type(i) is int and 0 <= i < len(kinds) for i in k):
        raise ValueError("journalled tile kind out of range")
    psnr = np.array([math.inf if v is None else _check_psnr(v) for v in p], np.float32)
    return np.array(k, np.uint8), psnr


def record_files(level: int, tiles: int) -> list[tuple[str, int]]:
    """The store files of a level's map, each with the most bytes it may hold."""
    out = []
    for name, _, size in RECORD_ARRAYS:
        out += [(f"levels/{level}/{name}/zarr.json", 1 << 16),
                (f"levels/{level}/{name}/c/0/0", size * tiles)]
    return out


def write_arrays(group: Any, level: int, kind: np.ndarray, psnr: np.ndarray,
                 nbytes: np.ndarray) -> None:
    """Store a level's map in a zarr group (one uncompressed chunk per array)."""
    for (name, dtype, _), values in zip(RECORD_ARRAYS, (kind, psnr, nbytes)):
        arr = group.create_array(f"levels/{level}/{name}", shape=values.shape,
                                 chunks=values.shape, dtype=np.dtype(dtype).name, fill_value=0,
                                 compressors=None, overwrite=True)
        arr[:] = values.astype(dtype)


def read_arrays(group: Any, level: int, shape: tuple[int, int]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A level's (kind, psnr, nbytes) arrays as stored, each checked to be the one
    uncompressed (rows, cols) chunk the writer makes before zarr reads it (the caller
    checked the files' sizes).  Raises CorruptDataError; zarr's errors pass through."""
    return tuple(np.asarray(plain_array(group, f"levels/{level}/{name}", shape, dtype)[...],
                            dtype) for name, dtype, _ in RECORD_ARRAYS)  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class TileRecords:
    """One level's fidelity map as read back: ``kind`` (rows, cols) uint8 indices into
    ``kind_names``, ``psnr`` (rows, cols) float32 dB (+inf: exact), ``nbytes`` (rows,
    cols) uint32 stored bytes per tile.  Read-only arrays; :meth:`checked` builds one."""

    level: int
    kind_names: tuple[str, ...]
    kind: np.ndarray
    psnr: np.ndarray
    nbytes: np.ndarray

    @classmethod
    def checked(cls, level: int, kind_names: tuple[str, ...],
                arrays: tuple[np.ndarray, np.ndarray, np.ndarray], max_tile_bytes: int,
                level_bytes: int | None, where: str) -> "TileRecords":
        """The map of ``level`` from its stored arrays, after checking what a writer
        always writes: kinds < len(kind_names), PSNRs in 0..MAX_PSNR or +inf, each
        tile's size in 1..max_tile_bytes, their sum ``level_bytes`` (when recorded).
        Raises CorruptDataError naming ``where`` and the level."""
        kind, psnr, nbytes = arrays
        bad = None
        if kind.size and int(kind.max()) >= len(kind_names):
            bad = f"a tile kind index {int(kind.max())} beyond the {len(kind_names)} kinds named"
        elif not np.all((psnr == np.inf) | ((psnr >= 0) & (psnr <= MAX_PSNR))):
            bad = "a PSNR that is NaN, negative or out of range"
        elif nbytes.size and (int(nbytes.min()) < 1 or int(nbytes.max()) > max_tile_bytes):
            bad = f"a tile size outside 1..{max_tile_bytes} bytes"
        elif level_bytes is not None and int(nbytes.sum(dtype=np.uint64)) != level_bytes:
            bad = (f"tile sizes summing to {int(nbytes.sum(dtype=np.uint64))} bytes, not the "
                   f"{level_bytes} the metadata records")
        if bad:
            raise CorruptDataError(f"{where}: level {level}'s fidelity map holds {bad}")
        for a in arrays:
            a.flags.writeable = False
        return cls(level, kind_names, kind, psnr, nbytes)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols)."""
        return self.kind.shape  # type: ignore[return-value]

    def record(self, col: int, row: int) -> TileRecord:
        """The record of tile (col, row).  Raises IndexError outside the level."""
        if not (0 <= row < self.shape[0] and 0 <= col < self.shape[1]):
            raise IndexError(f"tile ({col}, {row}) outside the {self.shape[1]}x"
                             f"{self.shape[0]} tiles of level {self.level}")
        return TileRecord(self.kind_names[int(self.kind[row, col])], float(self.psnr[row, col]))

    def stream_mismatch(self, col: int, row: int, data: bytes, mixed: bool) -> str | None:
        """Why ``data`` cannot be the tile recorded at (col, row), or None.  A tile of a bare
        kind (:data:`BARE_KIND_SIGNATURES`) starts with its codec's signature; in a mixed
        grid (``mixed``: the codec stores bare codestreams beside tiles of its own format,
        as ``auto`` does) a tile of any other kind starts with none of them."""
        kind = self.kind_names[int(self.kind[row, col])]
        signatures = BARE_KIND_SIGNATURES.get(kind)
        if signatures is not None and not data.startswith(signatures):
            return f"is not a {kind} codestream, as its fidelity record says"
        if signatures is not None and is_carried(data) != (kind in CARRIED_KINDS):
            return (f"carries a JPEG where its fidelity record says {kind}" if is_carried(data)
                    else f"carries no JPEG, as its fidelity record ({kind}) says")
        if signatures is None and mixed and data.startswith(BARE_SIGNATURES):
            return f"is a bare codestream where its fidelity record says {kind}"
        return None

    def lossless(self) -> np.ndarray:
        """(rows, cols) bool: tiles that decode exactly (psnr inf) or whose kind's name
        says "lossless"."""
        named = np.array(["lossless" in k for k in self.kind_names], bool)
        return np.isinf(self.psnr) | named[self.kind]

    def to_json(self, tile_size: int) -> dict[str, Any]:
        """The map as JSON (what the server's fidelity endpoint answers): level, cols,
        rows, tile_size, kinds (names), and per tile, as lists of rows: kind (index
        into kinds), psnr (dB to 2 decimals; null: exact), nbytes."""
        rows, cols = self.shape
        return {"level": self.level, "cols": cols, "rows": rows, "tile_size": tile_size,
                "kinds": list(self.kind_names),
                "kind": self.kind.tolist(),
                "psnr": [[None if math.isinf(p) else round(p, 2) for p in r]
                         for r in self.psnr.tolist()],
                "nbytes": self.nbytes.tolist()}


def _db(v: float) -> float | None:
    return None if math.isinf(v) else round(float(v), 3)


def _rank(sorted_psnr: np.ndarray, share: float) -> float | None:
    """Nearest-rank percentile: the value of the tile at rank ceil(share * n) (no
    interpolation: an actual tile's PSNR; at least ``share`` of tiles are at or below it)."""
    n = len(sorted_psnr)
    return _db(sorted_psnr[max(math.ceil(share * n), 1) - 1])


def _stats(maps: Sequence[TileRecords], kind_names: tuple[str, ...]) -> dict[str, Any]:
    psnr = np.sort(np.concatenate([m.psnr.ravel() for m in maps]).astype(np.float64))
    kind = np.concatenate([m.kind.ravel() for m in maps])
    nbytes = np.concatenate([m.nbytes.ravel() for m in maps]).astype(np.int64)
    tiles, total = len(kind), int(nbytes.sum())
    kinds = {}
    for i, name in enumerate(kind_names):
        sel = kind == i
        n, b = int(sel.sum()), int(nbytes[sel].sum())
        kinds[name] = {"tiles": n, "bytes": b, "tile_share": round(n / max(tiles, 1), 4),
                       "byte_share": round(b / max(total, 1), 4)}
    return {"tiles": tiles, "bytes": total,
            "psnr_min": _db(psnr[0]), "psnr_p5": _rank(psnr, 0.05),
            "psnr_median": _rank(psnr, 0.5),
            "exact_tiles": int(np.isinf(psnr).sum()),
            "lossless_tiles": int(sum(int(m.lossless().sum()) for m in maps)),
            "kinds": kinds}


def summarize(maps: Sequence[TileRecords]) -> dict[str, Any]:
    """A container's fidelity maps (one per level, in level order, from
    :meth:`~wsicodec.container.Container.tile_records`) condensed, JSON-safe::

        {"kinds": [names],
         "all": STATS, "levels": [{"level": i, **STATS}, ...]}
        STATS = {"tiles", "bytes", "psnr_min", "psnr_p5", "psnr_median",
                 "exact_tiles", "lossless_tiles",
                 "kinds": {name: {"tiles", "bytes", "tile_share", "byte_share"}}}

    PSNRs are dB (3 decimals) or None for +inf (exact); an exact tile ranks above every
    finite PSNR.  ``psnr_p5`` and ``psnr_median`` are nearest-rank percentiles (a real
    tile's value, never interpolated).  ``lossless_tiles``: tiles with psnr inf or a
    kind whose name contains "lossless".  Shares are fractions (0..1, 4 decimals).
    Raises ValueError for no maps or maps with different kind names."""
    if not maps:
        raise ValueError("no fidelity maps to summarize")
    names = maps[0].kind_names
    if any(m.kind_names != names for m in maps):
        raise ValueError("fidelity maps of different tile kinds")
    return {"kinds": list(names), "all": _stats(maps, names),
            "levels": [{"level": m.level, **_stats([m], names)} for m in maps]}


def _fmt_db(v: float | None) -> str:
    return "exact" if v is None else f"{v:.2f} dB"


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """What ``wsicodec info`` prints of a :func:`summarize` result (or of the
    ``{"error": message}`` that :meth:`Container.info` gives for a damaged map)."""
    if "error" in summary:
        return [f"fidelity map: damaged ({summary['error']}); wsicodec verify lists the damage"]
    a = summary["all"]
    named = sum(k["tiles"] for name, k in a["kinds"].items() if "lossless" in name)
    lines = [f"fidelity (per-tile PSNR vs source): min {_fmt_db(a['psnr_min'])}, 5th percentile "
             f"{_fmt_db(a['psnr_p5'])}, median {_fmt_db(a['psnr_median'])}; "
             f"{a['exact_tiles']} of {a['tiles']} tiles decode exactly; {named} of {a['tiles']} "
             "needed a lossless codec"]
    lines.append("tile kinds: " + ", ".join(
        f"{name} {k['tile_share']:.1%} of tiles / {k['byte_share']:.1%} of bytes"
        for name, k in a["kinds"].items()))
    for lv in summary["levels"]:
        lines.append(f"  level {lv['level']}: min {_fmt_db(lv['psnr_min'])}, 5th percentile "
                     f"{_fmt_db(lv['psnr_p5'])}, median {_fmt_db(lv['psnr_median'])}, "
                     f"{lv['exact_tiles']} exact")
    return lines


def container_summary(container: Any) -> dict[str, Any] | None:
    """:func:`summarize` of every level of ``container``; None without a map;
    ``{"error": message}`` when a level's arrays are damaged (reading them raised
    CorruptDataError), so that ``info`` still describes a damaged container."""
    if not container.metadata.has_tile_records:
        return None
    try:
        return summarize([container.tile_records(lv) for lv in range(container.level_count)])
    except CorruptDataError as e:
        return {"error": " ".join(str(e).split())}


def level_json(container: Any, level: int) -> dict[str, Any] | None:
    """A container level's fidelity map as JSON (what the server's
    ``/slides/NAME/fidelity/LEVEL.json`` answers): :meth:`TileRecords.to_json` plus the
    level's width, height and downsample; None for a container without a map.

    Raises RegionOutOfBoundsError for a level outside the pyramid, CorruptDataError for
    a damaged map."""
    records = container.tile_records(level)
    if records is None:
        return None
    lv = container.metadata.levels[level]
    return {**records.to_json(container.tile_size), "width": lv.width, "height": lv.height,
            "downsample": lv.downsample}


def viewer_index(container: Any, url_prefix: str) -> dict[str, Any] | None:
    """What the viewer needs to pick a level's map: None without a map, else the kind
    names, each level's downsample and the URL of each level's map
    (``url_prefix`` + ``<level>.json``)."""
    meta = container.metadata
    if not meta.has_tile_records:
        return None
    return {"kinds": list(meta.tile_kinds), "tile_size": meta.tile_size,
            "levels": [{"downsample": lv.downsample, "url": f"{url_prefix}{i}.json"}
                       for i, lv in enumerate(meta.levels)]}


__all__ = ["TileRecord", "TileRecords", "RECORD_ARRAYS", "MAX_PSNR", "summarize",
           "summary_lines", "container_summary", "level_json", "viewer_index", "record_row"]
