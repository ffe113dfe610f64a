"""Seeded fuzzing of wsicodec containers: the harness shared by ``tests/test_fuzz.py``
(a few hundred cases, in the test suite) and ``bench/fuzz.py`` (a longer run that writes
``bench/results/fuzz.json``).

A *case* is ``{"id", "codec", "kind", "seed"}``: one mutation of one small container made
here (:func:`make_bases`), reproducible from those fields alone (:func:`run_one`).  Cases run
in worker processes, one per codec (``python bench/fuzzlib.py worker ...``): each worker
decodes its unmutated containers once for the reference, then, per case, copies a base
container, applies the mutation and reads the copy the ways a user would::

    open_container + verify(decode=True) ─ open_slide + read_region of every level's full
    extent + every associated image ─ decompress to a TIFF, read back

Each case ends in one outcome:

* ``error``: every read that failed raised a WsiCodecError (a clean, one-line error), or
  ``verify`` reported the damage; whatever read succeeded gave the reference pixels;
* ``no_effect``: everything read succeeded with the reference pixels (a bit in a padding
  field, an edit of an unused JSON key, ...);
* ``undetectable``: the mutation is in the class no reader can catch without a
  signature (:data:`UNDETECTABLE_KINDS`: a forged, *valid* stream of the right size, or
  forged metadata that is valid), and it read as other pixels; excluded from the failures;
* failures: ``traceback`` (an exception outside the WsiCodecError tree), ``hang`` (over the
  per-case time limit, or a worker that stopped answering), ``crash`` (the worker died),
  ``memory`` (peak RSS of the case over the cap, or an allocation refused under the
  address-space cap), ``wrong_pixels`` (a read without error whose pixels differ from
  the reference), ``multiline`` (a WsiCodecError whose message is not one line);
  ``harness_error``: a mutation that could not be applied (a bug here, never hidden).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HE_TEST_PNG = REPO.parent / "shared" / "data" / "he" / "test" / "TCGA-2Z-A9J9-01A-01-TS1.png"
TILE = 64
#: level-0 size of each codec's base container (width, height): the learned one is smaller,
#: each of its cases decodes the whole pyramid three times through torch
SIZES = {"jpegxl": (300, 219), "learned": (192, 160)}
CODECS = tuple(SIZES)
#: per-case wall-clock limit (SIGALRM in the worker), and the worker's silence before the
#: parent kills it
CASE_TIMEOUT_S = 30
WATCHDOG_S = 90
#: the most a case may add to the worker's peak resident memory
MEMORY_CAP_BYTES = 1 << 30
#: address space a worker may add after its warm-up (RLIMIT_AS): a backstop, so that a
#: runaway allocation fails at once instead of taking the machine's memory
ADDRESS_SPACE_HEADROOM = 3 << 30

FAILURES = ("traceback", "hang", "crash", "memory", "wrong_pixels", "multiline", "harness_error")
OUTCOMES = ("error", "no_effect", "undetectable") + FAILURES


# ---------------------------------------------------------------- the base containers
def base_image(codec: str, other: bool = False) -> np.ndarray:
    """The (h, w, 3) image a base container is made of: a crop of an he/test image when
    the shared data is there (a synthetic one otherwise), with one glass (uniform) tile so
    the learned codec writes a glass tile (kind 3, a plane; kind 1 in older releases).  ``other``: another crop, for splicing."""
    w, h = SIZES[codec]
    if HE_TEST_PNG.exists():
        from PIL import Image

        img = np.asarray(Image.open(HE_TEST_PNG).convert("RGB"))
        y0, x0 = (500, 400) if other else (0, 0)
        crop = np.ascontiguousarray(img[y0:y0 + h, x0:x0 + w])
    else:
        rng = np.random.default_rng(2 if other else 1)
        y, x = np.mgrid[0:h, 0:w]
        crop = np.stack([(x * 3 + y) % 256, (y * 2) % 256, (x ^ y) % 256], -1)
        crop = np.clip(crop + rng.integers(0, 40, crop.shape), 0, 255).astype(np.uint8)
    crop[:TILE, 2 * TILE:3 * TILE] = (240, 238, 245)     # a glass tile at level 0 (2, 0)
    return crop


def make_bases(folder: Path, codecs: tuple[str, ...] = CODECS,
               fidelity: bool = False) -> dict[str, Path]:
    """Write, per codec, ``<codec>.zarr``, the same as ``<codec>.zarr.zip`` and another
    container of another crop (``<codec>-other.zarr``, for splicing), each with a PNG
    label and a JPEG-XL thumbnail.  ``fidelity``: each written again as a format-4
    container with a fidelity map (:func:`with_fidelity_map`).  Returns {name: path}."""
    from wsicodec.codecs import get_codec
    from wsicodec.pipeline import compress_source
    from wsicodec.tiling import ArraySource
    from wsicodec.writer import zip_directory

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for codec in codecs:
        c = get_codec(codec)
        for name, other in ((codec, False), (f"{codec}-other", True)):
            img = base_image(codec, other)
            src = ArraySource(img, mpp=(0.25, 0.25), properties={"x.key": "v"},
                              associated={"label": img[:20, :30], "thumbnail": img[::4, ::4]})
            path = folder / f"{name}.zarr"
            compress_source(src, path, c, tile_size=TILE, workers=1)
            if fidelity:
                with_fidelity_map(path, img)
            out[name] = path
        zpath = folder / f"{codec}.zarr.zip"
        zip_directory(folder / f"{codec}.zarr", zpath)
        out[f"{codec}-zip"] = zpath
    return out


def with_fidelity_map(path: Path, image: np.ndarray) -> None:
    """Write the container at ``path`` again, the same tiles, as format 4 with a fidelity
    map: kinds ("glass", <codec>), the uniform tile of :func:`base_image` glass; PSNRs
    measured against ``image`` at level 0, made up (35 + (col + row) % 7 dB) above it;
    the associated images coded again from their decoded pixels."""
    from dataclasses import replace

    from wsicodec.container import open_container
    from wsicodec.fidelity import TileRecord
    from wsicodec.writer import ContainerWriter

    tmp = path.with_name(path.name + ".fid")
    with open_container(path) as c:
        meta = c.metadata
        kinds = ("glass", meta.codec["name"])
        with ContainerWriter(tmp, replace(meta, tile_kinds=kinds)) as w:
            for level in range(c.level_count):
                g = c.grid(level)
                for row in range(g.rows):
                    tiles, recs = [], []
                    for col in range(g.cols):
                        tiles.append(c.read_encoded_tile(level, col, row))
                        if level == 0:
                            r = g.tile_rect(col, row)
                            x, y, tw, th = r.x, r.y, r.width, r.height
                            shown = c.read_tile(0, col, row)[:th, :tw].astype(float)
                            mse = np.mean((shown - image[y:y + th, x:x + tw]) ** 2)
                            db = float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
                        else:
                            db = 35.0 + (col + row) % 7
                        glass = (level, col, row) == (0, 2, 0)
                        recs.append(TileRecord(kinds[0] if glass else kinds[1], db))
                    w.write_row(level, row, tiles, recs)
            for name in c.associated_image_names():
                w.write_associated(name, c.read_associated_image(name),
                                   meta.associated_formats.get(name, "png"))
            w.commit()
    shutil.rmtree(path)
    tmp.rename(path)


# ---------------------------------------------------------------- case generation
def cases(n: int, seed: int, learned_share: float = 0.3,
          codecs: tuple[str, ...] = CODECS) -> list[dict[str, Any]]:
    """``n`` cases from ``seed``: each codec gets its share, and within a codec the kinds
    go round in a seeded order, so every kind is drawn about equally often."""
    rng = random.Random(seed)
    shares = {"learned": learned_share, "jpegxl": 1.0 - learned_share}
    counts = {c: int(round(n * shares[c])) for c in codecs}
    counts[codecs[0]] += n - sum(counts.values())
    out = []
    for codec in codecs:
        kinds = [k for k, (codecs_ok, _) in KINDS.items() if codec in codecs_ok]
        rng.shuffle(kinds)
        for i in range(counts[codec]):
            out.append({"codec": codec, "kind": kinds[i % len(kinds)], "seed": rng.getrandbits(32)})
    for i, c in enumerate(out):
        c["id"] = i
    return out


# ---------------------------------------------------------------- mutations
# Each takes (rng, work, ctx): ``work`` the copied container (a directory or a zip),
# ``ctx`` {"bases": {name: path}, "codec": codec}; it changes ``work`` in place and returns
# a short description.

def _files(root: Path) -> dict[str, list[Path]]:
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


def _pick_file(rng: random.Random, work: Path) -> Path:
    cats = {k: v for k, v in _files(work).items() if v}
    return rng.choice(cats[rng.choice(sorted(cats))])


def _bytes_mutation(rng: random.Random, data: bytes, how: str) -> bytes:
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


def _file_bytes(how: str) -> Callable:
    def mutate(rng: random.Random, work: Path, ctx: dict) -> str:
        p = _pick_file(rng, work)
        p.write_bytes(_bytes_mutation(rng, p.read_bytes(), how))
        return f"{how} {p.relative_to(work).as_posix()}"
    return mutate


def _zip_bytes(how: str) -> Callable:
    def mutate(rng: random.Random, work: Path, ctx: dict) -> str:
        data = work.read_bytes()
        if how == "truncate" and rng.random() < 0.5:    # near the end: the central directory
            cut = len(data) - rng.randrange(1, min(len(data), 400))
            work.write_bytes(data[:cut])
            return f"truncate zip to {cut} of {len(data)}"
        work.write_bytes(_bytes_mutation(rng, data, how))
        return f"{how} zip bytes"
    return mutate


# -- tiles as stored: a vlen-bytes chunk is <u4 count=1, <u4 length, bytes
def _tile_path(work: Path, level: int, col: int, row: int) -> Path:
    return work / "levels" / str(level) / "tiles" / "c" / str(row) / str(col)


def _read_tile(p: Path) -> bytes:
    return p.read_bytes()[8:]


def _write_tile(p: Path, data: bytes) -> None:
    p.write_bytes(struct.pack("<II", 1, len(data)) + data)


def _grid(work: Path, level: int) -> tuple[int, int]:
    """(rows, cols) of a level, from its tiles' zarr.json."""
    meta = json.loads((work / "levels" / str(level) / "tiles" / "zarr.json").read_text())
    return tuple(meta["shape"])  # type: ignore[return-value]


