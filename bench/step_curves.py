"""The auto codec's stage-1 quality search, replayed on measured curves.

Stage 1 of the ``auto`` codec (``wsicodec/learned/stepsearch.py``) raises a tile's network
quality in quarter steps until the tile's *estimated* PSNR clears the floor (+ 0.3 dB); each
estimate is one g_s pass, the largest part of auto's encode time beside the network alone
(docs/results.md, "Speed").  This script measures, for every non-glass tile of each set, the
whole estimate curve: the PSNR stage 1 would estimate at every quarter step from quality 1 to
8 (the encoder's own estimate: ``TileChooser._network`` with a search that tries every
step).  It then replays searches on those curves, with no g_s: for each asked quality and
floor, how many estimates a search makes per tile and which step it chooses, against the
lowest step whose estimate reaches the target (the ideal choice), and against an oracle
that knows the curve and only confirms (one estimate where the asked quality reaches the
target, else two: the ideal step and the one below it need not both be tried when the
ideal one lands within the search's tolerance; the top, where nothing reaches).

    PYTHONPATH=$PWD .venv/bin/python bench/step_curves.py            # measure and replay
    PYTHONPATH=$PWD .venv/bin/python bench/step_curves.py --replay    # replay the stored curves

Writes ``bench/results/step_curves.json`` (the curves, per set and tile, and the replays).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OUT = REPO / "bench" / "results" / "step_curves.json"
#: (set, images, side of the central crop of a slide; None: the set's own images)
SETS = (("he_test", 3, None), ("he_test_2x", 6, None), ("he_test_4x", 8, None),
        ("cmu", 1, 2048), ("tcga", 1, 2048))
ASKED = (2.0, 4.0, 6.0)
FLOORS = (30.0, 32.0, 35.0, 38.0)


def _images(name: str, count: int, side: int | None):
    from bench.datasets import get_dataset, slide_center, data_root
    ds = get_dataset(name)
    if side is None:
        yield from ds.images(limit=count)
        return
    yield f"{Path(ds.files[0]).stem}_center{side}", slide_center(data_root() / ds.files[0], side, 0)


def measure() -> dict:
    """Every non-glass tile's estimate curve at quality 1, 1.25, … 8 (auto's stage 1 at
    quality 1 and the default floor, with a search that tries every step)."""
    import torch
    import wsicodec
    from wsicodec.learned import choice

    class Every:
        """A stand-in for StepSearch that estimates every step, in order."""
        made: list = []

        def __init__(self, n: int, target: float) -> None:
            self.n, self.tried, self.next = n, {}, 0
            Every.made.append(self)

        @property
        def chosen(self):
            return None                         # every tile to JPEG-XL: no coding needed

        def record(self, estimate: float):
            self.tried[self.next] = float(estimate)
            self.next = self.next + 1 if self.next + 1 < self.n else None
            return self.next

    torch.set_flush_denormal(True)
    saved, choice.StepSearch = choice.StepSearch, Every
    try:
        curves: dict = {}
        for name, count, side in SETS:
            rows = []
            for image, rgb in _images(name, count, side):
                Every.made = []
                t0 = time.perf_counter()
                wsicodec.encode(rgb, codec="auto", quality=1)
                rows += [[round(s.tried[k], 4) for k in range(s.n)] for s in Every.made]
                print(f"{name} {image}: {len(Every.made)} tiles, {time.perf_counter() - t0:.0f} s", flush=True)
            curves[name] = rows
    finally:
        choice.StepSearch = saved
    return curves


def replay(curves: dict, search_cls) -> dict:
    """Each set × asked quality × floor: mean estimates per tile, and how the chosen step
    compares with the ideal one (the lowest reaching the target)."""
    from wsicodec.learned.choice import ESTIMATE_MARGIN_DB
    from wsicodec.learned.stepsearch import QUALITY_STEP
    out = {}
    for name, rows in curves.items():
        for asked in ASKED:
            first = round((asked - 1.0) / QUALITY_STEP)
            for floor in FLOORS:
                target = floor + ESTIMATE_MARGIN_DB
                tries, oracle, same, higher, lower, n_reach = [], [], 0, 0, 0, 0
                for row in rows:
                    curve = row[first:]
                    s = search_cls(len(curve), target)
                    while s.next is not None:
                        s.record(curve[s.next])
                    tries.append(len(s.tried))
                    ideal = next((k for k, p in enumerate(curve) if p >= target), None)
                    oracle.append(1 if ideal == 0 or len(curve) == 1 else 2)
                    n_reach += ideal is not None
                    if s.chosen == ideal:
                        same += 1
                    elif ideal is None or (s.chosen is not None and s.chosen > ideal):
                        higher += 1
                    else:
                        lower += 1
                out[f"{name} q{asked:g} floor {floor:g}"] = {
                    "tiles": len(rows), "reach": n_reach, "mean_estimates": round(float(np.mean(tries)), 3),
                    "oracle_estimates": round(float(np.mean(oracle)), 3),
                    "ideal_step": same, "higher_step": higher, "lower_step_or_none": lower}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replay", action="store_true", help="replay the stored curves, measure nothing")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    from wsicodec.learned.stepsearch import StepSearch
    if args.replay:
        doc = json.loads(args.out.read_text())
    else:
        t0 = time.perf_counter()
        from wsicodec.learned import LearnedCodec
        doc = {"model_id": LearnedCodec().model_id, "curves": measure(), "seconds": round(time.perf_counter() - t0, 1),
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    doc["replay"] = replay(doc["curves"], StepSearch)
    for key, r in doc["replay"].items():
        print(f"{key:28s} tiles {r['tiles']:3d} reach {r['reach']:3d}  estimates {r['mean_estimates']:.2f} (oracle {r['oracle_estimates']:.2f})  "
              f"ideal {r['ideal_step']} higher {r['higher_step']} lower/none {r['lower_step_or_none']}")
    text = json.dumps(doc, indent=1)
    # one line per curve: a list of numbers on one line
    text = re.sub(r"\[\s+([-0-9.,\s]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
    args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
