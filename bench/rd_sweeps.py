"""The rate-distortion benchmark's series and the codecs as it runs them (``bench/rd.py``).

- :class:`Sweep` / :data:`SWEEPS`: every series a run can make (a registry codec with fixed
  options, swept over its qualities), and which are part of a run that names no codecs.
- :class:`TiledLearned` / :class:`TiledCodec`: a codec coded the way a container codes it
  (256² tiles with their context), every byte of the stream counted.
- :func:`build_series`: one built codec per quality of a sweep (:class:`SeriesRun`), or the
  exception that says why the codec is unavailable here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Sweep:
    """One curve: a registry codec with fixed options, swept over ``qualities``."""

    key: str
    codec: str
    label: str
    qualities: tuple[float, ...]
    options: dict = field(default_factory=dict)
    #: direction of the knob: +1 when a larger quality value means more bits, -1 otherwise
    direction: int = 1
    knob: str = "quality"
    #: the knob's full range in the registry (the visual comparison searches all of it)
    knob_range: tuple[float, float] = (0, 100)
    #: part of a run that names no codecs (and of a codec name such as ``learned``)
    default: bool = True
    #: a series this one is also read against (BD-rates with it as anchor, when both were run)
    against: str | None = None
    #: code the image as a container does, in 256² tiles through the codec's encode_tiles /
    #: decode_tiles (:class:`TiledCodec`), not whole
    tiled: bool = False
    #: per point, options added to ``options`` (same length as ``qualities``), or None
    point_options: tuple[dict, ...] | None = None


SWEEPS: dict[str, Sweep] = {s.key: s for s in (
    Sweep("jpeg420", "jpeg", "JPEG 4:2:0 (libjpeg-turbo)", (5, 10, 20, 35, 55, 75, 90),
          {"subsampling": "420"}, knob_range=(1, 100)),
    Sweep("jpeg444", "jpeg", "JPEG 4:4:4 (libjpeg-turbo)", (5, 10, 20, 35, 55, 75, 90),
          {"subsampling": "444"}, knob_range=(1, 100)),
    # distances 25 .. 0.3: JPEG-XL's whole useful range, the span the BD-rates against it cover
    Sweep("jpegxl", "jpegxl", "JPEG XL (libjxl, effort 7)",
          (25.0, 18.0, 13.0, 9.0, 6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3),
          {"effort": 7}, direction=-1, knob="distance", knob_range=(0.1, 25)),
    Sweep("webp", "webp", "WebP lossy (libwebp, method 4)", (0, 15, 35, 55, 75, 88, 96)),
    Sweep("jpeg2000", "jpeg2000", "JPEG 2000 (OpenJPEG, 9/7)", (27, 30, 33, 36, 39, 42, 46),
          knob="target PSNR dB", knob_range=(10, 80)),
    Sweep("avif", "avif", "AVIF 4:4:4 (libavif/aom, speed 6)", (15, 30, 45, 58, 70, 80, 90)),
    Sweep("learned", "learned", "wsicodec learned", (1, 2, 3, 4, 5, 6, 7, 8), knob_range=(1, 8)),
    # the per-tile codec choice of issue #28 (the default codec), through wsicodec.encode /
    # decode as the learned codec: its rate knob 1..8 with a floor low enough to leave the
    # choice to bytes (a tile goes to JPEG 2000 or JPEG-XL where that reaches the network's
    # PSNR in fewer bytes), then the floor raised at quality 8 to cover JPEG-XL's top
    Sweep("auto", "auto", "wsicodec auto (per-tile codec choice)",
          (1, 2, 3, 4, 5, 6, 7) + (8,) * 10,
          knob_range=(1, 8), tiled=True, against="jpegxl_tiled",
          point_options=tuple({"min_psnr": f} for f in (20,) * 8 + (30, 32, 34, 36, 38, 40, 42, 44, 46))),
    # the same with JPEG-XL its only classical codec (`--option jpeg2000=false`, as before
    # 2026-12-05): what JPEG 2000 tiles bring, read against auto
    Sweep("auto_jpegxl", "auto", "wsicodec auto, JPEG-XL its only classical codec",
          (1, 2, 3, 4, 5, 6, 7) + (8,) * 10, {"jpeg2000": False},
          knob_range=(1, 8), tiled=True, default=False, against="auto",
          point_options=tuple({"min_psnr": f} for f in (20,) * 8 + (30, 32, 34, 36, 38, 40, 42, 44, 46))),
    # the same without the scan's JPEG recovered from the pixels (`--option recovered_jpeg=false`,
    # as before 2026-12-06): what those tiles bring, read against auto
    Sweep("auto_unrecovered", "auto", "wsicodec auto, no JPEG recovered",
          (1, 2, 3, 4, 5, 6, 7) + (8,) * 10, {"recovered_jpeg": False},
          knob_range=(1, 8), tiled=True, default=False, against="auto",
          point_options=tuple({"min_psnr": f} for f in (20,) * 8 + (30, 32, 34, 36, 38, 40, 42, 44, 46))),
    # JPEG-XL as a `--codec jpegxl` container stores it: 256² tiles, each its own codestream
    # (3-16 % more bytes than the whole image at equal PSNR on these sets): what `auto` is
    # also read against
    Sweep("jpegxl_tiled", "jpegxl", "JPEG XL in 256² tiles (libjxl, effort 7)",
          (25.0, 18.0, 13.0, 9.0, 6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3),
          {"effort": 7}, direction=-1, knob="distance", knob_range=(0.1, 25), tiled=True, default=False),
    # the encoder's latent search (LearnedCodec(refine=...)): ~100x the encode time, so only on request
    Sweep("learned_refine", "learned", "wsicodec learned, refine 40", (1, 3, 5, 8), {"refine": 40},
          knob_range=(1, 8), default=False, against="learned"),
)}

#: colour and marker of each series in the plots (bench/rd.py, bench/nuclei.py)
PLOT_STYLE = {
    "jpeg420": ("tab:orange", "v"), "jpeg444": ("tab:red", "^"), "jpegxl": ("tab:blue", "s"),
    "webp": ("tab:green", "D"), "jpeg2000": ("tab:purple", "P"), "avif": ("tab:brown", "X"),
    "learned": ("black", "o"), "learned_refine": ("tab:gray", "*"), "auto": ("tab:olive", "h"),
    "jpegxl_tiled": ("tab:cyan", "s"), "auto_jpegxl": ("tab:pink", "h"),
    "auto_unrecovered": ("tab:gray", "h"),
}
#: series with a model that runs on torch's intra-op threads
TORCH_CODECS = ("learned", "auto")


@dataclass
class SeriesRun:
    sweep: Sweep
    codecs: list  # one built codec per quality
    threads: int
    config: list[dict]
    per_point: list[list[dict]] = field(default_factory=list)  # [quality][image]


class TiledLearned:
    """The learned (or auto) codec as the product uses it: ``wsicodec.encode``/``decode``,
    i.e. 256² tiles, each coded with its context margin (the auto codec deciding each tile
    with its neighbours), plus the stream's tile table — every byte counted."""

    def __init__(self, codec) -> None:  # noqa: ANN001 - a LearnedCodec or AutoCodec
        self.codec = codec

    def encode(self, image: np.ndarray) -> bytes:
        from wsicodec.image import encode
        c = self.codec
        if c.name == "auto":
            return encode(image, quality=c.quality, model=str(c.learned.loaded.path), codec="auto",
                          min_psnr=c.min_psnr, jpeg2000=c.jpeg2000, recovered_jpeg=c.recovered_jpeg)
        return encode(image, quality=c.quality, model=str(c.loaded.path), refine=c.refine)

    def decode(self, data: bytes) -> np.ndarray:
        from wsicodec.image import decode
        loaded = self.codec.learned.loaded if self.codec.name == "auto" else self.codec.loaded
        return decode(data, model=str(loaded.path))

    def to_dict(self) -> dict:
        return self.codec.to_dict()


