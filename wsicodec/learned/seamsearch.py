"""The ``auto`` codec's opt-in seam search: a network tile's latents searched for its bare sides.

Readers decode a network tile beside a bare tile twice: the second pass gives that
side g_a's latents of the bare tile's pixels joined to the tile's own first pass
(:func:`~wsicodec.learned.secondpass.side_latents`).  g_a's latents of the tile,
chosen for neighbours that g_s would see as g_a saw them, are not the best for that side
context: the tile's pixels near those sides cost more than beside a network neighbour
(``bench/seam_context.py``, docs/results.md "Why the JPEG-XL side costs").

:func:`search_tile` is the encoder-only fix: the tile's gained latents (y, z) from stage 1
searched by :func:`~wsicodec.learned.refine.refine_latents` against the window readers'
second pass gives it, the squared error within :data:`SEAM_BAND` px of its bare sides
counted ``1 +`` :data:`SEAM_WEIGHT` times, with z and every latent a tile other than a bare
JPEG-XL one sees of it held (:func:`held_mask`), so no neighbour already measured changes;
then coded and decoded as readers decode it (the decoder's own functions, both passes).
The format is unchanged: any reader decodes the result.

Determinism: as the learned codec's ``refine`` (its Gumbel noise comes from a generator
seeded per call), the result is a function of the tile's latents, its source pixels and its
decided neighbours, with no dependence on the order tiles are searched in, for one torch
build, device and thread count (as g_a's own latents; ``compress`` on a cluster runs torch
single-threaded on every worker).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from .refine import refine_latents
from .secondpass import second_pass, second_window
from .synthesis import STITCH_RING, stitch_window
from .tileformat import PIXEL_STRIDE, VERSION

#: px of a tile along its bare sides whose squared error the search weighs more
SEAM_BAND = 8
#: how much more: those pixels count 1 + SEAM_WEIGHT times (the weight
#: ``bench/seam_context.py`` measured against none on cmu, ``bench/results/seam_context.json``)
SEAM_WEIGHT = 4.0
#: most steps ``seam_search`` accepts (each about four g_s passes over the tile's window)
MAX_SEAM_SEARCH = 1000


def _edge(d: int, start: int, length: int, band: int) -> slice:
    """Along one axis of a tile spanning [start, start + length): the ``band`` entries at
    its near edge (``d`` < 0), at its far edge (``d`` > 0), or all of it (``d`` = 0)."""
    if d < 0:
        return slice(start, start + band)
    if d > 0:
        return slice(start + length - band, start + length)
    return slice(start, start + length)


def seam_weights(size: tuple[int, int], top: int, left: int, h: int, w: int,
                 sides: Iterable[tuple[int, int]], weight: float = SEAM_WEIGHT,
                 band: int = SEAM_BAND) -> Any:
    """The ``shown`` mask of :func:`refine_latents` for a tile at (``top``, ``left``) of a
    window of ``size`` (H, W) px: 1 on its ``h`` × ``w`` px, ``1 + weight`` within ``band``
    px of each of ``sides`` ((dr, dc), its bare sides), 0 elsewhere.  (1, 1, H, W) float32."""
    import torch

    shown = torch.zeros(1, 1, *size)
    shown[..., top:top + h, left:left + w] = 1
    for dr, dc in sides:
        shown[..., _edge(dr, top, h, band), _edge(dc, left, w, band)] = 1 + weight
    return shown


def held_mask(shape: tuple[int, ...], seen_by: Iterable[tuple[int, int]]) -> Any:
    """The entries of a tile's latents (``shape``: (1, M, h, w)) that the neighbours at
    ``seen_by`` ((dr, dc), of the eight) stitch with: the :data:`STITCH_RING` rows or
    columns on each side's edge, the corner for a diagonal one.  Bool, ``shape``."""
    import torch

    lh, lw = shape[-2:]
    hold = torch.zeros(shape, dtype=torch.bool)
    for dr, dc in seen_by:
        hold[..., _edge(dr, 0, lh, STITCH_RING), _edge(dc, 0, lw, STITCH_RING)] = True
    return hold


def search_tile(net: Any, decoder: Any, encoder: Any, y: Any, z: Any, centre: Any, source: np.ndarray,
                valid: tuple[int, int], around: dict, first: np.ndarray, sides: dict, seen_by: Iterable,
                steps: int, device: Any) -> tuple[bytes, Any, np.ndarray]:
    """One network tile re-coded for its bare sides (module docstring).

    ``y``, ``z``: its gained latents at ``encoder``'s quality as stage 1 coded them (CPU);
    ``centre``: the ungained ŷ readers decode from that coding; ``source``: its pixels as
    coded (``valid``: the part inside the level); ``around``: its eight neighbours' latents
    as readers see them ((dr, dc) → latents); ``first``: readers' first pass of it;
    ``sides``: its bare bare sides ((dr, dc) → their pixels); ``seen_by``: the
    neighbours that stitch with its latents (every present one but bare tiles).

    Returns (bytes, ungained ŷ, the pixels readers' second pass shows, before any glass
    blending).  Raises RuntimeError if a held latent moved (it cannot: z and those
    entries of y stay, so their symbols and ŷ do).
    """
    import torch

    q = encoder.quality
    P = PIXEL_STRIDE
    h, w = source.shape[:2]
    qt = torch.tensor([q], device=device)
    with torch.inference_mode():
        gain = net.gains(qt, torch.float32)[0]
        win, top, left = second_window(decoder, torch.zeros_like(centre), around, first, sides)
        win = (win.to(device) * gain).clone()
    size = (win.shape[-2] * P, win.shape[-1] * P)
    x = torch.zeros(1, 3, *size)
    x[..., top:top + h, left:left + w] = torch.from_numpy(np.ascontiguousarray(source)).permute(2, 0, 1) / 255.0
    shown = seam_weights(size, top, left, valid[0], valid[1], sides)
    hold = held_mask(tuple(y.shape), seen_by)
    y2, z2, _ = refine_latents(net, x.to(device), qt, y.to(device), z.to(device), shown.to(device), steps,
                               window=(win, top // P, left // P), hold=hold.to(device))
    data, y_hat = encoder.code_and_reconstruct(y2.cpu(), z2.cpu(), h, w, VERSION)
    new = decoder.ungain(y_hat, q)
    if not torch.equal(new[hold], centre[hold]):
        raise RuntimeError("seam search moved latents its neighbours see")

    def shown_px(window):
        px = decoder.synthesize([window[0]], [(window[1], window[2], h, w)])[0]
        if isinstance(px, BaseException):
            raise px
        return px

    again = shown_px(stitch_window(new, around, STITCH_RING))
    shown = second_pass(decoder, [(new, around, again, sides)])[0]
    if isinstance(shown, BaseException):
        raise shown
    return data, new, shown
