"""The ``learned`` tile codec: the hyperprior network plus rANS bitstreams.

Tile bitstream (little-endian)::

    offset size  field
    0      4     magic b"WSLT"
    4      1     format version: 3; 2 and 1 are still read (see "Seams" and below)
    5      1     kind: 0 = network-coded, 1 = uniform background
    6      2     height
    8      2     width
    -- kind 1 (uniform): 3 bytes R, G, B, u16 count, then per outlier pixel
       u16 row, u16 col, 3 bytes R, G, B (kept exactly)          (15 bytes + 7 per outlier)
    -- kind 0 (network):
    10     4     quality (float32)
    14     8     first 8 bytes of the model's sha256
    22     4     CRC-32 of the decoded symbols (ẑ then ŷ, int32)
    26     4     length of the z stream
    30     1+1   top, left: where the tile sits inside the coded region (format 3: 0, 0)
    32     2+2   height, width of the coded region (format 3: the tile's, rounded up to 16;
                 format 2: the tile plus the context margin it was coded with)
    36     ...   z stream (factorized prior), then y stream (Gaussian, μ/σ from h_s(ẑ))

Seams (format 3, "stitched" tiles): a tile codes exactly its own latents, y of the
tile's 16-pixel cells, but the encoder computes them with g_a over the tile plus
:attr:`LearnedCodec.margin` pixels of its neighbours (16 by default), so they are the
latents a whole-image g_a would give there.  The decoder entropy-decodes each tile
alone (random access: bytes, symbols and checksum of one tile need no other tile),
then runs g_s over the tile's latents joined with :data:`STITCH_RING` latent rows and
columns of its eight neighbours (:func:`stitch_window`, :func:`decode_tiles`), so the
pixels at a tile's border come out as from a decode of the whole plane: no grid, and
no pixels coded twice.  A glass neighbour (kind 1) has no latents; its place is taken
by g_a's latent of its colour (:func:`uniform_latent`).  A format-3 tile
decoded without its neighbours (:meth:`LearnedCodec.decode_batch`) has the right
symbols, but its border latents describe pixels g_s then cannot see on both sides: at
quality 4 on he/test, 20.3 dB within 4 px of its edges against 32.3 stitched (29.5 dB
over the image against 32.3).  That path is for checking streams; every reader
(container, slide, server, :func:`wsicodec.decode`) stitches.  Format 2 (written until
2026-11-28) coded each tile with an 8-pixel margin of its neighbours' pixels and cropped
it back out: about 10 % more bytes for the same pixels (bench/README.md, "Stitched tiles").

Decoding recomputes μ and the CDF-table indexes from ẑ with
:meth:`WsiHyperprior.entropy_parameters` and checks the symbol CRC, so a mismatch is
an error naming the tile, never silent garbage.  Format 2 computes them in integer
arithmetic (:class:`~wsicodec.model.ExactHyperSynthesis`): the same bits on any CPU,
BLAS or thread count, so a tile written on one machine decodes on every other.
Format 1 (written until 2026-11-28) computed them with h_s in float64, one tile at a
time, deterministic on one machine; it is still read that way.  g_s may run batched
on any device.
"""

from __future__ import annotations

import os
import struct
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from .codecs import as_number, check_precision
from .entropy import CdfTables, decode_symbols, encode_symbols, symbol_checksum
from .errors import CorruptDataError, InvalidSettingError, ModelMismatchError
from .lru import ByteLRU
from .model import pad_to_stride

MAGIC = b"WSLT"
VERSION = 3
#: tile formats this release reads: 3 stitched; 2 margin-coded; 1 as 2 with the entropy
#: parameters in float64
READ_VERSIONS = (1, 2, 3)
#: first format whose network tiles are decoded with their neighbours' latents
STITCH_VERSION = 3
KIND_NETWORK, KIND_UNIFORM = 0, 1
_HEAD = struct.Struct("<4sBBHH")          # magic, version, kind, h, w
_NET = struct.Struct("<f8sIIBBHH")       # quality, model id, symbol crc, len(z), top, left, coded h, w
#: bytes of a network-coded tile before its z and y streams
NETWORK_HEADER_BYTES = _HEAD.size + _NET.size
#: image side must be a multiple of this for g_a (four stride-2 layers)
PIXEL_STRIDE = 16
#: y side must be a multiple of this for h_a (two stride-2 layers)
LATENT_STRIDE = 4
QUALITY_RANGE = (1.0, 8.0)
#: most encoder refinement steps a codec accepts (each costs about four g_s passes)
MAX_REFINE = 1000
#: pixels of neighbouring context g_a sees around each tile (see "Seams" above); a
#: multiple of 16 keeps the tile on y's grid, and 16 gives the same bytes and PSNR as 32
#: on he/test (bench/README.md, "Stitched tiles")
DEFAULT_MARGIN = 16
#: options of this machine, not of the data: :func:`~wsicodec.codecs.codec_from_dict`
#: never takes them from a container (a stored ``model`` path is ignored)
LOCAL_OPTIONS = ("model", "device", "precision")
#: latent rows/columns of each neighbour joined to a stitched tile before g_s (16 px each)
STITCH_RING = 2

