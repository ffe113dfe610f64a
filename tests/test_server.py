"""DeepZoom through our reader (vs OpenSlide on the exported TIFF), the HTTP tile
server and ``wsicodec serve``."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from conftest import HE_TEST_PNG, REAL_SLIDES, need
from wsicodec.codecs import get_codec
from wsicodec.pipeline import compress, compress_source
from wsicodec.readback import decompress
from wsicodec.server import ServerSettings, make_server, serve_in_thread, slide_name
from wsicodec.slide import open_slide
from wsicodec.tiff import TiffSettings
from wsicodec.tiling import ArraySource


@pytest.fixture(scope="module")
def real_jpeg(tmp_path_factory: pytest.TempPathFactory):
    """The CMU SVS region as a JPEG-tile container, and its lossless TIFF export."""
    d = tmp_path_factory.mktemp("serve")
    out = d / "cmu.zarr.zip"
    compress(need(REAL_SLIDES["svs-jpeg"]), out, get_codec("jpeg", 90), workers=2)
    tiff = d / "cmu.tiff"
    decompress(out, tiff, settings=TiffSettings("zlib"), workers=2)
    return out, tiff


@pytest.fixture(scope="module")
def tiny_learned(tmp_path_factory: pytest.TempPathFactory):
    """A 200x170 crop of a real H&E image, learned codec, 64-px tiles."""
    rgb = np.asarray(Image.open(need(HE_TEST_PNG)).convert("RGB"))[:170, :200].copy()
    d = tmp_path_factory.mktemp("serve")
    out = d / "tiny.zarr.zip"
    compress_source(ArraySource(rgb, mpp=(0.25, 0.25)), out, get_codec("learned", 4),
                    tile_size=64, workers=1)
    tiff = d / "tiny.tiff"
    decompress(out, tiff, settings=TiffSettings("zlib"), workers=1)
    return out, tiff


def _deepzoom_pairs(ours_path, tiff_path, tile_size, overlap):
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    with open_slide(ours_path) as ours, openslide.OpenSlide(str(tiff_path)) as ref:
        assert ours.level_dimensions == ref.level_dimensions
        dz_ours = DeepZoomGenerator(ours, tile_size=tile_size, overlap=overlap)
        dz_ref = DeepZoomGenerator(ref, tile_size=tile_size, overlap=overlap)
        assert dz_ours.level_count == dz_ref.level_count
        assert dz_ours.level_tiles == dz_ref.level_tiles
        assert dz_ours.get_dzi("jpeg") == dz_ref.get_dzi("jpeg")
        for level in range(dz_ours.level_count):
            cols, rows = dz_ours.level_tiles[level]
            addrs = {(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2)}
            for addr in sorted(addrs):
                args, _ = dz_ref._get_tile_info(level, addr)
                yield (level, addr, args[1]), np.asarray(dz_ours.get_tile(level, addr)), \
                    np.asarray(dz_ref.get_tile(level, addr))


def _check_deepzoom(pairs, exact_tol: int) -> int:
    """Tiles read from slide level 0 match OpenSlide's to ``exact_tol``.  On the other
    levels OpenSlide places a region at fractional level coordinates (level-0 x divided
    by a downsample like 1.9997) and resamples it by that sub-pixel shift, where we
    (like tiffslide) take the pixel grid: close, not equal."""
    from conftest import psnr

    n = 0
    for (level, addr, slide_level), a, b in pairs:
        assert a.shape == b.shape, (level, addr)
        if slide_level == 0:
            assert np.abs(a.astype(int) - b.astype(int)).max() <= exact_tol, (level, addr)
        else:
            assert psnr(a, b) > 28, (level, addr, psnr(a, b))
        n += 1
    return n


@pytest.mark.parametrize("tile_size,overlap", [(254, 1), (256, 0)])
def test_deepzoom_matches_openslide_on_exported_tiff(real_jpeg, tile_size, overlap) -> None:
    assert _check_deepzoom(_deepzoom_pairs(*real_jpeg, tile_size, overlap), 0) >= 20


def test_deepzoom_on_learned_container(tiny_learned) -> None:
    # the TIFF holds our decoded tiles; g_s batch effects only (<= 1 level)
    assert _check_deepzoom(_deepzoom_pairs(*tiny_learned, 254, 1), 1) >= 9


def test_openslide_surface(tiny_learned) -> None:
    with open_slide(tiny_learned[0]) as s:
        for name in ("dimensions", "level_count", "level_dimensions", "level_downsamples",
                     "properties", "associated_images", "color_profile"):
            getattr(s, name)
        for key in ("openslide.mpp-x", "openslide.mpp-y", "openslide.vendor"):
            assert key in s.properties
        s.set_cache(object())
        assert type(s).detect_format(tiny_learned[0]) == "wsicodec"
        assert type(s).detect_format(tiny_learned[1]) is None
        region = s.read_region((10, 10), 0, (30, 20))
        assert region.mode == "RGBA" and region.size == (30, 20)
        assert len(s.read_encoded_tile(0, 0, 0)) > 10


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


@pytest.fixture(scope="module")
def server(real_jpeg, tiny_learned, tmp_path_factory):
    from test_batch import _damage

    bad = _damage(real_jpeg[0], tmp_path_factory.mktemp("bad"), "levels/0/tiles/c/1/1")
    srv = make_server([real_jpeg[0], tiny_learned[0], bad], port=0,
                      settings=ServerSettings(jpeg_quality=85))
    serve_in_thread(srv)
    yield srv
    srv.shutdown()
    srv.server_close()


def test_endpoints(server) -> None:
    url = server.url
    assert _get(url + "health")[0] == 200
    assert json.loads(_get(url + "health")[2])["slides"] == 3
    slides = json.loads(_get(url + "slides")[2])
    assert [s["name"] for s in slides] == ["cmu", "tiny", "damaged"]
    assert slides[0]["width"] == 2220 and slides[0]["dzi"] == "/slides/cmu.dzi"
    status, ctype, body = _get(url + "slides/cmu.dzi")
    assert status == 200 and b'TileSize="256"' in body and b'Width="2220"' in body
    props = json.loads(_get(url + "slides/tiny/properties")[2])
    assert props["openslide.vendor"] == "wsicodec" and props["wsicodec.codec"] == "learned"
    for name, z in (("cmu", 12), ("cmu", 3), ("tiny", 8), ("tiny", 0)):
        for ext, mode in (("jpeg", "RGB"), ("png", "RGB")):
            status, ctype, body = _get(f"{url}slides/{name}_files/{z}/0_0.{ext}")
            assert status == 200 and ctype == f"image/{ext}", (name, z, ext)
            assert Image.open(io.BytesIO(body)).mode == mode
    status, ctype, body = _get(url)
    assert status == 200 and b"openseadragon.min.js" in body


def test_associated_images_over_http(server, real_jpeg) -> None:
    from conftest import psnr
    from wsicodec.container import open_container

    slides = {s["name"]: s for s in json.loads(_get(server.url + "slides")[2])}
    assert slides["tiny"]["associated_images"] == {}
    urls = slides["cmu"]["associated_images"]
    assert urls == {"label": "/slides/cmu/associated/label.png",          # stored losslessly
                    "macro": "/slides/cmu/associated/macro.jpeg",
                    "thumbnail": "/slides/cmu/associated/thumbnail.jpeg"}
    with open_container(real_jpeg[0]) as c:
        for name, path in urls.items():
            status, ctype, body = _get(server.url + path.lstrip("/"))
            assert status == 200 and ctype == "image/" + path.rsplit(".", 1)[1], (name, body[:200])
            got = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
            want = c.read_associated_image(name)
            if ctype == "image/png":
                np.testing.assert_array_equal(got, want)
            else:
                assert psnr(got, want) > 30
    assert _get(server.url + "slides/cmu/associated/macro.png")[1] == "image/png"
    for path, code in (("slides/cmu/associated/nope.jpeg", 404),
                       ("slides/tiny/associated/label.png", 404),
                       ("slides/nope/associated/label.png", 404),
                       ("slides/cmu/associated/label.gif", 400)):
        status, ctype, body = _get(server.url + path)
        assert status == code and "error" in json.loads(body), (path, status, body)


def test_damaged_associated_image_is_a_500_alone(tmp_path) -> None:
    src = ArraySource(np.full((64, 64, 3), 200, np.uint8),
                      associated={"label": np.zeros((8, 8, 3), np.uint8)})
    out = tmp_path / "d.zarr"
    compress_source(src, out, get_codec("jpeg", 90), tile_size=64)
    victim = next((out / "associated" / "label").rglob("c/*"))
    victim.write_bytes(victim.read_bytes()[:20])
    srv = make_server([out], port=0, settings=ServerSettings())
    serve_in_thread(srv)
    try:
        status, _, body = _get(srv.url + "slides/d/associated/label.png")
        assert status == 500 and b"associated image 'label' damaged" in body
        assert _get(srv.url + "slides/d_files/6/0_0.jpeg")[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("path,code", [
    ("slides/cmu_files/99/0_0.jpeg", 404), ("slides/cmu_files/12/99_0.jpeg", 404),
    ("slides/cmu_files/12/0_99.jpeg", 404), ("slides/nope_files/0/0_0.jpeg", 404),
    ("slides/nope.dzi", 404), ("nothing", 404), ("static/../server.py", 404),
    ("static/%2e%2e/server.py", 404), ("openseadragon/../../../batch.py", 404),
    ("slides/cmu_files/x/0_0.jpeg", 400), ("slides/cmu_files/12/0_0.gif", 400),
    ("slides/cmu_files/12/-1_0.jpeg", 400), ("slides/cmu_files/12/0_0_0.jpeg", 400),
    ("slides/cmu_files/12/99999999999999_0.jpeg", 400), ("slides/cmu_files/12/0.jpeg", 400),
])
def test_bad_requests_are_4xx(server, path: str, code: int) -> None:
    status, ctype, body = _get(server.url + path)
    assert status == code, body
    assert ctype == "application/json" and "error" in json.loads(body)


def test_corrupt_tile_fails_alone_over_http(server) -> None:
    # level 12 of the 2220x2967 slide is level 0 of the container, 256-px tiles
    status, _, body = _get(server.url + "slides/damaged_files/12/1_1.jpeg")
    assert status == 500 and b"col=1 row=1" in body
    assert _get(server.url + "slides/damaged_files/12/0_1.jpeg")[0] == 200
    assert _get(server.url + "health")[0] == 200


def test_concurrent_tile_requests(server) -> None:
    urls = [f"{server.url}slides/cmu_files/{z}/{c}_{r}.jpeg"
            for z in (10, 11, 12) for c in range(3) for r in range(3)] * 3
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(_get, urls))
    assert all(status == 200 for status, _, _ in results)
    by_url: dict[str, bytes] = {}
    for u, (_, _, body) in zip(urls, results):
        assert by_url.setdefault(u, body) == body  # same tile, same bytes


def test_slide_names() -> None:
    from pathlib import Path

    assert slide_name(Path("/a/b/My Slide.zarr.zip")) == "My-Slide"
    assert slide_name(Path("x.zarr")) == "x"
    assert slide_name(Path(".zarr")) == "slide"


def test_cli_serve(real_jpeg, tmp_path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "wsicodec", "serve", str(real_jpeg[0]),
                             "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        base = f"http://127.0.0.1:{port}/"
        assert _get(base + "slides/cmu.dzi")[0] == 200
        assert _get(base + "slides/cmu_files/12/0_0.jpeg")[0] == 200
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("args,message", [
    (["serve", "/nonexistent.zarr.zip"], "no such file"),
    (["serve", "SELF", "--jpeg-quality", "0"], "jpeg quality"),
    (["serve", "SELF", "--device", "tpu"], "device"),
    (["serve", "SELF", "--port", "70000"], "port"),
    (["serve", "SELF", "--threads", "0"], "--threads"),
])
def test_cli_serve_errors(real_jpeg, capsys, args, message) -> None:
    from wsicodec.cli import main

    args = [str(real_jpeg[0]) if a == "SELF" else a for a in args]
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("wsicodec: error:") and message in err and "\n" not in err


def test_cli_serve_port_in_use_names_the_address(real_jpeg, capsys) -> None:
    import socket

    from wsicodec.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(real_jpeg[0]), "--port", str(port)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("wsicodec: error:") and "\n" not in err, err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "in use" in err, err


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory):
    """The CMU SVS region (label, macro, thumbnail; aperio.Filename "CMU-1") as a
    JPEG-XL container."""
    out = tmp_path_factory.mktemp("deid") / "cmu-label.zarr.zip"
    compress(need(REAL_SLIDES["svs-jpeg"]), out, get_codec("jpegxl", 1.0), workers=2)
    return out


@pytest.mark.parametrize("deidentify", [False, True])
def test_serve_deidentify(labelled, deidentify) -> None:
    from wsicodec.deidentify import deidentify_properties

    srv = make_server([labelled], port=0, settings=ServerSettings(deidentify=deidentify))
    serve_in_thread(srv)
    try:
        base = srv.url + "slides/cmu-label"
        status, _, listing = _get(srv.url + "slides")
        assert status == 200
        [summary] = json.loads(listing)
        status, _, body = _get(base + "/properties")
        assert status == 200
        props = json.loads(body)
        images = {n: _get(f"{base}/associated/{n}.{ext}")
                  for n, ext in (("label", "png"), ("macro", "jpeg"), ("thumbnail", "jpeg"))}
        assert images["thumbnail"][0] == 200
        assert _get(base + ".dzi")[0] == 200 and _get(base + "_files/12/0_0.jpeg")[0] == 200
        reader = srv.slides.slides["cmu-label"].slide     # what DeepZoom wraps
        if not deidentify:
            assert set(summary["associated_images"]) == {"label", "macro", "thumbnail"}
            assert images["label"][:2] == (200, "image/png") and images["macro"][0] == 200
            assert props["aperio.Filename"] == "CMU-1" and "aperio.Date" in props
            assert "openslide.comment" in props
            return
        assert summary["associated_images"] == {
            "thumbnail": "/slides/cmu-label/associated/thumbnail.jpeg"}
        for name in ("label", "macro"):
            status, ctype, body = images[name]
            assert status == 404 and ctype == "application/json", (name, status)
            assert "error" in json.loads(body)
            assert _get(f"{base}/associated/{name}.jpeg")[0] == 404
        with open_slide(labelled) as plain:
            original = dict(plain.properties)
        kept, removed = deidentify_properties(original, "aperio")
        assert props == kept and dict(reader.properties) == kept
        for name in ("aperio.Filename", "aperio.Date", "aperio.Time", "aperio.User",
                     "aperio.ScanScope ID", "aperio.ImageID", "openslide.comment",
                     "tiff.ImageDescription"):
            assert name in original and name in removed and name not in props, name
        assert b"CMU-1" not in listing and b"CMU-1" not in body
        assert props["openslide.mpp-x"] and summary["mpp"] == pytest.approx(0.499)
        assert list(reader.associated_images) == ["thumbnail"]
        with pytest.raises(KeyError):
            reader.associated_images["label"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_serve_deidentify_replaces_dicom_uids_once(tmp_path) -> None:
    study, series = "1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.12"
    sop_class = "1.2.840.10008.5.1.4.1.1.77.1.6"
    props = {"dicom.StudyInstanceUID": study, "dicom.SeriesInstanceUID": series,
             "dicom.ReferencedSeriesSequence[0].SeriesInstanceUID": series,
             "dicom.SOPClassUID": sop_class, "dicom.PatientName": "Doe^Jane",
             "dicom.Manufacturer": "Scanner Co"}
    out = tmp_path / "dcm.zarr"
    compress_source(ArraySource(np.full((64, 64, 3), 200, np.uint8), vendor="dicom",
                                properties=props, associated={"label": np.zeros((8, 8, 3),
                                                                                  np.uint8)}),
                    out, get_codec("jpegxl", 1.0), tile_size=64)
    srv = make_server([out], port=0, settings=ServerSettings(deidentify=True))
    serve_in_thread(srv)
    try:
        first = json.loads(_get(srv.url + "slides/dcm/properties")[2])
        again = json.loads(_get(srv.url + "slides/dcm/properties")[2])
    finally:
        srv.shutdown()
        srv.server_close()
    assert first == again                          # the same for the server's lifetime
    assert "dicom.PatientName" not in first and first["dicom.Manufacturer"] == "Scanner Co"
    assert first["dicom.SOPClassUID"] == sop_class
    new_study, new_series = first["dicom.StudyInstanceUID"], first["dicom.SeriesInstanceUID"]
    assert new_study.startswith("2.25.") and new_series.startswith("2.25.")
    assert len({new_study, new_series, study, series}) == 4
    assert first["dicom.ReferencedSeriesSequence[0].SeriesInstanceUID"] == new_series
    assert study not in json.dumps(first) and series not in json.dumps(first)


def test_a_wheel_carries_the_viewers_openseadragon() -> None:
    """pyproject's package data holds what the viewer page loads from /openseadragon/
    (openseadragon.min.js, its button images) and OpenSeadragon's licence, so a wheel built
    after ``npm ci --prefix wsicodec/static`` serves the viewer offline, as a checkout does."""
    import fnmatch
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")            # Python 3.11+
    import wsicodec
    from wsicodec.server import OPENSEADRAGON_DIR
    repo = Path(__file__).resolve().parents[1]
    setuptools = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = setuptools["package-data"]["wsicodec"]
    package = Path(wsicodec.__file__).parent
    osd = OPENSEADRAGON_DIR.relative_to(package)
    page = (package / "static" / "index.html").read_text() + (package / "static" / "viewer.js").read_text()
    assert "/openseadragon/openseadragon.min.js" in page and '"/openseadragon/images/"' in page
    for needed in (osd / "openseadragon.min.js", osd / "images" / "zoomin_rest.png",
                   osd.parents[1] / "LICENSE.txt"):
        assert any(fnmatch.fnmatch(needed.as_posix(), g) for g in globs), needed
