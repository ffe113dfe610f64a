"""The per-tile fidelity map (format 4): written with ContainerWriter, read back, resumed,
forged, summarized, shown by ``info`` and served as JSON; format 3 stays as it was."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import psnr
from wsicodec.cli import main
from wsicodec.codecs import get_codec
from wsicodec.container import open_container
from wsicodec.errors import (CorruptDataError, CorruptTileError, InvalidSettingError,
                             UnsupportedFormatError)
from wsicodec.fidelity import TileRecord, TileRecords, summarize
from wsicodec.integrity import level_digest, metadata_digest
from wsicodec.metadata import ContainerMetadata
from wsicodec.readback import verify
from wsicodec.tiling.geometry import LevelInfo
from wsicodec.writer import JOURNAL, ContainerWriter

KINDS = ("glass", "learned", "jpegxl", "jpegxl-lossless")
TILE = 64


def _pyramid(image: np.ndarray) -> list[np.ndarray]:
    """Level 0 and a 2x subsampled level 1 (enough for two grids: 4x5 and 2x3 tiles)."""
    return [image, np.ascontiguousarray(image[::2, ::2])]


def _meta(image: np.ndarray, kinds: tuple[str, ...] = KINDS) -> ContainerMetadata:
    levels = tuple(LevelInfo(p.shape[1], p.shape[0], float(2 ** i))
                   for i, p in enumerate(_pyramid(image)))
    return ContainerMetadata(codec=get_codec("jpegxl", 2.0).to_dict(), tile_size=TILE,
                             levels=levels, tile_kinds=kinds)


def _coded(image: np.ndarray) -> dict:
    """{(level, row): (tiles, records)}: every tile JPEG-XL d2, except those with
    (col + row) % 4 == 0, JPEG-XL lossless; each record's PSNR measured on the decoded
    tile's pixels inside the level, as the readers crop it."""
    import imagecodecs

    codec = get_codec("jpegxl", 2.0)
    out = {}
    for level, px in enumerate(_pyramid(image)):
        h, w = px.shape[:2]
        for row in range(math.ceil(h / TILE)):
            tiles, recs = [], []
            for col in range(math.ceil(w / TILE)):
                region = px[row * TILE:(row + 1) * TILE, col * TILE:(col + 1) * TILE]
                pad = np.pad(region, ((0, TILE - region.shape[0]), (0, TILE - region.shape[1]),
                                      (0, 0)), mode="edge")
                if (col + row) % 4 == 0:
                    data, kind = bytes(imagecodecs.jpegxl_encode(pad, lossless=True)), "jpegxl-lossless"
                else:
                    data, kind = codec.encode(pad), "jpegxl"
                got = codec.decode(data)[:region.shape[0], :region.shape[1]]
                tiles.append(data)
                recs.append(TileRecord(kind, psnr(got, region)))
            out[level, row] = (tiles, recs)
    return out


