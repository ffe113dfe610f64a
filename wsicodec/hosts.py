"""Host names as HTTP carries them: parsing a ``Host`` header (or an allowed host),
and telling loopback names and addresses from others.

:class:`~wsicodec.httpd.BoundedHTTPServer` answers a request by its ``Host`` with
these (DNS rebinding: see :mod:`wsicodec.httpd`); :class:`~wsicodec.server.ServerSettings`
normalises ``allow_hosts`` with :func:`split_host`.
"""

from __future__ import annotations

import ipaddress
import re

_HOST_NAME_RE = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?$")
_PORT_RE = re.compile(r"^[0-9]{1,5}$")


def split_host(value: str) -> tuple[str, str | None] | None:
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


def is_loopback_name(name: str) -> bool:
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


__all__ = ["is_loopback", "is_loopback_name", "split_host"]
