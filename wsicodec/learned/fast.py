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

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        y = y.contiguous(memory_format=torch.channels_last)
        x = bf16_body_forward(self.layers, y) if self.bf16_body else self.layers(y)
        return x.contiguous()


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
