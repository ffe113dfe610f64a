"""Fast inference copies of g_a and g_s: the same maps, arranged for speed.

:class:`FastTransform` keeps tensors channels-last (oneDNN's fast layout), computes
GDN with its reparametrised weights frozen (:class:`FrozenGDN`), and a narrow 5×5
stride-2 transposed convolution as a sub-pixel convolution (:class:`SubPixelDeconv`).
``bf16_body`` runs the inner layers under bfloat16 autocast (:func:`bf16_body_forward`,
the codec's ``precision="bfloat16"``).  Speed: ``bench/tile_speed.py``
(``bench/results/tile_speed.json``).
"""

from __future__ import annotations

import copy
import warnings
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

with warnings.catch_warnings():
    # compressai 1.2.8 calls torch.jit.script at import, which torch >= 2.10 deprecates
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    from wsicodec._compressai import load as _load_compressai
    _load_compressai()   # without its package __init__'s eager imports (torch_geometric, ...)
    from compressai.layers import GDN

from .synthesis import Box

#: FastTransform computes a transposed convolution with fewer output channels than this as
#: :class:`SubPixelDeconv`: g_s's last layer (96 → 3 channels, 136² → 272²) took 13.1 ms
#: as oneDNN's transposed convolution and 5.7 ms in that form (one thread, development CPU);
#: the 96-channel ones are faster as they are (20.4 ms against 28.4 at 68² → 136²).
SUBPIXEL_BELOW = 16


class FastTransform(nn.Module):
    """An inference copy of g_a or g_s: identical maps, arranged for speed.

    Tensors stay channels-last (oneDNN's fast layout, for the transposed convolutions
    above all), and each GDN, ``x·(β + γ·x²)^(∓½)``, uses γ and β reparametrised once
    at construction instead of on every call.  Built from trained weights; frozen.

    ``bf16_body``: the layers after the first two (a convolution and its GDN) and before
    the last run under bfloat16 autocast (the weights, the ends and the output stay
    float32), as ``train.py --bf16-body`` trains them: not the same map, a close one.
    """

    def __init__(self, transform: nn.Sequential, bf16_body: bool = False) -> None:
        super().__init__()
        self.bf16_body = bf16_body
        layers = []
        for layer in transform:
            if isinstance(layer, GDN):
                layers.append(FrozenGDN(layer))
            elif isinstance(layer, nn.ConvTranspose2d) and layer.out_channels < SUBPIXEL_BELOW:
                layers.append(SubPixelDeconv(layer))
            else:
                layers.append(copy.deepcopy(layer))
        self.layers = nn.Sequential(*layers).to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        self.eval()

    def forward(self, y: torch.Tensor, box: Box | None = None) -> torch.Tensor:
        """The map of ``y``; with ``box`` = (top, left, h, w), only that part of the output
        (g_s: the tile's pixels of its stitched window), each layer computed only where
        that part depends on it (:func:`crop_plan`), for less work.  Each output sums
        the same products as in the whole map; oneDNN may order a sum differently for
        another input width, which moves a pixel by one level now and then (a few in
        10⁵ on he/test crops, none on most 256² tiles: ``tests/test_learned_internals.py``),
        as another batch size can."""
        y = y.contiguous(memory_format=torch.channels_last)
        plan = None if box is None else crop_plan(self.layers, y.shape[-2:], box)
        if plan is None:
            x = bf16_body_forward(self.layers, y) if self.bf16_body else self.layers(y)
            if box is not None:
                x = x[..., box[0]:box[0] + box[2], box[1]:box[1] + box[3]]
            return x.contiguous()
        (r0, r1), (c0, c1) = plan[0]
        x, dtype, last = y[..., r0:r1, c0:c1].contiguous(memory_format=torch.channels_last), y.dtype, len(self.layers) - 1
        for k, layer in enumerate(self.layers):
            body = self.bf16_body and 2 <= k < last          # as bf16_body_forward splits them
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=body):
                x = layer(x)
            if body and k == last - 1:
                x = x.to(dtype)
            up = 2 if _reach(layer) == "up" else 1
            (a0, a1), (b0, b1) = plan[k + 1]                  # x starts at (up·r0, up·c0)
            # copied out now, so the layer's whole output is freed before the next runs
            x = x[..., a0 - up * r0:a1 - up * r0, b0 - up * c0:b1 - up * c0].contiguous(
                memory_format=torch.contiguous_format if k == last else torch.channels_last)
            r0, c0 = a0, b0
        return x


