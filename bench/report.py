"""Small helpers the benchmark scripts share for what they print and write."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def log(msg: str) -> None:
    """Print a progress line at once (benchmarks run for minutes, often under nohup)."""
    print(msg, flush=True)


def json_safe(obj: Any) -> Any:
    """A JSON-safe copy: NaN/inf become None, numpy scalars Python numbers, tuples lists."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def fmt_value(v: Any, spec: str) -> str:
    """``format(v, spec)``, or "–" for a missing (None) or non-finite value: a table cell."""
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def float_or_nan(v: Any) -> float:
    """``float(v)``, NaN for None (a number JSON stored as null)."""
    return math.nan if v is None else float(v)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Installed version of each distribution (None where it is not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def imagecodecs_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Versions of imagecodecs' codec libraries (``jpeg8``, ``jpegxl``, ...)."""
    try:
        import imagecodecs
    except ImportError:
        return {}
    return {n: (fn() if (fn := getattr(imagecodecs, f"{n}_version", None)) else None) for n in names}


def git_state(repo, paths: tuple[str, ...]) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether ``paths`` have uncommitted changes) of the checkout at ``repo``."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=repo,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def run_environment(repo, packages: tuple[str, ...], paths: tuple[str, ...] = ("wsicodec",)) -> dict:
    """What a result JSON records of the run: CPU model and count, package versions, the
    checkout's commit and whether ``paths`` were dirty (:func:`git_state`), and the date."""
    import os
    import time

    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "packages": package_versions(packages),
            "git": git_state(repo, paths), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_json(path, doc: Any, indent: int = 2) -> None:
    """Write ``doc`` (made :func:`json_safe`) to ``path``, creating its folder, and say so."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(doc), indent=indent) + "\n")
    log(f"wrote {path}")
