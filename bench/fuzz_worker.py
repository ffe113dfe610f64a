"""The fuzzing harness's worker side: :func:`run_one` (one case: copy a base, mutate it, read
it under the time limit, measure the peak memory it adds, classify), :func:`worker_main` (the
``bench/fuzzlib.py worker`` process: a codec's cases, one JSON line each) and :func:`replay`
(one case in this process, for debugging).
"""

from __future__ import annotations

import json
import random
import resource
import shutil
import signal
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.fuzz_bases import CODECS, make_bases
from bench.fuzz_mutations import KINDS
from bench.fuzz_read import FAILURES, CaseTimeout, classify, read_everything, reference

#: per-case wall-clock limit (SIGALRM in the worker; the parent's watchdog is fuzzlib.WATCHDOG_S)
CASE_TIMEOUT_S = 30
#: the most a case may add to the worker's peak resident memory
MEMORY_CAP_BYTES = 1 << 30
#: address space a worker may add after its warm-up (RLIMIT_AS): a backstop, so that a
#: runaway allocation fails at once instead of taking the machine's memory
ADDRESS_SPACE_HEADROOM = 3 << 30


def _exception_chain(e: BaseException) -> list[BaseException]:
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return seen


def _rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")        # resets VmHWM, the peak RSS, to the current RSS
        return True
    except OSError:
        return False


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _alarm(signum: int, frame: Any) -> None:
    raise CaseTimeout()


def run_one(case: dict, bases: dict[str, Path], ref: dict, scratch: Path) -> dict[str, Any]:
    """Mutate a copy of the case's base container and read it; the case's record."""
    from wsicodec.errors import WsiCodecError

    codec, kind = case["codec"], case["kind"]
    rng = random.Random(f"{codec}:{kind}:{case['seed']}")
    work_dir = Path(tempfile.mkdtemp(dir=scratch))
    rec: dict[str, Any] = dict(case)
    try:
        if kind.startswith("zip_"):
            work = work_dir / "c.zarr.zip"
            shutil.copyfile(bases[f"{codec}-zip"], work)
        else:
            work = work_dir / "c.zarr"
            shutil.copytree(bases[codec], work)
        try:
            rec["mutation"] = KINDS[kind][1](rng, work, {"bases": bases, "codec": codec})
        except Exception as e:  # noqa: BLE001 - the harness's own bug: reported, not hidden
            rec.update(outcome="harness_error", detail="".join(traceback.format_exception(e))[-2000:])
            return rec
        reset = _rss_reset()
        rss0 = _status("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t0 = time.perf_counter()
        signal.alarm(CASE_TIMEOUT_S)
        try:
            res = read_everything(work, work_dir)
            signal.alarm(0)
            outcome, detail = classify(kind, res, ref)
        except CaseTimeout:
            outcome, detail = "hang", f"over {CASE_TIMEOUT_S} s"
        except BaseException as e:  # noqa: BLE001 - that is what we are looking for
            signal.alarm(0)
            chain = _exception_chain(e)
            if any(isinstance(x, CaseTimeout) for x in chain):
                outcome, detail = "hang", f"over {CASE_TIMEOUT_S} s"
            elif any(isinstance(x, MemoryError) for x in chain):
                outcome, detail = "memory", "".join(traceback.format_exception(e))[-3000:]
            elif isinstance(e, WsiCodecError):     # cannot happen: read_everything keeps them
                outcome, detail = "error", str(e)
            else:
                outcome, detail = "traceback", "".join(traceback.format_exception(e))[-3000:]
        finally:
            signal.alarm(0)
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        peak = _status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rec["peak_rss_growth_mb"] = round(max(0, peak - rss0) / 2 ** 20, 1)
        if outcome not in FAILURES and peak - rss0 > MEMORY_CAP_BYTES:
            outcome, detail = "memory", f"peak RSS grew {rec['peak_rss_growth_mb']} MB"
        rec["outcome"], rec["detail"] = outcome, detail
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return rec


def worker_main(argv: list[str]) -> int:
    """``worker BASES_JSON CASES_JSONL OUT_JSONL``: run the cases not yet in OUT (appending
    one line per case, flushed), each under the time limit; exit 3 after a hang (the
    parent starts a fresh worker for the rest)."""
    bases = {k: Path(v) for k, v in json.loads(Path(argv[0]).read_text()).items()}
    todo = [json.loads(line) for line in Path(argv[1]).read_text().splitlines() if line.strip()]
    out_path = Path(argv[2])
    done = set()
    if out_path.exists():
        done = {json.loads(line)["id"] for line in out_path.read_text().splitlines() if line.strip()}
    todo = [c for c in todo if c["id"] not in done]
    if not todo:
        return 0
    signal.signal(signal.SIGALRM, _alarm)
    scratch = Path(tempfile.mkdtemp(prefix="wsicodec-fuzz-"))
    try:
        refs = {}
        for codec in sorted({c["codec"] for c in todo}):
            refs[codec] = reference(bases[codec], scratch)
        try:         # the backstop against a runaway allocation (see ADDRESS_SPACE_HEADROOM)
            cap = _status("VmSize") + ADDRESS_SPACE_HEADROOM
            resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
        except (ValueError, OSError):
            pass
        with out_path.open("a") as out:
            for case in todo:
                out.write(json.dumps({"id": case["id"], "started": True}) + "\n")
                out.flush()
                rec = run_one(case, bases, refs[case["codec"]], scratch)
                out.write(json.dumps(rec) + "\n")
                out.flush()
                if rec["outcome"] == "hang":
                    return 3          # threads may still be stuck: a fresh process for the rest
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def replay(case: dict, folder: Path) -> dict:
    """Run one case in this process (for debugging a failure): makes the bases in
    ``folder`` if they are not there yet."""
    names = {c: folder / f"{c}.zarr" for c in CODECS}
    if not all(p.exists() for p in names.values()):
        make_bases(folder)
    bases = {}
    for c in CODECS:
        bases[c], bases[f"{c}-other"], bases[f"{c}-zip"] = (folder / f"{c}.zarr",
                                                            folder / f"{c}-other.zarr",
                                                            folder / f"{c}.zarr.zip")
    signal.signal(signal.SIGALRM, _alarm)
    scratch = Path(tempfile.mkdtemp(prefix="wsicodec-fuzz-"))
    try:
        return run_one(case, bases, reference(bases[case["codec"]], scratch), scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
