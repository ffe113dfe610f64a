"""Tile codecs: a registry by name behind one protocol.

One built codec is one setting: the quality knob and every option are fixed when the
codec is built (``get_codec("jpeg", quality=85)``), so ``encode(tile)`` takes no
quality argument and ``to_dict()`` records exactly what made the bytes::

    get_codec(name, quality, **options) ─► TileCodec ─encode─► bytes ─decode─► tile
          ▲                                   │
          └────── codec_from_dict(d) ◄── to_dict() = {"name": ..., "configuration": {...}}

Two doors, two levels of trust.  :func:`get_codec` is for the caller's own settings
(the CLI's ``--quality``/``--option``, the Python API): every option of the codec,
including the *local* ones that name resources of this machine (the learned codec's
``model`` weights file, its ``device``, its ``precision``).  :func:`codec_from_dict` is
for *stored, untrusted* metadata (a container's ``codec``): it ignores the local
options (a container never picks a file to open, nor a device), so a stored ``model``
path is never opened: the learned codec then finds its weights by the stored
``model_id`` among trusted places (:func:`wsicodec.checkpoint.find_weights`).  Both
check option names in one place: an option the codec does not have is an
:class:`InvalidSettingError` naming the ones it has, and a malformed value is one too,
raised before any expensive work (the learned codec checks every setting before it
loads its weights).

Every codec is a :class:`TileCodec`: it codes a batch of tiles (with the neighbour
context it asks for, :attr:`TileCodec.context`) and decodes the tiles of a grid given a
way to fetch any tile's bytes (:meth:`TileCodec.decode_tiles`).  Classical codecs take
the plain behaviour of the base class (each tile on its own); the learned codec stitches
each tile with its neighbours' latents inside ``decode_tiles``, with its own cache
(:meth:`TileCodec.new_cache`), which a row-by-row reader fills ahead of its reads
(:meth:`TileCodec.prefetch_tiles`).  Callers never probe a codec for what it can do.

Classical codecs come from imagecodecs (``jpeg``, ``jpegxl``, ``webp``, ``jpeg2000``,
``avif``): :mod:`wsicodec.classical`, which lists their quality knobs and registers them
when this module is imported.  The ``learned`` codec registers itself from
``wsicodec.learned``, which this module imports only when that codec is asked for, so
using the classical codecs never imports torch.
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Hashable, Sequence

import numpy as np

from wsicodec.errors import (CodecUnavailableError, CorruptDataError, InvalidSettingError,
                             WsiCodecError)

DEFAULT_CODEC = "auto"
"""Codec the CLI uses when ``--codec`` is not given."""

DEFAULT_MIN_PSNR = 32.0
"""The ``auto`` codec's PSNR floor (dB) when none is given (README, "Fidelity floor")."""

#: what ``wsicodec codecs`` says of each codec
SUMMARIES = {
    "auto": "per tile: glass, the learned network, JPEG 2000, JPEG-XL, the scanner's own tile or its JPEG "
            "recovered from the pixels, whichever takes fewest bytes (the source's own also where its "
            "fidelity is worth its bytes at the quality); "
            f"every tile's PSNR >= --min-psnr (default {DEFAULT_MIN_PSNR:g} dB); quality 1-8 as learned",
    "learned": "the learned network alone; quality 1 (smallest) .. 8 (best)",
    "jpeg": "JPEG (libjpeg-turbo); quality 1-100",
    "jpegxl": "JPEG XL (libjxl); quality = butteraugli distance, 0.1-25, lower is better",
    "webp": "WebP (lossy); quality 1-100",
    "jpeg2000": "JPEG 2000 (OpenJPEG); quality = target PSNR in dB",
    "avif": "AVIF (libavif); quality 0-100",
}


