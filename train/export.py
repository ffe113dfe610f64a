"""Freeze a training checkpoint into the shipped inference weights.

    python train/export.py runs/main/last.pt [--out wsicodec/weights/wsicodec-hyperprior.pt]
                           [--decoder-of OLD_WEIGHTS.pt] [--reconstruction K1 ... K8]
    python train/export.py SHIPPED.pt --synthesis runs/gs/last.pt [--reconstruction ...]

Finds the entropy bottleneck's quantiles by bisection, builds the integer CDF
tables, drops optimiser state, writes atomically and prints the model id (sha256).
Given exported weights instead (a GPU session's), it keeps their tensors and tables and
only sets ``--reconstruction`` (and, with ``--synthesis``, takes the g_s that
``train/finetune_synthesis.py`` tuned for them); the result opens their data (same symbols).

Inputs are read with ``torch.load(weights_only=True)``; the output holds tensors and plain
JSON-able data only (the provenance, training arguments included, is converted), and is
checked to load that way before it replaces ``--out`` (docs/security.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsicodec.checkpoint import DEFAULT_WEIGHTS  # noqa: E402
from wsicodec.errors import WsiCodecError  # noqa: E402
from wsicodec.export import export  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a training checkpoint (runs/.../last.pt) or exported weights")
    ap.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--note", default="", help="free text stored in the provenance")
    ap.add_argument("--decoder-of", default=None, metavar="WEIGHTS",
                    help="shipped weights whose decoder the checkpoint kept (train.py --freeze-decoder): "
                         "checked tensor for tensor, then data made with them opens with the new weights")
    ap.add_argument("--reconstruction", type=float, nargs="+", default=None, metavar="K",
                    help="the decoder's κ at qualities spread evenly over 1..8, as "
                         "train/tune_reconstruction.py prints them (default: none, bin centres)")
    ap.add_argument("--synthesis", default=None, metavar="CHECKPOINT",
                    help="with exported weights: the g_s train/finetune_synthesis.py tuned for them")
    args = ap.parse_args(argv)
    try:
        sha = export(args.checkpoint, args.out, {"note": args.note} if args.note else None,
                     decoder_of=args.decoder_of, reconstruction=args.reconstruction,
                     synthesis=args.synthesis)
    except WsiCodecError as exc:
        raise SystemExit(f"export: error: {exc}") from None
    size = Path(args.out).stat().st_size
    print(f"{args.out}: {size / 1e6:.1f} MB, model id {sha}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
