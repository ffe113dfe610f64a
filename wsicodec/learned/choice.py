"""Per-tile codec choice for the ``auto`` codec: glass, the network, JPEG 2000, JPEG-XL or the source's own, over a floor.

Each level is coded row by row (:class:`~wsicodec.learned.levelencoder.MixedLevelEncoder`)::

    push(row r) ─► stage 1 of row r, each tile on its own (:meth:`TileChooser.choose_row`):
        │   glass, if its PSNR reaches the floor; else g_a once (the gains scale y), the
        │   network at the codec's quality, raised in quarter steps to where the tile's
        │   estimated PSNR clears the floor (+ ESTIMATE_MARGIN_DB); then JPEG-XL and
        │   JPEG 2000 fitted to the PSNR the network reaches (or the floor), on a pool of
        │   threads, while the torch work goes on: the fewest bytes win; a classical
        │   coding higher up, and the source's own coding (a scanner's tile, or its JPEG
        │   recovered from the pixels), win too where they cost less at the quality's
        │   price of error (:mod:`~wsicodec.learned.sourcefit`)
        ▼
    stage 2 of each row whose neighbours are all decided (:meth:`TileChooser.settle_row`):
        row r − 2 once row r − 1's fits are in (row r − 1 too when row r has no fit to
        wait for); every network tile decoded as readers decode it (stitched with its
        eight neighbours' latents, by the decoder's own functions; with ``seam_search``,
        one beside bare tiles (JPEG 2000, JPEG-XL) searched again for those borders, kept where it
        clears the floor: :mod:`~wsicodec.learned.seamsearch`; then drawn toward those
        borders' pixels, kind 5, where that leaves its PSNR no lower than kind 0's,
        undrawn), every plane glass tile as readers draw it (toward its plane and, kind
        4, its bare neighbours), and measured against the source; a kind-4 glass tile
        under the floor is tried as kind 3 (not drawn toward its bare neighbours); one
        still under it becomes a fix-up tile (JPEG 2000 or JPEG-XL pixels, its latents
        kept for its neighbours)
    ─► the settled rows out, in order, each tile with its record (kind, PSNR of what
       readers show)

Why fix-up tiles keep their latents: a tile's pixels depend on its neighbours' latents.
Stage 1 fixes every tile's latents for good (network: its ŷ; a bare tile: g_a of its decoded
pixels, :meth:`~wsicodec.learned.decoder.TileDecoder.pixel_latents`; glass: its colour's),
so stage 2 measures each tile in its final surroundings, and turning a tile into a
fix-up, a glass tile from kind 4 into kind 3 or a network tile's kind between 0 and 5,
changes no tile already measured (what those kinds meet are bare neighbours,
whose pixels stage 1 fixed; nobody is drawn toward them).  The
floor then holds for every tile with one row of look-ahead and no second pass over the
level.  When a row is settled changes only when its bytes come out, never what they are:
every decision is a function of the tile (stage 1) or of the tile and its decided
neighbours (stage 2).
"""

from __future__ import annotations

import math
from concurrent.futures import Executor, Future
from typing import Any, Sequence

import numpy as np

from wsicodec.heap import release_freed_memory
from wsicodec.jpegrecover import KIND as RECOVERED_JPEG
from wsicodec.scannertiles import KIND_JPEG, KIND_JPEG2000

from .encoder import align_to_grid, check_box, check_region
from .glass import SIDES, bare_edges, blend_toward_glass, decode_glass, encode_glass, uniform_fit
from .grid import glass_edges
from .j2kfit import fit_jpeg2000_tile, tile_sides, with_margin
from .jxlfit import TileFit, fit_jpegxl, tile_psnr
from .secondpass import second_pass
from .sourcefit import carried_fit, cost, price_of_error, priced_fit, recovered_fit
from .stepsearch import StepSearch, quality_steps
from .synthesis import STITCH_RING, stitch_window
from .tilestate import TileState, drop_stage_1_state
from .tileformat import (KIND_FIXUP, KIND_NETWORK_MIXED, KIND_PLANE, KIND_PLANE_MIXED,
                         LATENT_STRIDE, MAGIC, PIXEL_STRIDE, PLANE_KINDS, VERSION, fixup_parts, pack_fixup,
                         parse_header, with_kind)

