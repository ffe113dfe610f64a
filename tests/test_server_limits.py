"""The tile server under abuse: timeouts on idle and slow connections, the bounded worker
pool (queue, then 503), request limits, methods other than GET, huge numbers in tile
URLs, and the warning for a non-loopback address.

Every server here listens on 127.0.0.1 with a small timeout and pool, and every test
ends within a few seconds."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from wsicodec.codecs import get_codec
from wsicodec.errors import InvalidSettingError
from wsicodec.httpd import IDLE_GRACE_S, is_loopback
from wsicodec.pipeline import compress_source
from wsicodec.server import ServerSettings
from wsicodec.tiling import ArraySource

from conftest import running_server


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory):
    """A 300x200 JPEG-XL container, 64-px tiles (fast to make and to serve)."""
    y, x = np.mgrid[0:200, 0:300]
    rgb = np.stack([(x * 3) % 256, (y * 2) % 256, (x ^ y) % 256], axis=-1).astype(np.uint8)
    out = tmp_path_factory.mktemp("limits") / "small.zarr.zip"
    compress_source(ArraySource(rgb, mpp=(0.5, 0.5)), out, get_codec("jpegxl", 1.0),
                    tile_size=64, workers=1)
    return out


def running(container, **settings):
    return running_server([container], **settings)


@pytest.fixture(scope="module")
def shared(container):
    """One server for the tests that leave it as they found it."""
    with running(container, timeout=2.0) as srv:
        yield srv


def _connect(srv) -> socket.socket:
    return socket.create_connection(srv.server_address[:2], timeout=10)


def _get(url: str, timeout: float = 10) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _raw(srv, data: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes, read until the server closes (or ``timeout``)."""
    with _connect(srv) as s:
        s.sendall(data)
        s.settimeout(timeout)
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                got += chunk
        return got


