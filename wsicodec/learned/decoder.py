"""Decoding learned tiles: entropy decoding, exact h_s, stitching, g_s, the latent cache.

::

    decode_tiles(keys, fetch, grid)
      │ each tile's header (fetch + parse_header); glass tiles decoded at once
      ▼ stitched (format 3) tiles and their 8 neighbours
    LatentCache ──hit──► latents          (a tile another caller decodes is waited for)
      │ miss
      ▼ on the caller's threads (``run``)
    entropy_decode: z symbols (rANS) ─► exact h_s (μ, table index) ─► y symbols (rANS)
                    ─► CRC of the symbols ─► ŷ_q (κ-reconstructed) ─► ÷ gain = latents
      ▼
    stitch_window: a tile's latents with STITCH_RING rows/columns of each neighbour's
      ▼
    Synthesis: g_s passes on the codec's device, ≤ max_batch equal shapes at a time,
               shared by every caller of one codec ─► pixels, cropped to each tile

Seams: a format-3 tile codes exactly its own latents (16-px cells), computed by g_a with
its neighbours' pixels around it, so g_s over its latents joined with its neighbours'
gives the borders a decode of the whole plane would.  A glass neighbour gives g_a's
latent of its colour (:func:`~wsicodec.learned.glass.uniform_latent`); a damaged one only
costs that side its stitching.  Beside a plane glass neighbour (kind 3) a stitched tile's
pixels near the border are drawn toward the plane's edge where they are near its colour
(:func:`~wsicodec.learned.glass.blend_toward_glass`), so the tile grid does not show on
the background; a flat (kind 1) neighbour leaves them as g_s made them.  Formats 1 and 2
(legacy, :mod:`~wsicodec.learned.tileformat`) are decoded each on its own
(:meth:`TileDecoder.decode_alone`), as they were written; so is any tile by
:meth:`~wsicodec.learned.codec.LearnedCodec.decode`, which is for checking streams: a
format-3 tile alone has the right symbols but weak borders (``bench/seams.py``,
``bench/results/``).

The entropy parameters are always computed on the CPU (exact integer arithmetic from
format 2 on: the same bits on any machine); a mismatch of the symbols' CRC is an error
naming the tile, never silent garbage.  g_s may run on any device.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, wait
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from wsicodec.codecs import Run, run_serially
from wsicodec.entropy import decode_symbols, symbol_checksum
from wsicodec.errors import CorruptDataError, ModelMismatchError
from wsicodec.lru import ByteLRU

from .glass import SIDES, blend_toward_glass, decode_glass, plane_edge, uniform_colour, uniform_latent
from .tileformat import (GLASS_KINDS, KIND_FIXUP, KIND_NETWORK, KIND_PLANE, LATENT_STRIDE, MAGIC,
                         PIXEL_STRIDE, TileHeader, ceil_to, exact_entropy, fixup_parts, parse_named)

#: the kind :class:`TileDecoder` gives a JPEG-XL tile of a mixed grid (not a learned tile)
KIND_JPEGXL = -1
#: first bytes of a JPEG-XL codestream and of a JPEG-XL container
JXL_SIGNATURES = (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")

#: latent rows/columns of each neighbour joined to a stitched tile before g_s (16 px each)
STITCH_RING = 2
#: pixels of a stitched tile's first pass that g_a sees beside a JPEG-XL neighbour in its
#: second pass (:meth:`TileDecoder.side_latents`)
SIDE_CONTEXT = 64
#: the learned codec's latent caches: at least this many bytes ...
MIN_CACHE_BYTES = 16 * 1024 * 1024
#: ... and at most this many, unless asked for explicitly
MAX_CACHE_BYTES = 256 * 1024 * 1024


def channel_index(shape: Sequence[int]) -> np.ndarray:
    """The CDF-table index of every z symbol of a (C, h, w) plane: its channel."""
    c = shape[0]
    return np.broadcast_to(np.arange(c, dtype=np.int32).reshape(c, 1, 1), tuple(shape))


class LatentCache(ByteLRU):
    """A thread-safe LRU of decoded tile latents (torch tensors), bounded in bytes:
    what lets :meth:`TileDecoder.decode_tiles` entropy-decode each tile once when its
    neighbours are decoded later, and, shared by concurrent callers (a tile server's
    requests for neighbouring tiles), once while they run: a tile one caller is
    decoding is waited for by the others (:meth:`begin`, :meth:`settle`)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max(0, int(max_bytes)))
        self._inflight: dict[Hashable, Future] = {}

    def size_of(self, item: Any) -> int:
        return item.element_size() * item.nelement()

    def begin(self, key: Hashable) -> Any:
        """The cached latents; or a Future another caller will :meth:`settle` (its
        result: the latents, None or the exception); or None: the caller decodes the
        tile and must :meth:`settle` it, success or not."""
        with self._lock:
            item = self._lookup(key)
            if item is not None:
                return item
            fut = self._inflight.get(key)
            if fut is not None:
                return fut
            self._inflight[key] = Future()
            return None

    def settle(self, key: Hashable, result: Any) -> None:
        """The outcome of a tile :meth:`begin` gave the caller: cached if latents, and
        handed to every caller waiting for it."""
        import torch
        if isinstance(result, torch.Tensor):
            self.put(key, result)
        with self._lock:
            fut = self._inflight.pop(key, None)
        if fut is not None:
            fut.set_result(result)


