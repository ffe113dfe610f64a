"""A container's level as a lazy ``dask.array`` (:meth:`wsicodec.slide.WsiSlide.to_dask`).

::

    level_array(slide, level, chunks) ─► dask.array.from_array(LevelReader)
        chunk [y0:y1, x0:x1] ─► LevelReader.__getitem__ ─► slide.read_level_into (the slide's
        BatchDecoder: one batch per chunk, stitched, cached) ─► (h, w, 4) uint8 RGBA

In this process the chunks are read through the slide the array was made from (its
decoded-tile cache included).  Sent to another process (a ``distributed`` worker), a
:class:`LevelReader` is pickled as the container's path, its ``container_id`` and the
level, and reopens the container there, once per process: the workers must see the
container at the same path.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from wsicodec.errors import CorruptDataError, InvalidSettingError, RegionOutOfBoundsError
from wsicodec.tiling.geometry import Rect

#: the default chunk edge, rounded to whole tiles
DEFAULT_CHUNK_PX = 1024

_open: dict[str, Any] = {}
_open_lock = threading.Lock()


def _slide_at(path: str, container_id: str) -> Any:
    """The container at ``path``, opened once per process; CorruptDataError if it is no
    longer the container the array was made from."""
    from wsicodec.slide import open_slide

    with _open_lock:
        slide = _open.get(path)
        if slide is None:
            slide = _open[path] = open_slide(path)
    if slide.container.metadata.container_id != container_id:
        raise CorruptDataError(f"{path}: not the container this array was made from "
                               "(replaced since, or another file at that path on this worker)")
    return slide


def _reopened(path: str, container_id: str, level: int) -> "LevelReader":
    return LevelReader(_slide_at(path, container_id), level)


class LevelReader:
    """An array-like over one level of an open :class:`~wsicodec.slide.WsiSlide`: shape
    (height, width, 4), uint8; basic slicing (steps of 1) reads through the slide."""

    def __init__(self, slide: Any, level: int) -> None:
        if not 0 <= level < slide.level_count:
            raise RegionOutOfBoundsError(f"level {level} outside the pyramid "
                                         f"(0..{slide.level_count - 1})")
        self.slide, self.level = slide, level
        w, h = slide.level_dimensions[level]
        self.shape = (h, w, 4)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __reduce__(self) -> tuple:
        c = self.slide.container
        return _reopened, (str(c.path), c.metadata.container_id, self.level)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        ys, xs, cs = (k if isinstance(k, slice) else slice(k, k + 1) for k in key[:3])
        (y0, y1, sy), (x0, x1, sx) = ys.indices(self.shape[0]), xs.indices(self.shape[1])
        if sy != 1 or sx != 1:
            raise InvalidSettingError("a level reads with steps of 1 only")
        out = np.zeros((max(0, y1 - y0), max(0, x1 - x0), 4), np.uint8)
        if out.size:
            self.slide.read_level_into(self.level, Rect(x0, y0, out.shape[1], out.shape[0]), out)
        out = out[:, :, cs]
        return out if all(isinstance(k, slice) for k in key[:3]) else out[
            tuple(0 if not isinstance(k, slice) else slice(None) for k in key[:3])]


def default_chunks(tile_size: int) -> int:
    """Whole tiles, about :data:`DEFAULT_CHUNK_PX` px on a side."""
    return max(1, DEFAULT_CHUNK_PX // tile_size) * tile_size


def level_array(slide: Any, level: int, chunks: int | tuple[int, int] | None = None) -> Any:
    """The ``dask.array`` of :meth:`wsicodec.slide.WsiSlide.to_dask` (module docstring)."""
    import dask.array as da

    reader = LevelReader(slide, level)
    tile = slide.container.metadata.tile_size
    if chunks is None:
        chunks = default_chunks(tile)
    ch = (chunks, chunks) if isinstance(chunks, int) else tuple(chunks)
    if len(ch) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ch):
        raise InvalidSettingError(f"chunks must be a positive int or (rows, cols), got {chunks!r}")
    cid = slide.container.metadata.container_id
    name = f"wsicodec-level-{cid}-{level}-{ch[0]}x{ch[1]}"
    return da.from_array(reader, chunks=(ch[0], ch[1], 4), name=name, asarray=False, fancy=False,
                         lock=False, meta=np.empty((0, 0, 0), np.uint8))


__all__ = ["DEFAULT_CHUNK_PX", "LevelReader", "default_chunks", "level_array"]
