"""The ``learned`` tile codec: the hyperprior network plus rANS bitstreams.

Tile bitstream (little-endian)::

    offset size  field
    0      4     magic b"WSLT"
    4      1     format version: 2, or 1 (still read: entropy parameters in float64, below)
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
    30     1+1   top, left: where the tile sits inside the coded region
    32     2+2   height, width of the coded region (tile plus its context margin)
    36     ...   z stream (factorized prior), then y stream (Gaussian, μ/σ from h_s(ẑ))

Seams: a tile may be coded together with a margin of its neighbours' pixels
(:attr:`LearnedCodec.margin`, see :meth:`LearnedCodec.encode_batch`); the decoder
crops the tile back out, so tile borders sit inside the coded region, away from
the edges where a convolutional decoder is weakest.

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

import struct
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .codecs import as_number
from .entropy import CdfTables, decode_symbols, encode_symbols, symbol_checksum
from .errors import CorruptDataError, InvalidSettingError, ModelMismatchError
from .model import pad_to_stride

MAGIC = b"WSLT"
VERSION = 2
#: tile formats this release reads; 1 differs only in how the entropy parameters are computed
READ_VERSIONS = (1, 2)
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
#: pixels of neighbouring context coded around each tile (see "Seams" above)
DEFAULT_MARGIN = 8

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
    if not QUALITY_RANGE[0] <= q <= QUALITY_RANGE[1]:      # NaN fails too
        raise CorruptDataError(f"learned tile header is inconsistent (quality {q!r})")
    return TileHeader(kind, h, w, float(q), prefix, crc, zlen, top, left, ch, cw, start, ver)


class LearnedCodec:
    """Tile codec backed by the shipped (or a given) hyperprior checkpoint.

    Args:
        quality: 1 (smallest) … 8 (best); fractional values interpolate.
        model: path of an inference checkpoint; default: the shipped weights
            (or ``$WSICODEC_MODEL``).
        device: where g_a / g_s run ("cpu", "cuda", or "auto": CUDA when present).
            The entropy parameters are always computed on the CPU in float64.
        margin: pixels of context that callers who can (the container writer,
            :func:`wsicodec.encode`) code around each tile, 0..64.
        refine: steps of the encoder's latent search
            (:meth:`~wsicodec.model.WsiHyperprior.refine_latents`), 0 (off) .. 1000.
            Each step costs about four g_s passes over the tile; 40 steps take
            7.2 % fewer bits at equal PSNR on H&E, 6.9 % more at equal LPIPS, for
            ~100x the encode time (bench/results/rd_refine_he_test.md).  Streams
            decode with any setting.
        model_id: the sha256 the data to decode was made with (from a container's
            configuration).  Without ``model``, the weights with that id are looked
            up (shipped, ``$WSICODEC_MODEL``, ``$WSICODEC_MODEL_DIR``); with it, they
            must match.  Otherwise :class:`ModelMismatchError` names both ids and
            says where the weights can be had.

    Raises:
        InvalidSettingError: quality outside 1..8, refine outside 0..1000, missing or
            unreadable weights.
    """

    name = "learned"

    def __init__(self, quality: float | None = None, model: str | None = None,
                 device: str = "cpu", margin: int = DEFAULT_MARGIN, model_id: str | None = None,
                 refine: int = 0) -> None:
        q = 4.0 if quality is None else as_number(quality)
        if not (isinstance(refine, int) and not isinstance(refine, bool) and 0 <= refine <= MAX_REFINE):
            raise InvalidSettingError(f"learned codec refine must be an integer in 0..{MAX_REFINE}, got {refine!r}")
        self.refine = refine
        if not (isinstance(margin, int) and 0 <= margin <= 64):
            raise InvalidSettingError(f"learned codec margin must be an integer in 0..64, got {margin!r}")
        self.margin = margin
        lo, hi = QUALITY_RANGE
        if not (lo <= q <= hi) or q != q:
            raise InvalidSettingError(f"learned codec quality must be in {lo:g}..{hi:g} (fractions allowed), got {quality!r}")
        from .checkpoint import load_model_for
        self.quality = q
        self._model_arg = model
        self.loaded = load_model_for(model_id, model)
        self.model_id = self.loaded.model_id
        self.device = resolve_device(device)
        self._tables = _tables_for(self.loaded)

    # ----------------------------------------------------------- protocol
    def to_dict(self) -> dict:
        cfg = {"quality": self.quality, "model_id": self.model_id, "margin": self.margin}
        if self.refine:
            cfg["refine"] = self.refine   # how the container was made; decoding ignores it
        if self._model_arg is not None:
            cfg["model"] = str(self._model_arg)
        return {"name": self.name, "configuration": cfg}

    def encode(self, tile: np.ndarray) -> bytes:
        return self.encode_batch([tile])[0]

    def decode(self, data: bytes) -> np.ndarray:
        return self.decode_batch([data])[0]

    # -------------------------------------------------------------- batch
    def encode_batch(self, tiles: Sequence[np.ndarray],
                     boxes: Sequence[tuple[int, int, int, int]] | None = None) -> list[bytes]:
        """Encode tiles; regions of equal size share one g_a pass.

        Without ``boxes`` each array is a tile.  With ``boxes``, array ``i`` is a
        *region* (the tile plus up to :attr:`margin` pixels of its neighbours on
        each side) and ``boxes[i] = (top, left, height, width)`` says where the
        tile sits in it; the stream decodes to the tile alone.
        """
        import torch
        out: list[bytes | None] = [None] * len(tiles)
        groups: dict[tuple[int, int], list[int]] = {}
        regions = [_check_tile(t) for t in tiles]
        if boxes is None:
            boxes = [(0, 0, r.shape[0], r.shape[1]) for r in regions]
        for i, (r, (top, left, h, w)) in enumerate(zip(regions, boxes)):
            if not (0 <= top <= 255 and 0 <= left <= 255 and h >= 1 and w >= 1
                    and top + h <= r.shape[0] and left + w <= r.shape[1]):
                raise InvalidSettingError(f"tile box {boxes[i]} does not fit its region {r.shape[:2]} (margins 0..255)")
            core = r[top:top + h, left:left + w]
            fit = uniform_fit(core)
            if fit is not None:
                out[i] = _encode_uniform(core, *fit)
            else:
                groups.setdefault(r.shape[:2], []).append(i)
        m, net = self.loaded.model, self.loaded.on(self.device)   # entropy parameters on m
        tb_z, tb_y = self._tables
        with torch.inference_mode():
            for (rh, rw), idx in groups.items():
                x = torch.from_numpy(np.stack([regions[i] for i in idx])).permute(0, 3, 1, 2)
                x = pad_to_stride(x.float().div_(255.0), PIXEL_STRIDE).to(self.device)
                q = torch.full((len(idx),), self.quality)
                y, z = net.analysis(x, q.to(self.device), latent_stride=LATENT_STRIDE)
                if self.refine:
                    shown = torch.zeros(len(idx), 1, *x.shape[-2:], device=self.device)
                    for k, i in enumerate(idx):
                        top, left, h, w = boxes[i]
                        shown[k, :, top:top + h, left:left + w] = 1
                    y, z, _ = net.refine_latents(x, q.to(self.device), y, z, shown, self.refine)
                y = y.cpu()
                z_sym, mu, index = hyper_symbols(m, z.cpu(), q, y.shape[-2:], exact=exact_entropy(VERSION))
                y_sym = torch.round(y.double() - mu).to(torch.int32)
                z_idx = _channel_index(z_sym.shape[1:])
                for k, i in enumerate(idx):
                    top, left, h, w = boxes[i]
                    zs, ys, yi = z_sym[k].numpy(), y_sym[k].numpy(), index[k].numpy()
                    zb = encode_symbols(zs, z_idx, tb_z)
                    yb = encode_symbols(ys, yi, tb_y)
                    head = _HEAD.pack(MAGIC, VERSION, KIND_NETWORK, h, w) + _NET.pack(
                        self.quality, bytes.fromhex(self.model_id[:16]), symbol_checksum(zs, ys), len(zb),
                        top, left, rh, rw)
                    out[i] = head + zb + yb
        return out  # type: ignore[return-value]

    def decode_batch(self, datas: Sequence[bytes], names: Sequence[str] | None = None) -> list[np.ndarray]:
        """Decode tiles; ``names`` (e.g. "level 0 tile (3, 4)") go into error messages.

        Entropy decoding and the entropy parameters run per tile on the CPU;
        g_s runs once per group of equal-size regions on :attr:`device`.

        Raises:
            CorruptDataError: a damaged stream or a symbol-checksum mismatch (names the tile).
            ModelMismatchError: a tile made with other weights.
        """
        import torch
        names = names or [f"tile {i}" for i in range(len(datas))]
        out: list[np.ndarray | None] = [None] * len(datas)
        pending: dict[tuple[int, int], list[tuple[int, TileHeader, torch.Tensor]]] = {}
        for i, data in enumerate(datas):
            data = bytes(data)
            try:
                hd = parse_header(data)
            except CorruptDataError as exc:
                raise CorruptDataError(f"{names[i]}: {exc}") from None
            if hd.kind == KIND_UNIFORM:
                try:
                    out[i] = _decode_uniform(data, hd)
                except CorruptDataError as exc:
                    raise CorruptDataError(f"{names[i]}: {exc}") from None
                continue
            y_hat = self.entropy_decode(data, hd, names[i])
            pending.setdefault(tuple(y_hat.shape[-2:]), []).append((i, hd, y_hat))
        m = self.loaded.on(self.device)
        with torch.inference_mode():
            for items in pending.values():
                y_hat = torch.cat([it[2] for it in items]).to(self.device)
                q = torch.tensor([it[1].quality for it in items], device=self.device)
                x_hat = m.synthesis(y_hat, q).clamp_(0, 1).mul_(255).round_().to(torch.uint8)
                x_hat = x_hat.permute(0, 2, 3, 1).cpu().numpy()
                for k, (i, hd, _) in enumerate(items):
                    out[i] = np.ascontiguousarray(
                        x_hat[k, hd.top:hd.top + hd.height, hd.left:hd.left + hd.width])
        return out  # type: ignore[return-value]

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
    register_codec("learned", LearnedCodec)


__all__ = ["LearnedCodec", "is_uniform", "parse_header", "ModelMismatchError"]


register()
