"""``LearnedCodec``: the hyperprior network and rANS bitstreams behind the tile-codec protocol.

It glues the package's parts: settings checked here (quality through
:func:`~wsicodec.learned.ladder.check_quality`), weights from
:mod:`wsicodec.checkpoint`, encoding in :mod:`~wsicodec.learned.encoder`, decoding and
stitching in :mod:`~wsicodec.learned.decoder`, the stream in
:mod:`~wsicodec.learned.tileformat`.  The protocol is
:class:`wsicodec.codecs.TileCodec`.
"""

from __future__ import annotations

import abc
import os
import struct
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from wsicodec.codecs import Run, TileCodec, check_precision
from wsicodec.errors import CorruptDataError, InvalidSettingError

from .decoder import TileDecoder
from .encoder import Box, TileEncoder
from .grid import Shape
from .ladder import check_quality
from .synthesis import LatentCache
from .tileformat import NETWORK_KINDS, STITCH_VERSION, TileHeader

#: most encoder refinement steps a codec accepts (each costs about four g_s passes)
MAX_REFINE = 1000
#: pixels of neighbouring context g_a sees around each tile (:attr:`LearnedCodec.context`);
#: a multiple of 16 keeps the tile on y's grid, and 16 gives the same bytes and PSNR as 32
#: on he/test (bench/README.md, "Stitched tiles")
DEFAULT_MARGIN = 16
MAX_MARGIN = 64
#: g_s windows per pass unless the codec is told otherwise: on a GPU, and on the CPU, where
#: larger passes ran slower per tile and held more memory (bench/README.md, "Memory")
DEFAULT_MAX_BATCH, CPU_MAX_BATCH = 16, 2
#: options of this machine, not of the data: :func:`~wsicodec.codecs.codec_from_dict`
#: never takes them from a container (a stored ``model`` path is ignored); a reader
#: passes its own ``device``, ``precision`` and ``max_batch``
LOCAL_OPTIONS = ("model", "device", "precision", "max_batch")


def resolve_device(device: str):
    """Map "cpu", "cuda[:N]" or "auto" to a torch.device. Raises InvalidSettingError."""
    import torch
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise InvalidSettingError(f"unknown device {device!r} (use cpu, cuda or auto)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise InvalidSettingError("device cuda requested but no CUDA GPU is available")
    return d


def native_bfloat16(device: Any) -> bool:
    """Whether ``device`` (a torch.device) has bfloat16 arithmetic of its own, where
    ``precision="bfloat16"`` runs faster than float32 rather than emulated: a CUDA GPU of
    compute capability 8.0 or later, a CPU with AVX512-BF16 or AMX."""
    import torch
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_capability(device) >= (8, 0)
        if device.type == "cpu":
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):     # private probes that a torch build may lack
        pass
    return False


def _int_in(knob: str, value: Any, lo: int, hi: int) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi):
        raise InvalidSettingError(f"learned codec {knob} must be an integer in {lo}..{hi}, got {value!r}")
    return value


class StitchedDecoding(TileCodec):
    """The decoding half of the :class:`LearnedCodec` and the ``auto`` codec: each hands
    a grid's tiles to its :class:`~wsicodec.learned.decoder.TileDecoder` (``self.decoder``),
    which stitches them with their neighbours' latents, checking every tile's header with
    the codec's own ``check_as_written`` where the container's tiles were all written by
    it."""

    decoder: TileDecoder

    @abc.abstractmethod
    def check_as_written(self, hd: TileHeader, name: str) -> None:
        """Refuse a tile header this codec's writer cannot have made (CorruptDataError)."""

    def decode_tiles(self, keys: Sequence[tuple[int, int]], fetch: Callable[[int, int], bytes],
                     grid: tuple[int, int], shape: Shape = None, *,
                     names: Callable[[int, int], str] | None = None,
                     cache: LatentCache | None = None, cache_tag: Hashable = None,
                     run: Run | None = None, as_written: bool = False) -> list[Any]:
        """Stitched decoding (:mod:`wsicodec.learned.decoder`; a mixed grid's too), contract
        as :meth:`wsicodec.codecs.TileCodec.decode_tiles` (``shape`` may also be each
        tile's, ``shape(col, row)``, as an image stream's); ``as_written``: every tile's
        header is checked by :meth:`check_as_written`."""
        return self.decoder.decode_tiles(keys, fetch, grid, shape, names=names, cache=cache,
                                         cache_tag=cache_tag, run=run,
                                         check=self.check_as_written if as_written else None)

    def prefetch_tiles(self, keys: Sequence[tuple[int, int]], fetch: Callable[[int, int], bytes],
                       grid: tuple[int, int], shape: Shape = None, *,
                       names: Callable[[int, int], str] | None = None,
                       cache: LatentCache | None = None, cache_tag: Hashable = None,
                       run: Run | None = None, as_written: bool = False) -> None:
        """The latents of ``keys`` decoded into ``cache`` (:meth:`TileDecoder.prefetch_tiles
        <wsicodec.learned.decoder.TileDecoder.prefetch_tiles>`); the contract of
        :meth:`wsicodec.codecs.TileCodec.prefetch_tiles`."""
        self.decoder.prefetch_tiles(keys, fetch, grid, shape, names=names, cache=cache, cache_tag=cache_tag,
                                    run=run, check=self.check_as_written if as_written else None)

    def new_cache(self, tile_size: int, tiles: int, *, max_bytes: int | None = None) -> LatentCache:
        """A latent cache for :meth:`decode_tiles`: room for ``tiles`` tiles (16-256 MiB),
        or ``max_bytes`` exactly."""
        return self.decoder.new_cache(tile_size, tiles, max_bytes)

    def warm_up(self) -> None:
        self.decoder.warm_up()