@dataclass(frozen=True)
class EncodedRow:
    """One finished tile row from a :class:`LevelEncoder`: its tiles' bytes (left to
    right) and, from a codec with :attr:`TileCodec.tile_kinds`, each tile's record
    ``(kind, psnr)``: the kind it was stored as and the PSNR (dB) of the pixels readers
    decode against the source, over the tile's part inside the level (inf: exact)."""

    row: int
    tiles: list
    records: list | None = None


class LevelEncoder(abc.ABC):
    """Codes one level's tile rows in order, for a codec whose choice for a tile depends
    on the tiles around it (:meth:`TileCodec.level_encoder`).  Rows go in top to bottom
    without gaps; finished rows come out later, in order, and :meth:`finish` gives the
    rest."""

    #: whether :meth:`push` takes the source's own tiles (``scanned``)
    takes_scanned: bool = False

    @abc.abstractmethod
    def push(self, row: int, regions: Sequence[np.ndarray], boxes: Sequence["Box"], *,
             valid: Sequence[tuple[int, int]] | None = None,
             stored: Sequence[bytes] | None = None,
             context_only: bool = False,
             scanned: Sequence[bytes | None] | None = None) -> list[EncodedRow]:
        """Row ``row``'s tiles as :meth:`TileCodec.encode_tiles` takes them (regions with
        context and the tiles' boxes in them); ``valid``: each tile's (height, width)
        inside the level (edge tiles are padded; default: the whole box).  ``stored``:
        the row's tiles as an earlier run wrote them (a resumed run): the row is then
        only its neighbours' context, taken from those bytes, and never returned.
        ``context_only``: the row is coded as it would be in the level, but only as its
        neighbours' context, and never returned (a band of rows coded apart from the
        rest of the level, :mod:`wsicodec.cluster`: the rows just outside it); the rows
        returned are then byte for byte those of one pass over the level.
        ``scanned`` (an encoder that :attr:`takes_scanned`): each tile's stream (JPEG,
        JPEG 2000) as the source stores it, where the tile is exactly one source tile
        (:mod:`wsicodec.scannertiles`), else None.  Returns the rows now finished."""

    @abc.abstractmethod
    def finish(self) -> list[EncodedRow]:
        """The rows still held, finished (after the level's last row)."""


Box = tuple[int, int, int, int]
"""(top, left, height, width) of a tile inside the region it is coded from."""

Run = Callable[[Callable[[Any], Any], list], list]
"""``run(fn, items)``: ``fn`` mapped over ``items`` (e.g. on a caller's thread pool),
returning each item's result or the exception it raised, in order."""


def run_serially(fn: Callable[[Any], Any], items: list) -> list:
    """The default :data:`Run`: ``fn`` over ``items`` in this thread, exceptions kept."""
    out = []
    for it in items:
        try:
            out.append(fn(it))
        except Exception as e:  # noqa: BLE001 - kept per item
            out.append(e)
    return out


