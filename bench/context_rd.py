"""What a checkerboard context model would save in bits, measured on the shipped transforms.

    python bench/context_rd.py [--minutes 20] [--threads 1] [--max-images 14]
        -> bench/results/context_rd.json (35 min on the 2-core machine beside a training run)

The decode-cost half of "does a parallel context model pay for itself" is
``bench/context_cost.py``; this is the rate-distortion half.  Training a context model
jointly with the transforms needs a GPU, so this fits one *on top of the frozen shipped
network*: g_a, h_a, h_s, g_s, the gains and the CDF tables stay as they are, and only a
checkerboard context head is trained (He et al. 2021, "Checkerboard context model for
efficient learned image compression"):

* anchors (latent positions with (i + j) even) are coded exactly as now, with the
  hyperprior's (μ, σ);
* non-anchors get (μ + Δμ, σ·exp(Δs)), where (Δμ, Δs) come from a 5×5 convolution over
  the decoded anchors and 1×1 layers that also see the hyperprior's output; the last layer
  starts at zero, so training starts from the hyperprior's own rate.

Training draws 17×17 latent crops (the latent of a 272² region: a 256² tile with its 8 px
context margin) from g_a of the ``he/train`` images and ``he/tiles`` tiles, a quality
anywhere in 1..8 per crop, and minimises the non-anchors' bits (uniform-noise proxy).
Evaluation codes ``he/test`` the way the codec does (256² tiles, 8 px margin, float64
entropy parameters, compressai's rANS through :mod:`wsicodec.entropy`) and measures real
bytes of both schemes (z stream + y stream, and for the context model anchors and
non-anchors as two streams) plus the 36-byte tile header, and PSNR after g_s on the tile's
own pixels.  Only the encoder side exists here: a decoder would run the same float64
layers in the same order (its cost is ``context_cost.json``), so the bytes are what a
decoder would read.  A jointly trained context model would do better than this head on
frozen transforms; the number is a lower bound on what the context buys.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TILE = 256
CROP = 17                # latent side of a 272² region
QUALITIES = (1, 2, 3, 4, 5, 6, 7, 8)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def anchor_mask(h: int, w: int, dtype=torch.float32) -> torch.Tensor:
    """(1, 1, h, w): 1 on anchors ((i + j) even), 0 on non-anchors."""
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return ((i + j) % 2 == 0).to(dtype)[None, None]


class CheckerboardHead(nn.Module):
    """(anchors ŷ_A, hyperprior output ψ = (σ, μ)) -> (Δs, Δμ) for the non-anchors."""

    def __init__(self, M: int, width: int | None = None) -> None:
        super().__init__()
        width = width or 2 * M
        self.ctx = nn.Conv2d(M, M, 5, padding=2)
        self.ep = nn.Sequential(
            nn.Conv2d(3 * M, width, 1), nn.LeakyReLU(inplace=True),
            nn.Conv2d(width, width, 1), nn.LeakyReLU(inplace=True),
            nn.Conv2d(width, 2 * M, 1))
        nn.init.zeros_(self.ep[-1].weight)
        nn.init.zeros_(self.ep[-1].bias)

    def forward(self, y_anchor: torch.Tensor, scales: torch.Tensor, means: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``y_anchor``: ŷ − μ on anchors (centred, so the head sees residuals), 0 elsewhere.

        Returns the non-anchors' (σ', μ')."""
        c = self.ctx(y_anchor)
        d = self.ep(torch.cat([c, torch.log(scales.clamp_min(0.11)), means], 1))
        ds, dm = d.chunk(2, 1)
        return scales * torch.exp(ds.clamp(-4, 4)), means + dm


# ------------------------------------------------------------------------------------ data

def _images(folders: list[Path], min_side: int) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for folder in folders:
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() not in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
                continue
            a = np.asarray(Image.open(p).convert("RGB"))
            if min(a.shape[:2]) >= min_side:
                out.append(a)
    return out


@torch.inference_mode()
def latents_of(model, images: list[np.ndarray]) -> list[torch.Tensor]:
    """g_a (no gain) of every image, whole: (M, h/16, w/16) float32 each."""
    from wsicodec.learned.network import pad_to_stride

    out = []
    for a in images:
        x = torch.from_numpy(np.ascontiguousarray(a).copy()).permute(2, 0, 1)[None].float().div(255)
        x = pad_to_stride(x, 16)
        out.append(model.transform(x)[0])
    return out


def hyper(model, y: torch.Tensor, q: torch.Tensor):
    """Gained y (B, M, h, w) -> (z symbols, ẑ, σ, μ) exactly as the training pass does (float32)."""
    from wsicodec.learned.network import pad_to_stride

    gain, hgain = model.gains(q)
    yq = y * gain
    z = model.h_a(pad_to_stride(yq, 4)) * hgain
    med = model.entropy_bottleneck._get_medians().reshape(1, -1, 1, 1)
    z_hat = torch.round(z - med) + med
    p = model.h_s(z_hat / hgain)[..., :y.shape[-2], :y.shape[-1]]
    scales, means = p.chunk(2, 1)
    return yq, scales, means


