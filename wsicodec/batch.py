"""Batched, cached tile decoding for the reader and the tile server.

::

    decode(level, [(col, row), ...])
      │  TileCache (LRU, bounded in bytes) ──hit──────────────────────────────► tile
      │  in-flight table: a tile another thread is decoding is waited for, not redone
      ▼  misses
    codec.decode_tiles(keys, fetch=container.read_encoded_tile (CRC-checked bytes),
      │                run=the decoder's thread pool, cache=the codec's decode cache)
      │
      ├─ learned codec: glass tiles decoded directly; network tiles and their 8
      │                 neighbours ─► latents from the latent cache, or entropy decode
      │                 (rANS without the GIL) + exact h_s (batched; on the GPU when
      │                 g_s is) in chunks of tiles on the thread pool ─► each tile's
      │                 latents joined with its neighbours' (stitching) ─► the codec's
      │                 g_s queue: windows of all waiting callers grouped by shape,
      │                 ≤ max_batch per pass, one pass at a time, on the device (CUDA
      │                 when present with device="auto", else CPU)
      └─ other codecs: codec.decode of each tile on the thread pool
      ▼
    TileCache.put ─► tiles (read-only arrays), in the order asked

A damaged tile is an error for that tile only: the call that asked for it raises
:class:`CorruptTileError` naming level/col/row, and every other tile of the batch is
still decoded and cached.  All public methods are thread-safe.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from wsicodec.codecs import TileCodec, check_precision
from wsicodec.errors import InvalidSettingError, as_tile_error
from wsicodec.lru import ByteLRU

TileKey = tuple[int, int, int]
"""(level, col, row)."""

#: default cache size: 256 MiB holds ~1,300 decoded 256² RGB tiles
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
#: default latent cache of the learned codec: 64 MiB holds ~500 tiles' 256² latents
DEFAULT_LATENT_CACHE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class DecoderSettings:
    """How a :class:`BatchDecoder` decodes.

    Attributes:
        cache_bytes: upper bound of the decoded-tile cache in bytes (0 disables it).
        workers: threads for entropy decoding (learned) or ``codec.decode`` (others);
            ``None``: the CPU count, at most 8.
        device: where g_s runs: ``"auto"`` (CUDA when present, else CPU), ``"cpu"``,
            ``"cuda"`` or ``"cuda:N"``.  The rANS coding runs on the CPU's threads; the
            exact h_s runs on the GPU when g_s does (the same bits as on the CPU).
        max_batch: most tiles per g_s pass (bounds memory); ``None``: 16 on a GPU, 2 on
            the CPU (where larger batches stop paying).  Only one g_s pass runs at a
            time per decoder, so many concurrent callers cannot multiply its memory;
            tiles of callers that arrive meanwhile join the next pass.
        latent_cache_bytes: upper bound of the learned codec's cache of entropy-decoded
            latents (0 disables it).  A tile is decoded with its neighbours' latents; the
            cache lets each be entropy-decoded once while a viewer moves over a region.
        precision: how g_s runs: ``"float32"`` (the reference) or ``"bfloat16"`` (its
            inner layers in bfloat16: faster where the device has bfloat16 arithmetic,
            pixels slightly different; the symbols and their checks are the same).
    """

    cache_bytes: int = DEFAULT_CACHE_BYTES
    workers: int | None = None
    device: str = "auto"
    max_batch: int | None = None
    latent_cache_bytes: int = DEFAULT_LATENT_CACHE_BYTES
    precision: str = "float32"

    def __post_init__(self) -> None:
        check_precision(self.precision)
        for name in ("cache_bytes", "latent_cache_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidSettingError(f"{name} must be an integer >= 0, got {v!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(
                self.workers, int) or not 1 <= self.workers <= 256):
            raise InvalidSettingError(f"workers must be an integer in [1, 256], got "
                                      f"{self.workers!r}")
        if self.max_batch is not None and (isinstance(self.max_batch, bool) or not isinstance(
                self.max_batch, int) or not 1 <= self.max_batch <= 1024):
            raise InvalidSettingError(f"max_batch must be an integer in [1, 1024], got "
                                      f"{self.max_batch!r}")
        if not isinstance(self.device, str) or not (
                self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise InvalidSettingError(f"device must be auto, cpu, cuda or cuda:N, got "
                                      f"{self.device!r}")

    @property
    def worker_count(self) -> int:
        return self.workers or max(1, min(8, os.cpu_count() or 1))


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of a :class:`TileCache`."""

    hits: int
    misses: int
    entries: int
    nbytes: int
    max_bytes: int


