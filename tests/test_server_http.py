"""The tile server's HTTP conventions: OPTIONS, CORS only for the origins given with
``--cors``, ETag / Cache-Control on tiles and descriptors, 304 on ``If-None-Match``, and
ETags that change when the container does.  Servers listen on 127.0.0.1."""

from __future__ import annotations

import http.client
import shutil

import numpy as np
import pytest

from wsicodec.cli import main
from wsicodec.codecs import get_codec
from wsicodec.errors import InvalidSettingError
from wsicodec.httpcache import check_cors_origin, etag_matches
from wsicodec.pipeline import compress_source
from wsicodec.server import ServerSettings
from wsicodec.tiling import ArraySource

from conftest import running_server

VIEWER = "https://viewer.example.org"
TILE = "/slides/small_files/9/1_0.jpeg"
DESCRIPTORS = ("/slides/small.dzi", "/slides/small/properties", "/slides")


def _make(path, seed: int) -> None:
    y, x = np.mgrid[0:200, 0:300]
    rgb = np.stack([(x * 3 + seed) % 256, (y * 2) % 256, (x ^ y) % 256], -1).astype(np.uint8)
    compress_source(ArraySource(rgb, mpp=(0.5, 0.5)), path, get_codec("jpegxl", 1.0),
                    tile_size=64, workers=1)


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("http") / "small.zarr.zip"
    _make(out, 0)
    return out


def running(paths, **settings):
    return running_server(paths, **{"timeout": 5.0, **settings})


def request(srv, method: str, path: str, **headers: str) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=10)
    try:
        conn.request(method, path, headers={k.replace("_", "-"): v for k, v in headers.items()})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_options_is_204_with_allow(container) -> None:
    with running([container]) as srv:
        for target in ("*", "/slides/small.dzi", "/nowhere"):
            status, headers, body = request(srv, "OPTIONS", target)
            assert status == 204 and body == b"", target
            assert headers["allow"] == "GET, HEAD, OPTIONS"
            assert not any(k.startswith("access-control-") for k in headers)
        status, headers, _ = request(srv, "POST", "/health")
        assert status == 405 and headers["allow"] == "GET, HEAD, OPTIONS"


def test_no_cors_header_by_default(container) -> None:
    with running([container]) as srv:
        for path in (TILE, *DESCRIPTORS, "/health", "/slides/nope.dzi"):
            _, headers, _ = request(srv, "GET", path, Origin="https://evil.example")
            assert not any(k.startswith("access-control-") for k in headers), path
        _, headers, _ = request(srv, "OPTIONS", TILE, Origin="https://evil.example",
                                Access_Control_Request_Method="GET")
        assert not any(k.startswith("access-control-") for k in headers)


def test_cors_only_for_the_origins_given(container) -> None:
    other = "http://localhost:3000"
    with running([container], cors_origins=(VIEWER, other)) as srv:
        for origin in (VIEWER, other):
            for path in (TILE, "/slides/small.dzi", "/slides/nope.dzi"):   # errors too
                _, headers, _ = request(srv, "GET", path, Origin=origin)
                assert headers["access-control-allow-origin"] == origin, path
                assert headers["vary"] == "Origin" and "ETag" in \
                    headers["access-control-expose-headers"]
        for origin in ("https://evil.example", VIEWER + ".evil.example", "null"):
            _, headers, _ = request(srv, "GET", TILE, Origin=origin)
            assert "access-control-allow-origin" not in headers and headers["vary"] == "Origin"
        _, headers, _ = request(srv, "GET", TILE)               # no Origin: no header
        assert "access-control-allow-origin" not in headers
        # the preflight
        status, headers, _ = request(srv, "OPTIONS", TILE, Origin=VIEWER,
                                     Access_Control_Request_Method="GET",
                                     Access_Control_Request_Headers="If-None-Match")
        assert status == 204 and headers["access-control-allow-origin"] == VIEWER
        assert headers["access-control-allow-methods"] == "GET, HEAD, OPTIONS"
        assert headers["access-control-allow-headers"] == "if-none-match"
        assert int(headers["access-control-max-age"]) > 0
        for method, extra in (("DELETE", ""), ("GET", "X-Secret")):
            _, headers, _ = request(srv, "OPTIONS", TILE, Origin=VIEWER,
                                    Access_Control_Request_Method=method,
                                    Access_Control_Request_Headers=extra)
            assert "access-control-allow-methods" not in headers, method
        _, headers, _ = request(srv, "OPTIONS", TILE, Origin="https://evil.example",
                                Access_Control_Request_Method="GET")
        assert "access-control-allow-origin" not in headers