class TileCodec(abc.ABC):
    """Codes RGB tiles to bytes and back.  One instance = one fixed setting, frozen.

    ::

        encode_tiles(regions, boxes) ─► [bytes]        (a batch; context around each tile)
        decode_tiles(keys, fetch, grid, shape) ─► [tile | exception]   (tiles of a grid)

    Subclasses implement :meth:`encode`, :meth:`decode` and :meth:`to_dict`; the rest has
    the plain behaviour (each tile on its own), which a codec overrides when it can do
    better (the learned codec: g_a batched over regions with context, tiles decoded with
    their neighbours' latents).
    """

    name: ClassVar[str]
    #: pixels of neighbour context the codec wants around each tile it encodes (a caller
    #: that can gives :meth:`encode_tiles` regions this much larger); 0: none
    context: int = 0
    #: sha256 of the weights the codec codes with, or None (no model)
    model_id: str | None = None
    #: where the codec computes ("cpu", or a torch device)
    device: Any = "cpu"
    #: the per-tile kinds this codec records (a codec that writes a fidelity map); empty: none
    tile_kinds: tuple[str, ...] = ()

    @abc.abstractmethod
    def encode(self, tile: np.ndarray) -> bytes:
        """(h, w, 3) uint8 with h, w >= 1 -> bytes."""

    @abc.abstractmethod
    def decode(self, data: bytes, shape: tuple[int, int, int] | None = None) -> np.ndarray:
        """bytes -> (h, w, 3) uint8 of the encoded size.  ``shape``: the size the caller
        expects (a container's tile), checked against the stream's header before any
        pixel is allocated.  Raises CorruptDataError (a damaged stream, another size)."""

    @abc.abstractmethod
    def to_dict(self) -> dict:
        """``{"name": name, "configuration": {...}}``; ``codec_from_dict`` rebuilds it."""

    def encode_tiles(self, regions: Sequence[np.ndarray], boxes: Sequence[Box] | None = None
                     ) -> list[bytes]:
        """Encode a batch of tiles.  Without ``boxes`` each array is a tile; with them,
        array ``i`` is a region holding the tile at ``boxes[i]`` = (top, left, height,
        width) with up to :attr:`context` pixels of its neighbours around it.  Here: each
        tile cut out and encoded on its own."""
        if boxes is None:
            return [self.encode(r) for r in regions]
        return [self.encode(np.ascontiguousarray(r[t:t + h, x:x + w]))
                for r, (t, x, h, w) in zip(regions, boxes)]

    def decode_tiles(self, keys: Sequence[tuple[int, int]], fetch: Callable[[int, int], bytes],
                     grid: tuple[int, int], shape: tuple[int, int, int] | None = None, *,
                     names: Callable[[int, int], str] | None = None,
                     cache: Any = None, cache_tag: Hashable = None,
                     run: Run | None = None, as_written: bool = False
                     ) -> list[np.ndarray | BaseException]:
        """Tiles ``keys`` = [(col, row), ...] of a grid of ``grid`` = (cols, rows) tiles.

        ``fetch(col, row)`` gives any tile's bytes (raising for an unreadable one), called
        in this thread; ``shape`` the (h, w, 3) every tile has (checked before decoding);
        ``names(col, row)`` a tile's name in messages; ``cache`` one from :meth:`new_cache`
        (shared by calls and threads), its entries keyed by ``cache_tag`` (e.g. the
        level) and the tile; ``run`` maps the decoding work over the caller's threads
        (default: this thread); ``as_written``: every tile was written by a codec of
        exactly this setting (a format-3 container's own), so a codec whose streams
        record settings refuses a tile a writer of this setting cannot have made
        (classical streams record none: ignored here).

        Returns one entry per key: the (h, w, 3) uint8 tile, or the exception that tile
        raised (damaged bytes, a checksum, other weights); a failing tile never fails
        another.  Here: each tile fetched and decoded on its own (``cache`` unused).
        """
        names = names or (lambda c, r: f"tile col={c} row={r}")
        out: list[Any] = [None] * len(keys)
        datas: dict[int, bytes] = {}
        for n, key in enumerate(keys):
            try:
                datas[n] = fetch(*key)
            except Exception as e:  # noqa: BLE001 - kept per tile
                out[n] = e

        def one(n: int) -> np.ndarray:
            try:
                return self.decode(datas[n], shape=shape)
            except CorruptDataError as e:
                raise CorruptDataError(f"{names(*keys[n])}: {e}") from e

        todo = list(datas)
        for n, r in zip(todo, (run or run_serially)(one, todo)):
            out[n] = r
        return out

    def prefetch_tiles(self, keys: Sequence[tuple[int, int]], fetch: Callable[[int, int], bytes],
                       grid: tuple[int, int], shape: tuple[int, int, int] | None = None, *,
                       names: Callable[[int, int], str] | None = None,
                       cache: Any = None, cache_tag: Hashable = None,
                       run: Run | None = None, as_written: bool = False) -> None:
        """Do now, into ``cache``, the work a later :meth:`decode_tiles` of tiles beside
        ``keys`` would share with other calls (arguments as there), so that it overlaps
        whatever the caller does meanwhile (a reader decoding row by row prefetches the
        row after the next).  Never raises: what fails here fails that later call.  The
        pixels :meth:`decode_tiles` returns are the same either way.  Here: nothing (the
        codec keeps nothing between calls)."""

    def level_encoder(self, level: int) -> LevelEncoder | None:
        """A :class:`LevelEncoder` for one level of a grid, when this codec decides a tile
        with its neighbours (the ``auto`` codec); None (here): tiles are coded batch by
        batch with :meth:`encode_tiles`, each on its own."""
        return None

    def new_cache(self, tile_size: int, tiles: int, *, max_bytes: int | None = None) -> Any:
        """A cache for :meth:`decode_tiles` with room for ``tiles`` tiles of ``tile_size``
        (or ``max_bytes`` exactly), or None: the codec keeps nothing between calls."""
        return None

    def decodes(self, model_id: str) -> bool:
        """Whether data made with the model ``model_id`` decodes with this codec: a codec
        without a model (:attr:`model_id` None) decodes whatever is recorded; one with a
        model, the data of that model."""
        return self.model_id is None or model_id == self.model_id

    def warm_up(self) -> None:
        """Do now the one-off setup decoding needs, not on the first tile (a server's
        first request).  Nothing, unless the codec has such setup."""


