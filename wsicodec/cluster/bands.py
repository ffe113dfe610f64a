"""Bands: a slide's tile rows cut into tasks, and a task coded on a worker.

::

    client:  missing rows of each level ─► plan_tasks ─► [Segment(level, lo, hi), ...] per task
    worker:  encode_task(TaskSpec) ─► open the slide by path ─► per segment:
                 band_context_strips (rows lo-1 .. hi, exactly as iter_strips makes them)
                 ─► the codec, as compress drives it ─► [BandRow(level, row, tiles, records)]

A band's rows are byte for byte those of a single-process ``compress`` with the same
settings: a codec without a level encoder codes each row from its own pixels and its
neighbours' context margin, which a band reads itself; the ``auto`` codec's level encoder
decides a row with the rows above and below it from its stage 1 (each tile on its own),
so a band also codes the row just above it and the row just below it, as context only
(:meth:`~wsicodec.codecs.LevelEncoder.push` ``context_only``), and returns only its own.
That costs two extra rows of stage 1 per band, which is why bands of a level encoder's
codec are cut taller (:func:`plan_tasks`).

A level the source has is read from it; a level made by halving the one above it is made
here from the nearest level the source has, strip by strip, as
:func:`~wsicodec.tiling.iter_strips` makes it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from wsicodec.errors import WsiCodecError
from wsicodec.tiling import Rect, Strip, downsample2, iter_tiles, open_source, plan_pyramid
from wsicodec.tiling.context import iter_context_strips, iter_context_tiles
from wsicodec.tiling.pyramid import PyramidPlan
from wsicodec.tiling.sources import SlideSource

#: tiles a task codes, by default: the scheduler's per-task cost is milliseconds, a tile's
#: a tenth of a second to seconds on one core, so a task's size is set by how much work a
#: dead worker loses and how evenly a slide spreads, not by overhead (bench/cluster.py,
#: docs/cluster.md)
DEFAULT_TASK_TILES = 32
#: the fewest rows in a band of a codec with a level encoder (each band codes 2 rows more
#: as context: at most a quarter more)
MIN_LEVEL_ENCODER_ROWS = 8


@dataclass(frozen=True)
class Segment:
    """Rows ``lo`` .. ``hi - 1`` of output level ``level``."""

    level: int
    lo: int
    hi: int


@dataclass(frozen=True)
class CodecSpec:
    """What a worker builds the codec from: ``get_codec(name, quality, **options)``, and
    the torch threads it codes with (``torch_threads``; None: torch's default)."""

    name: str
    quality: float | None
    options: tuple[tuple[str, Any], ...] = ()
    torch_threads: int | None = 1


@dataclass(frozen=True)
class TaskSpec:
    """One task: the slide (``path``, and the size and mtime the client saw), the codec,
    the tile size the client planned with, and the rows to code."""

    path: str
    bytes: int
    mtime_ns: int
    codec: CodecSpec
    tile_size: int
    segments: tuple[Segment, ...]
    #: the client's codec's ``to_dict()`` as sorted JSON (its settings and model id), which
    #: the worker's must equal (other weights installed there would code other tiles)
    codec_record: str = ""


@dataclass(frozen=True)
class BandRow:
    """One coded tile row: its tiles left to right and, from a codec that records its
    tiles, their (kind, psnr)."""

    level: int
    row: int
    tiles: list[bytes]
    records: list[tuple[str, float]] | None


# ---------------------------------------------------------------------- planning
def row_runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted row numbers as runs of consecutive rows, (lo, hi) each."""
    runs: list[tuple[int, int]] = []
    for r in sorted(rows):
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def plan_tasks(plan: PyramidPlan, todo: set[tuple[int, int]], task_tiles: int,
               level_encoder: bool) -> list[tuple[Segment, ...]]:
    """The tasks that code the rows ``todo`` ((level, row) pairs) of ``plan``: each about
    ``task_tiles`` tiles, level 0 first.  Rows of a level go in bands of
    ``ceil(task_tiles / cols)`` rows (at least :data:`MIN_LEVEL_ENCODER_ROWS` for a codec
    with a level encoder); bands smaller than ``task_tiles`` tiles share a task; the
    levels from the first one of fewer than ``task_tiles`` tiles down (at most 4/3 of
    that together) are one task, which makes them from one read of the level above
    (:class:`StripMemo`).  Everything in one task when it is all ``task_tiles`` tiles or
    fewer."""
    if task_tiles < 1:
        raise WsiCodecError(f"task_tiles must be at least 1, got {task_tiles}")
    tail = next((lv.index for lv in plan.levels if lv.grid.tile_count < task_tiles),
                len(plan.levels))
    segments: list[Segment] = []
    for lv in plan.levels[:tail]:
        cols = lv.grid.cols
        rows = [r for (level, r) in todo if level == lv.index]
        band = max(1, -(-task_tiles // cols))
        if level_encoder:
            band = max(band, MIN_LEVEL_ENCODER_ROWS)
        for lo, hi in row_runs(rows):
            segments += [Segment(lv.index, a, min(hi, a + band)) for a in range(lo, hi, band)]
    tasks: list[list[Segment]] = []
    size = 0
    for seg in segments:
        n = (seg.hi - seg.lo) * plan.levels[seg.level].grid.cols
        if not tasks or size >= task_tiles or size + n > task_tiles:
            tasks.append([])
            size = 0
        tasks[-1].append(seg)
        size += n
    small = tuple(Segment(lv.index, lo, hi) for lv in plan.levels[tail:]
                  for lo, hi in row_runs([r for (level, r) in todo if level == lv.index]))
    if small:
        tasks.append(list(small))
    return [tuple(t) for t in tasks]


# ---------------------------------------------------------------------- pixels
class StripMemo:
    """Strips a task made, kept for the levels made from them: every strip of a level
    whose whole RGB fits in half of ``max_bytes`` (the coarse levels; a slide without its
    own pyramid then reads its level 0 once per task, not once per level)."""

    def __init__(self, plan: PyramidPlan, max_bytes: int = 256 << 20) -> None:
        self.keep = {lv.index for lv in plan.levels
                     if lv.info.width * lv.info.height * 3 <= max_bytes // 2}
        self.strips: dict[tuple[int, int], Strip] = {}


def level_strip(source: SlideSource, plan: PyramidPlan, level: int, row: int,
                memo: StripMemo | None = None) -> Strip:
    """Tile row ``row`` of output level ``level``, as :func:`~wsicodec.tiling.iter_strips`
    yields it: read from the source's level, or each half of the two rows above it
    halved (:func:`~wsicodec.tiling.downsample2`) and stacked."""
    if memo is not None and (level, row) in memo.strips:
        return memo.strips[(level, row)]
    lv = plan.levels[level]
    t = plan.tile_size
    if lv.source_level is not None:
        grid = lv.grid
        rect = Rect(0, row * t, grid.width, min(t, grid.height - row * t))
        strip = Strip(level, row, source.read_region(lv.source_level, rect))
    else:
        above = plan.levels[level - 1].grid.rows
        halves = [downsample2(level_strip(source, plan, level - 1, r, memo).pixels)
                  for r in (2 * row, 2 * row + 1) if r < above]
        strip = Strip(level, row, halves[0] if len(halves) == 1 else np.concatenate(halves))
    if memo is not None and level in memo.keep:
        memo.strips[(level, row)] = strip
    return strip


def band_context_strips(source: SlideSource, plan: PyramidPlan, level: int, lo: int, hi: int,
                        margin: int, memo: StripMemo | None = None
                        ) -> Iterator[tuple[Strip, np.ndarray, int]]:
    """(strip, strip grown by ``margin`` rows, rows added on top) for rows ``lo`` ..
    ``hi - 1`` of ``level``, as :func:`~wsicodec.tiling.context.iter_context_strips`
    yields them over the whole level."""
    rows = plan.levels[level].grid.rows
    strips = (level_strip(source, plan, level, r, memo)
              for r in range(max(0, lo - 1), min(rows, hi + 1)))
    for strip, ext, top in iter_context_strips(strips, plan, margin):
        if lo <= strip.row < hi:
            yield strip, ext, top


# ---------------------------------------------------------------------- coding
def encode_band(codec: Any, source: SlideSource, plan: PyramidPlan, seg: Segment,
                memo: StripMemo | None = None) -> list[BandRow]:
    """The rows of ``seg``, coded as compress codes them (module docstring); ``memo``:
    strips kept across the task's segments."""
    from wsicodec.pipeline import encode_context_row, valid_sizes
    from wsicodec.scannertiles import ScannedRows

    t, margin = plan.tile_size, codec.context
    info, rows = plan.levels[seg.level].info, plan.levels[seg.level].grid.rows
    out: list[BandRow] = []
    enc = codec.level_encoder(seg.level)
    if enc is None:
        for strip, ext, top in band_context_strips(source, plan, seg.level, seg.lo, seg.hi, margin,
                                                   memo):
            if margin > 0:
                tiles = encode_context_row(codec, list(iter_context_tiles(ext, top, t, margin)))
            else:
                tiles = [codec.encode(tile) for _, tile in iter_tiles(strip, t)]
            out.append(BandRow(seg.level, strip.row, tiles, None))
        return out
    lo, hi = max(0, seg.lo - 1), min(rows, seg.hi + 1)      # one row of context each side
    scanned = ScannedRows(source, plan)
    try:
        for strip, ext, top in band_context_strips(source, plan, seg.level, lo, hi, margin, memo):
            tiles = list(iter_context_tiles(ext, top, t, margin))
            done = enc.push(strip.row, [c.region for c in tiles], [c.box for c in tiles],
                            valid=valid_sizes(info, t, strip.row, tiles),
                            context_only=not seg.lo <= strip.row < seg.hi,
                            scanned=scanned.row(enc, seg.level, strip.row))
            out += [BandRow(seg.level, er.row, list(er.tiles), er.records) for er in done]
    finally:
        scanned.close()
    # the rows still held: a level encoder may hold more than the row above the last pushed
    out += [BandRow(seg.level, er.row, list(er.tiles), er.records) for er in enc.finish()]
    if [r.row for r in out] != list(range(seg.lo, seg.hi)):
        raise WsiCodecError(f"internal error: band {seg} coded rows {[r.row for r in out]}")
    return out


def codec_record(codec: Any) -> str:
    """A codec's settings and model id (``to_dict()``) as sorted JSON."""
    return json.dumps(codec.to_dict(), sort_keys=True)


_codecs: dict[str, Any] = {}
_codecs_lock = threading.Lock()


def worker_codec(spec: CodecSpec) -> Any:
    """The codec of ``spec``, built once per process (a model loads once per worker).
    The first build sets torch's threads to ``spec.torch_threads`` and flushes denormal
    floats to zero on the CPU (as the training scripts do)."""
    with _codecs_lock:
        key = repr(spec)             # options may hold lists: not hashable
        codec = _codecs.get(key)
        if codec is None:
            if spec.torch_threads is not None and spec.name in ("auto", "learned"):
                import torch

                torch.set_num_threads(spec.torch_threads)
                torch.set_flush_denormal(True)
            from wsicodec.codecs import get_codec

            codec = _codecs[key] = get_codec(spec.name, spec.quality, **dict(spec.options))
        return codec


@dataclass(frozen=True)
class TaskResult:
    """What a task sends back: its rows, the worker that coded them, and the CPU seconds
    of that worker's process and wall seconds the task took (the codec built, the slide
    read and the rows coded)."""

    rows: list[BandRow]
    worker: str
    cpu_s: float
    wall_s: float


def encode_task(task: TaskSpec) -> TaskResult:
    """Run on a worker: the rows of ``task`` (:class:`TaskResult`).  Raises WsiCodecError
    if the slide changed since the client planned (its size or mtime), and whatever
    reading and coding raise."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    codec = worker_codec(task.codec)
    if task.codec_record and codec_record(codec) != task.codec_record:
        raise WsiCodecError(f"the worker {_worker_address()} builds another codec than the client "
                            f"(other weights or another wsicodec installed there): "
                            f"{codec_record(codec)} != {task.codec_record}")
    path = Path(task.path)
    st = os.stat(path)
    if (st.st_size, st.st_mtime_ns) != (task.bytes, task.mtime_ns):
        raise WsiCodecError(f"{path}: changed on the worker's file system since the run "
                            "started (size or modification time); or a different file there")
    out: list[BandRow] = []
    with open_source(path) as src:
        plan = plan_pyramid(src.level_dimensions, src.level_downsamples, task.tile_size)
        memo = StripMemo(plan)
        for seg in task.segments:
            out += encode_band(codec, src, plan, seg, memo)
    return TaskResult(out, _worker_address(), time.process_time() - cpu0,
                      time.perf_counter() - wall0)


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return "local"


__all__ = ["BandRow", "CodecSpec", "DEFAULT_TASK_TILES", "MIN_LEVEL_ENCODER_ROWS", "Segment",
           "StripMemo", "codec_record",
           "TaskResult", "TaskSpec", "band_context_strips", "encode_band", "encode_task", "level_strip",
           "plan_tasks", "row_runs", "worker_codec"]
