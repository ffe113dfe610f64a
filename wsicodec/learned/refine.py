"""The encoder's latent search: better (y, z) for a tile than g_a's first guess.

The decoder is unchanged and cannot tell: any stream decodes with any setting.  What it
gains and costs at each step count is measured in ``bench/results/rd_refine_he_test.md``
(``bench/rd.py``); it optimises MSE alone, so it helps PSNR more than LPIPS.
"""

from __future__ import annotations

import math

import torch

from .network import WsiHyperprior, sample_bits, ste_round

#: Adam step of :func:`refine_latents`, in quantisation bins of y
REFINE_LR = 0.01


def refine_latents(model: WsiHyperprior, x: torch.Tensor, quality: torch.Tensor, y: torch.Tensor, z: torch.Tensor,
                   shown: torch.Tensor, steps: int, lr: float = REFINE_LR,
                   window: tuple[torch.Tensor, int, int] | None = None,
                   hold: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Encoder-side search for better latents: g_a's answer is only a first guess.

    ``model``'s coded cost of the gained latents ``y``, ``z`` of ``x`` at ``quality``
    (one per sample), lowered by ``steps`` steps of Adam of size ``lr``.

    Minimises each sample's coded cost, bits/pixel + λ(q)·255²·MSE, over y and z
    by Adam, with the MSE taken on ``shown`` ((B, 1, H, W): 1 on the pixels the
    decoder will show, 0 on context margin and padding).  Rounding is relaxed by
    stochastic Gumbel annealing (Yang et al. 2020, "Improving inference for
    neural image compression"): each y − μ is a soft draw between its floor and
    ceiling whose temperature falls from 0.5 towards 0 over the last three
    quarters of the steps.  After every step the *hard* cost (the symbols it
    would code, straight rounding, z's rate from the factorized prior, the pixels
    decoded as the decoder reconstructs ŷ) is taken, and the best (y, z) met per
    sample is returned, so the result never costs
    more than g_a's by that measure.  The decoder is unchanged and cannot tell.

    ``window`` = (gained latents (B, M, H', W'), top, left): for a stitched tile, the
    latents g_s will see around it (its neighbours', held fixed), with y at
    ``[top:top + h, left:left + w]``; ``x`` and ``shown`` are then the window's pixels.
    ``shown`` may weigh pixels (values other than 0 and 1).

    ``hold`` (bool, y's shape): the entries of y that stay as given, and z with them, so
    the entropy parameters do not move and those entries code the same symbols and
    decode to the same ŷ (what a tile's already decided neighbours see of it).

    Returns (y, z, info) with per-sample tensors ``info["loss0"]`` (g_a's hard
    cost), ``info["loss"]`` (the best) and ``info["history"]`` (B, steps + 1).
    """
    gen = torch.Generator(device=x.device).manual_seed(0)   # the same input codes the same
    with torch.inference_mode(False), torch.enable_grad():
        x, shown = x.clone(), shown.clone()
        gain, hgain = (g.detach() for g in model.gains(quality, x.dtype))
        lam = model.lambda_at(quality).to(x.dtype).detach()
        pixels = shown.flatten(1).sum(1).clamp_min(1)
        medians = model.entropy_bottleneck._get_medians().detach().reshape(1, -1, 1, 1)
        yv = y.detach().clone().requires_grad_(True)
        zv = z.detach().clone().requires_grad_(True)
        qs = [float(v) for v in quality.reshape(-1)]
        moved = any(model.reconstruction_kappa(v) for v in qs)   # the decoder moves ŷ
        opt = torch.optim.Adam([yv, zv], lr=lr)

        def cost(tau: float) -> torch.Tensor:
            z_hat = ste_round(zv - medians) + medians
            z_lik = model.z_likelihood(z_hat)
            params = model.h_s(z_hat / hgain)[..., :yv.shape[-2], :yv.shape[-1]]   # y was padded for h_a
            scales, means = params.chunk(2, 1)
            if tau > 0:   # two-way Gumbel softmax = sigmoid(logit difference + logistic noise)
                v = yv - means
                lo = torch.floor(v).detach()
                r = (v - lo).clamp(1e-5, 1 - 1e-5)
                u = torch.rand(v.shape, generator=gen, device=v.device, dtype=v.dtype).clamp(1e-6, 1 - 1e-6)
                up = torch.sigmoid((torch.atanh(r) - torch.atanh(1 - r)) / tau + torch.log(u / (1 - u)))
                y_hat = lo + up + means
            else:
                y_hat = ste_round(yv - means) + means
            bits = sample_bits(model.y_likelihood(y_hat, scales, means)) + sample_bits(z_lik)
            if tau == 0 and moved:   # the hard cost: the pixels the decoder will show
                idx = model.table_index(scales)
                s = torch.round(yv - means)
                y_hat = torch.cat([model.reconstruct(s[i:i + 1], means[i:i + 1], idx[i:i + 1], v)
                                   for i, v in enumerate(qs)]).to(yv.dtype)
            if window is not None:
                around, top, left = window
                win = around.detach().to(y_hat.dtype).clone()
                win[..., top:top + y_hat.shape[-2], left:left + y_hat.shape[-1]] = y_hat
                y_hat = win
            x_hat = model.g_s(y_hat / gain).clamp(0, 1)
            sse = ((x_hat - x) ** 2 * shown).flatten(1).sum(1)
            return bits / pixels + lam * 255.0 ** 2 * sse / (3 * pixels)

        best_y, best_z = y.detach().clone(), z.detach().clone()
        history = []
        for it in range(steps + 1):
            with torch.no_grad():
                hard = cost(0.0)
                if it == 0:
                    best = hard.clone()
                better = hard < best
                best = torch.where(better, hard, best)
                best_y[better], best_z[better] = yv[better], zv[better]
            history.append(hard)
            if it == steps:
                break
            tau = 0.5 * math.exp(-4.0 * max(0.0, it / steps - 0.25))
            yv.grad, zv.grad = torch.autograd.grad(cost(tau).sum(), [yv, zv])
            if hold is not None:            # Adam never moves an entry whose gradient stays 0
                yv.grad[hold.expand_as(yv)] = 0
                zv.grad.zero_()
            opt.step()
    return best_y, best_z, {"loss0": history[0], "loss": best, "history": torch.stack(history, 1)}