def _parse(response: bytes) -> tuple[int, dict, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def _wait_closed(sock: socket.socket, limit: float) -> float:
    """Seconds until the server closes ``sock`` (reading and discarding what it sends);
    fails after ``limit``."""
    t0 = time.monotonic()
    sock.settimeout(limit)
    with contextlib.suppress(ConnectionResetError):
        while sock.recv(65536):
            pass
    dt = time.monotonic() - t0
    assert dt < limit, "the server did not close the connection"
    return dt


@pytest.mark.parametrize("kw", [{"timeout": 0}, {"timeout": -1}, {"timeout": True},
                                {"timeout": "30"}, {"timeout": 4000},
                                {"timeout": float("nan")}, {"max_connections": 0},
                                {"max_connections": 5000}, {"max_connections": 2.0},
                                {"max_connections": True}])
def test_settings_are_checked(kw) -> None:
    with pytest.raises(InvalidSettingError):
        ServerSettings(**kw)


def test_idle_connections_are_closed_after_the_timeout(container) -> None:
    with running(container, timeout=1.0) as srv:
        with _connect(srv) as fresh:                    # connects, sends nothing
            dt_fresh = _wait_closed(fresh, 5)
        with _connect(srv) as kept:                     # keep-alive, idle after one request
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            kept.settimeout(5)
            assert kept.recv(65536).startswith(b"HTTP/1.1 200")
            dt_kept = _wait_closed(kept, 5)
        assert _get(srv.url + "health")[0] == 200
    print(f"idle connection closed after {dt_fresh:.2f} s (fresh), {dt_kept:.2f} s (keep-alive)")
    assert 0.9 <= dt_fresh < 2.0 and 0.9 <= dt_kept < 2.0


def test_a_slowly_sent_request_is_closed_at_its_deadline(container) -> None:
    # slowloris: a header line every 0.2 s would keep a plain socket timeout from firing
    with running(container, timeout=1.0) as srv, _connect(srv) as s:
        t0 = time.monotonic()
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        closed = None
        for i in range(25):                              # 5 s at most
            ready, _, _ = select.select([s], [], [], 0.2)
            if ready:
                with contextlib.suppress(ConnectionResetError):
                    assert s.recv(65536) == b""          # no answer, just closed
                closed = time.monotonic() - t0
                break
            try:
                s.sendall(f"X-Slow-{i}: {i}\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                closed = time.monotonic() - t0
                break
        print(f"slow request closed after {closed} s")
        assert closed is not None and 0.9 <= closed < 2.0
        assert _get(srv.url + "health")[0] == 200


def test_connections_are_bounded_and_the_server_keeps_serving(container) -> None:
    n = 4
    before = threading.active_count()
    with running(container, timeout=2.0, max_connections=n) as srv:
        started = threading.active_count()               # + serve_forever's thread
        idle = [_connect(srv) for _ in range(3 * n)]     # connect, send nothing
        try:
            time.sleep(0.3)
            during = threading.active_count()
            assert during - started <= n, (before, started, during)
            # n served, n queued, the rest answered 503 at once
            ready, _, _ = select.select(idle, [], [], 0.5)
            answers = {}
            for s in ready:
                s.settimeout(1)
                answers[s] = s.recv(65536)
            refused = [s for s, a in answers.items() if a.startswith(b"HTTP/1.1 503")]
            assert len(refused) == n and srv.refused == n, answers
            status, headers, body = _parse(answers[refused[0]])
            assert headers["Retry-After"] == "1" and headers["Connection"] == "close"
            assert headers["Content-Type"] == "application/json"
            assert "busy" in json.loads(body)["error"]
            # a client that honours Retry-After is served once the idle connections
            # that were served give way to those queued (which then time out)
            t0, tries = time.monotonic(), []
            while time.monotonic() - t0 < 5:
                status, headers, _ = _get(srv.url + "health")
                tries.append(status)
                if status != 503:
                    break
                time.sleep(float(headers["Retry-After"]))
            waited = time.monotonic() - t0
            assert tries[-1] == 200 and waited < 2 + 1.5, (tries, waited)
            assert threading.active_count() - started <= n
            # every idle connection is closed: given way or timed out
            t0 = time.monotonic()
            for s in idle:
                _wait_closed(s, 8)
            all_closed = time.monotonic() - t0
            assert _get(srv.url + "health")[0] == 200
        finally:
            for s in idle:
                s.close()
    after = threading.active_count()
    print(f"threads: {before} before, {started} serving, {during} with {3 * n} idle "
          f"connections (max_connections={n}), {after} after server_close; a request "
          f"was served after {waited:.2f} s ({tries}); all idle closed {all_closed:.2f} s "
          f"later")
    assert after == before


def test_an_idle_keepalive_connection_gives_way(container) -> None:
    import http.client

    with running(container, timeout=10.0, max_connections=1) as srv:
        host, port = srv.server_address[:2]
        kept = http.client.HTTPConnection(host, port, timeout=10)
        try:
            kept.request("GET", "/health")
            assert kept.getresponse().read() and True
            t0 = time.monotonic()                        # kept now idles on the one worker
            assert _get(srv.url + "slides")[0] == 200
            waited = time.monotonic() - t0
            assert IDLE_GRACE_S <= waited < IDLE_GRACE_S + 1.5, waited
        finally:
            kept.close()


def test_a_response_closes_keepalive_while_others_wait(container) -> None:
    with running(container, timeout=5.0, max_connections=1) as srv, \
            _connect(srv) as first, _connect(srv) as second:
        time.sleep(0.2)                                  # second waits in the queue
        first.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        first.settimeout(5)
        status, headers, _ = _parse(first.recv(65536))
        assert status == 200 and headers["Connection"] == "close"
        second.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        second.settimeout(5)
        status, headers, _ = _parse(second.recv(65536))
        assert status == 200 and "Connection" not in headers


@pytest.mark.parametrize("request_bytes,code", [
    (b"POST /health HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello", 405),
    (b"DELETE /slides/small.dzi HTTP/1.1\r\nHost: localhost\r\n\r\n", 405),
    (b"PUT /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n", 405),
    (b"BREW /pot HTTP/1.1\r\nHost: localhost\r\n\r\n", 501),
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /health\r\n\r\n", 400),                      # HTTP/0.9: no status line
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),   # TLS on plain HTTP
    (b"GET /health HTTP/9.9\r\n\r\n", 505),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n",
     431),
])
def test_other_requests_answer_json_errors(shared, request_bytes, code) -> None:
    status, headers, body = _parse(_raw(shared, request_bytes))
    assert status == code, body
    assert headers["Content-Type"] == "application/json" and json.loads(body)["error"]
    assert headers["Connection"] == "close"
    if code == 405:
        assert headers["Allow"] == "GET, HEAD, OPTIONS"
    assert _get(shared.url + "health")[0] == 200


