"""Training data and augmentation for a network that generalises beyond MoNuSeg (issue #29).

The shipped network saw 30 MoNuSeg images (TCGA, 40x, one preparation).  `train.py --augment SPEC`
routes its crops through :class:`AugmentedSampler`, which draws each crop as follows (every random
choice from the one seeded ``numpy.random.Generator`` that ``train.py`` checkpoints, so a run is
reproducible and resumes exactly):

1. **scale** (:func:`area_downsample`, :func:`random_crop`): 1x, 2x or 4x, drawn per crop with the
   spec's probabilities (default 0.55 / 0.30 / 0.15).  Each source image is area-averaged by 2 and by 4
   once, at start, *before* any crop is cut (exact f x f block means, rounded half up), so a 2x crop
   is what a 20x scan of the same tissue would show, not a resampled crop.  At 4x the 1000² MoNuSeg
   images are 250²: a downsampled image up to ``max_pad`` px (default 8) short of the crop side is
   mirror-padded (symmetric) by the shortfall; smaller ones are not used at that scale.  The image is
   drawn with probability proportional to its area at that scale.
2. **flips and 90° rotations** (:func:`flip_rotate`): exact pixel permutations, as `CropSampler` does.
3. **stain variation** (:func:`hed_jitter`), with probability ``stain``: colour deconvolution into
   haematoxylin / eosin / DAB optical densities with the Ruifrok-Johnston matrices of
   `skimage.color.rgb2hed` / `hed2rgb`, each channel scaled by 1 + a and shifted by b,
   a ~ U(-``hed_scale``, ``hed_scale``), b ~ U(-``hed_shift``, ``hed_shift``) (defaults 0.1 and 0.01
   in skimage's units, where a MoNuSeg H channel spans ~0-0.09); on a MoNuSeg crop the defaults move
   pixels by ~6 levels on average, ~20 at most.  `skimage.color.rgb2hed` clips negative stain
   amounts to 0, which makes its round trip lossy (up to 38 levels on a MoNuSeg crop); the
   conversion here (:func:`rgb_to_hed`, :func:`hed_to_rgb`) is skimage's without that clip, so a
   zero jitter gives back the crop exactly.
4. **source artifacts** (:func:`source_artifacts`), with probability ``jpeg``: JPEG 4:2:0 at a quality
   drawn in [30, 95], on a block grid at a random phase against the crop (a scanner's grid is not the
   codec's tile grid); else with probability ``j2k``: JPEG 2000 (9/7 wavelet, colour transform) at a
   target PSNR drawn in [30, 50] dB, as Aperio SVS files are coded.  Both through Pillow's libjpeg and
   OpenJPEG, which a lent GPU machine has (it has no imagecodecs): the same bytes as
   `imagecodecs.jpeg8_encode` at that quality, and JPEG 2000 pixels within a level of
   `imagecodecs.jpeg2k_encode`'s at that level (``tests/test_augment.py``).

Each crop is drawn from its own generator, seeded by one draw from the run's: a batch's crops are a
function of the run's generator alone, however many processes render them (``workers``; on a GPU one
core cannot keep up with the training steps, and Pillow's JPEG 2000 encoder holds the GIL, so threads
would not help).

**The training target is the augmented crop itself** — artifacts, stain and all.  A codec of a scanned
slide has to reproduce the decoded scan: every "original" it is measured against (`he/test`, `slides/`)
is a decoded JPEG or JPEG 2000, so the loss compares the reconstruction with the artifact-laden input,
exactly what evaluation measures, and the network learns to keep what scanners keep (block edges, ringing
and all) rather than to spend bits on, or to invent, what a clean image would have had.  The sampler
returns one tensor; `train.py` uses it as input and reference.

Evaluation data (`he/test`, anything under a `slides` folder) is never read: :func:`check_training_folders`
refuses such folders (and files resolving into them) with a clear error; `train.py` calls it on ``--data``.
"""

from __future__ import annotations

import dataclasses
import io
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

