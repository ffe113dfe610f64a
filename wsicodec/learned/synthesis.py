"""The g_s side of decoding learned tiles: the latents it runs on and its passes.

- :class:`LatentCache`: decoded tile latents kept between calls and shared by concurrent
  callers, so each tile is entropy-decoded once while its neighbours need it.
- :func:`stitch_window`: a stitched tile's g_s input, its latents with a ring of each
  neighbour's joined on.
- :class:`Synthesis`: g_s passes on the codec's device, equal shapes batched together,
  shared by every caller of one codec.

:class:`~wsicodec.learned.decoder.TileDecoder` puts these together.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, wait
from typing import Any, Hashable, Sequence

import numpy as np

from wsicodec.lru import ByteLRU

from .tileformat import PIXEL_STRIDE

#: latent rows/columns of each neighbour joined to a stitched tile before g_s (16 px each)
STITCH_RING = 2
#: (top, left, height, width) of the pixels wanted from a window
Box = tuple[int, int, int, int]


class LatentCache(ByteLRU):
    """A thread-safe LRU of decoded tile latents (torch tensors), bounded in bytes:
    what lets :meth:`~wsicodec.learned.decoder.TileDecoder.decode_tiles` entropy-decode
    each tile once when its neighbours are decoded later, and, shared by concurrent
    callers (a tile server's requests for neighbouring tiles), once while they run: a
    tile one caller is decoding is waited for by the others (:meth:`begin`, :meth:`settle`)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max(0, int(max_bytes)))
        self._inflight: dict[Hashable, Future] = {}

    def size_of(self, item: Any) -> int:
        return item.element_size() * item.nelement()

    def begin(self, key: Hashable) -> Any:
        """The cached latents; or a Future another caller will :meth:`settle` (its
        result: the latents, None or the exception); or None: the caller decodes the
        tile and must :meth:`settle` it, success or not."""
        with self._lock:
            item = self._lookup(key)
            if item is not None:
                return item
            fut = self._inflight.get(key)
            if fut is not None:
                return fut
            self._inflight[key] = Future()
            return None

    def settle(self, key: Hashable, result: Any) -> None:
        """The outcome of a tile :meth:`begin` gave the caller: cached if latents, and
        handed to every caller waiting for it."""
        import torch
        if isinstance(result, torch.Tensor):
            self.put(key, result)
        with self._lock:
            fut = self._inflight.pop(key, None)
        if fut is not None:
            fut.set_result(result)


class Synthesis:
    """g_s passes, one at a time, over the latent windows of every caller waiting
    (leader/follower): a caller queues its windows and tries to lead; the leader runs
    passes of up to ``max_batch`` equal-shape windows from the queue, in queue order,
    until its own are done; callers that find a leader wait, retrying to lead now and
    then, so none is stranded.  One caller alone gets its windows grouped by shape in
    order of first appearance, ``max_batch`` at a time."""

    def __init__(self, model: Any, device: Any, max_batch: int, precision: str) -> None:
        self.model, self.device, self.max_batch, self.precision = model, device, max_batch, precision
        self._lock = threading.Lock()
        self._queue: list[tuple[Any, Future]] = []
        self._busy = False
        self.passes = 0

    def run(self, windows: Sequence[Any], boxes: Sequence[Box | None] | None = None,
            own_boxes: bool = False, precision: str | None = None) -> list[Any]:
        """Ungained latent windows (1, M, h, w) float32 → x̂ (16h, 16w, 3) uint8,
        contiguous, or with ``boxes`` (each window's (top, left, h, w), or None) that part
        of it (h, w, 3), computed only where it depends on (:meth:`WsiHyperprior.synthesize
        <wsicodec.learned.network.WsiHyperprior.synthesize>`); or the exception of its pass.
        A pass computes the smallest box holding its windows' boxes; ``own_boxes``: these
        windows share a pass only with windows of the same shape and box, so each is
        computed over its own box whatever else is queued.  ``precision``: g_s's for
        these windows (default this object's; windows share a pass only with windows of
        the same precision)."""
        futures = [Future() for _ in windows]
        boxes = [None] * len(windows) if boxes is None else [None if b is None else tuple(b) for b in boxes]
        precision = self.precision if precision is None else precision
        with self._lock:
            self._queue.extend((y, b, f, (precision, tuple(y.shape), b) if own_boxes else (precision, tuple(y.shape)))
                               for y, b, f in zip(windows, boxes, futures))
        pending = set(futures)
        while pending:
            self._lead(pending)
            pending = wait(pending, timeout=0.005).not_done
        out = []
        for f in futures:
            e = f.exception()
            out.append(e if e is not None else f.result())
        return out

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
                    group = self._queue[0][3]          # (precision, shape) or (precision, shape, box)
                    batch = [it for it in self._queue if it[3] == group]
                    batch = batch[:self.max_batch]
                    taken = {id(it[2]) for it in batch}
                    self._queue = [it for it in self._queue if id(it[2]) not in taken]
                self._pass(batch)
        finally:
            with self._lock:
                self._busy = False

    def _pass(self, batch: list[tuple[Any, Box | None, Future, tuple]]) -> None:
        """One g_s pass over ``batch`` (equal shapes and precisions), computed over the
        smallest box holding every window's (the whole output if one has none), each cut
        to its own."""
        import torch

        boxes = [it[1] for it in batch]
        precision = batch[0][3][0]
        whole = None if any(b is None for b in boxes) else union(boxes)
        try:
            with torch.inference_mode():
                y = torch.cat([it[0] for it in batch]).to(self.device)
                x_hat = self.model.synthesize(y, precision, whole).clamp_(0, 1).mul_(255).round_()
                x_hat = x_hat.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            self.passes += 1
        except Exception as e:  # noqa: BLE001 - every tile of the pass fails with it
            for it in batch:
                it[2].set_exception(e)
            return
        for k, (_, box, fut, _) in enumerate(batch):
            if box is not None:
                top, left = box[0] - whole[0], box[1] - whole[1]
                fut.set_result(np.ascontiguousarray(x_hat[k, top:top + box[2], left:left + box[3]]))
            else:
                fut.set_result(np.ascontiguousarray(x_hat[k]))