def test_head_answers_without_a_body(shared) -> None:
    response = _raw(shared, b"HEAD /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    status, headers, body = _parse(response)
    assert status == 200 and int(headers["Content-Length"]) > 0 and body == b""


def test_huge_tile_numbers_answer_fast_without_allocating(shared) -> None:
    import tracemalloc

    paths = {"slides/small_files/999999999/0_0.jpeg": 404,
             "slides/small_files/9/999999999_0.jpeg": 404,
             "slides/small_files/9/0_999999999.png": 404,
             "slides/small_files/9/999999999_999999999.jpeg": 404,
             "slides/small_files/9999999999/0_0.jpeg": 400,
             "slides/small_files/9/0_" + "9" * 5000 + ".jpeg": 400,
             "slides/small_files/-1/0_0.jpeg": 400,
             "slides/small_files/9/-5_0.jpeg": 400,
             "slides/small_files/9/1e9_0.jpeg": 400,
             "slides/small_files/9/0x10_0.jpeg": 400}
    assert _get(shared.url + "slides/small_files/9/0_0.jpeg")[0] == 200   # warm
    tracemalloc.start()
    try:
        t0 = time.monotonic()
        for path, code in paths.items():
            status, _, body = _get(shared.url + path)
            assert status == code and "error" in json.loads(body), (path, status, body)
        elapsed = time.monotonic() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 2.0 and peak < 4 << 20, (elapsed, peak)


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("", False),
    ("192.168.1.20", False), ("10.0.0.1", False), ("example.org", False)])
def test_is_loopback(host, loopback) -> None:
    assert is_loopback(host) is loopback


class _FakeServer:
    """What _cmd_serve uses of a TileServer, bound nowhere (tests bind loopback only)."""

    def __init__(self, host: str, settings: ServerSettings) -> None:
        from wsicodec.httpd import BoundedHTTPServer

        self.server_address = (host, 8000)
        self.settings = settings
        self.slides = type("S", (), {"slides": {"small": None}})()
        self.url = f"http://{host}:8000/"
        self.viewer_available = True
        self.loopback_only = BoundedHTTPServer.loopback_only.fget(self)
        self.closed = False

    def serve_forever(self) -> None:
        raise KeyboardInterrupt

    def server_close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("bound,warns", [("0.0.0.0", True), ("192.168.1.20", True),
                                         ("127.0.0.1", False)])
def test_cli_serve_warns_off_loopback(container, monkeypatch, capsys, bound, warns) -> None:
    import wsicodec.server
    from wsicodec.cli import main

    made = {}

    def fake_make_server(paths, host, port, settings):
        made.update(host=host, settings=settings)
        made["server"] = _FakeServer(bound, settings)
        return made["server"]

    monkeypatch.setattr(wsicodec.server, "make_server", fake_make_server)
    assert main(["serve", str(container), "--host", bound, "--timeout", "7.5",
                 "--max-connections", "9"]) == 0
    assert made["settings"].timeout == 7.5 and made["settings"].max_connections == 9
    assert made["server"].closed
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    if warns:
        assert len(warnings) == 1, err
        assert bound in warnings[0] and "no authentication" in warnings[0]
        assert "docs/server-security.md" in warnings[0]
    else:
        assert warnings == [], err


