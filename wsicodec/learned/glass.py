"""Glass (background) tiles: coded as their mean colour in ~15 bytes, no network pass.

A tile is glass when every pixel but at most :data:`UNIFORM_MAX_OUTLIERS` stays within
±:data:`UNIFORM_MAX_DEV` of the mean colour in every channel and the channel std of those
pixels is under :data:`UNIFORM_MAX_STD`.  The outliers (dust, specks) are stored exactly,
so no pixel is ever off by more than UNIFORM_MAX_DEV levels.  A tile with tissue has
thousands of stained pixels (a test checks that no tile with tissue in he/tiles takes
this path).  Layout: :mod:`wsicodec.learned.tileformat` (kind 1).
"""

from __future__ import annotations

import struct

import numpy as np

from wsicodec.errors import CorruptDataError

from .tileformat import TileHeader, pack_uniform_header

UNIFORM_MAX_DEV = 10
UNIFORM_MAX_STD = 3.0
UNIFORM_MAX_OUTLIERS = 384


def uniform_fit(tile: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean RGB uint8, outlier coordinates (k, 2)) when ``tile`` is background, else None."""
    t = tile.astype(np.float32)
    mean = t.reshape(-1, 3).mean(0)
    far = (np.abs(t - mean) > UNIFORM_MAX_DEV).any(2)
    n_far = int(far.sum())
    if n_far > UNIFORM_MAX_OUTLIERS:
        return None
    if n_far:
        t = t[~far]
        if t.size == 0:
            return None
        mean = t.mean(0)
        far = (np.abs(tile.astype(np.float32) - mean) > UNIFORM_MAX_DEV).any(2)
        if int(far.sum()) > UNIFORM_MAX_OUTLIERS:
            return None
        t = tile[~far].astype(np.float32)
    if t.reshape(-1, 3).std(0).max() > UNIFORM_MAX_STD:
        return None
    rgb = np.clip(np.rint(t.reshape(-1, 3).mean(0)), 0, 255).astype(np.uint8)
    return rgb, np.argwhere(far)


def is_uniform(tile: np.ndarray) -> bool:
    """Conservative glass/background test (see :func:`uniform_fit`)."""
    return uniform_fit(tile) is not None


def encode_uniform(tile: np.ndarray, rgb: np.ndarray, outliers: np.ndarray, version: int) -> bytes:
    """The bytes of a glass tile: ``rgb`` and the exact ``outliers`` from :func:`uniform_fit`."""
    h, w = tile.shape[:2]
    parts = [pack_uniform_header(version, h, w), rgb.tobytes(), struct.pack("<H", len(outliers))]
    for r, c in outliers:
        parts.append(struct.pack("<HH", r, c) + tile[r, c].tobytes())
    return b"".join(parts)


def decode_uniform(data: bytes, hd: TileHeader, name: str = "tile") -> np.ndarray:
    """A glass tile's pixels (``hd``: its parsed header).  Raises CorruptDataError naming
    ``name``."""
    out = np.empty((hd.height, hd.width, 3), np.uint8)
    out[:] = np.frombuffer(data, np.uint8, 3, hd.payload)
    (n,) = struct.unpack_from("<H", data, hd.payload + 3)
    if len(data) != hd.payload + 5 + 7 * n:
        raise CorruptDataError(f"{name}: uniform tile has the wrong length")
    pos = hd.payload + 5
    for _ in range(n):
        r, c = struct.unpack_from("<HH", data, pos)
        if r >= hd.height or c >= hd.width:
            raise CorruptDataError(f"{name}: uniform tile outlier outside the tile")
        out[r, c] = np.frombuffer(data, np.uint8, 3, pos + 4)
        pos += 7
    return out


def uniform_colour(data: bytes, hd: TileHeader) -> bytes:
    """A glass tile's RGB colour (3 bytes)."""
    return bytes(data[hd.payload:hd.payload + 3])


def uniform_latent(model, rgb: bytes):
    """g_a's (ungained) latent inside a large patch of one colour, (1, M, 1, 1) float32:
    what a glass tile, which stores only its colour, contributes to a neighbour's
    stitching.  Computed once per colour and model (on the CPU; ~10 ms)."""
    import torch
    cache = model.__dict__.setdefault("_uniform_latents", {})
    key = bytes(rgb)
    if key not in cache:
        x = torch.tensor(list(key), dtype=torch.float32).div_(255).reshape(1, 3, 1, 1)
        with torch.inference_mode():
            y = model.transform(x.expand(1, 3, 128, 128).contiguous())      # (1, M, 8, 8)
        if len(cache) > 4096:
            cache.clear()
        cache[key] = y[..., 3:5, 3:5].mean((-2, -1), keepdim=True).clone()
    return cache[key]
