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
