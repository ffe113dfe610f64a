"""No command destroys an input (issue #26): an output that is an input, lies in an input
folder, holds an input, or whose hidden temporary siblings are an input, is refused with
one line and exit 1, whatever the flags; the input's bytes stay as they were.
And compress's tile size: bounded, fitted to a small slide, refused before any work."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REAL_SLIDES, need
from wsicodec.cli import main
from wsicodec.errors import InvalidSettingError, OutputPathError
from wsicodec.paths import check_output_against_inputs, slide_inputs

FAST = ("--codec", "jpegxl", "--option", "effort=1", "--workers", "1", "--quiet")


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def digest(path: Path) -> dict[str, str]:
    """md5 of a file, or of every file under a folder (by relative path)."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.md5(path.read_bytes()).hexdigest()}
    return {str(f.relative_to(path)): hashlib.md5(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def refused(capsys, argv: list[object], *fragments: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 1, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsicodec: error: "), err
    assert "refusing to write" in lines[0], lines[0]
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture
def slide(tmp_path: Path) -> Path:
    """A copy of the small generic TIFF, in its own folder."""
    d = tmp_path / "in"
    d.mkdir()
    return Path(shutil.copy(need(REAL_SLIDES["generic-tiff"]), d / "s.tiff"))


@pytest.fixture
def container(tmp_path: Path, slide: Path, capsys) -> Path:
    out = tmp_path / "c.zarr.zip"
    code, _, err = run(capsys, "compress", slide, out, *FAST)
    assert code == 0, err
    return out


def hidden_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- compress -------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [(), ("--overwrite",), ("--overwrite", "--resume")])
def test_compress_onto_its_input_is_refused(slide: Path, capsys, flags) -> None:
    before = digest(slide)
    refused(capsys, ["compress", slide, slide, *FAST, *flags], "same file")
    assert digest(slide) == before and hidden_entries(slide.parent) == []


def test_compress_onto_a_link_to_its_input_is_refused(slide: Path, capsys) -> None:
    before = digest(slide)
    (slide.parent / "sym.zarr.zip").symlink_to(slide)
    os.link(slide, slide.parent / "hard.zarr.zip")
    refused(capsys, ["compress", slide, slide.parent / "sym.zarr.zip", *FAST, "--overwrite"])
    refused(capsys, ["compress", slide, slide.parent / "hard.zarr.zip", *FAST, "--overwrite"])
    # a link to the output's folder is seen through too
    (slide.parent.parent / "alias").symlink_to(slide.parent)
    refused(capsys, ["compress", slide, slide.parent.parent / "alias" / "s.tiff", *FAST,
                     "--overwrite"])
    assert digest(slide) == before and (slide.parent / "sym.zarr.zip").is_symlink()


def test_compress_into_a_folder_holding_its_input_is_refused(slide: Path, capsys) -> None:
    before = digest(slide)
    refused(capsys, ["compress", slide, slide.parent, *FAST, "--overwrite"], "lies inside it")
    refused(capsys, ["compress", slide, slide.parent.parent, *FAST, "--overwrite"])
    refused(capsys, ["compress", slide, slide.parent / "..", *FAST, "--overwrite"])
    assert digest(slide) == before


def test_compress_into_a_dicom_slides_folder_is_refused(tmp_path: Path, capsys) -> None:
    src_dir = need(REAL_SLIDES["dicom"]).parent
    folder = Path(shutil.copytree(src_dir, tmp_path / "dicom"))
    before = digest(folder)
    first = folder / REAL_SLIDES["dicom"].name
    other = sorted(p for p in folder.glob("*.dcm") if p != first)[0]
    for out in (folder / "x.zarr.zip", folder / "x.zarr", other):
        refused(capsys, ["compress", first, out, *FAST, "--overwrite"], "input folder")
    assert digest(folder) == before
    assert slide_inputs(first) == [first, folder]


def test_compress_whose_temporary_siblings_would_be_its_input_is_refused(
        tmp_path: Path, slide: Path, capsys) -> None:
    """A writer of OUT sweeps ``.OUT.old-*`` and takes ``.OUT.partial-*`` over: an input
    there would go."""
    out = tmp_path / "o.zarr.zip"
    code, _, err = run(capsys, "compress", slide, out, *FAST)
    assert code == 0, err
    old = Path(shutil.copy(slide, tmp_path / ".o.zarr.zip.old-1234abcd"))
    partial = tmp_path / ".o.zarr.zip.partial-1234abcd.d"
    partial.mkdir()
    inner = Path(shutil.copy(slide, partial / "s.tiff"))
    before = digest(old), digest(inner)
    refused(capsys, ["compress", old, out, *FAST, "--overwrite"], "hidden temporary files")
    refused(capsys, ["compress", inner, out, *FAST, "--overwrite", "--resume"])
    assert (digest(old), digest(inner)) == before


def test_library_compress_refuses_too(slide: Path) -> None:
    from wsicodec.codecs import get_codec
    from wsicodec.pipeline import compress, compress_source
    from wsicodec.tiling import open_source

    before = digest(slide)
    with pytest.raises(OutputPathError):
        compress(slide, slide, get_codec("jpegxl"), overwrite=True)
    with open_source(slide) as src, pytest.raises(OutputPathError):
        compress_source(src, slide.parent, get_codec("jpegxl"), overwrite=True)
    assert digest(slide) == before


# -- decompress -----------------------------------------------------------------------

def test_decompress_onto_its_container_is_refused(container: Path, capsys) -> None:
    before = digest(container)
    refused(capsys, ["decompress", container, container, "--overwrite", "--quiet"], "same file")
    (container.parent / "sym.tiff").symlink_to(container)
    refused(capsys, ["decompress", container, container.parent / "sym.tiff", "--overwrite"])
    refused(capsys, ["decompress", container, container.parent, "--overwrite"],
            "lies inside it")
    assert digest(container) == before
    assert not [p for p in hidden_entries(container.parent) if "partial" in p]


def test_decompress_into_or_onto_a_directory_container_is_refused(
        tmp_path: Path, slide: Path, capsys) -> None:
    box = tmp_path / "d.zarr"
    code, _, err = run(capsys, "compress", slide, box, *FAST)
    assert code == 0, err
    before = digest(box)
    refused(capsys, ["decompress", box, box, "--overwrite"], "same folder")
    refused(capsys, ["decompress", box, box / "x.tiff"], "input folder")
    refused(capsys, ["decompress", box, box / "levels" / "0" / "x.tiff", "--overwrite"])
    assert digest(box) == before


def test_decompress_elsewhere_still_works(tmp_path: Path, container: Path, capsys) -> None:
    code, _, err = run(capsys, "decompress", container, tmp_path / "x.tiff", "--quiet")
    assert code == 0, err
    code, _, err = run(capsys, "decompress", container, tmp_path / "x.tiff", "--quiet",
                       "--overwrite")
    assert code == 0, err


def test_check_output_against_inputs_paths_that_do_not_exist_yet(tmp_path: Path) -> None:
    check_output_against_inputs(tmp_path / "a" / "out.zarr", [tmp_path / "b" / "in.svs"])
    check_output_against_inputs(tmp_path / "in.svs.zarr.zip", [tmp_path / "in.svs"])
    with pytest.raises(OutputPathError):
        check_output_against_inputs(tmp_path / "x", [tmp_path / "x" / "y" / "in.svs"])
    with pytest.raises(OutputPathError):
        check_output_against_inputs(tmp_path / "a" / ".." / "in.svs", [tmp_path / "in.svs"])


# -- tile size --------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["8192", "4112", "100", "0"])
def test_tile_size_out_of_bounds_is_refused_before_any_work(tmp_path: Path, slide: Path,
                                                           capsys, size: str) -> None:
    t0 = time.perf_counter()
    code, _, err = run(capsys, "compress", slide, tmp_path / "t.zarr.zip", "--tile-size", size,
                       "--codec", "jpegxl")
    assert code == 1, err
    assert "tile size must be a multiple of 16 in [16, 4096]" in err and err.count("\n") == 1
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "t.zarr.zip").exists()


def test_tile_size_larger_than_the_slide_is_fitted(tmp_path: Path, capsys) -> None:
    """A 512 x 512 image with --tile-size 4096 is one 512 px tile: no 4096 px tile of
    padding is allocated or stored (the codec would need GBs for it)."""
    from PIL import Image

    from wsicodec.container import open_container

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (512, 512, 3), np.uint8)).save(tmp_path / "i.png")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, out, err = run(capsys, "compress", tmp_path / "i.png", tmp_path / "i.zarr.zip",
                         "--tile-size", "4096", "--codec", "jpegxl", "--option", "effort=1",
                         "--workers", "1")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert code == 0, err
    assert "tile size 512: --tile-size 4096 is more than this 512 x 512 px slide needs" in out
    assert grown_mb < 300, grown_mb
    with open_container(tmp_path / "i.zarr.zip") as c:
        assert c.tile_size == 512 and c.level_count == 1
    # a 300 x 250 slide: its longer side rounded up to 16
    code, out, err = run(capsys, "compress", need(REAL_SLIDES["generic-tiff"]),
                         tmp_path / "g.zarr", "--tile-size", "1024", *FAST)
    assert code == 0, err
    with open_container(tmp_path / "g.zarr") as c:
        assert c.tile_size == 304


def test_fitted_tile_size_and_check() -> None:
    from wsicodec.pipeline import check_tile_size, fitted_tile_size

    assert fitted_tile_size(256, [(4443, 3567)]) == 256
    assert fitted_tile_size(8192 // 2, [(512, 512)]) == 512
    assert fitted_tile_size(256, [(100, 7)]) == 112
    assert fitted_tile_size(256, [(3, 2)]) == 16
    for bad in (8, 17, 4112, 8192, True, 256.0):
        with pytest.raises(InvalidSettingError):
            check_tile_size(bad)  # type: ignore[arg-type]
