"""One exception tree for wsicodec.

Every error the library raises on purpose derives from :class:`WsiCodecError`; the
children also inherit the matching built-in so callers can catch either
(``except FileNotFoundError`` works for a missing slide).  The CLI turns any
``WsiCodecError`` into one line on stderr and a non-zero exit.
"""

from __future__ import annotations


class WsiCodecError(Exception):
    """Base class of every error raised by wsicodec."""


class InvalidSettingError(WsiCodecError, ValueError):
    """A codec or CLI setting is out of range; the message names the allowed range."""


class UnsupportedFormatError(WsiCodecError, ValueError):
    """The input exists but is not a slide or image we can read."""


class SlideNotFoundError(WsiCodecError, FileNotFoundError):
    """The input path does not exist."""


class CorruptDataError(WsiCodecError, ValueError):
    """Stored bytes fail a check (CRC, magic, truncation, symbol checksum)."""


class CorruptTileError(CorruptDataError):
    """One tile's bytes are damaged; the message names level, column and row."""

    def __init__(self, message: str, *, level: int | None = None, col: int | None = None,
                 row: int | None = None) -> None:
        super().__init__(message)
        self.level, self.col, self.row = level, col, row


def as_tile_error(error: BaseException, level: int, col: int, row: int, path: object) -> BaseException:
    """``error`` as a container reader raises it for tile (level, col, row) of ``path``: a
    :class:`CorruptDataError` becomes a :class:`CorruptTileError` naming the file and the
    tile (once, if the message already names it), caused by ``error``; anything else,
    a CorruptTileError included, is returned as it is."""
    if not isinstance(error, CorruptDataError) or isinstance(error, CorruptTileError):
        return error
    text = str(error)
    where = f"tile level={level} col={col} row={row}"
    err = CorruptTileError(f"{path}: {text}" if where in text else f"{path}: {where}: {text}",
                           level=level, col=col, row=row)
    err.__cause__ = error
    return err


class ModelMismatchError(WsiCodecError, ValueError):
    """Data was made with other model weights than the ones loaded; names both ids."""


class ClosedError(WsiCodecError, ValueError):
    """The slide or container was closed before this call (as a closed file is)."""


class RegionOutOfBoundsError(WsiCodecError, IndexError):
    """A level or tile index outside the pyramid."""


class CodecUnavailableError(WsiCodecError, RuntimeError):
    """A known codec cannot be used here (backend library or optional extra missing)."""


class OutputExistsError(WsiCodecError, FileExistsError):
    """The output path exists and overwriting was not asked for."""


class OutputPathError(WsiCodecError, FileNotFoundError):
    """The output cannot go where asked: its folder is missing (never created for you)."""


class CompressInterrupted(KeyboardInterrupt):
    """A compress was interrupted (Ctrl-C, SIGTERM) after finishing some tile rows; they
    were kept at ``partial`` (hidden, next to the output) for a later ``resume=True``.

    A KeyboardInterrupt, not a WsiCodecError: code that stops on Ctrl-C still stops.
    """

    def __init__(self, partial: object, done: int, total: int) -> None:
        super().__init__(f"{done} of {total} tiles kept in {partial}")
        self.partial, self.done, self.total = partial, done, total


def error_text(error: BaseException) -> str:
    """What went wrong, in words: ``file: strerror`` for a plain OSError (its ``str`` would
    start with ``[Errno 28]``), else ``str(error)`` or the type's name."""
    if isinstance(error, OSError) and not isinstance(error, WsiCodecError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return str(error) or type(error).__name__


class PartialKeptError(WsiCodecError, OSError):
    """A compress failed with an OSError (a full disk, an I/O error) after finishing some
    tile rows; they were kept at ``partial`` for a later ``resume=True``. The original
    error is ``__cause__``; the message names it, the tiles kept and where."""

    def __init__(self, cause: OSError, partial: object, done: int, total: int) -> None:
        super().__init__(f"{error_text(cause)}; {done} of {total} tiles kept in {partial}")
        self.partial, self.done, self.total = partial, done, total