class Synthesis:
    """g_s passes, one at a time, over the latent windows of every caller waiting
    (leader/follower): a caller queues its windows and tries to lead; the leader runs
    passes of up to ``max_batch`` equal-shape windows from the queue, in queue order,
    until its own are done; callers that find a leader wait, retrying to lead now and
    then, so none is stranded.  One caller alone gets its windows grouped by shape in
    order of first appearance, ``max_batch`` at a time."""

    def __init__(self, model: Any, device: Any, max_batch: int, precision: str) -> None:
        self.model, self.device, self.max_batch, self.precision = model, device, max_batch, precision
        self._lock = threading.Lock()
        self._queue: list[tuple[Any, Future]] = []
        self._busy = False
        self.passes = 0

    def run(self, windows: Sequence[Any]) -> list[Any]:
        """Ungained latent windows (1, M, h, w) float32 → x̂ (16h, 16w, 3) uint8
        (uncropped), or the exception of its pass."""
        futures = [Future() for _ in windows]
        with self._lock:
            self._queue.extend((y, f) for y, f in zip(windows, futures))
        pending = set(futures)
        while pending:
            self._lead(pending)
            pending = wait(pending, timeout=0.005).not_done
        out = []
        for f in futures:
            e = f.exception()
            out.append(e if e is not None else f.result())
        return out

    def _lead(self, mine: set) -> None:
        with self._lock:
            if self._busy:
                return
            self._busy = True
        try:
            while True:
                with self._lock:
                    if not self._queue or all(f.done() for f in mine):
                        return
                    shape = tuple(self._queue[0][0].shape)
                    batch = [it for it in self._queue if tuple(it[0].shape) == shape]
                    batch = batch[:self.max_batch]
                    taken = {id(it[1]) for it in batch}
                    self._queue = [it for it in self._queue if id(it[1]) not in taken]
                self._pass(batch)
        finally:
            with self._lock:
                self._busy = False

    def _pass(self, batch: list[tuple[Any, Future]]) -> None:
        import torch

        try:
            with torch.inference_mode():
                y = torch.cat([it[0] for it in batch]).to(self.device)
                x_hat = self.model.synthesize(y, self.precision).clamp_(0, 1).mul_(255).round_()
                x_hat = x_hat.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            self.passes += 1
        except Exception as e:  # noqa: BLE001 - every tile of the pass fails with it
            for it in batch:
                it[1].set_exception(e)
            return
        for k, it in enumerate(batch):
            it[1].set_result(x_hat[k])


