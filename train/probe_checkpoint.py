"""Probe a training checkpoint against the shipped weights while it trains, in ~30 s.

    python train/probe_checkpoint.py runs/grow/last.pt [--base wsicodec/weights/wsicodec-hyperprior.pt]
                                     [--images ../shared/data/he/train] [--count 4]

For each integer quality: the rate (hard, straight-through: the bits the coder would
spend, within ~1 %), PSNR, the VGG feature distance and the training objective
``bpp + λ(q)·(255²·MSE + 50·D_feat)`` of both networks on the central 256² of the first
``--count`` training images (``--crop``), the same noise for both; then the PSNR of g_s(g_a(x))
with no quantisation at all, the ceiling the transforms put on every quality.  For a network wider than the base
(``train.py --grow-M``) it adds the share of y's bits and of nonzero symbols in the
channels past the base's M, and the size of g_s's rows that read them against the old
rows': whether the new channels carry anything, and whether anything reads them.

Training images only (this is a probe, not a benchmark): ``train/eval_bytes.py`` measures
held-out images from real bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "train"))

import train as train_script  # noqa: E402
import surgery  # noqa: E402

from wsicodec.checkpoint import DEFAULT_WEIGHTS  # noqa: E402
from wsicodec.learned.ladder import QUALITY_MAX  # noqa: E402
from wsicodec.learned.network import ModelConfig, WsiHyperprior  # noqa: E402

def load(path: str | Path) -> tuple[WsiHyperprior, int | None]:
    """A training checkpoint or exported weights, as a network in eval mode, and its step."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if "model" not in state:
        state = surgery.from_shipped(state)
    model = WsiHyperprior(ModelConfig.from_dict(state["config"]))
    model.load_state_dict(state["model"], strict=False)
    return model.eval(), state.get("step")


def crops(folder: Path, count: int, size: int) -> torch.Tensor:
    """The central size² of the first ``count`` PNG images of ``folder`` that are that large."""
    out = []
    for p in sorted(folder.glob("*.png")):
        a = np.asarray(Image.open(p).convert("RGB"))
        if min(a.shape[:2]) < size:
            continue
        y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
        out.append(torch.from_numpy(a[y:y + size, x:x + size].copy()).permute(2, 0, 1).float() / 255)
        if len(out) == count:
            break
    if not out:
        raise SystemExit(f"probe_checkpoint: no PNG image of at least {size}² in {folder}")
    return torch.stack(out)


def crop_mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-crop MSE of the clamped reconstruction (PSNR is the mean of ``10·log10(1/mse)``)."""
    return (x_hat.clamp(0, 1) - x).pow(2).flatten(1).mean(1)


def scores(model: WsiHyperprior, x: torch.Tensor, q: torch.Tensor, feat, alpha: float) -> dict:
    torch.manual_seed(0)
    o = model(x, q, hard=True)
    mse = crop_mse(o["x_hat"], x)
    fd = feat(o["x_hat"].clamp(0, 1), x)
    bpp = (o["bits_y"] + o["bits_z"]) / (x.shape[-1] * x.shape[-2])
    objective = bpp + model.lambda_at(q) * (255.0 ** 2 * mse + alpha * fd)
    return {"bpp": bpp.mean().item(), "psnr": (10 * torch.log10(1 / mse)).mean().item(),
            "feat": fd.mean().item(), "objective": objective.mean().item(), "y_lik": o["y_likelihoods"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--base", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "he" / "train"))
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--crop", type=int, default=256, help="side of the central crops, a multiple of 64")
    ap.add_argument("--alpha", type=float, default=50.0, help="the objective's feature weight")
    ap.add_argument("--vgg", default=str(ROOT.parent / "shared" / "weights" / "vgg16_features_imagenet.pth"))
    args = ap.parse_args(argv)
    if args.crop < WsiHyperprior.STRIDE or args.crop % WsiHyperprior.STRIDE:
        ap.error(f"--crop must be a positive multiple of {WsiHyperprior.STRIDE}, got {args.crop}")
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)     # beside a training run
    base, _ = load(args.base)
    model, step = load(args.checkpoint)
    feat = train_script.FeatureDistance(args.vgg)
    x = crops(Path(args.images), args.count, args.crop)
    M0 = base.config.M
    print(f"{args.checkpoint} (step {step}, M = {model.config.M}) against {args.base} (M = {M0}), "
          f"{x.shape[0]} crops of {args.crop}²")
    with torch.no_grad():
        for quality in range(1, QUALITY_MAX + 1):
            q = torch.full((x.shape[0],), float(quality))
            a, b = scores(base, x, q, feat, args.alpha), scores(model, x, q, feat, args.alpha)
            line = (f"q{quality}: base {a['bpp']:.3f} bpp {a['psnr']:.2f} dB feat {a['feat']:.4f} "
                    f"objective {a['objective']:.4f} | probed {b['bpp']:.3f} bpp {b['psnr']:.2f} dB "
                    f"feat {b['feat']:.4f} objective {b['objective']:.4f}")
            if model.config.M > M0:
                bits = -torch.log2(b["y_lik"])
                # the symbols the coder would write: round(y_q - μ), μ from h_s of the rounded z
                gain, hgain = model.gains(q)
                y = model.g_a(x) * gain
                z = model.h_a(y) * hgain
                med = model.entropy_bottleneck._get_medians().reshape(1, -1, 1, 1)
                _, mu = model.h_s((torch.round(z - med) + med) / hgain).chunk(2, 1)
                nonzero = (torch.round(y - mu)[:, M0:] != 0).float().mean().item()
                line += (f" | new channels: {100 * (bits[:, M0:].sum() / bits.sum()).item():.1f} % of y's bits, "
                         f"{100 * nonzero:.1f} % nonzero")
            print(line, flush=True)
        ceiling = [(10 * torch.log10(1 / crop_mse(net.g_s(net.g_a(x)), x))).mean().item()
                   for net in (base, model)]
        print(f"unquantised, g_s(g_a(x)): base {ceiling[0]:.2f} dB | probed {ceiling[1]:.2f} dB")
        if model.config.M > M0:
            w = model.g_s[0].weight.abs().mean((1, 2, 3))
            print(f"g_s rows reading the new channels / the old ones (mean |w|): "
                  f"{(w[M0:].mean() / w[:M0].mean()).item():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
