"""DeepZoom tile server over HTTP, with an OpenSeadragon viewer page.

Standard library only (``http.server``): a bounded pool of worker threads, one
connection each (at most ``ServerSettings.max_connections`` served at once), all
sharing one :class:`wsicodec.slide.WsiSlide` per slide (thread-safe, with its batched
decoder and LRU tile cache) wrapped in OpenSlide's own
``openslide.deepzoom.DeepZoomGenerator``::

    GET /                                     viewer page (wsicodec/static/index.html)
    GET /static/<file>                        the page's script and style
    GET /openseadragon/<file>                 OpenSeadragon's build (npm package, local)
    GET /health                               {"status": "ok", "slides": n, "viewer": bool}
    GET /slides                               [{name, dzi, width, height, levels, mpp, ...}]
    GET /slides/<name>.dzi                    DeepZoom descriptor (XML)
    GET /slides/<name>/properties             the slide's properties (JSON)
    GET /slides/<name>_files/<z>/<col>_<row>.jpeg|.png
                                              one DeepZoom tile
    GET /slides/<name>/associated/<image>.jpeg|.png
                                              an associated image (label, macro, thumbnail)

Status codes: 400 for a malformed request (bad numbers, unknown tile format), 404 for
anything that does not exist (unknown slide, level or tile outside the pyramid), 500
only for a tile whose stored bytes are damaged (the message names it; other tiles
still serve) or an unexpected failure, 405 for methods other than GET and HEAD (501 for
unknown ones), 431 for a header line over 64 KiB or more than 100 headers, 421 for a
``Host`` the server does not answer to (below), 503 (with ``Retry-After``) when the
server is full.  Error bodies are JSON ``{"error": ...}``.

DNS rebinding: a web page whose host name the attacker re-points at 127.0.0.1 is the
same origin as that name to the browser, so it could read this server's slides and
labels.  Such requests carry the attacker's name in ``Host``: a server bound to a
loopback address answers only requests whose ``Host`` is a loopback name
(``localhost``, ``127.x.x.x``, ``[::1]``, any port) or one of
``ServerSettings.allow_hosts``; bound to another address it answers those when
``allow_hosts`` lists any, and any ``Host`` otherwise.

With ``ServerSettings.deidentify`` each slide is served as ``compress --deidentify``
would have written it (:mod:`wsicodec.deidentify`): the associated images it drops
(label, macro) are neither listed nor served, the properties it removes are not
served, and DICOM instance UIDs are replaced by new ones (the same for the server's
lifetime).  The tissue tiles are served as they are.

Under abuse (see docs/server-security.md): each request head must arrive within
``timeout`` seconds of the server starting to wait for it, however slowly its bytes
trickle (slowloris), and an idle keep-alive connection is closed after ``timeout``
seconds.  At most ``max_connections`` connections are served at once (one worker
thread each; threads never exceed that); up to as many again wait in a queue, in
arrival order, and while any wait, a connection idle for a second gives way (is
closed) and responses carry ``Connection: close``; beyond that a connection gets an
immediate ``503 Service Unavailable`` with ``Retry-After: 1``.  The server has no
authentication: bind it to loopback (the default) or put it behind a proxy that has.

Library code: builds and runs the server, raises; the CLI (``wsicodec serve``) prints.
"""

from __future__ import annotations

import collections
import io
import ipaddress
import json
import logging
import mimetypes
import queue
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Iterator, Mapping, Sequence
from urllib.parse import unquote, urlsplit

from wsicodec.batch import DecoderSettings
from wsicodec.errors import (CorruptDataError, InvalidSettingError, RegionOutOfBoundsError,
                             WsiCodecError)

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: where ``npm ci --prefix wsicodec/static`` puts OpenSeadragon's browser build
OPENSEADRAGON_DIR = STATIC_DIR / "node_modules" / "openseadragon" / "build" / "openseadragon"
TILE_FORMATS = {"jpeg": "image/jpeg", "png": "image/png"}

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_TILE_RE = re.compile(rf"^/slides/(?P<name>{_NAME})_files/(?P<level>[^/]+)/"
                      rf"(?P<col>[^/_]+)_(?P<row>[^/.]+)\.(?P<fmt>[A-Za-z0-9]+)$")
