"""The learned tile codec: a variable-rate mean-scale hyperprior.

Data flow (names follow Ballé et al. 2018 / Minnen et al. 2018, as in CompressAI)::

    x ──g_a──► y ──×gain[q]──► y_q ──h_a──► z ──×hgain[q]──► z_q ──Q──► ẑ_q
                                │                                      │
                                │                           ×1/hgain[q]│
                                │                                      ▼
                                │                         h_s ──► (μ, σ)
                                ▼                                      │
                 ŷ_q = Q(y_q − μ) + μ  ◄───────────────────────────────┘
                                │
                         ×1/gain[q]
                                ▼
                         ŷ ──g_s──► x̂

* ``z_q`` is coded with a factorized prior (:class:`EntropyBottleneck`),
  ``y_q`` with a Gaussian whose mean μ and scale σ come from ``h_s(ẑ)``.
* ``gain[q]`` / ``hgain[q]`` are per-channel gain vectors, one per knot of the λ
  ladder (Cui et al. 2021, "asymmetric gained" units).  The knots are spread evenly
  over the quality scale 1..8 and any quality between them interpolates the
  log-gains (training draws integer qualities and a share anywhere in between), so
  one set of weights covers the whole rate range.
* No autoregressive context model: every latent of a tile is decoded in parallel.
* The decoder's ŷ_q is μ + s (s the decoded symbol) moved κ(q) of the way toward the mean
  of s's quantisation bin under the coded Gaussian (:meth:`WsiHyperprior.reconstruct`;
  κ per quality fitted on training images and stored in the weights' config; κ < 0, away
  from it, at the top qualities): pixels only, the symbols and the stream are the same
  whatever κ is.

The network only computes; bitstreams are made in :mod:`wsicodec.entropy`, and
the path ẑ → h_s → (μ, table index) used for coding is
:meth:`WsiHyperprior.entropy_parameters`, run in integer arithmetic
(:class:`ExactHyperSynthesis`) so that the encoder and every decoder, on any machine,
agree bit for bit.
"""

from __future__ import annotations

import copy
import math
import threading
import warnings
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

with warnings.catch_warnings():
    # compressai 1.2.8 calls torch.jit.script at import, which torch >= 2.10 deprecates
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    from ._compressai import load as _load_compressai
    _load_compressai()   # without its package __init__'s eager imports (torch_geometric, ...)
    from compressai.entropy_models import EntropyBottleneck, GaussianConditional
    from compressai.layers import GDN

#: The λ ladder (loss = rate + λ·255²·MSE): knots spread evenly over the public quality
#: scale 1..8 (quality 1 = the first λ, 8 = the last; fractional qualities interpolate
#: the log-gains).  CompressAI's ladder moved down one level (its top spent bits on H&E for
#: little PSNR), then extended by two knots below so quality 1 reaches ~0.13 bpp and one
#: above (0.13) so quality 8 reaches ~1.5 bpp (the shipped weights' ladder).  (The
#: lowest knot coded bigger than the next while training used 128² crops; on 256² crops
#: it does not: train/README.md.  A steeper 8-level ladder, 0.0005 … 0.09, cost the shared
#: transforms 1.5-2.7 dB at equal rate.)
DEFAULT_LAMBDAS = (0.00025, 0.00047, 0.0009, 0.0018, 0.0035, 0.0067, 0.013, 0.025, 0.0483, 0.0932, 0.13)

#: the public quality scale is 1..QUALITY_MAX whatever the number of λ knots
QUALITY_MAX = 8

SCALES_MIN, SCALES_MAX, SCALES_LEVELS = 0.11, 256.0, 64
#: Adam step of :meth:`WsiHyperprior.refine_latents`, in quantisation bins of y
REFINE_LR = 0.01
_CACHE_LOCK = threading.Lock()


