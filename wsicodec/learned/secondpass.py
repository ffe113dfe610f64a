"""A network tile's second pass beside bare tiles, as readers and the ``auto`` encoder run it.

A stitched tile beside a bare tile (JPEG-XL, JPEG 2000) is decoded twice: the second
time, each bare side's latents are g_a over the bare tile's pixels joined to the tile's
own first-pass pixels (:func:`second_window`).
Only those side latents change, and no pixel further than :data:`STRIP` px from a side
depends on them (:func:`~wsicodec.learned.fast.crop_plan`: 47 px from a left or top side,
62 px from a right or bottom one).  A decoder with ``side_strips`` (``auto`` containers
since 2026-12-07, recorded in their settings) therefore runs the second g_s over a strip
of :data:`STRIP` px along each bare side and keeps the first pass elsewhere; one without
it (older containers) runs it over the whole tile.  The two differ by a level here and
there inside the strips (g_s over a strip sums some products in another order), so the
encoder measures with the setting its readers will use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .synthesis import STITCH_RING, stitch_window
from .tileformat import PIXEL_STRIDE

if TYPE_CHECKING:
    from .decoder import TileDecoder

#: pixels of a stitched tile's first pass that g_a sees beside a bare neighbour in its
#: second pass (:func:`side_latents`)
SIDE_CONTEXT = 64
#: pixels of a bare tile, from an edge, that g_a reads for the latents a stitched neighbour
#: takes there (its second-pass latents, :func:`side_latents`; and the tile's
#: own, :meth:`~wsicodec.learned.decoder.TileDecoder.pixel_latents`, where its stitched neighbours all lie on one side
#: of it): the stitched window takes :data:`~wsicodec.learned.synthesis.STITCH_RING` latent
#: rows of it (32 px), and no g_a output there depends on pixels more than 64 px beyond
#: them (a crop to 96 px gives the very same latents, bit for bit, on the CPU; 80 px does
#: not: ``tests/test_learned_internals.py``), so the rest of the tile is not coded
SIDE_REACH = 128

#: px along a bare side over which a ``side_strips`` decoder runs the second pass: at
#: least the 62 px any pixel that depends on a side's latents lies from it, on the
#: latent grid
STRIP = 64
#: the order strips are laid over the first pass (where two meet at a corner, the later one
#: is kept): top, bottom, left, right
SIDE_ORDER = ((-1, 0), (1, 0), (0, -1), (0, 1))


def strip_boxes(sides: Sequence[tuple[int, int]], top: int, left: int, h: int, w: int
                ) -> list[tuple[int, int, int, int]]:
    """The (top, left, h, w) boxes, in a window whose tile lies at (``top``, ``left``) and
    is h × w, of the strips along ``sides`` (each (dr, dc)), in :data:`SIDE_ORDER`."""
    boxes = []
    for dr, dc in SIDE_ORDER:
        if (dr, dc) not in sides:
            continue
        sh, sw = min(STRIP, h), min(STRIP, w)
        boxes.append({(-1, 0): (top, left, sh, w), (1, 0): (top + h - sh, left, sh, w),
                      (0, -1): (top, left, h, sw), (0, 1): (top, left + w - sw, h, sw)}[(dr, dc)])
    return boxes


def second_pass(decoder: TileDecoder, items: Sequence[tuple[Any, dict, np.ndarray, dict]]) -> list[Any]:
    """Each item's (centre latents, the 8 neighbours' latents ``around``, its first-pass
    pixels, its bare sides ((dr, dc) → their pixels)) → the pixels its second pass shows
    (before any blending toward its neighbours), or the exception of the g_s pass: over the
    whole tile, or with ``decoder.side_strips`` over :func:`strip_boxes` laid on a copy of
    the first pass.  Strip passes are batched only with windows of the same box
    (:meth:`~wsicodec.learned.synthesis.Synthesis.run`'s ``own_boxes``), so what a tile
    shows does not depend on what else is decoded with it."""
    windows, boxes, owner = [], [], []
    for k, (centre, around, first, sides) in enumerate(items):
        win, top, left = second_window(decoder, centre, around, first, sides)
        h, w = first.shape[:2]
        for box in strip_boxes(list(sides), top, left, h, w) if decoder.side_strips else [(top, left, h, w)]:
            windows.append(win)
            boxes.append(box)
            owner.append((k, box[0] - top, box[1] - left))
    try:
        pixels = decoder.synthesize(windows, boxes, own_boxes=decoder.side_strips)
    except Exception as e:  # noqa: BLE001 - every tile of the pass fails with it
        pixels = [e] * len(windows)
    out: list[Any] = [first.copy() if decoder.side_strips else None for _, _, first, _ in items]
    for (k, r, c), px in zip(owner, pixels):
        if isinstance(out[k], BaseException):
            continue
        if isinstance(px, BaseException):
            out[k] = px
        elif decoder.side_strips:
            out[k][r:r + px.shape[0], c:c + px.shape[1]] = px
        else:
            out[k] = px
    return out


def side_latents(decoder: TileDecoder, first: np.ndarray, side: tuple[int, int], jxl: np.ndarray) -> Any:
    """What a bare neighbour on ``side`` ((dr, dc), one of the four sides) gives a
    stitched tile's second pass: g_a over the neighbour's pixels ``jxl`` joined to the
    :data:`SIDE_CONTEXT` px of the tile's first-pass pixels ``first`` nearest it, the
    neighbour's part only (its :data:`SIDE_REACH` px nearest the seam, where they lie on
    the latent grid), or None when their sides do not match.  g_a of the neighbour alone
    (:meth:`~wsicodec.learned.decoder.TileDecoder.pixel_latents`) has no context at the
    very edge the tile joins, which shows as a seam (``bench/seams.py``, mixed rows); this
    gives it the tile's own first guess of it."""
    dr, dc = side
    axis = 1 if dc else 0
    if first.shape[1 - axis] != jxl.shape[1 - axis]:
        return None
    s = min(SIDE_CONTEXT, first.shape[axis] // PIXEL_STRIDE * PIXEL_STRIDE)
    if s == 0:
        return None
    depth = jxl.shape[axis]
    if dr + dc > 0:                                     # below / right: tile first
        part = first[-s:] if axis == 0 else first[:, -s:]
        near = jxl[:SIDE_REACH] if axis == 0 else jxl[:, :SIDE_REACH]
        y = decoder.pixel_latents(np.concatenate([part, near], axis))
        return y[..., s // PIXEL_STRIDE:, :] if axis == 0 else y[..., s // PIXEL_STRIDE:]
    if depth > SIDE_REACH and (depth - SIDE_REACH) % PIXEL_STRIDE == 0:   # on the latent grid
        jxl = jxl[-SIDE_REACH:] if axis == 0 else jxl[:, -SIDE_REACH:]
    n = -(-jxl.shape[axis] // PIXEL_STRIDE)
    part = first[:s] if axis == 0 else first[:, :s]
    y = decoder.pixel_latents(np.concatenate([jxl, part], axis))
    return y[..., :n, :] if axis == 0 else y[..., :n]


def second_window(decoder: TileDecoder, centre: Any, around: dict, first: np.ndarray, jxl_sides: dict):
    """A stitched tile's window for its second pass: ``around`` with each bare side
    in ``jxl_sides`` ((dr, dc) → its pixels) given :func:`side_latents` from the first
    pass's pixels ``first``.  Returns (window, top, left) as
    :func:`~wsicodec.learned.synthesis.stitch_window`."""
    around = dict(around)
    for side, px in jxl_sides.items():
        lat = side_latents(decoder, first, side, px)
        if lat is not None:
            around[side] = lat
    return stitch_window(centre, around, STITCH_RING)