_DZI_RE = re.compile(rf"^/slides/(?P<name>{_NAME})\.dzi$")
_PROPS_RE = re.compile(rf"^/slides/(?P<name>{_NAME})/properties$")
_ASSOCIATED_RE = re.compile(rf"^/slides/(?P<name>{_NAME})/associated/(?P<image>[^/]+)"
                            rf"\.(?P<fmt>[A-Za-z0-9]+)$")
_INT_RE = re.compile(r"^[0-9]{1,9}$")
_HOST_NAME_RE = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?$")
_PORT_RE = re.compile(r"^[0-9]{1,5}$")
_ABSOLUTE_FORM_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

#: while connections wait for a worker, one idle this long (no byte of its next
#: request yet) is closed so that they get its worker
IDLE_GRACE_S = 1.0
_IDLE_POLL_S = 0.2
#: a refused connection is kept open this long after its 503 (reading what the client
#: sends), so that closing it does not reset the connection before the 503 is read
_REFUSED_LINGER_S = 1.0
_MAX_LINGERING = 256
_RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServerSettings:
    """How tiles are served.

    Attributes:
        jpeg_quality: quality of ``.jpeg`` DeepZoom tiles, 1-100.
        overlap: DeepZoom tile overlap in pixels (0 keeps DeepZoom tiles aligned with
            the container's tiles, so one DeepZoom tile decodes one stored tile).
        decoder: cache size, threads and device of each slide's decoder.
        openseadragon_dir: OpenSeadragon's ``build/openseadragon`` folder.
        timeout: seconds a connection may take to send a request's line and headers,
            counted from when the server starts waiting for it (so also how long an
            idle keep-alive connection stays open), and the limit on sending one
            response; 0 < timeout <= 3600.
        max_connections: connections served at once, one worker thread each; as many
            again wait in a queue, further ones are answered 503; 1..4096.
        allow_hosts: ``Host`` names (``slides.example.org``; with ``:PORT``, only that
            port) answered besides the loopback names; on a server not bound to
            loopback, an empty tuple answers any ``Host`` (see the module docstring).
        deidentify: serve each slide's properties and associated images by the rules
            of ``compress --deidentify`` (:mod:`wsicodec.deidentify`).
    """

    jpeg_quality: int = 90
    overlap: int = 0
    decoder: DecoderSettings = DecoderSettings()
    openseadragon_dir: Path = OPENSEADRAGON_DIR
    timeout: float = 30.0
    max_connections: int = 64
    allow_hosts: tuple[str, ...] = ()
    deidentify: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.jpeg_quality, bool) or not isinstance(self.jpeg_quality, int) \
                or not 1 <= self.jpeg_quality <= 100:
            raise InvalidSettingError(f"jpeg quality must be an integer in 1..100, got "
                                      f"{self.jpeg_quality!r}")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, int) \
                or not 0 <= self.overlap <= 64:
            raise InvalidSettingError(f"overlap must be an integer in 0..64, got "
                                      f"{self.overlap!r}")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) \
                or not 0 < self.timeout <= 3600:
            raise InvalidSettingError(f"timeout must be a number of seconds in (0, 3600], "
                                      f"got {self.timeout!r}")
        if isinstance(self.max_connections, bool) or not isinstance(self.max_connections, int) \
                or not 1 <= self.max_connections <= 4096:
            raise InvalidSettingError(f"max connections must be an integer in 1..4096, got "
                                      f"{self.max_connections!r}")
        if isinstance(self.allow_hosts, str) or not isinstance(self.allow_hosts, (tuple, list)):
            raise InvalidSettingError(f"allowed hosts must be a sequence of host names, got "
                                      f"{self.allow_hosts!r}")
        hosts = []
        for value in self.allow_hosts:
            parts = _split_host(value) if isinstance(value, str) else None
            if parts is None:
                raise InvalidSettingError(f"allowed host must be a host name or address, "
                                          f"with :PORT or not, got {value!r}")
            hosts.append(parts[0] if parts[1] is None else f"{parts[0]}:{parts[1]}")
        object.__setattr__(self, "allow_hosts", tuple(hosts))   # normalised, hashable
        if not isinstance(self.deidentify, bool):
            raise InvalidSettingError(f"deidentify must be True or False, got "
                                      f"{self.deidentify!r}")