def _write(path: Path, image: np.ndarray, coded: dict, order=None, **kw) -> ContainerMetadata:
    """Write ``coded`` rows in ``order`` (default: last row of the last level first)."""
    with ContainerWriter(path, _meta(image), **kw) as w:
        for key in order or sorted(coded, reverse=True):
            if key not in w.done_rows():
                w.write_row(*key, *coded[key])
        return w.commit()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:301, 0:219]
    img = np.stack([(x * 3 + y) % 256, (y * 2) % 256, (x ^ y) % 256], axis=-1)
    return np.clip(img + rng.integers(0, 8, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def coded(image: np.ndarray) -> dict:
    return _coded(image)


@pytest.fixture(scope="module")
def container(image, coded, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fid") / "f.zarr"
    _write(out, image, coded)
    return out


def _expected(coded: dict, level: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = sorted(r for lv, r in coded if lv == level)
    kind = np.array([[KINDS.index(t.kind) for t in coded[level, r][1]] for r in rows])
    p = np.array([[t.psnr for t in coded[level, r][1]] for r in rows], np.float32)
    nbytes = np.array([[len(b) for b in coded[level, r][0]] for r in rows])
    return kind, p, nbytes


@pytest.mark.parametrize("name", ["f.zarr", "f.zarr.zip"])
def test_records_round_trip_rows_out_of_order(tmp_path: Path, image, coded, name) -> None:
    out = tmp_path / name
    order = sorted(coded, key=lambda k: (-k[1], k[0]))   # bottom rows first, levels interleaved
    meta = _write(out, image, coded, order=order)
    assert meta.level_bytes == tuple(sum(len(b) for (lv, _), (t, _) in coded.items()
                                         for b in t if lv == level) for level in (0, 1))
    with open_container(out) as c:
        assert c.metadata.format_version == 4 and c.metadata.tile_kinds == KINDS
        assert c._group.attrs["wsicodec"]["tile_kinds"] == list(KINDS)
        for level in (0, 1):
            rec = c.tile_records(level)
            assert isinstance(rec, TileRecords) and rec.kind_names == KINDS
            kind, p, nbytes = _expected(coded, level)
            assert rec.shape == (c.grid(level).rows, c.grid(level).cols)
            assert rec.kind.dtype == np.uint8 and rec.psnr.dtype == np.float32
            assert rec.nbytes.dtype == np.uint32
            np.testing.assert_array_equal(rec.kind, kind)
            np.testing.assert_array_equal(rec.psnr, p)
            np.testing.assert_array_equal(rec.nbytes, nbytes)
            src = _pyramid(image)[level]
            for col, row in c.grid(level):          # what the records say is what readers show
                assert rec.nbytes[row, col] == len(c.read_encoded_tile(level, col, row))
                region = src[row * TILE:(row + 1) * TILE, col * TILE:(col + 1) * TILE]
                shown = c.read_tile(level, col, row)[:region.shape[0], :region.shape[1]]
                want = psnr(shown, region)
                got = rec.record(col, row)
                assert got.psnr == pytest.approx(want, rel=1e-6) or got.psnr == want == math.inf
                assert (got.kind == "jpegxl-lossless") == (want == math.inf)
    assert verify(out, decode=True).ok


def test_resume_restores_records(tmp_path: Path, image, coded) -> None:
    out = tmp_path / "r.zarr"
    keys = sorted(coded)
    with pytest.raises(KeyboardInterrupt):
        with ContainerWriter(out, _meta(image)) as w:
            for key in keys[:4]:
                w.write_row(*key, *coded[key])
            raise KeyboardInterrupt
    (partial,) = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    journal = partial / JOURNAL
    lines = journal.read_text().splitlines()
    first = json.loads(lines[1])
    assert first["records"]["kind"] == [KINDS.index(t.kind) for t in coded[keys[0]][1]]
    assert first["records"]["psnr"][0] is None            # the lossless tile: inf as null
    # row keys[1]'s line with records no reader may take: that row is encoded again
    bad = json.loads(lines[2])
    bad["records"]["psnr"][1] = -3.0
    lines[2] = json.dumps(bad)
    journal.write_text("\n".join(lines) + "\n" + '{"level": 0, "row": 4, "cr')   # torn last line
    with ContainerWriter(out, _meta(image), resume=True) as w:
        assert w.done_rows() == {keys[0], keys[2], keys[3]}
        for key in keys:
            if key not in w.done_rows():
                w.write_row(*key, *coded[key])
        meta = w.commit()
    with open_container(out) as c:
        for level in (0, 1):
            kind, p, nbytes = _expected(coded, level)
            rec = c.tile_records(level)
            np.testing.assert_array_equal(rec.kind, kind)
            np.testing.assert_array_equal(rec.psnr, p)
            np.testing.assert_array_equal(rec.nbytes, nbytes)
            assert meta.level_bytes[level] == int(nbytes.sum())


def test_a_row_written_again_replaces_its_records_and_bytes(tmp_path: Path, image, coded) -> None:
    out = tmp_path / "again.zarr"
    with ContainerWriter(out, _meta(image)) as w:
        tiles, recs = coded[0, 1]
        w.write_row(0, 1, [b"\xff\x0a" + b"\0" * 50] * len(tiles), [TileRecord("glass", 1.0)] * len(tiles))
        for key in sorted(coded):
            w.write_row(*key, *coded[key])
        meta = w.commit()
    with open_container(out) as c:
        np.testing.assert_array_equal(c.tile_records(0).kind, _expected(coded, 0)[0])
        assert meta.level_bytes[0] == int(_expected(coded, 0)[2].sum())
    assert verify(out).ok


def _copy(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    return dest


@pytest.mark.parametrize("array,edit", [
    ("psnr", lambda a: a.__setitem__((1, 2), a[1, 2] + 0.5)),
    ("psnr", lambda a: a.__setitem__((0, 0), 12.0)),            # an exact tile made lossy
    ("kind", lambda a: a.__setitem__((2, 1), (a[2, 1] + 1) % 4)),
    ("nbytes", lambda a: a.__setitem__((3, 3), a[3, 3] + 1)),
])
def test_forged_map_is_refused_naming_the_level(tmp_path: Path, container: Path, array, edit,
                                                capsys) -> None:
    out = _copy(container, tmp_path / "forged.zarr")
    dtype = {"psnr": "<f4", "kind": "u1", "nbytes": "<u4"}[array]
    chunk = out / "levels" / "0" / array / "c" / "0" / "0"
    with open_container(out) as c:
        shape = (c.grid(0).rows, c.grid(0).cols)
    a = np.frombuffer(chunk.read_bytes(), dtype).reshape(shape).copy()
    edit(a)
    chunk.write_bytes(a.tobytes())
    with open_container(out) as c:
        with pytest.raises(CorruptDataError, match="level 0.*fidelity map"):
            c.tile_records(0)
        with pytest.raises(CorruptDataError, match="level 0"):
            c.read_tile(0, 0, 0)
        assert c.tile_records(1).shape == (3, 2)           # the other level still reads
        info = c.info()
    assert "level 0" in info["fidelity"]["error"]
    result = verify(out)
    assert not result.ok and [lv for lv, _, _ in result.damaged_levels] == [0]
    assert main(["info", str(out)]) == 0
    assert "fidelity map: damaged" in capsys.readouterr().out


def _reforge(out: Path, level: int, array: str, values: np.ndarray) -> None:
    """Store ``values`` as a level's ``array`` and recompute its level digest and the
    metadata digest, as a deliberate editor would."""
    chunk = out / "levels" / str(level) / array / "c" / "0" / "0"
    chunk.write_bytes(values.tobytes())
    doc = json.loads((out / "zarr.json").read_text())
    attrs = doc["attributes"]["wsicodec"]
    base = out / "levels" / str(level)
    shape = values.shape
    digest = np.frombuffer((base / "digest/c/0/0/0").read_bytes(), np.uint8).reshape(shape + (16,))
    recs = tuple(np.frombuffer((base / f"{n}/c/0/0").read_bytes(), d).reshape(shape)
                 for n, d in (("kind", "u1"), ("psnr", "<f4"), ("nbytes", "<u4")))
    attrs["levels"][level]["tiles_digest"] = level_digest(attrs["container_id"], level, digest, recs)
    attrs["metadata_digest"] = metadata_digest(attrs)
    (out / "zarr.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("array,value,message", [
    ("kind", 9, "kind index 9"), ("psnr", np.nan, "NaN"), ("psnr", -1.0, "NaN, negative"),
    ("nbytes", 7, "summing to"),
])
def test_forged_map_with_digests_recomputed_is_still_checked(tmp_path: Path, container: Path,
                                                            array, value, message) -> None:
    out = _copy(container, tmp_path / "reforged.zarr")
    dtype = {"psnr": "<f4", "kind": "u1", "nbytes": "<u4"}[array]
    a = np.frombuffer((out / f"levels/1/{array}/c/0/0").read_bytes(), dtype).reshape(3, 2).copy()
    a[1, 1] = value
    _reforge(out, 1, array, a)
    with open_container(out) as c:
        with pytest.raises(CorruptDataError, match=f"level 1's fidelity map holds .*{message}"):
            c.tile_records(1)


def test_nbytes_are_checked_against_each_tile(tmp_path: Path, container: Path) -> None:
    """Sizes swapped between two tiles (sum unchanged, digests recomputed): the tile read
    says its size differs from its record."""
    out = _copy(container, tmp_path / "sizes.zarr")
    a = np.frombuffer((out / "levels/1/nbytes/c/0/0").read_bytes(), "<u4").reshape(3, 2).copy()
    assert a[0, 0] != a[0, 1]
    a[0, 0], a[0, 1] = a[0, 1], a[0, 0]
    _reforge(out, 1, "nbytes", a)
    with open_container(out) as c:
        with pytest.raises(CorruptTileError, match="level=1 col=0 row=0 holds .* fidelity record"):
            c.read_encoded_tile(1, 0, 0)
    result = verify(out)
    assert [(lv, col, row) for lv, col, row, _ in result.damaged_tiles] == [(1, 0, 0), (1, 1, 0)]


def test_write_row_checks_records(tmp_path: Path, image, coded) -> None:
    tiles, recs = coded[0, 0]
    with ContainerWriter(tmp_path / "w.zarr", _meta(image)) as w:
        for bad, match in ((None, "4 tile records needed"), (recs[:3], "got 3"),
                           (recs[:3] + [TileRecord("jpegxl2", 30.0)], "'jpegxl2' is not one of"),
                           (recs[:3] + [TileRecord("jpegxl", math.nan)], "psnr must be in"),
                           (recs[:3] + [TileRecord("jpegxl", True)], "number of dB"),
                           (recs[:3] + [TileRecord("jpegxl", "30")], "number of dB"),
                           (recs[:3] + [TileRecord("jpegxl", -1.0)], "psnr must be in"),
                           (recs[:3] + [("jpegxl", 30.0)], "not a TileRecord")):
            with pytest.raises(InvalidSettingError, match=match):
                w.write_row(0, 0, tiles, bad)
        assert w.written_tiles == 0                      # nothing of a refused row is stored
        w.write_row(0, 0, tiles, recs[:3] + [TileRecord("glass", np.float32(41.5))])
    meta3 = replace(_meta(image), tile_kinds=())
    with ContainerWriter(tmp_path / "w3.zarr", meta3) as w:
        with pytest.raises(InvalidSettingError, match="names no tile_kinds"):
            w.write_row(0, 0, tiles, recs)
    for kinds, match in ((("Learned",), "lower-case"), (("a", "a"), "twice"),
                         (tuple(f"k{i}" for i in range(17)), "1 to 16"), (("x" * 33,), "lower-case")):
        with pytest.raises(InvalidSettingError, match=match):
            ContainerWriter(tmp_path / "k.zarr", _meta(image, kinds))
    assert list(tmp_path.iterdir()) == []


def test_format_3_is_unchanged(tmp_path: Path, image, coded) -> None:
    out = tmp_path / "three.zarr"
    meta = replace(_meta(image), tile_kinds=())
    with ContainerWriter(out, meta) as w:
        for key, (tiles, _) in sorted(coded.items()):
            w.write_row(*key, tiles)
        w.commit()
    assert not (out / "levels/0/psnr").exists() and not (out / "levels/0/kind").exists()
    with open_container(out) as c:
        attrs = c._group.attrs["wsicodec"]
        assert attrs["format_version"] == 3 and "tile_kinds" not in attrs
        assert sorted(attrs) == sorted([
            "format", "format_version", "software", "codec", "model_sha256", "tile_size",
            "tile_padding", "levels", "level_bytes", "mpp", "objective_power", "source",
            "properties", "associated_images", "associated_formats", "associated_bytes",
            "container_id", "associated_digests", "metadata_digest"])
        assert c.tile_records(0) is None and c.tile_records(1) is None
        assert "fidelity" not in c.info()
        digest = np.asarray(c._group["levels/0/digest"][...])
        assert level_digest(attrs["container_id"], 0, digest) == attrs["levels"][0]["tiles_digest"]
    assert verify(out).ok


def _attrs(container: Path) -> dict:
    return json.loads((container / "zarr.json").read_text())["attributes"]["wsicodec"]


def test_metadata_validates_tile_kinds(container: Path, monkeypatch) -> None:
    good = _attrs(container)
    assert ContainerMetadata.from_attrs(good).tile_kinds == KINDS
    for edit, match in (
            (lambda a: a.pop("tile_kinds"), "tile_kinds must be a list"),
            (lambda a: a.update(tile_kinds=[]), "tile_kinds must be a list"),
            (lambda a: a.update(tile_kinds="jpegxl"), "tile_kinds must be a list"),
            (lambda a: a.update(tile_kinds=["jpegxl", "jpegxl"]), "twice"),
            (lambda a: a.update(tile_kinds=["JPEGXL"]), "lower-case"),
            (lambda a: a.update(tile_kinds=[3]), "lower-case"),
            (lambda a: a.update(tile_kinds=[f"k{i}" for i in range(17)]), "1 to 16"),
            (lambda a: a.update(format_version=3), "tile_kinds in a format-3 container")):
        attrs = json.loads(json.dumps(good))
        edit(attrs)
        attrs["metadata_digest"] = metadata_digest(attrs)
        with pytest.raises(CorruptDataError, match=match):
            ContainerMetadata.from_attrs(attrs)
    # a wsicodec that reads formats 1-3 refuses format 4
    monkeypatch.setattr("wsicodec.metadata.SUPPORTED_VERSIONS", (1, 2, 3))
    with pytest.raises(UnsupportedFormatError, match="version 4 is not supported"):
        open_container(container)


def _map(level: int, kind, p, nbytes) -> TileRecords:
    return TileRecords(level, KINDS, np.array(kind, np.uint8), np.array(p, np.float32),
                       np.array(nbytes, np.uint32))


def test_summarize() -> None:
    inf = math.inf
    level0 = _map(0, [[1, 1, 2, 3], [0, 1, 2, 2]], [[30, 32, 40, inf], [inf, 31, 45, 50]],
                  [[100, 100, 200, 600], [10, 100, 300, 590]])
    level1 = _map(1, [[3, 3]], [[inf, inf]], [[700, 300]])
    s = summarize([level0, level1])
    json.dumps(s, allow_nan=False)
    a = s["all"]
    assert a["tiles"] == 10 and a["bytes"] == 3000
    assert a["psnr_min"] == 30 and a["psnr_p5"] == 30 and a["psnr_median"] == 45
    assert a["exact_tiles"] == 4 and a["lossless_tiles"] == 4     # the kind-3 tiles are exact
    assert a["kinds"]["learned"] == {"tiles": 3, "bytes": 300, "tile_share": 0.3, "byte_share": 0.1}
    assert a["kinds"]["jpegxl-lossless"]["byte_share"] == round(1600 / 3000, 4)
    lv0, lv1 = s["levels"]
    assert lv0["level"] == 0 and lv0["psnr_median"] == 40 and lv0["lossless_tiles"] == 2
    assert lv1["psnr_min"] is None and lv1["psnr_median"] is None and lv1["lossless_tiles"] == 2
    # a kind named lossless counts even when its PSNR is finite (e.g. a lossless tile of a
    # lossy-resampled level measured against the source)
    assert summarize([_map(0, [[3, 1]], [[60, 30]], [[1, 1]])])["all"]["lossless_tiles"] == 1
    with pytest.raises(ValueError):
        summarize([])


def test_info_text_and_json(container: Path, coded, capsys, tmp_path: Path) -> None:
    assert main(["info", str(container)]) == 0
    out = capsys.readouterr().out
    assert "container v4" in out
    finite = sorted(t.psnr for (lv, _), (_, recs) in coded.items() for t in recs
                    if t.psnr != math.inf)
    lossless = sum(t.kind == "jpegxl-lossless" for _, recs in coded.values() for t in recs)
    tiles = sum(len(recs) for _, recs in coded.values())
    line = next(ln for ln in out.splitlines() if "fidelity (per-tile PSNR" in ln)
    assert f"min {round(float(np.float32(finite[0])), 3):.2f} dB" in line, line
    exact = sum(t.psnr == math.inf for _, recs in coded.values() for t in recs)
    assert f"{exact} of {tiles} tiles decode exactly; {lossless} of {tiles} needed a lossless codec" in line
    kinds = next(ln for ln in out.splitlines() if ln.strip().startswith("tile kinds:"))
    assert "glass 0.0% of tiles" in kinds and "jpegxl-lossless" in kinds
    assert main(["info", str(container), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format_version"] == 4 and info["tile_kinds"] == list(KINDS)
    assert info["fidelity"]["all"]["tiles"] == tiles
    assert info["fidelity"]["all"]["lossless_tiles"] == lossless
    assert [lv["level"] for lv in info["fidelity"]["levels"]] == [0, 1]
    assert main(["verify", str(container)]) == 0
    assert "checked (CRC32, digest, fidelity map)" in capsys.readouterr().out


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_fidelity_endpoint(container: Path, coded, image, tmp_path: Path) -> None:
    from wsicodec.server import make_server, serve_in_thread

    three = tmp_path / "three.zarr"
    with ContainerWriter(three, replace(_meta(image), tile_kinds=())) as w:
        for key, (tiles, _) in sorted(coded.items()):
            w.write_row(*key, tiles)
        w.commit()
    damaged = _copy(container, tmp_path / "damaged.zarr")
    chunk = damaged / "levels/1/psnr/c/0/0"
    chunk.write_bytes(chunk.read_bytes()[:-4] + np.float32(99.0).tobytes())
    server = make_server([container, three, damaged], port=0)
    serve_in_thread(server)
    try:
        url = server.url
        status, slides = _get(url + "slides")
        index = {s["name"]: s["fidelity"] for s in slides}
        assert index["three"] is None
        assert index["f"]["kinds"] == list(KINDS)
        assert [lv["url"] for lv in index["f"]["levels"]] == ["/slides/f/fidelity/0.json",
                                                               "/slides/f/fidelity/1.json"]
        status, body = _get(url + "slides/f/fidelity/0.json")
        assert status == 200
        kind, p, nbytes = _expected(coded, 0)
        assert (body["cols"], body["rows"], body["tile_size"]) == (4, 5, TILE)
        assert (body["width"], body["height"], body["downsample"]) == (219, 301, 1.0)
        assert body["kinds"] == list(KINDS) and body["kind"] == kind.tolist()
        assert body["nbytes"] == nbytes.tolist()
        for row in range(5):
            for col in range(4):
                want = float(p[row, col])
                got = body["psnr"][row][col]
                assert (got is None) if want == math.inf else got == pytest.approx(want, abs=0.006)
        assert _get(url + "slides/three/fidelity/0.json")[0] == 404
        assert _get(url + "slides/f/fidelity/2.json")[0] == 404
        assert _get(url + "slides/nope/fidelity/0.json")[0] == 404
        assert _get(url + "slides/f/fidelity/x.json")[0] == 400
        assert _get(url + "slides/damaged/fidelity/0.json")[0] == 200
        status, body = _get(url + "slides/damaged/fidelity/1.json")
        assert status == 500 and "level 1" in body["error"], body
    finally:
        server.shutdown()
        server.server_close()