def union(boxes: Sequence[Box]) -> Box:
    """The smallest box holding every one of ``boxes``."""
    top, left = min(b[0] for b in boxes), min(b[1] for b in boxes)
    return (top, left, max(b[0] + b[2] for b in boxes) - top, max(b[1] + b[3] for b in boxes) - left)


def stitch_window(centre, around: dict, ring: int = STITCH_RING):
    """A stitched tile's g_s input: its latents ``centre`` (1, M, h, w) with up to ``ring``
    rows/columns of each neighbour in ``around`` ((dr, dc) → (1, M, h', w') or None,
    dr, dc in −1..1) joined on.  A missing side (the plane's edge, a damaged or
    format-2 neighbour) is left off; a missing corner next to present sides is zeros,
    as g_s's own padding.  Returns (window, top, left): where the tile's pixels start.
    """
    import torch
    _, c, h, w = centre.shape

    def side(d: tuple[int, int], axis: int, size: int) -> int:
        t = around.get(d)
        if t is None or t.shape[1] != c or t.shape[-1 - axis] != size:
            return 0
        return min(ring, t.shape[-2 + axis])

    rt, rb = side((-1, 0), 0, w), side((1, 0), 0, w)
    cl, cr = side((0, -1), 1, h), side((0, 1), 1, h)
    if not (rt or rb or cl or cr):
        return centre, 0, 0
    win = torch.zeros(1, c, rt + h + rb, cl + w + cr, dtype=centre.dtype)
    win[..., rt:rt + h, cl:cl + w] = centre
    if rt:
        win[..., :rt, cl:cl + w] = around[(-1, 0)][..., -rt:, :]
    if rb:
        win[..., rt + h:, cl:cl + w] = around[(1, 0)][..., :rb, :]
    if cl:
        win[..., rt:rt + h, :cl] = around[(0, -1)][..., :, -cl:]
    if cr:
        win[..., rt:rt + h, cl + w:] = around[(0, 1)][..., :, :cr]
    for dr, dc in ((-1, -1), (-1, 1), (1, -1), (1, 1)):
        nr, nc = (rt if dr < 0 else rb), (cl if dc < 0 else cr)
        t = around.get((dr, dc))
        if not (nr and nc) or t is None or t.shape[1] != c or t.shape[-2] < nr or t.shape[-1] < nc:
            continue
        ys = slice(0, nr) if dr < 0 else slice(rt + h, rt + h + nr)
        xs = slice(0, nc) if dc < 0 else slice(cl + w, cl + w + nc)
        win[..., ys, xs] = t[..., (slice(-nr, None) if dr < 0 else slice(0, nr)),
                             (slice(-nc, None) if dc < 0 else slice(0, nc))]
    return win, rt * PIXEL_STRIDE, cl * PIXEL_STRIDE
