"""A directory container as the fuzzing harness edits it, below zarr: its files by category
(:func:`container_files`), a tile's chunk file (:func:`tile_path`, :func:`read_tile`,
:func:`write_tile`), a level's grid and CRC / digest entries (:class:`Checks`), random byte
edits (:func:`bytes_mutation`), and :func:`forge`: every CRC and digest recomputed after an
edit, as a tamperer would.
"""

from __future__ import annotations

import json
import random
import struct
import zlib
from pathlib import Path

import numpy as np


def container_files(root: Path) -> dict[str, list[Path]]:
    """A directory container's files by category."""
    cats: dict[str, list[Path]] = {k: [] for k in ("root_json", "array_json", "tile", "crc",
                                                   "digest", "records", "associated")}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        if rel == "zarr.json":
            cats["root_json"].append(p)
        elif rel.endswith("zarr.json"):
            cats["array_json"].append(p)
        elif "/tiles/c/" in rel:
            cats["tile"].append(p)
        elif "/crc32/c/" in rel:
            cats["crc"].append(p)
        elif "/digest/c/" in rel:
            cats["digest"].append(p)
        elif any(f"/{a}/c/" in rel for a in ("kind", "psnr", "nbytes")):   # format 4's map
            cats["records"].append(p)
        elif rel.startswith("associated/"):
            cats["associated"].append(p)
    return cats


def bytes_mutation(rng: random.Random, data: bytes, how: str) -> bytes:
    b = bytearray(data)
    if how == "bitflip":
        for _ in range(rng.choice((1, 1, 2, 8))):
            if b:
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
    elif how == "overwrite":
        if b:
            i = rng.randrange(len(b))
            n = rng.choice((1, 2, 4, 8, 16))
            fill = rng.choice(("random", "zero", "ff"))
            for k in range(i, min(len(b), i + n)):
                b[k] = rng.randrange(256) if fill == "random" else (0 if fill == "zero" else 255)
    elif how == "truncate":
        b = b[:rng.randrange(len(b))] if b else b
    elif how == "extend":
        n = rng.choice((1, 7, 100, 4096))
        b += bytes(rng.randrange(256) for _ in range(n)) if rng.random() < 0.5 else bytes(n)
    return bytes(b)


# -- tiles as stored: a vlen-bytes chunk is <u4 count=1, <u4 length, bytes
def tile_path(work: Path, level: int, col: int, row: int) -> Path:
    return work / "levels" / str(level) / "tiles" / "c" / str(row) / str(col)


def read_tile(p: Path) -> bytes:
    return p.read_bytes()[8:]


def write_tile(p: Path, data: bytes) -> None:
    p.write_bytes(struct.pack("<II", 1, len(data)) + data)


def level_grid(work: Path, level: int) -> tuple[int, int]:
    """(rows, cols) of a level, from its tiles' zarr.json."""
    meta = json.loads((work / "levels" / str(level) / "tiles" / "zarr.json").read_text())
    return tuple(meta["shape"])  # type: ignore[return-value]


def level_count(work: Path) -> int:
    return len(json.loads((work / "zarr.json").read_text())["attributes"]["wsicodec"]["levels"])


def random_tile(rng: random.Random, work: Path, level: int | None = None) -> tuple[int, int, int]:
    level = rng.randrange(level_count(work)) if level is None else level
    rows, cols = level_grid(work, level)
    return level, rng.randrange(cols), rng.randrange(rows)


class Checks:
    """A level's crc32 and digest arrays as raw chunk bytes (uint32 / 16 bytes per tile,
    row-major, no compressor), to move entries as a tamperer would."""

    def __init__(self, work: Path, level: int) -> None:
        self.work, self.level = work, level
        self.rows, self.cols = level_grid(work, level)
        self.crc_p = work / "levels" / str(level) / "crc32" / "c" / "0" / "0"
        self.dig_p = work / "levels" / str(level) / "digest" / "c" / "0" / "0" / "0"
        self.crc = bytearray(self.crc_p.read_bytes())
        self.dig = bytearray(self.dig_p.read_bytes())

    def get(self, col: int, row: int) -> tuple[bytes, bytes]:
        i = row * self.cols + col
        return bytes(self.crc[4 * i:4 * i + 4]), bytes(self.dig[16 * i:16 * i + 16])

    def put(self, col: int, row: int, entry: tuple[bytes, bytes]) -> None:
        i = row * self.cols + col
        self.crc[4 * i:4 * i + 4], self.dig[16 * i:16 * i + 16] = entry

    def save(self) -> None:
        self.crc_p.write_bytes(bytes(self.crc))
        self.dig_p.write_bytes(bytes(self.dig))