class TiledCodec:
    """Any registry codec as a container uses it: the image cut into ``tile``² tiles (edge
    tiles smaller) with :attr:`TileCodec.context` pixels of neighbours around each, coded by
    ``encode_tiles`` and decoded by ``decode_tiles`` (which may stitch neighbours, as the
    learned codec does). The stream is a 10-byte header (height, width, tile), a 4-byte length
    per tile and the tile streams: every byte counted."""

    HEAD = struct.Struct("<IIH")

    def __init__(self, codec, tile: int = 256) -> None:  # noqa: ANN001 - a TileCodec
        self.codec, self.tile = codec, tile

    def encode(self, image: np.ndarray) -> bytes:
        from wsicodec.image import context_region, tile_cells

        h, w = image.shape[:2]
        regions, boxes = [], []
        for _, _, ys, xs in tile_cells(h, w, self.tile):
            region, box = context_region(image, ys, xs, int(getattr(self.codec, "context", 0)))
            regions.append(region)
            boxes.append(box)
        streams = self.codec.encode_tiles(regions, boxes)
        return (self.HEAD.pack(h, w, self.tile) + struct.pack(f"<{len(streams)}I", *map(len, streams))
                + b"".join(streams))

    def decode(self, data: bytes) -> np.ndarray:
        from wsicodec.image import tile_cells

        h, w, tile = self.HEAD.unpack_from(data)
        cells = list(tile_cells(h, w, tile))
        lengths = struct.unpack_from(f"<{len(cells)}I", data, self.HEAD.size)
        pos, streams = self.HEAD.size + 4 * len(cells), {}
        for (r, c, _, _), n in zip(cells, lengths):
            streams[(c, r)] = data[pos:pos + n]
            pos += n
        grid = (-(-w // tile), -(-h // tile))
        keys = [(c, r) for r, c, _, _ in cells]
        tiles = self.codec.decode_tiles(keys, lambda c, r: streams[(c, r)], grid)
        out = np.empty((h, w, 3), np.uint8)
        for (_, _, ys, xs), t in zip(cells, tiles):
            if isinstance(t, BaseException):
                raise t
            out[ys, xs] = t
        return out

    def to_dict(self) -> dict:
        return self.codec.to_dict()


def build_series(sweep: Sweep, threads: int) -> SeriesRun:
    """Build one codec per quality; raises with the reason when the codec is unavailable."""
    from wsicodec.codecs import get_codec

    points = sweep.point_options or ({},) * len(sweep.qualities)
    codecs = [get_codec(sweep.codec, quality=q, **sweep.options, **extra)
              for q, extra in zip(sweep.qualities, points)]
    config = [c.to_dict() for c in codecs]
    if sweep.codec in ("learned", "auto"):
        codecs = [TiledLearned(c) for c in codecs]
    elif sweep.tiled:
        codecs = [TiledCodec(c) for c in codecs]
    if sweep.codec in TORCH_CODECS:
        used = threads  # a model runs its network on torch's intra-op threads
    else:
        cfg = config[0].get("configuration", {})
        used = int(cfg.get("numthreads", cfg.get("threads", 1)))  # the registry pins numthreads=1
    return SeriesRun(sweep, codecs, used, config, [[] for _ in sweep.qualities])