def _levels(work: Path) -> int:
    return len(json.loads((work / "zarr.json").read_text())["attributes"]["wsicodec"]["levels"])


def _random_tile(rng: random.Random, work: Path, level: int | None = None) -> tuple[int, int, int]:
    level = rng.randrange(_levels(work)) if level is None else level
    rows, cols = _grid(work, level)
    return level, rng.randrange(cols), rng.randrange(rows)


class _Checks:
    """A level's crc32 and digest arrays as raw chunk bytes (uint32 / 16 bytes per tile,
    row-major, no compressor), to move entries as a tamperer would."""

    def __init__(self, work: Path, level: int) -> None:
        self.work, self.level = work, level
        self.rows, self.cols = _grid(work, level)
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


def _swap_tiles(with_checks: bool) -> Callable:
    def mutate(rng: random.Random, work: Path, ctx: dict) -> str:
        level = rng.randrange(_levels(work))
        rows, cols = _grid(work, level)
        if rows * cols < 2:
            level = 0
            rows, cols = _grid(work, level)
        a, b = rng.sample(range(rows * cols), 2)
        (ra, ca), (rb, cb) = divmod(a, cols), divmod(b, cols)
        pa, pb = _tile_path(work, level, ca, ra), _tile_path(work, level, cb, rb)
        da, db = pa.read_bytes(), pb.read_bytes()
        pa.write_bytes(db)
        pb.write_bytes(da)
        if with_checks:
            ch = _Checks(work, level)
            ea, eb = ch.get(ca, ra), ch.get(cb, rb)
            ch.put(ca, ra, eb)
            ch.put(cb, rb, ea)
            ch.save()
        return f"swap level {level} tiles ({ca},{ra}) <-> ({cb},{rb})" + (
            " with their crc/digest" if with_checks else "")
    return mutate


