"""Fuzz wsicodec's container readers: seeded mutations of a small jpegxl, a small learned
and a small auto container (a mixed grid with bare JPEG 2000 and JPEG-XL tiles), each read
every way a user would (bench/fuzzlib.py says how, and what counts as a failure).

    python bench/fuzz.py [--cases 1200] [--seed 2026] [--learned-share 0.3] [--auto-share 0.2]
                         [--out bench/results/fuzz.json]
    python bench/fuzz.py --replay '{"codec": "learned", "kind": "learned_header_forged", "seed": 123}'

Writes counts per mutation kind and outcome, every failure with its case (replayable),
the largest peak-RSS growth of a case, wall time and the environment.  Exits 1 when a
case failed.  ``tests/test_fuzz.py`` runs the same harness on a few hundred cases.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # bench/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))

from bench import fuzzlib  # noqa: E402
from bench.report import git_state, package_versions  # noqa: E402


def environment() -> dict:
    versions = package_versions(("numpy", "torch", "zarr", "imagecodecs", "tifffile", "numcodecs"))
    commit, dirty = git_state(REPO, ("wsicodec", "bench"))
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "loadavg_1m_end": round(os.getloadavg()[0], 2),
            "packages": versions, "git_commit": commit, "git_dirty": dirty,
            "data": "he/test crop" if fuzzlib.HE_TEST_PNG.exists() else "synthetic image"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--learned-share", type=float, default=0.3,
                    help="share of the cases on the learned container (default 0.3)")
    ap.add_argument("--auto-share", type=float, default=0.2,
                    help="share of the cases on the auto container (default 0.2); jpegxl gets the rest")
    ap.add_argument("--parallel", type=int, default=2, help="worker processes at once")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fuzz.json")
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for the base containers and worker logs (default: a temp dir)")
    ap.add_argument("--replay", default=None,
                    help="run one case (JSON with codec, kind, seed) here and print its record")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="wsicodec-fuzz-run-"))
    if args.replay:
        case = dict(json.loads(args.replay))
        case.setdefault("id", 0)
        print(json.dumps(fuzzlib.replay(case, work / "bases"), indent=1))
        return 0
    t0 = time.perf_counter()
    bases = fuzzlib.make_bases(work / "bases")
    t_bases = time.perf_counter() - t0
    cases = fuzzlib.cases(args.cases, args.seed, args.learned_share, args.auto_share)
    records = fuzzlib.run_cases(cases, bases, work / "run", parallel=args.parallel,
                                log=lambda m: print(m, file=sys.stderr))
    summary = fuzzlib.summarize(records)
    result = {
        "what": "seeded mutations of a small jpegxl, a small learned and a small auto container, each read "
                "with verify(decode=True), open_slide().read_region of every level and every "
                "associated image, and decompress (bench/fuzzlib.py)",
        "command": f"python bench/fuzz.py --cases {args.cases} --seed {args.seed} "
                   f"--learned-share {args.learned_share} --auto-share {args.auto_share}",
        "seed": args.seed, "base_sizes": {k: list(v) for k, v in fuzzlib.SIZES.items()},
        "tile_size": fuzzlib.TILE, "case_timeout_s": fuzzlib.CASE_TIMEOUT_S,
        "memory_cap_mb": fuzzlib.MEMORY_CAP_BYTES >> 20,
        "undetectable_by_design": list(fuzzlib.UNDETECTABLE_KINDS),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "bases_seconds": round(t_bases, 1),
        **summary,
        "environment": environment(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("cases", "outcomes", "failure_count",
                                             "max_peak_rss_growth_mb", "wall_seconds")}))
    return 1 if summary["failure_count"] else 0


if __name__ == "__main__":
    sys.exit(main())