# ---------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., TileCodec]
    available: Callable[[], bool]
    #: every option ``factory`` takes (``quality`` included); None: not checked here
    options: tuple[str, ...] | None = None
    #: options that are the reader's or writer's own (a file, a device), never stored
    local: tuple[str, ...] = ()
    #: stored options' values where stored settings lack them (written before the option)
    unrecorded: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _LazyEntry:
    """A codec whose module registers it on import; ``requires`` are probed without importing."""

    module: str
    requires: tuple[str, ...] = ()


_REGISTRY: dict[str, _Entry] = {}
_LAZY: dict[str, _LazyEntry] = {
    "learned": _LazyEntry("wsicodec.learned", requires=("torch", "compressai")),
    "auto": _LazyEntry("wsicodec.learned", requires=("torch", "compressai")),
}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_.-]*$")


def register_codec(name: str, factory: Callable[..., TileCodec], *,
                   available: Callable[[], bool] = lambda: True,
                   options: tuple[str, ...] | None = None, local: tuple[str, ...] = (),
                   unrecorded: dict[str, Any] | None = None) -> None:
    """Register (or replace) a codec factory under ``name``.

    ``factory(quality=..., **options)`` must validate its settings and raise
    InvalidSettingError naming the allowed range. ``available()`` says whether the
    backend works in this installation.  ``options``: the names ``factory`` accepts
    (``quality`` included); by default its signature's named parameters, unless it
    takes ``**kwargs`` (then the factory checks names itself).  ``local``: options that
    belong to the machine that runs the codec (a weights file, a device, a precision),
    which :func:`codec_from_dict` never takes from stored metadata.  ``unrecorded``: the
    value an option had in data written before the option existed, where it differs from
    the factory's default (:func:`codec_from_dict` uses it where stored settings lack it).

    Raises:
        InvalidSettingError: ``name`` is not a lower-case identifier.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidSettingError(f"codec name must match {_NAME_RE.pattern}, got {name!r}")
    if options is None:
        options = _signature_options(factory)
    _REGISTRY[name] = _Entry(factory, available, None if options is None else tuple(options),
                             tuple(local), dict(unrecorded or {}))


def _signature_options(factory: Callable[..., Any]) -> tuple[str, ...] | None:
    """The keyword names ``factory`` accepts, or None if it takes ``**kwargs`` or its
    signature cannot be read."""
    import inspect
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self")


def codec_options(name: str) -> tuple[str, ...] | None:
    """The option names codec ``name`` accepts (``quality`` included), or None when its
    factory checks them itself.  Loads a lazy codec's module (the learned codec: torch).

    Raises as :func:`get_codec` for an unknown or unloadable codec.
    """
    return _entry(name).options


def known_codecs() -> list[str]:
    """Every codec name this package knows, usable here or not."""
    return sorted(set(_REGISTRY) | set(_LAZY))


def _lazy_installed(entry: _LazyEntry) -> bool:
    try:
        return all(importlib.util.find_spec(m) is not None
                   for m in (*entry.requires, entry.module))
    except (ImportError, ValueError):
        return False


def available_codecs() -> list[str]:
    """Names of the codecs that work in this installation (sorted).

    Lazy codecs not yet imported are judged by whether their module and its
    requirements are installed, without importing them (no torch import here).
    """
    names = []
    for name in known_codecs():
        if name in _REGISTRY:
            try:
                ok = bool(_REGISTRY[name].available())
            except Exception:  # a probe that crashes means "not available"
                ok = False
        else:
            ok = _lazy_installed(_LAZY[name])
        if ok:
            names.append(name)
    return names


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY and name in _LAZY:
        lazy = _LAZY[name]
        try:
            importlib.import_module(lazy.module)
        except ImportError as e:
            raise CodecUnavailableError(
                f"codec {name!r} cannot be loaded: {e} (it needs {', '.join(lazy.requires)})"
            ) from e
        if name not in _REGISTRY:
            raise CodecUnavailableError(f"codec {name!r}: {lazy.module} did not register it")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InvalidSettingError(
            f"unknown codec {name!r}; known codecs: {', '.join(known_codecs())}") from None


def get_codec(name: str, quality: float | None = None, /, **options: Any) -> TileCodec:
    """Build the codec ``name`` with one fixed setting, from the caller's own settings.

    ``quality=None`` means the codec's default. Options are codec specific (see the
    module docstring), local ones included: e.g. the learned codec's ``model``, a
    weights file the caller trusts.  Option names are checked here, before the codec
    is built; the codec checks the values, before any expensive work.  Settings read
    from a container go through :func:`codec_from_dict` instead.

    ``quality`` may come as a keyword (``get_codec("jpeg", quality=85)``) or among the
    options (``--option quality=85``), once.

    Raises:
        InvalidSettingError: unknown name (the message lists the known ones), an option
            the codec does not have (the message lists the ones it has), ``quality``
            given twice, or a setting out of range or of the wrong kind (the message
            names the allowed range).
        CodecUnavailableError: the codec's backend is missing in this installation.
    """
    if "quality" in options:
        if quality is not None:
            raise InvalidSettingError(f"{name}: quality given twice ({quality!r:.20} and "
                                      f"{options['quality']!r:.20})")
        quality = options.pop("quality")
    return _build(name, quality, options, local=True)


def _build(name: Any, quality: Any, options: dict[str, Any], *, local: bool,
           chosen: dict[str, Any] | None = None) -> TileCodec:
    """Check ``options`` (stored ones unless ``local``), then build with them and the
    reader's ``chosen`` local options."""
    if not isinstance(name, str):
        raise InvalidSettingError(f"a codec name is a string, got {name!r:.60}")
    entry = _entry(name)
    if entry.options is not None:
        allowed = [o for o in entry.options if local or o not in entry.local]
        unknown = sorted(str(k) for k in options if k not in allowed)
        if unknown:
            where = "" if local else " in stored codec settings"
            raise InvalidSettingError(f"{name}: unknown option(s) {', '.join(unknown)}{where}; "
                                      f"options are {', '.join(allowed)}")
    try:
        ok = entry.available()
    except Exception as e:  # a crashing probe is an unusable backend
        raise CodecUnavailableError(f"codec {name!r} is not usable here: {e}") from e
    if not ok:
        raise CodecUnavailableError(f"codec {name!r} is not available in this installation")
    options = {**options, **(chosen or {})}
    try:
        if quality is None:
            return entry.factory(**options)
        return entry.factory(quality=quality, **options)
    except WsiCodecError:
        raise
    except (TypeError, ValueError, OverflowError) as e:   # a factory that did not check a value
        settings = ", ".join(f"{k}={v!r:.40}" for k, v in
                             (({"quality": quality} if quality is not None else {}) | options).items())
        raise InvalidSettingError(f"{name}: invalid settings ({settings}): "
                                  f"{' '.join(str(e).split())[:200]}") from None