@pytest.mark.parametrize("args,message", [
    (["--timeout", "0"], "timeout"), (["--timeout", "nan"], "timeout"),
    (["--timeout", "x"], "--timeout"), (["--max-connections", "0"], "max connections"),
    (["--max-connections", "1.5"], "--max-connections")])
def test_cli_serve_limit_errors(container, capsys, args, message) -> None:
    from wsicodec.cli import main

    assert main(["serve", str(container)] + args) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("wsicodec: error:") and message in err and "\n" not in err, err


def _with_host(srv, host: str | None, path: str = "/slides", extra: bytes = b"",
               method: bytes = b"GET", body: bytes = b"") -> tuple[int, dict, bytes]:
    """A request with this Host header (PORT: the server's port; None: no Host) and
    ``extra`` header lines."""
    head = method + b" " + path.encode() + b" HTTP/1.1\r\nConnection: close\r\n"
    if host is not None:
        head += b"Host: " + host.replace("PORT", str(srv.server_address[1])).encode() + b"\r\n"
    return _parse(_raw(srv, head + extra + b"\r\n" + body))


@pytest.mark.parametrize("host,code", [
    ("localhost", 200), ("localhost:PORT", 200), ("LocalHost:PORT", 200),
    ("127.0.0.1", 200), ("127.0.0.1:PORT", 200), ("127.8.9.10:80", 200),
    ("[::1]", 200), ("[::1]:PORT", 200),
    ("evil.example", 421), ("evil.example:PORT", 421), ("localhost.evil.example", 421),
    ("127.0.0.1.evil.example:PORT", 421), ("evil.example@127.0.0.1", 421),
    ("127.1:PORT", 421), ("2130706433", 421), ("[::2]:PORT", 421), ("[::1", 421),
    ("::1", 421), ("localhost:PORT:PORT", 421), ("localhost:x", 421), ("", 421),
    ("192.168.1.20:PORT", 421), (None, 421)])
def test_loopback_server_answers_loopback_host_names_only(shared, host, code) -> None:
    # DNS rebinding: a page on evil.example re-pointed at 127.0.0.1 sends Host: evil.example
    status, headers, body = _with_host(shared, host)
    assert status == code, (host, body)
    if code == 421:
        assert headers["Content-Type"] == "application/json"
        assert headers["Connection"] == "close"
        assert "DNS rebinding" in json.loads(body)["error"] and b"small" not in body
    else:
        assert json.loads(body)[0]["name"] == "small"


@pytest.mark.parametrize("path", ["/", "/health", "/slides", "/slides/small.dzi",
                                  "/slides/small/properties", "/slides/small_files/9/0_0.jpeg",
                                  "/slides/small/associated/label.png", "/static/viewer.js",
                                  "/nothing"])
def test_every_path_is_refused_for_another_host(shared, path) -> None:
    status, _, body = _with_host(shared, "evil.example:PORT", path)
    assert status == 421 and json.loads(body)["error"], (path, body)
    assert _with_host(shared, "127.0.0.1:PORT", path)[0] in (200, 404), path


def test_host_refusal_comes_first_and_is_complete(shared) -> None:
    port = shared.server_address[1]
    # several Host headers, a POST with a body, HEAD, an absolute-form request target
    assert _with_host(shared, "localhost", extra=b"Host: evil.example\r\n")[0] == 421
    status, headers, body = _with_host(shared, "evil.example", "/health", method=b"POST",
                                       extra=b"Content-Length: 5\r\n", body=b"hello")
    assert status == 421
    status, headers, body = _with_host(shared, "evil.example", "/slides", method=b"HEAD")
    assert status == 421 and body == b"" and int(headers["Content-Length"]) > 0
    assert _with_host(shared, "localhost", f"http://evil.example:{port}/slides")[0] == 421
    assert _with_host(shared, "localhost", f"http://localhost:{port}/slides")[0] == 200
    assert _get(shared.url + "health")[0] == 200