class TileCache(ByteLRU):
    """A thread-safe LRU of decoded tiles, bounded by the bytes of the arrays it holds.

    Stored arrays are made read-only, so a caller cannot change a cached tile.
    An array larger than the whole cache is not stored.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise InvalidSettingError(f"cache size must be >= 0 bytes, got {max_bytes}")
        super().__init__(max_bytes)

    def size_of(self, item: np.ndarray) -> int:
        return item.nbytes

    def put(self, key: Hashable, tile: np.ndarray) -> None:
        tile.setflags(write=False)
        super().put(key, tile)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, len(self._items), self._nbytes,
                              self.max_bytes)


def _call(fn: Callable[[Any], Any], arg: Any) -> Any:
    try:
        return fn(arg)
    except Exception as e:  # noqa: BLE001 - kept per tile, raised by the caller
        return e


def _outcome(future: Future) -> Any:
    try:
        return future.result()
    except Exception as e:  # noqa: BLE001
        return e


class BatchDecoder:
    """Decode tiles of one container in batches, with an LRU cache. Thread-safe.

    Args:
        container: an open :class:`wsicodec.container.Container`.
        settings: see :class:`DecoderSettings`.

    The codec (and, for the learned codec, torch and the model) is loaded on the first
    decode, not here.
    """

    def __init__(self, container: Any, settings: DecoderSettings | None = None) -> None:
        self.container = container
        self.settings = settings or DecoderSettings()
        self.cache = TileCache(self.settings.cache_bytes)
        self._lock = threading.Lock()
        self._backend_lock = threading.Lock()
        self._inflight: dict[TileKey, Future] = {}
        self._codec: TileCodec | None = None
        self._codec_cache: Any = None
        self._pool: ThreadPoolExecutor | None = None

    # -- setup
    def _setup(self) -> tuple[TileCodec, Any]:
        """The codec built with this decoder's settings, and its decode cache."""
        if self._codec is None:
            with self._backend_lock:
                if self._codec is None:
                    s = self.settings
                    codec = self.container.build_codec(device=s.device, precision=s.precision,
                                                       max_batch=s.max_batch)
                    n = s.worker_count
                    self._pool = ThreadPoolExecutor(n, thread_name_prefix="wsicodec-decode") \
                        if n > 1 else None
                    self._codec_cache = codec.new_cache(self.container.tile_size, 0,
                                                        max_bytes=s.latent_cache_bytes)
                    codec.warm_up()   # no first-tile surcharge
                    self._codec = codec
        return self._codec, self._codec_cache

    @property
    def codec(self) -> TileCodec:
        """The codec this decoder decodes with (built on first use)."""
        return self._setup()[0]

    @property
    def device(self) -> str:
        """Where the codec computes ("cpu", "cuda:0", ...); loads the codec."""
        return str(self.codec.device)

    def _run(self, fn: Callable[[Any], Any], items: list) -> list:
        """Map ``fn`` over ``items`` on the pool: each result or exception, in order."""
        pool = self._pool
        if pool is None or len(items) < 2:   # the pool also bounds how many run at once
            return [_call(fn, it) for it in items]
        return [_outcome(f) for f in [pool.submit(fn, it) for it in items]]

    # -- decoding
    def decode(self, level: int, keys: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Tiles (col, row) of ``level`` in the order asked, each (T, T, 3) uint8,
        read-only, padded at the slide's edges.  Only tiles missing from the cache are
        decoded, all in one batch.

        Raises:
            RegionOutOfBoundsError: a tile outside the level's grid (nothing decoded).
            CorruptTileError: a tile's bytes are damaged (names level/col/row); the
                other tiles are still decoded and cached.
            ModelMismatchError: tiles made with other weights than those loaded.
            WsiCodecError: the codec cannot be built here.
        """
        grid = self.container.grid(level)
        for col, row in keys:
            grid.check_tile(col, row)
        found: dict[TileKey, np.ndarray] = {}
        waits: dict[TileKey, Future] = {}
        mine: dict[TileKey, Future] = {}
        for col, row in dict.fromkeys(keys):
            key = (level, col, row)
            tile = self.cache.get(key)
            if tile is not None:
                found[key] = tile
                continue
            with self._lock:
                fut = self._inflight.get(key)
                if fut is None:
                    fut = self._inflight[key] = Future()
                    mine[key] = fut
                else:
                    waits[key] = fut
        if mine:
            self._decode_misses(mine)
        out = []
        for col, row in keys:  # the first failed tile, in the order asked, raises
            key = (level, col, row)
            tile = found.get(key)
            out.append(tile if tile is not None else (mine.get(key) or waits[key]).result())
        return out

    def _decode_misses(self, mine: dict[TileKey, Future]) -> None:
        keys = list(mine)
        level = keys[0][0]
        try:
            codec, cache = self._setup()
            results = self.container.decode_tiles(level, [(c, r) for _, c, r in keys], codec,
                                                  cache, self._run)
        except BaseException as e:  # codec unavailable, interrupted: every tile fails
            results = [e] * len(keys)
        for key, result in zip(keys, results):
            if isinstance(result, np.ndarray):
                self.cache.put(key, result)
        with self._lock:
            for key in keys:
                self._inflight.pop(key, None)
        for key, result in zip(keys, results):
            if isinstance(result, BaseException):
                mine[key].set_exception(as_tile_error(result, *key, self.container.path))
            else:
                mine[key].set_result(result)

    def stats(self) -> CacheStats:
        return self.cache.stats()

    def close(self) -> None:
        """Stop the worker threads (running decodes finish). Safe to call twice."""
        with self._backend_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            self._codec = self._codec_cache = None
        self.cache.clear()

