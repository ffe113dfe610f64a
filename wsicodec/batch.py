"""Batched, cached tile decoding for the reader and the tile server.

::

    decode(level, [(col, row), ...])
      │  TileCache (LRU, bounded in bytes) ──hit──────────────────────────────► tile
      │  in-flight table: a tile another thread is decoding is waited for, not redone
      ▼  misses
    container.read_encoded_tile (CRC-checked bytes)
      │
      ├─ learned codec: parse_header ─► uniform tiles: decoded directly (no network)
      │                 network tiles ─► entropy decode + h_s (exact, CPU, per tile,
      │                 deterministic: LearnedCodec's own path, untouched) on a thread pool
      │                 ─► one g_s queue per decoder: ŷ of all waiting callers grouped
      │                 by shape, ≤ max_batch per pass, one pass at a time, on the device
      │                 (CUDA when present with device="auto", else CPU)
      └─ other codecs: codec.decode on the thread pool
      ▼
    TileCache.put ─► tiles (read-only arrays), in the order asked

A damaged tile is an error for that tile only: the call that asked for it raises
:class:`CorruptTileError` naming level/col/row, and every other tile of the batch is
still decoded and cached.  All public methods are thread-safe.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from wsicodec.errors import CorruptDataError, CorruptTileError, InvalidSettingError

TileKey = tuple[int, int, int]
"""(level, col, row)."""

#: default cache size: 256 MiB holds ~1,300 decoded 256² RGB tiles
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class DecoderSettings:
    """How a :class:`BatchDecoder` decodes.

    Attributes:
        cache_bytes: upper bound of the decoded-tile cache in bytes (0 disables it).
        workers: threads for entropy decoding (learned) or ``codec.decode`` (others);
            ``None``: the CPU count, at most 8.
        device: where g_s runs: ``"auto"`` (CUDA when present, else CPU), ``"cpu"``,
            ``"cuda"`` or ``"cuda:N"``.  The entropy parameters always run on the CPU.
        max_batch: most tiles per g_s pass (bounds memory); ``None``: 16 on a GPU, 4 on
            the CPU (where larger batches stop paying).  Only one g_s pass runs at a
            time per decoder, so many concurrent callers cannot multiply its memory;
            tiles of callers that arrive meanwhile join the next pass.
    """

    cache_bytes: int = DEFAULT_CACHE_BYTES
    workers: int | None = None
    device: str = "auto"
    max_batch: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.cache_bytes, bool) or not isinstance(self.cache_bytes, int) \
                or self.cache_bytes < 0:
            raise InvalidSettingError(f"cache_bytes must be an integer >= 0, got "
                                      f"{self.cache_bytes!r}")
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


class TileCache:
    """A thread-safe LRU of decoded tiles, bounded by the bytes of the arrays it holds.

    Stored arrays are made read-only, so a caller cannot change a cached tile.
    An array larger than the whole cache is not stored.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise InvalidSettingError(f"cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._nbytes = 0
        self._hits = self._misses = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            tile = self._items.get(key)
            if tile is None:
                self._misses += 1
                return None
            self._items.move_to_end(key)
            self._hits += 1
            return tile

    def put(self, key: Hashable, tile: np.ndarray) -> None:
        tile.setflags(write=False)
        if tile.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._nbytes -= old.nbytes
            self._items[key] = tile
            self._nbytes += tile.nbytes
            while self._nbytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._nbytes -= evicted.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._nbytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, len(self._items), self._nbytes,
                              self.max_bytes)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class _Synthesis:
    """g_s passes, one at a time, over the ŷ of every caller waiting (leader/follower).

    A caller queues its latents and tries to lead: the leader runs passes of up to
    ``max_batch`` equal-shape latents from the queue until its own are done; callers
    that find a leader wait, retrying to lead now and then, so none is stranded.
    """

    def __init__(self, model: Any, device: Any, max_batch: int) -> None:
        self.model, self.device, self.max_batch = model, device, max_batch
        self._lock = threading.Lock()
        self._queue: list[tuple[Any, float, Future]] = []
        self._busy = False
        self.passes = 0

    def run(self, items: Sequence[tuple[Any, float]]) -> list[Any]:
        """ŷ (1, M, h, w) float32 and quality per tile → x̂ (H, W, 3) uint8 (uncropped),
        or the exception of its pass."""
        futures = [Future() for _ in items]
        with self._lock:
            self._queue.extend((y, q, f) for (y, q), f in zip(items, futures))
        pending = set(futures)
        while pending:
            self._lead(pending)
            from concurrent.futures import wait

            pending = wait(pending, timeout=0.005).not_done
        return [_outcome(f) for f in futures]

    def _lead(self, mine: set) -> None:
        with self._lock:
            if self._busy:
                return
            self._busy = True
        try:
            while True:
                with self._lock:
                    if not self._queue or all(f.done() for f in mine):
                        return
                    shape = tuple(self._queue[0][0].shape)
                    batch = [it for it in self._queue if tuple(it[0].shape) == shape]
                    batch = batch[:self.max_batch]
                    taken = {id(it[2]) for it in batch}
                    self._queue = [it for it in self._queue if id(it[2]) not in taken]
                self._pass(batch)
        finally:
            with self._lock:
                self._busy = False

    def _pass(self, batch: list[tuple[Any, float, Future]]) -> None:
        import torch

        try:
            with torch.inference_mode():
                y_hat = torch.cat([it[0] for it in batch]).to(self.device)
                q = torch.tensor([it[1] for it in batch], device=self.device)
                x_hat = self.model.synthesis(y_hat, q).clamp_(0, 1).mul_(255).round_()
                x_hat = x_hat.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            self.passes += 1
        except Exception as e:  # noqa: BLE001 - every tile of the pass fails with it
            for it in batch:
                it[2].set_exception(e)
            return
        for k, it in enumerate(batch):
            it[2].set_result(x_hat[k])


