"""Seeded fuzzing of the container readers (issue #26): a few hundred mutations of a small
jpegxl, a small learned and a small auto container (a mixed grid: glass, network, JPEG 2000,
JPEG-XL and fix-up tiles), each read with verify(decode=True), open_slide's
read_region of every level and every associated image, and decompress.

The harness is bench/fuzzlib.py (bench/fuzz.py runs it longer and writes
bench/results/fuzz.json); its docstring says what is mutated and what counts as a
failure: a traceback outside the WsiCodecError tree, a hang, a crash, a case that grows
the peak RSS by more than 1 GB, pixels that differ from the unmutated container's
without an error, or an error message of more than one line.

Excluded by design (fuzzlib.UNDETECTABLE_KINDS): with every digest forged, a tile
replaced by a *valid* stream of the right size (another container's tile, a fresh
JPEG-XL tile, a glass tile of another colour: glass tiles carry no checksum; a bare
JPEG 2000 / JPEG-XL tile edited into another decodable codestream) or metadata edited
into other valid metadata reads as other pixels; only a signature over
the metadata digest could tell.  Those cases may still not raise a traceback, hang or
blow up memory, and forged metadata may change a level's size but not a pixel the
original and the edited level share.
"""

from __future__ import annotations

import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))

from bench import fuzz_store, fuzzlib  # noqa: E402

CASES = 300
SEED = 26
LEARNED_SHARE = 0.3
AUTO_SHARE = 0.2


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return fuzzlib.make_bases(tmp_path_factory.mktemp("fuzz-bases"))