#: scales a crop can be drawn at (area-downsampling factors) and their default probabilities
DEFAULT_SCALES = {1: 0.55, 2: 0.30, 4: 0.15}


# --------------------------------------------------------------------------- evaluation-data guard

def is_evaluation_path(path: str | Path) -> bool:
    """True for a path (resolved: symlinks followed) inside an ``he/test`` folder or under any folder
    named ``slides``: the evaluation data of ``../shared/data`` (its README), never to be trained on."""
    parts = [s.lower() for s in Path(path).resolve().parts]
    return "slides" in parts or any(a == "he" and b == "test" for a, b in zip(parts, parts[1:]))


def check_training_folders(folders: list[str | Path]) -> None:
    """Refuse (SystemExit, before any image is opened) a ``--data`` folder that is evaluation data, or
    that holds a file (a symlink, say) resolving into evaluation data."""
    for folder in folders:
        if is_evaluation_path(folder):
            raise SystemExit(f"--data {folder}: evaluation data (he/test, slides/) is never used for "
                             "training; train on he/train and he/tiles")
        p = Path(folder)
        if p.is_dir():
            for f in p.iterdir():
                if is_evaluation_path(f):
                    raise SystemExit(f"--data {folder}: {f.name} resolves into evaluation data "
                                     f"({f.resolve()}); refusing to train on it")


# --------------------------------------------------------------------------- the spec

