"""A bounded HTTP/1.1 server: worker pool, deadlines, 503 when full, Host checking.

Standard library only (``http.server``).  :class:`BoundedHTTPServer` serves each
connection on one of a bounded pool of worker threads; :class:`BoundedRequestHandler`
reads each request head under a deadline, answers errors as JSON ``{"error": ...}``
and refuses a ``Host`` the server does not answer to.  The application
(:mod:`wsicodec.server`, the DeepZoom tile server) subclasses both: it adds the routes
(``do_GET``/``do_HEAD``, answered with :meth:`BoundedRequestHandler.respond`) and what
the server serves.  ``settings`` is anything with ``timeout``, ``max_connections`` and
``allow_hosts``, and optionally ``cors_origins`` (:class:`wsicodec.server.ServerSettings`).

OPTIONS is answered 204 with ``Allow`` (and, for an origin in ``settings.cors_origins``,
the CORS preflight headers: :mod:`wsicodec.httpcache`).  Status codes made here: 405 for
methods other than GET, HEAD and OPTIONS (501 for unknown ones), 400 for a malformed
request line, 431 for a header line over 64 KiB or more than 100 headers, 421 for a ``Host`` the server does not answer to (below), 503 (with
``Retry-After``) when the server is full.

DNS rebinding: a web page whose host name the attacker re-points at 127.0.0.1 is the
same origin as that name to the browser, so it could read this server's slides and
labels.  Such requests carry the attacker's name in ``Host``: a server bound to a
loopback address answers only requests whose ``Host`` is a loopback name
(``localhost``, ``127.x.x.x``, ``[::1]``, any port) or one of ``allow_hosts``; bound
to another address it answers those when ``allow_hosts`` lists any, and any ``Host``
otherwise.  (Parsing ``Host`` and telling loopback names: :mod:`wsicodec.hosts`.)

Under abuse (see docs/server-security.md): each request head must arrive within
``timeout`` seconds of the server starting to wait for it, however slowly its bytes
trickle (slowloris), and an idle keep-alive connection is closed after ``timeout``
seconds.  At most ``max_connections`` connections are served at once (one worker
thread each; threads never exceed that); up to as many again wait in a queue, in
arrival order, and while any wait, a connection idle for a second gives way (is
closed) and responses carry ``Connection: close``; beyond that a connection gets an
immediate ``503 Service Unavailable`` with ``Retry-After: 1``.  The server has no
authentication: bind it to loopback (the default) or put it behind a proxy that has.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import queue
import re
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Sequence
from urllib.parse import urlsplit

from wsicodec.hosts import is_loopback, is_loopback_name, split_host
from wsicodec.httpcache import (ALLOWED_METHODS, CACHE_IMAGES, CACHE_NONE, cors_headers,
                                preflight_headers)

log = logging.getLogger(__name__)


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


class HttpError(Exception):
    """A request answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


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

    def __init__(self, sock: socket.socket, server: "BoundedHTTPServer") -> None:
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


def error_body(message: str) -> bytes:
    """An error response's body: JSON ``{"error": message}``."""
    return json.dumps({"error": message}).encode()