def tile_splice(rng: random.Random, work: Path, ctx: dict) -> str:
    """A tile of another container of the same codec, at the same place, with its CRC and
    digest entries: the digest, bound to the other container's id, must fail."""
    other = ctx["bases"][f"{ctx['codec']}-other"]
    level, col, row = _random_tile(rng, work, 0)
    shutil.copyfile(_tile_path(other, level, col, row), _tile_path(work, level, col, row))
    mine, theirs = _Checks(work, level), _Checks(other, level)
    mine.put(col, row, theirs.get(col, row))
    mine.save()
    return f"splice level 0 tile ({col},{row}) from another container, with crc/digest"


def tile_splice_forged(rng: random.Random, work: Path, ctx: dict) -> str:
    """As :func:`tile_splice`, digests forged: a valid stream of the right size with other
    pixels, which no check can tell from the original (undetectable by design)."""
    desc = tile_splice(rng, work, ctx)
    forge(work)
    return desc + ", digests forged"


def cross_codec_forged(rng: random.Random, work: Path, ctx: dict) -> str:
    """A tile of the other codec's container at the same place, digests forged."""
    other_codec = "learned" if ctx["codec"] == "jpegxl" else "jpegxl"
    other = ctx["bases"][other_codec]
    (r1, c1), (r2, c2) = _grid(work, 0), _grid(other, 0)
    level, col, row = 0, rng.randrange(min(c1, c2)), rng.randrange(min(r1, r2))
    shutil.copyfile(_tile_path(other, level, col, row), _tile_path(work, level, col, row))
    forge(work)
    return f"{other_codec} tile at level 0 ({col},{row}), digests forged"


def chunk_delete(rng: random.Random, work: Path, ctx: dict) -> str:
    p = _pick_file(rng, work)
    p.unlink()
    return f"delete {p.relative_to(work).as_posix()}"


def replace_fifo(rng: random.Random, work: Path, ctx: dict) -> str:
    p = _pick_file(rng, work)
    p.unlink()
    os.mkfifo(p)
    return f"fifo at {p.relative_to(work).as_posix()}"


def replace_symlink(rng: random.Random, work: Path, ctx: dict) -> str:
    p = _pick_file(rng, work)
    target = rng.choice(("/dev/zero", "/dev/urandom", "sibling"))
    if target == "sibling":
        sib = [q for q in p.parent.iterdir() if q != p and q.is_file()]
        target = str(sib[0]) if sib else "/dev/zero"
    p.unlink()
    os.symlink(target, p)
    return f"symlink {p.relative_to(work).as_posix()} -> {target}"


_ODD_VALUES: list[Any] = [2 ** 63, -2 ** 63, 2 ** 64 + 1, 2 ** 31, -1, 0, 1, 1e308, -1e308,
                          float("nan"), float("inf"), float("-inf"), 0.5, "x", "", [], {}, None,
                          True, False, [1, 2], [[]], {"a": 1}, "A" * 70000,
                          list(range(2000)), 64, 4096, 1 << 20, 3.0000001]


def _json_paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:40]):
            out += _json_paths(v, prefix + (i,))
    return out


def _json_edit(rng: random.Random, doc: Any, under: tuple = ()) -> tuple[Any, str]:
    """One random edit of a JSON document (preferably under ``under``): a value replaced
    by an odd one (huge, negative, NaN, another type), a number nudged, a key removed,
    a list where an object was.  Returns (doc, description)."""
    paths = [p for p in _json_paths(doc) if p[:len(under)] == under and len(p) > len(under)]
    if not paths or rng.random() < 0.15:
        paths = [p for p in _json_paths(doc) if p]
    path = rng.choice(paths)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key, old = path[-1], parent[path[-1]]
    op = rng.choice(("replace", "replace", "replace", "nudge", "delete", "wrap"))
    if op == "nudge" and type(old) in (int, float):
        new = rng.choice((old + 1, old - 1, old * 2, -old, old * 1000, old + 1e-9))
        parent[key] = new
        what = f"{old!r} -> {new!r}"
    elif op == "delete":
        del parent[key]
        what = "deleted"
    elif op == "wrap":
        parent[key] = [old] if not isinstance(old, list) else {"0": old}
        what = "wrapped"
    else:
        new = rng.choice(_ODD_VALUES)
        parent[key] = new
        what = f"-> {str(new)[:30]}"
    return doc, f"{'/'.join(map(str, path))} {what}"


def _edit_root(rng: random.Random, work: Path) -> str:
    p = work / "zarr.json"
    doc = json.loads(p.read_text())
    doc, what = _json_edit(rng, doc, ("attributes", "wsicodec"))
    p.write_text(json.dumps(doc, allow_nan=True))
    return f"zarr.json {what}"


def json_root_edit(rng: random.Random, work: Path, ctx: dict) -> str:
    return _edit_root(rng, work)


def json_root_edit_forged(rng: random.Random, work: Path, ctx: dict) -> str:
    """An edit of the metadata with its digests forged: the schema's validation is what
    is left to catch it; a valid edit (a property's text, a level's size within its tile
    grid) is metadata a tamperer may write (undetectable by design)."""
    desc = _edit_root(rng, work)
    forge(work)
    return desc + ", digests forged"


def json_array_edit(rng: random.Random, work: Path, ctx: dict) -> str:
    """An edit of an array's or a group's own zarr.json (shape, chunk grid, data type,
    fill value, codecs, ...): outside the metadata digest."""
    p = rng.choice(_files(work)["array_json"])
    doc = json.loads(p.read_text())
    doc, what = _json_edit(rng, doc)
    p.write_text(json.dumps(doc, allow_nan=True))
    return f"{p.relative_to(work).as_posix()} {what}"