def train(model, head: CheckerboardHead, lat: list[torch.Tensor], minutes: float, batch: int,
          lr: float, seed: int = 0) -> list[dict]:
    from wsicodec.learned.ladder import QUALITY_MAX

    gc = model.gaussian_conditional
    table = gc.scale_table.float()
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    mask = anchor_mask(CROP, CROP)
    history, t0, step = [], time.time(), 0
    while time.time() - t0 < minutes * 60:
        crops = []
        for _ in range(batch):
            y = lat[rng.integers(len(lat))]
            i, j = rng.integers(0, y.shape[1] - CROP + 1), rng.integers(0, y.shape[2] - CROP + 1)
            crops.append(y[:, i:i + CROP, j:j + CROP])
        y = torch.stack(crops)
        q = torch.from_numpy(rng.uniform(1, QUALITY_MAX, batch)).float()
        with torch.no_grad():
            yq, scales, means = hyper(model, y, q)
            scales = table[torch.searchsorted(table[:-1], scales.contiguous())]   # as coded
            res = (torch.round(yq - means)) * mask       # decoded anchors, centred
        s2, m2 = head(res, scales, means)
        noisy = yq + torch.empty_like(yq).uniform_(-0.5, 0.5)
        lik0 = model.y_likelihood(noisy, scales, means)
        lik1 = model.y_likelihood(noisy, s2, m2)
        non = 1 - mask
        bits0 = -(torch.log2(lik0) * non).sum() / batch
        bits1 = -(torch.log2(lik1) * non).sum() / batch
        opt.zero_grad()
        bits1.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            saved = 1 - bits1.item() / bits0.item()
            history.append({"step": step, "minutes": round((time.time() - t0) / 60, 2),
                            "nonanchor_bits_saved": round(saved, 4)})
            log(f"step {step}: non-anchor bits (noise proxy) {saved * 100:+.2f} % saved")
    return history


# -------------------------------------------------------------------------------- evaluation

@torch.inference_mode()
def code_image(model, head: CheckerboardHead, tables, img: np.ndarray, quality: float
               ) -> dict[str, tuple[int, float]]:
    """Code one image as the codec does (tiles + margin), both ways from one g_a pass.

    Returns {"hyperprior": (bytes, SSE), "checkerboard": (bytes, SSE)} over the image:
    the shipped path, and anchors as shipped with the non-anchors from the context head,
    each group its own rANS stream.
    """
    from tilecode import Glass, image_sse, stream_bytes, tiles

    _, tb_y = tables
    table = model.gaussian_conditional.scale_table.to(torch.float64)
    acc = {"hyperprior": [0, []], "checkerboard": [0, []]}
    for t in tiles(model, tables, img, quality, TILE):   # the codec's own context margin
        if isinstance(t, Glass):   # glass: the same few bytes and pixels either way
            for v in acc.values():
                v[0] += t.nbytes
                v[1].append((t, None))
            continue
        mu, index = t.mu, t.index
        y_sym = torch.round(t.y - mu)
        # the shipped path
        n_h = t.side_bytes + stream_bytes(y_sym[0], index[0], tb_y)
        # checkerboard: the head sees the σ the table index stands for, as a decoder would
        sig = table[index.long()]
        a = anchor_mask(*y_sym.shape[-2:], torch.float64).bool()
        s2, m2 = head(y_sym * a, sig, mu)
        idx2 = torch.searchsorted(table[:-1], s2.clamp_min(0.11).contiguous(), side="left").to(torch.int32)
        y_sym2 = torch.round(t.y - m2)
        anchors = a.expand_as(y_sym)[0]
        n_c = t.side_bytes + stream_bytes(y_sym[0][anchors], index[0][anchors], tb_y)
        n_c += 4 + stream_bytes(y_sym2[0][~anchors], idx2[0][~anchors], tb_y)   # + its length field
        for name, nbytes, y_hat in (("hyperprior", n_h, y_sym + mu),
                                    ("checkerboard", n_c, torch.where(a, y_sym + mu, y_sym2 + m2))):
            acc[name][0] += nbytes
            acc[name][1].append((t, y_hat))
    return {k: (v[0], image_sse(model, img, v[1])) for k, v in acc.items()}


def evaluate(model, head, tables, files: list[Path]) -> dict:
    from PIL import Image

    rows = {"hyperprior": [], "checkerboard": []}
    for f in files:
        img = np.asarray(Image.open(f).convert("RGB"))
        px = img.shape[0] * img.shape[1]
        for q in QUALITIES:
            for name, (nbytes, sse) in code_image(model, head, tables, img, q).items():
                mse = sse / (px * 3)
                rows[name].append({"image": f.name, "quality": q, "bpp": 8 * nbytes / px,
                                   "psnr": 10 * math.log10(255 ** 2 / mse)})
        last = {k: v[-1] for k, v in rows.items()}
        log(f"{f.name}: q8 hyperprior {last['hyperprior']['bpp']:.3f} bpp "
            f"{last['hyperprior']['psnr']:.2f} dB, checkerboard {last['checkerboard']['bpp']:.3f} bpp "
            f"{last['checkerboard']['psnr']:.2f} dB")
    return rows


