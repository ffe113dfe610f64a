"""Digests that let a reader prove a container's tiles and metadata are the ones written.

A format-3 container is named by a random 128-bit ``container_id``.  Each tile's digest
binds its bytes to that id and to its level, column and row, so a tile moved to another
place, or spliced in from another container, fails even when its CRC32 was moved or
recomputed with it.  Each level's digest covers the array of its tile digests, each
associated image has a digest of its bytes, and ``metadata_digest`` covers every other
attribute (those level and image digests included)::

    metadata_digest ── attrs ── levels[i].tiles_digest ─┬ digest[row, col] ── tile bytes
                             │                          └ kind, psnr, nbytes (format 4)
                             └─ associated_digests[name] ── image bytes

Format 4 adds a level's fidelity records (:mod:`wsicodec.fidelity`) to its digest.

These are BLAKE2b digests without a key: they catch damage, mistakes and careless
tampering (a tile swapped, a zarr.json edited), not an adversary who recomputes them;
that needs a signature over ``metadata_digest``, which wsicodec does not make.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np

#: bytes of a tile, level or associated-image digest
DIGEST_BYTES = 16
_TILE = struct.Struct("<III")


def new_container_id() -> str:
    """A fresh random container id (32 hex digits)."""
    import uuid

    return uuid.uuid4().hex


def tile_digest(container_id: str, level: int, col: int, row: int, data: bytes) -> bytes:
    """The digest of one tile's stored bytes at (level, col, row) of ``container_id``."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"wsicodec-tile")
    h.update(bytes.fromhex(container_id))
    h.update(_TILE.pack(level, col, row))
    h.update(data)
    return h.digest()


def level_digest(container_id: str, level: int, digests: np.ndarray,
                 records: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> str:
    """The digest (hex) over a level's (rows, cols, DIGEST_BYTES) uint8 tile digests and,
    in format 4, its fidelity records ``records`` = (kind uint8, psnr float32, nbytes
    uint32), each (rows, cols), hashed as their little-endian bytes after the digests.
    Without ``records`` the digest is format 3's, unchanged."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"wsicodec-level")
    h.update(bytes.fromhex(container_id))
    h.update(struct.pack("<III", level, *digests.shape[:2]))
    h.update(np.ascontiguousarray(digests, dtype=np.uint8).tobytes())
    if records is not None:
        h.update(b"fidelity-records")
        for arr, dtype in zip(records, ("u1", "<f4", "<u4")):
            if arr.shape != digests.shape[:2]:
                raise ValueError(f"a fidelity record array of shape {arr.shape} for a "
                                 f"{digests.shape[0]}x{digests.shape[1]} level")
            h.update(np.ascontiguousarray(arr, dtype=dtype).tobytes())
    return h.hexdigest()


def blob_digest(container_id: str, name: str, data: bytes) -> str:
    """The digest (hex) of an associated image's stored bytes."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"wsicodec-blob")
    h.update(bytes.fromhex(container_id))
    h.update(name.encode("utf-8") + b"\0")
    h.update(data)
    return h.hexdigest()


def metadata_digest(attrs: dict[str, Any]) -> str:
    """The digest (64 hex digits) of every attribute but ``metadata_digest`` itself, as
    canonical JSON (sorted keys, no spaces, ASCII)."""
    body = {k: v for k, v in attrs.items() if k != "metadata_digest"}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False)
    except (TypeError, ValueError):
        return ""          # not canonical JSON: matches no stored digest
    return hashlib.blake2b(text.encode("ascii"), digest_size=32,
                           person=b"wsicodec-meta").hexdigest()


__all__ = ["DIGEST_BYTES", "new_container_id", "tile_digest", "level_digest", "blob_digest",
           "metadata_digest"]
