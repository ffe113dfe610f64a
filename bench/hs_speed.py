"""The exact h_s with its stride-2 layers as sub-pixel phases, against conv_transpose2d.

    python bench/hs_speed.py [--batches 1,9,16] [--rounds 21] [--out bench/results/hs_speed.json]

:class:`~wsicodec.learned.exact.ExactHyperSynthesis` runs h_s's two transposed
convolutions (5×5, stride 2) as four ordinary convolutions each
(:func:`~wsicodec.learned.exact.sub_pixel_phases`); in its integer arithmetic both forms give
the same bits (checked here on every batch).  Both engines run on the same ẑ (random
integers around the model's medians) at quality 4, interleaved round by round so that the
machine's drift falls on both; the JSON gives each one's median wall time per batch and
their ratio.  A cold viewer tile runs it on 9 tiles (the tile and its neighbours), a whole
slide's decode on chunks of up to 16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import log, run_environment, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,9,16")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "hs_speed.json")
    args = ap.parse_args(argv)
    import torch

    from wsicodec.checkpoint import load_model
    from wsicodec.learned.exact import ExactHyperSynthesis

    torch.set_flush_denormal(True)
    model = load_model().model
    engines = {"phases": model.h_s_exact(),
               "transposed": ExactHyperSynthesis(model.h_s, model.log_hgain, model.config.levels, phases=False)}
    med = model.entropy_bottleneck._get_medians().reshape(1, -1, 1, 1).double()
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        z = torch.round(torch.randn(batch, model.config.N, 4, 4, generator=g, dtype=torch.float64) * 4) + med
        outs = {name: h(z, 4.0) for name, h in engines.items()}
        if not torch.equal(outs["phases"], outs["transposed"]):
            raise SystemExit(f"batch {batch}: the two forms differ")
        times: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, h in engines.items():
                t0 = time.perf_counter()
                h(z, 4.0)
                times[name].append(time.perf_counter() - t0)
        ms = {name: round(statistics.median(t) * 1000, 2) for name, t in times.items()}
        rows.append({"batch": batch, "median_ms": ms, "identical": True,
                     "transposed_over_phases": round(ms["transposed"] / ms["phases"], 3)})
        log(f"batch {batch}: phases {ms['phases']} ms, transposed {ms['transposed']} ms")
    write_json(args.out, {"what": __doc__.splitlines()[0], "command": " ".join(["python", "bench/hs_speed.py", *(argv or sys.argv[1:])]),
                          "torch_threads": torch.get_num_threads(), "rounds": args.rounds,
                          "load_average": list(os.getloadavg()), "rows": rows,
                          "environment": run_environment(REPO, ("torch", "numpy"))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
