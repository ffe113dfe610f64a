"""``AutoCodec``: each tile glass, the learned network, JPEG 2000, JPEG-XL or the scanner's own, never under a PSNR floor.

The default codec.  It codes a grid with :class:`~wsicodec.learned.levelencoder.MixedLevelEncoder`
(the choice and why it holds: :mod:`wsicodec.learned.choice`) and decodes it with the
learned decoder in mixed mode (:class:`~wsicodec.learned.decoder.TileDecoder`): a
network tile is stitched with its neighbours' latents whatever they are, a bare
neighbour giving g_a of its decoded pixels, and a plane glass tile of kind 4 (the kind
this codec writes) meets its bare neighbours.  Its tiles are the learned codec's
(formats 3, kinds network, glass and fix-up) and bare JPEG 2000 and JPEG-XL codestreams
(containers written before 2026-12-05 hold no JPEG 2000), and the scanner's own tiles:
JPEG carried in JPEG-XL, JPEG 2000 as it is (:mod:`wsicodec.scannertiles`; since
2026-12-06), and a JPEG scan's JPEG made again from its pixels, carried the same way
(:mod:`wsicodec.jpegrecover`; since 2026-12-06, recorded as ``recovered_jpeg``).
"""

from __future__ import annotations

import struct
import threading
from typing import Any, Sequence

import numpy as np

from wsicodec.codecs import DEFAULT_MIN_PSNR, PRECISIONS, LevelEncoder, as_number
from wsicodec.errors import CorruptDataError, InvalidSettingError

from .choice import KINDS, TileChooser
from .levelencoder import MixedLevelEncoder
from .codec import DEFAULT_MARGIN, LearnedCodec, StitchedDecoding, _int_in, check_stitched, native_bfloat16
from .decoder import TileDecoder
from .encoder import CPU_G_A_BATCH, Box, TileEncoder
from .grid import KIND_BARE
from .j2kfit import MARGIN as J2K_MARGIN
from .j2kfit import MAX_MARGIN as J2K_MAX_MARGIN
from .jxlfit import SEARCH_EFFORT
from .seamsearch import MAX_SEAM_SEARCH
from .stepsearch import quality_steps
from .tileformat import NETWORK_KINDS, TileHeader

#: the floors ``min_psnr`` accepts: above 0, at most 99 dB
MIN_PSNR_RANGE = (0.0, 99.0)
#: JPEG-XL's default effort here: the one its fit searches at, so the coding kept is one
#: the search made (no second coding); at equal PSNR a higher effort saved nothing on H&E
#: tiles (``bench/jxl_effort.py``, docs/auto-codec.md)
DEFAULT_EFFORT = SEARCH_EFFORT
#: options of the machine, never stored (the learned codec's, and how stage 1 estimates)
LOCAL_OPTIONS = ("model", "device", "precision", "max_batch", "estimate_precision")
#: what a container that does not record an option was written with (the option is newer)
UNRECORDED = {"jpeg2000_margin": 0, "scanner_tiles": False, "recovered_jpeg": False, "side_strips": False}
#: on the CPU, g_s windows (and g_a regions) per pass in the encoder's own work (stage 1's
#: g_a and estimates, stage 2's measurements), whatever ``max_batch`` readers use: the
#: learned encoder's g_a passes, for the same reason (a pass's activations are the largest
#: transient of a compress, and larger passes run no faster: docs/auto-codec.md)
CPU_ENCODE_BATCH = CPU_G_A_BATCH


def _flag(name: str, value: Any) -> bool:
    """``value`` as an on/off setting (a bool, 1 or 0), or InvalidSettingError."""
    if not (isinstance(value, int) and value in (0, 1)):                         # bool is an int
        raise InvalidSettingError(f"auto codec {name} must be true or false (1 or 0), got {value!r:.40}")
    return bool(value)