def stitch_window(centre, around: dict, ring: int = STITCH_RING):
    """A stitched tile's g_s input: its latents ``centre`` (1, M, h, w) with up to ``ring``
    rows/columns of each neighbour in ``around`` ((dr, dc) → (1, M, h', w') or None,
    dr, dc in −1..1) joined on.  A missing side (the plane's edge, a damaged or
    format-2 neighbour) is left off; a missing corner next to present sides is zeros,
    as g_s's own padding.  Returns (window, top, left): where the tile's pixels start.
    """
    import torch
    _, c, h, w = centre.shape

    def side(d: tuple[int, int], axis: int, size: int) -> int:
        t = around.get(d)
        if t is None or t.shape[1] != c or t.shape[-1 - axis] != size:
            return 0
        return min(ring, t.shape[-2 + axis])

    rt, rb = side((-1, 0), 0, w), side((1, 0), 0, w)
    cl, cr = side((0, -1), 1, h), side((0, 1), 1, h)
    if not (rt or rb or cl or cr):
        return centre, 0, 0
    win = torch.zeros(1, c, rt + h + rb, cl + w + cr, dtype=centre.dtype)
    win[..., rt:rt + h, cl:cl + w] = centre
    if rt:
        win[..., :rt, cl:cl + w] = around[(-1, 0)][..., -rt:, :]
    if rb:
        win[..., rt + h:, cl:cl + w] = around[(1, 0)][..., :rb, :]
    if cl:
        win[..., rt:rt + h, :cl] = around[(0, -1)][..., :, -cl:]
    if cr:
        win[..., rt:rt + h, cl + w:] = around[(0, 1)][..., :, :cr]
    for dr, dc in ((-1, -1), (-1, 1), (1, -1), (1, 1)):
        nr, nc = (rt if dr < 0 else rb), (cl if dc < 0 else cr)
        t = around.get((dr, dc))
        if not (nr and nc) or t is None or t.shape[1] != c or t.shape[-2] < nr or t.shape[-1] < nc:
            continue
        ys = slice(0, nr) if dr < 0 else slice(rt + h, rt + h + nr)
        xs = slice(0, nc) if dc < 0 else slice(cl + w, cl + w + nc)
        win[..., ys, xs] = t[..., (slice(-nr, None) if dr < 0 else slice(0, nr)),
                             (slice(-nc, None) if dc < 0 else slice(0, nc))]
    return win, rt * PIXEL_STRIDE, cl * PIXEL_STRIDE


