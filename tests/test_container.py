"""Container: layout, CRC per tile, atomic writes, version checks, damaged files."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from wsicodec.codecs import TileCodec, get_codec
from wsicodec.container import open_container
from wsicodec.errors import (CompressInterrupted, CorruptDataError, CorruptTileError,
                             ModelMismatchError, OutputExistsError, PartialKeptError,
                             SlideNotFoundError, UnsupportedFormatError)
from wsicodec.metadata import FORMAT_VERSION, ContainerMetadata
from wsicodec.pipeline import compress_source
from conftest import forge_digests
from wsicodec.tiling import ArraySource
from wsicodec.writer import JOURNAL, ContainerWriter

STORES = ["c.zarr", "c.zarr.zip"]


def make(tmp_path: Path, name: str, image: np.ndarray, **kw) -> Path:
    out = tmp_path / name
    src = ArraySource(image, mpp=(0.25, 0.25), properties={"x.key": "v"},
                      associated={"label": image[:20, :30]})
    compress_source(src, out, get_codec("jpeg", 95), tile_size=64, workers=2, **kw)
    return out


def tile_files(path: Path) -> list[Path]:
    return sorted(p for p in (path / "levels" / "0" / "tiles" / "c").rglob("*") if p.is_file())


@pytest.mark.parametrize("name", STORES)
def test_round_trip_metadata_and_tiles(tmp_path: Path, odd_image: np.ndarray, name: str) -> None:
    out = make(tmp_path, name, odd_image)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temp files left
    with open_container(out) as c:
        meta = c.metadata
        assert meta.codec == {"name": "jpeg", "configuration": {"quality": 95,
                                                                 "subsampling": "444"}}
        assert meta.tile_size == 64 and meta.mpp == (0.25, 0.25)
        assert [lv.dimensions for lv in meta.levels][:2] == [(219, 301), (110, 151)]
        assert meta.properties == {"x.key": "v"}
        assert meta.associated_images == ("label",)
        np.testing.assert_array_equal(c.read_associated_image("label"), odd_image[:20, :30])
        tile = c.read_tile(0, 3, 4)
        assert tile.shape == (64, 64, 3)
        assert np.abs(tile[:45, :27].astype(int) - odd_image[256:, 192:]).mean() < 3
        assert sum(meta.level_bytes) > 0
        info = c.info()
        json.dumps(info)
        assert info["format"] == "wsicodec" and info["format_version"] == FORMAT_VERSION


def test_flipped_byte_names_the_tile_and_others_still_read(tmp_path: Path,
                                                          odd_image: np.ndarray) -> None:
    out = make(tmp_path, "c.zarr", odd_image)
    victim = out / "levels" / "0" / "tiles" / "c" / "2" / "1"  # row 2, col 1
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    with open_container(out) as c:
        with pytest.raises(CorruptTileError, match="level=0 col=1 row=2") as info:
            c.read_tile(0, 1, 2)
        assert (info.value.level, info.value.col, info.value.row) == (0, 1, 2)
        for col, row in c.grid(0):
            if (col, row) != (1, 2):
                c.read_tile(0, col, row)


@pytest.mark.parametrize("damage", [b"\xff\xff\xff\x7f", b"", b"\x01\x00\x00\x00\xff\xff"])
def test_damaged_chunk_framing_is_a_quick_corrupt_tile(tmp_path: Path, odd_image: np.ndarray,
                                                       damage: bytes) -> None:
    """A tile chunk whose framing is damaged (a huge item count, emptied, a wrong length)
    fails at once: zarr's own vlen decoding took ~30 s and gigabytes for the first."""
    import time

    out = make(tmp_path, "c.zarr", odd_image)
    victim = out / "levels" / "0" / "tiles" / "c" / "2" / "1"
    victim.write_bytes(damage + victim.read_bytes()[len(damage):] if damage[:1] == b"\xff"
                       else damage)
    with open_container(out) as c:
        t0 = time.perf_counter()
        with pytest.raises(CorruptTileError, match="level=0 col=1 row=2"):
            c.read_tile(0, 1, 2)
        assert time.perf_counter() - t0 < 10.0       # a hang, not a speed target
        c.read_tile(0, 2, 2)


def test_missing_tile_file_is_a_corrupt_tile(tmp_path: Path, odd_image: np.ndarray) -> None:
    out = make(tmp_path, "c.zarr", odd_image)
    (out / "levels" / "1" / "tiles" / "c" / "0" / "0").unlink()
    with open_container(out) as c, pytest.raises(CorruptTileError, match="level=1 col=0 row=0"):
        c.read_encoded_tile(1, 0, 0)


