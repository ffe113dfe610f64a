"""Decoding learned tiles: entropy decoding, exact h_s, stitching, g_s, the latent cache.

::

    decode_tiles(keys, fetch, grid)
      │ each tile's header (fetch + parse_header); glass tiles decoded at once
      ▼ stitched (format 3) tiles and their 8 neighbours
    LatentCache ──hit──► latents          (a tile another caller decodes is waited for)
      │ miss
      ▼ on the caller's threads (``run``), in chunks of tiles (grid.chunk_size)
    entropy_decode_many: z symbols (rANS, all streams in one call) ─► exact h_s, one
                    batched pass (μ, table index) ─► y symbols (rANS) ─► CRC of the
                    symbols ─► ŷ_q (κ-reconstructed) ─► ÷ gain = latents
      ▼
    stitch_window: a tile's latents with STITCH_RING rows/columns of each neighbour's
      ▼
    Synthesis: g_s passes on the codec's device, ≤ max_batch equal shapes at a time
               (each computed only where the tile's own pixels depend on it),
               shared by every caller of one codec ─► pixels, cropped to each tile

Seams: a format-3 tile codes exactly its own latents (16-px cells), computed by g_a with
its neighbours' pixels around it, so g_s over its latents joined with its neighbours'
gives the borders a decode of the whole plane would.  A glass neighbour gives g_a's
latent of its colour (:func:`~wsicodec.learned.glass.uniform_latent`); a damaged one only
costs that side its stitching.  Beside a plane glass neighbour (kind 3 or 4) a stitched
tile's pixels near the border are drawn toward the plane's edge where they are near its
colour (:func:`~wsicodec.learned.glass.blend_toward_glass`), so the tile grid does not show
on the background; a flat (kind 1) neighbour leaves them as g_s made them.  A kind-4 plane
and a kind-5 network tile (``auto`` containers) are also drawn the same way toward their
bare neighbours' pixels (JPEG-XL or JPEG 2000), which stay as their codec decodes them.  Formats 1 and 2
(legacy, :mod:`~wsicodec.learned.tileformat`) are decoded each on its own
(:meth:`TileDecoder.decode_alone`), as they were written; so is any tile by
:meth:`~wsicodec.learned.codec.LearnedCodec.decode`, which is for checking streams: a
format-3 tile alone has the right symbols but weak borders (``bench/seams.py``,
``bench/results/``).

Where the parts live: :class:`TileDecoder` (here) holds one tile's steps and puts them
together; :mod:`~wsicodec.learned.synthesis` holds ``LatentCache``, ``stitch_window`` and
``Synthesis``; :mod:`~wsicodec.learned.grid` holds one ``decode_tiles`` call's work over
the grid (``GridJob``) and :func:`~wsicodec.learned.grid.glass_edges`.

The entropy parameters are computed in exact integer arithmetic from format 2 on: the
same bits on any machine, in any batch, on the CPU or (in float64) on the codec's GPU,
where a tile whose symbols fail their CRC is tried once more with h_s on the CPU.  A
mismatch of the symbols' CRC is an error naming the tile, never silent garbage.  The rANS
streams are decoded on the CPU, many tiles per call and without the GIL
(:mod:`wsicodec.entropy`).  g_s may run on any device.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Hashable, Iterable, Sequence

import numpy as np

from wsicodec.codecs import Run, run_serially
from wsicodec.classical import J2K_SIGNATURE, JXL_SIGNATURES
from wsicodec.entropy import decode_many, decode_symbols, load_in_background, symbol_checksum
from wsicodec.errors import CorruptDataError, ModelMismatchError

from .glass import bare_edges, blend_toward_glass, decode_glass, uniform_colour, uniform_latent
from .grid import KIND_BARE, GridJob, Shape, glass_edges, stitching_crop
from .j2kfit import crop_margin
from .secondpass import SIDE_CONTEXT, SIDE_REACH, second_pass
from .synthesis import STITCH_RING, LatentCache, Synthesis, stitch_window  # noqa: F401 - re-exported
from .tileformat import (GLASS_KINDS, KIND_FIXUP, KIND_NETWORK_MIXED, LATENT_STRIDE, MAGIC, NETWORK_KINDS,
                         PIXEL_STRIDE, TileHeader, ceil_to, exact_entropy, fixup_parts, parse_named)

#: the learned codec's latent caches: at least this many bytes ...
MIN_CACHE_BYTES = 16 * 1024 * 1024
#: ... and at most this many, unless asked for explicitly
MAX_CACHE_BYTES = 256 * 1024 * 1024


def _cpu() -> Any:
    import torch
    return torch.device("cpu")


def channel_index(shape: Sequence[int]) -> np.ndarray:
    """The CDF-table index of every z symbol of a (C, h, w) plane: its channel."""
    c = shape[0]
    return np.broadcast_to(np.arange(c, dtype=np.int32).reshape(c, 1, 1), tuple(shape))


def _broken(name: str, why: BaseException | None) -> CorruptDataError:
    """The error of a tile whose symbols cannot be trusted: the stream broke off
    (``why``) or they fail their checksum."""
    return CorruptDataError(
        f"{name}: decoded symbols fail their checksum ({why}: damaged stream)" if why is not None else
        f"{name}: decoded symbols fail their checksum (damaged stream, or entropy "
        f"parameters computed differently than at encode time)")


class TileDecoder:
    """The decoding half of a learned codec: its weights' tables, the exact h_s on the CPU
    (on ``device`` when it is a GPU), g_s on ``device`` in ``precision``, at most
    ``max_batch`` windows per g_s pass.  Thread-safe.

    Its steps are public so that a benchmark can time them one by one
    (:meth:`decode_z`, :meth:`hyper_parameters`, :meth:`decode_y`, :meth:`latents`,
    :func:`~wsicodec.learned.synthesis.stitch_window`, :meth:`synthesize`); :meth:`decode_tiles`
    is them together.
    """

    def __init__(self, loaded: Any, device: Any, precision: str, max_batch: int,
                 mixed: bool = False, jpeg2000_margin: int = 0, side_strips: bool = False) -> None:
        self.loaded = loaded
        self.model = loaded.model                      # the CPU copy: h_s's weights, tables
        self.tables = self.model.coding_tables()
        #: where the exact h_s runs: the codec's device when it is a GPU, else the CPU
        self.entropy_device = device if getattr(device, "type", "cpu") == "cuda" else _cpu()
        self.synthesis = Synthesis(loaded.on(device), device, max_batch, precision)
        self.device, self.precision = device, precision
        #: whether a grid may also hold bare tiles (the ``auto`` codec's)
        self.mixed = mixed
        #: px beyond each edge of the tile a JPEG 2000 codestream of this grid may hold (cropped)
        self.jpeg2000_margin = jpeg2000_margin
        #: a network tile's second pass beside bare tiles runs over strips along them
        #: (:func:`~wsicodec.learned.secondpass.second_pass`)
        self.side_strips = side_strips
        self._g_a_lock = threading.Lock()

    @property
    def max_batch(self) -> int:
        """Most windows per g_s pass (and, in the auto encoder, regions per g_a pass)."""
        return self.synthesis.max_batch

    # ------------------------------------------------------------- one tile's steps
    def check_model(self, hd: TileHeader, name: str) -> None:
        """ModelMismatchError unless the tile was made with weights these decode."""
        if not self.loaded.decodes(hd.model_prefix.hex()):
            raise ModelMismatchError(
                f"{name} was coded with model {hd.model_prefix.hex()}..., but the loaded model is "
                f"{self.loaded.model_id[:16]}...; open it with the same weights")

    def z_shape(self, hd: TileHeader) -> tuple[int, int, int]:
        """(N, h, w) of a network tile's z symbols."""
        yh, yw = hd.latent_size
        return self.model.config.N, ceil_to(yh, LATENT_STRIDE) // 4, ceil_to(yw, LATENT_STRIDE) // 4

    def decode_z(self, data: bytes, hd: TileHeader) -> np.ndarray:
        """A network tile's z symbols (N, h, w) int32 (rANS over the factorized prior)."""
        return decode_symbols(data[hd.payload:hd.payload + hd.z_len], channel_index(self.z_shape(hd)),
                              self.tables[0])

    def hyper_parameters(self, zs: np.ndarray, hd: TileHeader, device: Any = None):
        """(μ float64, table index int32), (B, M, h, w) on the CPU, from the z symbols
        ``zs`` (B, N, h, w) of B tiles of ``hd``'s size, format and quality (or (N, h, w)
        of one), exactly as the encoder computed them for this tile format; the exact h_s
        runs on ``device`` (default: :attr:`entropy_device`), with the same bits anywhere."""
        import torch
        m = self.model
        medians = m.entropy_bottleneck._get_medians().reshape(1, -1, 1, 1).double()
        zs = zs if zs.ndim == 4 else zs[None]
        z_hat = torch.from_numpy(np.ascontiguousarray(zs)).double() + medians
        return m.entropy_parameters(z_hat, torch.tensor([hd.quality] * zs.shape[0]),
                                    exact=exact_entropy(hd.version), size=hd.latent_size,
                                    device=self.entropy_device if device is None else device)

    def decode_y(self, data: bytes, hd: TileHeader, index) -> np.ndarray:
        """A network tile's y symbols (M, h, w) int32, coded with the tables ``index``."""
        return decode_symbols(data[hd.payload + hd.z_len:], index[0].numpy(), self.tables[1])

    def entropy_decode(self, data: bytes, hd: TileHeader, name: str):
        """The CPU half of decoding a network-coded tile: bytes → gained ŷ_q (1, M, h, w)
        float32 (κ-reconstructed).  ``hd`` is the header of ``data``.  Thread-safe.

        Raises:
            CorruptDataError: symbol checksum mismatch (names the tile).
            ModelMismatchError: the tile was made with other weights.
        """
        out = self.entropy_decode_many([(data, hd, name)])[0]
        if isinstance(out, BaseException):
            raise out
        return out

    def entropy_decode_many(self, items: Sequence[tuple[bytes, TileHeader, str]]) -> list[Any]:
        """:meth:`entropy_decode` of many network tiles ``(data, header, name)`` at once:
        each stream set decoded in one call without the GIL, the exact h_s batched over the
        tiles of equal size and format (bit-identical to one tile at a time).  Returns each
        tile's gained ŷ_q, or the exception it raises, in order.  Thread-safe: threads
        calling this on parts of a list run in parallel."""
        out: list[Any] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for n, (data, hd, name) in enumerate(items):
            try:
                self.check_model(hd, name)
                groups.setdefault((hd.latent_size, exact_entropy(hd.version)), []).append(n)
            except Exception as e:  # noqa: BLE001 - kept per tile
                out[n] = e
        for idx in groups.values():
            self._decode_group([items[n] for n in idx], idx, out)
        return out

    def _decode_group(self, items: list, idx: list[int], out: list) -> None:
        """Tiles of one latent size and format: z streams, one h_s pass, y streams."""
        import torch
        hd0 = items[0][1]
        zi = channel_index(self.z_shape(hd0))
        zs = decode_many([d[h.payload:h.payload + h.z_len] for d, h, _ in items], [zi] * len(items),
                         self.tables[0])
        ok = []
        for k, z in enumerate(zs):
            if isinstance(z, BaseException):
                out[idx[k]] = _broken(items[k][2], z)
            else:
                ok.append(k)
        for q in {items[k][1].quality for k in ok}:          # h_s batched per quality
            same = [k for k in ok if items[k][1].quality == q]
            mu, index = self.hyper_parameters(np.stack([zs[k] for k in same]), items[same[0]][1])
            ys = decode_many([items[k][0][items[k][1].payload + items[k][1].z_len:] for k in same],
                             [index[j].numpy() for j in range(len(same))], self.tables[1])
            for j, k in enumerate(same):
                data, hd, name = items[k]
                y = ys[j]
                if isinstance(y, BaseException) or symbol_checksum(zs[k], y) != hd.crc:
                    if self.entropy_device.type != "cpu":       # other tables break streams too
                        out[idx[k]] = self._on_cpu(data, hd, name, zs[k])
                        continue
                    out[idx[k]] = _broken(name, y if isinstance(y, BaseException) else None)
                    continue
                out[idx[k]] = self.model.reconstruct(torch.from_numpy(y)[None], mu[j:j + 1],
                                                     index[j:j + 1], hd.quality).float()

    def _on_cpu(self, data: bytes, hd: TileHeader, name: str, zs: np.ndarray) -> Any:
        """A tile whose symbols failed their checksum (or whose y stream broke off) with
        h_s on the device, again with h_s on the CPU (a device's float64 convolutions are exact in every algorithm this
        codec has met, ``bench/gpu_decode.py`` checks it; this keeps a device that is not
        from failing tiles).  Returns ŷ_q or the exception."""
        import torch
        mu, index = self.hyper_parameters(zs, hd, device="cpu")
        try:
            ys = self.decode_y(data, hd, index)
        except CorruptDataError as e:
            return _broken(name, e)
        if symbol_checksum(zs, ys) != hd.crc:
            return _broken(name, None)
        return self.model.reconstruct(torch.from_numpy(ys)[None], mu, index, hd.quality).float()

    def ungain(self, y_hat, quality: float):
        """Gained ŷ_q → ŷ_q / gain[q], float32: the scale tiles of any quality share."""
        import torch
        gain, _ = self.model.gains(torch.tensor([float(quality)]), torch.float32)
        return (y_hat.float() / gain).contiguous()

    def latents(self, data: bytes, hd: TileHeader, name: str):
        """What a tile gives its neighbours' stitching: its ungained ŷ (1, M, h/16, w/16)
        float32 (format 3), g_a's latent of its (mean) colour for a glass tile, or None (a
        format-1/2 tile, coded with its own margin).  Raises as :meth:`entropy_decode`."""
        if hd.kind in GLASS_KINDS:
            lh, lw = -(-hd.height // PIXEL_STRIDE), -(-hd.width // PIXEL_STRIDE)
            return uniform_latent(self.model, uniform_colour(data, hd)).expand(1, -1, lh, lw)
        if not hd.stitched:
            return None
        return self.ungain(self.entropy_decode(data, hd, name), hd.quality)

    def bare_pixels(self, data: bytes, shape: tuple[int, ...] | None, name: str) -> np.ndarray:
        """The pixels of a bare codestream (a bare tile of a mixed grid, or a fix-up tile's
        tail): the scanner's JPEG where it carries one
        (:func:`~wsicodec.scannertiles.is_carried`), JPEG 2000 when it starts with
        :data:`~wsicodec.classical.J2K_SIGNATURE`, else JPEG-XL; checked against
        ``shape``, the tile's.  A JPEG 2000 codestream of a grid with a
        :attr:`jpeg2000_margin` may also be that shape grown by the margin on each side
        (what its SIZ marker declares says which; the decode is checked against it), and
        is then cropped to the tile; without a ``shape`` it decodes as declared, uncropped
        (so grids with a margin are decoded with their tiles' shapes).  Raises
        CorruptDataError."""
        from wsicodec.classical import Jpeg2000Codec, JpegXlCodec, jpeg2000_declared_size
        from wsicodec.scannertiles import decode_carried, is_carried

        if is_carried(data):
            return decode_carried(data, shape, name)
        j2k = data[:4] == J2K_SIGNATURE
        m = self.jpeg2000_margin if j2k and shape is not None else 0
        if m and jpeg2000_declared_size(data) != (shape[1] + 2 * m, shape[0] + 2 * m):
            m = 0
        codec = Jpeg2000Codec() if j2k else JpegXlCodec()
        try:
            px = codec.decode(data, shape=None if shape is None else (shape[0] + 2 * m, shape[1] + 2 * m, 3))
        except CorruptDataError as e:
            raise CorruptDataError(f"{name}: {e}") from None
        return crop_margin(px, m)

    def pixel_latents(self, pixels: np.ndarray, toward: Iterable[tuple[int, int]] | None = None):
        """What a tile known only by its pixels (a bare tile) gives its neighbours'
        stitching: g_a's ungained latents of those pixels alone, (1, M, h/16, w/16)
        float32 on the CPU, computed on the codec's device in its precision.  The encoder
        that decides between kinds calls this same function, so what it measures is what
        a reader on the same device shows.

        ``toward``: the directions (dr, dc) of the only neighbours whose stitching will
        read them; g_a then runs over the part of the tile those read
        (:func:`~wsicodec.learned.grid.stitching_crop`) and the rest of the latents is
        zeros, never read.  What those neighbours read is the same either way."""
        import torch

        from .network import pad_to_stride
        net = self.synthesis.model
        h, w = pixels.shape[:2]
        (r0, r1), (c0, c1) = stitching_crop((h, w), toward, SIDE_REACH, PIXEL_STRIDE)
        with torch.inference_mode(), self._g_a_lock:
            x = torch.from_numpy(np.ascontiguousarray(pixels[r0:r1, c0:c1])).permute(2, 0, 1)[None]
            x = pad_to_stride(x.float().div_(255.0), PIXEL_STRIDE).to(self.device)
            y = net.transform(x, self.precision).float().cpu()
        if (r1 - r0, c1 - c0) == (h, w):
            return y.contiguous()
        out = y.new_zeros(1, y.shape[1], -(-h // PIXEL_STRIDE), -(-w // PIXEL_STRIDE))
        top, left = r0 // PIXEL_STRIDE, c0 // PIXEL_STRIDE
        out[..., top:top + y.shape[-2], left:left + y.shape[-1]] = y
        return out

    def synthesize(self, windows: Sequence[Any], boxes: Sequence[Any] | None = None,
                   own_boxes: bool = False, precision: str | None = None) -> list[Any]:
        """Ungained latent windows → uint8 (16h, 16w, 3) pixels, contiguous, or with
        ``boxes`` (each window's (top, left, h, w) or None) only those pixels, computed
        only where they depend on; or the exception of their g_s pass
        (:meth:`Synthesis.run <wsicodec.learned.synthesis.Synthesis.run>`, ``own_boxes``
        and ``precision`` as there: by default this decoder's, the one readers match)."""
        return self.synthesis.run(windows, boxes, own_boxes, precision)

    def warm_up(self) -> None:
        """Build the exact (and float64) h_s and the fast g_s now, not on the first tile,
        and load numba's rANS decoder beside them."""
        load_in_background(encode=False, decode=True)
        self.model.prepare_entropy_parameters()
        s = self.synthesis
        s.model.prepare_synthesis(s.device, precision=s.precision)

    def new_cache(self, tile_size: int, tiles: int, max_bytes: int | None = None) -> LatentCache:
        """A :class:`~wsicodec.learned.synthesis.LatentCache` with room for ``tiles`` tiles
        of ``tile_size`` (between :data:`MIN_CACHE_BYTES` and :data:`MAX_CACHE_BYTES`), or of
        ``max_bytes`` exactly."""
        if max_bytes is None:
            per = 4 * self.model.config.M * (-(-tile_size // PIXEL_STRIDE)) ** 2
            max_bytes = min(MAX_CACHE_BYTES, max(MIN_CACHE_BYTES, tiles * per))
        return LatentCache(max_bytes)

    # ------------------------------------------------------------------ many tiles
    def decode_alone(self, datas: Sequence[bytes], names: Sequence[str] | None = None,
                     shape: tuple[int, ...] | None = None) -> list[np.ndarray]:
        """Tiles each decoded on its own, without its neighbours' latents (a format-3 tile's
        borders are then weak: for checking streams; formats 1-2 were made for it).  g_s
        runs once per group of equal-size latents.

        Raises:
            CorruptDataError: a damaged stream or a symbol-checksum mismatch (names the tile).
            ModelMismatchError: a tile made with other weights.
        """
        names = names or [f"tile {i}" for i in range(len(datas))]
        out: list[Any] = [None] * len(datas)
        jobs = []
        for i, data in enumerate(datas):
            data = bytes(data)
            if self.mixed and data[:4] != MAGIC:
                out[i] = self.bare_pixels(data, shape, names[i])
                continue
            hd = parse_named(data, names[i], shape)
            if hd.kind in GLASS_KINDS:
                out[i] = decode_glass(data, hd, names[i])
                continue
            if hd.kind == KIND_FIXUP:
                inner, px = fixup_parts(data, hd)
                ihd = parse_named(inner, names[i], shape)
                if ihd.kind in NETWORK_KINDS:
                    self.entropy_decode(inner, ihd, names[i])    # its symbols checked too
                out[i] = self.bare_pixels(px, (hd.height, hd.width), names[i])
                continue
            jobs.append((i, data, hd))
        decoded = self.entropy_decode_many([(data, hd, names[i]) for i, data, hd in jobs])
        for y in decoded:
            if isinstance(y, BaseException):
                raise y
        pixels = self.synthesize([self.ungain(y, hd.quality) for y, (_, _, hd) in zip(decoded, jobs)],
                                 [(hd.top, hd.left, hd.height, hd.width) for _, _, hd in jobs])
        for (i, _, hd), x in zip(jobs, pixels):
            if isinstance(x, BaseException):
                raise x
            out[i] = x
        return out

    def prefetch_tiles(self, keys: Sequence[tuple[int, int]], fetch: Callable[[int, int], bytes],
                       grid: tuple[int, int], shape: Shape = None, *,
                       names: Callable[[int, int], str] | None = None,
                       cache: LatentCache | None = None, cache_tag: Hashable = None,
                       run: Run | None = None,
                       check: Callable[[TileHeader, str], None] | None = None) -> None:
        """The latents of those of ``keys`` a stitched tile reads (:meth:`GridJob.prefetch
        <wsicodec.learned.grid.GridJob.prefetch>`) decoded into ``cache`` now, as
        :meth:`decode_tiles` (same arguments) would decode them; nothing without a cache."""
        if cache is not None:
            job = GridJob(self, fetch, names or (lambda c, r: f"tile col={c} row={r}"), shape, check)
            job.prefetch(keys, cache, cache_tag, run or run_serially, grid)

    def decode_tiles(self, keys: Sequence[tuple[int, int]], fetch: Callable[[int, int], bytes],
                     grid: tuple[int, int], shape: Shape = None, *,
                     names: Callable[[int, int], str] | None = None,
                     cache: LatentCache | None = None, cache_tag: Hashable = None,
                     run: Run | None = None,
                     check: Callable[[TileHeader, str], None] | None = None) -> list[Any]:
        """Tiles ``keys`` = [(col, row), ...] of a grid of ``grid`` = (cols, rows) tiles,
        each stitched tile decoded with its neighbours' latents; the contract of
        :meth:`wsicodec.codecs.TileCodec.decode_tiles` (``shape`` may also be each tile's,
        ``shape(col, row)``: :data:`~wsicodec.learned.grid.Shape`).  ``cache`` keeps decoded latents
        between calls, keyed ``(cache_tag, col, row)``; ``check(header, name)``, when
        given, vets every tile's header as it is loaded (raising fails that tile)."""
        job = GridJob(self, fetch, names or (lambda c, r: f"tile col={c} row={r}"), shape, check)
        out: list[Any] = [None] * len(keys)
        stitched, alone = job.sort(keys, out, grid)
        lat, own = job.latents(job.neighbourhood(keys, stitched, grid), [keys[n] for n in alone],
                               cache, cache_tag, run or run_serially, grid)
        windows, where, second = [], [], {}
        for n in stitched:
            win = job.window(keys[n], lat)
            if isinstance(win, BaseException):
                out[n] = win
                continue
            hd = job.got[keys[n]][1]
            edges = job.glass_edges(keys[n], grid)
            sides = job.bare_sides(keys[n], grid)
            if sides:
                second[n] = sides
                if hd.kind == KIND_NETWORK_MIXED:        # drawn toward them too
                    edges.update(bare_edges(sides, hd.height, hd.width))
            windows.append(win[0])
            where.append((n, win[1], win[2], hd.height, hd.width, edges))
        for n in alone:
            r = own.get(keys[n])
            if isinstance(r, BaseException):
                out[n] = r
                continue
            hd = job.got[keys[n]][1]
            windows.append(r)
            where.append((n, hd.top, hd.left, hd.height, hd.width, {}))
        if windows:
            try:
                pixels = self.synthesize(windows, [w[1:5] for w in where])
            except Exception as e:  # noqa: BLE001 - every tile of the pass fails with it
                pixels = [e] * len(windows)
            again, places = [], []
            for (n, *_, edges), x in zip(where, pixels):
                if n in second and not isinstance(x, BaseException):     # beside a bare tile
                    again.append((lat[keys[n]], job.around(keys[n], lat), x, second[n]))
                    places.append((n, edges))
                    continue
                out[n] = x if isinstance(x, BaseException) else blend_toward_glass(x, edges)
            for (n, edges), x in zip(places, second_pass(self, again)):
                out[n] = x if isinstance(x, BaseException) else blend_toward_glass(x, edges)
        return out


# LatentCache, Synthesis, stitch_window, STITCH_RING (synthesis.py), GridJob, glass_edges,
# KIND_BARE (once KIND_JPEGXL), JXL_SIGNATURES (grid.py): re-exported where they were first imported from
__all__ = ["JXL_SIGNATURES", "KIND_BARE", "MAX_CACHE_BYTES", "MIN_CACHE_BYTES", "SIDE_CONTEXT",
           "STITCH_RING", "GridJob", "LatentCache", "Synthesis", "TileDecoder", "channel_index",
           "glass_edges", "stitch_window"]
