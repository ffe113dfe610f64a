"""Glass (background) tiles: coded as a colour plane in ~24 bytes, no network pass.

A tile is glass when every pixel but at most :data:`UNIFORM_MAX_OUTLIERS` stays within
±:data:`UNIFORM_MAX_DEV` of the mean colour in every channel and the channel std of those
pixels is under :data:`UNIFORM_MAX_STD`.  The outliers (dust, specks) are stored exactly,
so no pixel is ever off by more than UNIFORM_MAX_DEV levels.  A tile with tissue has
thousands of stained pixels (a test checks that no tile with tissue in he/tiles takes
this path).  Layout: :mod:`wsicodec.learned.tileformat`.

Three kinds of glass tile:

* kind 4, "plane of a mixed grid" (written by the ``auto`` codec since 2026-12): kind 3's
  bytes and pixels, and it also meets its bare neighbours: it is drawn toward
  each one's pixels along their shared border (:func:`bare_edge`) by the same
  :func:`blend_toward_glass`, so where a bare tile's glass meets the plane the tile grid does
  not show (most of an ``auto`` slide's background borders).  The bare tile keeps its
  own pixels (and the PSNR recorded for it); the glass tile's PSNR is measured drawn, and
  the ``auto`` encoder writes kind 3 where that would miss its floor
  (:mod:`wsicodec.learned.choice`).  A fix-up neighbour (its classical pixels decided after the
  glass tile may be written) is not met.
* kind 3, "plane" (written since 2026-12: by the ``learned`` codec, by ``auto`` before
  kind 4 and where kind 4 would miss the floor): each channel a plane, its mean in 1/16
  levels and its change across the tile in x and y in 1/8 levels (least squares over the
  non-outlier pixels: vignetting and slow illumination changes follow), evaluated in
  integer arithmetic.  A network tile beside a plane glass tile (kind 3 or 4) is drawn
  toward the plane's edge colour where its own pixels are near that colour
  (:func:`blend_toward_glass`: within :data:`BLEND_WIDTH` pixels of the shared border),
  so the tile grid does not show on the background where the network's rendering of
  glass meets the flat plane (``bench/grid_steps.py``); two plane glass tiles side by
  side are drawn the same way toward the colour midway between their planes along their
  border.  Its bare neighbours are left as they are.  Decoded pixels stay a function
  of the tiles' bytes: the planes' parameters, and the bare neighbours' pixels.
* kind 1, "uniform" (older containers; still written when a plane would need more outliers
  than allowed): one mean colour.  Read exactly as it always was, its neighbours untouched.
"""

from __future__ import annotations

import struct

import numpy as np

from wsicodec.errors import CorruptDataError

from .tileformat import (KIND_PLANE, KIND_PLANE_MIXED, PLANE_KINDS, TileHeader, pack_plane_header,
                         pack_uniform_header)

UNIFORM_MAX_DEV = 10
UNIFORM_MAX_STD = 3.0
UNIFORM_MAX_OUTLIERS = 384
#: kind 3: mean R, G, B in 1/PLANE_MEAN_SCALE levels (u16), then their change across the tile
#: in x, then in y, in 1/PLANE_GRAD_SCALE levels (int8)
PLANE = struct.Struct("<3H3b3b")
PLANE_MEAN_SCALE = 16
PLANE_GRAD_SCALE = 8
#: a network tile's pixels within this many pixels of a plane glass neighbour are drawn to it ...
BLEND_WIDTH = 16
#: ... fully where their largest channel difference to its edge colour is <= BLEND_NEAR
#: levels, not at all from BLEND_FAR on (linearly between), the weight falling linearly
#: from the border to BLEND_WIDTH
BLEND_NEAR, BLEND_FAR = 10, 20
#: rows of a plane evaluated at a time (bounds the int64 scratch of a large tile)
_PLANE_ROWS = 256