def summarise(rows: dict, files: list[Path]) -> dict:
    import metrics

    out: dict = {"per_quality": [], "per_image_bd_rate": []}
    for q in QUALITIES:
        e = {"quality": q}
        for name, rs in rows.items():
            sel = [r for r in rs if r["quality"] == q]
            e[f"{name}_bpp"] = round(float(np.mean([r["bpp"] for r in sel])), 4)
            e[f"{name}_psnr"] = round(float(np.mean([r["psnr"] for r in sel])), 3)
        e["bytes_saved_pct"] = round(100 * (1 - e["checkerboard_bpp"] / e["hyperprior_bpp"]), 2)
        out["per_quality"].append(e)
    pq = out["per_quality"]
    out["bd_rate_psnr_mean_curves"] = round(metrics.bd_rate(
        [e["hyperprior_bpp"] for e in pq], [e["hyperprior_psnr"] for e in pq],
        [e["checkerboard_bpp"] for e in pq], [e["checkerboard_psnr"] for e in pq]), 2)
    per = []
    for f in files:
        curve = {n: [r for r in rs if r["image"] == f.name] for n, rs in rows.items()}
        per.append(round(metrics.bd_rate([r["bpp"] for r in curve["hyperprior"]],
                                         [r["psnr"] for r in curve["hyperprior"]],
                                         [r["bpp"] for r in curve["checkerboard"]],
                                         [r["psnr"] for r in curve["checkerboard"]]), 2))
    out["per_image_bd_rate"] = per
    out["per_image_median"] = float(np.median(per))
    return out


@torch.inference_mode()
def float64_cost_ms(model, head: CheckerboardHead, threads: int) -> float:
    """p50 of the head's float64 forward for one 17×17 tile latent (what a decoder adds)."""
    torch.set_num_threads(threads)
    M = model.config.M
    h64 = head.double()
    y = torch.randn(1, M, CROP, CROP, dtype=torch.float64).round()
    s = torch.rand(1, M, CROP, CROP, dtype=torch.float64) + 0.2
    ts = []
    for i in range(18):
        t = time.perf_counter()
        h64(y, s, y)
        if i >= 3:
            ts.append(time.perf_counter() - t)
    return round(sorted(ts)[len(ts) // 2] * 1e3, 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=[str(ROOT.parent / "shared/data/he/train"),
                                                  str(ROOT.parent / "shared/data/he/tiles")])
    ap.add_argument("--test", default=str(ROOT.parent / "shared/data/he/test"))
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-images", type=int, default=14)
    ap.add_argument("--head", default=str(ROOT / "runs" / "context_head.pt"),
                    help="where the trained head is saved (not part of the package)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "context_rd.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    from wsicodec.checkpoint import load_model

    loaded = load_model()
    model = loaded.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    head = CheckerboardHead(model.config.M)
    t0 = time.time()
    imgs = _images([Path(d) for d in args.data], min_side=CROP * 16)
    lat = [t.clone() for t in latents_of(model, imgs)]   # plain tensors, usable under autograd
    log(f"g_a of {len(lat)} training images in {time.time() - t0:.0f} s")
    t1 = time.time()
    history = train(model, head, lat, args.minutes, args.batch, args.lr)
    train_min = (time.time() - t1) / 60
    Path(args.head).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": head.state_dict(), "model_id": loaded.model_id}, args.head)
    head.eval()
    files = sorted(p for p in Path(args.test).iterdir() if p.suffix.lower() == ".png")[:args.max_images]
    t2 = time.time()
    rows = evaluate(model, head.double(), loaded.model.coding_tables(), files)
    summary = summarise(rows, files)
    result = {
        "what": "checkerboard context head trained on the frozen shipped network; he/test coded "
                "as the codec does (256² tiles + 8 px margin), real rANS bytes incl. 36-byte "
                "tile headers, PSNR over each image",
        "model_id": loaded.model_id,
        "head_parameters": sum(p.numel() for p in head.parameters()),
        "train": {"minutes": round(train_min, 1), "steps": history[-1]["step"] if history else 0,
                  "batch": args.batch, "crop_latent": CROP, "lr": args.lr, "threads": args.threads,
                  "images": len(lat), "history": history},
        "eval_minutes": round((time.time() - t2) / 60, 1),
        "images": [f.name for f in files],
        **summary,
        "head_float64_ms_per_tile_1_thread": float64_cost_ms(model, head, 1),
        "hyperprior_float64_ms_per_tile_1_thread": json.loads(
            (ROOT / "bench/results/context_cost.json").read_text()).get("hyperprior_h_s_ms"),
        "rows": rows,
        "environment": {"torch": torch.__version__, "cpu_count": os.cpu_count(),
                        "loadavg_1m": os.getloadavg()[0]},
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    log(f"BD-rate (PSNR) checkerboard vs hyperprior: {summary['bd_rate_psnr_mean_curves']:+.2f} % "
        f"(per image median {summary['per_image_median']:+.2f} %) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
