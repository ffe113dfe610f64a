"""Plot a training log (log.csv from train.py): loss, estimated bpp and PSNR against steps.

    python train/plot_log.py runs/main/log.csv --out train/loss_curve.png
"""

from __future__ import annotations

import argparse
import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log")
    ap.add_argument("--out", default="train/loss_curve.png")
    args = ap.parse_args(argv)
    with open(args.log) as f:
        rows = list(csv.DictReader(f))
    step = [int(r["step"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(axes, ("loss", "bpp_est", "psnr"),
                              ("loss (rate + λ·distortion)", "bpp (training estimate, all levels)",
                               "PSNR dB (training crops, all levels)")):
        ax.plot(step, [float(r[key]) for r in rows], lw=1)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