#: the most pixels whose channel sums float32 adds exactly (every partial sum of uint8
#: values stays below 2**24): up to this size :func:`uniform_fit` works in integers
_EXACT_MEAN_PIXELS = (1 << 24) // 255
#: how near its threshold a channel's exact std must come before float32's own std,
#: whose rounding error is orders of magnitude smaller, decides (relative)
_STD_MARGIN = 1e-4
_SQUARES = np.arange(256, dtype=np.int64) ** 2
_LEVELS = np.arange(256, dtype=np.float32)


def uniform_fit(tile: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean RGB uint8, outlier coordinates (k, 2)) when ``tile`` is background, else None.

    The test is :func:`_uniform_fit_float`'s, decided the same way for every tile. Up to
    _EXACT_MEAN_PIXELS pixels it runs on exact integer sums instead of a float copy of the
    tile: float32 adds those sums exactly, so the means are the same numbers; a pixel's
    distance to a mean depends only on its value, so a 256-entry table per channel, made by
    the same float32 subtraction, tests every pixel; and the std threshold is decided on
    the exact std unless that lies within _STD_MARGIN of it, where the float32 std decides."""
    h, w = tile.shape[:2]
    n = h * w
    if tile.dtype != np.uint8 or tile.shape[2:] != (3,) or not 0 < n <= _EXACT_MEAN_PIXELS:
        return _uniform_fit_float(tile)
    rows = tile.reshape(h, -1)
    # down the columns first: numpy sums a (pixels, 3) array's short rows slowly
    sums = rows.sum(0, dtype=np.uint32).reshape(-1, 3).sum(0, dtype=np.int64)
    far = _far(tile, _mean32(sums, n))
    n_far = int(np.count_nonzero(far))
    if n_far > UNIFORM_MAX_OUTLIERS:
        return None
    squares = _SQUARES.take(rows).sum(0).reshape(-1, 3).sum(0)
    if n_far:
        if n_far == n:
            return None
        far = _far(tile, _mean32(sums - _far_sums(tile, far)[0], n - n_far))
        n_far = int(np.count_nonzero(far))
        if n_far > UNIFORM_MAX_OUTLIERS:
            return None
        if n_far == n:
            return _uniform_fit_float(tile)     # nothing near: float's NaN verdict, as it was
    far_sum, far_squares = _far_sums(tile, far)
    k = n - n_far
    s, q = sums - far_sum, squares - far_squares
    top = float(np.sqrt((q * k - s * s).astype(np.float64)).max()) / k
    if abs(top - UNIFORM_MAX_STD) <= _STD_MARGIN * UNIFORM_MAX_STD:
        if tile[~far].astype(np.float32).std(0).max() > UNIFORM_MAX_STD:
            return None
    elif top > UNIFORM_MAX_STD:
        return None
    rgb = np.clip(np.rint(_mean32(s, k)), 0, 255).astype(np.uint8)
    return rgb, np.argwhere(far)


def _mean32(sums: np.ndarray, n: int) -> np.ndarray:
    """The float32 mean numpy's ``mean`` gives for exact float32 ``sums`` of ``n`` values
    (it divides once, correctly rounded)."""
    return (sums / n).astype(np.float32)


def _far(tile: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(h, w) bool: pixels with a channel over UNIFORM_MAX_DEV from the float32 ``mean``,
    as ``abs(tile.astype(float32) - mean) > UNIFORM_MAX_DEV`` finds them."""
    table = np.abs(_LEVELS[None, :] - mean[:, None]) > UNIFORM_MAX_DEV
    far = table[0].take(tile[..., 0])
    far |= table[1].take(tile[..., 1])
    far |= table[2].take(tile[..., 2])
    return far


