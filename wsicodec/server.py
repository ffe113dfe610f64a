"""DeepZoom tile server over HTTP, with an OpenSeadragon viewer page.

A :class:`wsicodec.httpd.BoundedHTTPServer` (a bounded pool of worker threads, one
connection each, at most ``ServerSettings.max_connections`` served at once; deadlines,
503 when full, Host checking: see :mod:`wsicodec.httpd`) whose requests all share one
:class:`wsicodec.slide.WsiSlide` per slide (thread-safe, with its batched decoder and
LRU tile cache) wrapped in OpenSlide's own ``openslide.deepzoom.DeepZoomGenerator``
(those slides: :mod:`wsicodec.slideset`; here: settings, routes and the server)::

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
    GET /slides/<name>/fidelity/<level>.json  a format-4 level's fidelity map (JSON; 404
                                              without one): :func:`wsicodec.fidelity.level_json`

Status codes: 400 for a malformed request (bad numbers, unknown tile format), 404 for
anything that does not exist (unknown slide, level or tile outside the pyramid), 500
only for a tile whose stored bytes are damaged (the message names it; other tiles
still serve) or an unexpected failure, 204 for OPTIONS, 405 for other methods than GET,
HEAD and OPTIONS (501 for unknown ones), 304 for a GET whose ``If-None-Match`` holds the
resource's ``ETag``, 431 for a header line over 64 KiB or more than 100 headers, 421 for a
``Host`` the server does not answer to (DNS rebinding: :mod:`wsicodec.httpd`), 503
(with ``Retry-After``) when the server is full.  Error bodies are JSON ``{"error": ...}``.

With ``ServerSettings.deidentify`` each slide is served as ``compress --deidentify``
would have written it (:mod:`wsicodec.deidentify`): the associated images it drops
(label, macro) are neither listed nor served, the properties it removes are not
served, and DICOM instance UIDs are replaced by new ones (the same for the server's
lifetime).  The tissue tiles are served as they are.

Caching and CORS (:mod:`wsicodec.httpcache`): tiles, descriptors and the other 200
answers but ``/health`` carry an ``ETag`` that changes with the container, tiles and
associated images ``Cache-Control: public, max-age=3600``, the rest ``no-cache``; a
revalidated tile is answered 304 without being decoded.  ``Access-Control-Allow-Origin``
only for the origins in ``ServerSettings.cors_origins`` (``serve --cors``).

Under abuse see :mod:`wsicodec.httpd` and docs/server-security.md.  The server has no
authentication: bind it to loopback (the default) or put it behind a proxy that has.

Library code: builds and runs the server, raises; the CLI (``wsicodec serve``) prints.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
import threading
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import unquote, urlsplit

from wsicodec.batch import DecoderSettings
from wsicodec.errors import (CorruptDataError, InvalidSettingError, RegionOutOfBoundsError,
                             WsiCodecError)
from wsicodec.fidelity import level_json
from wsicodec.hosts import split_host
from wsicodec.httpcache import CACHE_IMAGES, check_cors_origin, entity_tag, etag_matches, validator
from wsicodec.httpd import BoundedHTTPServer, BoundedRequestHandler, HttpError, error_body
from wsicodec.slideset import (ServedSlide, SlideSet, check_tile_address, encode_image, render_tile,
                               slide_name)

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
_FIDELITY_RE = re.compile(rf"^/slides/(?P<name>{_NAME})/fidelity/(?P<level>[^/]+)\.json$")
_INT_RE = re.compile(r"^[0-9]{1,9}$")
#: the routes of one slide's resources (their ETags: wsicodec.httpcache.validator)
_SLIDE_ROUTES = (_TILE_RE, _DZI_RE, _PROPS_RE, _ASSOCIATED_RE)


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
            loopback, an empty tuple answers any ``Host`` (see :mod:`wsicodec.httpd`).
        deidentify: serve each slide's properties and associated images by the rules
            of ``compress --deidentify`` (:mod:`wsicodec.deidentify`).
        cors_origins: origins (``https://viewer.example.org``) whose pages may read
            the responses (``Access-Control-Allow-Origin``), or ``("*",)`` for any;
            empty (the default): none (:mod:`wsicodec.httpcache`).
    """

    jpeg_quality: int = 90
    overlap: int = 0
    decoder: DecoderSettings = DecoderSettings()
    openseadragon_dir: Path = OPENSEADRAGON_DIR
    timeout: float = 30.0
    max_connections: int = 64
    allow_hosts: tuple[str, ...] = ()
    deidentify: bool = False
    cors_origins: tuple[str, ...] = ()

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
            parts = split_host(value) if isinstance(value, str) else None
            if parts is None:
                raise InvalidSettingError(f"allowed host must be a host name or address, "
                                          f"with :PORT or not, got {value!r}")
            hosts.append(parts[0] if parts[1] is None else f"{parts[0]}:{parts[1]}")
        object.__setattr__(self, "allow_hosts", tuple(hosts))   # normalised, hashable
        if not isinstance(self.deidentify, bool):
            raise InvalidSettingError(f"deidentify must be True or False, got "
                                      f"{self.deidentify!r}")
        if isinstance(self.cors_origins, str) or not isinstance(self.cors_origins, (tuple, list)):
            raise InvalidSettingError(f"CORS origins must be a sequence of origins, got "
                                      f"{self.cors_origins!r}")
        object.__setattr__(self, "cors_origins",
                           tuple(dict.fromkeys(check_cors_origin(o) for o in self.cors_origins)))