def json_array_shape(rng: random.Random, work: Path, ctx: dict) -> str:
    """An array's declared shape (and chunk shape) made huge, small or odd."""
    arrays = [p for p in _files(work)["array_json"]
              if json.loads(p.read_text()).get("node_type") == "array"]
    p = rng.choice(arrays)
    doc = json.loads(p.read_text())
    n = len(doc["shape"])
    size = rng.choice((0, 1, 2 ** 20, 2 ** 31, 2 ** 40, 2 ** 62))
    which = rng.choice(("shape", "chunks", "both"))
    new = [size] * n
    if which in ("shape", "both"):
        doc["shape"] = new
    if which in ("chunks", "both"):
        doc["chunk_grid"]["configuration"]["chunk_shape"] = [max(size, 1)] * n
    p.write_text(json.dumps(doc))
    return f"{p.relative_to(work).as_posix()} {which} -> {size}"


def _jxl(rgb: np.ndarray) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.jpegxl_encode(np.ascontiguousarray(rgb), distance=1.0, effort=3))


def jxl_wrong_size_forged(rng: random.Random, work: Path, ctx: dict) -> str:
    """A valid JPEG-XL tile of another geometry (size, channels), digests forged: the
    decode's geometry check must refuse it."""
    level, col, row = _random_tile(rng, work)
    h, w = rng.choice(((32, 32), (64, 63), (63, 64), (128, 128), (65, 64), (64, 128), (1, 1),
                       (64, 64)))
    channels = rng.choice((1, 3, 4)) if (h, w) != (64, 64) else rng.choice((1, 2, 4))
    img = np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (h, w, channels), np.uint8)
    _write_tile(_tile_path(work, level, col, row), _jxl(img[..., 0] if channels == 1 else img))
    forge(work)
    return f"valid {w}x{h}x{channels} JPEG-XL at level {level} ({col},{row}), digests forged"


def jxl_valid_forged(rng: random.Random, work: Path, ctx: dict) -> str:
    """A valid 64x64 RGB JPEG-XL tile of other content, digests forged: undetectable by
    design (it is a tile as good as the original)."""
    level, col, row = _random_tile(rng, work)
    img = np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (TILE, TILE, 3), np.uint8)
    _write_tile(_tile_path(work, level, col, row), _jxl(img))
    forge(work)
    return f"valid 64x64 JPEG-XL of other content at level {level} ({col},{row}), digests forged"


def _learned_tiles(work: Path, kind: int) -> list[tuple[int, int, int]]:
    out = []
    for level in range(_levels(work)):
        rows, cols = _grid(work, level)
        for row in range(rows):
            for col in range(cols):
                data = _read_tile(_tile_path(work, level, col, row))
                if len(data) > 5 and data[:4] == b"WSLT" and data[5] == kind:
                    out.append((level, col, row))
    return out


#: (offset, struct format, name) of a learned network tile's header fields
_LEARNED_FIELDS = [(4, "B", "version"), (5, "B", "kind"), (6, "<H", "height"), (8, "<H", "width"),
                   (10, "<f", "quality"), (14, "8s", "model"), (22, "<I", "crc"),
                   (26, "<I", "z_len"), (30, "B", "top"), (31, "B", "left"),
                   (32, "<H", "coded_height"), (34, "<H", "coded_width")]


def learned_header_forged(rng: random.Random, work: Path, ctx: dict) -> str:
    """One header field of a network-coded learned tile changed, digests forged: what the
    decoder checks (header consistency, geometry, symbol checksum, model id, the tile
    format and quality the container was written with) must catch it."""
    level, col, row = rng.choice(_learned_tiles(work, 0))
    p = _tile_path(work, level, col, row)
    data = bytearray(_read_tile(p))
    off, fmt, name = rng.choice(_LEARNED_FIELDS)
    (old,) = struct.unpack_from(fmt, data, off)
    if name == "quality":
        bits = struct.unpack_from("<I", data, off)[0]
        new_bits = rng.choice((bits + 1, bits - 1, bits + 16, bits ^ (1 << rng.randrange(32))))
        struct.pack_into("<I", data, off, new_bits & 0xFFFFFFFF)
        new = struct.unpack_from("<f", data, off)[0]
    elif name == "model":
        new = bytes(rng.randrange(256) for _ in range(8))
        struct.pack_into(fmt, data, off, new)
    else:
        lim = {"B": 255, "<H": 65535, "<I": 2 ** 32 - 1}[fmt]
        choices = [old + 1, old - 1, 0, lim, old * 2, rng.randrange(lim + 1)]
        if name == "version":
            choices += [1, 2, 4]
        new = min(max(rng.choice(choices), 0), lim)
        if new == old:
            new = (old + 1) % (lim + 1)
        struct.pack_into(fmt, data, off, new)
    _write_tile(p, bytes(data))
    forge(work)
    return f"learned tile level {level} ({col},{row}) {name} {old!r} -> {new!r}, digests forged"


def learned_stream_forged(rng: random.Random, work: Path, ctx: dict) -> str:
    """Bits of a network tile's z or y stream flipped (or the stream cut or grown), digests
    forged: the symbol checksum must catch it."""
    level, col, row = rng.choice(_learned_tiles(work, 0))
    p = _tile_path(work, level, col, row)
    data = _read_tile(p)
    head = 36
    how = rng.choice(("bitflip", "bitflip", "overwrite", "truncate", "extend"))
    body = _bytes_mutation(rng, data[head:], how)
    _write_tile(p, data[:head] + body)
    forge(work)
    return f"{how} in the stream of learned tile level {level} ({col},{row}), digests forged"