@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """What :class:`AugmentedSampler` does; :func:`parse_spec` reads it from ``--augment``."""

    scales: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_SCALES))  # factor -> probability
    stain: float = 0.5           # probability of a HED jitter
    hed_scale: float = 0.1       # per-channel scale 1 + U(-hed_scale, hed_scale)
    hed_shift: float = 0.01      # per-channel shift U(-hed_shift, hed_shift) (skimage HED units)
    jpeg: float = 0.25           # probability of a JPEG 4:2:0 re-code
    jpeg_q: tuple = (30, 95)     # its quality, drawn uniformly (integers, both ends included)
    j2k: float = 0.15            # probability of a JPEG 2000 re-code (when no JPEG)
    j2k_db: tuple = (30.0, 50.0)  # its target PSNR in dB, drawn uniformly
    max_pad: int = 8             # a downsampled image this much short of the crop is mirror-padded

    def __post_init__(self) -> None:
        if not self.scales or any(int(f) < 1 or p < 0 for f, p in self.scales.items()) \
                or sum(self.scales.values()) <= 0:
            raise ValueError(f"scales need factors >= 1 and probabilities >= 0, not all 0: {self.scales}")
        for name in ("stain", "jpeg", "j2k"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a probability, got {getattr(self, name)}")
        if self.jpeg + self.j2k > 1:
            raise ValueError(f"jpeg + j2k must be at most 1, got {self.jpeg} + {self.j2k}")
        if not 1 <= self.jpeg_q[0] <= self.jpeg_q[1] <= 100:
            raise ValueError(f"jpeg_q must be 1 <= lo <= hi <= 100, got {self.jpeg_q}")
        if not 0 < self.j2k_db[0] <= self.j2k_db[1]:
            raise ValueError(f"j2k_db must be 0 < lo <= hi, got {self.j2k_db}")
        if self.hed_scale < 0 or self.hed_shift < 0 or self.max_pad < 0:
            raise ValueError("hed_scale, hed_shift and max_pad are magnitudes (>= 0)")


def parse_spec(spec: str) -> AugmentSpec:
    """``--augment`` to a spec: ``on`` (or ``default``) for the defaults, else comma-separated
    ``key=value`` overrides, e.g. ``scale=1:.5/2:.3/4:.2,stain=.5,hed_scale=.1,hed_shift=.01,jpeg=.25,
    jpeg_q=30-95,j2k=.15,j2k_db=30-50,max_pad=8`` (keys as in :class:`AugmentSpec`; ``scale`` lists
    factor:probability pairs, probabilities normalised)."""
    kw: dict = {}
    spec = spec.strip()
    if spec.lower() in ("", "on", "default"):
        return AugmentSpec()
    fields = {f.name for f in dataclasses.fields(AugmentSpec)}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep:
            raise ValueError(f"--augment: {item!r} is not key=value")
        if key in ("scale", "scales"):
            pairs = [p.split(":") for p in value.split("/")]
            kw["scales"] = {int(f): float(p) for f, p in pairs}
        elif key in ("jpeg_q", "j2k_db"):
            lo, _, hi = value.partition("-")
            cast = int if key == "jpeg_q" else float
            kw[key] = (cast(lo), cast(hi or lo))
        elif key == "max_pad":
            kw[key] = int(value)
        elif key in fields:
            kw[key] = float(value)
        else:
            raise ValueError(f"--augment: unknown key {key!r} (known: scale, {', '.join(sorted(fields - {'scales'}))})")
    return AugmentSpec(**kw)


# --------------------------------------------------------------------------- the pieces

def area_downsample(a: np.ndarray, f: int) -> np.ndarray:
    """``a`` (H, W, C) uint8 reduced by ``f`` on both sides by exact area averaging: each output pixel
    is the mean of an f x f block, rounded half up (integer arithmetic, no resampling filter).  A
    remainder of fewer than f rows or columns at the bottom / right is dropped."""
    if f == 1:
        return a
    h, w = a.shape[0] // f, a.shape[1] // f
    blocks = a[:h * f, :w * f].reshape(h, f, w, f, -1).astype(np.uint32).sum((1, 3))
    n = f * f
    return ((blocks + n // 2) // n).astype(np.uint8)


def random_crop(a: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``size`` x ``size`` crop at a uniform position; a side shorter than ``size`` is first
    mirror-padded (symmetric) by the shortfall, split at random between its two ends."""
    short = [max(size - s, 0) for s in a.shape[:2]]
    if any(short):
        before = [int(rng.integers(0, s + 1)) for s in short]
        a = np.pad(a, [(b, s - b) for b, s in zip(before, short)] + [(0, 0)], mode="symmetric")
    y = int(rng.integers(0, a.shape[0] - size + 1))
    x = int(rng.integers(0, a.shape[1] - size + 1))
    return a[y:y + size, x:x + size]


def flip_rotate(c: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A mirror image with probability ½, then a rotation by a random multiple of 90°: one of the
    eight symmetries of the square, a permutation of the pixels (a contiguous copy)."""
    if rng.random() < 0.5:
        c = c[:, ::-1]
    return np.ascontiguousarray(np.rot90(c, int(rng.integers(4))))


_LOG_ADJUST = np.log(1e-6)   # skimage's Beer-Lambert normalisation (separate/combine_stains)
#: Ruifrok & Johnston's haematoxylin / eosin / DAB stain vectors (rows), the matrix
#: `skimage.color.rgb_from_hed` holds; written here so that training needs no scikit-image
#: (a lent GPU machine has none; tests/test_augment.py checks it against skimage's)
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],
                         [0.07, 0.99, 0.11],
                         [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float64 HED stain amounts: `skimage.color.rgb2hed` without its clip of negative
    amounts to 0 (the clip makes the round trip lossy; here :func:`hed_to_rgb` inverts it)."""
    x = np.maximum(rgb.astype(np.float64) / 255.0, 1e-6)
    return (np.log(x) / _LOG_ADJUST) @ HED_FROM_RGB


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """HED stain amounts -> uint8 RGB (`skimage.color.hed2rgb`, then rounded to the nearest level)."""
    rgb = np.clip(np.exp((hed * _LOG_ADJUST) @ RGB_FROM_HED), 0.0, 1.0)
    return np.floor(rgb * 255.0 + 0.5).astype(np.uint8)


def hed_jitter(c: np.ndarray, rng: np.random.Generator, scale: float, shift: float) -> np.ndarray:
    """Stain variation: in HED space each channel k becomes hed_k · (1 + a_k) + b_k with
    a_k ~ U(-scale, scale) and b_k ~ U(-shift, shift) (three draws each); zero magnitudes give the
    crop back exactly."""
    a = rng.uniform(-scale, scale, 3) if scale > 0 else np.zeros(3)
    b = rng.uniform(-shift, shift, 3) if shift > 0 else np.zeros(3)
    return hed_to_rgb(rgb_to_hed(c) * (1.0 + a) + b)


#: JPEG 4:2:0 codes 16 x 16 macroblocks: the grid phase is drawn in [0, 16)
JPEG_MCU = 16


def _pillow_roundtrip(c: np.ndarray, fmt: str, **options) -> np.ndarray:
    """``c`` saved by Pillow as ``fmt`` with ``options`` and read back, RGB uint8."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(c)).save(buf, fmt, **options)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def recode_jpeg(c: np.ndarray, quality: int, phase: tuple[int, int] = (0, 0)) -> np.ndarray:
    """``c`` coded as JPEG 4:2:0 at ``quality`` and decoded (Pillow's libjpeg), its block grid starting
    ``phase`` = (dy, dx) px above / left of the crop's corner: the crop is mirror-padded by the phase
    there (and to whole macroblocks at the bottom / right), coded, decoded and cut back out."""
    dy, dx = phase
    h, w = c.shape[:2]
    pb, pr = (-(h + dy)) % JPEG_MCU, (-(w + dx)) % JPEG_MCU
    padded = np.pad(c, ((dy, pb), (dx, pr), (0, 0)), mode="symmetric")
    d = _pillow_roundtrip(padded, "JPEG", quality=int(quality), subsampling=2)      # 2: 4:2:0
    return np.ascontiguousarray(d[dy:dy + h, dx:dx + w])


def recode_j2k(c: np.ndarray, psnr_db: float) -> np.ndarray:
    """``c`` coded as JPEG 2000 (one tile, one quality layer, the irreversible 9/7 wavelet and colour
    transform) at a target PSNR of ``psnr_db`` and decoded (Pillow's OpenJPEG, its distortion-ratio
    target)."""
    return _pillow_roundtrip(c, "JPEG2000", quality_mode="dB", quality_layers=[float(psnr_db)],
                             irreversible=True, mct=1, no_jp2=True)


def source_artifacts(c: np.ndarray, rng: np.random.Generator, spec: AugmentSpec) -> tuple[np.ndarray, str]:
    """The crop as a scanner might have stored it: with probability ``spec.jpeg`` a JPEG 4:2:0 re-code
    (quality uniform in ``spec.jpeg_q``, random grid phase), else with probability ``spec.j2k`` a JPEG
    2000 re-code (target PSNR uniform in ``spec.j2k_db``), else unchanged.  Returns the crop and
    what was done (``"jpeg"``, ``"j2k"`` or ``""``).  One uniform draw decides, so the other draws
    happen only for the codec chosen."""
    u = rng.random()
    if u < spec.jpeg:
        q = int(rng.integers(spec.jpeg_q[0], spec.jpeg_q[1] + 1))
        phase = (int(rng.integers(JPEG_MCU)), int(rng.integers(JPEG_MCU)))
        return recode_jpeg(c, q, phase), "jpeg"
    if u < spec.jpeg + spec.j2k:
        return recode_j2k(c, float(rng.uniform(*spec.j2k_db))), "j2k"
    return c, ""


# --------------------------------------------------------------------------- the sampler

class AugmentedSampler:
    """`train.CropSampler`'s interface (``batch(n)`` -> float tensor (n, 3, size, size) in [0, 1]) over
    the pipeline of this module's docstring: scale, flips / rotations, stain, source artifacts."""

    def __init__(self, images: list[np.ndarray], size: int, rng: np.random.Generator,
                 spec: AugmentSpec | None = None, workers: int = 0) -> None:
        self.size, self.rng, self.spec, self.workers = size, rng, spec or AugmentSpec(), workers
        self._images = images
        self._pool: ProcessPoolExecutor | None = None
        self.levels: dict[int, list[np.ndarray]] = {}
        for f, p in self.spec.scales.items():
            if p <= 0:
                continue
            fit = [d for d in (area_downsample(a, f) for a in images)
                   if min(d.shape[:2]) >= size - self.spec.max_pad]
            if fit:
                self.levels[f] = fit
        if not self.levels:
            raise SystemExit(f"--augment: no image is large enough for a {size}px crop at any scale")
        self.factors = sorted(self.levels)
        p = np.array([self.spec.scales[f] for f in self.factors], np.float64)
        self.scale_p = p / p.sum()
        self.area_p = {}
        for f, imgs in self.levels.items():
            area = np.array([a.shape[0] * a.shape[1] for a in imgs], np.float64)
            self.area_p[f] = area / area.sum()
        self.counts = {"jpeg": 0, "j2k": 0, "stain": 0, **{f"{f}x": 0 for f in self.factors}}

    def describe(self) -> str:
        """One line: images per scale and the probabilities in use."""
        s = self.spec
        scales = ", ".join(f"{f}x p={p:.2f} ({len(self.levels[f])} images)"
                           for f, p in zip(self.factors, self.scale_p))
        return (f"augment: {scales}; stain p={s.stain} (scale ±{s.hed_scale}, shift ±{s.hed_shift}); "
                f"JPEG 4:2:0 p={s.jpeg} q{s.jpeg_q[0]}-{s.jpeg_q[1]}; JPEG 2000 p={s.j2k} "
                f"{s.j2k_db[0]:g}-{s.j2k_db[1]:g} dB; target = the augmented crop")

    def sample(self) -> np.ndarray:
        """One augmented uint8 crop (size, size, 3), from a generator seeded by one draw of the run's."""
        return self.batch_uint8(1)[0]

    def render(self, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
        """One augmented crop drawn from ``rng`` alone, and what was done to it (the keys of
        :attr:`counts`); it reads the images and changes nothing."""
        spec = self.spec
        f = self.factors[int(rng.choice(len(self.factors), p=self.scale_p))]
        a = self.levels[f][int(rng.choice(len(self.levels[f]), p=self.area_p[f]))]
        c = flip_rotate(random_crop(a, self.size, rng), rng)
        done = [f"{f}x"]
        if rng.random() < spec.stain:
            c = hed_jitter(c, rng, spec.hed_scale, spec.hed_shift)
            done.append("stain")
        c, artifact = source_artifacts(c, rng, spec)
        return c, done + ([artifact] if artifact else [])

    def batch_uint8(self, n: int) -> np.ndarray:
        """``n`` crops (n, size, size, 3) uint8: ``n`` seeds drawn from the run's generator, each crop
        rendered from its own, here or (``workers`` > 0) on that many processes: the same crops."""
        seeds = [int(s) for s in self.rng.integers(0, 2 ** 63, size=n)]
        if self.workers > 0:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.workers, multiprocessing.get_context("spawn"),
                                                 initializer=_start_worker,
                                                 initargs=(self._images, self.size, self.spec))
            crops = list(self._pool.map(_render_seed, seeds, chunksize=max(1, n // (2 * self.workers))))
        else:
            crops = [self.render(np.random.default_rng(s)) for s in seeds]
        for _, done in crops:
            for k in done:
                self.counts[k] += 1
        return np.stack([c for c, _ in crops])

    def close(self) -> None:
        """Stop the worker processes, if any (they also end with this process)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def batch(self, n: int) -> torch.Tensor:
        """``n`` augmented crops as float (n, 3, size, size) in [0, 1] (:meth:`batch_uint8`)."""
        return torch.from_numpy(self.batch_uint8(n)).permute(0, 3, 1, 2).float().div_(255.0)


#: a worker process's sampler (:meth:`AugmentedSampler.batch_uint8` with ``workers``)
_WORKER: AugmentedSampler | None = None


def _start_worker(images: list[np.ndarray], size: int, spec: AugmentSpec) -> None:
    global _WORKER
    _WORKER = AugmentedSampler(images, size, np.random.default_rng(0), spec)


def _render_seed(seed: int) -> tuple[np.ndarray, list[str]]:
    assert _WORKER is not None
    return _WORKER.render(np.random.default_rng(seed))