class BoundedRequestHandler(BaseHTTPRequestHandler):
    """One connection's requests under the server's deadlines and Host rule, errors as
    JSON; OPTIONS gets 204, methods other than GET, HEAD and OPTIONS get 405.  Subclasses
    add ``do_GET`` and ``do_HEAD`` and answer with :meth:`respond`."""

    server: "BoundedHTTPServer"
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
        body = error_body(message)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", CACHE_NONE)
        cors = cors_headers(self._cors_origins(), self.headers.get("Origin")) \
            if getattr(self, "headers", None) is not None else []
        for k, v in [*headers, *cors]:
            self.send_header(k, v)
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _method_not_allowed(self) -> None:
        self._discard_small_body()
        self._send_error(HTTPStatus.METHOD_NOT_ALLOWED,
                         f"method {self.command} not allowed (GET, HEAD or OPTIONS)",
                         [("Allow", ALLOWED_METHODS)])

    do_POST = do_PUT = do_DELETE = do_PATCH = do_TRACE = do_CONNECT = \
        _method_not_allowed  # noqa: N815 - http.server's naming

    def do_OPTIONS(self) -> None:  # noqa: N802 - http.server's naming
        """204 with ``Allow`` for any target (``*`` too), and the CORS preflight headers
        when the server allows the request's origin
        (:func:`wsicodec.httpcache.preflight_headers`)."""
        self._discard_small_body()
        get = self.headers.get
        cors = preflight_headers(self._cors_origins(), get("Origin"),
                                 get("Access-Control-Request-Method"),
                                 get("Access-Control-Request-Headers"))
        self._send(HTTPStatus.NO_CONTENT, [("Allow", ALLOWED_METHODS), *cors], b"", cors=False)

    def _cors_origins(self) -> tuple[str, ...]:
        return tuple(getattr(self.server.settings, "cors_origins", ()))

    def respond(self, status: HTTPStatus, ctype: str, body: bytes, cache: bool | str,
                head: bool, headers: Sequence[tuple[str, str]] = ()) -> None:
        """Send a response (``cache``: a ``Cache-Control`` value, or True for public for
        an hour and False for ``no-store``; ``headers``: more, e.g. ``ETag``; ``head``:
        without its body), with the CORS headers the request's origin gets, closing the
        connection when others wait for a worker."""
        control = cache if isinstance(cache, str) else CACHE_IMAGES if cache else CACHE_NONE
        self._send(status, [("Content-Type", ctype), ("Content-Length", str(len(body))),
                            ("Cache-Control", control), *headers], b"" if head else body)

    def not_modified(self, etag: str, cache: str) -> None:
        """304 Not Modified for a matching ``If-None-Match``: no body, the ``ETag`` and
        ``Cache-Control`` a 200 would carry, and the CORS headers."""
        self._send(HTTPStatus.NOT_MODIFIED, [("ETag", etag), ("Cache-Control", cache)], b"")

    def _send(self, status: HTTPStatus, headers: Sequence[tuple[str, str]], body: bytes, *,
              cors: bool = True) -> None:
        """Status line, ``headers`` (and with ``cors`` those of :func:`cors_headers`),
        ``Connection: close`` when others wait for a worker (freeing this one), body."""
        if cors:
            headers = [*headers, *cors_headers(self._cors_origins(), self.headers.get("Origin"))]
        try:
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            if self.server.waiting():
                self.send_header("Connection", "close")
            self.end_headers()
            if body:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client went away
            self.close_connection = True


class BoundedHTTPServer(HTTPServer):
    """An HTTP server with a bounded pool of worker threads (see the module docstring).

    ``handler``: a :class:`BoundedRequestHandler`; ``settings``: its ``timeout``,
    ``max_connections`` and ``allow_hosts``.
    """

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BoundedRequestHandler],
                 settings: Any) -> None:
        self.settings = settings
        self.closing = False
        self._pool_lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[socket.socket, Any] | None] = queue.SimpleQueue()
        self._queued = 0    # items in _queue
        self._idle = 0      # workers free (started or back from a connection)
        self._workers: list[threading.Thread] = []
        self._lingering: collections.deque[tuple[float, socket.socket]] = collections.deque()
        self.refused = 0    # connections answered 503
        super().__init__(address, handler)

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
        parts = split_host(host) if host is not None else None
        if parts is None:
            return False
        name, port = parts
        return (is_loopback_name(name) or name in allowed
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
        body = error_body(f"server busy: {n} connections are being served and {n} wait; "
                          f"retry in {_RETRY_AFTER_S} s")
        server = self.RequestHandlerClass.server_version
        head = (f"HTTP/1.1 503 Service Unavailable\r\nServer: {server}"
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
        workers (waiting up to a second for those busy)."""
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


# is_loopback and split_host live in wsicodec.hosts; re-exported
__all__ = ["BoundedHTTPServer", "BoundedRequestHandler", "HttpError", "IDLE_GRACE_S",
           "error_body", "is_loopback", "split_host"]
