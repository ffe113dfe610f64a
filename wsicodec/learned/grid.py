"""One stitched decode of many tiles of a grid: :class:`GridJob`, :func:`glass_edges` and
:func:`stitching_crop`.

A :class:`GridJob` is one call of
:meth:`~wsicodec.learned.decoder.TileDecoder.decode_tiles`: it fetches each tile's bytes
and header once (in the calling thread), decodes glass, bare (JPEG-XL, JPEG 2000) and fix-up tiles
directly, and gathers the latents of the stitched tiles and their neighbours (from the
:class:`~wsicodec.learned.synthesis.LatentCache`, from another caller, or decoded on the
caller's threads) into the windows g_s runs over.  A bare tile's latents (g_a of its
pixels) are coded only over the part its stitched neighbours in the grid read.
"""

from __future__ import annotations

import os

from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Sequence

import numpy as np

from wsicodec.classical import BARE_SIGNATURES
from wsicodec.codecs import Run
from wsicodec.errors import CorruptDataError

from .glass import SIDES, decode_glass, plane_edge
from .synthesis import STITCH_RING, LatentCache, stitch_window
from .tileformat import (GLASS_KINDS, KIND_FIXUP, KIND_PLANE_MIXED, MAGIC, NETWORK_KINDS, PLANE_KINDS,
                         TileHeader, fixup_parts, parse_named)

if TYPE_CHECKING:
    from .decoder import TileDecoder

#: the shape every tile of a grid decodes to, or each tile's (``shape(col, row)``: an image
#: stream's edge tiles are smaller), or None (what each stream says)
Shape = tuple[int, ...] | Callable[[int, int], tuple[int, ...]] | None

#: the kind the learned decoder gives a bare tile of a mixed grid: a classical codestream
#: (JPEG-XL or JPEG 2000) decoded to its own pixels, not a learned tile
KIND_BARE = -1
#: a grid's network tiles are entropy-decoded in chunks, one per call of the caller's
#: ``run`` (its threads take one each): as many chunks as the machine has cores, at most
#: this many (a cold tile's 9 in two chunks of 5 and 4 on a 2-core CPU: one batched h_s
#: pass each, 99 against 116 ms p50 for the tile than one chunk per tile) ...
CHUNKS = 16
#: ... of at most this many tiles (one batched pass of the exact h_s; 24 ran slower per
#: tile than 6)
ENTROPY_CHUNK = 8


