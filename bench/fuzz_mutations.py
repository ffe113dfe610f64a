"""The fuzzing harness's mutations and their table (:data:`KINDS`).

Each mutation takes (rng, work, ctx): ``work`` the copied container (a directory or a zip),
``ctx`` {"bases": {name: path}, "codec": codec}; it changes ``work`` in place and returns a
short description. Here: byte edits of a file or of the zip, tiles swapped or spliced, files
deleted or replaced by a FIFO or a symlink, JSON edits, zip members added or inflated; the
codec-stream forgeries are in ``bench/fuzz_forgeries.py``. :data:`UNDETECTABLE_KINDS` are the
kinds whose result may be a valid container with other pixels.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable

from bench.fuzz_forgeries import (bare_stream_forged, bare_wrong_size_forged, j2k_header_forged,
                                  jxl_valid_forged, jxl_wrong_size_forged, learned_glass_forged,
                                  learned_header_forged, learned_stream_forged)
from bench.fuzz_store import (Checks, bytes_mutation, container_files, forge, level_count, level_grid, read_tile,
                              random_tile, tile_path)


def _pick_file(rng: random.Random, work: Path) -> Path:
    cats = {k: v for k, v in container_files(work).items() if v}
    return rng.choice(cats[rng.choice(sorted(cats))])


def _file_bytes(how: str) -> Callable:
    def mutate(rng: random.Random, work: Path, ctx: dict) -> str:
        p = _pick_file(rng, work)
        p.write_bytes(bytes_mutation(rng, p.read_bytes(), how))
        return f"{how} {p.relative_to(work).as_posix()}"
    return mutate


def _zip_bytes(how: str) -> Callable:
    def mutate(rng: random.Random, work: Path, ctx: dict) -> str:
        data = work.read_bytes()
        if how == "truncate" and rng.random() < 0.5:    # near the end: the central directory
            cut = len(data) - rng.randrange(1, min(len(data), 400))
            work.write_bytes(data[:cut])
            return f"truncate zip to {cut} of {len(data)}"
        work.write_bytes(bytes_mutation(rng, data, how))
        return f"{how} zip bytes"
    return mutate


def _swap_tiles(with_checks: bool) -> Callable:
    def mutate(rng: random.Random, work: Path, ctx: dict) -> str:
        level = rng.randrange(level_count(work))
        rows, cols = level_grid(work, level)
        if rows * cols < 2:
            level = 0
            rows, cols = level_grid(work, level)
        a, b = rng.sample(range(rows * cols), 2)
        (ra, ca), (rb, cb) = divmod(a, cols), divmod(b, cols)
        pa, pb = tile_path(work, level, ca, ra), tile_path(work, level, cb, rb)
        da, db = pa.read_bytes(), pb.read_bytes()
        pa.write_bytes(db)
        pb.write_bytes(da)
        if with_checks:
            ch = Checks(work, level)
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
    level, col, row = random_tile(rng, work, 0)
    shutil.copyfile(tile_path(other, level, col, row), tile_path(work, level, col, row))
    mine, theirs = Checks(work, level), Checks(other, level)
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
    """A tile of another codec's container at the same place (level 0), digests forged: a
    learned tile in a jpegxl container, a JPEG-XL tile in a learned one, and in an auto one
    in place of a tile that is not JPEG-XL (there a JPEG-XL tile is a valid tile, and a
    learned one in a network tile's place too)."""
    from wsicodec.classical import JXL_SIGNATURES

    other_codec = "learned" if ctx["codec"] == "jpegxl" else "jpegxl"
    other = ctx["bases"][other_codec]
    (r1, c1), (r2, c2) = level_grid(work, 0), level_grid(other, 0)
    places = [(col, row) for row in range(min(r1, r2)) for col in range(min(c1, c2))
              if ctx["codec"] != "auto" or not read_tile(tile_path(work, 0, col, row)).startswith(JXL_SIGNATURES)]
    col, row = rng.choice(places)
    shutil.copyfile(tile_path(other, 0, col, row), tile_path(work, 0, col, row))
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
    p = rng.choice(container_files(work)["array_json"])
    doc = json.loads(p.read_text())
    doc, what = _json_edit(rng, doc)
    p.write_text(json.dumps(doc, allow_nan=True))
    return f"{p.relative_to(work).as_posix()} {what}"


def json_array_shape(rng: random.Random, work: Path, ctx: dict) -> str:
    """An array's declared shape (and chunk shape) made huge, small or odd."""
    arrays = [p for p in container_files(work)["array_json"]
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
        zf.writestr(name, bytes_mutation(rng, data, rng.choice(("bitflip", "overwrite"))))
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
ALL, JXL, NETWORK, AUTO = ("jpegxl", "learned", "auto"), ("jpegxl",), ("learned", "auto"), ("auto",)
KINDS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "file_bitflip": (ALL, _file_bytes("bitflip")),
    "file_overwrite": (ALL, _file_bytes("overwrite")),
    "file_truncate": (ALL, _file_bytes("truncate")),
    "file_extend": (ALL, _file_bytes("extend")),
    "zip_bitflip": (ALL, _zip_bytes("bitflip")),
    "zip_overwrite": (ALL, _zip_bytes("overwrite")),
    "zip_truncate": (ALL, _zip_bytes("truncate")),
    "zip_extend": (ALL, _zip_bytes("extend")),
    "zip_append_json": (ALL, zip_append_json),
    "zip_duplicate_member": (ALL, zip_duplicate_member),
    "zip_inflating_member": (ALL, zip_inflating_member),
    "tile_swap": (ALL, _swap_tiles(False)),
    "tile_swap_with_checks": (ALL, _swap_tiles(True)),
    "tile_splice": (ALL, tile_splice),
    "tile_splice_forged": (ALL, tile_splice_forged),
    "cross_codec_forged": (ALL, cross_codec_forged),
    "chunk_delete": (ALL, chunk_delete),
    "fifo": (ALL, replace_fifo),
    "symlink": (ALL, replace_symlink),
    "json_root_edit": (ALL, json_root_edit),
    "json_root_edit_forged": (ALL, json_root_edit_forged),
    "json_array_edit": (ALL, json_array_edit),
    "json_array_shape": (ALL, json_array_shape),
    "jxl_wrong_size_forged": (JXL, jxl_wrong_size_forged),
    "jxl_valid_forged": (JXL, jxl_valid_forged),
    "learned_header_forged": (NETWORK, learned_header_forged),
    "learned_stream_forged": (NETWORK, learned_stream_forged),
    "learned_glass_forged": (NETWORK, learned_glass_forged),
    "bare_stream_forged": (AUTO, bare_stream_forged),
    "j2k_header_forged": (AUTO, j2k_header_forged),
    "bare_wrong_size_forged": (AUTO, bare_wrong_size_forged),
}

#: Kinds whose forged result may be a *valid* container that decodes to other pixels: a
#: tile replaced by a valid stream of the right size (another container's tile, a fresh
#: JPEG-XL tile, a glass tile of another colour: glass tiles carry no checksum; a bare
#: JPEG 2000 / JPEG-XL tile edited into another decodable codestream: neither carries a
#: checksum) or metadata edited into other valid metadata, every digest recomputed.  Nothing short of
#: a signature over the metadata digest can tell these from the original, so other
#: pixels without an error are "undetectable", not a failure.  Errors and unchanged
#: pixels are fine for them too; a traceback, hang or memory blow-up still fails.
UNDETECTABLE_KINDS = ("tile_splice_forged", "jxl_valid_forged", "learned_glass_forged",
                      "json_root_edit_forged", "bare_stream_forged", "j2k_header_forged")
#: of those, the forged metadata edits: they may change a level's size, never a pixel
#: the original and the edited level share (checked)
GEOMETRY_KINDS = ("json_root_edit_forged",)
