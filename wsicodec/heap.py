"""Handing freed heap memory back to the operating system during long jobs.

glibc's allocator keeps memory that torch and numpy free in its arenas (one per thread
that allocated), and a heap can only shrink from its top: a whole-slide decode or encode,
which frees tensors of every size row after row from several threads, leaves holes that
the process holds on to, so its resident memory creeps up with the tiles worked through
(``bench/memory_scaling.py`` measures it).  ``malloc_trim(0)`` returns the free pages of
every arena, holes included; it takes milliseconds and holds the arenas' locks meanwhile,
so :func:`release_freed_memory` does it at most once per ``min_interval`` seconds,
process-wide, from whichever thread finishes a unit of work (a batch of tiles decoded, a
tile row written).
Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
import time
from typing import Callable

#: the least time between two trims, in seconds
MIN_INTERVAL = 2.0

_lock = threading.Lock()
_last = -float("inf")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (looked up once)."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_freed_memory(min_interval: float = MIN_INTERVAL) -> bool:
    """Return the heap's free pages to the operating system, unless that was done less
    than ``min_interval`` seconds ago (by any thread) or the C library cannot.  True when
    it trimmed.  Call it between units of work (a tile row), not inside them."""
    global _last
    now = time.monotonic()
    if now - _last < min_interval or not _lock.acquire(blocking=False):
        return False                    # done lately, or another thread is at it
    try:
        if now - _last < min_interval:
            return False
        _last = now
        fn = _malloc_trim()
        if fn is None:
            return False
        fn(0)
        return True
    finally:
        _lock.release()
