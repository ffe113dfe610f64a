"""A thread-safe LRU bounded by the bytes of what it holds (no dependencies).

:class:`wsicodec.batch.TileCache` (decoded tiles) and
:class:`wsicodec.learned.LatentCache` (entropy-decoded latents) are both this, with
their own measure of an item's size.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable


class ByteLRU:
    """Least-recently-used items first out once their sizes pass ``max_bytes``; an item
    larger than the whole cache is not stored.  Subclasses say what an item weighs."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._nbytes = 0
        self._hits = self._misses = 0
        self._lock = threading.Lock()

    def size_of(self, item: Any) -> int:
        raise NotImplementedError

    def get(self, key: Hashable) -> Any:
        with self._lock:
            return self._lookup(key)

    def _lookup(self, key: Hashable) -> Any:
        """:meth:`get` for a caller that holds the lock."""
        item = self._items.get(key)
        if item is None:
            self._misses += 1
            return None
        self._items.move_to_end(key)
        self._hits += 1
        return item

    def put(self, key: Hashable, item: Any) -> None:
        n = self.size_of(item)
        if n > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._nbytes -= self.size_of(old)
            self._items[key] = item
            self._nbytes += n
            while self._nbytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._nbytes -= self.size_of(evicted)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._nbytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
