"""The evaluation sets the benchmarks share, defined once.

Each :class:`Dataset` has a name, a one-line description, the approximate pixel size in µm (what
scale-aware measurements such as ``bench/nuclei.py`` need) and :meth:`Dataset.images`, an iterator
of ``(name, (h, w, 3) uint8 RGB array)``:

========== ==================================================================================
name       what
========== ==================================================================================
he_test    the 14 MoNuSeg 2018 test images, 1000² H&E at 40x (≈0.25 µm/px)
he_test_2x each he_test image area-averaged 2×2 → 500²: the appearance of a 20x scan
he_test_4x each he_test image area-averaged 4×4 → 250²: the appearance of a 10x scan
cmu        central 1024² of ``slides/cmu_small_region.svs`` level 0: 20x skin, 0.499 µm/px
tcga       central 1024² of ``slides/tcga-cr-7395-01a-01-ts1.svs`` level 0 (MPP stripped;
           ≈1 µm/px judged from lymphocyte size)
========== ==================================================================================

**Every "original" here was already lossy-coded by its scanner** (``../shared/data/README.md``):
the MoNuSeg images are decoded TCGA scans (JPEG 2000 judging by ``bench/README.md``), the CMU slide
holds JPEG q30 tiles of 240 px, the TCGA slide JPEG 2000 (Kakadu, Q=70) tiles. A codec is compared
against those decoded pixels, not against the light that reached the sensor; re-coding with the
family that made the source is favoured.

The downsampled sets are an exact area average: the image is cropped to a multiple of the factor
(1000 divides by 2 and 4: nothing is cut from he_test), each f×f block is averaged in float64 and
rounded to the nearest integer (``np.rint``; halves to even). They stand in for lower-magnification
scans of the same tissue; a real 20x or 10x scanner has its own optics and codec.

Data live in ``../shared/data`` next to the repository (``$WSICODEC_DATA`` overrides); they are
evaluation data only: never train on them.

Usage::

    from bench.datasets import get_dataset, DATASETS
    for name, rgb in get_dataset("he_test_2x").images(limit=4):
        ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    """``$WSICODEC_DATA`` or ``../shared/data`` beside the repository."""
    env = os.environ.get("WSICODEC_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


# ----------------------------------------------------------------------------------------- loading

def load_png(path: Path) -> np.ndarray:
    """An image file as (h, w, 3) uint8 RGB."""
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def area_downsample(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Exact area average by ``factor``: crop to a multiple of it (bottom and right), average each
    ``factor``×``factor`` block in float64, round to uint8."""
    if factor == 1:
        return rgb
    h, w = (rgb.shape[0] // factor) * factor, (rgb.shape[1] // factor) * factor
    blocks = rgb[:h, :w].astype(np.float64).reshape(h // factor, factor, w // factor, factor, 3)
    return np.clip(np.rint(blocks.mean(axis=(1, 3))), 0, 255).astype(np.uint8)


def slide_center(path: Path, size: int = 1024, level: int = 0, align: int = 1) -> np.ndarray:
    """The central ``size``² of a slide level, read with OpenSlide, as RGB (the alpha channel must be
    opaque there: a region off the slide raises); its corner moved up and left onto the
    ``align``-px grid of the level (16: the scanner's JPEG blocks, as a container's tiles are)."""
    import openslide
    with openslide.OpenSlide(str(path)) as slide:
        w, h = slide.level_dimensions[level]
        down = slide.level_downsamples[level]
        if w < size or h < size:
            raise ValueError(f"{path.name} level {level} is {w}x{h}, smaller than {size}²")
        x, y = (w - size) // 2 // align * align, (h - size) // 2 // align * align
        rgba = np.asarray(slide.read_region((int(x * down), int(y * down)), level, (size, size)))
    if rgba[..., 3].min() != 255:
        raise ValueError(f"{path.name}: the central {size}² is not fully opaque")
    return np.ascontiguousarray(rgba[..., :3])


# ---------------------------------------------------------------------------------------- datasets

@dataclass(frozen=True)
class Dataset:
    """One evaluation set. ``mpp``: approximate µm per pixel (``mpp_source`` says where it comes
    from); ``files``: the shared data files it reads, relative to :func:`data_root`."""

    name: str
    description: str
    mpp: float
    mpp_source: str
    files: tuple[str, ...]
    _load: Callable[[Path, int | None], Iterator[tuple[str, np.ndarray]]] = field(repr=False)

    def paths(self) -> list[Path]:
        return [data_root() / f for f in self.files]

    def available(self) -> bool:
        return all(p.exists() for p in self.paths())

    def images(self, limit: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """``(name, rgb)`` pairs, at most ``limit`` of them (None: all)."""
        return self._load(data_root(), limit)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "mpp": self.mpp,
                "mpp_source": self.mpp_source, "files": list(self.files),
                "source_lossy": True}


HE_TEST = "he/test"
CMU_SVS = "slides/cmu_small_region.svs"
TCGA_SVS = "slides/tcga-cr-7395-01a-01-ts1.svs"


def _he_files(root: Path, limit: int | None) -> list[Path]:
    files = sorted((root / HE_TEST).glob("*.png"))
    return files[:limit] if limit else files


def _he(factor: int):
    def load(root: Path, limit: int | None) -> Iterator[tuple[str, np.ndarray]]:
        for p in _he_files(root, limit):
            yield p.stem, area_downsample(load_png(p), factor)
    return load


def _slide(rel: str, align: int = 1):
    def load(root: Path, limit: int | None) -> Iterator[tuple[str, np.ndarray]]:
        if limit is not None and limit < 1:
            return
        name = Path(rel).stem + "_center1024" + (f"_grid{align}" if align > 1 else "")
        yield name, slide_center(root / rel, 1024, 0, align)
    return load


_MONUSEG_MPP = "MoNuSeg 2018: 40x TCGA scans (≈0.25 µm/px); not stored in the PNGs"

DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("he_test", "14 MoNuSeg 2018 test images, 1000² H&E, 40x (scanner-coded TCGA sources)",
            0.25, _MONUSEG_MPP, (HE_TEST,), _he(1)),
    Dataset("he_test_2x", "he_test area-averaged 2×2 to 500²: 20x appearance",
            0.5, _MONUSEG_MPP + ", ×2", (HE_TEST,), _he(2)),
    Dataset("he_test_4x", "he_test area-averaged 4×4 to 250²: 10x appearance",
            1.0, _MONUSEG_MPP + ", ×4", (HE_TEST,), _he(4)),
    Dataset("cmu", "central 1024² of cmu_small_region.svs level 0: 20x H&E skin, Aperio JPEG q30 tiles",
            0.499, "aperio.MPP of the slide", (CMU_SVS,), _slide(CMU_SVS)),
    # cmu's centre lies off the 8x8 / 16x16 block grid of the scanner's JPEG, which a slide's
    # own tiles (and a container's, at multiples of 16 px) sit on: JPEG-XL re-codes blocks on
    # that grid cheaper than off it, so this set reads cmu as a container codes it
    Dataset("cmu_grid", "cmu with its corner on the 16-px grid of the scanner's JPEG blocks "
            "(central 1024² moved up-left by 6 / 11 px), as a container's tiles are",
            0.499, "aperio.MPP of the slide", (CMU_SVS,), _slide(CMU_SVS, 16)),
    Dataset("tcga", "central 1024² of tcga-cr-7395-01a-01-ts1.svs level 0: H&E, Aperio JPEG 2000 tiles",
            1.0, "estimate: MPP stripped from the file; lymphocytes measure ≈6-7 px across",
            (TCGA_SVS,), _slide(TCGA_SVS)),
)}


def get_dataset(name: str) -> Dataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None
