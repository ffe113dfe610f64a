"""The base containers of the fuzzing harness (``bench/fuzzlib.py``): per codec, a small
container of a crop of an he/test image (or a synthetic image without the shared data), a
zipped copy and a container of another crop for splicing; optionally rewritten as format 4 with a
fidelity map.  The ``auto`` base is a mixed grid: glass, network, JPEG 2000, JPEG-XL,
fix-up tiles, scanner JPEG tiles carried in JPEG-XL and a JPEG recovered from its pixels
(its settings, :data:`SETTINGS`, are chosen so that every kind is there;
:func:`with_scanner_tiles`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HE_TEST_PNG = REPO.parent / "shared" / "data" / "he" / "test" / "TCGA-2Z-A9J9-01A-01-TS1.png"
TILE = 64
#: level-0 size of each codec's base container (width, height): the learned and auto ones are
#: smaller, each of their cases decodes the whole pyramid three times through torch
SIZES = {"jpegxl": (300, 219), "learned": (192, 160), "auto": (256, 160)}
CODECS = tuple(SIZES)
#: each codec's settings for its base: auto at quality 4 with a 36 dB floor writes every tile
#: kind on the he/test crop (glass, network, JPEG 2000 with its margin, JPEG-XL, fix-up
#: tiles; quality 4 at 35 dB did until JPEG 2000 tiles had a margin, and then wrote none;
#: quality 8 at 37 dB did until the price of error sent its network tiles to the classical
#: codecs)
SETTINGS: dict[str, dict] = {"auto": {"quality": 4, "min_psnr": 36.0}}
#: level-0 tiles (col, row) of the auto base whose pixels are a scanner's JPEG tiles
SCANNED_TILES = ((2, 2),)
#: level-0 tiles of the auto base whose pixels are a JPEG's decode, no scanner's tile: ``auto``
#: recovers that JPEG from them (:mod:`wsicodec.jpegrecover`)
RECOVERED_TILES = ((3, 0),)
#: the JPEG quality of those tiles
RECOVERED_QUALITY = 30


def with_scanner_tiles(image: np.ndarray, tiff: Path) -> np.ndarray:
    """``image`` written to ``tiff`` as a scanner writes a slide (JPEG tiles of
    :data:`TILE` px, quality 30), and a copy of it whose :data:`SCANNED_TILES` are those
    tiles' decoded pixels (noise before it was coded): compressed with the TIFF as its
    source's file, ``auto`` carries them (exact, and the fewest bytes over its floor),
    and nowhere else (elsewhere the TIFF is 30 dB off)."""
    import tifffile

    rng = np.random.default_rng(3)
    out = image.copy()
    tiles = [(slice(row * TILE, (row + 1) * TILE), slice(col * TILE, (col + 1) * TILE))
             for col, row in SCANNED_TILES]
    for ys, xs in tiles:      # detail no codec reaches the floor on in fewer bytes than the JPEG
        out[ys, xs] = rng.integers(0, 256, out[ys, xs].shape, dtype=np.uint8)
    tifffile.imwrite(tiff, out, tile=(TILE, TILE), compression="jpeg", compressionargs={"level": 30})
    decoded = tifffile.imread(tiff)
    for ys, xs in tiles:
        out[ys, xs] = decoded[ys, xs]
    import imagecodecs
    for col, row in RECOVERED_TILES:     # noise coded as a JPEG (4:2:0), decoded
        ys, xs = slice(row * TILE, (row + 1) * TILE), slice(col * TILE, (col + 1) * TILE)
        noise = rng.integers(0, 256, out[ys, xs].shape, dtype=np.uint8)
        out[ys, xs] = imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(noise, level=RECOVERED_QUALITY))
    return out


def base_image(codec: str, other: bool = False) -> np.ndarray:
    """The (h, w, 3) image a base container is made of: a crop of an he/test image when
    the shared data is there (a synthetic one otherwise), with one glass (uniform) tile so
    the learned codec writes a glass tile (kind 3, a plane; kind 1 in older releases).  ``other``: another crop, for splicing."""
    w, h = SIZES[codec]
    if HE_TEST_PNG.exists():
        from PIL import Image

        img = np.asarray(Image.open(HE_TEST_PNG).convert("RGB"))
        y0, x0 = (500, 400) if other else (0, 0)
        crop = np.ascontiguousarray(img[y0:y0 + h, x0:x0 + w])
    else:
        rng = np.random.default_rng(2 if other else 1)
        y, x = np.mgrid[0:h, 0:w]
        crop = np.stack([(x * 3 + y) % 256, (y * 2) % 256, (x ^ y) % 256], -1)
        crop = np.clip(crop + rng.integers(0, 40, crop.shape), 0, 255).astype(np.uint8)
    crop[:TILE, 2 * TILE:3 * TILE] = (240, 238, 245)     # a glass tile at level 0 (2, 0)
    return crop


def make_bases(folder: Path, codecs: tuple[str, ...] = CODECS,
               fidelity: bool = False) -> dict[str, Path]:
    """Write, per codec, ``<codec>.zarr``, the same as ``<codec>.zarr.zip`` and another
    container of another crop (``<codec>-other.zarr``, for splicing), each with a PNG
    label and a JPEG-XL thumbnail.  ``fidelity``: each written again as a format-4
    container with a fidelity map (:func:`with_fidelity_map`).  Returns {name: path}."""
    from wsicodec.codecs import get_codec
    from wsicodec.pipeline import compress_source
    from wsicodec.tiling import ArraySource
    from wsicodec.writer import zip_directory

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for codec in codecs:
        c = get_codec(codec, **SETTINGS.get(codec, {}))
        for name, other in ((codec, False), (f"{codec}-other", True)):
            img = base_image(codec, other)
            tiff = folder / f"{name}.tif"
            if codec == "auto":
                img = with_scanner_tiles(img, tiff)
            src = ArraySource(img, mpp=(0.25, 0.25), properties={"x.key": "v"},
                              associated={"label": img[:20, :30], "thumbnail": img[::4, ::4]})
            if codec == "auto":
                src.path = tiff                  # the scanner's file, whose tiles it carries
            path = folder / f"{name}.zarr"
            compress_source(src, path, c, tile_size=TILE, workers=1)
            if fidelity:
                with_fidelity_map(path, img)
            out[name] = path
        zpath = folder / f"{codec}.zarr.zip"
        zip_directory(folder / f"{codec}.zarr", zpath)
        out[f"{codec}-zip"] = zpath
    return out


def with_fidelity_map(path: Path, image: np.ndarray) -> None:
    """Write the container at ``path`` again, the same tiles, as format 4 with a fidelity
    map: kinds ("glass", <codec>), the uniform tile of :func:`base_image` glass; PSNRs
    measured against ``image`` at level 0, made up (35 + (col + row) % 7 dB) above it;
    the associated images coded again from their decoded pixels."""
    from dataclasses import replace

    from wsicodec.container import open_container
    from wsicodec.fidelity import TileRecord
    from wsicodec.writer import ContainerWriter

    tmp = path.with_name(path.name + ".fid")
    with open_container(path) as c:
        meta = c.metadata
        kinds = ("glass", meta.codec["name"])
        with ContainerWriter(tmp, replace(meta, tile_kinds=kinds)) as w:
            for level in range(c.level_count):
                g = c.grid(level)
                for row in range(g.rows):
                    tiles, recs = [], []
                    for col in range(g.cols):
                        tiles.append(c.read_encoded_tile(level, col, row))
                        if level == 0:
                            r = g.tile_rect(col, row)
                            x, y, tw, th = r.x, r.y, r.width, r.height
                            shown = c.read_tile(0, col, row)[:th, :tw].astype(float)
                            mse = np.mean((shown - image[y:y + th, x:x + tw]) ** 2)
                            db = float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
                        else:
                            db = 35.0 + (col + row) % 7
                        glass = (level, col, row) == (0, 2, 0)
                        recs.append(TileRecord(kinds[0] if glass else kinds[1], db))
                    w.write_row(level, row, tiles, recs)
            for name in c.associated_image_names():
                w.write_associated(name, c.read_associated_image(name),
                                   meta.associated_formats.get(name, "png"))
            w.commit()
    shutil.rmtree(path)
    tmp.rename(path)