class LearnedCodec(StitchedDecoding):
    """Tile codec backed by the shipped (or a given) hyperprior checkpoint.  Frozen.

    Args:
        quality: 1 (smallest) … 8 (best); fractional values interpolate
            (:mod:`~wsicodec.learned.ladder`; default :data:`~wsicodec.learned.ladder.DEFAULT_QUALITY`).
        model: path of an inference checkpoint the *caller* chose (the Python API,
            ``get_codec("learned", model=...)``); default: the shipped weights (or
            ``$WSICODEC_MODEL``).  A local option: never stored in a container, and
            never taken from one (:func:`~wsicodec.codecs.codec_from_dict` drops it).
            Loaded as data only (``weights_only``: :func:`~wsicodec.checkpoint.load_model`).
        device: where g_a / g_s run ("cpu", "cuda[:N]", or "auto": CUDA when present).
            The rANS coding and the encoder's h_s run on the CPU; the decoder's exact
            h_s runs on a GPU device too (the same bits).  Local.
        margin: pixels of context that callers who can (the container writer,
            :func:`wsicodec.encode`) code around each tile (:attr:`context`), 0..64.
        precision: how this codec runs g_a (encoding) and g_s (decoding): "float32"
            (the reference) or "bfloat16" (:data:`~wsicodec.codecs.PRECISIONS`).  Local:
            a decoder's precision is its reader's choice.
        refine: steps of the encoder's latent search
            (:func:`~wsicodec.learned.refine.refine_latents`), 0 (off) .. 1000; each
            step costs about four g_s passes over the tile.  What it gains and costs:
            ``bench/results/rd_refine_he_test.md``.  Streams decode with any setting.
        model_id: the sha256 (hex) the data to decode was made with (from a container's
            configuration).  Without ``model``, the weights with that id are looked
            up among trusted places only (shipped, ``$WSICODEC_MODEL``,
            ``$WSICODEC_MODEL_DIR``); with it, they must match.  Otherwise
            :class:`ModelMismatchError` names both ids and says where to put the weights.
        max_batch: most windows per g_s pass, 1..1024; None: 2 on the CPU (where larger
            batches stop paying), 16 on a GPU.  Local.

    Every setting is checked before the weights are loaded (seconds), so a bad one
    fails at once.

    Raises:
        InvalidSettingError: quality outside 1..8, refine outside 0..1000, margin outside
            0..64, an unknown precision or device, a model id that is not hex, missing
            or unreadable weights.
    """

    name = "learned"

    def __init__(self, quality: float | None = None, model: str | None = None,
                 device: str = "cpu", margin: int = DEFAULT_MARGIN, model_id: str | None = None,
                 refine: int = 0, precision: str = "float32",
                 max_batch: int | None = None) -> None:
        precision = check_precision(precision)
        refine = _int_in("refine", refine, 0, MAX_REFINE)
        margin = _int_in("margin", margin, 0, MAX_MARGIN)
        q = check_quality(quality)
        if max_batch is not None:
            max_batch = _int_in("max_batch", max_batch, 1, 1024)
        if model is not None and not isinstance(model, (str, os.PathLike)):
            raise InvalidSettingError(f"learned codec model must be a weights file path, got {model!r:.60}")
        if not isinstance(device, str):
            raise InvalidSettingError(f"learned codec device must be cpu, cuda[:N] or auto, got {device!r:.40}")
        from wsicodec.checkpoint import check_model_id, load_model_for
        if model_id is not None:
            model_id = check_model_id(model_id)
        dev = resolve_device(device)
        if max_batch is None:
            max_batch = CPU_MAX_BATCH if dev.type == "cpu" else DEFAULT_MAX_BATCH
        loaded = load_model_for(model_id, model)          # the slow part: last
        for k, v in (("quality", q), ("precision", precision), ("refine", refine), ("margin", margin),
                     ("max_batch", max_batch), ("device", dev), ("loaded", loaded),
                     ("model_id", loaded.model_id),
                     ("encoder", TileEncoder(loaded, q, dev, precision, refine)),
                     ("decoder", TileDecoder(loaded, dev, precision, max_batch))):
            object.__setattr__(self, k, v)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a LearnedCodec is frozen: build another for other settings ({name})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"a LearnedCodec is frozen ({name})")

    def __repr__(self) -> str:
        return (f"LearnedCodec(quality={self.quality!r}, margin={self.margin}, refine={self.refine}, "
                f"device={str(self.device)!r}, precision={self.precision!r}, model_id={self.model_id[:16]!r}...)")

    # ----------------------------------------------------------- protocol
    @property
    def context(self) -> int:
        """Pixels of neighbour context wanted around each tile: :attr:`margin`."""
        return self.margin

    def decodes(self, model_id: str) -> bool:
        return self.loaded.decodes(model_id)

    def to_dict(self) -> dict:
        cfg = {"quality": self.quality, "model_id": self.model_id, "margin": self.margin}
        if self.refine:
            cfg["refine"] = self.refine   # how the container was made; decoding ignores it
        # never the model's path: the id finds the weights (and a path would tell where
        # the encoder kept its files); nor device, precision, max_batch: the reader's
        return {"name": self.name, "configuration": cfg}

    def encode(self, tile: np.ndarray) -> bytes:
        return self.encoder.encode([tile])[0]

    def encode_tiles(self, regions: Sequence[np.ndarray], boxes: Sequence[Box] | None = None) -> list[bytes]:
        """See :meth:`wsicodec.learned.encoder.TileEncoder.encode`: g_a sees each region,
        the stream holds its tile's latents only; equal-size regions share a g_a pass."""
        return self.encoder.encode(regions, boxes)

    def decode(self, data: bytes, shape: tuple[int, int, int] | None = None) -> np.ndarray:
        """One tile on its own (:meth:`decode_alone`: weak borders for a stitched tile).
        ``shape``: the (h, w, 3) the caller expects, checked against the tile's header
        before anything is decoded (CorruptDataError otherwise)."""
        return self.decoder.decode_alone([data], shape=shape)[0]

    def decode_alone(self, datas: Sequence[bytes], names: Sequence[str] | None = None,
                     shape: tuple[int, int, int] | None = None) -> list[np.ndarray]:
        """Tiles each decoded without its neighbours, g_s batched: for checking streams
        (:meth:`wsicodec.learned.decoder.TileDecoder.decode_alone`)."""
        return self.decoder.decode_alone(datas, names, shape)

    def check_as_written(self, hd: TileHeader, name: str) -> None:
        """Refuse a tile header that ``compress`` with this codec cannot have written: a
        tile format before :data:`~wsicodec.learned.tileformat.STITCH_VERSION` (a
        format-3 container is younger than stitched tiles), or a network tile of another
        quality than this codec's, to the bit (every tile of such a container is coded at
        its configured quality).  Neither the format byte nor the quality is under the
        symbol checksum, and both still decode: a format-2 label makes a stitched tile
        decode alone (other pixels at its borders), and a quality a few float32 ulps off
        decodes the same symbols with another gain (pixels off by one).

        Raises CorruptDataError."""
        check_stitched(hd, name)
        if hd.kind in NETWORK_KINDS and struct.pack("<f", hd.quality) != struct.pack("<f", self.quality):
            raise CorruptDataError(f"{name}: coded at quality {hd.quality!r}, but the container's "
                                   f"tiles are all quality {self.quality!r} (header edited)")


def check_stitched(hd: TileHeader, name: str) -> None:
    """CorruptDataError for a tile of a format before stitched tiles in a format-3 (or
    later) container, which ``compress`` never writes (the format byte is outside the
    symbol checksum)."""
    if hd.version < STITCH_VERSION:
        raise CorruptDataError(f"{name}: tile format {hd.version} in a container whose tiles "
                               f"are all format {STITCH_VERSION} or later (header edited)")


def register() -> None:
    """Add ``learned`` to the codec registry (called lazily by wsicodec.codecs)."""
    from wsicodec.codecs import register_codec
    register_codec("learned", LearnedCodec, local=LOCAL_OPTIONS)
