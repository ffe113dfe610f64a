"""What the ``auto`` codec holds of each tile between its two stages: :class:`TileState`.

Stage 1 (:meth:`~wsicodec.learned.choice.TileChooser.choose_row`) fills it, stage 2
(:meth:`~wsicodec.learned.choice.TileChooser.settle_row`) reads it with the rows around;
a wide slide's rows hold hundreds of tiles for a few rows, so what each stage is done
with is dropped as soon as it is (:func:`drop_stage_1_state`, :func:`retire_row`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .j2kfit import ALL_SIDES, Sides
from .jxlfit import TileFit
from .synthesis import STITCH_RING


@dataclass
class TileState:
    """One tile's state between stage 1 and stage 2 (:mod:`~wsicodec.learned.choice`)."""

    col: int
    source: np.ndarray | None           #: the tile's pixels as coded (edge tiles padded; a view of ``around``
                                        #: while that is held; None once a bare tile's or retired)
    valid: tuple[int, int]              #: its part inside the level
    kind: str = ""
    data: bytes = b""
    psnr: float = math.nan
    network: bytes | None = None        #: its network coding (a learned or fix-up tile's)
    estimate: float = -math.inf         #: stage 1's PSNR estimate of ``network``
    fit: TileFit | None = None          #: a classical coding reaching the floor, if made
    context: Any = None                 #: the latents it gives its neighbours (lazy for bare tiles)
    inner: bytes | None = None          #: the learned tile its neighbours see (None: a bare tile)
    latents: Any = None                 #: gained (y, z) of ``network``, kept for the seam search
    around: np.ndarray | None = None    #: the tile with the JPEG 2000 margin (None: no margin)
    carried: TileFit | None = None      #: the scanner's own tile (or its JPEG recovered), if it reaches the floor
    sides: Sides = ALL_SIDES            #: which of its edges meet another tile
    shape: tuple[int, ...] = ()         #: ``source``'s shape (kept when it is dropped)

    def __post_init__(self) -> None:
        if not self.shape:
            self.shape = self.source.shape


def _without_pixels(fit: TileFit | None, t: TileState) -> TileFit | None:
    """``fit`` without its decoded pixels unless ``t`` shows them (is that coding)."""
    if fit is None or fit.pixels is None or t.data == fit.data:
        return fit
    return replace(fit, pixels=None)


def _drop_margin(t: TileState) -> None:
    """``t`` without its JPEG 2000 margin, its source (a view of it) copied out."""
    if t.around is not None and t.source is not None:
        t.source = t.source.copy()
    t.around = None


def drop_stage_1_state(t: TileState) -> None:
    """What stage 1 alone needed of ``t``, dropped (a wide slide's rows hold hundreds of
    tiles until stage 2): a bare tile's source (stage 2 measures network and glass tiles
    alone), the JPEG 2000 margin and the source's coding once a classical coding stands
    by, and the decoded pixels of the codings it keeps unless the tile shows them (a bare
    tile).  Stage 2's fix-up takes the standing-by coding's bytes and PSNR alone."""
    if t.inner is None:
        t.source = t.around = None      # a bare tile: its neighbours read its coding's pixels
    elif t.fit is not None or t.carried is not None:
        _drop_margin(t)
    if t.fit is not None:
        t.carried = None                # stage 2 falls back on it only where no fit stands by
    t.fit = _without_pixels(t.fit, t)
    t.carried = _without_pixels(t.carried, t)


def retire_row(tiles: list[TileState]) -> None:
    """A settled row's tiles cut to what the next row's stage 2 reads of them as its
    row above (:meth:`TileChooser.settle_row`): what a tile shows its neighbours (its
    ``inner`` coding, or a bare tile's pixels) and the bottom :data:`STITCH_RING` rows of
    its latents, which are all that stitching takes of a tile above
    (:func:`~wsicodec.learned.synthesis.stitch_window`).  Its source pixels, margin and
    standing-by codings go: a wide slide holds rows of hundreds of tiles."""
    for t in tiles:
        t.source = t.around = t.latents = t.carried = None
        if t.inner is not None:
            t.fit = None
        if t.context is not None:
            t.context = t.context[..., -STITCH_RING:, :].clone()