#: Background rule: a tile is coded as its mean colour when every pixel but at most
#: UNIFORM_MAX_OUTLIERS stays within ±UNIFORM_MAX_DEV of that mean in every channel
#: and the channel std of those pixels is under UNIFORM_MAX_STD.  The outliers
#: (dust, specks) are stored exactly, so no pixel is ever off by more than
#: UNIFORM_MAX_DEV levels.  A tile with tissue has thousands of stained pixels.
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


def _encode_uniform(tile: np.ndarray, rgb: np.ndarray, outliers: np.ndarray) -> bytes:
    h, w = tile.shape[:2]
    parts = [_HEAD.pack(MAGIC, VERSION, KIND_UNIFORM, h, w), rgb.tobytes(), struct.pack("<H", len(outliers))]
    for r, c in outliers:
        parts.append(struct.pack("<HH", r, c) + tile[r, c].tobytes())
    return b"".join(parts)


def _decode_uniform(data: bytes, hd: "TileHeader") -> np.ndarray:
    out = np.empty((hd.height, hd.width, 3), np.uint8)
    out[:] = np.frombuffer(data, np.uint8, 3, hd.payload)
    (n,) = struct.unpack_from("<H", data, hd.payload + 3)
    if len(data) != hd.payload + 5 + 7 * n:
        raise CorruptDataError("uniform tile has the wrong length")
    pos = hd.payload + 5
    for _ in range(n):
        r, c = struct.unpack_from("<HH", data, pos)
        if r >= hd.height or c >= hd.width:
            raise CorruptDataError("uniform tile outlier outside the tile")
        out[r, c] = np.frombuffer(data, np.uint8, 3, pos + 4)
        pos += 7
    return out


@dataclass(frozen=True)
class TileHeader:
    kind: int
    height: int
    width: int
    quality: float = 0.0
    model_prefix: bytes = b""
    crc: int = 0
    z_len: int = 0
    top: int = 0
    left: int = 0
    coded_height: int = 0
    coded_width: int = 0
    payload: int = 0                     #: offset of the payload
    version: int = VERSION               #: tile format (1: float64 entropy parameters)


def parse_header(data: bytes) -> TileHeader:
    """Parse and validate a tile header. Raises CorruptDataError."""
    if len(data) < _HEAD.size:
        raise CorruptDataError(f"learned tile truncated ({len(data)} bytes)")
    magic, ver, kind, h, w = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise CorruptDataError("not a learned tile (bad magic)")
    if ver not in READ_VERSIONS:
        raise CorruptDataError(f"learned tile format version {ver} is not supported (this wsicodec "
                               f"reads {', '.join(map(str, READ_VERSIONS))}; a newer release may read it)")
    if h == 0 or w == 0:
        raise CorruptDataError("learned tile with zero size")
    if kind == KIND_UNIFORM:
        if len(data) < _HEAD.size + 5:
            raise CorruptDataError("uniform tile has the wrong length")
        return TileHeader(kind, h, w, payload=_HEAD.size, version=ver)
    if kind != KIND_NETWORK:
        raise CorruptDataError(f"unknown tile kind {kind}")
    if len(data) < _HEAD.size + _NET.size:
        raise CorruptDataError("learned tile truncated in its header")
    q, prefix, crc, zlen, top, left, ch, cw = _NET.unpack_from(data, _HEAD.size)
    start = _HEAD.size + _NET.size
    if zlen > len(data) - start:
        raise CorruptDataError("learned tile truncated (z stream)")
    if top + h > ch or left + w > cw:
        raise CorruptDataError("learned tile header is inconsistent (tile outside its coded region)")
    if ver >= STITCH_VERSION and (top or left or ch != _ceil(h, PIXEL_STRIDE) or cw != _ceil(w, PIXEL_STRIDE)):
        raise CorruptDataError("learned tile header is inconsistent (stitched tile with a margin)")
    if not QUALITY_RANGE[0] <= q <= QUALITY_RANGE[1]:      # NaN fails too
        raise CorruptDataError(f"learned tile header is inconsistent (quality {q!r})")
    return TileHeader(kind, h, w, float(q), prefix, crc, zlen, top, left, ch, cw, start, ver)


