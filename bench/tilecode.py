"""The learned codec's per-tile encoder path, opened up for experiments on what it codes.

``bench/context_rd.py`` (another entropy model for y) and ``bench/rounding_probe.py``
(other integers for y) both need what :meth:`wsicodec.learned.LearnedCodec.encode_tiles`
computes before it writes y: the tile grid with its context margin, the glass rule, g_a
over the context region cropped to the tile's latents, the z stream and the float64
(μ, table index).  :func:`tiles` yields exactly that, tile by tile; :func:`stream_bytes`
prices whatever y symbols an experiment chooses as the codec would code them, and
:func:`image_pixels` / :func:`image_sse` score the whole image as the readers decode it:
every tile's ŷ (and every glass tile's colour latent) in one latent plane, g_s once over
it (the readers' 2-latent stitching ring gives the same pixels to ~1e-4 dB), then the
readers' blending at plane glass borders (:func:`wsicodec.learned.glass.blend_toward_glass`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from wsicodec.entropy import encode_symbols
from wsicodec.image import context_region, tile_cells
from wsicodec.learned import (DEFAULT_MARGIN, NETWORK_HEADER_BYTES, PIXEL_STRIDE, hyper_symbols,
                              pad_to_stride, parse_header, uniform_fit, uniform_latent)
from wsicodec.learned.decoder import channel_index
from wsicodec.learned.glass import (SIDES, blend_toward_glass, decode_glass, encode_glass, plane_edge,
                                    uniform_colour)
from wsicodec.learned.tileformat import LATENT_STRIDE, PLANE_KINDS, VERSION

TILE = 256


@dataclass
class Glass:
    """A tile the background rule codes as a colour plane: its bytes, SSE and pixels on its
    own (beside other plane glass tiles the readers draw its border toward theirs:
    :func:`image_pixels`)."""
    nbytes: int
    sse: float
    pixels: np.ndarray        #: the decoded tile (h, w, 3) uint8, on its own
    rgb: bytes                #: its (mean) colour, what it gives its neighbours' stitching
    rows: slice               #: where it sits in the image
    cols: slice
    data: bytes = b""         #: its bytes


@dataclass
class NetworkTile:
    """A tile for the network: everything up to the choice of y symbols."""
    core: np.ndarray          #: the tile's own pixels (h, w, 3) uint8
    box: tuple[int, int, int, int]   #: (top, left, h, w) of the core in the decoded pixels
    quality: torch.Tensor     #: (1,)
    gain: torch.Tensor        #: (1, M, 1, 1) float32: the quality's gain on y
    y: torch.Tensor           #: gained latents (1, M, h, w) float64
    mu: torch.Tensor          #: (1, M, h, w) float64, as the decoder computes it
    index: torch.Tensor       #: (1, M, h, w) int32 CDF-table index, as the decoder computes it
    side_bytes: int           #: tile header + z stream
    rows: slice               #: where it sits in the image
    cols: slice


@torch.inference_mode()
def tiles(model, tables, img: np.ndarray, quality: float, tile: int = TILE,
          margin: int = DEFAULT_MARGIN) -> Iterator[Glass | NetworkTile]:
    """The tiles of ``img`` as the codec codes them (``tables``: ``model.coding_tables()``)."""
    tb_z, _ = tables
    q = torch.tensor([float(quality)])
    gain, _ = model.gains(q)
    h, w = img.shape[:2]
    for _, _, ys, xs in tile_cells(h, w, tile):
        region, box = context_region(img, ys, xs, margin)
        top, left, th, tw = box
        core = region[top:top + th, left:left + tw]
        fit = uniform_fit(core)
        if fit is not None:
            data = encode_glass(core, *fit, VERSION)
            hd = parse_header(data)
            pixels = decode_glass(data, hd)
            d = pixels.astype(np.float64) - core
            yield Glass(len(data), float((d ** 2).sum()), pixels, uniform_colour(data, hd), ys, xs, data)
            continue
        dy, dx = top % PIXEL_STRIDE, left % PIXEL_STRIDE       # as the encoder: onto y's grid
        x = torch.from_numpy(np.ascontiguousarray(region[dy:, dx:])).permute(2, 0, 1)[None].float().div(255)
        x = pad_to_stride(x, PIXEL_STRIDE)
        ty, tx = (top - dy) // PIXEL_STRIDE, (left - dx) // PIXEL_STRIDE
        y = model.analysis_y(x, q)[..., ty:ty + -(-th // PIXEL_STRIDE), tx:tx + -(-tw // PIXEL_STRIDE)]
        z = model.hyper_analysis(y, q, LATENT_STRIDE)
        z_sym, mu, index = hyper_symbols(model, z, q, y.shape[-2:])
        side = NETWORK_HEADER_BYTES + len(encode_symbols(z_sym[0].numpy(), channel_index(z_sym.shape[1:]), tb_z))
        yield NetworkTile(core, (0, 0, th, tw), q, gain, y.double(), mu, index, side, ys, xs)


def stream_bytes(symbols: torch.Tensor, index: torch.Tensor, table) -> int:
    """Bytes of one rANS stream of integer ``symbols`` under CDF-table ``index`` (same shapes)."""
    return len(encode_symbols(symbols.to(torch.int32).numpy(), index.numpy(), table))


@torch.inference_mode()
def latent_plane(model, shape: tuple[int, ...], parts: list) -> torch.Tensor:
    """The ungained latent plane (1, M, ⌈h/16⌉, ⌈w/16⌉) the readers hand g_s: each network
    tile's ŷ / gain, each glass tile's colour latent (``parts`` as :func:`image_pixels`)."""
    h, w = shape[:2]
    plane = torch.zeros(1, model.config.M, -(-h // PIXEL_STRIDE), -(-w // PIXEL_STRIDE))
    for t, y_hat in parts:
        r0, c0 = t.rows.start // PIXEL_STRIDE, t.cols.start // PIXEL_STRIDE
        lh = -(-(t.rows.stop - t.rows.start) // PIXEL_STRIDE)
        lw = -(-(t.cols.stop - t.cols.start) // PIXEL_STRIDE)
        if isinstance(t, Glass):
            plane[..., r0:r0 + lh, c0:c0 + lw] = uniform_latent(model, t.rgb)
        else:
            plane[..., r0:r0 + lh, c0:c0 + lw] = y_hat.float() / t.gain
    return plane


@torch.inference_mode()
def image_pixels(model, shape: tuple[int, ...], parts: list) -> np.ndarray:
    """The image (h, w, 3) as float64 0..255 levels, decoded as the readers decode it.

    ``parts``: every tile of :func:`tiles`, each network tile paired with the gained ŷ
    (1, M, h, w) an experiment chose for it: ``[(tile, y_hat), (glass, None), ...]``.
    """
    h, w = shape[:2]
    x_hat = model.synthesize(latent_plane(model, shape, parts)).clamp(0, 1)
    out = (x_hat[0].permute(1, 2, 0).numpy()[:h, :w] * 255).round().astype(np.uint8)
    rs = sorted({t.rows.start for t, _ in parts})
    cs = sorted({t.cols.start for t, _ in parts})
    at = {(rs.index(t.rows.start), cs.index(t.cols.start)): t for t, _ in parts}

    def plane_edges(t) -> dict:          # as the readers' GridJob.glass_edges
        edges = {}
        r, c = rs.index(t.rows.start), cs.index(t.cols.start)
        for dr, dc in SIDES:
            nb = at.get((r + dr, c + dc))
            if not isinstance(nb, Glass):
                continue
            nhd = parse_header(nb.data)
            if nhd.kind in PLANE_KINDS and (nb.cols if dr else nb.rows) == (t.cols if dr else t.rows):
                edges[(dr, dc)] = plane_edge(nb.data, nhd, (-dr, -dc))
        return edges

    final = out.copy()
    for t, _ in parts:
        if isinstance(t, Glass):
            hd = parse_header(t.data)
            final[t.rows, t.cols] = decode_glass(t.data, hd, around=plane_edges(t) if hd.kind in PLANE_KINDS else None)
        else:
            final[t.rows, t.cols] = blend_toward_glass(out[t.rows, t.cols], plane_edges(t))
    return final.astype(np.float64)


def image_sse(model, img: np.ndarray, parts: list) -> float:
    """SSE (0..255 levels) of :func:`image_pixels` against ``img``."""
    return float(((image_pixels(model, img.shape, parts) - img.astype(np.float64)) ** 2).sum())
