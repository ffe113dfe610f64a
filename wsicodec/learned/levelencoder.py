"""One level of an ``auto`` codec's grid, row by row: :class:`MixedLevelEncoder`.

The two stages each tile goes through, and why one row of look-ahead is enough for the
floor to hold, are :mod:`wsicodec.learned.choice`'s; this module runs them in row order
for :meth:`wsicodec.codecs.TileCodec.level_encoder`, the classical fits of a row on a pool
of threads (:func:`fit_threads`) while the torch work of the next row goes on.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from wsicodec.codecs import EncodedRow, LevelEncoder
from wsicodec.errors import InvalidSettingError

from .choice import TileChooser
from .tilestate import TileState, retire_row

#: the fewest threads fitting the classical codecs (libjxl and OpenJPEG free the GIL): the
#: fits overlap the torch work even where torch codes on one thread (a cluster worker)
MIN_FIT_THREADS = 2
#: the most (a row's fits are its tiles: a pool this wide keeps a wide row's in flight)
MAX_FIT_THREADS = 16


def fit_threads() -> int:
    """How many threads fit a level's tiles to the classical codecs: torch's own threads
    (the cores this process codes with: all of them by default, one per cluster worker),
    between :data:`MIN_FIT_THREADS` and :data:`MAX_FIT_THREADS`.  A tile's fit depends on
    the tile alone, so the count changes when a row is ready, never its bytes."""
    import torch
    return max(MIN_FIT_THREADS, min(MAX_FIT_THREADS, torch.get_num_threads()))


class MixedLevelEncoder(LevelEncoder):
    """One level of an ``auto`` codec's grid (module docstring): each row's classical fits
    run on a pool of :func:`fit_threads` threads while this one does the next torch
    work (stage 1 of the next row, stage 2 of the rows above), so a row comes out two
    rows behind the push, or one where the row below has no fit to wait for (a stored
    row, a row of glass)."""

    def __init__(self, chooser: TileChooser) -> None:
        self.chooser = chooser
        self.rows: dict[int, list[TileState]] = {}
        self.fits: dict[int, list[Future]] = {}     #: a row's classical fits not yet waited for
        self.emit: dict[int, bool] = {}
        self.unsettled: list[int] = []              #: rows pushed, not yet settled, in order
        self.last: int | None = None
        self.pool: ThreadPoolExecutor | None = None

    @property
    def takes_scanned(self) -> bool:                        # type: ignore[override]
        return self.chooser.scanner_tiles

    def push(self, row, regions, boxes, *, valid=None, stored=None,
             context_only=False, scanned=None) -> list[EncodedRow]:
        if self.last is not None and row != self.last + 1:
            raise InvalidSettingError(f"rows of a level go in order: row {row} after row {self.last}")
        if stored is None:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(fit_threads(), thread_name_prefix="wsicodec-fit")
            self.rows[row], self.fits[row] = self.chooser.choose_row(regions, boxes, valid, self.pool, scanned)
        else:
            self.rows[row] = [self.chooser.stored_tile(c, data, (box[2], box[3]))
                              for c, (data, box) in enumerate(zip(stored, boxes))]
        self.emit[row] = stored is None and not context_only
        self.unsettled.append(row)
        self.last = row
        self._wait(row - 1)
        out = []
        while self.unsettled and (self.unsettled[0] + 1 < row
                                  or (self.unsettled[0] + 1 == row and not self.fits.get(row))):
            out += self._settle(self.unsettled.pop(0))
        return out

    def finish(self) -> list[EncodedRow]:
        out = []
        try:
            for r in list(self.fits):
                self._wait(r)
            while self.unsettled:
                out += self._settle(self.unsettled.pop(0))
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool, self.last = None, None
            self.rows.clear()
            self.fits.clear()
            self.emit.clear()
            self.unsettled.clear()
        return out

    def _wait(self, r: int) -> None:
        """Row ``r``'s fits done (an error in one raised here)."""
        for f in self.fits.pop(r, ()):
            f.result()

    def _settle(self, r: int) -> list[EncodedRow]:
        tiles = self.rows[r]
        if self.emit.get(r):
            self.chooser.settle_row(tiles, self.rows.get(r - 1), self.rows.get(r + 1))
        self.rows.pop(r - 1, None)              # nobody's neighbour any more
        retire_row(tiles)                       # the row above of r + 1 alone now
        if not self.emit.pop(r, False):
            return []
        return [EncodedRow(r, [t.data for t in tiles], [(t.kind, t.psnr) for t in tiles])]
