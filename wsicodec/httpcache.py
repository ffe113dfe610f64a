"""HTTP conventions of the tile server: entity tags, conditional GET, caching, CORS.

Standard library only; :mod:`wsicodec.server` (routes) and :mod:`wsicodec.httpd`
(responses) use it.

Entity tags.  Every slide resource (DeepZoom descriptor and tiles, properties,
associated images) gets an ``ETag`` made of the slide's *identity* and the resource's
own key (its URL path)::

    identity = H(wsicodec version, server settings that change the bytes,
                 the container's metadata digest [, its size and mtime: format 1-2])
    ETag     = H(identity, path)

A format-3 container's metadata digest covers its random ``container_id`` and the
digests of every tile and associated image (:mod:`wsicodec.integrity`), so a
container written again, or changed in any tile, gets new tags for everything it
serves; a format 1-2 container has no tile digests, so its size and modification time
stand in for them.  Tags of decoded images are weak (``W/"..."``): the same stored
tile decoded on another device or precision may differ in a few pixel values, which
are equivalent representations, not byte-identical ones; descriptors (XML, JSON) are
strong.  ``If-None-Match`` is compared weakly (RFC 9110 13.1.2), ``*`` matches any
existing resource.

CORS.  ``Access-Control-Allow-Origin`` is sent only when the server is started with
``--cors ORIGIN`` (repeatable) and the request's ``Origin`` is one of them (echoed,
with ``Vary: Origin``), or for every origin when ``*`` was given explicitly.  Never by
default: the server has no authentication, and CORS would let any page a user visits
read every slide, label included.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable, Iterable

from wsicodec.errors import InvalidSettingError

#: tiles and associated images: a change of container changes their tag; caches may
#: keep them an hour without asking
CACHE_IMAGES = "public, max-age=3600"
#: descriptors and static files: kept, but revalidated (a 304 when unchanged) each use
CACHE_REVALIDATE = "no-cache"
CACHE_NONE = "no-store"

#: methods the server answers (OPTIONS: 204 with ``Allow``, and CORS preflights)
ALLOWED_METHODS = "GET, HEAD, OPTIONS"
#: request headers a preflight may announce (besides the CORS-safelisted ones)
ALLOWED_REQUEST_HEADERS = ("if-none-match", "if-modified-since", "range", "cache-control")
#: seconds a browser may keep a preflight's answer
PREFLIGHT_MAX_AGE = 600

_ORIGIN_RE = re.compile(r"^(https?)://([a-z0-9.-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?$")
_TAG_RE = re.compile(r'\s*(W/)?"([^"]*)"\s*(?:,|$)')


def check_cors_origin(value: str) -> str:
    """A ``--cors`` value as it is compared with a request's ``Origin``: ``*`` or
    ``http(s)://HOST[:PORT]`` (no path, no trailing slash), lower-cased.

    Raises InvalidSettingError for anything else (the message shows the form)."""
    if not isinstance(value, str):
        raise InvalidSettingError(f"CORS origin must be a string, got {value!r}")
    text = value.strip().lower()
    if text == "*":
        return text
    m = _ORIGIN_RE.match(text)
    if m is None or (m[3] and not 0 < int(m[3][1:]) <= 65535):
        raise InvalidSettingError(f"CORS origin must be '*' or scheme://host[:port] with "
                                  f"scheme http or https and no path, e.g. "
                                  f"https://viewer.example.org, got {value!r}")
    return text


def allowed_origin(origins: Iterable[str], origin: str | None) -> str | None:
    """The ``Access-Control-Allow-Origin`` value for a request from ``origin`` (its
    ``Origin`` header, None if it has none): ``*`` when ``*`` is allowed, the origin
    itself when it is listed, else None (no header)."""
    allowed = tuple(origins)
    if "*" in allowed:
        return "*"
    if origin is None:
        return None
    return origin if origin.strip().lower() in allowed else None


def cors_headers(origins: Iterable[str], origin: str | None) -> list[tuple[str, str]]:
    """The CORS headers of an ordinary response: none unless ``origins`` is non-empty;
    then ``Vary: Origin`` (when the answer depends on it) and, for an allowed origin,
    ``Access-Control-Allow-Origin`` and ``Access-Control-Expose-Headers: ETag``."""
    allowed = tuple(origins)
    if not allowed:
        return []
    headers = [] if "*" in allowed else [("Vary", "Origin")]
    value = allowed_origin(allowed, origin)
    if value is not None:
        headers += [("Access-Control-Allow-Origin", value),
                    ("Access-Control-Expose-Headers", "ETag")]
    return headers


def preflight_headers(origins: Iterable[str], origin: str | None,
                      request_method: str | None, request_headers: str | None
                      ) -> list[tuple[str, str]]:
    """The CORS headers of an answer to ``OPTIONS`` (a preflight when it carries
    ``Access-Control-Request-Method``): :func:`cors_headers`, plus the allowed methods,
    headers and max age when the origin is allowed, the method is one the server
    answers and every announced header is allowed.  Otherwise no
    ``Access-Control-Allow-*`` (the browser then refuses the request)."""
    headers = cors_headers(origins, origin)
    if request_method is None or not any(k == "Access-Control-Allow-Origin" for k, _ in headers):
        return headers
    asked = [h.strip().lower() for h in (request_headers or "").split(",") if h.strip()]
    if request_method.strip().upper() not in ("GET", "HEAD") or \
            any(h not in ALLOWED_REQUEST_HEADERS for h in asked):
        return [h for h in headers if h[0] == "Vary"]
    headers += [("Access-Control-Allow-Methods", ALLOWED_METHODS),
                ("Access-Control-Max-Age", str(PREFLIGHT_MAX_AGE))]
    if asked:
        headers.append(("Access-Control-Allow-Headers", ", ".join(asked)))
    return headers


def container_identity(container: Any, *settings: object) -> str:
    """The identity (32 hex digits) of what a server makes of ``container`` (a
    :class:`wsicodec.container.Container`) with ``settings`` (anything that changes the
    bytes served: JPEG quality, overlap, de-identification, precision)."""
    from wsicodec import __version__
    from wsicodec.integrity import metadata_digest

    meta = container.metadata
    h = hashlib.blake2b(digest_size=16, person=b"wsicodec-etag")
    h.update(f"{__version__}\0{settings!r}\0".encode())
    h.update(metadata_digest(meta.to_attrs()).encode())
    if not meta.has_digests:     # format 1-2: no digest covers the tiles
        st = container.path.stat()
        h.update(f"\0{container.nbytes()}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def entity_tag(identity: str, key: str, *, weak: bool) -> str:
    """The ``ETag`` of resource ``key`` (its path) of a slide with ``identity``."""
    h = hashlib.blake2b(digest_size=16, person=b"wsicodec-etag")
    h.update(identity.encode() + b"\0" + key.encode("utf-8", "surrogatepass"))
    return f'{"W/" if weak else ""}"{h.hexdigest()}"'


def content_tag(body: bytes) -> str:
    """A strong ``ETag`` of a body itself (static files, lists of slides)."""
    return f'"{hashlib.blake2b(body, digest_size=16).hexdigest()}"'


def validator(path: str, body: bytes, cacheable: bool, slide_routes: Iterable[Any],
              identity_of: Callable[[str], str | None]) -> tuple[str | None, str]:
    """(``ETag`` or None, ``Cache-Control``) of a 200 answer ``body`` to ``path``.

    A path one of ``slide_routes`` (compiled patterns with a ``name`` group) matches, for
    a slide ``identity_of(name)`` knows, is tagged by :func:`entity_tag` (weakly when
    ``cacheable``: decoded images); other answers by their bytes (:func:`content_tag`),
    but ``/health`` (not tagged, not kept).  ``cacheable`` answers may be kept an hour
    (:data:`CACHE_IMAGES`), the others are revalidated (:data:`CACHE_REVALIDATE`)."""
    if path == "/health":
        return None, CACHE_NONE
    control = CACHE_IMAGES if cacheable else CACHE_REVALIDATE
    for route in slide_routes:
        m = route.match(path)
        identity = identity_of(m["name"]) if m else None
        if identity is not None:
            return entity_tag(identity, path, weak=cacheable), control
    return content_tag(body), control


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header matches ``etag`` by weak comparison (``W/``
    ignored on both sides), or is ``*``.  A malformed header matches nothing."""
    if if_none_match is None:
        return False
    text = if_none_match.strip()
    if text == "*":
        return True
    want = etag[2:] if etag.startswith("W/") else etag
    pos = 0
    while pos < len(text):
        m = _TAG_RE.match(text, pos)
        if m is None:
            return False
        if f'"{m[2]}"' == want:
            return True
        pos = m.end()
    return False


__all__ = ["ALLOWED_METHODS", "CACHE_IMAGES", "CACHE_NONE", "CACHE_REVALIDATE",
           "allowed_origin", "check_cors_origin", "container_identity", "content_tag",
           "cors_headers", "entity_tag", "etag_matches", "preflight_headers", "validator"]