def _far_sums(tile: np.ndarray, far: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel sums and sums of squares of the ``far`` pixels (int64)."""
    px = tile[far].astype(np.int64)
    return px.sum(0), (px * px).sum(0)


def _uniform_fit_float(tile: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`uniform_fit` on a float32 copy of the tile: its definition, and its way for
    tiles too large for exact float32 sums."""
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
    return put_outliers(out, data, hd.payload + 5, n, f"{name}: uniform tile")


def put_outliers(out: np.ndarray, data: bytes, pos: int, n: int, what: str) -> np.ndarray:
    """The ``n`` exact outlier pixels stored from ``pos`` of a glass tile's ``data`` (u16
    row, u16 col, 3 bytes RGB each) written into ``out``.  Raises CorruptDataError, naming
    ``what``, for one outside the tile."""
    h, w = out.shape[:2]
    for _ in range(n):
        r, c = struct.unpack_from("<HH", data, pos)
        if r >= h or c >= w:
            raise CorruptDataError(f"{what} outlier outside the tile")
        out[r, c] = np.frombuffer(data, np.uint8, 3, pos + 4)
        pos += 7
    return out


def uniform_colour(data: bytes, hd: TileHeader) -> bytes:
    """A glass tile's RGB colour (3 bytes): a plane's mean, rounded."""
    if hd.kind in PLANE_KINDS:
        m = np.asarray(PLANE.unpack_from(data, hd.payload)[:3], np.int64)
        return np.clip((m + PLANE_MEAN_SCALE // 2) // PLANE_MEAN_SCALE, 0, 255).astype(np.uint8).tobytes()
    return bytes(data[hd.payload:hd.payload + 3])


# ------------------------------------------------------------------ kind 3: a plane
def plane_fit(tile: np.ndarray, outliers: np.ndarray) -> np.ndarray:
    """The quantised plane of ``tile`` (h, w, 3) uint8 without the pixels ``outliers`` (k, 2):
    (3, 3) int64, rows mean, change across x, change across y, per channel, in the units
    of :data:`PLANE`.  Least squares in coordinates centred on the tile."""
    h, w = tile.shape[:2]
    keep = np.ones((h, w), bool)
    if len(outliers):
        keep[tuple(np.asarray(outliers).T)] = False
    yy, xx = np.nonzero(keep)
    u = (2.0 * xx - (w - 1)) / (2 * w)
    v = (2.0 * yy - (h - 1)) / (2 * h)
    a = np.stack([np.ones_like(u), u, v], 1)
    t = tile[keep].astype(np.float64)
    ata = a.T @ a
    if abs(np.linalg.det(ata)) < 1e-9:          # one row or column: its mean, no gradient
        coef = np.zeros((3, 3))
        coef[0] = t.mean(0)
    else:
        coef = np.linalg.solve(ata, a.T @ t)
    q = np.empty((3, 3), np.int64)
    q[0] = np.clip(np.rint(coef[0] * PLANE_MEAN_SCALE), 0, 255 * PLANE_MEAN_SCALE)
    q[1:] = np.clip(np.rint(coef[1:] * PLANE_GRAD_SCALE), -127, 127)
    return q


def plane_values(q: np.ndarray, h: int, w: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """The plane ``q`` (:func:`plane_fit`) of an h x w tile at rows ``ys`` and columns ``xs``
    (broadcast against each other), uint8 (..., 3): integer arithmetic only, so every
    machine decodes the same pixels."""
    # |numerator| < 8700·w·h: int32 holds it for tiles up to ~490², int64 beyond (same values)
    dt = np.int32 if 8700 * w * h < 2 ** 31 else np.int64
    m, gx, gy = (np.asarray(r, dt) for r in q)
    ys = np.asarray(ys, dt)[..., None]
    xs = np.asarray(xs, dt)[..., None]
    den = 2 * PLANE_MEAN_SCALE * w * h
    k = PLANE_MEAN_SCALE // PLANE_GRAD_SCALE
    # m / M + (gx / G) (2x - (w - 1)) / 2w + (gy / G) (2y - (h - 1)) / 2h, over den
    num = 2 * w * h * m + gx * (2 * xs - (w - 1)) * h * k + gy * (2 * ys - (h - 1)) * w * k
    return np.clip((num + den // 2) // den, 0, 255).astype(np.uint8)


def plane_pixels(q: np.ndarray, h: int, w: int) -> np.ndarray:
    """The plane ``q`` over a whole h x w tile, (h, w, 3) uint8."""
    out = np.empty((h, w, 3), np.uint8)
    xs = np.arange(w)[None, :]
    for r0 in range(0, h, _PLANE_ROWS):
        r1 = min(h, r0 + _PLANE_ROWS)
        out[r0:r1] = plane_values(q, h, w, np.arange(r0, r1)[:, None], xs)
    return out


def encode_glass(tile: np.ndarray, rgb: np.ndarray, outliers: np.ndarray, version: int,
                 kind: int = KIND_PLANE) -> bytes:
    """The bytes of a glass tile (``rgb``, ``outliers``: :func:`uniform_fit`): a plane of
    ``kind`` (3, or 4 in a mixed grid) with the pixels off it by more than UNIFORM_MAX_DEV
    kept exactly, or the flat colour (kind 1) should the plane leave more than
    UNIFORM_MAX_OUTLIERS of them."""
    h, w = tile.shape[:2]
    q = plane_fit(tile, outliers)
    far = (np.abs(tile.astype(np.int16) - plane_pixels(q, h, w)) > UNIFORM_MAX_DEV).any(2)
    if int(far.sum()) > UNIFORM_MAX_OUTLIERS:
        return encode_uniform(tile, rgb, outliers, version)
    parts = [pack_plane_header(version, h, w, kind), PLANE.pack(*q.ravel().tolist()),
             struct.pack("<H", int(far.sum()))]
    for r, c in np.argwhere(far):
        parts.append(struct.pack("<HH", r, c) + tile[r, c].tobytes())
    return b"".join(parts)


def plane_params(data: bytes, hd: TileHeader, name: str = "tile") -> np.ndarray:
    """A plane glass tile's (3, 3) int64 plane (:func:`plane_fit`).  Raises CorruptDataError."""
    v = PLANE.unpack_from(data, hd.payload)
    if max(v[:3]) > 255 * PLANE_MEAN_SCALE:
        raise CorruptDataError(f"{name}: plane glass tile with a mean colour out of range")
    return np.asarray(v, np.int64).reshape(3, 3)


def decode_plane(data: bytes, hd: TileHeader, name: str = "tile", around: dict | None = None,
                 jpegxl: dict | None = None) -> np.ndarray:
    """A plane glass tile's pixels (``hd``: its parsed header).  ``around``: the edges of
    its plane glass neighbours (side → (n, 3) uint8, :func:`plane_edge`), toward whose
    meeting colour (the mean of the two planes along the border, rounded up) the plane is
    drawn as :func:`blend_toward_glass` draws a network tile, so two planes meet without
    a step.  ``jpegxl``: the pixels of its bare neighbours (side → (h, w, 3)
    uint8), toward whose edge (:func:`bare_edge`) a kind-4 tile is drawn the same way
    (a kind-3 tile ignores them).  The outliers are put in last, exactly.  Raises
    CorruptDataError naming ``name``."""
    q = plane_params(data, hd, name)
    pos = hd.payload + PLANE.size
    (n,) = struct.unpack_from("<H", data, pos)
    if len(data) != pos + 2 + 7 * n:
        raise CorruptDataError(f"{name}: plane glass tile has the wrong length")
    out = plane_pixels(q, hd.height, hd.width)
    meet = bare_edges(jpegxl, hd.height, hd.width) if hd.kind == KIND_PLANE_MIXED else {}
    for side, e in (around or {}).items():
        own = plane_edge(data, hd, side, name).astype(np.int64)
        meet[side] = (own + np.asarray(e, np.int64) + 1) // 2
    if meet:
        out = blend_toward_glass(out, meet)
    return put_outliers(out, data, pos + 2, n, f"{name}: plane glass tile")


def decode_glass(data: bytes, hd: TileHeader, name: str = "tile", around: dict | None = None,
                 jpegxl: dict | None = None) -> np.ndarray:
    """A glass tile's pixels, any kind (``around``: a plane's neighbour planes' edges,
    ``jpegxl``: its bare neighbours' pixels, :func:`decode_plane`; a kind-1 tile
    ignores both).  Readers and the ``auto`` encoder's measurement both call this.
    Raises CorruptDataError naming ``name``."""
    if hd.kind in PLANE_KINDS:
        return decode_plane(data, hd, name, around, jpegxl)
    return decode_uniform(data, hd, name)


#: a side of a tile, as (dr, dc) toward its neighbour there
SIDES = ((-1, 0), (1, 0), (0, -1), (0, 1))


def plane_edge(data: bytes, hd: TileHeader, side: tuple[int, int], name: str = "tile") -> np.ndarray:
    """The plane (outliers left out) of a plane glass tile along its edge on ``side``
    ((-1, 0): its top row, (0, 1): its right column, ...), (n, 3) uint8."""
    q = plane_params(data, hd, name)
    h, w = hd.height, hd.width
    dr, dc = side
    if dr:
        return plane_values(q, h, w, np.array([0 if dr < 0 else h - 1]), np.arange(w))
    return plane_values(q, h, w, np.arange(h), np.array([0 if dc < 0 else w - 1]))


def bare_edge(pixels: np.ndarray, side: tuple[int, int], h: int, w: int) -> np.ndarray | None:
    """The pixels of a bare neighbour on ``side`` of an h x w glass tile along their
    shared border ((-1, 0): the neighbour's bottom row, (0, 1): its left column, ...),
    (w or h, 3) uint8, or None where the neighbour's side does not match the tile's."""
    dr, dc = side
    px = np.asarray(pixels)
    if dr:
        return None if px.shape[1] != w else px[-1 if dr < 0 else 0, :, :3]
    return None if px.shape[0] != h else px[:, -1 if dc < 0 else 0, :3]


def bare_edges(sides: dict | None, h: int, w: int) -> dict:
    """:func:`bare_edge` of each bare neighbour in ``sides`` (side → its pixels)
    of an h x w tile, keyed by side, the sides that do not match left out: what a kind-4
    plane or a kind-5 network tile is drawn toward (:func:`blend_toward_glass`)."""
    edges = {}
    for side, px in (sides or {}).items():
        e = bare_edge(px, side, h, w)
        if e is not None:
            edges[side] = e
    return edges


def blend_toward_glass(pixels: np.ndarray, edges: dict) -> np.ndarray:
    """A network tile's decoded ``pixels`` (h, w, 3) uint8 drawn toward its plane glass
    neighbours (a plane's toward its meeting colours, :func:`decode_plane`): ``edges``
    maps a side (:data:`SIDES`) to the colours along it ((w or h, 3) uint8,
    :func:`plane_edge`).  A pixel at distance d < BLEND_WIDTH from that border moves toward
    the colour across it by (2·BLEND_WIDTH − 2d − 1)/(2·BLEND_WIDTH) times a closeness
    weight (1 within BLEND_NEAR levels in every channel, 0 from BLEND_FAR), so tissue at
    the border stays as decoded.  Sides in the order of SIDES; integer
    arithmetic (rounded half up): the same pixels on every machine."""
    if not edges:
        return pixels
    out = pixels.astype(np.int32)          # |2·diff·a·s| < 2·255·32·10: int32 is plenty
    h, w = out.shape[:2]
    span = BLEND_FAR - BLEND_NEAR
    den = 2 * BLEND_WIDTH * span
    for side in SIDES:
        g = edges.get(side)
        if g is None:
            continue
        dr, dc = side
        n = min(BLEND_WIDTH, h if dr else w)
        d = np.arange(n, dtype=np.int32)
        a = 2 * BLEND_WIDTH - 2 * d - 1                  # the weight, in 1/(2·BLEND_WIDTH)
        if dr:
            rows = d if dr < 0 else h - 1 - d
            band, target, a = out[rows], np.asarray(g, np.int32)[None], a[:, None, None]
        else:
            cols = d if dc < 0 else w - 1 - d
            band, target, a = out[:, cols], np.asarray(g, np.int32)[:, None], a[None, :, None]
        diff = target - band
        s = np.clip(BLEND_FAR - np.abs(diff).max(-1, keepdims=True), 0, span)
        band = band + (2 * diff * a * s + den) // (2 * den)
        if dr:
            out[rows] = band
        else:
            out[:, cols] = band
    return np.clip(out, 0, 255).astype(np.uint8)


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