def test_cors_wildcard_only_when_asked(container) -> None:
    with running([container], cors_origins=("*",)) as srv:
        _, headers, _ = request(srv, "GET", TILE, Origin="https://anyone.example")
        assert headers["access-control-allow-origin"] == "*" and "vary" not in headers


@pytest.mark.parametrize("bad", ["viewer.example.org", "https://viewer.example.org/",
                                 "https://viewer.example.org/path", "ftp://x.org", "",
                                 "https://x.org:99999", "*.example.org"])
def test_bad_cors_origins_are_refused(bad: str) -> None:
    with pytest.raises(InvalidSettingError, match="CORS origin"):
        ServerSettings(cors_origins=(bad,))
    with pytest.raises(InvalidSettingError):
        ServerSettings(cors_origins=VIEWER)   # a string, not a sequence of origins
    assert check_cors_origin("HTTPS://Viewer.Example.org:8443") == "https://viewer.example.org:8443"


def test_cli_bad_cors_is_one_line(container, capsys) -> None:
    assert main(["serve", str(container), "--port", "0", "--cors", "example.org"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("wsicodec: error: CORS origin") and len(err.strip().splitlines()) == 1


def test_etag_cache_control_and_304(container) -> None:
    with running([container]) as srv:
        for path, control in ((TILE, "public, max-age=3600"),
                              *((p, "no-cache") for p in DESCRIPTORS)):
            status, headers, body = request(srv, "GET", path)
            assert status == 200 and body and headers["cache-control"] == control, path
            etag = headers["etag"]
            assert etag.startswith('W/"' if path == TILE else '"'), (path, etag)
            assert request(srv, "GET", path)[1]["etag"] == etag          # stable
            for sent in (etag, etag.removeprefix("W/"), f'"other", {etag}', "*"):
                status, h304, body = request(srv, "GET", path, If_None_Match=sent)
                assert status == 304 and body == b"", (path, sent)
                assert h304["etag"] == etag and h304["cache-control"] == control
            status, _, body = request(srv, "GET", path, If_None_Match='"other"')
            assert status == 200 and body
            assert request(srv, "HEAD", path, If_None_Match=etag)[0] == 304
        tags = {request(srv, "GET", p)[1]["etag"] for p in
                (TILE, "/slides/small_files/9/0_0.jpeg", "/slides/small_files/9/1_0.png")}
        assert len(tags) == 3                                # a tag per tile and format
        _, headers, _ = request(srv, "GET", "/health")
        assert "etag" not in headers and headers["cache-control"] == "no-store"
        status, headers, _ = request(srv, "GET", "/slides/small_files/99/0_0.jpeg",
                                     If_None_Match="*")      # nothing there: no 304
        assert status == 404 and "etag" not in headers and headers["cache-control"] == "no-store"


def test_etag_changes_with_the_container(container, tmp_path) -> None:
    copy = tmp_path / "small.zarr.zip"
    shutil.copyfile(container, copy)
    with running([copy]) as srv:
        before = {p: request(srv, "GET", p)[1]["etag"] for p in (TILE, *DESCRIPTORS)}
    with running([copy]) as srv:                             # the same file: the same tags
        assert before == {p: request(srv, "GET", p)[1]["etag"] for p in before}
    _make(copy.with_name("new.zarr.zip"), 0)                 # the same pixels, written again
    shutil.move(copy.with_name("new.zarr.zip"), copy)
    with running([copy]) as srv:
        after = {p: request(srv, "GET", p)[1]["etag"] for p in before}
        assert request(srv, "GET", TILE, If_None_Match=before[TILE])[0] == 200
    assert all(after[p] != before[p] for p in before if p != "/slides"), (before, after)
    assert after["/slides"] == before["/slides"]     # tagged by its bytes, which are the same
    with running([copy], jpeg_quality=70) as srv:            # other bytes for the same tile
        assert request(srv, "GET", TILE)[1]["etag"] != after[TILE]


def test_etag_matching_rules() -> None:
    assert etag_matches('W/"a"', '"a"') and etag_matches('"a"', 'W/"a"')
    assert etag_matches(' "x" , W/"a"', '"a"') and etag_matches("*", '"a"')
    assert not etag_matches('"ab"', '"a"') and not etag_matches(None, '"a"')
    assert not etag_matches('a', '"a"') and not etag_matches('"a', '"a"')