class _HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def slide_name(path: Path) -> str:
    """The URL name of a container: its file name without ``.zarr.zip`` / ``.zarr``,
    characters other than letters, digits, ``.``, ``_`` and ``-`` replaced by ``-``."""
    name = path.name
    for suffix in (".zarr.zip", ".zarr", ".zip"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip("._-")
    return name or "slide"


class _Only(Mapping[str, Any]):
    """A mapping seen through a list of the keys it may show (lazy values stay lazy)."""

    def __init__(self, mapping: Mapping[str, Any], keys: Iterable[str]) -> None:
        self._mapping, self._keys = mapping, tuple(keys)

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        return self._mapping[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class ServedSlide:
    """One open slide and its DeepZoom generator.

    ``properties`` and ``associated_names`` are what the server shows of the slide:
    with ``settings.deidentify``, what a de-identified copy would keep (the reader that
    DeepZoom wraps then reports only those too), computed once, so that a replaced
    DICOM UID stays the same for the server's lifetime.
    """

    def __init__(self, name: str, path: Path, settings: ServerSettings) -> None:
        from openslide.deepzoom import DeepZoomGenerator

        from wsicodec.slide import WsiSlide
        from wsicodec.container import open_container

        self.name, self.path = name, path
        self.slide = WsiSlide(open_container(path), settings.decoder)
        try:
            meta = self.slide.container.metadata
            names = tuple(meta.associated_images)
            properties = dict(self.slide.properties)
            if settings.deidentify:
                from wsicodec.deidentify import deidentify_properties, dropped_associated_images

                dropped = set(dropped_associated_images(names))
                names = tuple(n for n in names if n not in dropped)
                properties = deidentify_properties(properties, meta.source_vendor)[0]
                self.slide.properties = MappingProxyType(properties)
                self.slide.associated_images = _Only(self.slide.associated_images, names)
            self.properties: Mapping[str, str] = MappingProxyType(properties)
            self.associated_names: tuple[str, ...] = names
            tile = self.slide.container.tile_size
            self.deepzoom = DeepZoomGenerator(self.slide, tile_size=tile - 2 * settings.overlap,
                                              overlap=settings.overlap, limit_bounds=False)
        except BaseException:
            self.slide.close()
            raise
        self._associated: dict[tuple[str, str], bytes] = {}   # (image, format) -> encoded
        self._associated_lock = threading.Lock()

    def associated_urls(self) -> dict[str, str]:
        """name -> URL of each associated image: PNG where the container holds it
        losslessly (the label), JPEG otherwise."""
        meta = self.slide.container.metadata
        return {n: f"/slides/{self.name}/associated/{n}."
                   + ("png" if meta.associated_formats.get(n, "png") == "png" else "jpeg")
                for n in self.associated_names}

    def associated_image(self, image: str, fmt: str, jpeg_quality: int) -> bytes:
        """An associated image encoded as ``fmt`` ("jpeg" or "png"), kept once made.

        Raises KeyError for a name the slide does not have or does not show
        (``associated_names``), CorruptDataError if its stored bytes are damaged.
        """
        if image not in self.associated_names:
            raise KeyError(image)
        key = (image, fmt)
        with self._associated_lock:
            body = self._associated.get(key)
        if body is None:
            from PIL import Image

            rgb = self.slide.container.read_associated_image(image)
            body = encode_image(Image.fromarray(rgb), fmt, jpeg_quality)
            with self._associated_lock:
                self._associated[key] = body
        return body

    def summary(self) -> dict[str, Any]:
        w, h = self.slide.dimensions
        props = self.properties
        mpp = props.get("openslide.mpp-x")
        return {"name": self.name, "dzi": f"/slides/{self.name}.dzi",
                "properties": f"/slides/{self.name}/properties", "width": w, "height": h,
                "levels": self.slide.level_count,
                "mpp": float(mpp) if mpp else None,
                "codec": props.get("wsicodec.codec"),
                "associated_images": self.associated_urls()}

    def preload(self) -> None:
        """Load the codec (torch and the model for the learned codec) now, not on the
        first tile request. Raises what building the codec raises."""
        _ = self.slide.decoder.device

    def close(self) -> None:
        self.slide.close()


class SlideSet:
    """The slides a server serves, by URL name. Closes them all on :meth:`close`.

    Raises (from the constructor) as :func:`wsicodec.slide.open_slide`, and
    InvalidSettingError for an empty list.
    """

    def __init__(self, paths: Iterable[str | Path], settings: ServerSettings) -> None:
        self.settings = settings
        self.slides: dict[str, ServedSlide] = {}
        try:
            for p in paths:
                path = Path(p)
                base = name = slide_name(path)
                n = 2
                while name in self.slides:
                    name, n = f"{base}-{n}", n + 1
                self.slides[name] = ServedSlide(name, path, settings)
        except BaseException:
            self.close()
            raise
        if not self.slides:
            raise InvalidSettingError("no slides to serve")

    def get(self, name: str) -> ServedSlide:
        try:
            return self.slides[name]
        except KeyError:
            raise _HttpError(HTTPStatus.NOT_FOUND, f"no slide named {name!r}") from None

    def close(self) -> None:
        for s in self.slides.values():
            s.close()


def render_tile(served: ServedSlide, level: int, col: int, row: int, fmt: str,
                jpeg_quality: int) -> bytes:
    """One DeepZoom tile, encoded.

    Raises:
        RegionOutOfBoundsError: level or address outside the DeepZoom pyramid.
        CorruptTileError: a stored tile under it is damaged.
    """
    dz = served.deepzoom
    if not 0 <= level < dz.level_count:
        raise RegionOutOfBoundsError(f"DeepZoom level {level} outside 0..{dz.level_count - 1}")
    cols, rows = dz.level_tiles[level]
    if not (0 <= col < cols and 0 <= row < rows):
        raise RegionOutOfBoundsError(f"tile ({col}, {row}) outside the {cols}x{rows} tiles "
                                     f"of DeepZoom level {level}")
    return encode_image(dz.get_tile(level, (col, row)), fmt, jpeg_quality)


def encode_image(image: Any, fmt: str, jpeg_quality: int) -> bytes:
    """A PIL image as JPEG (``jpeg_quality``) or PNG (fast deflate) bytes."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.save(buf, "JPEG", quality=jpeg_quality)
    else:
        image.save(buf, "PNG", compress_level=1)
    return buf.getvalue()

class _RequestReader(io.RawIOBase):
    """The read side of one connection, with a deadline on each request head.

    :meth:`begin` starts a request: from then reads fail with TimeoutError once the
    server's ``timeout`` has passed, however slowly bytes trickle in (a socket timeout
    alone restarts with every byte).  Until the request's first byte arrives (an idle
    keep-alive connection, or a new one that has sent nothing) a read ends quietly
    (EOF: the handler closes the connection) at the deadline, when the server is
    closing, or when connections wait for a worker and this one has been idle for
    IDLE_GRACE_S.  Each read leaves the socket's timeout at ``timeout`` for the
    writes that follow.
    """

    def __init__(self, sock: socket.socket, server: "TileServer") -> None:
        super().__init__()
        self._sock, self._server = sock, server
        self._timeout = server.settings.timeout
        self._deadline = time.monotonic() + self._timeout
        self._idle_since: float | None = time.monotonic()

    def readable(self) -> bool:
        return True

    def begin(self) -> None:
        now = time.monotonic()
        self._deadline, self._idle_since = now + self._timeout, now

    def readinto(self, buf: Any) -> int:
        try:
            while True:
                now = time.monotonic()
                left = self._deadline - now
                idle = self._idle_since is not None
                if idle:
                    if left <= 0 or self._server.closing or (
                            now - self._idle_since >= IDLE_GRACE_S and self._server.waiting()):
                        return 0
                    self._sock.settimeout(min(left, _IDLE_POLL_S))
                else:
                    if left <= 0:
                        raise TimeoutError(f"request head not received within "
                                           f"{self._timeout:g} s")
                    self._sock.settimeout(left)
                try:
                    n = self._sock.recv_into(buf)
                except TimeoutError:
                    if idle:
                        continue
                    raise TimeoutError(f"request head not received within "
                                       f"{self._timeout:g} s") from None
                self._idle_since = None
                return n
        finally:
            self._sock.settimeout(self._timeout)


class _SocketWriter(io.BufferedIOBase):
    """Unbuffered writes, each sent whole (``socket.sendall``, bounded by the socket's
    timeout in total)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self._sock.sendall(b)
        with memoryview(b) as view:
            return view.nbytes


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


