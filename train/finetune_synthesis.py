"""Fine-tune the synthesis transform g_s on the latents the codec actually writes.

    python train/finetune_synthesis.py wsicodec/weights/wsicodec-hyperprior.pt --out runs/gs \
        [--data ../shared/data/he/train ../shared/data/he/tiles] [--minutes 90] [--resume]
    python train/export.py wsicodec/weights/wsicodec-hyperprior.pt --synthesis runs/gs/last.pt

Everything a stream's symbols depend on (g_a, h_a, h_s, the entropy models, the gains, the
CDF tables) stays as it is; only g_s moves.  So the bytes do not change, and data written
with the parent weights opens with the result (``export --synthesis`` lists the parent in
``decodes_for``): it decodes to other, better pixels.

Jointly trained g_s saw straight-through-rounded latents of whole crops, with μ from a
hyperprior over the whole crop.  Here it sees what readers give it: every image of
``--data`` coded at every integer quality exactly as ``wsicodec compress`` codes it (256²
tiles, each with its own z stream and float64 μ, glass tiles as their colour latent, the
parent's reconstruction κ; :mod:`bench.tilecode`), the ungained latent planes computed once
(``planes.pt`` in ``--out``).  A sample is a random 256² tile-aligned window's 16×16 latents
with the 2-latent ring readers stitch around a tile (20×20 → g_s → the central 256²).

Loss: the joint training's distortion D = 255²·MSE + α·D_feat (α, D_feat as ``train.py``:
VGG16 relu1_2/relu2_2 from ``--vgg``, on a random ``--feat-crop`` square), weighted as the
joint objective weighs it, λ(q)·D (``--weighting lambda``, the default): qualities are drawn
with probability ∝ √λ(q) and weighted by √λ(q), the same expected gradient with less noise
than drawing them uniformly.  ``--weighting db``: uniform qualities, loss 10·log10(D), each
quality's relative distortion alike; measured worse (train/README.md, run 22: it gave the
low qualities +0.03-0.05 dB and took 0.02-0.06 dB from the top ones, where JPEG-XL is
compared).  Either way g_s alone spends what it learns on MSE: run 22 (λ weighting) gained
0.02-0.05 dB at qualities 5-8 and lost LPIPS there, and was not shipped.  Glass pixels (decoded without g_s) are masked.

``--holdout`` images of the first folder are never trained on: every ``--eval-every``
seconds their full planes are decoded (as :func:`bench.tilecode.image_pixels`) and PSNR per
quality against the parent's g_s is logged.  ``last.pt`` (g_s, Adam, step, RNG) every
``--ckpt-every`` seconds, atomically; ``--resume`` continues it.  SIGTERM/SIGINT checkpoint
and stop.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "train"))

import tilecode  # noqa: E402  (bench/tilecode.py: the codec's own encoder path)
from train import FeatureDistance, load_images, save_atomic  # noqa: E402
from wsicodec.checkpoint import load_model, sha256_file  # noqa: E402
from wsicodec.learned import PIXEL_STRIDE, STITCH_RING  # noqa: E402

TILE = 256
LAT = TILE // PIXEL_STRIDE          # 16 latents a side per tile
QUALITIES = tuple(range(1, 9))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@torch.inference_mode()
def coded_plane(model, tables, img: np.ndarray, quality: int) -> tuple[torch.Tensor, np.ndarray]:
    """The ungained ŷ plane (M, h/16, w/16) float16 a reader builds for ``img`` coded at
    ``quality``, and a (h, w) bool mask of the pixels g_s decodes (False on glass tiles)."""
    parts, mask = [], np.ones(img.shape[:2], bool)
    for t in tilecode.tiles(model, tables, img, quality):
        if isinstance(t, tilecode.Glass):
            parts.append((t, None))
            mask[t.rows, t.cols] = False
        else:
            parts.append((t, model.reconstruct(torch.round(t.y - t.mu), t.mu, t.index, quality)))
    return tilecode.latent_plane(model, img.shape, parts)[0].half(), mask


def build_planes(model, tables, images: list[np.ndarray], path: Path, source: str) -> dict:
    """Every image at every quality, cached in ``path`` (rebuilt when the weights differ)."""
    if path.exists():
        cached = torch.load(path, weights_only=False)
        if cached.get("source") == source and cached.get("count") == len(images):
            return cached
    t0 = time.perf_counter()
    planes, masks = [], []
    for i, img in enumerate(images):
        per_q = []
        for q in QUALITIES:
            plane, mask = coded_plane(model, tables, img, q)
            per_q.append(plane)
        planes.append(torch.stack(per_q))
        masks.append(torch.from_numpy(mask))
        log(f"planes: image {i + 1}/{len(images)} {img.shape[1]}x{img.shape[0]} "
            f"[{time.perf_counter() - t0:.0f} s]")
    out = {"source": source, "count": len(images), "planes": planes, "masks": masks}
    save_atomic(out, path)
    return out


def sample(rng: np.random.Generator, images, planes, masks, n: int, q_prob: np.ndarray):
    """``n`` windows: (latents (n, M, 20, 20), pixels (n, 3, 256, 256) in 0..1, mask, quality
    index), the quality index drawn with probabilities ``q_prob``."""
    ring = STITCH_RING
    lats, pix, msk, qs = [], [], [], []
    area = np.array([im.shape[0] * im.shape[1] for im in images], dtype=np.float64)
    for _ in range(1000 * n):
        i = int(rng.choice(len(images), p=area / area.sum()))
        p = planes[i]
        hl, wl = p.shape[-2:]
        if hl < LAT + 2 * ring or wl < LAT + 2 * ring:
            continue
        r = int(rng.integers(ring, hl - LAT - ring + 1))
        c = int(rng.integers(ring, wl - LAT - ring + 1))
        ys, xs = r * PIXEL_STRIDE, c * PIXEL_STRIDE
        core = images[i][ys:ys + TILE, xs:xs + TILE]
        if core.shape[:2] != (TILE, TILE):
            continue
        m = masks[i][ys:ys + TILE, xs:xs + TILE]
        if not bool(m.any()):
            continue
        q = int(rng.choice(len(QUALITIES), p=q_prob))
        lats.append(p[q, :, r - ring:r + LAT + ring, c - ring:c + LAT + ring].float())
        pix.append(torch.from_numpy(np.ascontiguousarray(core)).permute(2, 0, 1).float() / 255)
        msk.append(m)
        qs.append(q)
        if len(lats) == n:
            break
    else:
        raise SystemExit("no training image has a 256² window of tissue with its latent ring")
    return torch.stack(lats), torch.stack(pix), torch.stack(msk)[:, None].float(), qs


@torch.no_grad()
def holdout_psnr(model, images, planes, masks) -> list[float]:
    """PSNR per quality of the held-out images' full planes through the current g_s."""
    out = []
    for qi in range(len(QUALITIES)):
        sse, n = 0.0, 0
        for img, p, m in zip(images, planes, masks, strict=True):
            h, w = img.shape[:2]
            x = model.g_s(p[qi][None].float()).clamp(0, 1)[0, :, :h, :w]
            dec = (x.permute(1, 2, 0).numpy() * 255).round()
            d = (dec - img)[m.numpy()]
            sse += float((d.astype(np.float64) ** 2).sum())
            n += d.size
        out.append(10 * math.log10(255 ** 2 * n / max(sse, 1e-9)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", help="the shipped (exported) weights whose g_s is tuned")
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", nargs="+", default=[str(ROOT.parent / "shared/data/he/train"),
                                                   str(ROOT.parent / "shared/data/he/tiles")])
    ap.add_argument("--holdout", type=int, default=3, help="images of the first folder kept out")
    ap.add_argument("--minutes", type=float, default=90)
    ap.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: --minutes only)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--lr-final", type=float, default=5e-6)
    ap.add_argument("--alpha", type=float, default=50.0)
    ap.add_argument("--weighting", choices=("lambda", "db"), default="lambda")
    ap.add_argument("--feat-crop", type=int, default=128)
    ap.add_argument("--vgg", default=str(ROOT.parent / "shared/weights/vgg16_features_imagenet.pth"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue OUT/last.pt")
    ap.add_argument("--ckpt-every", type=float, default=300)
    ap.add_argument("--eval-every", type=float, default=900)
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    loaded = load_model(args.weights)
    # a private copy: load_model shares one instance per file within a process
    model, tables = copy.deepcopy(loaded.model).eval(), loaded.model.coding_tables()
    for p in model.parameters():
        p.requires_grad_(False)
    folders = [load_images([d], TILE + 2 * STITCH_RING * PIXEL_STRIDE) for d in args.data]
    held = folders[0][:args.holdout]
    train_imgs = folders[0][args.holdout:] + [im for f in folders[1:] for im in f]
    cache = build_planes(model, tables, held + train_imgs, out / "planes.pt", loaded.model_id)
    planes, masks = cache["planes"], cache["masks"]
    hp, hm = planes[:len(held)], masks[:len(held)]
    tp, tm = planes[len(held):], masks[len(held):]
    log(f"{len(train_imgs)} training images, {len(held)} held out; weights {loaded.model_id[:12]}")

    base = holdout_psnr(model, held, hp, hm)
    log("held-out PSNR with the parent's g_s: " + " ".join(f"{v:.3f}" for v in base))
    g_s = model.g_s.train()
    for p in g_s.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(g_s.parameters(), lr=args.lr)
    feat = FeatureDistance(args.vgg) if args.alpha > 0 else None
    if args.weighting == "db":
        q_prob, q_weight = np.full(len(QUALITIES), 1 / len(QUALITIES)), None
    else:
        root = np.sqrt([float(model.lambda_at(torch.tensor([float(q)]))) for q in QUALITIES])
        q_prob = root / root.sum()
        q_weight = torch.tensor(root * root.sum(), dtype=torch.float32)   # E[w·D] = Σ λ(q)·D_q
    rng = np.random.default_rng(args.seed)
    step, wall = 0, 0.0
    if args.resume and (out / "last.pt").exists():
        st = torch.load(out / "last.pt", weights_only=False)
        if st["parent_id"] != loaded.model_id:
            raise SystemExit(f"{out / 'last.pt'} tunes {st['parent_id'][:12]}, not {loaded.model_id[:12]}")
        g_s.load_state_dict(st["g_s"])
        opt.load_state_dict(st["opt"])
        step, wall = st["step"], st["wall"]
        rng.bit_generator.state = st["rng"]
        log(f"resumed at step {step}, {wall / 60:.1f} min")

    def checkpoint() -> None:
        save_atomic({"parent": str(args.weights), "parent_id": loaded.model_id, "g_s": g_s.state_dict(),
                     "opt": opt.state_dict(), "step": step, "wall": wall, "rng": rng.bit_generator.state,
                     "args": vars(args)}, out / "last.pt")

    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    new_log = not (out / "log.csv").exists()
    logf = open(out / "log.csv", "a", newline="")
    writer = csv.writer(logf)
    if new_log:
        writer.writerow(["step", "wall_min", "loss", "psnr", *[f"holdout_q{q}" for q in QUALITIES]])
    budget = args.minutes * 60
    start, last_ckpt, last_eval = time.perf_counter() - wall, time.perf_counter(), time.perf_counter()
    run_loss, run_psnr, run_n = 0.0, 0.0, 0
    while not stop and time.perf_counter() - start < budget and not (args.steps and step >= args.steps):
        frac = min(1.0, (time.perf_counter() - start) / budget)
        lr = args.lr_final + 0.5 * (args.lr - args.lr_final) * (1 + math.cos(math.pi * frac))
        for g in opt.param_groups:
            g["lr"] = lr
        lat, x, m, qi = sample(rng, train_imgs, tp, tm, args.batch, q_prob)
        r = STITCH_RING * PIXEL_STRIDE
        x_hat = g_s(lat)[..., r:r + TILE, r:r + TILE]
        mse = (((x_hat - x) ** 2) * m).sum((1, 2, 3)) / (3 * m.sum((1, 2, 3)))
        dist = 255 ** 2 * mse
        if feat is not None:
            c = args.feat_crop
            oy, ox = (int(v) for v in rng.integers(0, TILE - c + 1, 2))
            dist = dist + args.alpha * feat(x_hat[..., oy:oy + c, ox:ox + c], x[..., oy:oy + c, ox:ox + c])
        if args.weighting == "db":
            loss = (10 * torch.log10(dist)).mean()
        else:
            loss = (q_weight[qi] * dist).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        wall = time.perf_counter() - start
        run_loss += loss.item()
        run_psnr += float((10 * torch.log10(1 / mse.detach().clamp_min(1e-10))).mean())
        run_n += 1
        now = time.perf_counter()
        if step % 50 == 0:
            log(f"step {step} loss {run_loss / run_n:.4f} psnr {run_psnr / run_n:.3f} lr {lr:.1e} "
                f"{wall / 60:.1f} min")
        evaluate = now - last_eval >= args.eval_every
        hold = holdout_psnr(model, held, hp, hm) if evaluate else []
        if evaluate:
            g_s.train()
            last_eval = now
            log("held-out PSNR (Δ vs parent): " + " ".join(f"{v:.3f} ({v - b:+.3f})" for v, b in zip(hold, base)))
        if step % 50 == 0 or hold:
            writer.writerow([step, round(wall / 60, 2), round(run_loss / max(run_n, 1), 4),
                             round(run_psnr / max(run_n, 1), 3), *[round(v, 4) for v in hold]])
            logf.flush()
            run_loss, run_psnr, run_n = 0.0, 0.0, 0
        if now - last_ckpt >= args.ckpt_every:
            checkpoint()
            last_ckpt = now
    checkpoint()
    hold = holdout_psnr(model, held, hp, hm)
    log("end: held-out PSNR (Δ vs parent): " + " ".join(f"{v:.3f} ({v - b:+.3f})" for v, b in zip(hold, base)))
    writer.writerow([step, round(wall / 60, 2), "", "", *[round(v, 4) for v in hold]])
    logf.close()
    log(f"stopped at step {step} ({wall / 60:.1f} min); {out / 'last.pt'} (parent {sha256_file(args.weights)[:12]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
