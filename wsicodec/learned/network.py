"""The network of the learned codec: a variable-rate mean-scale hyperprior.

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
  one set of weights covers the whole rate range; :class:`~wsicodec.learned.ladder.QualityLadder`
  (:attr:`WsiHyperprior.ladder`) owns quality → position → gains, λ and κ.
* No autoregressive context model: every latent of a tile is decoded in parallel.
* The decoder's ŷ_q is μ + s (s the decoded symbol) moved κ(q) of the way toward the mean
  of s's quantisation bin under the coded Gaussian (:meth:`WsiHyperprior.reconstruct`;
  κ per quality fitted on training images and stored in the weights' config; κ < 0, away
  from it, at the top qualities): pixels only, the symbols and the stream are the same
  whatever κ is.

The network only computes; bitstreams are made in :mod:`wsicodec.entropy`, and
the path ẑ → h_s → (μ, table index) used for coding is
:meth:`WsiHyperprior.entropy_parameters`, run in integer arithmetic
(:class:`~wsicodec.learned.exact.ExactHyperSynthesis`) so that the encoder and every
decoder, on any machine, agree bit for bit.  Inference runs g_a and g_s as fast copies
(:mod:`wsicodec.learned.fast`); the encoder's latent search is
:func:`wsicodec.learned.refine.refine_latents`.
"""

from __future__ import annotations

import copy
import math
import threading
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

with warnings.catch_warnings():
    # compressai 1.2.8 calls torch.jit.script at import, which torch >= 2.10 deprecates
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    from wsicodec._compressai import load as _load_compressai
    _load_compressai()   # without its package __init__'s eager imports (torch_geometric, ...)
    from compressai.entropy_models import EntropyBottleneck, GaussianConditional
    from compressai.layers import GDN

from wsicodec.entropy import CdfTables

from .exact import ExactHyperSynthesis
from .fast import FastTransform
from .ladder import QualityLadder
from .synthesis import Box

#: The λ ladder (loss = rate + λ·255²·MSE): knots spread evenly over the public quality
#: scale 1..8 (quality 1 = the first λ, 8 = the last; fractional qualities interpolate
#: the log-gains).  CompressAI's ladder moved down one level (its top spent bits on H&E for
#: little PSNR), then extended by two knots below so quality 1 reaches ~0.13 bpp and one
#: above (0.13) so quality 8 reaches ~1.5 bpp (the shipped weights' ladder).  (The
#: lowest knot coded bigger than the next while training used 128² crops; on 256² crops
#: it does not: train/README.md.  A steeper 8-level ladder, 0.0005 … 0.09, cost the shared
#: transforms 1.5-2.7 dB at equal rate.)
DEFAULT_LAMBDAS = (0.00025, 0.00047, 0.0009, 0.0018, 0.0035, 0.0067, 0.013, 0.025, 0.0483, 0.0932, 0.13)

SCALES_MIN, SCALES_MAX, SCALES_LEVELS = 0.11, 256.0, 64
#: most tiles per pass of the exact h_s (bounds its float64 activations: ~1 MB a 256² tile)
EXACT_CHUNK = 16
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