def chunk_size(n: int, cores: int | None = None) -> int:
    """Tiles per entropy-decoding chunk when ``n`` network tiles are to be decoded on a
    machine of ``cores`` cores (default: this one's)."""
    ways = max(1, min(CHUNKS, cores or os.cpu_count() or 1))
    return max(1, min(ENTROPY_CHUNK, -(-n // ways)))


def glass_edges(hd: TileHeader, around: dict, name: Callable[[tuple[int, int]], str]) -> dict:
    """The edge colours of the plane glass tiles among a tile's side neighbours ``around``
    ((dr, dc) → (bytes, header) of what each shows its neighbours), keyed by side, for
    :func:`~wsicodec.learned.glass.blend_toward_glass`; ``hd``: the tile's header.  A
    neighbour whose edge does not match the tile's side, or is damaged, is left out.
    Readers and the ``auto`` encoder's measurement both call this."""
    edges = {}
    for (dr, dc), (data, nhd) in around.items():
        same = (nhd.width == hd.width) if dr else (nhd.height == hd.height)
        if nhd.kind not in PLANE_KINDS or not same:
            continue
        try:
            edges[(dr, dc)] = plane_edge(data, nhd, (-dr, -dc), name((dr, dc)))
        except Exception:  # noqa: BLE001 - a damaged neighbour only costs that side
            continue
    return edges


def stitching_crop(shape: tuple[int, int], toward: Iterable[tuple[int, int]] | None, reach: int,
                   stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (rows, columns) of a tile of ``shape`` (h, w) whose g_a latents its neighbours
    in directions ``toward`` ((dr, dc) each; None: every direction) read for their
    stitching: along each axis, the ``reach`` px at the edge facing all of them where
    they lie on one side (and that crop starts on the latent grid of ``stride`` px),
    else the whole axis.  A side neighbour reads :data:`STITCH_RING` latent rows along
    the whole edge, a corner neighbour a corner of them; the caller's ``reach`` covers
    what those depend on."""
    if toward is None:
        return (0, shape[0]), (0, shape[1])
    toward = list(toward)
    axes = []
    for n, ds in ((shape[0], {dr for dr, _ in toward}), (shape[1], {dc for _, dc in toward})):
        if n > reach and ds == {-1}:
            axes.append((0, reach))
        elif n > reach and ds == {1} and (n - reach) % stride == 0:
            axes.append((n - reach, n))
        else:
            axes.append((0, n))
    return axes[0], axes[1]


def reads_neighbours(hd: TileHeader) -> bool:
    """Whether a tile of header ``hd`` is decoded stitched: a network tile of a format with
    stitched tiles, whose g_s reads its neighbours' latents."""
    return hd.kind in NETWORK_KINDS and hd.stitched


def sides_in_grid(key: tuple[int, int], grid: tuple[int, int]):
    """((dr, dc), neighbour key) for each of :data:`SIDES` whose neighbour of ``key``
    (col, row) lies inside ``grid`` (cols, rows)."""
    col, row = key
    for dr, dc in SIDES:
        nb = (col + dc, row + dr)
        if 0 <= nb[0] < grid[0] and 0 <= nb[1] < grid[1]:
            yield (dr, dc), nb


class GridJob:
    """One :meth:`~wsicodec.learned.decoder.TileDecoder.decode_tiles` call: the bytes and
    headers it fetched (fetched in the calling thread: stores need not be thread-safe),
    and its steps."""

    def __init__(self, decoder: TileDecoder, fetch: Callable[[int, int], bytes],
                 names: Callable[[int, int], str], shape: Shape,
                 check: Callable[[TileHeader, str], None] | None = None) -> None:
        self.decoder, self.fetch, self.names, self._shape = decoder, fetch, names, shape
        self.check = check
        self.got: dict[tuple[int, int], tuple[bytes, TileHeader]] = {}
        #: pixels of the tiles that have them without g_s (bare and fix-up tiles)
        self.pixels: dict[tuple[int, int], np.ndarray] = {}
        #: the bare codestreams of the fix-up tiles (``got`` holds their inner tiles)
        self.fixups: dict[tuple[int, int], bytes] = {}
        #: bytes fetched to see what a tile is (:meth:`reads_latents`), not loaded yet
        self._peeked: dict[tuple[int, int], bytes] = {}
        self._stitched: dict[tuple[int, int], bool] = {}

    def shape(self, key: tuple[int, int]) -> tuple[int, ...] | None:
        """The shape tile ``key`` must decode to (None: what its stream says)."""
        return self._shape(*key) if callable(self._shape) else self._shape

    def load(self, key: tuple[int, int]) -> tuple[bytes, TileHeader]:
        if key not in self.got:
            data = self._peeked.pop(key, None)
            data = bytes(self.fetch(*key)) if data is None else data
            if self.decoder.mixed and data[:4] != MAGIC:
                if not data.startswith(BARE_SIGNATURES):
                    raise CorruptDataError(f"{self.names(*key)}: neither a learned, a JPEG-XL, a JPEG 2000 nor a "
                                           "(scanner) JPEG tile")
                px = self.decoder.bare_pixels(data, self.shape(key), self.names(*key))
                self.pixels[key] = px
                self.got[key] = (data, TileHeader(KIND_BARE, px.shape[0], px.shape[1]))
                return self.got[key]
            hd = parse_named(data, self.names(*key), self.shape(key))
            if hd.kind == KIND_FIXUP:       # its own pixels; to its neighbours, its inner tile
                data, self.fixups[key] = fixup_parts(data, hd)
                hd = parse_named(data, self.names(*key), self.shape(key))
            if self.check is not None:
                self.check(hd, self.names(*key))
            self.got[key] = (data, hd)
        return self.got[key]

    def sort(self, keys: Sequence[tuple[int, int]], out: list,
             grid: tuple[int, int]) -> tuple[list[int], list[int]]:
        """Glass tiles decoded into ``out`` (a plane drawn toward its plane neighbours, a
        kind-4 plane toward its bare neighbours too; ``grid``: (cols, rows)),
        failures put there; returns the indexes of the stitched tiles and of those decoded
        alone (formats 1-2)."""
        stitched, alone = [], []
        for n, key in enumerate(keys):
            try:
                data, hd = self.load(key)
                if key in self.fixups:
                    out[n] = self.fixup_pixels(key)
                elif hd.kind in GLASS_KINDS:
                    around = self.glass_edges(key, grid) if hd.kind in PLANE_KINDS else None
                    beside = self.bare_sides(key, grid) if hd.kind == KIND_PLANE_MIXED else None
                    out[n] = decode_glass(data, hd, self.names(*key), around, beside)
                elif hd.kind == KIND_BARE:
                    out[n] = self.pixels[key]
                elif hd.stitched:
                    stitched.append(n)
                else:
                    alone.append(n)
            except Exception as e:  # noqa: BLE001 - kept per tile
                out[n] = e
        return stitched, alone

    def fixup_pixels(self, key: tuple[int, int]) -> np.ndarray:
        """A fix-up tile's own pixels (its bare codestream).  Its inner tile is checked
        when a neighbour needs its latents, as any tile's."""
        if key not in self.pixels:
            hd = self.got[key][1]
            self.pixels[key] = self.decoder.bare_pixels(self.fixups[key], (hd.height, hd.width),
                                                          self.names(*key))
        return self.pixels[key]

    def glass_edges(self, key: tuple[int, int], grid: tuple[int, int]) -> dict:
        """The edge colours of the plane glass tiles beside ``key`` (side → (n, 3) uint8,
        :func:`~wsicodec.learned.glass.plane_edge`), for
        :func:`~wsicodec.learned.glass.blend_toward_glass`.  A neighbour that fails to
        load or parse, or whose edge does not match the tile's side, is left out (a
        fix-up neighbour shows its inner tile's edge)."""
        col, row = key
        around = {}
        for side, nb in sides_in_grid(key, grid):
            try:
                around[side] = self.load(nb)
            except Exception:  # noqa: BLE001 - a damaged neighbour only costs that side
                continue
        return glass_edges(self.got[key][1], around, lambda d: self.names(col + d[1], row + d[0]))

    @staticmethod
    def neighbourhood(keys: Sequence[tuple[int, int]], stitched: list[int],
                      grid: tuple[int, int]) -> list[tuple[int, int]]:
        """The stitched tiles and their neighbours inside the grid, each once, in order."""
        cols, rows = grid
        need: dict[tuple[int, int], None] = {}
        for n in stitched:
            col, row = keys[n]
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    if 0 <= col + dc < cols and 0 <= row + dr < rows:
                        need[(col + dc, row + dr)] = None
        return list(need)

    def reads_latents(self, key: tuple[int, int]) -> bool:
        """Whether tile ``key`` is decoded stitched (a format-3 network tile), reading its
        neighbours' latents; True where that cannot be told (it fails to fetch or parse).
        Bare, glass, fix-up and format-1/2 tiles do not; their bytes are fetched (in the
        calling thread) but not decoded."""
        if key not in self._stitched:
            if key in self.got:
                hd = self.got[key][1]
                v = key not in self.fixups and reads_neighbours(hd)
            else:
                try:
                    data = self._peeked[key] = bytes(self.fetch(*key))
                    if self.decoder.mixed and data[:4] != MAGIC:
                        v = False
                    else:
                        v = reads_neighbours(parse_named(data, self.names(*key), self.shape(key)))
                except Exception:  # noqa: BLE001 - unknown: as if it did
                    v = True
            self._stitched[key] = v
        return self._stitched[key]

    def stitched_beside(self, key: tuple[int, int], grid: tuple[int, int]) -> list[tuple[int, int]]:
        """The directions (dr, dc) of ``key``'s eight neighbours inside ``grid`` that read
        its latents (:meth:`reads_latents`): a property of the grid, not of the call, so
        latents cut to them serve every caller of a shared cache."""
        col, row = key
        return [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                if (dr or dc) and 0 <= col + dc < grid[0] and 0 <= row + dr < grid[1]
                and self.reads_latents((col + dc, row + dr))]

    def latents(self, need: list, alone: list, cache: LatentCache | None, tag: Hashable,
                run: Run, grid: tuple[int, int]) -> tuple[dict, dict]:
        """(latents of the tiles ``need`` by key: a tensor, None or the exception, from
        ``cache``, from another caller decoding them, or decoded here; the own latents of
        the format-1/2 tiles ``alone``, by key).  A bare tile's are computed only where
        the stitched tiles beside it in ``grid`` read them (:meth:`stitched_beside`)."""
        lat: dict[tuple[int, int], Any] = {}
        todo, waits = [], {}
        for key in need:          # cached, being decoded by another caller, or ours to decode
            t = cache.begin((tag, *key)) if cache is not None else None
            if t is None:
                todo.append(key)
            elif isinstance(t, Future):
                waits[key] = t
            else:
                lat[key] = t
        try:
            own = self._decode(todo, lat, alone, run, grid)
        finally:                  # whatever happened, callers waiting on our keys get an answer
            if cache is not None:
                for key in todo:
                    cache.settle((tag, *key),
                                 lat.get(key, CorruptDataError(f"{self.names(*key)}: not decoded")))
        for key, fut in waits.items():
            lat[key] = fut.result()
        return lat, own

    def prefetch(self, keys: Sequence[tuple[int, int]], cache: LatentCache, tag: Hashable, run: Run,
                 grid: tuple[int, int]) -> None:
        """The latents of those of ``keys`` that a stitched tile of ``grid`` reads (the tile's
        own, or a neighbour's: :meth:`reads_latents`, :meth:`stitched_beside`) decoded into
        ``cache`` as :meth:`latents` decodes them; failures are handed to callers waiting
        for those tiles and not kept, so they fail in the call that decodes them."""
        need = [k for k in keys if self.reads_latents(k) or self.stitched_beside(k, grid)]
        self.latents(need, [], cache, tag, run, grid)

    def _decode(self, todo: list, lat: dict, alone: list, run: Run, grid: tuple[int, int]) -> dict:
        """The entropy work: latents of ``todo`` into ``lat``; returns those of ``alone``."""
        for key in todo:          # bytes first, in this thread
            try:
                self.load(key)
            except Exception as e:  # noqa: BLE001
                lat[key] = e
        dec = self.decoder
        jobs = [("latent", k) for k in todo if k not in lat] + [("alone", k) for k in alone]
        # network tiles: entropy-decoded in chunks, one chunk per call of ``run`` (its
        # threads run them in parallel: the coder and h_s's convolutions release the GIL)
        net = [j for j in jobs if j[0] == "alone" or reads_neighbours(self.got[j[1]][1])]
        picked = set(net)
        other = [j for j in jobs if j not in picked]
        toward = {key: self.stitched_beside(key, grid) for _, key in other if self.got[key][1].kind == KIND_BARE}
        size = chunk_size(len(net))
        chunks = [net[i:i + size] for i in range(0, len(net), size)]

        def entropy(chunk: list) -> list:
            items = [(*self.got[key], self.names(*key)) for _, key in chunk]
            return [r if isinstance(r, BaseException) else dec.ungain(r, it[1].quality)
                    for r, it in zip(dec.entropy_decode_many(items), items)]

        def latent(job: tuple[str, Any]) -> Any:
            key = job[1]
            data, hd = self.got[key]
            if hd.kind == KIND_BARE:
                return dec.pixel_latents(self.pixels[key], toward[key])
            return dec.latents(data, hd, self.names(*key))

        done: dict = {}
        for chunk, r in zip(chunks, run(entropy, chunks)):
            done.update(zip(chunk, r if isinstance(r, list) else [r] * len(chunk)))
        done.update(zip(other, run(latent, other)))
        own = {}
        for kind, key in jobs:
            if kind == "alone":
                own[key] = done[(kind, key)]
            else:
                lat[key] = done[(kind, key)]
        return own

    def window(self, key: tuple[int, int], lat: dict) -> Any:
        """(window, top, left) of a stitched tile (:func:`stitch_window`), or the exception
        that leaves it without latents."""
        import torch
        col, row = key
        centre = lat.get(key)
        if not isinstance(centre, torch.Tensor):
            return centre if isinstance(centre, BaseException) else CorruptDataError(
                f"{self.names(col, row)}: no latents")
        return stitch_window(centre, self.around(key, lat), STITCH_RING)

    @staticmethod
    def around(key: tuple[int, int], lat: dict) -> dict:
        """The latents of ``key``'s eight neighbours, (dr, dc) → tensor or None."""
        import torch
        col, row = key
        around = {}
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                v = lat.get((col + dc, row + dr))
                around[(dr, dc)] = v if isinstance(v, torch.Tensor) else None
        return around

    def bare_sides(self, key: tuple[int, int], grid: tuple[int, int]) -> dict:
        """The pixels of the bare tiles (JPEG-XL, JPEG 2000) beside ``key`` (side → pixels), for a
        network tile's second pass (:func:`~wsicodec.learned.secondpass.second_window`)
        and a kind-5 one's meeting, or a kind-4 glass tile's
        (:func:`~wsicodec.learned.glass.decode_plane`); a
        neighbour that fails to load is left out (a network tile's side then keeps its
        first-pass latents, or none; a glass tile's stays the plane's)."""
        if not self.decoder.mixed:
            return {}
        sides = {}
        for side, nb in sides_in_grid(key, grid):
            try:
                if self.load(nb)[1].kind == KIND_BARE:
                    sides[side] = self.pixels[nb]
            except Exception:  # noqa: BLE001 - a damaged neighbour only costs that side
                continue
        return sides