def forge(work: Path) -> None:
    """Recompute every CRC and digest of a directory container after a mutation, as
    someone who edits a container on purpose would (``tests/conftest.forge_digests``,
    but reading the stored chunks directly, so it also forges a container whose arrays
    zarr could no longer open; what it cannot parse it leaves alone).  In format 4 the
    fidelity map's ``nbytes`` and the level's ``level_bytes`` follow the tiles, and the
    level digest covers the map as stored."""
    from wsicodec.integrity import blob_digest, level_digest, metadata_digest, tile_digest

    doc_path = work / "zarr.json"
    try:
        doc = json.loads(doc_path.read_text())
        attrs = doc["attributes"]["wsicodec"]
        cid = attrs["container_id"]
        bytes.fromhex(cid)
    except Exception:  # noqa: BLE001 - nothing to forge with
        return
    levels = attrs.get("levels") if isinstance(attrs.get("levels"), list) else []
    for level, entry in enumerate(levels):
        try:
            rows, cols = level_grid(work, level)
            crc = np.zeros((rows, cols), np.uint32)
            digest = np.zeros((rows, cols, 16), np.uint8)
            for row in range(rows):
                for col in range(cols):
                    p = tile_path(work, level, col, row)
                    data = read_tile(p) if p.is_file() else b""
                    crc[row, col] = zlib.crc32(data)
                    digest[row, col] = np.frombuffer(tile_digest(cid, level, col, row, data), np.uint8)
            crc_p = work / "levels" / str(level) / "crc32" / "c" / "0" / "0"
            dig_p = work / "levels" / str(level) / "digest" / "c" / "0" / "0" / "0"
            if crc_p.is_file():
                crc_p.write_bytes(crc.astype("<u4").tobytes())
            if dig_p.is_file():
                dig_p.write_bytes(digest.tobytes())
            records = _forge_records(work, attrs, level, rows, cols) if "tile_kinds" in attrs else None
            if isinstance(entry, dict):
                entry["tiles_digest"] = level_digest(cid, level, digest, records)
        except Exception:  # noqa: BLE001 - a level the mutation made unparsable
            continue
    names = attrs.get("associated_images")
    if isinstance(names, list) and isinstance(attrs.get("associated_digests"), dict):
        for name in names:
            p = work / "associated" / str(name) / "c" / "0"
            if isinstance(name, str) and p.is_file():
                attrs["associated_digests"][name] = blob_digest(cid, name, p.read_bytes())
    attrs["metadata_digest"] = metadata_digest(attrs)
    doc_path.write_text(json.dumps(doc, allow_nan=True))


def _forge_records(work: Path, attrs: dict, level: int, rows: int,
                   cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A format-4 level's (kind, psnr, nbytes) for :func:`forge`: kind and psnr as stored,
    nbytes (and ``level_bytes``) set to the tiles' sizes now."""
    base = work / "levels" / str(level)
    kind = np.frombuffer((base / "kind/c/0/0").read_bytes(), "u1").reshape(rows, cols)
    psnr = np.frombuffer((base / "psnr/c/0/0").read_bytes(), "<f4").reshape(rows, cols)
    nbytes = np.zeros((rows, cols), "<u4")
    for row in range(rows):
        for col in range(cols):
            p = tile_path(work, level, col, row)
            nbytes[row, col] = len(read_tile(p)) if p.is_file() else 0
    (base / "nbytes/c/0/0").write_bytes(nbytes.tobytes())
    if isinstance(attrs.get("level_bytes"), list) and level < len(attrs["level_bytes"]):
        attrs["level_bytes"][level] = int(nbytes.sum())
    return kind, psnr, nbytes