class LearnedCodec:
    """Tile codec backed by the shipped (or a given) hyperprior checkpoint.

    Args:
        quality: 1 (smallest) … 8 (best); fractional values interpolate.
        model: path of an inference checkpoint the *caller* chose (the Python API,
            ``get_codec("learned", model=...)``); default: the shipped weights (or
            ``$WSICODEC_MODEL``).  A local option: never stored in a container, and
            never taken from one (:func:`~wsicodec.codecs.codec_from_dict` drops it).
            Loaded as data only (``weights_only``: :func:`~wsicodec.checkpoint.load_model`).
        device: where g_a / g_s run ("cpu", "cuda", or "auto": CUDA when present).
            The entropy parameters are always computed on the CPU in float64.  Local.
        margin: pixels of context that callers who can (the container writer,
            :func:`wsicodec.encode`) code around each tile, 0..64.
        precision: how this codec runs g_a (encoding) and g_s (decoding): "float32"
            (the reference) or "bfloat16" (their inner layers; faster on hardware with
            bfloat16 arithmetic; latents and pixels slightly different, rate-distortion
            the same to 0.1 %: :data:`~wsicodec.codecs.PRECISIONS`).  Local: not stored
            in the container: a decoder's precision is its reader's choice.
        refine: steps of the encoder's latent search
            (:meth:`~wsicodec.model.WsiHyperprior.refine_latents`), 0 (off) .. 1000.
            Each step costs about four g_s passes over the tile; 40 steps take
            7.2 % fewer bits at equal PSNR on H&E, 6.9 % more at equal LPIPS, for
            ~100x the encode time (bench/results/rd_refine_he_test.md).  Streams
            decode with any setting.
        model_id: the sha256 (hex) the data to decode was made with (from a container's
            configuration).  Without ``model``, the weights with that id are looked
            up among trusted places only (shipped, ``$WSICODEC_MODEL``,
            ``$WSICODEC_MODEL_DIR``); with it, they must match.  Otherwise
            :class:`ModelMismatchError` names both ids and says where to put the weights.

    Every setting is checked before the weights are loaded (seconds), so a bad one
    fails at once.

    Raises:
        InvalidSettingError: quality outside 1..8, refine outside 0..1000, margin outside
            0..64, an unknown precision or device, a model id that is not hex, missing
            or unreadable weights.
    """

    name = "learned"

    def __init__(self, quality: float | None = None, model: str | None = None,
                 device: str = "cpu", margin: int = DEFAULT_MARGIN, model_id: str | None = None,
                 refine: int = 0, precision: str = "float32") -> None:
        q = 4.0 if quality is None else as_number(quality)
        self.precision = check_precision(precision)
        if not (isinstance(refine, int) and not isinstance(refine, bool) and 0 <= refine <= MAX_REFINE):
            raise InvalidSettingError(f"learned codec refine must be an integer in 0..{MAX_REFINE}, got {refine!r}")
        self.refine = refine
        if not (isinstance(margin, int) and not isinstance(margin, bool) and 0 <= margin <= 64):
            raise InvalidSettingError(f"learned codec margin must be an integer in 0..64, got {margin!r}")
        self.margin = margin
        lo, hi = QUALITY_RANGE
        if not (lo <= q <= hi) or q != q:
            raise InvalidSettingError(f"learned codec quality must be in {lo:g}..{hi:g} (fractions allowed), got {quality!r}")
        if model is not None and not isinstance(model, (str, os.PathLike)):
            raise InvalidSettingError(f"learned codec model must be a weights file path, got {model!r:.60}")
        if not isinstance(device, str):
            raise InvalidSettingError(f"learned codec device must be cpu, cuda[:N] or auto, got {device!r:.40}")
        from .checkpoint import check_model_id, load_model_for
        if model_id is not None:
            model_id = check_model_id(model_id)
        self.device = resolve_device(device)
        self.quality = q
        self._model_arg = model
        self.loaded = load_model_for(model_id, model)          # the slow part: last
        self.model_id = self.loaded.model_id
        self._tables = _tables_for(self.loaded)

    # ----------------------------------------------------------- protocol
    def to_dict(self) -> dict:
        cfg = {"quality": self.quality, "model_id": self.model_id, "margin": self.margin}
        if self.refine:
            cfg["refine"] = self.refine   # how the container was made; decoding ignores it
        # never the model's path: the id finds the weights (and a path would tell where
        # the encoder kept its files); nor device or precision: those are the reader's
        return {"name": self.name, "configuration": cfg}

    def encode(self, tile: np.ndarray) -> bytes:
        return self.encode_batch([tile])[0]

    def decode(self, data: bytes, shape: tuple[int, int, int] | None = None) -> np.ndarray:
        """One tile on its own (see :meth:`decode_batch`: weak borders for a stitched tile).
        ``shape``: the (h, w, 3) the caller expects, checked against the tile's header
        before anything is decoded (CorruptDataError otherwise)."""
        return self.decode_batch([data], shape=shape)[0]

    # -------------------------------------------------------------- batch
    def encode_batch(self, tiles: Sequence[np.ndarray],
                     boxes: Sequence[tuple[int, int, int, int]] | None = None) -> list[bytes]:
        """Encode tiles; regions of equal size share one g_a pass.

        Without ``boxes`` each array is a tile.  With ``boxes``, array ``i`` is a
        *region* (the tile plus up to :attr:`margin` pixels of its neighbours on
        each side) and ``boxes[i] = (top, left, height, width)`` says where the
        tile sits in it: g_a sees the region, the stream holds the tile's latents
        only (see "Seams" in the module docstring).  A box off y's 16-pixel grid
        loses the context rows/columns before it that break the grid.
        """
        import torch
        out: list[bytes | None] = [None] * len(tiles)
        groups: dict[tuple[int, int], list[int]] = {}
        regions = [_check_tile(t) for t in tiles]
        if boxes is None:
            boxes = [(0, 0, r.shape[0], r.shape[1]) for r in regions]
        boxes = list(boxes)
        for i, (r, (top, left, h, w)) in enumerate(zip(regions, boxes)):
            if not (0 <= top <= 255 and 0 <= left <= 255 and h >= 1 and w >= 1
                    and top + h <= r.shape[0] and left + w <= r.shape[1]):
                raise InvalidSettingError(f"tile box {boxes[i]} does not fit its region {r.shape[:2]} (margins 0..255)")
            core = r[top:top + h, left:left + w]
            fit = uniform_fit(core)
            if fit is not None:
                out[i] = _encode_uniform(core, *fit)
                continue
            dy, dx = top % PIXEL_STRIDE, left % PIXEL_STRIDE     # onto y's grid
            if dy or dx:
                regions[i], boxes[i] = r[dy:, dx:], (top - dy, left - dx, h, w)
            groups.setdefault(regions[i].shape[:2], []).append(i)
        m, net = self.loaded.model, self.loaded.on(self.device)   # entropy parameters on m
        tb_z, tb_y = self._tables
        q1 = torch.tensor([self.quality])
        with torch.inference_mode():
            for idx in groups.values():
                x = torch.from_numpy(np.stack([regions[i] for i in idx])).permute(0, 3, 1, 2)
                x = pad_to_stride(x.float().div_(255.0), PIXEL_STRIDE).to(self.device)
                y_all = net.analysis_y(x, torch.full((len(idx),), self.quality, device=self.device),
                                       self.precision)
                for k, i in enumerate(idx):
                    top, left, h, w = boxes[i]
                    ty, tx = top // PIXEL_STRIDE, left // PIXEL_STRIDE
                    lh, lw = -(-h // PIXEL_STRIDE), -(-w // PIXEL_STRIDE)
                    y = y_all[k:k + 1, :, ty:ty + lh, tx:tx + lw]
                    z = net.hyper_analysis(y, q1.to(self.device), LATENT_STRIDE)
                    if self.refine:     # g_s sees the neighbours' latents too: g_a's stand in
                        a0, b0 = max(ty - STITCH_RING, 0), max(tx - STITCH_RING, 0)
                        a1 = min(ty + lh + STITCH_RING, y_all.shape[-2])
                        b1 = min(tx + lw + STITCH_RING, y_all.shape[-1])
                        P = PIXEL_STRIDE
                        xk = x[k:k + 1, :, a0 * P:a1 * P, b0 * P:b1 * P]
                        shown = torch.zeros(1, 1, *xk.shape[-2:], device=self.device)
                        shown[..., (ty - a0) * P:(ty - a0) * P + h, (tx - b0) * P:(tx - b0) * P + w] = 1
                        y, z, _ = net.refine_latents(xk, q1.to(self.device), y, z, shown, self.refine,
                                                     window=(y_all[k:k + 1, :, a0:a1, b0:b1], ty - a0, tx - b0))
                    y = y.cpu()
                    z_sym, mu, index = hyper_symbols(m, z.cpu(), q1, y.shape[-2:], exact=exact_entropy(VERSION))
                    zs = z_sym[0].numpy()
                    ys = torch.round(y.double() - mu).to(torch.int32)[0].numpy()
                    zb = encode_symbols(zs, _channel_index(zs.shape), tb_z)
                    yb = encode_symbols(ys, index[0].numpy(), tb_y)
                    head = _HEAD.pack(MAGIC, VERSION, KIND_NETWORK, h, w) + _NET.pack(
                        self.quality, bytes.fromhex(self.model_id[:16]), symbol_checksum(zs, ys), len(zb),
                        0, 0, lh * PIXEL_STRIDE, lw * PIXEL_STRIDE)
                    out[i] = head + zb + yb
        return out  # type: ignore[return-value]

    def decode_batch(self, datas: Sequence[bytes], names: Sequence[str] | None = None,
                     shape: tuple[int, int, int] | None = None) -> list[np.ndarray]:
        """Decode tiles, each on its own; ``names`` (e.g. "level 0 tile (3, 4)") go into
        error messages.

        A stitched (format 3) tile decoded this way lacks its neighbours' latents: its
        symbols are checked as always, but its pixels near the edges are far worse than
        :meth:`decode_tiles` gives them (~20 against ~32 dB within 4 px, "Seams" above):
        use this to check streams, and :meth:`decode_tiles` (or a container) for pixels.
        Entropy decoding and the entropy parameters run per tile on the CPU; g_s once per
        group of equal-size latents on :attr:`device`.

        Raises:
            CorruptDataError: a damaged stream or a symbol-checksum mismatch (names the tile).
            ModelMismatchError: a tile made with other weights.
        """
        names = names or [f"tile {i}" for i in range(len(datas))]
        out: list[np.ndarray | None] = [None] * len(datas)
        jobs = []
        for i, data in enumerate(datas):
            data = bytes(data)
            hd = _parse_named(data, names[i], shape)
            if hd.kind == KIND_UNIFORM:
                out[i] = _decode_uniform_named(data, hd, names[i])
                continue
            y = self.ungain(self.entropy_decode(data, hd, names[i]), hd.quality)
            jobs.append((i, y, hd.top, hd.left, hd.height, hd.width))
        for (i, _, top, left, h, w), x in zip(jobs, self.synthesize_windows([j[1] for j in jobs])):
            out[i] = np.ascontiguousarray(x[top:top + h, left:left + w])
        return out  # type: ignore[return-value]

    def decode_tiles(self, keys: Sequence[tuple[int, int]], fetch: Callable[[int, int], bytes],
                     grid: tuple[int, int], names: Callable[[int, int], str] | None = None, *,
                     cache: "LatentCache | None" = None, cache_tag: Hashable = None,
                     run: Callable[[Callable[[Any], Any], list], list] | None = None,
                     synthesize: Callable[[list], list] | None = None,
                     shape: tuple[int, int, int] | None = None,
                     as_written: bool = False) -> list[Any]:
        """Tiles ``keys`` = [(col, row), ...] of a grid of ``grid`` = (cols, rows) tiles,
        each stitched tile decoded with its neighbours' latents ("Seams" above).

        ``fetch(col, row)`` gives any tile's bytes (raising for an unreadable one);
        ``names(col, row)`` the tile's name in messages.  ``cache`` keeps decoded latents
        between calls (keyed ``(cache_tag, col, row)``), so each tile of a region or a
        slide is entropy-decoded once; ``run(fn, items)`` maps ``fn`` over the entropy
        work (a thread pool's map: every item's result or exception, in order);
        ``synthesize(windows)``: ungained latent windows → uint8 (H, W, 3) pixels or an
        exception each (default :meth:`synthesize_windows` on :attr:`device`).
        ``shape``: the (h, w, 3) every tile of the grid has (a container's tile size);
        a tile whose header says otherwise fails before anything is decoded.
        ``as_written``: the tiles are a format-3 container's and this codec was built from
        its configuration, so every tile is as ``compress`` wrote it (:meth:`check_as_written`).

        Returns one entry per key: the (h, w, 3) uint8 tile, or the exception that tile
        raised (damaged bytes, checksum, other weights).  A damaged *neighbour* does not
        fail a tile: its side is decoded without that neighbour's latents.
        """
        import torch
        names = names or (lambda c, r: f"tile col={c} row={r}")
        cols, rows = grid
        out: list[Any] = [None] * len(keys)
        got: dict[tuple[int, int], tuple[bytes, TileHeader]] = {}

        def load(key: tuple[int, int]) -> tuple[bytes, TileHeader]:
            if key not in got:
                data = bytes(fetch(*key))
                hd = _parse_named(data, names(*key), shape)
                if as_written:
                    self.check_as_written(hd, names(*key))
                got[key] = (data, hd)
            return got[key]

        stitched, alone = [], []
        for n, key in enumerate(keys):
            try:
                data, hd = load(key)
                if hd.kind == KIND_UNIFORM:
                    out[n] = _decode_uniform_named(data, hd, names(*key))
                elif hd.version >= STITCH_VERSION:
                    stitched.append(n)
                else:
                    alone.append(n)
            except Exception as e:  # noqa: BLE001 - kept per tile
                out[n] = e
        need: dict[tuple[int, int], None] = {}
        for n in stitched:
            col, row = keys[n]
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    if 0 <= col + dc < cols and 0 <= row + dr < rows:
                        need[(col + dc, row + dr)] = None
        lat: dict[tuple[int, int], Any] = {}
        todo, waits = [], {}
        for key in need:          # cached, being decoded by another caller, or ours to decode
            t = cache.begin((cache_tag, *key)) if cache is not None else None
            if t is None:
                todo.append(key)
            elif isinstance(t, Future):
                waits[key] = t
            else:
                lat[key] = t
        try:
            own = self._decode_latents(todo, lat, got, load, names, [keys[n] for n in alone], run)
        finally:                  # whatever happened, callers waiting on our keys get an answer
            if cache is not None:
                for key in todo:
                    cache.settle((cache_tag, *key),
                                 lat.get(key, CorruptDataError(f"{names(*key)}: not decoded")))
        for key, fut in waits.items():
            lat[key] = fut.result()
        windows, where = [], []
        for n in stitched:
            col, row = keys[n]
            centre = lat.get((col, row))
            if not isinstance(centre, torch.Tensor):
                out[n] = centre if isinstance(centre, BaseException) else CorruptDataError(
                    f"{names(col, row)}: no latents")
                continue
            around = {}
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    v = lat.get((col + dc, row + dr))
                    around[(dr, dc)] = v if isinstance(v, torch.Tensor) else None
            win, top, left = stitch_window(centre, around, STITCH_RING)
            hd = got[(col, row)][1]
            windows.append(win)
            where.append((n, top, left, hd.height, hd.width))
        for n in alone:
            r = own.get(keys[n])
            if isinstance(r, BaseException):
                out[n] = r
                continue
            hd = got[keys[n]][1]
            windows.append(r)
            where.append((n, hd.top, hd.left, hd.height, hd.width))
        if windows:
            try:
                pixels = (synthesize or self.synthesize_windows)(windows)
            except Exception as e:  # noqa: BLE001 - every tile of the pass fails with it
                pixels = [e] * len(windows)
            for (n, top, left, h, w), x in zip(where, pixels):
                out[n] = x if isinstance(x, BaseException) else np.ascontiguousarray(
                    x[top:top + h, left:left + w])
        return out

    def check_as_written(self, hd: TileHeader, name: str) -> None:
        """Refuse a tile header that ``compress`` with this codec cannot have written: a
        tile format before :data:`STITCH_VERSION` (a format-3 container is younger than
        stitched tiles), or a network tile of another quality than this codec's, to the
        bit (every tile of a container is coded at its configured quality).  Neither the
        format byte nor the quality is under the symbol checksum, and both still decode:
        a format-2 label makes a stitched tile decode alone (other pixels at its borders),
        and a quality a few float32 ulps off decodes the same symbols with another gain
        (pixels off by one).  Raises CorruptDataError."""
        if hd.version < STITCH_VERSION:
            raise CorruptDataError(f"{name}: tile format {hd.version} in a container whose tiles "
                                   f"are all format {STITCH_VERSION} or later (header edited)")
        if hd.kind == KIND_NETWORK and struct.pack("<f", hd.quality) != struct.pack("<f", self.quality):
            raise CorruptDataError(f"{name}: coded at quality {hd.quality!r}, but the container's "
                                   f"tiles are all quality {self.quality!r} (header edited)")

    def _decode_latents(self, todo: list, lat: dict, got: dict, load: Callable, names: Callable,
                        alone: list, run: Callable | None) -> dict:
        """:meth:`decode_tiles`' entropy work: the latents of the tiles ``todo`` into
        ``lat`` (a tensor, None or the exception, per key; the caller settles them into
        its cache); returns the own latents of the format-1/2 tiles ``alone``, by key."""
        for key in todo:          # bytes first, in this thread (stores need not be thread-safe)
            try:
                load(key)
            except Exception as e:  # noqa: BLE001
                lat[key] = e

        def entropy(job: tuple[str, Any]) -> Any:
            kind, key = job
            try:
                data, hd = got[key]
                if kind == "alone":
                    return self.ungain(self.entropy_decode(data, hd, names(*key)), hd.quality)
                return self.tile_latents(data, hd, names(*key))
            except Exception as e:  # noqa: BLE001 - kept per tile
                return e

        jobs = [("latent", k) for k in todo if k not in lat] + [("alone", k) for k in alone]
        results = run(entropy, jobs) if run is not None else [entropy(j) for j in jobs]
        own = {}
        for (kind, key), r in zip(jobs, results):
            if kind == "alone":
                own[key] = r
            else:
                lat[key] = r
        return own

    def latent_cache(self, tile_size: int, tiles: int, most: int = 256 * 1024 * 1024) -> "LatentCache":
        """A :class:`LatentCache` with room for ``tiles`` tiles of ``tile_size`` (at most
        ``most`` bytes, at least 16 MiB)."""
        per = 4 * self.loaded.model.config.M * (-(-tile_size // PIXEL_STRIDE)) ** 2
        return LatentCache(min(most, max(16 * 1024 * 1024, tiles * per)))

    def synthesize_windows(self, windows: Sequence[Any], max_batch: int = 16) -> list[np.ndarray]:
        """Ungained latents (1, M, h, w) → uint8 (16h, 16w, 3) pixels, uncropped; g_s runs
        on :attr:`device`, once per group of up to ``max_batch`` equal shapes."""
        import torch
        out: list[Any] = [None] * len(windows)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, w in enumerate(windows):
            groups.setdefault(tuple(w.shape), []).append(i)
        m = self.loaded.on(self.device)
        with torch.inference_mode():
            for idx in groups.values():
                for k in range(0, len(idx), max_batch):
                    part = idx[k:k + max_batch]
                    y = torch.cat([windows[i] for i in part]).to(self.device)
                    x = m.synthesize(y, self.precision).clamp_(0, 1).mul_(255).round_().to(torch.uint8)
                    x = x.permute(0, 2, 3, 1).cpu().numpy()
                    for j, i in enumerate(part):
                        out[i] = x[j]
        return out

    def ungain(self, y_hat, quality: float):
        """Gained ŷ_q (from :meth:`entropy_decode`) → ŷ_q / gain[q], float32: the scale
        tiles of any quality share (:meth:`~wsicodec.model.WsiHyperprior.synthesize`)."""
        import torch
        gain, _ = self.loaded.model.gains(torch.tensor([float(quality)]), torch.float32)
        return (y_hat.float() / gain).contiguous()

    def tile_latents(self, data: bytes, hd: TileHeader, name: str):
        """What a tile gives its neighbours' stitching: its ungained ŷ (1, M, h/16, w/16)
        float32 (format 3), g_a's latent of its colour for a glass tile, or None (a
        format-1/2 tile, coded with its own margin).  Raises as :meth:`entropy_decode`."""
        if hd.kind == KIND_UNIFORM:
            lh, lw = -(-hd.height // PIXEL_STRIDE), -(-hd.width // PIXEL_STRIDE)
            rgb = bytes(data[hd.payload:hd.payload + 3])
            return uniform_latent(self.loaded.model, rgb).expand(1, -1, lh, lw)
        if hd.version < STITCH_VERSION:
            return None
        return self.ungain(self.entropy_decode(data, hd, name), hd.quality)

    def entropy_decode(self, data: bytes, hd: TileHeader, name: str,
                       timings: dict[str, float] | None = None):
        """The CPU half of decoding a network-coded tile: bytes → ŷ_q (1, M, h, w) float32.

        ``hd`` is :func:`parse_header` of ``data``.  Decodes ẑ, computes (μ, table
        index) deterministically, decodes ŷ and checks the symbols against the stored
        CRC.  Thread-safe.  Feed the result to ``loaded.model.synthesis`` on any device
        and crop ``[hd.top:hd.top+hd.height, hd.left:hd.left+hd.width]``.
        ``timings``, if given, receives the seconds of each step ("rans_z",
        "entropy_parameters", "rans_y"): what ``bench/serve.py`` reports.

        Raises:
            CorruptDataError: symbol checksum mismatch (names the tile).
            ModelMismatchError: the tile was made with other weights.
        """
        import torch
        m = self.loaded.model
        tb_z, tb_y = self._tables
        if not self.loaded.decodes(hd.model_prefix.hex()):
            raise ModelMismatchError(
                f"{name} was coded with model {hd.model_prefix.hex()}..., but the loaded model is "
                f"{self.model_id[:16]}...; open it with the same weights")
        yh = _ceil(hd.coded_height, PIXEL_STRIDE) // 16
        yw = _ceil(hd.coded_width, PIXEL_STRIDE) // 16
        zshape = (m.config.N, _ceil(yh, LATENT_STRIDE) // 4, _ceil(yw, LATENT_STRIDE) // 4)
        t0 = time.perf_counter()
        zs = decode_symbols(data[hd.payload:hd.payload + hd.z_len], _channel_index(zshape), tb_z)
        t1 = time.perf_counter()
        medians = m.entropy_bottleneck._get_medians().reshape(1, -1, 1, 1).double()
        z_hat = torch.from_numpy(zs)[None].double() + medians
        mu, index = m.entropy_parameters(z_hat, torch.tensor([hd.quality]),
                                         exact=exact_entropy(hd.version), size=(yh, yw))
        t2 = time.perf_counter()
        ys = decode_symbols(data[hd.payload + hd.z_len:], index[0].numpy(), tb_y)
        if timings is not None:
            timings.update(rans_z=t1 - t0, entropy_parameters=t2 - t1,
                           rans_y=time.perf_counter() - t2)
        if symbol_checksum(zs, ys) != hd.crc:
            raise CorruptDataError(
                f"{name}: decoded symbols fail their checksum (damaged stream, or entropy "
                f"parameters computed differently than at encode time)")
        return m.reconstruct(torch.from_numpy(ys)[None], mu, index, hd.quality).float()


# ------------------------------------------------------------------ helpers
def resolve_device(device: str):
    """Map "cpu", "cuda[:N]" or "auto" to a torch.device. Raises InvalidSettingError."""
    import torch
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise InvalidSettingError(f"unknown device {device!r} (use cpu, cuda or auto)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise InvalidSettingError("device cuda requested but no CUDA GPU is available")
    return d


def _tables_for(loaded) -> tuple[CdfTables, CdfTables]:
    cached = getattr(loaded, "_tables", None)
    if cached is None:
        m = loaded.model
        def tables(em) -> CdfTables:
            return CdfTables(em._quantized_cdf.numpy().astype(np.int32),
                             em._cdf_length.reshape(-1).numpy().astype(np.int32),
                             em._offset.reshape(-1).numpy().astype(np.int32))
        cached = (tables(m.entropy_bottleneck), tables(m.gaussian_conditional))
        object.__setattr__(loaded, "_tables", cached)
    return cached


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


class LatentCache(ByteLRU):
    """A thread-safe LRU of decoded tile latents (torch tensors), bounded in bytes:
    what lets :meth:`LearnedCodec.decode_tiles` entropy-decode each tile once when
    its neighbours are decoded later, and, shared by concurrent callers (a tile
    server's requests for neighbouring tiles), once while they run: a tile one caller
    is decoding is waited for by the others (:meth:`begin`, :meth:`settle`)."""

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


def _parse_named(data: bytes, name: str, shape: tuple[int, int, int] | None = None) -> TileHeader:
    try:
        hd = parse_header(data)
    except CorruptDataError as exc:
        raise CorruptDataError(f"{name}: {exc}") from None
    if shape is not None and (hd.height, hd.width) != tuple(shape[:2]):
        raise CorruptDataError(f"{name}: the tile's header says {hd.height}x{hd.width} pixels, "
                               f"its place holds {shape[0]}x{shape[1]}")
    return hd


def _decode_uniform_named(data: bytes, hd: TileHeader, name: str) -> np.ndarray:
    try:
        return _decode_uniform(data, hd)
    except CorruptDataError as exc:
        raise CorruptDataError(f"{name}: {exc}") from None


def _check_tile(t: np.ndarray) -> np.ndarray:
    t = np.asarray(t)
    if t.ndim != 3 or t.shape[2] != 3 or t.dtype != np.uint8:
        raise InvalidSettingError(f"tiles must be (h, w, 3) uint8, got {t.shape} {t.dtype}")
    if not (1 <= t.shape[0] <= 65535 and 1 <= t.shape[1] <= 65535):
        raise InvalidSettingError(f"tile size {t.shape[:2]} outside 1..65535")
    return t


def _ceil(n: int, k: int) -> int:
    return -(-n // k) * k


def exact_entropy(version: int) -> bool:
    """Whether tiles of this format compute their entropy parameters in exact integer
    arithmetic (format 2 on) rather than with the float64 h_s (format 1)."""
    return version >= 2


def hyper_symbols(model, z, quality, y_size: tuple[int, int], exact: bool = True):
    """The encoder's side information, as every decoder will see it.

    ``z`` (B, N, h, w) from :meth:`~wsicodec.model.WsiHyperprior.analysis` (on the CPU)
    → its symbols, then (μ, CDF-table index) for y computed from ẑ exactly as
    :meth:`LearnedCodec.entropy_decode` does for a tile of the current format (``exact``;
    False: as format 1 did), cropped to y's ``y_size``.  Returns
    ``(z_sym int32, μ float64, index int32)``.  The y symbols are ``round(y − μ)``, or
    any integers an encoder prefers: the decoder adds μ back.
    """
    import torch
    medians = model.entropy_bottleneck._get_medians().reshape(1, -1, 1, 1)
    z_sym = torch.round(z - medians).to(torch.int32)
    mu, index = model.entropy_parameters(z_sym.double() + medians.double(), quality, exact=exact,
                                         size=(int(y_size[0]), int(y_size[1])))
    return z_sym, mu, index


def _channel_index(shape) -> np.ndarray:
    c = shape[0]
    return np.broadcast_to(np.arange(c, dtype=np.int32).reshape(c, 1, 1), tuple(shape))


def register() -> None:
    """Add ``learned`` to the codec registry (called lazily by wsicodec.codecs)."""
    from .codecs import register_codec
    register_codec("learned", LearnedCodec, local=LOCAL_OPTIONS)


__all__ = ["LearnedCodec", "LatentCache", "is_uniform", "parse_header", "stitch_window", "ModelMismatchError"]


register()