def learned_glass_forged(rng: random.Random, work: Path, ctx: dict) -> str:
    """A glass tile's colour (kind 1) or plane (kind 3), or its outlier list, edited, or
    the tile cut short, digests forged.  A glass tile carries no checksum: a well-formed
    edit (another colour or plane) is a valid stream of the right size (undetectable by
    design); a malformed one (count, size, length, a mean past 255) must be caught."""
    level, col, row = rng.choice(_learned_tiles(work, 1) + _learned_tiles(work, 3))
    p = _tile_path(work, level, col, row)
    data = bytearray(_read_tile(p))
    plane = data[5] == 3
    what = rng.choice(("colour", "colour", "count", "size", "append", "truncate"))
    if what == "colour":                  # kind 3: the means (u16) and gradients (int8)
        i = 10 + rng.randrange(12 if plane else 3)
        data[i] = (data[i] + rng.choice((1, 17, 128))) % 256
    elif what == "count":
        struct.pack_into("<H", data, 22 if plane else 13, rng.choice((1, 2, 65535)))
    elif what == "size":
        struct.pack_into("<H", data, rng.choice((6, 8)), rng.choice((1, 32, 63, 65, 65535)))
    elif what == "truncate":
        del data[rng.randrange(5, len(data)):]
    else:
        data += bytes(rng.randrange(256) for _ in range(rng.choice((1, 7))))
    _write_tile(p, bytes(data))
    forge(work)
    return f"glass tile level {level} ({col},{row}) {what} changed, digests forged"


def zip_append_json(rng: random.Random, work: Path, ctx: dict) -> str:
    """A second zarr.json appended to the zip (a later member would shadow the first in
    readers that take the last)."""
    with zipfile.ZipFile(work) as zf:
        doc = json.loads(zf.read("zarr.json"))
    doc, what = _json_edit(rng, doc, ("attributes", "wsicodec"))
    with zipfile.ZipFile(work, "a") as zf, _quiet():
        zf.writestr("zarr.json", json.dumps(doc, allow_nan=True))
    return f"second zarr.json appended ({what})"


def zip_duplicate_member(rng: random.Random, work: Path, ctx: dict) -> str:
    """A member appended again under its own name, with other bytes."""
    with zipfile.ZipFile(work) as zf:
        names = [n for n in zf.namelist() if not n.endswith("zarr.json")]
        name = rng.choice(names)
        data = zf.read(name)
    with zipfile.ZipFile(work, "a") as zf, _quiet():
        zf.writestr(name, _bytes_mutation(rng, data, rng.choice(("bitflip", "overwrite"))))
    return f"duplicate member {name}"


def zip_inflating_member(rng: random.Random, work: Path, ctx: dict) -> str:
    """The zip rewritten with one member deflated to a few bytes that inflate to 64 MiB
    (a zip bomb in miniature)."""
    tmp = work.with_name(work.name + ".tmp")
    with zipfile.ZipFile(work) as src, zipfile.ZipFile(tmp, "w") as dst:
        names = src.namelist()
        victim = rng.choice(names)
        for n in names:
            if n == victim:
                dst.writestr(n, bytes(64 << 20), compress_type=zipfile.ZIP_DEFLATED)
            else:
                dst.writestr(src.getinfo(n), src.read(n))
    os.replace(tmp, work)
    return f"member {victim} deflated to inflate to 64 MiB"


class _quiet:
    def __enter__(self) -> None:
        import warnings

        self._cw = warnings.catch_warnings()
        self._cw.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: object) -> None:
        self._cw.__exit__(*exc)


#: kind -> (codecs it applies to, function); "zip_*" kinds work on the .zarr.zip copy
BOTH, JXL, LEARNED = ("jpegxl", "learned"), ("jpegxl",), ("learned",)
KINDS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "file_bitflip": (BOTH, _file_bytes("bitflip")),
    "file_overwrite": (BOTH, _file_bytes("overwrite")),
    "file_truncate": (BOTH, _file_bytes("truncate")),
    "file_extend": (BOTH, _file_bytes("extend")),
    "zip_bitflip": (BOTH, _zip_bytes("bitflip")),
    "zip_overwrite": (BOTH, _zip_bytes("overwrite")),
    "zip_truncate": (BOTH, _zip_bytes("truncate")),
    "zip_extend": (BOTH, _zip_bytes("extend")),
    "zip_append_json": (BOTH, zip_append_json),
    "zip_duplicate_member": (BOTH, zip_duplicate_member),
    "zip_inflating_member": (BOTH, zip_inflating_member),
    "tile_swap": (BOTH, _swap_tiles(False)),
    "tile_swap_with_checks": (BOTH, _swap_tiles(True)),
    "tile_splice": (BOTH, tile_splice),
    "tile_splice_forged": (BOTH, tile_splice_forged),
    "cross_codec_forged": (BOTH, cross_codec_forged),
    "chunk_delete": (BOTH, chunk_delete),
    "fifo": (BOTH, replace_fifo),
    "symlink": (BOTH, replace_symlink),
    "json_root_edit": (BOTH, json_root_edit),
    "json_root_edit_forged": (BOTH, json_root_edit_forged),
    "json_array_edit": (BOTH, json_array_edit),
    "json_array_shape": (BOTH, json_array_shape),
    "jxl_wrong_size_forged": (JXL, jxl_wrong_size_forged),
    "jxl_valid_forged": (JXL, jxl_valid_forged),
    "learned_header_forged": (LEARNED, learned_header_forged),
    "learned_stream_forged": (LEARNED, learned_stream_forged),
    "learned_glass_forged": (LEARNED, learned_glass_forged),
}

#: Kinds whose forged result may be a *valid* container that decodes to other pixels: a
#: tile replaced by a valid stream of the right size (another container's tile, a fresh
#: JPEG-XL tile, a glass tile of another colour: glass tiles carry no checksum) or
#: metadata edited into other valid metadata, every digest recomputed.  Nothing short of
#: a signature over the metadata digest can tell these from the original, so other
#: pixels without an error are "undetectable", not a failure.  Errors and unchanged
#: pixels are fine for them too; a traceback, hang or memory blow-up still fails.
UNDETECTABLE_KINDS = ("tile_splice_forged", "jxl_valid_forged", "learned_glass_forged",
                      "json_root_edit_forged")
