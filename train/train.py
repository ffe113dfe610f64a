"""Train the variable-rate hyperprior on folders of H&E images.

    python train/train.py --data ../shared/data/he/train ../shared/data/he/tiles \
        --out runs/main --minutes 120 [--resume runs/main/last.pt] [--device cuda]

Loss per sample, its quality q drawn per sample (an integer 1..8, or with probability
``--continuous`` anywhere in [1, 8])::

    L = bits/pixel + λ(q) · (255² · MSE + α · D_feat)

λ(q) interpolates the ladder's knots geometrically, as the gains do.

D_feat is a deep-feature distance on the ImageNet VGG16 trunk (relu1_2, relu2_2,
channel-normalised as in LPIPS), loaded offline from ``--vgg`` (default
``../shared/weights/vgg16_features_imagenet.pth``).  α = 0 skips the trunk.

Checkpoints (``last.pt`` every ``--ckpt-every`` seconds, atomically) hold the model,
both optimisers, the step and the RNG states, so ``--resume`` continues exactly.
A CSV log (``log.csv``) records step, wall time, loss, bpp estimate and PSNR.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsicodec.learned.fast import bf16_body_forward  # noqa: E402
from wsicodec.learned.ladder import QUALITY_MAX  # noqa: E402
from wsicodec.learned.network import ModelConfig, WsiHyperprior  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import augment  # noqa: E402
from surgery import (add_blocks, add_latent_channels, block_params, from_shipped,  # noqa: E402
                     new_channel_masks, remap_adam_rows, remap_gains)

IMAGE_SUFFIXES = {".png", ".tif", ".tiff", ".jpg", ".jpeg", ".webp"}


def bf16_body(seq: nn.Sequential) -> None:
    """Make ``seq`` run as :func:`wsicodec.learned.fast.bf16_body_forward` does (its inner layers
    under bfloat16 autocast, its ends float32), on this instance only: the parameters,
    their names and the checkpoint stay float32; the codec's ``precision="bfloat16"``
    runs the same split."""
    layers = list(seq)
    seq.forward = lambda x: bf16_body_forward(layers, x)  # type: ignore[method-assign]


def load_images(folders: list[str], min_size: int) -> list[np.ndarray]:
    """Every RGB image of at least ``min_size`` on both sides, as uint8 (H, W, 3).

    Evaluation data (he/test, slides/) is refused before anything is opened
    (:func:`augment.check_training_folders`)."""
    augment.check_training_folders(folders)
    images = []
    for folder in folders:
        for p in sorted(Path(folder).iterdir()):
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            a = np.asarray(Image.open(p).convert("RGB"))
            if min(a.shape[:2]) >= min_size:
                images.append(a)
    if not images:
        raise SystemExit(f"no training images of at least {min_size}px in {folders}")
    return images


class CropSampler:
    """Random crops with flips and 90° rotations, weighted by image area."""

    def __init__(self, images: list[np.ndarray], size: int, rng: np.random.Generator) -> None:
        self.images, self.size, self.rng = images, size, rng
        area = np.array([a.shape[0] * a.shape[1] for a in images], dtype=np.float64)
        self.p = area / area.sum()

    def batch(self, n: int) -> torch.Tensor:
        out = np.empty((n, self.size, self.size, 3), np.uint8)
        for i in range(n):
            a = self.images[self.rng.choice(len(self.images), p=self.p)]
            y = self.rng.integers(0, a.shape[0] - self.size + 1)
            x = self.rng.integers(0, a.shape[1] - self.size + 1)
            c = a[y:y + self.size, x:x + self.size]
            if self.rng.random() < 0.5:
                c = c[:, ::-1]
            c = np.rot90(c, self.rng.integers(4))
            out[i] = c
        return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0)


class FeatureDistance(nn.Module):
    """LPIPS-style distance on VGG16 relu1_2 and relu2_2 (no learned weights)."""

    def __init__(self, vgg_path: str) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers
        feats = make_layers(cfgs["D"])[:9]  # vgg16().features up to relu2_2
        state = torch.load(vgg_path, weights_only=True)   # the whole trunk, or just these layers
        feats.load_state_dict({k: v for k, v in state.items() if int(k.split(".")[0]) < 9})
        self.slice1, self.slice2 = feats[:4].eval(), feats[4:9].eval()
        for p in self.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    @staticmethod
    def _unit(f: torch.Tensor) -> torch.Tensor:
        return f / (f.pow(2).sum(1, keepdim=True).add(1e-10).sqrt())

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f1 = self.slice1(x.sub(self.mean).div(self.std))
        return self._unit(f1), self._unit(self.slice2(f1))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distance of ``a`` (differentiable) from the reference ``b``, per sample."""
        with torch.no_grad():     # the reference needs no backward pass: a third less work
            fb = self.features(b)
        return sum((fa - f).pow(2).sum(1).flatten(1).mean(1) for fa, f in zip(self.features(a), fb))