def check_min_psnr(value: Any) -> float:
    """``value`` as a floor in dB (0 < floor ≤ 99; None: :data:`DEFAULT_MIN_PSNR`), or
    InvalidSettingError naming the range."""
    v = DEFAULT_MIN_PSNR if value is None else as_number(value)
    lo, hi = MIN_PSNR_RANGE
    if not (lo < v <= hi):
        raise InvalidSettingError(f"min_psnr must be a number of dB above {lo:g} and at most {hi:g}, "
                                  f"got {value!r}")
    return float(v)


class AutoCodec(StitchedDecoding):
    """Per-tile choice among glass, the learned network, JPEG 2000, JPEG-XL and the scanner's
    own tiles.  Frozen.

    Args:
        quality: the network's rate knob, 1..8, as :class:`~wsicodec.learned.LearnedCodec`'s
            (a tile goes to a classical codec where that reaches the same PSNR in fewer
            bytes, or one higher up where it costs less at the price of error the network
            was trained to at this quality: :mod:`~wsicodec.learned.sourcefit`).
        min_psnr: the floor: every tile's decoded PSNR against the source pixels is at
            least this many dB (the network's quality raised up to its top, then the
            classical codecs, JPEG-XL down to lossless).  Default :data:`DEFAULT_MIN_PSNR`.
        effort: JPEG-XL's effort, 1..9 (:data:`DEFAULT_EFFORT`).
        jpeg2000: fit JPEG 2000 (OpenJPEG, 9/7, :mod:`~wsicodec.learned.j2kfit`) beside
            JPEG-XL and keep whichever takes fewer bytes (default True; False: JPEG-XL
            only, as containers before 2026-12-05).  Recorded in :meth:`to_dict`.
        jpeg2000_margin: px of its surroundings a JPEG 2000 tile is coded with beyond each
            edge, 0..:data:`~wsicodec.learned.j2kfit.MAX_MARGIN` (default
            :data:`~wsicodec.learned.j2kfit.MARGIN`; readers crop it): the tile's edge lies
            inside the codestream, away from the wavelet's edge effects.  Recorded in
            :meth:`to_dict`; a container that does not record it was written with 0.
        scanner_tiles: where a tile is exactly one of the source's tiles (the level read
            from a TIFF tiled in JPEG or Aperio JPEG 2000 in the container's tile size),
            offer that tile as the scanner stored it (a JPEG carried losslessly in JPEG-XL,
            :mod:`wsicodec.scannertiles`): the source pixels exactly, kept where it is the
            fewest bytes (default True).  Recorded in
            :meth:`to_dict`; a container that does not record it was written without.
        recovered_jpeg: where a tile's pixels are a JPEG decode on its own block grid (a
            level read from a JPEG-scanned source: any tile size that is a multiple of
            16), offer the scan's JPEG made again from them (its quality read from the
            pixels, :mod:`wsicodec.jpegrecover`, carried in JPEG-XL as a scanner's tile
            is): the source pixels or within a level or two of them, kept where it is
            the fewest bytes that reach the tile's target (default True).  Recorded in
            :meth:`to_dict`; a container that does not record it was written without.
        side_strips: a network tile beside a bare tile is decoded the second time only over
            the strips along its bare sides that the second pass can change
            (:mod:`~wsicodec.learned.secondpass`), by readers and by the encoder's
            measurement alike (default True).  Recorded in :meth:`to_dict`; a container
            that does not record it is decoded over whole tiles, as it was written.
        seam_search: steps of the seam search, 0 (off, the default) ..
            :data:`~wsicodec.learned.seamsearch.MAX_SEAM_SEARCH`: each network tile beside a
            bare tile has its latents searched for what readers show at that border
            (:mod:`~wsicodec.learned.seamsearch`); each step costs about four g_s passes over
            the tile.  Recorded in :meth:`to_dict` when on; streams decode with any setting.
        estimate_precision: the precision of stage 1's g_s estimates, which only steer its
            search over the network's qualities (stage 2 measures every tile in
            ``precision``, so the floor holds either way): "float32", "bfloat16" or
            "auto" (the default: bfloat16 where the device has it natively,
            :func:`~wsicodec.learned.codec.native_bfloat16`, else ``precision``).  A
            setting of the machine, never stored: it moves which step a tile lands on
            now and then, and each classical fit's target with it.
        model, device, margin, model_id, precision, max_batch: as the learned codec's.

    Raises:
        InvalidSettingError: any setting out of range (before the weights load).
    """

    name = "auto"
    tile_kinds = KINDS

    def __init__(self, quality: float | None = None, min_psnr: float | None = None,
                 effort: int = DEFAULT_EFFORT, seam_search: int = 0, jpeg2000: bool = True,
                 jpeg2000_margin: int = J2K_MARGIN, scanner_tiles: bool = True, recovered_jpeg: bool = True,
                 side_strips: bool = True, model: str | None = None, device: str = "cpu",
                 margin: int = DEFAULT_MARGIN, model_id: str | None = None, precision: str = "float32",
                 max_batch: int | None = None, estimate_precision: str = "auto") -> None:
        floor = check_min_psnr(min_psnr)
        effort = _int_in("effort", effort, 1, 9)
        if not (isinstance(seam_search, int) and not isinstance(seam_search, bool)
                and 0 <= seam_search <= MAX_SEAM_SEARCH):
            raise InvalidSettingError(f"auto codec seam_search must be an integer in 0..{MAX_SEAM_SEARCH} "
                                      f"(steps; 0: off), got {seam_search!r:.40}")
        jpeg2000 = _flag("jpeg2000", jpeg2000)
        scanner_tiles = _flag("scanner_tiles", scanner_tiles)
        recovered_jpeg = _flag("recovered_jpeg", recovered_jpeg)
        side_strips = _flag("side_strips", side_strips)
        jpeg2000_margin = _int_in("jpeg2000_margin", jpeg2000_margin, 0, J2K_MAX_MARGIN)
        if estimate_precision not in ("auto", *PRECISIONS):
            raise InvalidSettingError(f"auto codec estimate_precision must be auto, {' or '.join(PRECISIONS)}, "
                                      f"got {estimate_precision!r:.40}")
        learned = LearnedCodec(quality, model=model, device=device, margin=margin, model_id=model_id,
                               precision=precision, max_batch=max_batch)
        if estimate_precision == "auto":
            estimate_precision = "bfloat16" if native_bfloat16(learned.device) else learned.precision
        decoder = TileDecoder(learned.loaded, learned.device, learned.precision, learned.max_batch,
                              mixed=True, jpeg2000_margin=jpeg2000_margin, side_strips=side_strips)
        stages = decoder if learned.device.type != "cpu" or learned.max_batch <= CPU_ENCODE_BATCH \
            else TileDecoder(learned.loaded, learned.device, learned.precision, CPU_ENCODE_BATCH, mixed=True,
                             jpeg2000_margin=jpeg2000_margin, side_strips=side_strips)
        encoders: dict[float, TileEncoder] = {}
        lock = threading.Lock()

        def encoder_at(q: float) -> TileEncoder:
            with lock:
                if q not in encoders:
                    encoders[q] = TileEncoder(learned.loaded, q, learned.device, learned.precision, 0)
                return encoders[q]

        chooser = TileChooser(learned.loaded.on(learned.device), stages, encoder_at, learned.quality,
                              floor, effort, learned.device, learned.precision, seam_search, jpeg2000,
                              jpeg2000_margin, scanner_tiles, recovered_jpeg, estimate_precision)
        for k, v in (("learned", learned), ("min_psnr", floor), ("effort", effort),
                     ("seam_search", seam_search), ("jpeg2000", jpeg2000),
                     ("jpeg2000_margin", jpeg2000_margin), ("scanner_tiles", scanner_tiles),
                     ("recovered_jpeg", recovered_jpeg), ("side_strips", side_strips),
                     ("estimate_precision", estimate_precision), ("decoder", decoder), ("chooser", chooser),
                     ("qualities", quality_steps(learned.quality))):
            object.__setattr__(self, k, v)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"an AutoCodec is frozen: build another for other settings ({name})")

    def __repr__(self) -> str:
        return (f"AutoCodec(quality={self.quality!r}, min_psnr={self.min_psnr!r}, effort={self.effort}, "
                f"seam_search={self.seam_search}, jpeg2000={self.jpeg2000}, "
                f"jpeg2000_margin={self.jpeg2000_margin}, scanner_tiles={self.scanner_tiles}, "
                f"recovered_jpeg={self.recovered_jpeg}, side_strips={self.side_strips}, "
                f"model_id={self.model_id[:16]!r}...)")

    # the learned codec's settings, read through
    quality = property(lambda self: self.learned.quality)
    margin = property(lambda self: self.learned.margin)
    model_id = property(lambda self: self.learned.model_id)
    device = property(lambda self: self.learned.device)
    precision = property(lambda self: self.learned.precision)

    @property
    def context(self) -> int:
        return self.learned.margin

    def decodes(self, model_id: str) -> bool:
        return self.learned.decodes(model_id)

    def to_dict(self) -> dict:
        cfg = {"quality": self.quality, "min_psnr": self.min_psnr, "effort": self.effort,
               "jpeg2000": self.jpeg2000, "jpeg2000_margin": self.jpeg2000_margin,
               "scanner_tiles": self.scanner_tiles, "recovered_jpeg": self.recovered_jpeg,
               "side_strips": self.side_strips, "model_id": self.model_id, "margin": self.margin}
        if self.seam_search:
            cfg["seam_search"] = self.seam_search   # how the container was made; decoding ignores it
        return {"name": self.name, "configuration": cfg}

    # ------------------------------------------------------------------ encoding
    def level_encoder(self, level: int) -> LevelEncoder:
        return MixedLevelEncoder(self.chooser)

    def encode_tiles(self, regions: Sequence[np.ndarray], boxes: Sequence[Box] | None = None) -> list[bytes]:
        """Each tile coded as a grid of its own (its neighbours unknown here: a grid of
        tiles goes through :meth:`level_encoder`, which decides each tile with its
        neighbours)."""
        if boxes is None:
            boxes = [(0, 0, r.shape[0], r.shape[1]) for r in regions]
        out = []
        for r, b in zip(regions, boxes):
            enc = self.level_encoder(0)
            rows = enc.push(0, [r], [b]) + enc.finish()
            out.append(rows[0].tiles[0])
        return out

    def encode(self, tile: np.ndarray) -> bytes:
        return self.encode_tiles([tile])[0]

    # ------------------------------------------------------------------ decoding
    def decode(self, data: bytes, shape: tuple[int, int, int] | None = None) -> np.ndarray:
        """One tile on its own (a network tile's borders then weak: for checking streams)."""
        return self.decoder.decode_alone([data], shape=shape)[0]

    def check_as_written(self, hd: TileHeader, name: str) -> None:
        """Refuse a learned tile this codec's writer cannot have made: a format before
        stitched tiles, or a network tile (a fix-up tile's inner one too: the decoder
        checks that) at a quality off its steps
        (:func:`~wsicodec.learned.stepsearch.quality_steps`), to the float32 bit.  Bare and
        glass tiles record no setting.  Raises CorruptDataError."""
        if hd.kind == KIND_BARE:
            return
        check_stitched(hd, name)
        q32 = struct.pack("<f", hd.quality)
        if hd.kind in NETWORK_KINDS and all(q32 != struct.pack("<f", q) for q in self.qualities):
            raise CorruptDataError(f"{name}: coded at quality {hd.quality!r}, which this container's "
                                   f"writer never uses (header edited)")


def register() -> None:
    """Add ``auto`` to the codec registry (called lazily by wsicodec.codecs)."""
    from wsicodec.codecs import register_codec
    register_codec("auto", AutoCodec, local=LOCAL_OPTIONS, unrecorded=UNRECORDED)