#: the choices a reader may pass to :func:`codec_from_dict`: how to run, never what to load
READER_OPTIONS = ("device", "precision", "max_batch")


def codec_from_dict(d: dict, **local: Any) -> TileCodec:
    """Rebuild a codec from its ``to_dict()`` form as *stored* metadata: untrusted.

    The codec's local options (:func:`register_codec`; the learned codec's ``model``,
    ``device``, ``precision`` and ``max_batch``) are ignored in ``d``: stored data never
    names a file to open or a device to use.  ``local``: the reader's own choices among
    :data:`READER_OPTIONS` (how to run); those the codec does not have are not used (a
    JPEG tile decodes the same on any device).  No weights file can be named here.  Older containers recorded the encoder's ``model`` path; it is
    dropped, and the learned codec finds its weights by the stored ``model_id`` among
    trusted places only (:func:`wsicodec.checkpoint.find_weights`).  Any other option
    the codec does not have (e.g. ``effort`` under ``learned``) is refused.  An option
    the settings lack takes the value data written before it existed had (``unrecorded``
    of :func:`register_codec`), else the factory's default.

    Raises:
        CorruptDataError: ``d`` is not ``{"name": str, "configuration": dict}``.
        InvalidSettingError: a ``local`` name outside :data:`READER_OPTIONS`; as :func:`get_codec`.
        CodecUnavailableError: as :func:`get_codec`.
    """
    other = sorted(set(local) - set(READER_OPTIONS))
    if other:
        raise InvalidSettingError(f"a reader's codec options are {', '.join(READER_OPTIONS)}, "
                                  f"got {', '.join(other)}")
    if (not isinstance(d, dict) or not isinstance(d.get("name"), str)
            or not isinstance(d.get("configuration", {}), dict)):
        raise CorruptDataError(f"codec metadata must be {{'name': str, 'configuration': dict}}, "
                               f"got {d!r:.200}")
    name, config = d["name"], dict(d.get("configuration") or {})
    if not all(isinstance(k, str) for k in config):
        raise CorruptDataError(f"codec configuration keys must be strings, got {sorted(map(repr, config))}")
    entry = _entry(name)
    own = entry.local
    stored = {**entry.unrecorded, **{k: v for k, v in config.items() if k not in own}}
    quality = stored.pop("quality", None)
    chosen = {k: v for k, v in local.items() if k in own}
    return _build(name, quality, stored, local=False, chosen=chosen)


# ----------------------------------------------------------------- validation helpers

#: How the learned codec may run g_a (encoding) and g_s (decoding): "float32", the
#: reference; "bfloat16", their inner layers under bfloat16 autocast: faster where the
#: hardware has bfloat16 arithmetic (a CPU with AVX512-BF16 or AMX, a recent GPU), slower
#: where it must be emulated.  The stream format and the symbols' checks do not change;
#: latents and pixels do, slightly (+0.06 % BD-rate on he/test:
#: ``bench/results/precision_he_test.json``).  Never stored in a container.
PRECISIONS = ("float32", "bfloat16")


def check_precision(precision: Any) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else InvalidSettingError."""
    if precision not in PRECISIONS:
        raise InvalidSettingError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def as_number(value: Any) -> float:
    """``float(value)``, or NaN (which fails every range check) for a bool or anything
    ``float()`` refuses: a setting is a number, not a flag, a list or a word."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# The classical codecs register themselves from their own module, which needs the above:
# imported last, so that every user of the registry finds them without importing it.
from wsicodec import classical as _classical  # noqa: E402,F401  (registers jpeg, webp, ...)