def sample_bits(likelihoods: torch.Tensor) -> torch.Tensor:
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

    @property
    def ladder(self) -> QualityLadder:
        """Quality → ladder position → gains, λ and κ, for this network's config."""
        return QualityLadder(self.config.lambdas, self.config.reconstruction)

    # -------------------------------------------------------- reconstruction
    def reconstruction_kappa(self, quality: float) -> float:
        """κ of :attr:`ModelConfig.reconstruction` at ``quality`` (0 when it is empty)."""
        return self.ladder.kappa(quality)

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
        if not bool(near.all()):      # rare large symbols: the formula itself, for them alone
            far = ~near
            sigma = self.gaussian_conditional.scale_table.to(torch.float64)[index.long()[far]]
            off = off.masked_scatter(far, bin_centroid_offset(s[far], sigma))
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
        return self.ladder.position(quality, self.log_gain.dtype)

    def lambda_at(self, quality: torch.Tensor) -> torch.Tensor:
        """λ of each quality: the ladder interpolated geometrically (what training weights MSE by)."""
        return self.ladder.lambda_at(quality, self.log_gain.dtype)

    def gains(self, quality: torch.Tensor, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (gain, hyper gain), shapes (B, M, 1, 1) and (B, N, 1, 1).

        ``quality`` holds values in [1, 8]; the log-gains are interpolated linearly
        between the two λ knots either side of :meth:`position`.
        """
        return self.ladder.gains(self.log_gain, self.log_hgain, quality, dtype)

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
        z_lik = self.z_likelihood(z_hat) if hard else self.entropy_bottleneck(z)[1]
        params = self.h_s(z_hat / hgain)
        scales, means = params.chunk(2, 1)
        y_hat = ste_round(y - means) + means
        if hard:
            y_lik = self.y_likelihood(y_hat, scales, means)
        else:
            _, y_lik = self.gaussian_conditional(y, scales, means)
        x_hat = self.g_s(y_hat / gain)
        return {"x_hat": x_hat, "bits_y": sample_bits(y_lik), "bits_z": sample_bits(z_lik), "y_likelihoods": y_lik}

    def z_likelihood(self, z_hat: torch.Tensor) -> torch.Tensor:
        """The factorized prior's likelihood of integer-offset ẑ, as coded (no noise)."""
        eb = self.entropy_bottleneck
        zt = z_hat.transpose(0, 1)
        z_lik, _, _ = eb._likelihood(zt.reshape(zt.shape[0], 1, -1))
        return eb.likelihood_lower_bound(z_lik).reshape(zt.shape).transpose(0, 1)

    def y_likelihood(self, y_hat: torch.Tensor, scales: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        """The Gaussian conditional's likelihood of ŷ under (σ, μ), lower-bounded as coded."""
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

    @torch.no_grad()
    def entropy_parameters(self, z_hat: torch.Tensor, quality: torch.Tensor, exact: bool = True,
                           size: tuple[int, int] | None = None,
                           device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ẑ_q → (μ, table index), deterministically; ``size`` (h, w): y's size, the
        top-left part of h_s's output that is returned (and, exact, computed).

        ``exact`` (tile format 2): h_s in integer arithmetic (:class:`ExactHyperSynthesis`),
        the same bits on any machine.  Otherwise (format 1, still read): h_s in float64 on
        the CPU, one tile at a time, on a private float64 copy, which does not depend on
        batch size, thread count or device, but may on the BLAS or CPU family in its last
        bits.  Returns float64 means and int32 CDF-table indexes, shapes (B, M, h, w), on
        the CPU.  The exact h_s runs on ``device`` (default: ẑ's), batched by
        :data:`EXACT_CHUNK` tiles: the same bits on every device and batch size.
        """
        if exact:       # one batched pass per chunk: the same bits as tile by tile
            h_s, q = self.h_s_exact(), quality.cpu().to(torch.float32).tolist()
            if len(q) == 1 and z_hat.shape[0] > 1:
                q = q * z_hat.shape[0]
            dev = torch.device(device) if device is not None else z_hat.device
            parts = [h_s(z_hat[i:i + EXACT_CHUNK].to(dev, torch.float64), q[i:i + EXACT_CHUNK], size)
                     for i in range(0, z_hat.shape[0], EXACT_CHUNK)]
        else:
            h_s64 = self.h_s_float64()
            _, hgain = self.gains(quality.cpu(), torch.float64)
            hgain = hgain.to(torch.float64)
            parts = [h_s64(z_hat[i:i + 1].cpu().to(torch.float64) / hgain[i:i + 1])
                     for i in range(z_hat.shape[0])]
        means, indexes = [], []
        for p in parts:
            p = p.cpu()
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

    def coding_tables(self) -> tuple[CdfTables, CdfTables]:
        """The integer CDF tables the rANS coder uses: (z's factorized prior, y's Gaussians),
        from the frozen tables (:meth:`update`); built once."""
        def tables(em) -> CdfTables:
            return CdfTables(em._quantized_cdf.numpy().astype("int32"),
                             em._cdf_length.reshape(-1).numpy().astype("int32"),
                             em._offset.reshape(-1).numpy().astype("int32"))
        return self._derived("coding_tables", lambda: (tables(self.entropy_bottleneck),
                                                       tables(self.gaussian_conditional)))

    def prepare_entropy_parameters(self) -> None:
        """Build the exact and float64 copies of h_s now (they are built on first use otherwise)."""
        self.h_s_exact()
        self.h_s_float64()

    def prepare_synthesis(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                          precision: str = "float32") -> None:
        """Build the fast g_s copy for ``device`` now (it is built on first use otherwise)."""
        self.fast_transform("g_s", torch.device(device), dtype, bf16_body=precision == "bfloat16")

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

    def h_s_float64(self) -> nn.Module:
        """A float64 copy of h_s (tile format 1's entropy parameters), built once."""
        return self._derived("h_s64", lambda: copy.deepcopy(self.h_s).to(torch.float64).eval())

    def h_s_exact(self) -> ExactHyperSynthesis:
        """h_s in exact integer arithmetic (tile formats 2 and 3), built once."""
        return self._derived("h_s_exact", lambda: ExactHyperSynthesis(self.h_s, self.log_hgain, self.config.levels))

    def synthesis(self, y_hat: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
        """ŷ_q → x̂ (g_s may run on any device and dtype: it changes pixels, not symbols).

        Outside training (no autograd) this runs :class:`FastTransform`, the same maps
        in channels-last with the GDN weights reparametrised once (faster on the CPU:
        bench/results/tile_speed.json).
        """
        gain, _ = self.gains(quality.to(y_hat.device), y_hat.dtype)
        return self.synthesize(y_hat / gain)

    def synthesize(self, y: torch.Tensor, precision: str = "float32", box: Box | None = None) -> torch.Tensor:
        """Ungained ŷ (ŷ_q / gain[q], the scale g_a's output has) → x̂; with ``box`` =
        (top, left, h, w) only that part of it (outside training computed only where
        it depends on: :meth:`FastTransform.forward <wsicodec.learned.fast.FastTransform.forward>`).

        Latents of tiles coded at different qualities share this scale, so a decoder
        can join them into one plane before g_s (stitched tiles, :mod:`wsicodec.learned.decoder`).
        ``precision`` "bfloat16" runs g_s's inner layers in bfloat16 at inference (its
        first convolution and GDN, its last layer and the output stay float32;
        :data:`wsicodec.codecs.PRECISIONS`).
        """
        g_s = self._transform("g_s", y, precision)
        if isinstance(g_s, FastTransform):
            return g_s(y, box)
        x = g_s(y)
        return x if box is None else x[..., box[0]:box[0] + box[2], box[1]:box[1] + box[3]]

    def _transform(self, name: str, x: torch.Tensor, precision: str = "float32") -> nn.Module:
        """g_a or g_s itself when training or under autograd, else its fast copy (with
        its inner layers in bfloat16 for ``precision`` "bfloat16")."""
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be float32 or bfloat16, got {precision!r}")
        if self.training or torch.is_grad_enabled():
            return getattr(self, name)
        return self.fast_transform(name, x.device, x.dtype, bf16_body=precision == "bfloat16")

    def fast_transform(self, name: str, device: torch.device, dtype: torch.dtype,
                       bf16_body: bool = False) -> FastTransform:
        """The inference copy (:class:`~wsicodec.learned.fast.FastTransform`) of g_a or g_s
        (``name``) for this device and dtype, built once and shared; ``bf16_body``: its
        inner layers in bfloat16 (``precision="bfloat16"``)."""
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