#: of those, the forged metadata edits: they may change a level's size, never a pixel
#: the original and the edited level share (checked)
GEOMETRY_KINDS = ("json_root_edit_forged",)


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
            rows, cols = _grid(work, level)
            crc = np.zeros((rows, cols), np.uint32)
            digest = np.zeros((rows, cols, 16), np.uint8)
            for row in range(rows):
                for col in range(cols):
                    p = _tile_path(work, level, col, row)
                    data = _read_tile(p) if p.is_file() else b""
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
            p = _tile_path(work, level, col, row)
            nbytes[row, col] = len(_read_tile(p)) if p.is_file() else 0
    (base / "nbytes/c/0/0").write_bytes(nbytes.tobytes())
    if isinstance(attrs.get("level_bytes"), list) and level < len(attrs["level_bytes"]):
        attrs["level_bytes"][level] = int(nbytes.sum())
    return kind, psnr, nbytes


# ---------------------------------------------------------------- reading a container
def _digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(repr((a.shape, str(a.dtype))).encode() + a.tobytes()).hexdigest()[:24]


class _Timeout(BaseException):
    """Raised by SIGALRM in the worker: a BaseException, so no ``except Exception`` in the
    product swallows it."""


def read_everything(path: Path, tmp: Path) -> dict[str, Any]:
    """Read ``path`` every way a user would; per operation, either ``{"px": digest}``
    (pixels read), ``{"ok": True}`` / ``{"damage": [...]}`` (verify) or the exception
    (``{"exc": ...}``: raised, not caught here, when it is not a WsiCodecError)."""
    import tifffile

    import wsicodec
    from wsicodec.errors import WsiCodecError
    from wsicodec.readback import decompress, verify

    out: dict[str, Any] = {}
    shapes: dict[str, Any] = {}

    def op(name: str, fn: Callable[[], Any]) -> None:
        try:
            out[name] = fn()
        except WsiCodecError as e:
            out[name] = {"error": type(e).__name__, "message": str(e)}

    def do_verify() -> dict:
        r = verify(path, decode=True)
        if r.ok:
            return {"ok": True}
        return {"damage": [m for *_, m in r.damaged_levels] + [m for *_, m in r.damaged_tiles]
                + [m for _, m in r.damaged_associated]}

    op("verify", do_verify)

    def do_slide() -> dict:
        res: dict[str, Any] = {}
        with wsicodec.open_slide(path, workers=1) as s:
            for lv in range(s.level_count):
                def one(lv: int = lv) -> dict:
                    # RGBA: the digests recorded before RGB became as_array's default
                    a = s.read_region((0, 0), lv, s.level_dimensions[lv], as_array=True,
                                      rgba=True)
                    shapes[f"level{lv}"] = a
                    return {"px": _digest(a)}
                op_into(res, f"level{lv}", one)
            for name in list(s.associated_images):
                def assoc(name: str = name) -> dict:
                    a = np.asarray(s.associated_images[name])
                    shapes[f"assoc:{name}"] = a
                    return {"px": _digest(a)}
                op_into(res, f"assoc:{name}", assoc)
        return res

    def op_into(res: dict, name: str, fn: Callable[[], Any]) -> None:
        try:
            res[name] = fn()
        except WsiCodecError as e:
            res[name] = {"error": type(e).__name__, "message": str(e)}

    op("slide", do_slide)

    def do_tiff() -> dict:
        t = tmp / "out.tiff"
        decompress(path, t, workers=1, overwrite=True)
        with tifffile.TiffFile(t) as tf:
            levels = [lv.asarray() for lv in tf.series[0].levels]
        t.unlink()
        for i, a in enumerate(levels):
            shapes[f"tiff{i}"] = a
        return {"px": [_digest(a) for a in levels]}

    op("decompress", do_tiff)

    def do_fidelity() -> dict:
        # format 4's map as readers give it: kind names, kinds and PSNRs per level (nbytes
        # follow the tiles, checked by every tile read above); format 1-3: none
        with wsicodec.open_container(path) as c:
            maps = [c.tile_records(lv) for lv in range(c.level_count)]
            if maps[0] is None:
                return {"px": "no map"}
            return {"px": [[list(m.kind_names), _digest(m.kind), _digest(m.psnr)] for m in maps]}

    op("fidelity", do_fidelity)
    out["_arrays"] = shapes
    return out


def _flat(res: dict) -> dict[str, Any]:
    """{operation: outcome} with the slide's reads one per entry."""
    flat = {}
    for k, v in res.items():
        if k == "_arrays":
            continue
        if k == "slide" and isinstance(v, dict) and "error" not in v:
            for kk, vv in v.items():
                flat[f"slide.{kk}"] = vv
        else:
            flat[k] = v
    return flat


def classify(kind: str, res: dict, ref: dict) -> tuple[str, str]:
    """(outcome, detail) of one case's reads against the reference reads."""
    flat, flat_ref = _flat(res), _flat(ref)
    errors, differs = [], []
    for name, v in flat.items():
        if "error" in v:
            if "\n" in v["message"]:
                return "multiline", f"{name}: {v['error']}: {v['message'][:300]!r}"
            if _mentions_memory(v["message"]):
                return "memory", f"{name}: {v['error']}: {v['message'][:300]}"
            errors.append(f"{name}: {v['error']}: {v['message'][:200]}")
        elif "damage" in v:
            for m in v["damage"]:
                if "\n" in m:
                    return "multiline", f"verify: {m[:300]!r}"
                if _mentions_memory(m):
                    return "memory", f"verify: {m[:300]}"
            errors.append(f"verify: {len(v['damage'])} damaged: {v['damage'][0][:200]}")
        elif v != flat_ref.get(name):
            differs.append(name)
    extra = sorted(set(flat_ref) - set(flat))
    if differs:
        what = f"pixels differ without error in {', '.join(differs)}"
        if kind in GEOMETRY_KINDS:       # forged metadata: only its sizes may differ
            if all(_same_where_both(res["_arrays"], ref["_arrays"], d) for d in differs):
                return "undetectable", what + " (other sizes; the pixels they share equal)"
        elif kind in UNDETECTABLE_KINDS:
            return "undetectable", what
        return "wrong_pixels", what + (f" (also: {errors[0]})" if errors else "")
    if errors:
        return "error", errors[0]
    if extra:   # e.g. an associated image no longer listed: metadata a forger may write
        what = f"reads fine but lacks {', '.join(extra)}"
        return ("undetectable", what) if kind in UNDETECTABLE_KINDS else ("wrong_pixels", what)
    return "no_effect", ""