#: what the ``auto`` codec records for each tile (:attr:`wsicodec.codecs.TileCodec.tile_kinds`)
KINDS = ("glass", "learned", "jpegxl", "jpegxl-lossless", "fixup", "jpeg2000", KIND_JPEG,
         KIND_JPEG2000, RECOVERED_JPEG)
#: stage 1 keeps a network quality when the tile's estimated PSNR clears the floor by this
#: much (the estimate stitches with g_a's unquantised neighbours; stage 2 measures exactly)
ESTIMATE_MARGIN_DB = 0.3
#: stage 2 keeps a network tile when its measured PSNR clears the floor by this much: a
#: reader's g_s batches windows differently, which can move a few pixels by one level
READER_SLACK_DB = 0.02
class TileChooser:
    """The two stages for one ``auto`` codec: its network (``net`` on ``device``, in
    ``precision``), a mixed decoder (the readers' functions), a network encoder per
    quality (``encoder_at(q)``), the floor ``min_psnr``, JPEG-XL's ``effort``, whether
    JPEG 2000 is fitted too (``jpeg2000``), with how many px of margin
    (``jpeg2000_margin``, :func:`~wsicodec.learned.j2kfit.with_margin`), and the steps of
    the seam search (``seam_search``, 0: off; :mod:`~wsicodec.learned.seamsearch`),
    whether the source's own tiles are offered (``scanner_tiles``,
    :mod:`wsicodec.scannertiles`) and, where a tile is none of them, the scan's JPEG made
    again from its pixels (``recovered_jpeg``, :mod:`wsicodec.jpegrecover`), and the
    precision stage 1's estimates run g_s in (``estimate_precision``; default
    ``precision``: they only steer the search, stage 2 measures in ``precision``)."""

    def __init__(self, net: Any, decoder: Any, encoder_at: Any, quality: float, min_psnr: float,
                 effort: int, device: Any, precision: str, seam_search: int = 0,
                 jpeg2000: bool = True, jpeg2000_margin: int = 0, scanner_tiles: bool = False,
                 recovered_jpeg: bool = False, estimate_precision: str | None = None) -> None:
        self.net, self.decoder, self.encoder_at = net, decoder, encoder_at
        self.estimate_precision = precision if estimate_precision is None else estimate_precision
        self.steps = quality_steps(quality)
        self.floor, self.effort, self.device, self.precision = min_psnr, effort, device, precision
        self.seam_search, self.jpeg2000, self.j2k_margin = seam_search, jpeg2000, jpeg2000_margin
        self.scanner_tiles, self.recovered_jpeg = scanner_tiles, recovered_jpeg
        #: bits per pixel one unit of 8-bit MSE is worth at the codec's quality
        self.price = price_of_error(net, quality)

    # ------------------------------------------------------------------ stage 1
    def choose_row(self, regions: Sequence[np.ndarray], boxes: Sequence[tuple[int, int, int, int]],
                   valid: Sequence[tuple[int, int]] | None, pool: Executor,
                   scanned: Sequence[bytes | None] | None = None) -> tuple[list[TileState], list[Future]]:
        """Stage 1 for one row's tiles: glass, the scanner's own tile (``scanned``, each
        tile's or None) and the network here, the classical fits submitted to ``pool``;
        the row is decided once the futures returned are done.  A tile's choice depends
        on the tile alone, so a resumed run decides as an uninterrupted one."""
        tiles, network = [], []
        for i, (region, box) in enumerate(zip(regions, boxes)):
            region = check_region(region)
            check_box(region, box)
            top, left, h, w = box
            around = None
            if self.jpeg2000 and self.j2k_margin:
                m = self.j2k_margin
                around = with_margin(region, box, m)
                src = around[m:m + h, m:m + w]          # the tile held once: a view of its margin
            else:
                src = np.ascontiguousarray(region[top:top + h, left:left + w])
            t = TileState(i, src, tuple(valid[i]) if valid is not None else (h, w), around=around)
            t.sides = tile_sides(region, box, t.valid)
            if not self._glass(t):
                network.append(i)
                if scanned is not None and self.scanner_tiles and scanned[i] is not None:
                    t.carried = carried_fit(self.decoder, t.source, t.valid, scanned[i], self.floor)
            tiles.append(t)
        if not network:
            return tiles, []
        self._network([tiles[i] for i in network], [regions[i] for i in network],
                      [boxes[i] for i in network])
        return tiles, [pool.submit(self._versus_classical, tiles[i]) for i in network]

    def _glass(self, t: TileState) -> bool:
        fit = uniform_fit(t.source)
        if fit is None:
            return False
        data = encode_glass(t.source, *fit, VERSION, KIND_PLANE_MIXED)
        hd = parse_header(data)
        p = tile_psnr(decode_glass(data, hd), t.source, t.valid)    # a plane's meetings: stage 2
        if p < self.floor:
            return False
        t.kind, t.data, t.inner, t.psnr = "glass", data, data, p
        t.context = self.decoder.latents(data, hd, "glass tile")
        return True

    def _network(self, tiles: list[TileState], regions: list[np.ndarray], boxes: list) -> None:
        """g_a once per region (at most the decoder's ``max_batch`` regions a pass, so a
        wide slide's row costs no more memory than a narrow one's); a search over the quality
        steps on estimated PSNRs (g_s, in ``estimate_precision``, over the region's latents
        with the tile's rounded at that quality: neighbours as g_a sees them, no entropy
        coding); then the tile coded once, at the step chosen, unless even the top misses
        the floor (it goes to a classical codec)."""
        import torch

        aligned = [align_to_grid(r, b) for r, b in zip(regions, boxes)]
        y_u: list[Any] = [None] * len(tiles)
        groups: dict[tuple[int, int], list[int]] = {}
        for k, (r, _) in enumerate(aligned):
            groups.setdefault(r.shape[:2], []).append(k)
        from .network import pad_to_stride
        step = self.decoder.max_batch
        with torch.inference_mode():
            for same in groups.values():
                for idx in (same[i:i + step] for i in range(0, len(same), step)):
                    x = torch.from_numpy(np.stack([aligned[k][0] for k in idx])).permute(0, 3, 1, 2)
                    x = pad_to_stride(x.float().div_(255.0), PIXEL_STRIDE).to(self.device)
                    y = self.net.transform(x, self.precision)
                    for j, k in enumerate(idx):
                        y_u[k] = y[j:j + 1].float().cpu()
                    del x, y
                    release_freed_memory()      # g_a's activations: a wide row makes many
        # per tile: the codec's own step first; then the steps its search asks for
        # (:class:`~wsicodec.learned.stepsearch.StepSearch`), all tiles' in one g_s batch
        searches = [StepSearch(len(self.steps), self.floor + ESTIMATE_MARGIN_DB) for _ in tiles]
        todo = list(range(len(tiles)))
        while todo:
            where = [(k, searches[k].next, aligned[k][1]) for k in todo]
            pixels = self.decoder.synthesize([self._rounded(y_u[k], box, self.steps[s]) for k, s, box in where],
                                             [box for _, _, box in where], precision=self.estimate_precision)
            for (k, _, _), px in zip(where, pixels):
                if isinstance(px, BaseException):
                    raise px
                searches[k].record(tile_psnr(px, tiles[k].source, tiles[k].valid))
            todo = [k for k in todo if searches[k].next is not None]
            del pixels
            release_freed_memory()
        for k, t in enumerate(tiles):
            found = searches[k]
            if found.chosen is None:
                t.estimate = max(found.tried.values())                 # under the floor: classical
                continue
            t.estimate = found.tried[found.chosen]
            t.network, t.context, latents = self._code(y_u[k], aligned[k][1], self.steps[found.chosen])
            if self.seam_search:
                t.latents = latents

    def _rounded(self, y_u: Any, box: tuple[int, int, int, int], quality: float) -> Any:
        """The region's latents with the tile's rounded at ``quality`` (gained, rounded,
        ungained): what stage 1 estimates a quality's PSNR from, within ~0.1 dB of coding
        it (he/test, tcga), at the cost of one g_s."""
        import torch

        top, left, h, w = box
        ty, tx = top // PIXEL_STRIDE, left // PIXEL_STRIDE
        lh, lw = -(-h // PIXEL_STRIDE), -(-w // PIXEL_STRIDE)
        with torch.inference_mode():
            gain, _ = self.net.gains(torch.tensor([quality]), y_u.dtype)
            win = y_u.clone()
            part = win[..., ty:ty + lh, tx:tx + lw]
            part.copy_(torch.round(part * gain) / gain)
        return win

    def _code(self, y_u: Any, box: tuple[int, int, int, int], quality: float) -> tuple[bytes, Any, tuple]:
        """A tile of the region latents ``y_u`` (ungained) at ``quality``: its bytes, the
        ungained latents a reader entropy-decodes from them and the gained (y, z) coded."""
        import torch

        top, left, h, w = box
        ty, tx = top // PIXEL_STRIDE, left // PIXEL_STRIDE
        lh, lw = -(-h // PIXEL_STRIDE), -(-w // PIXEL_STRIDE)
        q1 = torch.tensor([quality], device=self.device)
        with torch.inference_mode():
            gain, _ = self.net.gains(q1, y_u.dtype)
            y = (y_u.to(self.device) * gain)[..., ty:ty + lh, tx:tx + lw]
            z = self.net.hyper_analysis(y, q1, LATENT_STRIDE)
        y, z = y.cpu(), z.cpu()
        data, y_hat = self.encoder_at(quality).code_and_reconstruct(y, z, h, w, VERSION)
        return data, self.decoder.ungain(y_hat, quality), (y, z)

    def fit(self, t: TileState, target: float, budget: float | None) -> TileFit | None:
        """The classical coding of ``t`` reaching ``target`` dB in the fewest bytes at that
        PSNR (:attr:`~wsicodec.learned.jxlfit.TileFit.equal_bytes`): JPEG-XL, then (when
        this codec fits it) JPEG 2000 under JPEG-XL's bytes, with the tile's margin or
        without, held to JPEG-XL's accuracy on the glass and the ring at the tile's edges
        (:func:`~wsicodec.learned.j2kfit.fit_jpeg2000_tile`).  None only with
        a ``budget`` neither undercuts; without one, never None (lossless JPEG-XL is the
        last resort)."""
        jxl = fit_jpegxl(t.source, target, t.valid, effort=self.effort, budget=budget)
        if not self.jpeg2000:
            return jxl
        j2k = fit_jpeg2000_tile(t.source, target, t.valid, budget=budget if jxl is None else jxl.equal_bytes,
                                reference=None if jxl is None else jxl.pixels, around=t.around, sides=t.sides)
        return jxl if j2k is None else j2k

    def _versus_classical(self, t: TileState) -> None:
        """A classical codec where the network misses the floor, or where one reaches the
        network's PSNR in fewer bytes (compared at that PSNR exactly:
        :attr:`~wsicodec.learned.jxlfit.TileFit.equal_bytes`; the coding kept reaches it or
        more).  Depends on the tile alone (a resumed run decides as an uninterrupted one)."""
        ok = t.network is not None
        target = max(self.floor, t.estimate) if ok else self.floor
        fit = self.fit(t, target, len(t.network) if ok else None)
        if t.carried is None and self.recovered_jpeg:
            t.carried = recovered_fit(self.decoder, t.source, t.valid, self.floor)
        # the scanner's tile against the coding kept, byte for byte (it is no budget of
        # the fits: their early stop is a prediction, which cost tcga 2 % at 32 dB as one)
        if t.carried is not None and t.carried.psnr >= target \
                and (fit is None or len(t.carried.data) <= len(fit.data)):
            fit = t.carried                     # the source (exactly, as a rule) in no more bytes
        if fit is not None and fit.psnr >= self.floor:
            t.fit = fit
        # at equal PSNR: the codec's bytes at exactly the target (its codings overshoot it)
        if fit is not None and (not ok or fit.equal_bytes < len(t.network)):
            self._take(t, fit)
        else:
            t.kind, t.data, t.inner = "learned", t.network, t.network
        self._at_price(t, fit)
        # the source's JPEG (as good as exact) where its bytes cost less than the error it
        # saves, at the network's own price of error at this quality: where the network is
        # at its ceiling (its next bytes buy next to no PSNR) it takes the JPEG
        c = t.carried
        if c is not None and t.kind not in (c.codec, "glass") \
                and cost(len(c.data), c.psnr, t.valid, self.price) < self._cost(t):
            self._take(t, c)
        drop_stage_1_state(t)

    @staticmethod
    def _take(t: TileState, fit: TileFit) -> None:
        """``t`` coded as the bare tile ``fit`` (its kind's name from the codec; the
        latents it gives its neighbours made lazily, from its pixels)."""
        t.kind = "jpegxl-lossless" if fit.lossless else fit.codec
        t.data, t.psnr, t.context, t.inner, t.fit = fit.data, fit.psnr, None, None, fit

    def _cost(self, t: TileState) -> float:
        """The cost of ``t``'s coding as chosen so far at the quality's price of error (a
        network tile at its stage-1 estimate)."""
        return cost(len(t.data), t.estimate if t.kind == "learned" else t.psnr, t.valid, self.price)

    def _at_price(self, t: TileState, fit: TileFit | None) -> None:
        """A classical coding of ``t`` above the one chosen where it costs less at the
        quality's price of error (:func:`~wsicodec.learned.sourcefit.priced_fit`), fitted
        from ``fit`` (the classical coding at the tile's target) or, where JPEG-XL could not
        undercut the network at equal PSNR, from the network's tile."""
        if fit is not None and fit.codec in ("jpegxl", "jpeg2000") and not fit.lossless:
            start = (len(fit.data), fit.psnr, fit.rate_slope)
        elif t.kind == "learned":
            start = (len(t.data), t.estimate, math.nan)
        else:
            return
        found = priced_fit(lambda target: self.fit(t, target, None), start, self._cost(t), t.valid, self.price,
                           self.floor)
        if found is not None:
            self._take(t, found)

    def stored_tile(self, col: int, data: bytes, size: tuple[int, int]) -> TileState:
        """A tile an earlier run wrote (a resumed run's context): its latents as readers
        compute them from its bytes."""
        data = bytes(data)
        t = TileState(col, None, (0, 0), data=data, shape=(*size, 3))          # its size, no pixels
        if data[:4] != MAGIC:
            t.kind = "bare"
            return t
        hd = parse_header(data)
        t.kind, t.inner = "stored", fixup_parts(data, hd)[0] if hd.kind == KIND_FIXUP else data
        t.context = self.decoder.latents(t.inner, parse_header(t.inner), f"tile col={col}")
        return t

    # ------------------------------------------------------------------ stage 2
    def _synthesize(self, windows: list, tiles: list[TileState]) -> list[np.ndarray]:
        """g_s over stitched windows ((window, top, left) each), cropped to each tile."""
        boxes = [(top, left, *t.shape[:2]) for (_, top, left), t in zip(windows, tiles)]
        pixels = self.decoder.synthesize([w[0] for w in windows], boxes)
        release_freed_memory()
        for px in pixels:
            if isinstance(px, BaseException):
                raise px
        return pixels

    def pixels(self, t: TileState) -> np.ndarray:
        """A bare tile's decoded pixels."""
        if t.fit is not None and t.data == t.fit.data:
            return t.fit.pixels
        return self.decoder.bare_pixels(t.data, t.shape, "tile")

    def context(self, t: TileState) -> Any:
        """The latents ``t`` gives its neighbours' stitching, as readers compute them."""
        if t.context is None:
            t.context = self.decoder.pixel_latents(self.pixels(t))
        return t.context

    def _search_seams(self, t: TileState, around: dict, first: list, k: int, sides: dict, seen_by: list,
                      edges: Any) -> None:
        """The seam search of a network tile beside bare tiles
        (:func:`~wsicodec.learned.seamsearch.search_tile`), kept when what readers show of
        it clears the floor + :data:`READER_SLACK_DB` (``first[k]`` then its pixels); else
        the stage-1 coding stays.  Its neighbours' view of it does not change either way."""
        from .seamsearch import search_tile

        y, z = t.latents
        enc = self.encoder_at(parse_header(t.network).quality)
        data, centre, px = search_tile(self.net, self.decoder, enc, y, z, t.context, t.source, t.valid,
                                       around, first[k], sides, seen_by, self.seam_search, self.device)
        if tile_psnr(blend_toward_glass(px, edges(t)), t.source, t.valid) >= self.floor + READER_SLACK_DB:
            t.data = t.network = t.inner = data
            t.context, first[k] = centre, px

    def _meet(self, t: TileState, px: np.ndarray, planes: dict, sides: dict | None) -> np.ndarray:
        """What readers show of network tile ``t`` decoded as ``px``: drawn toward its plane
        glass neighbours' edges ``planes`` and, as kind 5, toward its bare
        neighbours' (``sides``: side → pixels) where that leaves its PSNR no lower than
        kind 0's, which is not drawn toward them (``t`` relabelled to match)."""
        plain = blend_toward_glass(px, planes)
        hd = parse_header(t.data)
        meet = bare_edges(sides, hd.height, hd.width)
        if not meet:
            return plain
        drawn = blend_toward_glass(px, {**planes, **meet})
        if tile_psnr(drawn, t.source, t.valid) < tile_psnr(plain, t.source, t.valid):
            return plain
        t.data = t.network = t.inner = with_kind(t.data, KIND_NETWORK_MIXED)
        return drawn

    def settle_row(self, tiles: list[TileState], above: list[TileState] | None, below: list[TileState] | None) -> None:
        """Stage 2: each network tile of ``tiles`` decoded stitched with its neighbours
        (``above``, ``below``: the rows around it, None at the level's edge), and each
        plane glass tile drawn toward its plane neighbours (kind 4: and its bare
        ones), as readers do; a kind-4 tile under the floor is tried as kind 3, and one
        still under it becomes a fix-up tile around what its neighbours see."""
        rows = {-1: above, 0: tiles, 1: below}

        def neighbour(t: TileState, dr: int, dc: int) -> TileState | None:
            row, c = rows[dr], t.col + dc
            return row[c] if row is not None and 0 <= c < len(row) else None

        def edges(t: TileState) -> dict:
            hd = parse_header(t.inner)
            around = {}
            for dr, dc in SIDES:
                nb = neighbour(t, dr, dc)
                if nb is not None and nb.inner is not None:
                    around[(dr, dc)] = (nb.inner, parse_header(nb.inner))
            return glass_edges(hd, around, lambda d: "tile")

        def bare_sides(t: TileState) -> dict:
            return {(dr, dc): self.pixels(nb) for dr, dc in SIDES
                    if (nb := neighbour(t, dr, dc)) is not None and nb.inner is None}

        todo = [t for t in tiles if t.kind == "learned"]
        arounds = [{(dr, dc): self.context(nb) for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                    if (dr or dc) and (nb := neighbour(t, dr, dc)) is not None} for t in todo]
        first = self._synthesize([stitch_window(t.context, a, STITCH_RING) for t, a in zip(todo, arounds)],
                                 todo)
        again = [(k, bare_sides(t)) for k, t in enumerate(todo)]      # beside bare tiles: pass 2
        again = [(k, sides) for k, sides in again if sides]
        for (k, _), px in zip(again, second_pass(self.decoder, [(todo[k].context, arounds[k], first[k], sides)
                                                                 for k, sides in again])):
            if isinstance(px, BaseException):
                raise px
            first[k] = px
        release_freed_memory()
        if self.seam_search:
            for k, sides in again:
                t = todo[k]
                seen_by = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                           if (dr or dc) and (nb := neighbour(t, dr, dc)) is not None and nb.inner is not None]
                self._search_seams(t, arounds[k], first, k, sides, seen_by, edges)
        sides_of = dict(again)
        shown = [(t, self._meet(t, px, edges(t), sides_of.get(k))) for k, (t, px) in enumerate(zip(todo, first))]
        for t in tiles:
            if t.kind == "glass" and (hd := parse_header(t.data)).kind in PLANE_KINDS:
                shown.append((t, decode_glass(t.data, hd, "tile", edges(t), bare_sides(t))))
        for t, px in shown:
            p = tile_psnr(px, t.source, t.valid)
            if p >= self.floor + READER_SLACK_DB:
                t.psnr = p
                continue
            if t.kind == "glass" and parse_header(t.data).kind == KIND_PLANE_MIXED:
                # drawn toward its bare neighbours it misses the floor: kind 3 is not drawn
                # toward them (its neighbours see the same plane and colour either way)
                t.data = t.inner = with_kind(t.data, KIND_PLANE)
                p = tile_psnr(decode_glass(t.data, parse_header(t.data), "tile", edges(t)), t.source, t.valid)
                if p >= self.floor + READER_SLACK_DB:
                    t.psnr = p
                    continue
            fit = t.fit or t.carried or self.fit(t, self.floor, None)
            t.kind, t.data, t.psnr = "fixup", pack_fixup(t.inner, fit.data), fit.psnr
        for t in tiles:
            t.latents = None                    # settled: the search is done with them