def _reach(layer: nn.Module) -> int | str | None:
    """How far one output of ``layer`` reaches into its input: "up" for a 5×5 stride-2
    "same" transposed convolution (output o reads inputs ⌈(o−2)/2⌉ .. ⌊(o+2)/2⌋), else
    the radius of a size-keeping stride-1 layer (a convolution of odd size and "same"
    padding, a GDN, a residual block of such convolutions), None for anything else."""
    if isinstance(layer, SubPixelDeconv):
        return "up"
    if isinstance(layer, nn.ConvTranspose2d):
        geometry = (layer.kernel_size, layer.stride, layer.padding, layer.output_padding, layer.dilation)
        return "up" if geometry == ((5, 5), (2, 2), (2, 2), (1, 1), (1, 1)) else None
    if isinstance(layer, (FrozenGDN, nn.LeakyReLU, nn.ReLU)):
        return 0
    if isinstance(layer, nn.Conv2d):
        k, st, pad, dil = layer.kernel_size, layer.stride, layer.padding, layer.dilation
        ok = k[0] == k[1] and k[0] % 2 == 1 and st == (1, 1) and dil == (1, 1) and pad == (k[0] // 2, k[0] // 2)
        return k[0] // 2 if ok else None
    if type(layer).__name__ == "ResidualBlock":      # compressai's: conv, act, conv, act, + x
        parts = [_reach(m) for m in layer.children()]
        return sum(parts) if parts and all(isinstance(p, int) for p in parts) else None
    return None


def crop_plan(layers: Sequence[nn.Module], size: Sequence[int], box: Box
              ) -> list[tuple[tuple[int, int], tuple[int, int]]] | None:
    """For an input of ``size`` (h, w) and the output part ``box``: per layer, the
    (rows, columns) of its input that part depends on, clipped to the input (beyond it
    the layer pads with zeros either way), then the box itself; None where a layer's
    reach is unknown (:func:`_reach`)."""
    reach = [_reach(layer) for layer in layers]
    if any(r is None for r in reach):
        return None
    axes = []
    for n, lo, length in ((size[0], box[0], box[2]), (size[1], box[1], box[3])):
        sizes = [n]
        for r in reach:
            sizes.append(sizes[-1] * (2 if r == "up" else 1))
        if not (0 <= lo and lo + length <= sizes[-1] and length > 0):
            return None
        spans, (o0, o1) = [(lo, lo + length)], (lo, lo + length)
        for k in range(len(layers) - 1, -1, -1):
            r = reach[k]
            i0, i1 = ((o0 - 1) // 2, (o1 + 1) // 2 + 1) if r == "up" else (o0 - r, o1 + r)
            o0, o1 = max(0, i0), min(sizes[k], i1)
            spans.append((o0, o1))
        axes.append(spans[::-1])
    return list(zip(*axes))


def bf16_body_forward(layers: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Run g_a's or g_s's ``layers`` with those after the first two (a convolution and its
    GDN) and before the last under bfloat16 autocast: the split ``train.py --bf16-body``
    trains with and :class:`FastTransform` (``precision="bfloat16"``) infers with.  The
    ends stay in ``x``'s dtype on purpose: g_a's last layer makes the latents that are
    rounded (bfloat16 steps are 0.25 at 32), g_s's first reads them, and its last makes
    the pixels."""
    dtype = x.dtype
    x = layers[1](layers[0](x))
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        for layer in layers[2:-1]:
            x = layer(x)
    return layers[-1](x.to(dtype))


class SubPixelDeconv(nn.Module):
    """A 5×5 stride-2 transposed convolution as a 3×3 convolution and a pixel shuffle.

    The same map: output pixel (2a + r, 2b + s) sees inputs a − 1 .. a + 1 (rows) through
    taps 4, 2, 0 of the kernel for r = 0 and —, 3, 1 for r = 1 (likewise for columns), so
    each of the four output phases is a 3×3 convolution of the input, the four stacked as
    channels ``c·4 + 2r + s``, the order :func:`torch.nn.functional.pixel_shuffle` undoes.
    36 multiply-adds where the transposed convolution does 25, but dense ones.
    """

    TAPS = ((4, 2, 0), (None, 3, 1))   # kernel tap seen by window position j, per phase r

    def __init__(self, deconv: nn.ConvTranspose2d) -> None:
        super().__init__()
        if (deconv.kernel_size, deconv.stride, deconv.padding, deconv.output_padding, deconv.groups,
                deconv.dilation) != ((5, 5), (2, 2), (2, 2), (1, 1), 1, (1, 1)):
            raise ValueError(f"not a 5x5 stride-2 'same' transposed convolution: {deconv}")
        w = deconv.weight.detach()                      # (C_in, C_out, 5, 5)
        cin, cout = w.shape[:2]
        weight = w.new_zeros(cout, 2, 2, cin, 3, 3)
        for r in (0, 1):
            for s in (0, 1):
                for jy, ky in enumerate(self.TAPS[r]):
                    for jx, kx in enumerate(self.TAPS[s]):
                        if ky is not None and kx is not None:
                            weight[:, r, s, :, jy, jx] = w[:, :, ky, kx].t()
        bias = deconv.bias.detach() if deconv.bias is not None else w.new_zeros(cout)
        self.register_buffer("weight", weight.reshape(cout * 4, cin, 3, 3).clone())
        self.register_buffer("bias", bias.repeat_interleave(4).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(F.conv2d(x, self.weight, self.bias, padding=1), 2)


class FrozenGDN(nn.Module):
    """GDN / inverse GDN with γ and β reparametrised once: ``x·(β + γ·x²)^(∓½)``."""

    def __init__(self, gdn: GDN) -> None:
        super().__init__()
        with torch.no_grad():
            beta = gdn.beta_reparam(gdn.beta).detach().clone()
            c = beta.numel()
            gamma = gdn.gamma_reparam(gdn.gamma).detach().reshape(c, c, 1, 1).clone()
        self.inverse = gdn.inverse
        self.register_buffer("beta", beta)
        self.register_buffer("gamma", gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = F.conv2d(x * x, self.gamma, self.beta)
        norm = norm.sqrt_() if self.inverse else norm.rsqrt_()
        return norm.mul_(x)