def save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=["../shared/data/he/train", "../shared/data/he/tiles"])
    ap.add_argument("--out", default="runs/main")
    ap.add_argument("--resume", default=None, help="checkpoint to continue from (training or shipped)")
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget")
    ap.add_argument("--steps", type=int, default=10**9, help="stop after this many total steps")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=1,
                    help="micro-batches of --batch crops per optimiser step (gradients summed): a "
                         "GPU-sized batch on a CPU; the batch-4 CPU runs stopped paying (runs 20-21) "
                         "where the GPU's batch 16 still moved the model")
    ap.add_argument("--crop", type=int, default=256,
                    help="crop side, a multiple of 64; train at the size the codec codes (256² tiles "
                         "plus margin): on 128² crops the hyperprior is all border, and the weights "
                         "code large images at low quality into more bits than they were trained to")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-final", type=float, default=1e-4, help="lr reached at the end of the budget (cosine)")
    ap.add_argument("--alpha", type=float, default=0.0, help="weight of the deep-feature distance")
    ap.add_argument("--continuous", type=float, default=0.25,
                    help="share of samples whose quality is drawn anywhere in 1..8 rather than from "
                         "the integers (uniform draws train the scale's two ends half as often)")
    ap.add_argument("--feat-crop", type=int, default=0,
                    help="measure the feature distance on a random square of this size inside each "
                         "crop (0: the whole crop); 64 in 256² crops cuts the VGG cost 16-fold")
    ap.add_argument("--vgg", default="../shared/weights/vgg16_features_imagenet.pth")
    ap.add_argument("--N", type=int, default=96)
    ap.add_argument("--M", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--compile", action="store_true", help="torch.compile g_a/g_s")
    ap.add_argument("--bf16-body", action="store_true",
                    help="run g_a's and g_s's inner layers under bfloat16 autocast (their first and "
                         "last layers, the hyper networks, entropy models and losses stay float32): "
                         "~1.5x faster steps on a CPU with AVX512-BF16; the latents stay float32")
    ap.add_argument("--ckpt-every", type=float, default=300.0, help="seconds between checkpoints")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--enc-blocks", type=int, default=None,
                    help="residual blocks in g_a before its last layer; on --resume, blocks added "
                         "to a trained g_a start as the identity")
    ap.add_argument("--dec-blocks", type=int, default=None,
                    help="residual blocks in g_s after its first layer (part of the decoder: train "
                         "jointly); on --resume, blocks added to a trained g_s start as the identity")
    ap.add_argument("--block-lr-mult", type=float, default=1.0,
                    help="learning rate of the residual blocks' parameters relative to --lr (new "
                         "blocks start far from where they are going, the rest of a resumed network "
                         "close to it)")
    ap.add_argument("--freeze-decoder", action="store_true",
                    help="train g_a and h_a only: everything the decoder uses (g_s, h_s, the entropy "
                         "models, the gains) stays bit for bit, so the new weights decode as the "
                         "old ones did (export with --decoder-of)")
    ap.add_argument("--hard-rate", action="store_true",
                    help="take the rate on the rounded latents (straight-through): the coder's real "
                         "bits, but a gradient blind to bin edges; with --freeze-decoder it made the "
                         "encoder spend more bits for less (train/README.md, run 14)")
    ap.add_argument("--grow-M", type=int, default=None, metavar="M",
                    help="on --resume, widen the latent y to M channels: the old channels compute "
                         "what they did, the new ones start unused (surgery.add_latent_channels)")
    ap.add_argument("--only-new-channels", type=int, default=None, metavar="K",
                    help="train only what computes or reads latent channels K.. (after --grow-M "
                         "from K): the first K channels' symbols, z and pixels stay as they are "
                         "(surgery.new_channel_masks); the z prior's quantiles are not trained")
    ap.add_argument("--free-rate", type=float, nargs=3, default=None, metavar=("K", "FREE_MIN", "RAMP_MIN"),
                    help="latent channels K.. pay no rate for the first FREE_MIN minutes of this run, "
                         "then a share rising linearly to all of it at RAMP_MIN: new channels "
                         "(--grow-M) learn to carry something before the rate can switch them off "
                         "(the logged bpp is the full rate)")
    ap.add_argument("--augment", default=None, metavar="SPEC",
                    help="route crops through train/augment.py: scales 1x/2x/4x (exact area averages), "
                         "HED stain jitter, JPEG 4:2:0 / JPEG 2000 re-coding, flips and rotations; the "
                         "loss's reference is the augmented crop itself. SPEC: 'on' for the defaults, or "
                         "key=value,... (augment.parse_spec), e.g. 'scale=1:.5/2:.3/4:.2,jpeg=.3,j2k=.1'. "
                         "Default off: the plain CropSampler")
    ap.add_argument("--sampler-workers", type=int, default=None, metavar="N",
                    help="processes rendering --augment's crops beside the training (the same crops for "
                         "any N; 0: in the training process); default: 0 on the CPU, up to 8 on a GPU, "
                         "which one core cannot keep fed")
    ap.add_argument("--lambdas", type=float, nargs="+", default=None,
                    help="a new λ ladder (one per quality level); on --resume the learned gains "
                         "are carried over by interpolating them at the new λ values")
    args = ap.parse_args(argv)
    if args.crop < WsiHyperprior.STRIDE or args.crop % WsiHyperprior.STRIDE:
        ap.error(f"--crop must be a positive multiple of {WsiHyperprior.STRIDE}, got {args.crop}")
    if args.dec_blocks and args.freeze_decoder:
        ap.error("--dec-blocks adds to the decoder, which --freeze-decoder keeps as it is")
    if args.accum < 1:
        ap.error(f"--accum must be at least 1, got {args.accum}")
    if args.free_rate is not None and not 0 <= args.free_rate[1] <= args.free_rate[2]:
        ap.error(f"--free-rate: need 0 <= FREE_MIN <= RAMP_MIN, got {args.free_rate[1]:g} "
                 f"and {args.free_rate[2]:g}")
    if args.sampler_workers is not None and args.sampler_workers < 0:
        ap.error(f"--sampler-workers must be 0 or more, got {args.sampler_workers}")
    if args.feat_crop > args.crop:
        ap.error(f"--feat-crop {args.feat_crop} is larger than --crop {args.crop}")
    augment.check_training_folders(args.data)     # before anything is loaded
    try:
        aug_spec = augment.parse_spec(args.augment) if args.augment is not None else None
    except ValueError as e:
        ap.error(str(e))

    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    state, old_lambdas = None, None
    if args.resume:
        state = torch.load(args.resume, map_location="cpu", weights_only=False)
        if "model" not in state and "state_dict" in state:   # shipped weights: start from them
            state = from_shipped(state)
        config = ModelConfig.from_dict(state["config"])
        if args.lambdas:
            old_lambdas = config.lambdas
            config = dataclasses.replace(config, lambdas=tuple(args.lambdas))
            state["model"] = remap_gains(state["model"], old_lambdas, config.lambdas)
            print(f"λ ladder {list(old_lambdas)} -> {list(config.lambdas)}: gains interpolated")
        if args.grow_M is not None and args.grow_M != config.M:
            wide = dataclasses.replace(config, M=args.grow_M)
            state["model"] = add_latent_channels(state["model"], config, wide, args.seed)
            state.pop("optimizer", None)     # the shapes changed: Adam starts afresh
            print(f"latent channels M {config.M} -> {wide.M} (the new ones start unused)")
            config = wide
        grown = dataclasses.replace(
            config, enc_blocks=config.enc_blocks if args.enc_blocks is None else args.enc_blocks,
            dec_blocks=config.dec_blocks if args.dec_blocks is None else args.dec_blocks)
        if grown != config:
            state["model"] = add_blocks(state["model"], config, grown)
            print(f"residual blocks g_a {config.enc_blocks} -> {grown.enc_blocks}, g_s {config.dec_blocks} "
                  f"-> {grown.dec_blocks} (new ones start as the identity)")
            config = grown
    else:
        config = ModelConfig(N=args.N, M=args.M, enc_blocks=args.enc_blocks or 0,
                             dec_blocks=args.dec_blocks or 0,
                             **({"lambdas": tuple(args.lambdas)} if args.lambdas else {}))
    if args.free_rate is not None and not 0 < args.free_rate[0] < config.M:
        raise SystemExit(f"--free-rate {args.free_rate[0]:g}: the network has M = {config.M} latent channels")
    model = WsiHyperprior(config).to(dev)
    all_names = [n for n, _ in model.named_parameters() if not n.endswith("quantiles")]
    main_names = all_names
    if args.freeze_decoder:
        main_names = [n for n in all_names if not n.startswith(WsiHyperprior.DECODER_PARTS)]
        for n, p in model.named_parameters():
            p.requires_grad_(n in main_names)
    if args.only_new_channels is not None:
        masks = new_channel_masks(model, args.only_new_channels)
        main_names = [n for n in all_names if n in masks]
        for n, p in model.named_parameters():
            p.requires_grad_(n in masks)
            if n in masks:       # Adam moves nothing whose gradient is always 0
                p.register_hook(lambda g, m=masks[n].to(dev): g * m)
    main_params = [model.get_parameter(n) for n in main_names]
    aux_params = [p for n, p in model.named_parameters() if n.endswith("quantiles")]
    # one group, or two when there are residual blocks: the blocks' learning rate is scaled
    blocks = block_params(model)
    groups, lr_mults = [], []
    for names, mult in (([n for n in main_names if n not in blocks], 1.0),
                        ([n for n in main_names if n in blocks], args.block_lr_mult)):
        if names:
            groups.append(names)
            lr_mults.append(mult)
    opt = torch.optim.Adam([{"params": [model.get_parameter(n) for n in g]} for g in groups], lr=args.lr)
    aux_opt = torch.optim.Adam(aux_params, lr=1e-3)
    step, wall0 = 0, 0.0
    rng = np.random.default_rng(args.seed)
    if state is not None:
        model.load_state_dict(state["model"], strict=False)
        if "optimizer" in state and (state.get("trainable", all_names) != main_names
                                     or len(state["optimizer"]["param_groups"]) != len(opt.param_groups)):
            print("optimiser state starts afresh: the trainable parameters changed")
        elif "optimizer" in state:
            if old_lambdas is not None and len(old_lambdas) != config.levels:
                # the optimiser numbers its parameters group by group
                remap_adam_rows(state["optimizer"], [n for g in groups for n in g], old_lambdas, config.lambdas)
            opt.load_state_dict(state["optimizer"])
            aux_opt.load_state_dict(state["aux_optimizer"])
        step, wall0 = state.get("step", 0), state.get("wall", 0.0)
        if "numpy_rng" in state:
            rng.bit_generator.state = state["numpy_rng"]
        print(f"resumed from {args.resume} at step {step} ({wall0 / 60:.1f} min trained)")
    torch.manual_seed(args.seed + step)

    images = load_images(args.data, args.crop)
    if aug_spec is not None:
        workers = args.sampler_workers if args.sampler_workers is not None else (
            0 if dev.type == "cpu" else min(8, os.cpu_count() or 1))
        sampler = augment.AugmentedSampler(images, args.crop, rng, aug_spec, workers=workers)
        print(sampler.describe())
    else:
        sampler = CropSampler(images, args.crop, rng)
    feat = FeatureDistance(args.vgg).to(dev) if args.alpha > 0 else None
    if args.bf16_body:
        bf16_body(model.g_a)
        bf16_body(model.g_s)
    fwd = torch.compile(model) if args.compile else model
    print(f"{len(images)} images, model N={config.N} M={config.M}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, alpha={args.alpha}")

    log_path = out / "log.csv"
    new_log = not log_path.exists()
    logf = open(log_path, "a", newline="")
    log = csv.writer(logf)
    if new_log:
        log.writerow(["step", "wall_min", "loss", "bpp_est", "psnr", "feat", "lr", "aux"])

    budget = args.minutes * 60
    t_start = time.time()
    t_ckpt = t_start
    acc = np.zeros(5)
    n_acc = 0

    def checkpoint(path: Path) -> None:
        save_atomic({
            "format": "wsicodec-train", "config": config.to_dict(), "model": model.state_dict(),
            "optimizer": opt.state_dict(), "aux_optimizer": aux_opt.state_dict(),
            "step": step, "wall": wall0 + time.time() - t_start, "numpy_rng": rng.bit_generator.state,
            "args": vars(args), "trainable": main_names,
        }, path)

    stop = []   # SIGINT / SIGTERM: finish the step, write the checkpoint, exit
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.append(signum))

    def train_loss(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The loss of one micro-batch, and its per-crop rate, MSE and feature distance."""
        # integer qualities (where the product is used and measured), a share drawn anywhere in 1..8
        n = x.shape[0]
        quality = torch.randint(1, QUALITY_MAX + 1, (n,), device=dev).float()
        anywhere = torch.rand(n, device=dev) < args.continuous
        quality = torch.where(anywhere, 1 + (QUALITY_MAX - 1) * torch.rand(n, device=dev), quality)
        out_d = fwd(x, quality, hard=args.hard_rate)
        x_hat = out_d["x_hat"]
        npix = x.shape[-1] * x.shape[-2]
        bpp = (out_d["bits_y"] + out_d["bits_z"]) / npix
        paid = bpp
        if args.free_rate is not None:
            k, free, ramp = int(args.free_rate[0]), args.free_rate[1] * 60, args.free_rate[2] * 60
            share = min(max((time.time() - t_start - free) / max(ramp - free, 1e-9), 0.0), 1.0)
            new_bits = -torch.log2(out_d["y_likelihoods"][:, k:]).flatten(1).sum(1)
            paid = bpp - (1 - share) * new_bits / npix
        mse = (x_hat - x).pow(2).flatten(1).mean(1)
        dist = 255.0 ** 2 * mse
        if feat is not None:
            fa, fb = x_hat.clamp(0, 1), x
            c = args.feat_crop
            if 0 < c < min(x.shape[-2:]):
                i, j = (int(v) for v in rng.integers(0, [x.shape[-2] - c + 1, x.shape[-1] - c + 1]))
                fa, fb = fa[..., i:i + c, j:j + c], fb[..., i:i + c, j:j + c]
            fd = feat(fa, fb)
        else:
            fd = torch.zeros_like(mse)
        loss = (paid + model.lambda_at(quality) * (dist + args.alpha * fd)).mean()
        return loss, bpp, mse, fd

    model.train()
    while True:
        elapsed = time.time() - t_start
        if elapsed >= budget or step >= args.steps or stop:
            break
        frac = min(elapsed / budget, 1.0)
        lr = args.lr_final + 0.5 * (args.lr - args.lr_final) * (1 + math.cos(math.pi * frac))
        for g, mult in zip(opt.param_groups, lr_mults):
            g["lr"] = lr * mult
        opt.zero_grad(set_to_none=True)
        micro = np.zeros(4)
        for _ in range(args.accum):
            loss, bpp, mse, fd = train_loss(sampler.batch(args.batch).to(dev))
            (loss / args.accum).backward()
            with torch.no_grad():
                psnr = (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean().item()
            micro += [loss.item(), bpp.mean().item(), psnr, fd.mean().item()]
        torch.nn.utils.clip_grad_norm_(main_params, 1.0)
        opt.step()
        if args.freeze_decoder or args.only_new_channels is not None:   # the quantiles are the decoder's too
            with torch.no_grad():
                aux = model.aux_loss()
        else:
            aux = model.aux_loss()
            aux_opt.zero_grad(set_to_none=True)
            aux.backward()
            aux_opt.step()
        step += 1
        acc += np.append(micro / args.accum, aux.item())
        n_acc += 1
        if step % args.log_every == 0:
            m = acc / n_acc
            wall = (wall0 + time.time() - t_start) / 60
            log.writerow([step, f"{wall:.2f}", f"{m[0]:.4f}", f"{m[1]:.4f}", f"{m[2]:.3f}",
                          f"{m[3]:.4f}", f"{lr:.2e}", f"{m[4]:.2f}"])
            logf.flush()
            print(f"step {step} {wall:.1f}min loss {m[0]:.4f} bpp~{m[1]:.3f} psnr {m[2]:.2f} "
                  f"feat {m[3]:.4f} lr {lr:.1e} aux {m[4]:.1f}", flush=True)
            acc[:] = 0
            n_acc = 0
        if time.time() - t_ckpt > args.ckpt_every:
            checkpoint(out / "last.pt")
            t_ckpt = time.time()
    checkpoint(out / "last.pt")
    logf.close()
    if isinstance(sampler, augment.AugmentedSampler):
        sampler.close()                 # its worker processes, if any
    print(f"{'stopped by signal' if stop else 'done'}: {step} steps, checkpoint {out / 'last.pt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