def _same_where_both(arrays: dict, ref_arrays: dict, op: str) -> bool:
    """Whether the arrays an operation read equal the reference's where both have pixels
    (a forged level size crops or extends a level; it must not move or alter a pixel)."""
    keys = [op.split(".", 1)[1]] if op.startswith("slide.") else [k for k in ref_arrays
                                                                   if k.startswith("tiff")]
    for k in keys:
        a, b = arrays.get(k), ref_arrays.get(k)
        if a is None or b is None or a.ndim != b.ndim or a.shape[2:] != b.shape[2:]:
            return False
        h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
        if not np.array_equal(a[:h, :w], b[:h, :w]):
            return False
    return True


def _mentions_memory(message: str) -> bool:
    return "Unable to allocate" in message or "MemoryError" in message


def _exception_chain(e: BaseException) -> list[BaseException]:
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return seen


# ---------------------------------------------------------------- the worker
def _rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")        # resets VmHWM, the peak RSS, to the current RSS
        return True
    except OSError:
        return False


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout()


def run_one(case: dict, bases: dict[str, Path], ref: dict, scratch: Path) -> dict[str, Any]:
    """Mutate a copy of the case's base container and read it; the case's record."""
    from wsicodec.errors import WsiCodecError

    codec, kind = case["codec"], case["kind"]
    rng = random.Random(f"{codec}:{kind}:{case['seed']}")
    work_dir = Path(tempfile.mkdtemp(dir=scratch))
    rec: dict[str, Any] = dict(case)
    try:
        if kind.startswith("zip_"):
            work = work_dir / "c.zarr.zip"
            shutil.copyfile(bases[f"{codec}-zip"], work)
        else:
            work = work_dir / "c.zarr"
            shutil.copytree(bases[codec], work)
        try:
            rec["mutation"] = KINDS[kind][1](rng, work, {"bases": bases, "codec": codec})
        except Exception as e:  # noqa: BLE001 - the harness's own bug: reported, not hidden
            rec.update(outcome="harness_error", detail="".join(traceback.format_exception(e))[-2000:])
            return rec
        reset = _rss_reset()
        rss0 = _status("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t0 = time.perf_counter()
        signal.alarm(CASE_TIMEOUT_S)
        try:
            res = read_everything(work, work_dir)
            signal.alarm(0)
            outcome, detail = classify(kind, res, ref)
        except _Timeout:
            outcome, detail = "hang", f"over {CASE_TIMEOUT_S} s"
        except BaseException as e:  # noqa: BLE001 - that is what we are looking for
            signal.alarm(0)
            chain = _exception_chain(e)
            if any(isinstance(x, _Timeout) for x in chain):
                outcome, detail = "hang", f"over {CASE_TIMEOUT_S} s"
            elif any(isinstance(x, MemoryError) for x in chain):
                outcome, detail = "memory", "".join(traceback.format_exception(e))[-3000:]
            elif isinstance(e, WsiCodecError):     # cannot happen: read_everything keeps them
                outcome, detail = "error", str(e)
            else:
                outcome, detail = "traceback", "".join(traceback.format_exception(e))[-3000:]
        finally:
            signal.alarm(0)
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        peak = _status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rec["peak_rss_growth_mb"] = round(max(0, peak - rss0) / 2 ** 20, 1)
        if outcome not in FAILURES and peak - rss0 > MEMORY_CAP_BYTES:
            outcome, detail = "memory", f"peak RSS grew {rec['peak_rss_growth_mb']} MB"
        rec["outcome"], rec["detail"] = outcome, detail
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return rec


def worker_main(argv: list[str]) -> int:
    """``worker BASES_JSON CASES_JSONL OUT_JSONL``: run the cases not yet in OUT (appending
    one line per case, flushed), each under the time limit; exit 3 after a hang (the
    parent starts a fresh worker for the rest)."""
    bases = {k: Path(v) for k, v in json.loads(Path(argv[0]).read_text()).items()}
    todo = [json.loads(line) for line in Path(argv[1]).read_text().splitlines() if line.strip()]
    out_path = Path(argv[2])
    done = set()
    if out_path.exists():
        done = {json.loads(line)["id"] for line in out_path.read_text().splitlines() if line.strip()}
    todo = [c for c in todo if c["id"] not in done]
    if not todo:
        return 0
    signal.signal(signal.SIGALRM, _alarm)
    scratch = Path(tempfile.mkdtemp(prefix="wsicodec-fuzz-"))
    try:
        refs = {}
        for codec in sorted({c["codec"] for c in todo}):
            refs[codec] = reference(bases[codec], scratch)
        try:         # the backstop against a runaway allocation (see ADDRESS_SPACE_HEADROOM)
            cap = _status("VmSize") + ADDRESS_SPACE_HEADROOM
            resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
        except (ValueError, OSError):
            pass
        with out_path.open("a") as out:
            for case in todo:
                out.write(json.dumps({"id": case["id"], "started": True}) + "\n")
                out.flush()
                rec = run_one(case, bases, refs[case["codec"]], scratch)
                out.write(json.dumps(rec) + "\n")
                out.flush()
                if rec["outcome"] == "hang":
                    return 3          # threads may still be stuck: a fresh process for the rest
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def reference(base: Path, scratch: Path) -> dict:
    """The reads of an unmutated base container; fails loudly if it is not clean."""
    ref = read_everything(base, scratch)
    flat = _flat(ref)
    bad = {k: v for k, v in flat.items() if "error" in v or "damage" in v}
    if bad:
        raise RuntimeError(f"the unmutated container {base} does not read cleanly: {bad}")
    return ref


# ---------------------------------------------------------------- the parent
def run_cases(all_cases: list[dict], bases: dict[str, Path], folder: Path,
              parallel: int = 2, log: Callable[[str], None] | None = None) -> list[dict]:
    """Run ``all_cases`` in worker processes (one per codec, ``parallel`` at a time); a
    worker that stops answering or dies is replaced, the case it was on recorded as
    ``hang`` or ``crash``.  Returns one record per case, in id order."""
    folder.mkdir(parents=True, exist_ok=True)
    bases_json = folder / "bases.json"
    bases_json.write_text(json.dumps({k: str(v) for k, v in bases.items()}))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in os.environ.get(
                   "PYTHONPATH", "").split(os.pathsep) if p]))
    groups: dict[str, list[dict]] = {}
    for c in all_cases:
        groups.setdefault(c["codec"], []).append(c)
    queue = sorted(groups, key=lambda k: k != "learned")    # the long one first
    running: dict[str, dict[str, Any]] = {}

    def paths(codec: str) -> tuple[Path, Path, Path]:
        return (folder / f"{codec}.cases.jsonl", folder / f"{codec}.out.jsonl",
                folder / f"{codec}.stderr")

    def start(codec: str) -> None:
        cases_path, out_path, err_path = paths(codec)
        if not cases_path.exists():
            cases_path.write_text("".join(json.dumps(c) + "\n" for c in groups[codec]))
        with err_path.open("ab") as err:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "worker",
                                     str(bases_json), str(cases_path), str(out_path)],
                                    env=env, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=err)
        running[codec] = {"proc": proc, "size": -1, "last": time.monotonic()}

    def state(codec: str) -> tuple[int | None, set[int]]:
        """(id of a case started and not finished, ids finished)."""
        started, finished = None, set()
        for line in _lines(paths(codec)[1]):
            if line.get("started"):
                started = line["id"]
            else:
                finished.add(line["id"])
        return (None if started in finished else started), finished

    def record_lost(codec: str, case_id: int, outcome: str, detail: str) -> None:
        case = next(c for c in groups[codec] if c["id"] == case_id)
        with paths(codec)[1].open("a") as f:
            f.write(json.dumps(dict(case, outcome=outcome, detail=detail,
                                    mutation="(the worker was lost)")) + "\n")

    while queue or running:
        while queue and len(running) < parallel:
            start(queue.pop(0))
        time.sleep(0.2)
        for codec in list(running):
            info = running[codec]
            out_path = paths(codec)[1]
            size = out_path.stat().st_size if out_path.exists() else 0
            if size != info["size"]:
                info["size"], info["last"] = size, time.monotonic()
            rc = info["proc"].poll()
            if rc is None and time.monotonic() - info["last"] <= WATCHDOG_S:
                continue
            if rc is None:                      # silent too long: a hang in native code
                info["proc"].kill()
                info["proc"].wait()
            started, finished = state(codec)
            if started is not None:
                if rc is None:
                    record_lost(codec, started, "hang", f"worker silent {WATCHDOG_S} s: killed")
                else:
                    err = paths(codec)[2].read_text(errors="replace")[-1500:]
                    record_lost(codec, started, "crash", f"worker died (rc {rc}): {err}")
                finished.add(started)
            elif rc not in (0, 3) and not finished:
                err = paths(codec)[2].read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the fuzz worker for {codec} failed (rc {rc}):\n{err}")
            del running[codec]
            if len(finished) < len(groups[codec]):
                queue.insert(0, codec)
            elif log:
                log(f"{codec}: {len(finished)} cases done")
    records = {}
    for codec in groups:
        for r in _lines(paths(codec)[1]):
            if not r.get("started"):
                records[r["id"]] = r
    missing = [c["id"] for c in all_cases if c["id"] not in records]
    if missing:
        raise RuntimeError(f"fuzz cases without a record: {missing[:10]}")
    return [records[c["id"]] for c in all_cases]


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def summarize(records: list[dict]) -> dict[str, Any]:
    """Counts per outcome, per kind and outcome, per codec; the failures in full; the
    largest peak-RSS growth of a case."""
    by_outcome = {o: 0 for o in OUTCOMES}
    by_kind: dict[str, dict[str, int]] = {}
    by_codec: dict[str, dict[str, int]] = {}
    for r in records:
        by_outcome[r["outcome"]] = by_outcome.get(r["outcome"], 0) + 1
        k = by_kind.setdefault(f"{r['codec']}:{r['kind']}", {})
        k[r["outcome"]] = k.get(r["outcome"], 0) + 1
        c = by_codec.setdefault(r["codec"], {})
        c[r["outcome"]] = c.get(r["outcome"], 0) + 1
    failures = [r for r in records if r["outcome"] in FAILURES]
    return {"cases": len(records), "outcomes": by_outcome, "by_codec": by_codec,
            "by_kind": dict(sorted(by_kind.items())), "failures": failures,
            "failure_count": len(failures),
            "max_peak_rss_growth_mb": max((r.get("peak_rss_growth_mb", 0) for r in records), default=0),
            "max_case_seconds": max((r.get("seconds", 0) for r in records), default=0)}


def replay(case: dict, folder: Path) -> dict:
    """Run one case in this process (for debugging a failure): makes the bases in
    ``folder`` if they are not there yet."""
    names = {c: folder / f"{c}.zarr" for c in CODECS}
    if not all(p.exists() for p in names.values()):
        make_bases(folder)
    bases = {}
    for c in CODECS:
        bases[c], bases[f"{c}-other"], bases[f"{c}-zip"] = (folder / f"{c}.zarr",
                                                            folder / f"{c}-other.zarr",
                                                            folder / f"{c}.zarr.zip")
    signal.signal(signal.SIGALRM, _alarm)
    scratch = Path(tempfile.mkdtemp(prefix="wsicodec-fuzz-"))
    try:
        return run_one(case, bases, reference(bases[case["codec"]], scratch), scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit("usage: python bench/fuzzlib.py worker BASES_JSON CASES_JSONL OUT_JSONL "
             "(run by bench/fuzz.py and tests/test_fuzz.py)")
