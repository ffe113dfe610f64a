"""Encoding learned tiles: glass test, g_a over tile + context, h_a, exact h_s, rANS.

::

    regions (tile + context), boxes ─► glass? ─yes─► plane glass tile (glass.py)
        │ no: region moved onto y's 16-px grid, equal sizes batched
        ▼
    g_a (on the codec's device, in its precision) ─► y_q of the region
        ▼ the tile's own latents only (format 3: "stitched")
    h_a ─► z_q ─► [refine: latent search with the neighbours' y around it]
        ▼ on the CPU
    hyper_symbols: z symbols, then (μ, table index) exactly as every decoder computes them
        ▼
    y symbols round(y − μ) ─► rANS z, y ─► header (tileformat.py) + streams
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from wsicodec.entropy import encode_many, load_in_background, symbol_checksum
from wsicodec.errors import InvalidSettingError

from . import tileformat
from .decoder import channel_index
from .glass import encode_glass, uniform_fit
from .network import pad_to_stride
from .refine import refine_latents
from .synthesis import STITCH_RING
from .tileformat import LATENT_STRIDE, MAX_SIDE, PIXEL_STRIDE, exact_entropy, pack_network_header

Box = tuple[int, int, int, int]
"""(top, left, height, width) of a tile inside its region."""

#: regions per g_a pass on the CPU: larger passes allocate activations that glibc maps and
#: unmaps every time (page faults on every pass) and run slower a region than passes of 1
#: or 2, whose buffers its heap reuses (measured: docs/learned-codec.md, "g_a passes on
#: the CPU")
CPU_G_A_BATCH = 2


def check_region(t: Any) -> np.ndarray:
    """``t`` as an (h, w, 3) uint8 array with sides in 1..65535, else InvalidSettingError."""
    t = np.asarray(t)
    if t.ndim != 3 or t.shape[2] != 3 or t.dtype != np.uint8:
        raise InvalidSettingError(f"tiles must be (h, w, 3) uint8, got {t.shape} {t.dtype}")
    if not (1 <= t.shape[0] <= MAX_SIDE and 1 <= t.shape[1] <= MAX_SIDE):
        raise InvalidSettingError(f"tile size {t.shape[:2]} outside 1..{MAX_SIDE}")
    return t


def check_box(region: np.ndarray, box: Box) -> None:
    """InvalidSettingError unless ``box`` = (top, left, height, width) is a non-empty tile
    inside ``region`` with margins of 0..255 pixels before it."""
    top, left, h, w = box
    if not (0 <= top <= 255 and 0 <= left <= 255 and h >= 1 and w >= 1
            and top + h <= region.shape[0] and left + w <= region.shape[1]):
        raise InvalidSettingError(f"tile box {box} does not fit its region {region.shape[:2]} (margins 0..255)")


def align_to_grid(region: np.ndarray, box: Box) -> tuple[np.ndarray, Box]:
    """``region`` and the tile's ``box`` in it, moved onto y's 16-pixel grid: the context
    rows/columns before the tile that break the grid are dropped."""
    top, left, h, w = box
    dy, dx = top % PIXEL_STRIDE, left % PIXEL_STRIDE
    if dy or dx:
        return region[dy:, dx:], (top - dy, left - dx, h, w)
    return region, box


def hyper_symbols(model, z, quality, y_size: tuple[int, int], exact: bool = True):
    """The encoder's side information, as every decoder will see it.

    ``z`` (B, N, h, w) from :meth:`~wsicodec.learned.network.WsiHyperprior.analysis` (on
    the CPU) → its symbols, then (μ, CDF-table index) for y computed from ẑ exactly as
    :meth:`~wsicodec.learned.decoder.TileDecoder.entropy_decode` does for a tile of the
    current format (``exact``; False: as format 1 did), cropped to y's ``y_size``.
    Returns ``(z_sym int32, μ float64, index int32)``.  The y symbols are ``round(y − μ)``,
    or any integers an encoder prefers: the decoder adds μ back.
    """
    import torch
    medians = model.entropy_bottleneck._get_medians().reshape(1, -1, 1, 1)
    z_sym = torch.round(z - medians).to(torch.int32)
    mu, index = model.entropy_parameters(z_sym.double() + medians.double(), quality, exact=exact,
                                         size=(int(y_size[0]), int(y_size[1])))
    return z_sym, mu, index


class TileEncoder:
    """The encoding half of a learned codec: its weights, g_a/h_a on ``device`` in
    ``precision``, ``refine`` steps of latent search, at one ``quality``."""

    def __init__(self, loaded: Any, quality: float, device: Any, precision: str, refine: int) -> None:
        self.loaded, self.quality, self.device = loaded, quality, device
        self.precision, self.refine = precision, refine
        self.model = loaded.model                     # the entropy parameters: on the CPU
        self.tables = self.model.coding_tables()
        load_in_background(encode=True)               # numba's coder, while g_a runs

    def encode(self, regions: Sequence[np.ndarray], boxes: Sequence[Box] | None = None) -> list[bytes]:
        """Tiles → bytes; regions of equal size share g_a passes (on the CPU of
        at most :data:`CPU_G_A_BATCH` regions).

        Without ``boxes`` each array is a tile.  With ``boxes``, array ``i`` is a *region*
        (the tile plus context pixels of its neighbours on each side) and ``boxes[i]`` says
        where the tile sits in it: g_a sees the region, the stream holds the tile's latents
        only.  A box off y's 16-pixel grid loses the context rows/columns before it that
        break the grid.  Raises InvalidSettingError (a region or box that does not fit).
        """
        out: list[bytes | None] = [None] * len(regions)
        groups: dict[tuple[int, int], list[int]] = {}
        regions = [check_region(t) for t in regions]
        boxes = [(0, 0, r.shape[0], r.shape[1]) for r in regions] if boxes is None else list(boxes)
        version = tileformat.VERSION
        for i, (r, (top, left, h, w)) in enumerate(zip(regions, boxes)):
            check_box(r, boxes[i])
            core = r[top:top + h, left:left + w]
            fit = uniform_fit(core)
            if fit is not None:
                out[i] = encode_glass(core, *fit, version)
                continue
            regions[i], boxes[i] = align_to_grid(r, boxes[i])
            groups.setdefault(regions[i].shape[:2], []).append(i)
        step = CPU_G_A_BATCH if getattr(self.device, "type", "cpu") == "cpu" else len(regions)
        for idx in groups.values():
            for k in range(0, len(idx), step):
                part = idx[k:k + step]
                for i, data in zip(part, self._encode_group([regions[i] for i in part],
                                                            [boxes[i] for i in part], version)):
                    out[i] = data
        return out  # type: ignore[return-value]

    def _encode_group(self, regions: list[np.ndarray], boxes: list[Box], version: int) -> list[bytes]:
        """Network-coded tiles of equal-size regions: one g_a pass, h_a tile by tile (each
        its own latents), then the entropy coding of all of them at once
        (:meth:`code_many`)."""
        import torch
        net = self.loaded.on(self.device)
        q1 = torch.tensor([self.quality])
        latents = []
        with torch.inference_mode():
            x = torch.from_numpy(np.stack(regions)).permute(0, 3, 1, 2)
            x = pad_to_stride(x.float().div_(255.0), PIXEL_STRIDE).to(self.device)
            y_all = net.analysis_y(x, torch.full((len(regions),), self.quality, device=self.device),
                                   self.precision)
            for k, (top, left, h, w) in enumerate(boxes):
                ty, tx = top // PIXEL_STRIDE, left // PIXEL_STRIDE
                lh, lw = -(-h // PIXEL_STRIDE), -(-w // PIXEL_STRIDE)
                y = y_all[k:k + 1, :, ty:ty + lh, tx:tx + lw]
                z = net.hyper_analysis(y, q1.to(self.device), LATENT_STRIDE)
                if self.refine:
                    y, z = self._refine(net, x[k:k + 1], y_all[k:k + 1], y, z, (ty, tx, h, w))
                latents.append((y.cpu(), z.cpu(), h, w))
        return [data for data, _ in self.code_many(latents, version, reconstruct=False)]

    def _refine(self, net, x, y_all, y, z, where: tuple[int, int, int, int]):
        """:func:`~wsicodec.learned.refine.refine_latents` of a tile whose latents start at
        (ty, tx) of ``y_all``: g_s sees its neighbours' latents too, g_a's standing in."""
        import torch
        ty, tx, h, w = where
        lh, lw = y.shape[-2:]
        a0, b0 = max(ty - STITCH_RING, 0), max(tx - STITCH_RING, 0)
        a1, b1 = min(ty + lh + STITCH_RING, y_all.shape[-2]), min(tx + lw + STITCH_RING, y_all.shape[-1])
        P = PIXEL_STRIDE
        xk = x[..., a0 * P:a1 * P, b0 * P:b1 * P]
        shown = torch.zeros(1, 1, *xk.shape[-2:], device=self.device)
        shown[..., (ty - a0) * P:(ty - a0) * P + h, (tx - b0) * P:(tx - b0) * P + w] = 1
        y, z, _ = refine_latents(net, xk, torch.tensor([self.quality]).to(self.device), y, z, shown,
                                 self.refine, window=(y_all[..., a0:a1, b0:b1], ty - a0, tx - b0))
        return y, z

    def code_latents(self, y, z, h: int, w: int, version: int = tileformat.VERSION) -> bytes:
        """A tile's gained latents ``y`` and hyper-latents ``z`` (on the CPU, from g_a and
        h_a at this encoder's quality) → its bytes: symbols, rANS, header."""
        return self.code_many([(y, z, h, w)], version, reconstruct=False)[0][0]

    def code_and_reconstruct(self, y, z, h: int, w: int, version: int = tileformat.VERSION):
        """:meth:`code_latents`, and the gained ŷ (1, M, h, w) float32 every decoder
        reconstructs from those bytes (the same symbols, μ, tables and κ as
        :meth:`~wsicodec.learned.decoder.TileDecoder.entropy_decode`, without decoding)."""
        return self.code_many([(y, z, h, w)], version)[0]

    def code_many(self, latents: Sequence[tuple[Any, Any, int, int]],
                  version: int = tileformat.VERSION, reconstruct: bool = True) -> list[tuple[bytes, Any]]:
        """:meth:`code_and_reconstruct` of many tiles ``(y, z, h, w)``: the exact h_s
        batched over the tiles of equal latent size, each stream set coded in one call
        without the GIL; the same bytes as tile by tile.  ``reconstruct`` False: ŷ is not
        computed (None in its place), for callers that want the bytes alone."""
        import torch
        out: list[Any] = [None] * len(latents)
        groups: dict[tuple[int, int], list[int]] = {}
        for k, (y, z, _, _) in enumerate(latents):
            groups.setdefault((tuple(y.shape[-2:]), tuple(z.shape[-2:])), []).append(k)
        q32 = float(torch.tensor([self.quality])[0])            # the quality a header stores
        for (ysize, _), idx in groups.items():
            z = torch.cat([latents[k][1] for k in idx])
            z_sym, mu, index = hyper_symbols(self.model, z, torch.tensor([self.quality] * len(idx)),
                                             ysize, exact=exact_entropy(version))
            ys = torch.round(torch.cat([latents[k][0] for k in idx]).double() - mu).to(torch.int32)
            zs, ys, index = z_sym.numpy(), ys.numpy(), index.numpy()
            zb = encode_many(list(zs), [channel_index(zs.shape[1:])] * len(idx), self.tables[0])
            yb = encode_many(list(ys), list(index), self.tables[1])
            for j, k in enumerate(idx):
                _, _, h, w = latents[k]
                head = pack_network_header(version, h, w, self.quality, self.loaded.model_id,
                                           symbol_checksum(zs[j], ys[j]), len(zb[j]))
                y_hat = None if not reconstruct else self.model.reconstruct(
                    torch.from_numpy(ys[j:j + 1]), mu[j:j + 1], torch.from_numpy(index[j:j + 1]), q32).float()
                out[k] = (head + zb[j] + yb[j], y_hat)
        return out
