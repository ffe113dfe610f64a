"""Seeded fuzzing of wsicodec containers: the harness shared by ``tests/test_fuzz.py``
(a few hundred cases, in the test suite) and ``bench/fuzz.py`` (a longer run that writes
``bench/results/fuzz.json``).

A *case* is ``{"id", "codec", "kind", "seed"}``: one mutation of one small container made
here (:func:`make_bases`), reproducible from those fields alone (:func:`run_one`).  Cases run
in worker processes, one per codec (``python bench/fuzzlib.py worker ...``): each worker
decodes its unmutated containers once for the reference, then, per case, copies a base
container, applies the mutation and reads the copy the ways a user would::

    open_container + verify(decode=True) ─ open_slide + read_region of every level's full
    extent + every associated image ─ decompress to a TIFF, read back

Each case ends in one outcome:

* ``error``: every read that failed raised a WsiCodecError (a clean, one-line error), or
  ``verify`` reported the damage; whatever read succeeded gave the reference pixels;
* ``no_effect``: everything read succeeded with the reference pixels (a bit in a padding
  field, an edit of an unused JSON key, ...);
* ``undetectable``: the mutation is in the class no reader can catch without a
  signature (:data:`UNDETECTABLE_KINDS`: a forged, *valid* stream of the right size, or
  forged metadata that is valid), and it read as other pixels; excluded from the failures;
* failures: ``traceback`` (an exception outside the WsiCodecError tree), ``hang`` (over the
  per-case time limit, or a worker that stopped answering), ``crash`` (the worker died),
  ``memory`` (peak RSS of the case over the cap, or an allocation refused under the
  address-space cap), ``wrong_pixels`` (a read without error whose pixels differ from
  the reference), ``multiline`` (a WsiCodecError whose message is not one line);
  ``harness_error``: a mutation that could not be applied (a bug here, never hidden).

The harness is split by concern: ``bench/fuzz_bases.py`` (the base containers),
``bench/fuzz_store.py`` (a container's files, tiles, checks and digest forging),
``bench/fuzz_mutations.py`` and ``bench/fuzz_forgeries.py`` (the mutations, :data:`KINDS`),
``bench/fuzz_read.py`` (reading and classifying), ``bench/fuzz_worker.py`` (one case, the
worker process); this module generates the cases, runs them in workers and summarises them,
and names what ``bench/fuzz.py`` and ``tests/test_fuzz.py`` use.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (the worker): import bench and wsicodec from this checkout
    sys.path.insert(0, str(REPO))

from bench.fuzz_bases import CODECS, HE_TEST_PNG, SIZES, TILE, make_bases  # noqa: E402
from bench.fuzz_mutations import KINDS, UNDETECTABLE_KINDS  # noqa: E402
from bench.fuzz_read import FAILURES, OUTCOMES  # noqa: E402
from bench.fuzz_worker import CASE_TIMEOUT_S, MEMORY_CAP_BYTES, replay, worker_main  # noqa: E402

__all__ = ["CASE_TIMEOUT_S", "CODECS", "HE_TEST_PNG", "KINDS", "MEMORY_CAP_BYTES", "SIZES", "TILE",
           "UNDETECTABLE_KINDS", "WATCHDOG_S", "cases", "make_bases", "replay", "run_cases",
           "summarize"]

#: the worker's silence before the parent kills it (the per-case limit is CASE_TIMEOUT_S)
WATCHDOG_S = 90


def cases(n: int, seed: int, learned_share: float = 0.3, auto_share: float = 0.2,
          codecs: tuple[str, ...] = CODECS) -> list[dict[str, Any]]:
    """``n`` cases from ``seed``: each codec gets its share (jpegxl what the learned and
    auto shares leave), and within a codec the kinds go round in a seeded order, so every
    kind is drawn about equally often."""
    if not (0 <= learned_share and 0 <= auto_share and learned_share + auto_share <= 1):
        raise ValueError(f"shares {learned_share} + {auto_share} must lie in 0..1")
    rng = random.Random(seed)
    shares = {"learned": learned_share, "auto": auto_share, "jpegxl": 1.0 - learned_share - auto_share}
    counts = {c: int(round(n * shares[c])) for c in codecs}
    counts[codecs[0]] += n - sum(counts.values())
    out = []
    for codec in codecs:
        kinds = [k for k, (codecs_ok, _) in KINDS.items() if codec in codecs_ok]
        rng.shuffle(kinds)
        for i in range(counts[codec]):
            out.append({"codec": codec, "kind": kinds[i % len(kinds)], "seed": rng.getrandbits(32)})
    for i, c in enumerate(out):
        c["id"] = i
    return out


def run_cases(all_cases: list[dict], bases: dict[str, Path], folder: Path,
              parallel: int = 2, log: Callable[[str], None] | None = None) -> list[dict]:
    """Run ``all_cases`` in worker processes (one per codec, ``parallel`` at a time); a
    worker that stops answering or dies is replaced, the case it was on recorded as
    ``hang`` or ``crash``.  Returns one record per case, in id order."""
    folder.mkdir(parents=True, exist_ok=True)
    bases_json = folder / "bases.json"
    bases_json.write_text(json.dumps({k: str(v) for k, v in bases.items()}))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in os.environ.get(
                   "PYTHONPATH", "").split(os.pathsep) if p]))
    groups: dict[str, list[dict]] = {}
    for c in all_cases:
        groups.setdefault(c["codec"], []).append(c)
    queue = sorted(groups, key=lambda k: k == "jpegxl")     # the long ones (torch) first
    running: dict[str, dict[str, Any]] = {}

    def paths(codec: str) -> tuple[Path, Path, Path]:
        return (folder / f"{codec}.cases.jsonl", folder / f"{codec}.out.jsonl",
                folder / f"{codec}.stderr")

    def start(codec: str) -> None:
        cases_path, out_path, err_path = paths(codec)
        if not cases_path.exists():
            cases_path.write_text("".join(json.dumps(c) + "\n" for c in groups[codec]))
        with err_path.open("ab") as err:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "worker",
                                     str(bases_json), str(cases_path), str(out_path)],
                                    env=env, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=err)
        running[codec] = {"proc": proc, "size": -1, "last": time.monotonic()}

    def state(codec: str) -> tuple[int | None, set[int]]:
        """(id of a case started and not finished, ids finished)."""
        started, finished = None, set()
        for line in _lines(paths(codec)[1]):
            if line.get("started"):
                started = line["id"]
            else:
                finished.add(line["id"])
        return (None if started in finished else started), finished

    def record_lost(codec: str, case_id: int, outcome: str, detail: str) -> None:
        case = next(c for c in groups[codec] if c["id"] == case_id)
        with paths(codec)[1].open("a") as f:
            f.write(json.dumps(dict(case, outcome=outcome, detail=detail,
                                    mutation="(the worker was lost)")) + "\n")

    while queue or running:
        while queue and len(running) < parallel:
            start(queue.pop(0))
        time.sleep(0.2)
        for codec in list(running):
            info = running[codec]
            out_path = paths(codec)[1]
            size = out_path.stat().st_size if out_path.exists() else 0
            if size != info["size"]:
                info["size"], info["last"] = size, time.monotonic()
            rc = info["proc"].poll()
            if rc is None and time.monotonic() - info["last"] <= WATCHDOG_S:
                continue
            if rc is None:                      # silent too long: a hang in native code
                info["proc"].kill()
                info["proc"].wait()
            started, finished = state(codec)
            if started is not None:
                if rc is None:
                    record_lost(codec, started, "hang", f"worker silent {WATCHDOG_S} s: killed")
                else:
                    err = paths(codec)[2].read_text(errors="replace")[-1500:]
                    record_lost(codec, started, "crash", f"worker died (rc {rc}): {err}")
                finished.add(started)
            elif rc not in (0, 3) and not finished:
                err = paths(codec)[2].read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the fuzz worker for {codec} failed (rc {rc}):\n{err}")
            del running[codec]
            if len(finished) < len(groups[codec]):
                queue.insert(0, codec)
            elif log:
                log(f"{codec}: {len(finished)} cases done")
    records = {}
    for codec in groups:
        for r in _lines(paths(codec)[1]):
            if not r.get("started"):
                records[r["id"]] = r
    missing = [c["id"] for c in all_cases if c["id"] not in records]
    if missing:
        raise RuntimeError(f"fuzz cases without a record: {missing[:10]}")
    return [records[c["id"]] for c in all_cases]


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def summarize(records: list[dict]) -> dict[str, Any]:
    """Counts per outcome, per kind and outcome, per codec; the failures in full; the
    largest peak-RSS growth of a case."""
    by_outcome = {o: 0 for o in OUTCOMES}
    by_kind: dict[str, dict[str, int]] = {}
    by_codec: dict[str, dict[str, int]] = {}
    for r in records:
        by_outcome[r["outcome"]] = by_outcome.get(r["outcome"], 0) + 1
        k = by_kind.setdefault(f"{r['codec']}:{r['kind']}", {})
        k[r["outcome"]] = k.get(r["outcome"], 0) + 1
        c = by_codec.setdefault(r["codec"], {})
        c[r["outcome"]] = c.get(r["outcome"], 0) + 1
    failures = [r for r in records if r["outcome"] in FAILURES]
    return {"cases": len(records), "outcomes": by_outcome, "by_codec": by_codec,
            "by_kind": dict(sorted(by_kind.items())), "failures": failures,
            "failure_count": len(failures),
            "max_peak_rss_growth_mb": max((r.get("peak_rss_growth_mb", 0) for r in records), default=0),
            "max_case_seconds": max((r.get("seconds", 0) for r in records), default=0)}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit("usage: python bench/fuzzlib.py worker BASES_JSON CASES_JSONL OUT_JSONL "
             "(run by bench/fuzz.py and tests/test_fuzz.py)")