class TileDecoder:
    """The decoding half of a learned codec: its weights' tables, h_s on the CPU, g_s on
    ``device`` in ``precision``, at most ``max_batch`` windows per g_s pass.  Thread-safe.

    Its steps are public so that a benchmark can time them one by one
    (:meth:`decode_z`, :meth:`hyper_parameters`, :meth:`decode_y`, :meth:`latents`,
    :func:`stitch_window`, :meth:`synthesize`); :meth:`decode_tiles` is them together.
    """

    def __init__(self, loaded: Any, device: Any, precision: str, max_batch: int,
                 mixed: bool = False) -> None:
        self.loaded = loaded
        self.model = loaded.model                      # the entropy parameters: on the CPU
        self.tables = self.model.coding_tables()
        self.synthesis = Synthesis(loaded.on(device), device, max_batch, precision)
        self.device, self.precision = device, precision
        #: whether a grid may also hold bare JPEG-XL tiles (the ``auto`` codec's)
        self.mixed = mixed
        self._g_a_lock = threading.Lock()

    # ------------------------------------------------------------- one tile's steps
    def check_model(self, hd: TileHeader, name: str) -> None:
        """ModelMismatchError unless the tile was made with weights these decode."""
        if not self.loaded.decodes(hd.model_prefix.hex()):
            raise ModelMismatchError(
                f"{name} was coded with model {hd.model_prefix.hex()}..., but the loaded model is "
                f"{self.loaded.model_id[:16]}...; open it with the same weights")

    def decode_z(self, data: bytes, hd: TileHeader) -> np.ndarray:
        """A network tile's z symbols (N, h, w) int32 (rANS over the factorized prior)."""
        yh, yw = hd.latent_size
        zshape = (self.model.config.N, ceil_to(yh, LATENT_STRIDE) // 4, ceil_to(yw, LATENT_STRIDE) // 4)
        return decode_symbols(data[hd.payload:hd.payload + hd.z_len], channel_index(zshape), self.tables[0])

    def hyper_parameters(self, zs: np.ndarray, hd: TileHeader):
        """(μ float64, table index int32), (1, M, h, w), from the z symbols, exactly as the
        encoder computed them for this tile's format (on the CPU)."""
        import torch
        m = self.model
        medians = m.entropy_bottleneck._get_medians().reshape(1, -1, 1, 1).double()
        z_hat = torch.from_numpy(zs)[None].double() + medians
        return m.entropy_parameters(z_hat, torch.tensor([hd.quality]),
                                    exact=exact_entropy(hd.version), size=hd.latent_size)

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
        import torch
        self.check_model(hd, name)
        zs = self.decode_z(data, hd)
        mu, index = self.hyper_parameters(zs, hd)
        ys = self.decode_y(data, hd, index)
        if symbol_checksum(zs, ys) != hd.crc:
            raise CorruptDataError(
                f"{name}: decoded symbols fail their checksum (damaged stream, or entropy "
                f"parameters computed differently than at encode time)")
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

    def jpegxl_pixels(self, data: bytes, shape: tuple[int, ...] | None, name: str) -> np.ndarray:
        """The pixels of a JPEG-XL codestream (a bare JPEG-XL tile of a mixed grid, or a
        fix-up tile's tail), checked against ``shape``.  Raises CorruptDataError."""
        from wsicodec.classical import JpegXlCodec

        try:
            return JpegXlCodec().decode(data, shape=None if shape is None else tuple(shape[:2]) + (3,))
        except CorruptDataError as e:
            raise CorruptDataError(f"{name}: {e}") from None

    def pixel_latents(self, pixels: np.ndarray):
        """What a tile known only by its pixels (a JPEG-XL tile) gives its neighbours'
        stitching: g_a's ungained latents of those pixels alone, (1, M, h/16, w/16)
        float32 on the CPU, computed on the codec's device in its precision.  The encoder
        that decides between kinds calls this same function, so what it measures is what
        a reader on the same device shows."""
        import torch

        from .network import pad_to_stride
        net = self.synthesis.model
        with torch.inference_mode(), self._g_a_lock:
            x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]
            x = pad_to_stride(x.float().div_(255.0), PIXEL_STRIDE).to(self.device)
            y = net.transform(x, self.precision)
        return y.float().cpu().contiguous()

    def side_latents(self, first: np.ndarray, side: tuple[int, int], jxl: np.ndarray) -> Any:
        """What a JPEG-XL neighbour on ``side`` ((dr, dc), one of the four sides) gives a
        stitched tile's second pass: g_a over the neighbour's pixels ``jxl`` joined to the
        :data:`SIDE_CONTEXT` px of the tile's first-pass pixels ``first`` nearest it, the
        neighbour's part only, or None when their sides do not match.  g_a of the
        neighbour alone (:meth:`pixel_latents`) has no context at the very edge the tile
        joins, which shows as a seam (``bench/seams.py``, mixed rows); this gives it the
        tile's own first guess of it."""
        dr, dc = side
        axis = 1 if dc else 0
        if first.shape[1 - axis] != jxl.shape[1 - axis]:
            return None
        s = min(SIDE_CONTEXT, first.shape[axis] // PIXEL_STRIDE * PIXEL_STRIDE)
        if s == 0:
            return None
        n = -(-jxl.shape[axis] // PIXEL_STRIDE)
        if dr + dc > 0:                                     # below / right: tile first
            part = first[-s:] if axis == 0 else first[:, -s:]
            y = self.pixel_latents(np.concatenate([part, jxl], axis))
            return y[..., s // PIXEL_STRIDE:, :] if axis == 0 else y[..., s // PIXEL_STRIDE:]
        part = first[:s] if axis == 0 else first[:, :s]
        y = self.pixel_latents(np.concatenate([jxl, part], axis))
        return y[..., :n, :] if axis == 0 else y[..., :n]

    def second_window(self, centre: Any, around: dict, first: np.ndarray, jxl_sides: dict):
        """A stitched tile's window for its second pass: ``around`` with each JPEG-XL side
        in ``jxl_sides`` ((dr, dc) → its pixels) given :meth:`side_latents` from the first
        pass's pixels ``first``.  Returns (window, top, left) as :func:`stitch_window`."""
        around = dict(around)
        for side, px in jxl_sides.items():
            lat = self.side_latents(first, side, px)
            if lat is not None:
                around[side] = lat
        return stitch_window(centre, around, STITCH_RING)

    def synthesize(self, windows: Sequence[Any]) -> list[Any]:
        """Ungained latent windows → uint8 (16h, 16w, 3) pixels, uncropped, or the
        exception of their g_s pass (:class:`Synthesis`)."""
        return self.synthesis.run(windows)

    def warm_up(self) -> None:
        """Build the exact (and float64) h_s and the fast g_s now, not on the first tile."""
        self.model.prepare_entropy_parameters()
        s = self.synthesis
        s.model.prepare_synthesis(s.device, precision=s.precision)

    def new_cache(self, tile_size: int, tiles: int, max_bytes: int | None = None) -> LatentCache:
        """A :class:`LatentCache` with room for ``tiles`` tiles of ``tile_size`` (between
        :data:`MIN_CACHE_BYTES` and :data:`MAX_CACHE_BYTES`), or of ``max_bytes`` exactly."""
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
                out[i] = self.jpegxl_pixels(data, shape, names[i])
                continue
            hd = parse_named(data, names[i], shape)
            if hd.kind in GLASS_KINDS:
                out[i] = decode_glass(data, hd, names[i])
                continue
            if hd.kind == KIND_FIXUP:
                inner, px = fixup_parts(data, hd)
                ihd = parse_named(inner, names[i], shape)
                if ihd.kind == KIND_NETWORK:
                    self.entropy_decode(inner, ihd, names[i])    # its symbols checked too
                out[i] = self.jpegxl_pixels(px, (hd.height, hd.width), names[i])
                continue
            jobs.append((i, self.ungain(self.entropy_decode(data, hd, names[i]), hd.quality), hd))
        pixels = self.synthesize([y for _, y, _ in jobs])
        for (i, _, hd), x in zip(jobs, pixels):
            if isinstance(x, BaseException):
                raise x
            out[i] = _crop(x, hd.top, hd.left, hd.height, hd.width)
        return out

    def decode_tiles(self, keys: Sequence[tuple[int, int]], fetch: Callable[[int, int], bytes],
                     grid: tuple[int, int], shape: tuple[int, ...] | None = None, *,
                     names: Callable[[int, int], str] | None = None,
                     cache: LatentCache | None = None, cache_tag: Hashable = None,
                     run: Run | None = None,
                     check: Callable[[TileHeader, str], None] | None = None) -> list[Any]:
        """Tiles ``keys`` = [(col, row), ...] of a grid of ``grid`` = (cols, rows) tiles,
        each stitched tile decoded with its neighbours' latents; the contract of
        :meth:`wsicodec.codecs.TileCodec.decode_tiles`.  ``cache`` keeps decoded latents
        between calls, keyed ``(cache_tag, col, row)``; ``check(header, name)``, when
        given, vets every tile's header as it is loaded (raising fails that tile)."""
        job = _GridJob(self, fetch, names or (lambda c, r: f"tile col={c} row={r}"), shape, check)
        out: list[Any] = [None] * len(keys)
        stitched, alone = job.sort(keys, out, grid)
        lat, own = job.latents(job.neighbourhood(keys, stitched, grid), [keys[n] for n in alone],
                               cache, cache_tag, run or run_serially)
        windows, where, second = [], [], {}
        for n in stitched:
            win = job.window(keys[n], lat)
            if isinstance(win, BaseException):
                out[n] = win
                continue
            hd = job.got[keys[n]][1]
            windows.append(win[0])
            where.append((n, win[1], win[2], hd.height, hd.width, job.glass_edges(keys[n], grid)))
            sides = job.jpegxl_sides(keys[n], grid)
            if sides:
                second[n] = sides
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
                pixels = self.synthesize(windows)
            except Exception as e:  # noqa: BLE001 - every tile of the pass fails with it
                pixels = [e] * len(windows)
            again, places = [], []
            for (n, top, left, h, w, edges), x in zip(where, pixels):
                if n in second and not isinstance(x, BaseException):     # beside JPEG-XL
                    key = keys[n]
                    win = self.second_window(lat[key], job.around(key, lat), _crop(x, top, left, h, w),
                                             second[n])
                    again.append(win[0])
                    places.append((n, win[1], win[2], h, w, edges))
                    continue
                out[n] = x if isinstance(x, BaseException) else blend_toward_glass(
                    _crop(x, top, left, h, w), edges)
            if again:
                try:
                    pixels = self.synthesize(again)
                except Exception as e:  # noqa: BLE001
                    pixels = [e] * len(again)
                for (n, top, left, h, w, edges), x in zip(places, pixels):
                    out[n] = x if isinstance(x, BaseException) else blend_toward_glass(
                        _crop(x, top, left, h, w), edges)
        return out


def glass_edges(hd: TileHeader, around: dict, name: Callable[[tuple[int, int]], str]) -> dict:
    """The edge colours of the plane glass tiles among a tile's side neighbours ``around``
    ((dr, dc) → (bytes, header) of what each shows its neighbours), keyed by side, for
    :func:`~wsicodec.learned.glass.blend_toward_glass`; ``hd``: the tile's header.  A
    neighbour whose edge does not match the tile's side, or is damaged, is left out.
    Readers and the ``auto`` encoder's measurement both call this."""
    edges = {}
    for (dr, dc), (data, nhd) in around.items():
        same = (nhd.width == hd.width) if dr else (nhd.height == hd.height)
        if nhd.kind != KIND_PLANE or not same:
            continue
        try:
            edges[(dr, dc)] = plane_edge(data, nhd, (-dr, -dc), name((dr, dc)))
        except Exception:  # noqa: BLE001 - a damaged neighbour only costs that side
            continue
    return edges


def _crop(x: np.ndarray, top: int, left: int, h: int, w: int) -> np.ndarray:
    return np.ascontiguousarray(x[top:top + h, left:left + w])


class _GridJob:
    """One :meth:`TileDecoder.decode_tiles` call: the bytes and headers it fetched
    (fetched in the calling thread: stores need not be thread-safe), and its steps."""

    def __init__(self, decoder: TileDecoder, fetch: Callable[[int, int], bytes],
                 names: Callable[[int, int], str], shape: tuple[int, ...] | None,
                 check: Callable[[TileHeader, str], None] | None = None) -> None:
        self.decoder, self.fetch, self.names, self.shape = decoder, fetch, names, shape
        self.check = check
        self.got: dict[tuple[int, int], tuple[bytes, TileHeader]] = {}
        #: pixels of the tiles that have them without g_s (JPEG-XL and fix-up tiles)
        self.pixels: dict[tuple[int, int], np.ndarray] = {}
        #: the JPEG-XL codestreams of the fix-up tiles (``got`` holds their inner tiles)
        self.fixups: dict[tuple[int, int], bytes] = {}

    def load(self, key: tuple[int, int]) -> tuple[bytes, TileHeader]:
        if key not in self.got:
            data = bytes(self.fetch(*key))
            if self.decoder.mixed and data[:4] != MAGIC:
                if not data.startswith(JXL_SIGNATURES):
                    raise CorruptDataError(f"{self.names(*key)}: neither a learned nor a JPEG-XL tile")
                px = self.decoder.jpegxl_pixels(data, self.shape, self.names(*key))
                self.pixels[key] = px
                self.got[key] = (data, TileHeader(KIND_JPEGXL, px.shape[0], px.shape[1]))
                return self.got[key]
            hd = parse_named(data, self.names(*key), self.shape)
            if hd.kind == KIND_FIXUP:       # its own pixels; to its neighbours, its inner tile
                data, self.fixups[key] = fixup_parts(data, hd)
                hd = parse_named(data, self.names(*key), self.shape)
            if self.check is not None:
                self.check(hd, self.names(*key))
            self.got[key] = (data, hd)
        return self.got[key]

    def sort(self, keys: Sequence[tuple[int, int]], out: list,
             grid: tuple[int, int]) -> tuple[list[int], list[int]]:
        """Glass tiles decoded into ``out`` (a plane drawn toward its plane neighbours,
        ``grid``: (cols, rows)), failures put there; returns the indexes of the stitched
        tiles and of those decoded alone (formats 1-2)."""
        stitched, alone = [], []
        for n, key in enumerate(keys):
            try:
                data, hd = self.load(key)
                if key in self.fixups:
                    out[n] = self.fixup_pixels(key)
                elif hd.kind in GLASS_KINDS:
                    around = self.glass_edges(key, grid) if hd.kind == KIND_PLANE else None
                    out[n] = decode_glass(data, hd, self.names(*key), around)
                elif hd.kind == KIND_JPEGXL:
                    out[n] = self.pixels[key]
                elif hd.stitched:
                    stitched.append(n)
                else:
                    alone.append(n)
            except Exception as e:  # noqa: BLE001 - kept per tile
                out[n] = e
        return stitched, alone

    def fixup_pixels(self, key: tuple[int, int]) -> np.ndarray:
        """A fix-up tile's own pixels (its JPEG-XL codestream).  Its inner tile is checked
        when a neighbour needs its latents, as any tile's."""
        if key not in self.pixels:
            hd = self.got[key][1]
            self.pixels[key] = self.decoder.jpegxl_pixels(self.fixups[key], (hd.height, hd.width),
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
        for dr, dc in SIDES:
            nb = (col + dc, row + dr)
            if not (0 <= nb[0] < grid[0] and 0 <= nb[1] < grid[1]):
                continue
            try:
                around[(dr, dc)] = self.load(nb)
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

    def latents(self, need: list, alone: list, cache: LatentCache | None, tag: Hashable,
                run: Run) -> tuple[dict, dict]:
        """(latents of the tiles ``need`` by key: a tensor, None or the exception, from
        ``cache``, from another caller decoding them, or decoded here; the own latents of
        the format-1/2 tiles ``alone``, by key)."""
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
            own = self._decode(todo, lat, alone, run)
        finally:                  # whatever happened, callers waiting on our keys get an answer
            if cache is not None:
                for key in todo:
                    cache.settle((tag, *key),
                                 lat.get(key, CorruptDataError(f"{self.names(*key)}: not decoded")))
        for key, fut in waits.items():
            lat[key] = fut.result()
        return lat, own

    def _decode(self, todo: list, lat: dict, alone: list, run: Run) -> dict:
        """The entropy work: latents of ``todo`` into ``lat``; returns those of ``alone``."""
        for key in todo:          # bytes first, in this thread
            try:
                self.load(key)
            except Exception as e:  # noqa: BLE001
                lat[key] = e
        dec = self.decoder

        def entropy(job: tuple[str, Any]) -> Any:
            kind, key = job
            try:
                data, hd = self.got[key]
                if kind == "alone":
                    return dec.ungain(dec.entropy_decode(data, hd, self.names(*key)), hd.quality)
                if hd.kind == KIND_JPEGXL:
                    return dec.pixel_latents(self.pixels[key])
                return dec.latents(data, hd, self.names(*key))
            except Exception as e:  # noqa: BLE001 - kept per tile
                return e

        jobs = [("latent", k) for k in todo if k not in lat] + [("alone", k) for k in alone]
        own = {}
        for (kind, key), r in zip(jobs, run(entropy, jobs)):
            if kind == "alone":
                own[key] = r
            else:
                lat[key] = r
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

    def jpegxl_sides(self, key: tuple[int, int], grid: tuple[int, int]) -> dict:
        """The pixels of the bare JPEG-XL tiles beside ``key`` (side → pixels), for its
        second pass (:meth:`TileDecoder.second_window`); a neighbour that fails to load is
        left out (that side keeps its first-pass latents, or none)."""
        if not self.decoder.mixed:
            return {}
        col, row = key
        sides = {}
        for dr, dc in SIDES:
            nb = (col + dc, row + dr)
            if not (0 <= nb[0] < grid[0] and 0 <= nb[1] < grid[1]):
                continue
            try:
                if self.load(nb)[1].kind == KIND_JPEGXL:
                    sides[(dr, dc)] = self.pixels[nb]
            except Exception:  # noqa: BLE001 - a damaged neighbour only costs that side
                continue
        return sides
