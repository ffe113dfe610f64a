"""Network surgery for resuming training: what ``train.py --resume`` does to a state
before it trains.

- :func:`from_shipped`: a training state from shipped (inference) weights;
- :func:`remap_gains`, :func:`remap_adam_rows`: the gains (and Adam's rows for them)
  carried to a new λ ladder by interpolation;
- :func:`add_blocks`, :func:`add_latent_channels`: a deeper or wider network that starts
  out computing what the old one did; :func:`new_channel_masks` trains only the new
  channels; :func:`block_params` names the residual blocks' parameters.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsicodec.checkpoint import FROZEN_TABLES  # noqa: E402
from wsicodec.learned.network import ModelConfig, ResidualBlock, WsiHyperprior  # noqa: E402


def from_shipped(state: dict) -> dict:
    """A training state from shipped (inference) weights: network only, frozen tables dropped.

    Optimiser state starts afresh; the step count and wall time carry on from the
    provenance so logs continue where the shipped weights stopped.
    """
    prov = state.get("provenance", {}) or {}
    model = {k: v for k, v in state["state_dict"].items() if not k.endswith(FROZEN_TABLES)}
    return {"config": state["config"], "model": model, "step": int(prov.get("train_step") or 0),
            "wall": float(prov.get("train_wall_s") or 0.0)}


def remap_gains(sd: dict, old: tuple[float, ...], new: tuple[float, ...]) -> dict:
    """Carry learned per-level gains over to a new λ ladder.

    Each new λ is placed on the old ladder in log-λ; its log-gains are the linear
    interpolation of the two neighbouring old levels.  Outside the old range the end
    level is extended with the high-rate slope a quantiser step ~ 1/√λ implies
    (log-gain + ½·Δlog λ; the hyper gain moves half as much, as at initialisation).
    """
    sd = dict(sd)
    lo_old = torch.log(torch.tensor(old, dtype=torch.float64))
    for key, slope in (("log_gain", 0.5), ("log_hgain", 0.25)):
        g = sd[key].double()
        rows = []
        for lam in new:
            ll = math.log(lam)
            if ll <= lo_old[0]:
                rows.append(g[0] + slope * (ll - lo_old[0]))
            elif ll >= lo_old[-1]:
                rows.append(g[-1] + slope * (ll - lo_old[-1]))
            else:
                i = int(torch.searchsorted(lo_old, torch.tensor(ll, dtype=torch.float64))) - 1
                t = (ll - lo_old[i]) / (lo_old[i + 1] - lo_old[i])
                rows.append(g[i] * (1 - t) + g[i + 1] * t)
        sd[key] = torch.stack(rows).to(sd[key].dtype)
    return sd


def remap_adam_rows(opt_state: dict, names: list[str], old: tuple[float, ...],
                    new: tuple[float, ...]) -> None:
    """Give the gains' Adam moments the new ladder's shape (the rest of the state is kept).

    ``names`` are the optimiser's parameters in order.  A new knot takes the moments of
    the nearest old knot in log-λ: the same step size the neighbouring gains were taking,
    rather than a fresh second moment of zero (whose first updates would be huge).
    """
    lo_old = np.log(np.asarray(old))
    nearest = torch.tensor([int(np.abs(lo_old - math.log(lam)).argmin()) for lam in new])
    for key in ("log_gain", "log_hgain"):
        st = opt_state["state"].get(names.index(key))
        if st:
            for m in ("exp_avg", "exp_avg_sq"):
                st[m] = st[m][nearest].clone()


def add_blocks(sd: dict, old: ModelConfig, new: ModelConfig) -> dict:
    """Rename g_a's and g_s's layers for the residual blocks of ``new`` instead of ``old``.

    Layer positions come from building both networks, so nothing assumes where the
    blocks sit.  Blocks already trained keep their place; the added ones are missing
    from the result (the model's own initialisation, the identity, stands for them).
    """
    for what, a, b in (("--enc-blocks", old.enc_blocks, new.enc_blocks),
                       ("--dec-blocks", old.dec_blocks, new.dec_blocks)):
        if b < a:
            raise SystemExit(f"{what} {b}: the checkpoint already has {a} such blocks")
    rename = {}
    for part in ("g_a", "g_s"):
        layers = [[i for i, layer in enumerate(getattr(WsiHyperprior(c), part))
                   if not isinstance(layer, ResidualBlock)] for c in (old, new)]
        rename.update({f"{part}.{i}.": f"{part}.{j}." for i, j in zip(*layers)})
    out = {}
    for k, v in sd.items():
        head = ".".join(k.split(".")[:2]) + "."
        out[rename[head] + k[len(head):] if head in rename else k] = v
    return out


#: add_latent_channels: the new channels' g_s rows start at this fraction of the old rows' size
NEW_ROWS_SCALE = 0.1
#: add_latent_channels: the new channels' σ (gained units): the old channels' σ biases sit
#: below the Gaussian's lower bound (0.11), where an Adam step of 1e-4 would take ~10⁴ steps
#: to reach the spread of a new channel at the top qualities, its rate crushing it meanwhile
NEW_SIGMA = 0.3


def add_latent_channels(sd: dict, old: ModelConfig, new: ModelConfig, seed: int = 0) -> dict:
    """Widen a trained network's latent y from ``old.M`` to ``new.M`` channels.

    Every tensor that touches M grows; the old channels' symbols, σ, μ and z stay exactly
    what they were: a new unit gets random incoming weights (the layer's own
    initialisation, so it carries something from the start) and zero outgoing weights
    into anything the old channels' coding depends on:

    * g_a's last conv: new output filters, random; g_s's first deconv: small random rows for
      them (:data:`NEW_ROWS_SCALE` of the old rows' size: the pixels move by a hair);
    * h_a's first conv: zero weights on the new channels (z is unchanged);
    * h_s's hidden widths (M, 3M/2) grow the same way, random in, zero out; its last conv
      gives the new channels' σ from a bias (:data:`NEW_SIGMA`) and μ = 0;
    * the new channels' per-level log-gains start at the old channels' mean per level.

    The shipped network's top quality is capped by its transforms (he/test crops come back
    at 38.0 dB from unquantised latents, at 37.4 from latents rounded at quality 8's gains):
    new channels are room above that cap, if training can fill it (train/README.md, run 25:
    on the CPU it could not).
    """
    if new.M < old.M:
        raise SystemExit(f"--grow-M {new.M}: the checkpoint already has M = {old.M}")
    if dataclasses.replace(new, M=old.M) != old:
        raise SystemExit("--grow-M changes M only")
    with torch.random.fork_rng():     # the grown network's own initialisation, reproducibly
        torch.manual_seed(seed)
        init = WsiHyperprior(new).state_dict()
    M, M2 = old.M, new.M
    h1 = old.M * 3 // 2
    out = dict(sd)
    ga_last = f"g_a.{len(WsiHyperprior(old).g_a) - 1}."

    def grow(key: str, old_slices: tuple, zero_new: bool = False) -> None:
        t = torch.zeros_like(init[key]) if zero_new else init[key].clone()
        t[old_slices] = sd[key]
        out[key] = t

    # g_a last conv (out M): weight (M, N, k, k), bias (M)
    grow(ga_last + "weight", (slice(0, M),))
    grow(ga_last + "bias", (slice(0, M),))
    # g_s first deconv (in M): weight (M, N, k, k): new input rows small, not zero: rounding
    # makes most new symbols 0 at first, and with zero rows neither g_s's rows nor g_a's new
    # filters would see a distortion gradient (the straight-through path runs through them)
    w = init["g_s.0.weight"].clone()
    w[M:] *= NEW_ROWS_SCALE * sd["g_s.0.weight"].abs().mean() / w[M:].abs().mean()
    w[:M] = sd["g_s.0.weight"]
    out["g_s.0.weight"] = w
    # h_a first conv (in M): weight (N, M, 3, 3): new input columns zero
    grow("h_a.0.weight", (slice(None), slice(0, M)), zero_new=True)
    # h_s.0 deconv N -> M (weight (N, M, k, k)): new hidden units random in
    grow("h_s.0.weight", (slice(None), slice(0, M)))
    grow("h_s.0.bias", (slice(0, M),))
    # h_s.2 deconv M -> 3M/2 (weight (M, 3M/2, k, k)): zero from new inputs, random into new outputs
    w = init["h_s.2.weight"].clone()
    w[M:M2] = 0
    w[:M, :h1] = sd["h_s.2.weight"]
    out["h_s.2.weight"] = w
    grow("h_s.2.bias", (slice(0, h1),))
    # h_s.4 conv 3M/2 -> 2M (σ rows first, μ rows after): nothing from the new hidden units;
    # the new channels' σ and μ are biases alone until training moves them
    w = torch.zeros_like(init["h_s.4.weight"])
    b = torch.zeros_like(init["h_s.4.bias"])
    w[:M, :h1], w[M2:M2 + M, :h1] = sd["h_s.4.weight"][:M], sd["h_s.4.weight"][M:]
    b[:M], b[M2:M2 + M] = sd["h_s.4.bias"][:M], sd["h_s.4.bias"][M:]
    b[M:M2] = NEW_SIGMA
    out["h_s.4.weight"], out["h_s.4.bias"] = w, b
    g = sd["log_gain"]
    out["log_gain"] = torch.cat([g, g.mean(1, keepdim=True).repeat(1, M2 - M)], 1)
    return out


def new_channel_masks(model: WsiHyperprior, kept: int) -> dict[str, torch.Tensor]:
    """What ``--only-new-channels K`` trains: every entry that computes or reads latent
    channels K.. and changes nothing the first K channels' symbols, μ, σ or z depend on.

    Name -> mask (1 where trainable) of g_a's last conv (the new filters), g_s's first
    deconv (the rows that read the new channels), h_s's hidden units past the first
    network's widths and its σ/μ outputs for the new channels, and the new channels'
    log-gains.  The rest (the old channels' whole path, h_a, the z prior, the hyper gains)
    is frozen; so are the zero weights that keep the new hidden units out of the old σ/μ.
    """
    M = model.config.M
    if not 0 < kept < M:
        raise SystemExit(f"--only-new-channels {kept}: the network has M = {M} latent channels")
    h1 = kept * 3 // 2
    last = len(model.g_a) - 1
    masks = {}

    def mask(name: str, *index) -> None:
        m = torch.zeros_like(model.get_parameter(name))
        m[index] = 1
        masks[name] = m

    mask(f"g_a.{last}.weight", slice(kept, None))
    mask(f"g_a.{last}.bias", slice(kept, None))
    mask("g_s.0.weight", slice(kept, None))
    mask("h_s.0.weight", slice(None), slice(kept, None))
    mask("h_s.0.bias", slice(kept, None))
    mask("h_s.2.weight", slice(None), slice(h1, None))
    mask("h_s.2.bias", slice(h1, None))
    for name in ("h_s.4.weight", "h_s.4.bias"):
        m = torch.zeros_like(model.get_parameter(name))
        m[kept:M] = 1            # σ of the new channels
        m[M + kept:] = 1         # μ of the new channels
        masks[name] = m
    mask("log_gain", slice(None), slice(kept, None))
    return masks


def block_params(model: WsiHyperprior) -> set[str]:
    """The names of the parameters of g_a's and g_s's residual blocks (``--block-lr-mult``)."""
    return {f"{part}.{i}.{n}" for part in ("g_a", "g_s") for i, layer in enumerate(getattr(model, part))
            if isinstance(layer, ResidualBlock) for n, _ in layer.named_parameters()}