def test_allow_host_is_served(container) -> None:
    with running(container, timeout=2.0,
                 allow_hosts=("evil.example", "Slides.Example.org:8443")) as srv:
        assert srv.settings.allow_hosts == ("evil.example", "slides.example.org:8443")
        for host, code in (("evil.example", 200), ("EVIL.example:PORT", 200),
                           ("slides.example.org:8443", 200), ("slides.example.org", 421),
                           ("slides.example.org:PORT", 421), ("other.example", 421),
                           ("localhost:PORT", 200), ("127.0.0.1:PORT", 200)):
            assert _with_host(srv, host)[0] == code, host


def test_the_viewer_page_and_its_requests_are_same_origin(shared) -> None:
    # what tests/test_browser.py's page fetches, from the origin http://127.0.0.1:PORT
    for path in ("", "static/viewer.js", "static/viewer.css", "slides", "slides/small.dzi",
                 "slides/small_files/9/0_0.jpeg"):
        assert _get(shared.url + path)[0] == 200, path
    origin = shared.url.rstrip("/")
    status, _, _ = _with_host(shared, "127.0.0.1:PORT", "/slides",
                              extra=f"Origin: {origin}\r\nReferer: {shared.url}\r\n".encode())
    assert status == 200


@pytest.mark.parametrize("bound,allow,host,answered", [
    ("0.0.0.0", (), "evil.example", True), ("0.0.0.0", (), None, True),
    ("192.168.1.20", (), "anything:1", True),
    ("0.0.0.0", ("slides.example.org",), "slides.example.org", True),
    ("0.0.0.0", ("slides.example.org",), "SLIDES.example.org:8000", True),
    ("0.0.0.0", ("slides.example.org",), "evil.example", False),
    ("0.0.0.0", ("slides.example.org",), None, False),
    ("0.0.0.0", ("slides.example.org",), "localhost:8000", True),
    ("127.0.0.1", (), "evil.example", False), ("127.0.0.1", (), "localhost", True)])
def test_host_rule_by_bound_address(container, bound, allow, host, answered) -> None:
    from wsicodec.httpd import BoundedHTTPServer

    fake = _FakeServer(bound, ServerSettings(allow_hosts=allow))
    assert BoundedHTTPServer.host_allowed(fake, host) is answered


@pytest.mark.parametrize("allow", [("",), ("a b",), ("http://x",), ("x/y",), ("x:",),
                                   ("x:port",), ("[::1",), ("[zz]",), (3,), "x", None])
def test_allow_hosts_are_checked(allow) -> None:
    with pytest.raises(InvalidSettingError):
        ServerSettings(allow_hosts=allow)


def test_cli_serve_allow_host_and_deidentify(container, monkeypatch, capsys) -> None:
    import wsicodec.server
    from wsicodec.cli import main

    made = {}

    def fake_make_server(paths, host, port, settings):
        made["settings"] = settings
        return _FakeServer("127.0.0.1", settings)

    monkeypatch.setattr(wsicodec.server, "make_server", fake_make_server)
    assert main(["serve", str(container)]) == 0
    assert made["settings"].allow_hosts == () and made["settings"].deidentify is False
    assert main(["serve", str(container), "--allow-host", "a.example", "--allow-host",
                 "b.example:8443", "--deidentify"]) == 0
    assert made["settings"].allow_hosts == ("a.example", "b.example:8443")
    assert made["settings"].deidentify is True
    assert "de-identified" in capsys.readouterr().out
    assert main(["serve", str(container), "--allow-host", "a b"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("wsicodec: error:") and "allowed host" in err and "\n" not in err