class TileRequestHandler(BoundedRequestHandler):
    """Routes GET/HEAD requests (see the module docstring)."""

    server: "TileServer"

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._handle(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._handle(head=False)

    def _handle(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        if_none_match = self.headers.get("If-None-Match")
        if if_none_match is not None:       # a cached tile revalidated: answered undecoded
            etag = self._tile_etag(path)
            if etag is not None and etag_matches(if_none_match, etag):
                return self.not_modified(etag, CACHE_IMAGES)
        try:
            status, ctype, body, cache = self._route(path)
        except HttpError as e:
            status, ctype, cache = e.status, "application/json", False
            body = error_body(str(e))
        except RegionOutOfBoundsError as e:
            status, ctype, cache = HTTPStatus.NOT_FOUND, "application/json", False
            body = error_body(str(e))
        except CorruptDataError as e:
            status, ctype, cache = HTTPStatus.INTERNAL_SERVER_ERROR, "application/json", False
            body = error_body(str(e))
            log.warning("%s: %s", self.path, e)
        except Exception as e:  # noqa: BLE001 - one failed request must not stop the server
            status, ctype, cache = HTTPStatus.INTERNAL_SERVER_ERROR, "application/json", False
            body = error_body(f"internal error: {type(e).__name__}: {e}")
            log.exception("%s failed", self.path)
        if status != HTTPStatus.OK:
            return self.respond(status, ctype, body, cache, head)
        etag, control = self._validator(path, body, cache)
        if etag is not None and etag_matches(if_none_match, etag):
            return self.not_modified(etag, control)
        self.respond(status, ctype, body, control, head, [("ETag", etag)] if etag else [])

    def _tile_etag(self, path: str) -> str | None:
        """The ETag of the DeepZoom tile at ``path`` if it names one (None otherwise),
        without decoding it."""
        m = _TILE_RE.match(path)
        served = self.server.slides.slides.get(m["name"]) if m else None
        if served is None or m["fmt"].lower() not in ("jpeg", "jpg", "png") or \
                not all(_INT_RE.match(m[k]) for k in ("level", "col", "row")):
            return None
        try:
            check_tile_address(served, int(m["level"]), int(m["col"]), int(m["row"]))
        except RegionOutOfBoundsError:
            return None
        return entity_tag(served.identity, path, weak=True)

    def _validator(self, path: str, body: bytes, cache: bool) -> tuple[str | None, str]:
        slides = self.server.slides.slides
        return validator(path, body, cache, _SLIDE_ROUTES,
                         lambda name: slides[name].identity if name in slides else None)

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
        m = _FIDELITY_RE.match(path)
        if m:
            served = srv.slides.get(m["name"])
            body = level_json(served.slide.container, _parse_int(m["level"], "level"))
            if body is None:
                raise HttpError(HTTPStatus.NOT_FOUND, f"slide {served.name!r} has no fidelity "
                                                      "map (its container is not format 4)")
            return self._json(body)
        m = _ASSOCIATED_RE.match(path)
        if m:
            served = srv.slides.get(m["name"])
            fmt = _image_format(m["fmt"], "image")
            if m["image"] not in served.associated_names:
                raise HttpError(HTTPStatus.NOT_FOUND, f"slide {served.name!r} has no associated "
                                 f"image {m['image']!r}")
            body = served.associated_image(m["image"], fmt, srv.settings.jpeg_quality)
            return HTTPStatus.OK, TILE_FORMATS[fmt], body, True
        if path.startswith("/slides/"):
            if "_files/" in path:
                raise HttpError(HTTPStatus.BAD_REQUEST, "malformed tile path (expected "
                                 "/slides/NAME_files/LEVEL/COL_ROW.jpeg)")
            raise HttpError(HTTPStatus.NOT_FOUND, f"not found: {path}")
        raise HttpError(HTTPStatus.NOT_FOUND, f"not found: {path}")

    @staticmethod
    def _json(obj: Any) -> tuple[HTTPStatus, str, bytes, bool]:
        return HTTPStatus.OK, "application/json", json.dumps(obj).encode(), False

    @staticmethod
    def _file(root: Path, rel: str, top_level_only: bool = False
              ) -> tuple[HTTPStatus, str, bytes, bool]:
        parts = [p for p in rel.split("/") if p]
        if not parts or any(p in (".", "..") or p.startswith(".") for p in parts) \
                or (top_level_only and len(parts) != 1):
            raise HttpError(HTTPStatus.NOT_FOUND, f"not found: {rel}")
        target = root.joinpath(*parts)
        try:
            resolved = target.resolve(strict=True)
            if root.resolve() not in resolved.parents or not resolved.is_file():
                raise FileNotFoundError(rel)
            body = resolved.read_bytes()
        except OSError:
            raise HttpError(HTTPStatus.NOT_FOUND, f"not found: {rel}") from None
        ctype = mimetypes.guess_type(resolved.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        return HTTPStatus.OK, ctype, body, False


def _image_format(ext: str, what: str) -> str:
    """A URL's extension as a key of TILE_FORMATS ("jpg" is "jpeg"); 400 for others."""
    fmt = ext.lower()
    fmt = "jpeg" if fmt == "jpg" else fmt
    if fmt not in TILE_FORMATS:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"unknown {what} format {ext!r} (jpeg or png)")
    return fmt


def _parse_int(text: str, what: str) -> int:
    if not _INT_RE.match(text):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{what} must be a non-negative integer, "
                                                f"got {text!r}")
    return int(text)


class TileServer(BoundedHTTPServer):
    """A :class:`~wsicodec.httpd.BoundedHTTPServer` over a :class:`SlideSet`;
    :meth:`server_close` closes the slides too."""

    def __init__(self, address: tuple[str, int], slides: SlideSet,
                 settings: ServerSettings) -> None:
        self.slides = slides
        super().__init__(address, TileRequestHandler, settings)

    @property
    def viewer_available(self) -> bool:
        return (self.settings.openseadragon_dir / "openseadragon.min.js").is_file()

    def server_close(self) -> None:
        """Close the server (:meth:`BoundedHTTPServer.server_close`), then the slides."""
        super().server_close()
        self.slides.close()


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


# SlideSet, ServedSlide, render_tile, check_tile_address, encode_image, slide_name: moved to
# wsicodec.slideset, re-exported
__all__ = ["ServerSettings", "SlideSet", "TileServer", "make_server", "render_tile",
           "serve_in_thread", "slide_name", "WsiCodecError", "ServedSlide", "check_tile_address",
           "encode_image"]