class TileRequestHandler(BaseHTTPRequestHandler):
    """Routes GET/HEAD requests (see the module docstring)."""

    server: "TileServer"
    protocol_version = "HTTP/1.1"
    server_version = "wsicodec"

    def setup(self) -> None:
        self.connection = sock = self.request
        sock.settimeout(self.server.settings.timeout)
        # headers and body go out at once (no 40 ms delayed-ACK stall)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self._reader = _RequestReader(sock, self.server)
        self.rfile = io.BufferedReader(self._reader)
        self.wfile = _SocketWriter(sock)

    def handle_one_request(self) -> None:
        self._reader.begin()
        super().handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        log.debug("%s - %s", self.address_string(), format % args)

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":   # "GET /path": would be answered bare
            self.send_error(HTTPStatus.BAD_REQUEST, "HTTP/0.9 requests are not served "
                                                    "(no HTTP version in the request line)")
            return False
        hosts = self.headers.get_all("Host") or []
        host = hosts[0] if len(hosts) == 1 else None
        target = (urlsplit(self.path).netloc if _ABSOLUTE_FORM_RE.match(self.path)
                  else None)                    # "GET http://NAME/path": NAME counts too
        if not self.server.host_allowed(host):
            shown = (f"Host {host[:100]!r}" if host is not None
                     else "a request with several Host headers" if hosts
                     else "a request without a Host header")
        elif target is not None and not self.server.host_allowed(target):
            shown = f"a request for {target[:100]!r}"
        else:
            return True
        self._discard_small_body()
        self._send_error(HTTPStatus.MISDIRECTED_REQUEST,
                         f"{shown} is not answered here (DNS rebinding protection): this "
                         f"server answers a loopback name (localhost, 127.0.0.1, [::1]) or "
                         f"a name given with wsicodec serve --allow-host NAME")
        return False

    def _discard_small_body(self) -> None:
        """Read a small request body, so that closing the connection after the answer
        does not reset it under the answer."""
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) <= 65536:
            self.rfile.read(int(length))

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """http.server's errors (400 for a malformed request line, 414, 431 for a header
        line over 64 KiB or over 100 headers, 501 for an unknown method) as JSON like ours,
        with a status line and headers even when the request line was not understood."""
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        self._send_error(HTTPStatus(code), message or HTTPStatus(code).phrase)

    def _send_error(self, status: HTTPStatus, message: str,
                    headers: Sequence[tuple[str, str]] = ()) -> None:
        self.log_error("code %d, message %s", status, message)
        body = _error_body(message)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _method_not_allowed(self) -> None:
        self._discard_small_body()
        self._send_error(HTTPStatus.METHOD_NOT_ALLOWED,
                         f"method {self.command} not allowed (GET or HEAD)",
                         [("Allow", "GET, HEAD")])

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = \
        _method_not_allowed  # noqa: N815 - http.server's naming

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._handle(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._handle(head=False)

    def _handle(self, head: bool) -> None:
        try:
            status, ctype, body, cache = self._route(unquote(urlsplit(self.path).path))
        except _HttpError as e:
            status, ctype, cache = e.status, "application/json", False
            body = _error_body(str(e))
        except RegionOutOfBoundsError as e:
            status, ctype, cache = HTTPStatus.NOT_FOUND, "application/json", False
            body = _error_body(str(e))
        except CorruptDataError as e:
            status, ctype, cache = HTTPStatus.INTERNAL_SERVER_ERROR, "application/json", False
            body = _error_body(str(e))
            log.warning("%s: %s", self.path, e)
        except Exception as e:  # noqa: BLE001 - one failed request must not stop the server
            status, ctype, cache = HTTPStatus.INTERNAL_SERVER_ERROR, "application/json", False
            body = _error_body(f"internal error: {type(e).__name__}: {e}")
            log.exception("%s failed", self.path)
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "public, max-age=3600" if cache else "no-store")
            if self.server.waiting():   # free this worker for a waiting connection
                self.send_header("Connection", "close")
            self.end_headers()
            if not head:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client went away
            self.close_connection = True

    # -- routes: each returns (status, content type, body, cacheable)
    def _route(self, path: str) -> tuple[HTTPStatus, str, bytes, bool]:
        srv = self.server
        if path in ("/", "/index.html"):
            return self._file(STATIC_DIR, "index.html")
        if path.startswith("/static/"):
            return self._file(STATIC_DIR, path[len("/static/"):], top_level_only=True)
        if path.startswith("/openseadragon/"):
            return self._file(srv.settings.openseadragon_dir, path[len("/openseadragon/"):])
        if path == "/health":
            return self._json({"status": "ok", "slides": len(srv.slides.slides),
                               "viewer": srv.viewer_available})
        if path in ("/slides", "/slides/"):
            return self._json([s.summary() for s in srv.slides.slides.values()])
        m = _TILE_RE.match(path)
        if m:
            served = srv.slides.get(m["name"])
            fmt = _image_format(m["fmt"], "tile")
            level, col, row = (_parse_int(m[k], k) for k in ("level", "col", "row"))
            body = render_tile(served, level, col, row, fmt, srv.settings.jpeg_quality)
            return HTTPStatus.OK, TILE_FORMATS[fmt], body, True
        m = _DZI_RE.match(path)
        if m:
            dzi = srv.slides.get(m["name"]).deepzoom.get_dzi("jpeg")
            return HTTPStatus.OK, "application/xml", dzi.encode(), False
        m = _PROPS_RE.match(path)
        if m:
            return self._json(dict(srv.slides.get(m["name"]).properties))
        m = _ASSOCIATED_RE.match(path)
        if m:
            served = srv.slides.get(m["name"])
            fmt = _image_format(m["fmt"], "image")
            if m["image"] not in served.associated_names:
                raise _HttpError(HTTPStatus.NOT_FOUND, f"slide {served.name!r} has no associated "
                                 f"image {m['image']!r}")
            body = served.associated_image(m["image"], fmt, srv.settings.jpeg_quality)
            return HTTPStatus.OK, TILE_FORMATS[fmt], body, True
        if path.startswith("/slides/"):
            if "_files/" in path:
                raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed tile path (expected "
                                 "/slides/NAME_files/LEVEL/COL_ROW.jpeg)")
            raise _HttpError(HTTPStatus.NOT_FOUND, f"not found: {path}")
        raise _HttpError(HTTPStatus.NOT_FOUND, f"not found: {path}")

    @staticmethod
    def _json(obj: Any) -> tuple[HTTPStatus, str, bytes, bool]:
        return HTTPStatus.OK, "application/json", json.dumps(obj).encode(), False

    @staticmethod
    def _file(root: Path, rel: str, top_level_only: bool = False
              ) -> tuple[HTTPStatus, str, bytes, bool]:
        parts = [p for p in rel.split("/") if p]
        if not parts or any(p in (".", "..") or p.startswith(".") for p in parts) \
                or (top_level_only and len(parts) != 1):
            raise _HttpError(HTTPStatus.NOT_FOUND, f"not found: {rel}")
        target = root.joinpath(*parts)
        try:
            resolved = target.resolve(strict=True)
            if root.resolve() not in resolved.parents or not resolved.is_file():
                raise FileNotFoundError(rel)
            body = resolved.read_bytes()
        except OSError:
            raise _HttpError(HTTPStatus.NOT_FOUND, f"not found: {rel}") from None
        ctype = mimetypes.guess_type(resolved.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        return HTTPStatus.OK, ctype, body, False


def _image_format(ext: str, what: str) -> str:
    """A URL's extension as a key of TILE_FORMATS ("jpg" is "jpeg"); 400 for others."""
    fmt = ext.lower()
    fmt = "jpeg" if fmt == "jpg" else fmt
    if fmt not in TILE_FORMATS:
        raise _HttpError(HTTPStatus.BAD_REQUEST, f"unknown {what} format {ext!r} (jpeg or png)")
    return fmt


def _parse_int(text: str, what: str) -> int:
    if not _INT_RE.match(text):
        raise _HttpError(HTTPStatus.BAD_REQUEST, f"{what} must be a non-negative integer, "
                                                 f"got {text!r}")
    return int(text)


class TileServer(HTTPServer):
    """An HTTP server over a :class:`SlideSet` with a bounded pool of worker threads
    (see the module docstring); :meth:`server_close` closes the slides too."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], slides: SlideSet,
                 settings: ServerSettings) -> None:
        self.slides = slides
        self.settings = settings
        self.closing = False
        self._pool_lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[socket.socket, Any] | None] = queue.SimpleQueue()
        self._queued = 0    # items in _queue
        self._idle = 0      # workers free (started or back from a connection)
        self._workers: list[threading.Thread] = []
        self._lingering: collections.deque[tuple[float, socket.socket]] = collections.deque()
        self.refused = 0    # connections answered 503
        super().__init__(address, TileRequestHandler)

    @property
    def viewer_available(self) -> bool:
        return (self.settings.openseadragon_dir / "openseadragon.min.js").is_file()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/"

    @property
    def loopback_only(self) -> bool:
        """Whether the bound address is a loopback one (only this machine reaches it)."""
        return is_loopback(str(self.server_address[0]))

    def host_allowed(self, host: str | None) -> bool:
        """Whether a request with this ``Host`` (None: none, or several) is answered:
        bound to loopback, a loopback name or one of ``settings.allow_hosts``; bound
        elsewhere, those when ``allow_hosts`` lists any, else any (DNS rebinding, see
        the module docstring)."""
        allowed = self.settings.allow_hosts
        if not allowed and not self.loopback_only:
            return True
        parts = _split_host(host) if host is not None else None
        if parts is None:
            return False
        name, port = parts
        return (_is_loopback_name(name) or name in allowed
                or (port is not None and f"{name}:{port}" in allowed))

    # -- the worker pool
    def waiting(self) -> int:
        """Connections accepted and waiting for a worker."""
        with self._pool_lock:
            return max(0, self._queued - self._idle)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand the connection to a free worker, start one (up to max_connections), queue
        it (up to max_connections waiting) or refuse it with a 503."""
        n = self.settings.max_connections
        with self._pool_lock:
            if self.closing or (self._idle <= self._queued and len(self._workers) >= n
                                and self._queued - self._idle >= n):
                refuse = True
            else:
                refuse = False
                if self._idle <= self._queued and len(self._workers) < n:
                    t = threading.Thread(target=self._work, daemon=True,
                                         name=f"wsicodec-worker-{len(self._workers)}")
                    self._workers.append(t)
                    self._idle += 1
                    t.start()
                self._queue.put((request, client_address))
                self._queued += 1
        if refuse:
            self._refuse(request)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            with self._pool_lock:
                self._queued -= 1
                self._idle -= 1
            if item is None:
                return
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:  # noqa: BLE001 - as socketserver: log, close, serve the next
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
                with self._pool_lock:
                    self._idle += 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection's failure: the client's doing (reset, timed out) is logged at
        debug level, anything else with its traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.debug("connection from %s: %r", client_address, error)
        else:
            log.exception("connection from %s failed", client_address)

    def _refuse(self, request: socket.socket) -> None:
        self.refused += 1
        n = self.settings.max_connections
        body = _error_body(f"server busy: {n} connections are being served and {n} wait; "
                           f"retry in {_RETRY_AFTER_S} s")
        head = (f"HTTP/1.1 503 Service Unavailable\r\nServer: {TileRequestHandler.server_version}"
                f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"Retry-After: {_RETRY_AFTER_S}\r\nCache-Control: no-store\r\n"
                f"Connection: close\r\n\r\n").encode()
        try:   # never blocks the accepting thread: the answer fits the socket's buffer
            request.setblocking(False)
            _drain(request)
            request.send(head + body)
            request.shutdown(socket.SHUT_WR)
        except OSError:
            request.close()
            return
        self._lingering.append((time.monotonic() + _REFUSED_LINGER_S, request))
        while len(self._lingering) > _MAX_LINGERING:
            self._lingering.popleft()[1].close()

    def service_actions(self) -> None:
        """(serve_forever's thread, after each accept and twice a second) close the
        refused connections whose client has closed or whose time is up."""
        now, keep = time.monotonic(), collections.deque()
        while self._lingering:
            until, sock = self._lingering.popleft()
            if now >= until or _drain(sock):
                sock.close()
            else:
                keep.append((until, sock))
        self._lingering = keep

    def server_close(self) -> None:
        """Stop listening, close the refused connections, end idle connections and the
        workers (waiting up to a second for those busy), then close the slides."""
        self.closing = True
        super().server_close()
        while self._lingering:
            self._lingering.popleft()[1].close()
        with self._pool_lock:
            for _ in self._workers:
                self._queue.put(None)
                self._queued += 1
        until = time.monotonic() + 1.0
        for t in self._workers:
            t.join(max(0.0, until - time.monotonic()))
        self.slides.close()


def _drain(sock: socket.socket) -> bool:
    """Read what a non-blocking socket has (up to 1 MiB); True when it is closed."""
    try:
        for _ in range(16):
            if not sock.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    return False


def _split_host(value: str) -> tuple[str, str | None] | None:
    """A ``Host`` header or an allowed host, ``NAME[:PORT]`` (an IPv6 address in
    brackets), as (NAME lower-cased, PORT or None); None when it is not one."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[:end + 1], value[end + 1:]
        try:
            ipaddress.IPv6Address(name[1:-1])
        except ValueError:
            return None
    else:
        name, sep, port = value.partition(":")
        rest = sep + port
        if len(name) > 253 or not _HOST_NAME_RE.match(name):
            return None
    if not rest:
        return name, None
    if rest[0] != ":" or not _PORT_RE.match(rest[1:]):
        return None
    return name, rest[1:]


def _is_loopback_name(name: str) -> bool:
    """``localhost``, a loopback IPv4 address or a bracketed loopback IPv6 address."""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name[1:-1] if name.startswith("[") else name).is_loopback
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    """Whether an address (``server_address[0]``, or ``localhost``) is a loopback one."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def make_server(paths: Sequence[str | Path], host: str = "127.0.0.1", port: int = 8000,
                settings: ServerSettings | None = None, preload: bool = True) -> TileServer:
    """Open the slides and bind the server (port 0: any free port; see ``.url``).
    Call ``serve_forever()`` to serve and ``server_close()`` to release everything.

    With ``preload`` each slide's codec is loaded before binding (the first tile
    request does not pay for importing torch and loading the model).

    Raises:
        SlideNotFoundError, UnsupportedFormatError, CorruptDataError: a slide does
            not open (nothing stays open).
        ModelMismatchError, CodecUnavailableError: a slide's codec cannot be built.
        InvalidSettingError: no slides, or bad settings.
        OSError: the address cannot be bound (in use, not permitted).
    """
    settings = settings or ServerSettings()
    if not 0 <= int(port) <= 65535:
        raise InvalidSettingError(f"port must be in 0..65535, got {port}")
    slides = SlideSet(paths, settings)
    try:
        if preload:
            for s in slides.slides.values():
                s.preload()
        try:
            return TileServer((host, int(port)), slides, settings)
        except OSError as e:   # name the address: "Address already in use" alone says too little
            raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    except BaseException:
        slides.close()
        raise


def serve_in_thread(server: TileServer) -> threading.Thread:
    """Run ``server.serve_forever`` in a daemon thread (tests, benchmarks)."""
    t = threading.Thread(target=server.serve_forever, name="wsicodec-serve", daemon=True)
    t.start()
    return t


__all__ = ["ServerSettings", "SlideSet", "TileServer", "is_loopback", "make_server",
           "render_tile", "serve_in_thread", "slide_name", "WsiCodecError"]
