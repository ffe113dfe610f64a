"""Plot a training log (log.csv from train.py): loss, estimated bpp and PSNR against steps.

    python train/plot_log.py runs/main/log.csv --out train/logs/loss_curve.png [--mark 7216:"new λ ladder"]

A resumed run repeats the steps after its last checkpoint: the last row of each step is
kept.  Thin lines are the logged means (every ``--log-every`` steps), thick lines a
rolling mean over ``--smooth`` rows.
"""

from __future__ import annotations

import argparse
import csv

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log")
    ap.add_argument("--out", default="train/logs/loss_curve.png")
    ap.add_argument("--smooth", type=int, default=9, help="rows in the rolling mean")
    ap.add_argument("--mark", action="append", default=[], metavar="STEP:LABEL",
                    help="a vertical line at STEP (e.g. where the λ ladder changed)")
    args = ap.parse_args(argv)
    with open(args.log) as f:
        by_step = {int(r["step"]): r for r in csv.DictReader(f)}
    rows = [by_step[k] for k in sorted(by_step)]
    step = [int(r["step"]) for r in rows]
    marks = [(int(m.split(":", 1)[0]), m.split(":", 1)[1] if ":" in m else "") for m in args.mark]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(axes, ("loss", "bpp_est", "psnr"),
                              ("loss (rate + λ·distortion)", "bpp (training estimate, all levels)",
                               "PSNR dB (training crops, all levels)")):
        values = np.array([float(r[key]) for r in rows])
        ax.plot(step, values, lw=0.6, alpha=0.4, color="C0")
        if len(values) >= args.smooth > 1:
            smooth = np.convolve(values, np.ones(args.smooth) / args.smooth, mode="valid")
            ax.plot(step[args.smooth // 2:][:len(smooth)], smooth, lw=1.6, color="C0")
        for at, text in marks:
            ax.axvline(at, color="C3", lw=1, ls="--")
            if text and key == "psnr":
                # rotated along the line so neighbouring marks do not overprint each other
                ax.annotate(text, (at, 0.03), xycoords=("data", "axes fraction"), fontsize=8,
                            color="C3", xytext=(-3, 0), textcoords="offset points",
                            rotation=90, ha="right", va="bottom")
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