class _LearnedBatch:
    """The learned codec's decode split in its two halves: per-tile entropy decoding
    (LearnedCodec's deterministic CPU path, on the thread pool) and batched g_s passes
    on the device (:class:`_Synthesis`).

    Uses ``LearnedCodec.entropy_decode`` (the entropy half of ``decode_batch``); a
    public name for it in wsicodec.learned would make this adapter cleaner.
    """

    def __init__(self, codec: Any, device: str, max_batch: int | None) -> None:
        from wsicodec.learned import resolve_device

        self.codec = codec
        self.device = resolve_device(device)
        model = codec.loaded.model
        synthesis_model = codec.loaded.on(self.device)  # a copy on a GPU: the CPU h_s paths stay
        if max_batch is None:
            max_batch = 4 if self.device.type == "cpu" else 16
        self.synthesis = _Synthesis(synthesis_model, self.device, max_batch)
        model.prepare_entropy_parameters()  # build the exact (and float64) h_s once, up front
        synthesis_model.prepare_synthesis(self.device)  # and the fast g_s: no first-tile surcharge

    def decode(self, datas: Sequence[bytes], names: Sequence[str],
               pool: ThreadPoolExecutor | None) -> list[Any]:
        from wsicodec.learned import KIND_UNIFORM, parse_header

        out: list[Any] = [None] * len(datas)
        jobs: list[tuple[int, Any]] = []
        for i, data in enumerate(datas):
            try:
                hd = parse_header(data)
                if hd.kind == KIND_UNIFORM:
                    out[i] = self.codec.decode_batch([data], [names[i]])[0]
                else:
                    jobs.append((i, hd))
            except Exception as e:  # noqa: BLE001 - kept per tile, raised by the caller
                out[i] = e
        run: Callable[[tuple[int, Any]], Any] = \
            lambda job: self.codec.entropy_decode(datas[job[0]], job[1], names[job[0]])
        if pool is not None:  # the pool also bounds how many run at once
            results = [_outcome(f) for f in [pool.submit(run, job) for job in jobs]]
        else:
            results = [_call(run, job) for job in jobs]
        ready = []
        for (i, hd), y_hat in zip(jobs, results):
            if isinstance(y_hat, BaseException):
                out[i] = y_hat
            else:
                ready.append((i, hd, y_hat))
        images = self.synthesis.run([(y, hd.quality) for _, hd, y in ready])
        for (i, hd, _), x_hat in zip(ready, images):
            out[i] = x_hat if isinstance(x_hat, BaseException) else np.ascontiguousarray(
                x_hat[hd.top:hd.top + hd.height, hd.left:hd.left + hd.width])
        return out


class _PlainBatch:
    """Any codec with ``decode(bytes) -> tile``: tiles decoded on the thread pool."""

    def __init__(self, codec: Any) -> None:
        self.codec = codec

    def decode(self, datas: Sequence[bytes], names: Sequence[str],
               pool: ThreadPoolExecutor | None) -> list[Any]:
        if pool is not None and len(datas) > 1:
            return [_outcome(f) for f in [pool.submit(self.codec.decode, d) for d in datas]]
        return [_call(self.codec.decode, d) for d in datas]


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
        self._backend: _LearnedBatch | _PlainBatch | None = None
        self._pool: ThreadPoolExecutor | None = None

    # -- setup
    def _get_backend(self) -> _LearnedBatch | _PlainBatch:
        if self._backend is None:
            with self._backend_lock:
                if self._backend is None:
                    codec = self.container.codec
                    n = self.settings.worker_count
                    self._pool = ThreadPoolExecutor(n, thread_name_prefix="wsicodec-decode") \
                        if n > 1 else None
                    if hasattr(codec, "entropy_decode") and hasattr(codec, "loaded"):
                        self._backend = _LearnedBatch(codec, self.settings.device,
                                                      self.settings.max_batch)
                    else:
                        self._backend = _PlainBatch(codec)
        return self._backend

    @property
    def device(self) -> str:
        """Where g_s runs ("cpu", "cuda:0", ...); loads the codec."""
        backend = self._get_backend()
        return str(backend.device) if isinstance(backend, _LearnedBatch) else "cpu"

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
        try:
            backend = self._get_backend()
            datas: list[Any] = []
            for level, col, row in keys:
                datas.append(_call(lambda k: self.container.read_encoded_tile(*k),
                                   (level, col, row)))
            ok = [i for i, d in enumerate(datas) if not isinstance(d, BaseException)]
            names = [f"tile level={keys[i][0]} col={keys[i][1]} row={keys[i][2]}" for i in ok]
            results: list[Any] = list(datas)
            if ok:
                decoded = backend.decode([datas[i] for i in ok], names, self._pool)
                for i, r in zip(ok, decoded):
                    results[i] = r
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
                mine[key].set_exception(_as_tile_error(result, key, self.container.path))
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
            self._backend = None
        self.cache.clear()


def _as_tile_error(error: BaseException, key: TileKey, path: Any) -> BaseException:
    if isinstance(error, CorruptDataError) and not isinstance(error, CorruptTileError):
        level, col, row = key
        text = str(error)
        where = f"tile level={level} col={col} row={row}"
        msg = f"{path}: {text}" if where in text else f"{path}: {where}: {text}"
        err = CorruptTileError(msg, level=level, col=col, row=row)
        err.__cause__ = error
        return err
    return error