def test_flipped_byte_in_zip_member(tmp_path: Path, odd_image: np.ndarray) -> None:
    out = make(tmp_path, "c.zarr.zip", odd_image)
    with zipfile.ZipFile(out) as zf:
        info = zf.getinfo("levels/0/tiles/c/0/0")
        offset = info.header_offset + 30 + len(info.filename) + len(info.extra)
    raw = bytearray(out.read_bytes())
    raw[offset + info.compress_size // 2] ^= 0x01
    out.write_bytes(bytes(raw))
    with open_container(out) as c:
        with pytest.raises(CorruptTileError, match="level=0 col=0 row=0"):
            c.read_tile(0, 0, 0)
        c.read_tile(0, 1, 0)


def test_truncated_zip_is_a_clear_error(tmp_path: Path, odd_image: np.ndarray) -> None:
    out = make(tmp_path, "c.zarr.zip", odd_image)
    out.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    with pytest.raises(CorruptDataError, match="truncated"):
        open_container(out)


def test_unknown_version_is_refused(tmp_path: Path, odd_image: np.ndarray) -> None:
    out = make(tmp_path, "c.zarr", odd_image)
    meta_path = out / "zarr.json"
    doc = json.loads(meta_path.read_text())
    doc["attributes"]["wsicodec"]["format_version"] = 99
    meta_path.write_text(json.dumps(doc))
    with pytest.raises(UnsupportedFormatError, match="version 99 is not supported"):
        open_container(out)


def test_not_a_container(tmp_path: Path) -> None:
    with pytest.raises(SlideNotFoundError):
        open_container(tmp_path / "nothing.zarr")
    with pytest.raises(UnsupportedFormatError):
        open_container(tmp_path)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(UnsupportedFormatError):
        open_container(tmp_path / "x.txt")


class Flaky(TileCodec):
    """The JPEG codec, counting its calls and raising ``error`` on call ``at``."""

    name = "jpeg"

    def __init__(self, quality: int = 95, at: int | None = None,
                 error: type[BaseException] = KeyboardInterrupt) -> None:
        self.codec, self.at, self.error, self.calls = get_codec("jpeg", quality), at, error, 0

    def encode(self, tile: np.ndarray) -> bytes:
        self.calls += 1
        if self.calls == self.at:
            raise self.error("stop")
        return self.codec.encode(tile)

    def decode(self, data: bytes, shape=None) -> np.ndarray:  # noqa: ANN001
        return self.codec.decode(data)

    def to_dict(self) -> dict:
        return self.codec.to_dict()


def source(image: np.ndarray) -> ArraySource:
    return ArraySource(image, mpp=(0.25, 0.25), properties={"x.key": "v"},
                       associated={"label": image[:20, :30]})


def tiles_of(path: Path) -> list[bytes]:
    with open_container(path) as c:
        return [b for lv in range(c.level_count) for _, _, b in c.iter_encoded_tiles(lv)]


@pytest.mark.parametrize("name", STORES)
@pytest.mark.parametrize("at,error", [(7, RuntimeError), (1, KeyboardInterrupt)])
def test_failed_write_leaves_nothing(tmp_path: Path, odd_image: np.ndarray, name: str,
                                     at: int, error: type[BaseException]) -> None:
    """A codec error removes everything; so does an interrupt before any row is done."""
    with pytest.raises(error):
        compress_source(source(odd_image), tmp_path / name, Flaky(at=at, error=error),
                        tile_size=64, workers=2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", STORES)
def test_interrupted_write_resumes_where_it_stopped(tmp_path: Path, odd_image: np.ndarray,
                                                    name: str) -> None:
    (tmp_path / "ref").mkdir()
    ref = make(tmp_path / "ref", name, odd_image)
    out = tmp_path / "run" / name
    out.parent.mkdir()
    with pytest.raises(CompressInterrupted) as info:
        compress_source(source(odd_image), out, Flaky(at=11), tile_size=64, workers=1)
    stop = info.value
    total = sum(1 for _ in tiles_of(ref))
    # tiles 1-10: level 0's rows 0 and 1 (4 tiles each) and level 1's row 0 (2), all finished
    assert stop.total == total and stop.done == 10
    assert not out.exists()
    [partial] = list(out.parent.iterdir())
    assert partial == Path(stop.partial) and partial.name.startswith(f".{name}.partial-")
    assert "--resume" not in str(stop) and str(partial) in str(stop)

    codec, seen = Flaky(), []
    meta = compress_source(source(odd_image), out, codec, tile_size=64, workers=1,
                           resume=True, progress=seen.append)
    assert codec.calls == total - 10                         # the kept rows were not coded again
    assert seen[0] == 10 and sum(seen) == total
    assert [p.name for p in out.parent.iterdir()] == [name]  # the partial became the output
    assert tiles_of(out) == tiles_of(ref)
    with open_container(out) as c:
        assert c.metadata.level_bytes == meta.level_bytes
        assert c.metadata.associated_images == ("label",)
        np.testing.assert_array_equal(c.read_associated_image("label"), odd_image[:20, :30])
    names = ([n for n in zipfile.ZipFile(out).namelist()] if name.endswith(".zip")
             else [str(p.relative_to(out)) for p in out.rglob("*")])
    assert not any(JOURNAL in n for n in names)


def test_a_full_disk_keeps_the_finished_rows_for_resume(tmp_path: Path,
                                                     odd_image: np.ndarray) -> None:
    """An OSError mid-write (ENOSPC) is worth another try: the rows stay, the error (still
    an OSError) says how many and where; a codec bug (RuntimeError) removes everything."""
    import errno

    out = tmp_path / "c.zarr.zip"
    full = OSError(errno.ENOSPC, "No space left on device")

    class DiskFull(Flaky):
        def encode(self, tile: np.ndarray) -> bytes:
            if self.calls == 10:
                self.calls += 1
                raise full
            return super().encode(tile)

    with pytest.raises(PartialKeptError) as info:
        compress_source(source(odd_image), out, DiskFull(), tile_size=64, workers=1)
    err = info.value
    assert isinstance(err, OSError) and err.__cause__ is full
    assert str(err).startswith("No space left on device; 10 of 29 tiles kept in ")
    assert Path(err.partial).is_dir() and not out.exists()
    codec = Flaky()
    compress_source(source(odd_image), out, codec, tile_size=64, workers=1, resume=True)
    assert codec.calls == 19 and [p.name for p in tmp_path.iterdir()] == [out.name]


@pytest.mark.parametrize("error", ["disk full", "ctrl-c"])
def test_a_failure_while_the_zip_is_packed_keeps_every_row(tmp_path: Path, odd_image: np.ndarray,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            error: str) -> None:
    """Packing ``OUT.zarr.zip`` needs the container's size again in free space: a full disk
    (or Ctrl-C) then keeps the finished directory store for --resume, which only packs it
    again, and leaves no torn zip anywhere."""
    import errno

    import wsicodec.writer as writer

    (tmp_path / "ref").mkdir()
    ref = make(tmp_path / "ref", "c.zarr.zip", odd_image)
    out = tmp_path / "run" / "c.zarr.zip"
    out.parent.mkdir()
    pack = writer.zip_directory

    def torn(src: Path, dest: Path, skip: str = "") -> None:
        dest.write_bytes(b"PK\x03\x04 half a zip")
        if error == "ctrl-c":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "zip_directory", torn)
    expected = CompressInterrupted if error == "ctrl-c" else PartialKeptError
    with pytest.raises(expected) as info:
        compress_source(source(odd_image), out, Flaky(), tile_size=64, workers=1)
    total = len(tiles_of(ref))
    assert info.value.done == total and not out.exists()
    [partial] = list(out.parent.iterdir())             # the directory store, no torn zip
    assert partial == Path(info.value.partial) and partial.is_dir() and (partial / JOURNAL).is_file()

    monkeypatch.setattr(writer, "zip_directory", pack)
    codec = Flaky()
    compress_source(source(odd_image), out, codec, tile_size=64, workers=1, resume=True)
    assert codec.calls == 0 and [p.name for p in out.parent.iterdir()] == [out.name]
    assert tiles_of(out) == tiles_of(ref)
    assert not any(JOURNAL in n for n in zipfile.ZipFile(out).namelist())


@pytest.mark.parametrize("name", STORES)
def test_what_a_writer_killed_after_the_move_left_is_swept_by_the_next(
        tmp_path: Path, odd_image: np.ndarray, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Killed once the output is in place but before the clean-up (the zip's directory
    store, the old output an overwrite set aside), the hidden leftovers hold the
    container's size again: the next writer of that output removes them, and keeps a
    partial write that can still be resumed."""
    import subprocess
    import sys
    import textwrap

    make(tmp_path, name, odd_image)
    out = tmp_path / name
    np.save(tmp_path / "image.npy", odd_image)
    # a second process overwrites the output and is killed (os._exit: no clean-up runs)
    # right after both renames of the move
    script = textwrap.dedent(f"""
        import os, sys
        import numpy as np
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import wsicodec.writer as writer
        from test_container import make

        def moved_then_killed(tmp, final):
            os.rename(final, final.with_name(f".{{final.name}}.old-0123abcd"))
            os.rename(tmp, final)
            os._exit(9)

        writer.move_into_place = moved_then_killed
        make(__import__("pathlib").Path({str(tmp_path)!r}), {name!r},
             np.load({str(tmp_path / "image.npy")!r}), overwrite=True)
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    (tmp_path / "image.npy").unlink()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != name)
    if name.endswith(".zip"):
        assert left[0] == f".{name}.old-0123abcd" and left[1].endswith(".d") and len(left) == 2
        assert (tmp_path / left[1] / JOURNAL).is_file()
    else:
        assert left == [f".{name}.old-0123abcd"]
    tiles = tiles_of(out)                                    # the new output is whole
    # an interrupted write of the same output stays for --resume
    with pytest.raises(CompressInterrupted) as info:
        compress_source(source(odd_image), tmp_path / name, Flaky(at=11), tile_size=64,
                        workers=1, overwrite=True)
    kept = Path(info.value.partial)
    assert kept.is_dir() and (kept / JOURNAL).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, kept.name])
    assert tiles_of(out) == tiles
    codec = Flaky()
    compress_source(source(odd_image), out, codec, tile_size=64, workers=1, overwrite=True, resume=True)
    assert codec.calls == len(tiles) - 10
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_ctrl_c_while_resume_checks_the_rows_keeps_them(tmp_path: Path, odd_image: np.ndarray,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "c.zarr"
    with pytest.raises(CompressInterrupted) as info:
        compress_source(source(odd_image), out, Flaky(at=11), tile_size=64, workers=1)

    def interrupted(self, line):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(ContainerWriter, "_check_journalled_row", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compress_source(source(odd_image), out, Flaky(), tile_size=64, workers=1, resume=True)
    assert [p.name for p in tmp_path.iterdir()] == [Path(info.value.partial).name]
    monkeypatch.undo()
    codec = Flaky()
    compress_source(source(odd_image), out, codec, tile_size=64, workers=1, resume=True)
    assert codec.calls == 19


def test_resume_checks_the_kept_rows(tmp_path: Path, odd_image: np.ndarray) -> None:
    """A kept tile that no longer matches its journalled CRC is coded again (its row);
    a torn last journal line is ignored."""
    ref = make(tmp_path, "ref.zarr", odd_image)
    out = tmp_path / "c.zarr"
    with pytest.raises(CompressInterrupted) as info:
        compress_source(source(odd_image), out, Flaky(at=11), tile_size=64, workers=1)
    partial = Path(info.value.partial)
    (partial / "levels" / "0" / "tiles" / "c" / "1" / "2").write_bytes(b"garbage")
    with open(partial / JOURNAL, "a") as f:
        f.write('{"level": 0, "row": 2, "cr')
    codec = Flaky()
    compress_source(source(odd_image), out, codec, tile_size=64, workers=1, resume=True)
    assert info.value.done == 10
    assert codec.calls == len(tiles_of(ref)) - 10 + 4        # level 0's row 1 coded again
    assert tiles_of(out) == tiles_of(ref)


def test_resume_needs_the_same_settings(tmp_path: Path, odd_image: np.ndarray) -> None:
    out = tmp_path / "c.zarr.zip"
    with pytest.raises(CompressInterrupted) as info:
        compress_source(source(odd_image), out, Flaky(at=11), tile_size=64, workers=1)
    other = Flaky(quality=80)
    compress_source(source(odd_image), out, other, tile_size=64, workers=1, resume=True)
    assert other.calls == sum(1 for _ in tiles_of(out))      # nothing taken over
    assert not Path(info.value.partial).exists()             # and, OUT complete, swept
    with pytest.raises(CompressInterrupted):                  # another source: same story
        compress_source(source(odd_image), tmp_path / "d.zarr", Flaky(at=11), tile_size=64,
                        workers=1, resume_key={"mtime_ns": 1})
    again = Flaky()
    compress_source(source(odd_image), tmp_path / "d.zarr", again, tile_size=64, workers=1,
                    resume=True, resume_key={"mtime_ns": 2})
    assert again.calls == sum(1 for _ in tiles_of(tmp_path / "d.zarr"))


@pytest.mark.parametrize("name", STORES)
def test_a_partial_left_by_kill_9_is_swept_once_out_is_written(tmp_path: Path,
                                                                odd_image: np.ndarray,
                                                                name: str) -> None:
    """A run killed outright (no chance to clean up) leaves its partial; the next run to the
    same OUT without --resume starts afresh and, once OUT is complete, removes it, leaving
    only a partial a live writer still holds."""
    out = tmp_path / name
    meta = ContainerMetadata(codec=get_codec("jpeg").to_dict(), tile_size=64,
                             levels=_levels(odd_image))
    killed = ContainerWriter(out, meta)
    killed.write_row(0, 0, [b"x"] * 4)
    killed._close_journal()              # what kill -9 leaves: files, no lock, no cleanup
    live = ContainerWriter(out, meta)    # another writer still at work on OUT
    compress_source(source(odd_image), out, get_codec("jpeg"), tile_size=64, workers=1)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([name, live._tmp_dir.name]), left
    live.abort()


def test_a_live_write_is_never_taken_over(tmp_path: Path, odd_image: np.ndarray) -> None:
    out = tmp_path / "c.zarr"
    meta = ContainerMetadata(codec=get_codec("jpeg").to_dict(), tile_size=64,
                             levels=_levels(odd_image))
    with ContainerWriter(out, meta) as first:
        first.write_row(0, 0, [b"x"] * 4)
        with ContainerWriter(out, meta, resume=True) as second:
            assert second.resumed_tiles == 0 and second.done_rows() == set()
            assert len(list(tmp_path.iterdir())) == 2
    assert list(tmp_path.iterdir()) == []


def _levels(image: np.ndarray) -> tuple:
    from wsicodec.tiling import plan_pyramid

    src = ArraySource(image)
    return tuple(lv.info for lv in plan_pyramid(src.level_dimensions, src.level_downsamples,
                                                64).levels)


def test_existing_output_needs_overwrite(tmp_path: Path, odd_image: np.ndarray) -> None:
    out = make(tmp_path, "c.zarr.zip", odd_image)
    with pytest.raises(OutputExistsError):
        make(tmp_path, "c.zarr.zip", odd_image)
    make(tmp_path, "c.zarr.zip", odd_image[:100, :100], overwrite=True)
    with open_container(out) as c:
        assert c.metadata.levels[0].dimensions == (100, 100)
    assert [p.name for p in tmp_path.iterdir()] == ["c.zarr.zip"]


def test_model_id_is_stored_and_checked(tmp_path: Path, odd_image: np.ndarray,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from wsicodec import container as container_mod

    codec = get_codec("jpeg")
    meta = ContainerMetadata(codec=codec.to_dict(), tile_size=64, model_id="a" * 64,
                             levels=ArraySourceLevels(odd_image))
    out = tmp_path / "m.zarr"
    with ContainerWriter(out, meta) as w:
        for lv, info in enumerate(meta.levels):
            g = info.grid(64)
            for row in range(g.rows):
                w.write_row(lv, row, [codec.encode(np.zeros((64, 64, 3), np.uint8))] * g.cols)
        w.commit()

    class OtherModel(TileCodec):
        name = "jpeg"
        model_id = "b" * 64

        def encode(self, tile: np.ndarray) -> bytes:
            return codec.encode(tile)

        def decode(self, data: bytes, shape=None) -> np.ndarray:  # noqa: ANN001
            return codec.decode(data)

        def to_dict(self) -> dict:
            return codec.to_dict()

    monkeypatch.setattr(container_mod, "codec_from_dict", lambda d, **local: OtherModel())
    with open_container(out) as c:
        assert c.metadata.model_id == "a" * 64
        with pytest.raises(ModelMismatchError, match="a{64}.*b{64}"):
            c.read_tile(0, 0, 0)


def ArraySourceLevels(image: np.ndarray):  # noqa: N802 - tiny helper
    from wsicodec.tiling import plan_pyramid

    h, w = image.shape[:2]
    return tuple(lv.info for lv in plan_pyramid([(w, h)], [1.0], 64).levels)


# --- associated images: the label exact, the overviews JPEG-XL, or as asked

def he_crop() -> np.ndarray:
    from PIL import Image

    from conftest import HE_TEST_PNG, need

    return np.asarray(Image.open(need(HE_TEST_PNG)).convert("RGB"))[:300, :400]


@pytest.mark.parametrize("policy", ["auto", "lossless", "none"])
def test_associated_policies(tmp_path: Path, odd_image: np.ndarray, policy: str) -> None:
    from conftest import psnr

    tissue = he_crop()
    src = ArraySource(odd_image, associated={"label": odd_image[:40, :50], "thumbnail": tissue,
                                             "macro": tissue[::2, ::2]})
    out = tmp_path / "c.zarr.zip"
    compress_source(src, out, get_codec("jpeg", 90), tile_size=64, associated=policy)
    with open_container(out) as c:
        meta = c.metadata
        if policy == "none":
            assert meta.associated_images == () and c.info()["associated_bytes"] == {}
            return
        assert meta.associated_images == ("label", "thumbnail", "macro")
        want = {"label": "png", "thumbnail": "jxl" if policy == "auto" else "png",
                "macro": "jxl" if policy == "auto" else "png"}
        assert meta.associated_formats == want
        np.testing.assert_array_equal(c.read_associated_image("label"), odd_image[:40, :50])
        thumb = c.read_associated_image("thumbnail")
        assert thumb.shape == tissue.shape and thumb.dtype == np.uint8
        if policy == "lossless":
            np.testing.assert_array_equal(thumb, tissue)
        else:   # distance 0.5: far above what an overview needs, far below PNG's bytes
            assert 36 < psnr(thumb, tissue) < 60
        stored = {n: c._group[f"associated/{n}"].shape[0] for n in meta.associated_images}
        assert meta.associated_bytes == stored
    if policy == "auto":
        png = tmp_path / "p.zarr"
        compress_source(src, png, get_codec("jpeg", 90), tile_size=64, associated="lossless")
        with open_container(png) as c:
            assert c.metadata.associated_bytes["thumbnail"] > 3 * stored["thumbnail"]


def test_unknown_associated_policy_fails_before_any_work(tmp_path: Path,
                                                         odd_image: np.ndarray) -> None:
    from wsicodec.errors import InvalidSettingError

    with pytest.raises(InvalidSettingError, match="'lossy' is not one of auto, lossless, none"):
        compress_source(ArraySource(odd_image), tmp_path / "c.zarr", get_codec("jpeg"),
                        associated="lossy")
    assert list(tmp_path.iterdir()) == []


def test_version_1_container_reads_png_associated(tmp_path: Path, odd_image: np.ndarray) -> None:
    """A container written before JPEG-XL associated images (format 1: no
    associated_formats, PNG bytes) still opens and reads."""
    out = make(tmp_path, "c.zarr", odd_image, associated="lossless")
    meta_path = out / "zarr.json"
    doc = json.loads(meta_path.read_text())
    attrs = doc["attributes"]["wsicodec"]
    attrs["format_version"] = 1
    del attrs["associated_formats"], attrs["associated_bytes"]
    meta_path.write_text(json.dumps(doc))
    with open_container(out) as c:
        assert c.metadata.associated_formats == {} and c.info()["format_version"] == 1
        np.testing.assert_array_equal(c.read_associated_image("label"), odd_image[:20, :30])


def test_associated_image_in_unknown_format_or_damaged(tmp_path: Path,
                                                       odd_image: np.ndarray) -> None:
    out = make(tmp_path, "c.zarr", odd_image)
    meta_path = out / "zarr.json"
    doc = json.loads(meta_path.read_text())
    doc["attributes"]["wsicodec"]["associated_formats"]["label"] = "avif"
    meta_path.write_text(json.dumps(doc))
    with pytest.raises(CorruptDataError, match="metadata_digest does not match"):
        open_container(out)        # an edit of the metadata is found at once ...
    forge_digests(out)             # ... and one made with the digests recomputed, on use
    with open_container(out) as c, pytest.raises(UnsupportedFormatError, match="'avif'"):
        c.read_associated_image("label")
    doc = json.loads(meta_path.read_text())
    doc["attributes"]["wsicodec"]["associated_formats"]["label"] = "jxl"   # PNG bytes, said JPEG-XL
    meta_path.write_text(json.dumps(doc))
    forge_digests(out)
    with open_container(out) as c:
        with pytest.raises(CorruptDataError, match="associated image 'label' damaged"):
            c.read_associated_image("label")
        c.read_tile(0, 0, 0)   # the tiles do not care