@pytest.fixture(scope="module")
def records(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    cases = fuzzlib.cases(CASES, SEED, LEARNED_SHARE, AUTO_SHARE)
    return fuzzlib.run_cases(cases, bases, tmp_path_factory.mktemp("fuzz-run"))


def _show(failures: list[dict]) -> str:
    return "\n\n".join(f"{r['codec']} {r['kind']} seed={r['seed']}: {r.get('mutation')}\n"
                       f"  -> {r['outcome']}: {str(r.get('detail'))[-1500:]}" for r in failures)


def test_fuzz_no_traceback_hang_memory_or_silent_pixels(records: list[dict]) -> None:
    summary = fuzzlib.summarize(records)
    assert summary["cases"] == CASES
    assert summary["failure_count"] == 0, (
        f"{summary['failure_count']} failing cases (replay one with python bench/fuzz.py "
        f"--replay '{{\"codec\": ..., \"kind\": ..., \"seed\": ...}}'):\n"
        + _show(summary["failures"]))
    assert summary["max_peak_rss_growth_mb"] < fuzzlib.MEMORY_CAP_BYTES / 2 ** 20


def test_fuzz_covers_every_kind_on_every_codec(records: list[dict]) -> None:
    seen = {(r["codec"], r["kind"]) for r in records}
    for kind, (codecs, _) in fuzzlib.KINDS.items():
        for codec in codecs:
            assert (codec, kind) in seen, f"{codec} {kind} never drawn"
    outcomes = {r["outcome"] for r in records}
    assert "error" in outcomes and "no_effect" in outcomes   # the harness tells them apart
    # the excluded class is there (forged valid tiles read as other pixels), and only
    # for the kinds named as such
    undetectable = {r["kind"] for r in records if r["outcome"] == "undetectable"}
    assert undetectable and undetectable <= set(fuzzlib.UNDETECTABLE_KINDS)


def test_fuzz_cases_are_reproducible() -> None:
    assert fuzzlib.cases(50, 3) == fuzzlib.cases(50, 3)
    assert fuzzlib.cases(50, 3) != fuzzlib.cases(50, 4)


# -- the bugs the fuzzing found, each as a fixed case ---------------------------------
def _copy(bases: dict[str, Path], codec: str, tmp_path: Path) -> Path:
    work = tmp_path / "c.zarr"
    shutil.copytree(bases[codec], work)
    return work


def _damage(path: Path) -> list[str]:
    from wsicodec.readback import verify

    r = verify(path, decode=True)
    return ([m for *_, m in r.damaged_levels] + [m for *_, m in r.damaged_tiles]
            + [m for _, m in r.damaged_associated])


@pytest.mark.parametrize("array, shape", [("levels/0/digest", [1 << 20] * 3),
                                          ("levels/1/crc32", [1 << 40] * 2),
                                          ("associated/thumbnail", [1 << 31])])
def test_array_zarr_json_cannot_size_an_allocation(bases, tmp_path: Path, array: str,
                                                   shape: list) -> None:
    """An array's own zarr.json (outside the metadata digest) declaring a huge shape is
    refused before zarr allocates it (it allocated 2 GiB for the thumbnail; 1 EiB asked)."""
    import json
    import resource

    work = _copy(bases, "jpegxl", tmp_path)
    p = work / array / "zarr.json"
    doc = json.loads(p.read_text())
    doc["shape"] = shape
    doc["chunk_grid"]["configuration"]["chunk_shape"] = shape
    p.write_text(json.dumps(doc))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    damage = _damage(work)     # verify reports a level's damaged arrays like an image's
    assert len(damage) == 1 and "zarr.json declares shape" in damage[0], damage
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000   # KiB


@pytest.mark.parametrize("field, value", [("version", 2), ("version", 1),
                                          ("quality", 16), ("quality", -1)])
def test_learned_header_edit_with_forged_digests_is_caught(bases, tmp_path: Path,
                                                           field: str, value: int) -> None:
    """Header fields outside the symbol checksum that still decode (format byte 3 -> 2/1:
    decoded without stitching; quality a few float32 ulps off: same symbols, other gain)
    gave other pixels without an error; in a format-3 container they are now refused."""
    import wsicodec
    from wsicodec.errors import CorruptTileError

    work = _copy(bases, "learned", tmp_path)
    level, col, row = (0, 1, 1)                  # a network tile with neighbours all round
    p = fuzz_store.tile_path(work, level, col, row)
    data = bytearray(fuzz_store.read_tile(p))
    assert data[5] == 0
    if field == "version":
        data[4] = value
    else:
        struct.pack_into("<I", data, 10, struct.unpack_from("<I", data, 10)[0] + value)
    fuzz_store.write_tile(p, bytes(data))
    fuzz_store.forge(work)
    damage = _damage(work)
    assert len(damage) == 1 and "header edited" in damage[0] and "col=1 row=1" in damage[0]
    with wsicodec.open_slide(work) as s, pytest.raises(CorruptTileError, match="header edited"):
        s.read_region((0, 0), 0, s.level_dimensions[0])


def test_glass_tile_colour_is_the_undetectable_class(bases, tmp_path: Path) -> None:
    """A glass tile's colour, digests forged: a valid tile of other pixels (no checksum
    covers it), the class excluded by design; it reads as exactly that."""
    import wsicodec

    work = _copy(bases, "learned", tmp_path)
    p = fuzz_store.tile_path(work, 0, 2, 0)        # base_image's glass tile: a flat plane
    data = bytearray(fuzz_store.read_tile(p))
    assert data[5] == 3 and struct.unpack_from("<3H6b", data, 10) == (240 * 16, 238 * 16, 245 * 16) + (0,) * 6
    struct.pack_into("<H", data, 10, 176 * 16)
    fuzz_store.write_tile(p, bytes(data))
    fuzz_store.forge(work)
    assert _damage(work) == []
    with wsicodec.open_slide(work) as s:
        a = s.read_region((128, 0), 0, (64, 64), as_array=True)
    assert np.all(a[..., 0] == 176) and np.all(a[..., 1] == 238)


# -- format 4: the fidelity map ---------------------------------------------------------
FIDELITY_CASES = 60


@pytest.fixture(scope="module")
def fidelity_bases(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The jpegxl bases written again as format 4 with a fidelity map (the learned ones,
    which cross_codec_forged splices from, as they are)."""
    made = fuzzlib.make_bases(tmp_path_factory.mktemp("fuzz-fidelity"), ("jpegxl",), fidelity=True)
    return {**bases, **made}


def test_fuzz_format_4_fidelity_map(fidelity_bases: dict[str, Path],
                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    """The same mutations on a format-4 jpegxl container: its map's arrays are among the
    files mutated, forged digests cover them, and the reads include the map itself."""
    from wsicodec.container import open_container

    with open_container(fidelity_bases["jpegxl"]) as c:
        assert c.metadata.format_version == 4 and c.tile_records(0).kind_names == ("glass", "jpegxl")
    assert fuzz_store.container_files(fidelity_bases["jpegxl"])["records"]
    cases = fuzzlib.cases(FIDELITY_CASES, SEED + 1, 0.0, codecs=("jpegxl",))
    records = fuzzlib.run_cases(cases, fidelity_bases, tmp_path_factory.mktemp("fuzz-fid-run"))
    summary = fuzzlib.summarize(records)
    assert summary["cases"] == FIDELITY_CASES
    assert summary["failure_count"] == 0, _show(summary["failures"])
    touched = [r for r in records if any(f"/{a}/c/" in str(r.get("mutation"))
                                         for a in ("kind", "psnr", "nbytes"))]
    assert touched and all(r["outcome"] in ("error", "no_effect") for r in touched), touched


def test_forged_map_edit_is_caught_only_when_digests_are_not_forged(fidelity_bases, tmp_path: Path) -> None:
    """A PSNR changed in the map: a level digest mismatch; with every digest forged it
    reads as the other PSNR (a forged map is the undetectable class, like forged metadata)."""
    from wsicodec.container import open_container

    work = _copy(fidelity_bases, "jpegxl", tmp_path)
    p = work / "levels" / "0" / "psnr" / "c" / "0" / "0"
    a = np.frombuffer(p.read_bytes(), "<f4").copy()
    a[3] = 12.5
    p.write_bytes(a.tobytes())
    damage = _damage(work)
    assert len(damage) == 1 and "level 0's tile digests or fidelity map do not match" in damage[0]
    fuzz_store.forge(work)
    assert _damage(work) == []
    with open_container(work) as c:
        assert c.tile_records(0).psnr.ravel()[3] == 12.5


# -- auto: bare JPEG 2000 / JPEG-XL tiles in a mixed grid ------------------------------
def _auto_tiles(bases, kind: str) -> list[tuple[int, int, int]]:
    """(level, col, row) of the auto base's tiles of ``kind``, from its fidelity map."""
    import wsicodec

    with wsicodec.open_slide(bases["auto"]) as s:
        return [(lv, col, row) for lv in range(s.level_count)
                for row, kinds in enumerate(s.tile_records(lv).kind.tolist())
                for col, k in enumerate(kinds) if s.tile_records(lv).kind_names[k] == kind]


def test_auto_base_holds_every_tile_kind(bases) -> None:
    """The auto base is the mixed grid the bare-tile forgeries need (fuzz_bases.SETTINGS)."""
    for kind in ("glass", "learned", "jpeg2000", "jpegxl", "fixup", "scanner-jpeg", "recovered-jpeg"):
        assert _auto_tiles(bases, kind), kind


@pytest.mark.parametrize("kind, message", [
    ("jpeg2000", "is not a jpeg2000 codestream, as its fidelity record says"),
    ("learned", "is a bare codestream where its fidelity record says learned")])
def test_auto_tile_of_another_kind_with_forged_digests_is_caught(bases, tmp_path: Path, kind: str,
                                                                 message: str) -> None:
    """A valid JPEG-XL codestream of the tile's size in place of a JPEG 2000 or a network
    tile, digests forged: readers routed it by its signature and showed its pixels; the
    fidelity map's kind now refuses it (the fuzzer's cross_codec_forged found it)."""
    import imagecodecs

    import wsicodec
    from wsicodec.errors import CorruptTileError

    level, col, row = _auto_tiles(bases, kind)[0]
    work = _copy(bases, "auto", tmp_path)
    rgb = np.random.default_rng(5).integers(0, 256, (64, 64, 3), np.uint8)   # stored tiles are whole
    fuzz_store.write_tile(fuzz_store.tile_path(work, level, col, row),
                          bytes(imagecodecs.jpegxl_encode(rgb, distance=1.0, effort=3)))
    fuzz_store.forge(work)
    damage = _damage(work)
    assert len(damage) == 1 and message in damage[0], damage
    with wsicodec.open_slide(work) as s, pytest.raises(CorruptTileError, match=message):
        s.read_region((0, 0), level, s.level_dimensions[level])


@pytest.mark.parametrize("offset, value", [(8, 60000), (12, 60000), (8, 1 << 31), (40, 4), (42, 15)])
def test_auto_jpeg2000_header_edit_is_refused_before_allocating(bases, tmp_path: Path, offset: int,
                                                               value: int) -> None:
    """A bare JPEG 2000 tile's SIZ field (width, height, components, precision) edited,
    digests forged: a one-line CorruptTileError, and no allocation of the declared size."""
    import resource

    import wsicodec
    from wsicodec.errors import CorruptTileError

    level, col, row = _auto_tiles(bases, "jpeg2000")[0]
    work = _copy(bases, "auto", tmp_path)
    p = fuzz_store.tile_path(work, level, col, row)
    data = bytearray(fuzz_store.read_tile(p))
    assert data[:4] == b"\xff\x4f\xff\x51"
    struct.pack_into(">H" if offset == 40 else "B" if offset == 42 else ">I", data, offset, value)
    fuzz_store.write_tile(p, bytes(data))
    fuzz_store.forge(work)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with wsicodec.open_slide(work) as s, pytest.raises(CorruptTileError) as e:
        s.read_region((0, 0), level, s.level_dimensions[level])
    assert "\n" not in str(e.value) and "jpeg2000" in str(e.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000   # KiB