def scale_table() -> torch.Tensor:
    """The 64 σ values the Gaussian CDF tables are built for (log-spaced)."""
    return torch.exp(torch.linspace(math.log(SCALES_MIN), math.log(SCALES_MAX), SCALES_LEVELS))


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters that fully describe the network (stored in every checkpoint)."""

    N: int = 96                       #: channels of the transforms
    M: int = 128                      #: channels of the latent y
    lambdas: tuple[float, ...] = field(default=DEFAULT_LAMBDAS)  #: λ per quality level
    #: residual blocks in g_a before its last layer (encoder only: the decoder is the same
    #: network whatever this is; ``train.py --enc-blocks K --freeze-decoder`` adds them)
    enc_blocks: int = 0
    #: residual blocks in g_s after its first layer (at 1/8 resolution, where one adds 11 %
    #: to g_s's 24 k multiply-adds per pixel); part of the decoder: weights that differ
    #: here decode differently (``train.py --dec-blocks K`` adds them, trained jointly)
    dec_blocks: int = 0
    #: decoder reconstruction of y: κ at qualities spread evenly over 1..8 (linear between),
    #: how far each decoded latent moves from its bin centre μ + s toward the centroid of
    #: the bin under the Gaussian it was coded with (:meth:`WsiHyperprior.reconstruct`);
    #: negative: away from it, which the top qualities want.
    #: Empty (every export before it): bin centres, κ = 0.  Pixels only, never symbols:
    #: streams decode to the same symbols whatever it is.  Fitted on training images by
    #: ``train/tune_reconstruction.py``, stored by ``train/export.py --reconstruction``.
    reconstruction: tuple[float, ...] = ()

    @property
    def levels(self) -> int:
        return len(self.lambdas)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lambdas"] = list(self.lambdas)
        d["reconstruction"] = list(self.reconstruction)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(N=int(d["N"]), M=int(d["M"]), lambdas=tuple(float(v) for v in d["lambdas"]),
                   enc_blocks=int(d.get("enc_blocks", 0)),    # weights made before them have none
                   dec_blocks=int(d.get("dec_blocks", 0)),
                   reconstruction=tuple(float(v) for v in d.get("reconstruction", ())))


def _conv(cin: int, cout: int, k: int = 5, s: int = 2) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=s, padding=k // 2)


def _deconv(cin: int, cout: int, k: int = 5, s: int = 2) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, k, stride=s, padding=k // 2, output_padding=s - 1)


class ResidualBlock(nn.Module):
    """x + conv3×3(LeakyReLU(conv3×3(x))), the second conv zero-initialised.

    A new block is the identity, so it can be added to a trained g_a or g_s without
    changing what the network computes until training moves it.
    """

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.leaky_relu(self.conv1(x), 0.01))


def _bits(likelihoods: torch.Tensor) -> torch.Tensor:
    """Per-sample bits of a (B, ...) tensor of likelihoods."""
    return -torch.log2(likelihoods).flatten(1).sum(1)


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return (torch.round(x) - x).detach() + x


class WsiHyperprior(nn.Module):
    """Variable-rate mean-scale hyperprior (see the module docstring for the diagram)."""

    #: the input height/width must be a multiple of this (four stride-2 layers in g_a, two in h_a)
    STRIDE = 64
    #: what the decoder uses: a network that differs from another only outside these
    #: (g_a, h_a: the encoder) decodes the other's bitstreams identically
    DECODER_PARTS = ("g_s.", "h_s.", "entropy_bottleneck.", "gaussian_conditional.", "log_gain", "log_hgain")

    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        N, M, L = config.N, config.M, config.levels
        self.config = config
        self.g_a = nn.Sequential(
            _conv(3, N), GDN(N), _conv(N, N), GDN(N), _conv(N, N), GDN(N),
            *(ResidualBlock(N) for _ in range(config.enc_blocks)), _conv(N, M))
        self.g_s = nn.Sequential(
            _deconv(M, N), GDN(N, inverse=True), *(ResidualBlock(N) for _ in range(config.dec_blocks)),
            _deconv(N, N), GDN(N, inverse=True),
            _deconv(N, N), GDN(N, inverse=True), _deconv(N, 3))
        self.h_a = nn.Sequential(
            _conv(M, N, 3, 1), nn.LeakyReLU(inplace=True), _conv(N, N), nn.LeakyReLU(inplace=True),
            _conv(N, N))
        self.h_s = nn.Sequential(
            _deconv(N, M), nn.LeakyReLU(inplace=True), _deconv(M, M * 3 // 2),
            nn.LeakyReLU(inplace=True), _conv(M * 3 // 2, 2 * M, 3, 1))
        self.entropy_bottleneck = EntropyBottleneck(N)
        self.gaussian_conditional = GaussianConditional(None)
        # Quantisation step of level l ~ 1/sqrt(λ_l): start the gains there.
        lam = torch.tensor(config.lambdas)
        log_g = 0.5 * torch.log(lam / lam[L // 2])
        self.log_gain = nn.Parameter(log_g[:, None].repeat(1, M).clone())
        self.log_hgain = nn.Parameter((0.5 * log_g)[:, None].repeat(1, N).clone())

    # -------------------------------------------------------- reconstruction
    def reconstruction_kappa(self, quality: float) -> float:
        """κ of :attr:`ModelConfig.reconstruction` at ``quality`` (0 when it is empty)."""
        k = self.config.reconstruction
        if not k:
            return 0.0
        if len(k) == 1:
            return float(k[0])
        pos = (min(max(float(quality), 1.0), QUALITY_MAX) - 1) * (len(k) - 1) / (QUALITY_MAX - 1)
        lo = min(int(pos), len(k) - 2)
        t = pos - lo
        return float(k[lo] * (1 - t) + k[lo + 1] * t)

    def reconstruct(self, symbols: torch.Tensor, mu: torch.Tensor, index: torch.Tensor,
                    quality: float, kappa: float | None = None) -> torch.Tensor:
        """Gained ŷ (float64) from decoded y symbols ``s`` = round(y − μ): μ + s, moved κ of
        the way toward the centroid of s's bin [s − ½, s + ½] under the zero-mean
        Gaussian of σ = the scale of the CDF table at ``index`` (the one s was coded
        with). The bins of nonzero s lean toward μ, so their mean sits inside them, not at
        their centre (``kappa``: override :meth:`reconstruction_kappa`, for tuning)."""
        s = symbols.to(torch.float64)
        y = s + mu.to(torch.float64)
        k = self.reconstruction_kappa(quality) if kappa is None else float(kappa)
        if k == 0.0:
            return y
        table = self._derived("centroid_table", self._centroid_table)
        mag = s.abs().long()
        near = mag < table.shape[1]
        off = table[index.long(), mag.clamp(max=table.shape[1] - 1)] * torch.sign(s)
        if not bool(near.all()):      # rare large symbols: the formula itself
            sigma = self.gaussian_conditional.scale_table.to(torch.float64)[index.long()]
            off = torch.where(near, off, bin_centroid_offset(s, sigma))
        return y + k * off

    def _centroid_table(self, largest: int = 32) -> torch.Tensor:
        """:func:`bin_centroid_offset` for every CDF table's σ and s = 0..largest − 1,
        (tables, largest) float64: a decoded tile needs two lookups, not error functions."""
        sigma = self.gaussian_conditional.scale_table.to(torch.float64)[:, None]
        s = torch.arange(largest, dtype=torch.float64)[None, :].expand(sigma.shape[0], -1)
        return bin_centroid_offset(s, sigma.expand_as(s)).contiguous()

    # ----------------------------------------------------------------- gains
    def position(self, quality: torch.Tensor) -> torch.Tensor:
        """Where a quality (1..8) sits on the λ ladder: 0 .. levels-1, fractional between knots."""
        q = quality.to(self.log_gain.dtype).clamp(1, QUALITY_MAX) - 1
        return q * ((self.config.levels - 1) / (QUALITY_MAX - 1))

    def lambda_at(self, quality: torch.Tensor) -> torch.Tensor:
        """λ of each quality: the ladder interpolated geometrically (what training weights MSE by)."""
        lo, t = self._knots(quality)
        log_lam = torch.log(torch.tensor(self.config.lambdas, dtype=t.dtype, device=t.device))
        return torch.exp(log_lam[lo] * (1 - t) + log_lam[lo + 1] * t)

    def _knots(self, quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.position(quality)
        lo = p.floor().long().clamp(max=self.config.levels - 2)
        return lo, p - lo.to(p.dtype)

    def gains(self, quality: torch.Tensor, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (gain, hyper gain), shapes (B, M, 1, 1) and (B, N, 1, 1).

        ``quality`` holds values in [1, 8]; the log-gains are interpolated linearly
        between the two λ knots either side of :meth:`position`.
        """
        lo, t = self._knots(quality)
        t = t[:, None]
        lg = self.log_gain[lo] * (1 - t) + self.log_gain[lo + 1] * t
        lh = self.log_hgain[lo] * (1 - t) + self.log_hgain[lo + 1] * t
        g, h = torch.exp(lg)[:, :, None, None], torch.exp(lh)[:, :, None, None]
        if dtype is not None:
            g, h = g.to(dtype), h.to(dtype)
        return g, h

    # -------------------------------------------------------------- training
    def forward(self, x: torch.Tensor, quality: torch.Tensor, hard: bool = False) -> dict:
        """Training pass: noisy latents for the rate, rounded latents (STE) for g_s.

        ``hard``: the rate too is taken on the rounded latents (straight-through): the
        bits the coder will spend, to within 1 % on he/test, where the noisy estimate
        is up to 1.6× too high at low quality.  Its gradient is taken at the rounded
        point, though, blind to a latent crossing a bin edge: an encoder trained on it
        against a frozen decoder ("soft then hard", Guo et al. 2021) spent more bits for
        less (train/README.md, run 14).  Returns ``x_hat``, per-sample bits
        ``bits_y``, ``bits_z``, and y's per-element likelihoods (``y_likelihoods``: what a
        per-channel rate weight needs).
        """
        gain, hgain = self.gains(quality)
        y = self.g_a(x) * gain
        z = self.h_a(y) * hgain
        medians = self.entropy_bottleneck._get_medians().reshape(1, -1, 1, 1)
        z_hat = ste_round(z - medians) + medians
        z_lik = self._z_likelihood(z_hat) if hard else self.entropy_bottleneck(z)[1]
        params = self.h_s(z_hat / hgain)
        scales, means = params.chunk(2, 1)
        y_hat = ste_round(y - means) + means
        if hard:
            y_lik = self._y_likelihood(y_hat, scales, means)
        else:
            _, y_lik = self.gaussian_conditional(y, scales, means)
        x_hat = self.g_s(y_hat / gain)
        return {"x_hat": x_hat, "bits_y": _bits(y_lik), "bits_z": _bits(z_lik), "y_likelihoods": y_lik}

    def _z_likelihood(self, z_hat: torch.Tensor) -> torch.Tensor:
        """The factorized prior's likelihood of integer-offset ẑ, as coded (no noise)."""
        eb = self.entropy_bottleneck
        zt = z_hat.transpose(0, 1)
        z_lik, _, _ = eb._likelihood(zt.reshape(zt.shape[0], 1, -1))
        return eb.likelihood_lower_bound(z_lik).reshape(zt.shape).transpose(0, 1)

    def _y_likelihood(self, y_hat: torch.Tensor, scales: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        gc = self.gaussian_conditional
        return gc.likelihood_lower_bound(gc._likelihood(y_hat, scales, means))

    def aux_loss(self) -> torch.Tensor:
        return self.entropy_bottleneck.loss()

    # --------------------------------------------------------------- coding
    def update(self) -> None:
        """Freeze the CDF tables (quantiles found by bisection, not by the aux loss)."""
        self.entropy_bottleneck.update(force=True, update_quantiles=True)
        self.gaussian_conditional.update_scale_table(scale_table(), force=True)

    def analysis(self, x: torch.Tensor, quality: torch.Tensor, latent_stride: int = 4
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """x → (y_q, z_q): the gained latents before quantisation.

        y_q is replicate-padded to a multiple of ``latent_stride`` before h_a, so
        x only needs to be a multiple of 16; crop h_s's output back to y_q's size.
        """
        y = self.analysis_y(x, quality)
        return y, self.hyper_analysis(y, quality, latent_stride)

    def analysis_y(self, x: torch.Tensor, quality: torch.Tensor, precision: str = "float32") -> torch.Tensor:
        """x → y_q, the gained latent (x a multiple of 16 on each side)."""
        gain, _ = self.gains(quality, x.dtype)
        return self.transform(x, precision) * gain

    def transform(self, x: torch.Tensor, precision: str = "float32") -> torch.Tensor:
        """g_a(x): the ungained latent, the scale :meth:`synthesize` takes (``precision``
        as :meth:`synthesize`'s)."""
        return self._transform("g_a", x, precision)(x)

    def hyper_analysis(self, y: torch.Tensor, quality: torch.Tensor, latent_stride: int = 4
                       ) -> torch.Tensor:
        """y_q → z_q, y_q replicate-padded to a multiple of ``latent_stride`` first."""
        _, hgain = self.gains(quality, y.dtype)
        return self.h_a(pad_to_stride(y, latent_stride)) * hgain

    def refine_latents(self, x: torch.Tensor, quality: torch.Tensor, y: torch.Tensor, z: torch.Tensor,
                       shown: torch.Tensor, steps: int, lr: float = REFINE_LR,
                       window: tuple[torch.Tensor, int, int] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Encoder-side search for better latents: g_a's answer is only a first guess.

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

        Returns (y, z, info) with per-sample tensors ``info["loss0"]`` (g_a's hard
        cost), ``info["loss"]`` (the best) and ``info["history"]`` (B, steps + 1).
        """
        gen = torch.Generator(device=x.device).manual_seed(0)   # the same input codes the same
        with torch.inference_mode(False), torch.enable_grad():
            x, shown = x.clone(), shown.clone()
            gain, hgain = (g.detach() for g in self.gains(quality, x.dtype))
            lam = self.lambda_at(quality).to(x.dtype).detach()
            pixels = shown.flatten(1).sum(1).clamp_min(1)
            medians = self.entropy_bottleneck._get_medians().detach().reshape(1, -1, 1, 1)
            yv = y.detach().clone().requires_grad_(True)
            zv = z.detach().clone().requires_grad_(True)
            qs = [float(v) for v in quality.reshape(-1)]
            moved = any(self.reconstruction_kappa(v) for v in qs)   # the decoder moves ŷ
            opt = torch.optim.Adam([yv, zv], lr=lr)

            def cost(tau: float) -> torch.Tensor:
                z_hat = ste_round(zv - medians) + medians
                z_lik = self._z_likelihood(z_hat)
                params = self.h_s(z_hat / hgain)[..., :yv.shape[-2], :yv.shape[-1]]   # y was padded for h_a
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
                bits = _bits(self._y_likelihood(y_hat, scales, means)) + _bits(z_lik)
                if tau == 0 and moved:   # the hard cost: the pixels the decoder will show
                    idx = self.table_index(scales)
                    s = torch.round(yv - means)
                    y_hat = torch.cat([self.reconstruct(s[i:i + 1], means[i:i + 1], idx[i:i + 1], v)
                                       for i, v in enumerate(qs)]).to(yv.dtype)
                if window is not None:
                    around, top, left = window
                    win = around.detach().to(y_hat.dtype).clone()
                    win[..., top:top + y_hat.shape[-2], left:left + y_hat.shape[-1]] = y_hat
                    y_hat = win
                x_hat = self.g_s(y_hat / gain).clamp(0, 1)
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
                opt.step()
        return best_y, best_z, {"loss0": history[0], "loss": best, "history": torch.stack(history, 1)}

    @torch.no_grad()
    def entropy_parameters(self, z_hat: torch.Tensor, quality: torch.Tensor, exact: bool = True,
                           size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ẑ_q → (μ, table index), deterministically; ``size`` (h, w): y's size, the
        top-left part of h_s's output that is returned (and, exact, computed).

        ``exact`` (tile format 2): h_s in integer arithmetic (:class:`ExactHyperSynthesis`),
        the same bits on any machine.  Otherwise (format 1, still read): h_s in float64 on
        the CPU, one tile at a time, on a private float64 copy, which does not depend on
        batch size, thread count or device, but may on the BLAS or CPU family in its last
        bits.  Returns float64 means and int32 CDF-table indexes, shapes (B, M, h, w).
        """
        if exact:
            h_s, q = self._h_s_exact(), quality.cpu().to(torch.float32).tolist()
        else:
            h_s64 = self._h_s64()
            _, hgain = self.gains(quality.cpu(), torch.float64)
            hgain = hgain.to(torch.float64)
        means, indexes = [], []
        for i in range(z_hat.shape[0]):
            zi = z_hat[i:i + 1].cpu().to(torch.float64)
            p = h_s(zi, q[i], size) if exact else h_s64(zi / hgain[i:i + 1])
            if size is not None:
                p = p[..., :size[0], :size[1]]
            scales, mu = p.chunk(2, 1)
            means.append(mu)
            indexes.append(self.table_index(scales.clamp_min(SCALES_MIN)))
        return torch.cat(means), torch.cat(indexes)

    def table_index(self, scales: torch.Tensor) -> torch.Tensor:
        """The CDF table each σ is coded with: the number of table entries strictly below
        it, as in CompressAI's ``build_indexes`` (int32, the shape of ``scales``)."""
        table = self.gaussian_conditional.scale_table.to(scales.dtype)
        return torch.searchsorted(table[:-1], scales.contiguous(), side="left").to(torch.int32)

    def prepare_entropy_parameters(self) -> None:
        """Build the exact and float64 copies of h_s now (they are built on first use otherwise)."""
        self._h_s_exact()
        self._h_s64()

    def prepare_synthesis(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                          precision: str = "float32") -> None:
        """Build the fast g_s copy for ``device`` now (it is built on first use otherwise)."""
        self._fast("g_s", torch.device(device), dtype, bf16_body=precision == "bfloat16")

    def _derived(self, key, build):
        """A module derived from the weights (float64 h_s, fast g_a/g_s), built once per key.

        Built outside inference mode, so it is a normal module whatever mode asked first;
        the threads of a batch decoder may ask at once.
        """
        with _CACHE_LOCK:
            cache = self.__dict__.setdefault("_derived_cache", {})
            if key not in cache:
                with torch.inference_mode(False):
                    cache[key] = build()
            return cache[key]

    def _h_s64(self) -> nn.Module:
        return self._derived("h_s64", lambda: copy.deepcopy(self.h_s).to(torch.float64).eval())

    def _h_s_exact(self) -> "ExactHyperSynthesis":
        return self._derived("h_s_exact", lambda: ExactHyperSynthesis(self.h_s, self.log_hgain, self.config.levels))

    def synthesis(self, y_hat: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
        """ŷ_q → x̂ (g_s may run on any device and dtype: it changes pixels, not symbols).

        Outside training (no autograd) this runs :class:`FastTransform`, the same maps
        in channels-last with the GDN weights reparametrised once (1.1× at two threads,
        ~1.5× at one on the development CPU: bench/results/tile_speed.json, README).
        """
        gain, _ = self.gains(quality.to(y_hat.device), y_hat.dtype)
        return self.synthesize(y_hat / gain)

    def synthesize(self, y: torch.Tensor, precision: str = "float32") -> torch.Tensor:
        """Ungained ŷ (ŷ_q / gain[q], the scale g_a's output has) → x̂.

        Latents of tiles coded at different qualities share this scale, so a decoder
        can join them into one plane before g_s (stitched tiles, :mod:`wsicodec.learned`).
        ``precision`` "bfloat16" runs g_s's inner layers in bfloat16 at inference (its
        first convolution and GDN, its last layer and the output stay float32;
        :data:`wsicodec.codecs.PRECISIONS`).
        """
        return self._transform("g_s", y, precision)(y)

    def _transform(self, name: str, x: torch.Tensor, precision: str = "float32") -> nn.Module:
        """g_a or g_s itself when training or under autograd, else its fast copy (with
        its inner layers in bfloat16 for ``precision`` "bfloat16")."""
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be float32 or bfloat16, got {precision!r}")
        if self.training or torch.is_grad_enabled():
            return getattr(self, name)
        return self._fast(name, x.device, x.dtype, bf16_body=precision == "bfloat16")

    def _fast(self, name: str, device: torch.device, dtype: torch.dtype,
              bf16_body: bool = False) -> "FastTransform":
        """The inference copy of g_a or g_s for this device and dtype (built once)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:   # "cuda" and "cuda:0" are one copy
            device = torch.device("cuda", torch.cuda.current_device())
        return self._derived((name, str(device), dtype, bf16_body),
                             lambda: FastTransform(getattr(self, name), bf16_body).to(device=device, dtype=dtype))


def bin_centroid_offset(s: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[v | round(v) = s] − s for v ~ N(0, σ²), float64: 0 for s = 0, toward 0 otherwise
    (at most ½ in size). Computed on |s| with complementary error functions, so the upper
    tail keeps its precision; where even those underflow (|s|/σ ≳ 37) it is 0. Only the
    nonzero symbols are computed (most of them are 0)."""
    out = torch.zeros_like(s, dtype=torch.float64)
    nz = s != 0
    if not bool(nz.any()):
        return out
    mag, sig = s[nz].abs().to(torch.float64), sigma[nz].to(torch.float64)
    a, b = (mag - 0.5) / sig, (mag + 0.5) / sig
    r2 = math.sqrt(2.0)
    mass = 0.5 * (torch.special.erfc(a / r2) - torch.special.erfc(b / r2))
    dens = (torch.exp(-0.5 * a * a) - torch.exp(-0.5 * b * b)) / math.sqrt(2 * math.pi)
    ok = mass > 1e-300
    off = torch.where(ok, sig * dens / torch.where(ok, mass, torch.ones_like(mass)) - mag,
                      torch.zeros_like(mag))
    out[nz] = off * torch.sign(s[nz]).to(torch.float64)
    return out


def pad_to_stride(x: torch.Tensor, stride: int = WsiHyperprior.STRIDE) -> torch.Tensor:
    """Replicate-pad (B, C, H, W) on the bottom/right up to a multiple of ``stride``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % stride, (-w) % stride
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x


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
                layers.append(_FrozenGDN(layer))
            elif isinstance(layer, nn.ConvTranspose2d) and layer.out_channels < SUBPIXEL_BELOW:
                layers.append(_SubPixelDeconv(layer))
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


#: Fixed point of :class:`ExactHyperSynthesis`: activations are integers |a| < 2**EXACT_ACT_BITS
#: standing for a / 2**EXACT_FRAC (±256 in steps of 2**-16; h_s's largest activation on
#: he/test and he/tiles, all qualities, is under 50).
EXACT_FRAC, EXACT_ACT_BITS = 16, 24
_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10   # Cody & Waite


def exact_exp(v: float) -> float:
    """exp(v) from IEEE-754 basic operations alone (+ − × ÷ and scaling by 2**n).

    libm's exp may differ in its last bit between platforms; these operations are
    correctly rounded everywhere, so this gives the same bits on every machine.
    Within a few ulp of exp for |v| < 700: range reduction v = n·ln 2 + r, |r| ≤ ln 2 / 2,
    then Taylor to degree 13 (remainder < 1e-17 relative).
    """
    n = round(v / (_LN2_HI + _LN2_LO))
    r = (v - n * _LN2_HI) - n * _LN2_LO
    p = 1.0
    for k in range(13, 0, -1):
        p = 1.0 + r * p / k
    return math.ldexp(p, n)


class ExactHyperSynthesis:
    """h_s in integer arithmetic, so (μ, σ) and the table index are the same bits everywhere.

    The float64 h_s of tile format 1 is deterministic on one machine, but a convolution's
    sum may be taken in another order by another BLAS or CPU family, and a last-bit
    difference in σ that crosses a table boundary makes the tile undecodable (its CRC
    catches it).  Here every value that reaches a convolution is an integer and every
    product and partial sum stays below 2**53 (checked when the weights are converted),
    so float64 holds them exactly and the order of summation cannot matter; the rest is
    rounding, division by powers of two and correctly rounded elementwise operations.

    * input: ``round(ẑ / hgain · 2**EXACT_FRAC)``, clamped to |a| < 2**EXACT_ACT_BITS, with
      hgain from the gains' log-linear interpolation evaluated by :func:`exact_exp`
      (quality taken as its float32, as stored in the tile);
    * each layer: integer weights ``round(W · 2**s_c)`` and bias ``round(b · 2**(s_c +
      EXACT_FRAC))``, with s_c per output channel the largest that keeps the channel's
      worst case (Σ|w| times the largest activation, plus |b|) under 2**53 (19 … 25 for the
      shipped h_s); the result divided by ``2**s_c`` and rounded, LeakyReLU as
      ``round(slope · a)`` below zero, clamped;
    * output: the last layer's integers divided by ``2**(s_c + EXACT_FRAC)`` (exact), σ then μ.

    Against the float h_s it differs by fixed-point rounding only: on a 512² he/test crop
    at five qualities, 99.993 % of the table indexes are the same and μ moves by at most
    6e-4 (on values up to ~60); coded on all 14 he/test images, qualities 1-8, the rate
    and PSNR curves agree to a BD-rate of 0.00 % (``train/eval_bytes.py``).
    """

    def __init__(self, h_s: nn.Sequential, log_hgain: torch.Tensor, levels: int) -> None:
        self.log_hgain = log_hgain.detach().cpu().to(torch.float32).tolist()
        self.levels = levels
        self.layers = []        # [transposed?, weight, bias, stride, padding, output padding, 2**s_c, slope]
        lim = 2 ** EXACT_ACT_BITS - 1
        for layer in h_s:
            if isinstance(layer, nn.LeakyReLU):
                self.layers[-1][-1] = float(layer.negative_slope)
                continue
            if not isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) or layer.groups != 1:
                raise ValueError(f"no exact form for {layer}")
            deconv = isinstance(layer, nn.ConvTranspose2d)
            w = layer.weight.detach().cpu().to(torch.float64)
            w = w.transpose(0, 1) if deconv else w                 # (out, in, k, k)
            b = (layer.bias.detach().cpu().to(torch.float64) if layer.bias is not None
                 else torch.zeros(w.shape[0], dtype=torch.float64))
            wq, bq, scale = torch.empty_like(w), torch.empty_like(b), torch.empty_like(b)
            for c in range(w.shape[0]):
                total = float(w[c].abs().sum()) + abs(float(b[c])) * 2.0 ** EXACT_FRAC / lim + 1e-300
                e = min(53 - EXACT_ACT_BITS - math.frexp(total)[1], 60)
                while True:   # the largest power of two whose worst case, in integers, fits
                    wq[c] = torch.round(w[c] * 2.0 ** e)
                    bq[c] = round(float(b[c]) * 2.0 ** (e + EXACT_FRAC))
                    if int(wq[c].abs().sum()) * lim + abs(int(bq[c])) < 2 ** 53:
                        break
                    e -= 1
                scale[c] = 2.0 ** e
            self.layers.append([deconv, wq.transpose(0, 1).contiguous() if deconv else wq, bq,
                                layer.stride, layer.padding, getattr(layer, "output_padding", (0, 0)),
                                scale.reshape(1, -1, 1, 1), None])
        self._hgain: dict[float, torch.Tensor] = {}

    def hgain(self, quality: float) -> torch.Tensor:
        """(1, N, 1, 1) float64 hyper gains of a quality, from basic operations only."""
        g = self._hgain.get(quality)          # decoder threads share this cache
        if g is None:
            q = min(max(quality, 1.0), float(QUALITY_MAX)) - 1.0
            p = q * (self.levels - 1) / (QUALITY_MAX - 1)
            lo = min(int(math.floor(p)), self.levels - 2)
            t = p - lo
            lg = [a * (1.0 - t) + b * t for a, b in zip(self.log_hgain[lo], self.log_hgain[lo + 1])]
            with torch.inference_mode(False):     # a normal tensor, whatever mode asked first
                g = torch.tensor([exact_exp(v) for v in lg], dtype=torch.float64).reshape(1, -1, 1, 1)
            if len(self._hgain) > 256:
                self._hgain = {}
            self._hgain[quality] = g
        return g

    @torch.no_grad()
    def __call__(self, z_hat: torch.Tensor, quality: float,
                 size: tuple[int, int] | None = None) -> torch.Tensor:
        """ẑ (1, N, h, w) float64 of one tile → h_s's output (σ then μ) float64, exact.

        ``size`` (h, w): only that top-left part of the output is wanted (y's size, 17² of
        the 20² h_s makes for a 272² tile); a stride-1 last layer then computes just it,
        with the very values the full output has there (exact arithmetic), ~30 % less work
        in that layer.
        """
        lim = float(2 ** EXACT_ACT_BITS - 1)
        a = torch.round(z_hat.to(torch.float64) / self.hgain(float(quality)) * 2.0 ** EXACT_FRAC).clamp_(-lim, lim)
        last = len(self.layers) - 1
        for k, (deconv, wq, bq, stride, pad, opad, scale, slope) in enumerate(self.layers):
            if deconv:
                acc = F.conv_transpose2d(a, wq, bq, stride, pad, opad)
            elif k == last and size is not None and _same_stride1(wq, stride, pad):
                ph, pw = pad if isinstance(pad, tuple) else (pad, pad)
                # a "same" stride-1 conv: output row i reads input rows i-ph .. i+ph
                h = min(size[0], a.shape[-2]) + ph
                w = min(size[1], a.shape[-1]) + pw
                part = a[..., :h, :w]
                part = F.pad(part, (pw, w - part.shape[-1], ph, h - part.shape[-2]))
                acc = F.conv2d(part, wq, bq, 1, 0)
            else:
                acc = F.conv2d(a, wq, bq, stride, pad)
            if k == last:
                return acc / (scale * 2.0 ** EXACT_FRAC)
            a = torch.round(acc / scale)
            if slope is not None:
                a = torch.where(a < 0, torch.round(a * slope), a)
            a.clamp_(-lim, lim)
        raise AssertionError("unreachable: h_s has layers")


def _same_stride1(weight: torch.Tensor, stride, pad) -> bool:
    """Whether a convolution with this (out, in, kh, kw) weight, stride and padding keeps
    the input's size with output (i, j) centred on input (i, j): the case in which
    :class:`ExactHyperSynthesis` may compute a top-left part of the output alone."""
    kh, kw = weight.shape[-2:]
    ph, pw = pad if isinstance(pad, tuple) else (pad, pad)
    return stride in (1, (1, 1)) and kh % 2 == 1 and kw % 2 == 1 and (ph, pw) == (kh // 2, kw // 2)


#: FastTransform computes a transposed convolution with fewer output channels than this as
#: :class:`_SubPixelDeconv`: g_s's last layer (96 → 3 channels, 136² → 272²) took 13.1 ms
#: as oneDNN's transposed convolution and 5.7 ms in that form (one thread, development CPU);
#: the 96-channel ones are faster as they are (20.4 ms against 28.4 at 68² → 136²).
SUBPIXEL_BELOW = 16


class _SubPixelDeconv(nn.Module):
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


class _FrozenGDN(nn.Module):
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
