"""Tiles that were a JPEG once: the scan's JPEG made again from its decoded pixels.

Most slides were scanned to JPEG (Aperio SVS, generic tiled TIFF, DICOM, NDPI) and are read
as the pixels libjpeg decodes.  A container's tile whose corner lies on the scan's 8-px block
grid (16 px where the chroma was subsampled: every tile of a level read straight from the
source, in a tile size that is a multiple of 16) holds whole blocks of the scanner's JPEG.
Coded again as a JPEG with the scanner's quantisation, each block's coefficients come back
as the scanner stored them: the forward DCT of the decoded pixels lies within rounding of the
dequantised coefficients, far inside half a quantisation step.  So the tile decodes to the
source pixels, or within a level or two of them where the scanner's decode was clipped or
its chroma upsampled, and JPEG-XL carries that JPEG losslessly in fewer bytes
(:func:`~wsicodec.scannertiles.carry`).  This needs no scanner tile of the same size or
grid, and no access to the source file: it works on pixels.

Where the quantisation comes from: the pixels.  libjpeg's tables are the IJG tables scaled
by a quality; a block's DC coefficient (its level-shifted sum / 8) lies on multiples of the
table's DC step, which names a few qualities, and the AC coefficients choose among them
(:func:`detect`).  The colour: the components coded as R, G, B (Aperio's tiles, all on the
luminance table) or as YCbCr, whose DC steps show on the Y plane; the chroma subsampling
is chosen by coding the tile each way (:data:`SUBSAMPLINGS`).  A scanner with tables of its own
(not IJG-scaled) gets no match here, and no candidate.

Components coded as R, G, B on one table (Aperio's) are written from the coefficients
themselves (:mod:`wsicodec.jpegwrite`): a block whose decode was clipped at 0 or 255 has
its coefficients found again by letting the clipped samples go past the clip as those
coefficients would take them (:func:`coefficients`), which libjpeg, taking 8-bit
samples, cannot be given.  YCbCr scans are coded again by libjpeg at the quality found.

:func:`recover` returns the JPEGs; what they decode to is measured by the caller (the
``auto`` codec keeps the most faithful where it reaches the tile's target in the fewest
bytes, or costs less at the quality's price of error, as the kind ``recovered-jpeg``).
No torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wsicodec.jpegwrite import write_rgb

#: the fidelity record's kind of a tile coded here
KIND = "recovered-jpeg"
#: the IJG luminance table (JPEG standard, Annex K), in natural (row-major) order
_IJG_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], np.int64).reshape(8, 8)
#: the fewest unclipped blocks a tile must hold for its steps to be read
MIN_BLOCKS = 16
#: how closely the blocks' coefficients must sit on a table's multiples for it to count
#: (mean phase coherence against a JPEG decode's, 1: as closely; random values give
#: ~1/sqrt(blocks))
MIN_COHERENCE = 0.9
#: the spread of DCs (their interquartile range, in steps) a tile needs for them to tell a
#: step: DCs bunched within a step (glass) sit near the multiples of any step
MIN_SPREAD = 2
#: the most rounds of finding a clipped block's coefficients again
DECLIP_ROUNDS = 8
#: the finest DC step read: finer, a decoder's rounding hides it
MIN_DC_STEP = 2
#: the standard deviation a decoder's rounding of its samples to integers adds to a
#: coefficient (orthonormal DCT of uniform ±0.5 errors)
ROUNDING_NOISE = 0.29
#: the chroma subsamplings tried for a YCbCr scan, in libjpeg's (imagecodecs') names
SUBSAMPLINGS = ("444", "420", "422")


def ijg_table(quality: int) -> np.ndarray:
    """libjpeg's luminance quantisation table at ``quality`` 1..100 (baseline: 1..255),
    (8, 8) int, natural order."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((_IJG_LUMA * scale + 50) // 100, 1, 255)


_TABLES = {q: ijg_table(q) for q in range(1, 101)}
#: the DC steps of those tables that :func:`detect` reads (:data:`MIN_DC_STEP` and up)
_DC_STEPS = np.array(sorted({int(t[0, 0]) for t in _TABLES.values() if t[0, 0] >= MIN_DC_STEP}), np.float64)
#: the orthonormal 8-point DCT-II matrix (JPEG's coefficients are this 2-D transform)
_DCT = np.array([[np.sqrt((1 if k == 0 else 2) / 8) * np.cos((2 * n + 1) * k * np.pi / 16)
                  for n in range(8)] for k in range(8)])


@dataclass(frozen=True)
class JpegSetting:
    """How a scan's JPEG was coded, as far as libjpeg can code it again: its IJG
    ``quality`` and whether its components are R, G, B (``rgb``) or YCbCr."""

    quality: int
    rgb: bool


def _blocks_of(plane: np.ndarray) -> np.ndarray:
    """``plane`` (h, w) cut to whole 8 × 8 blocks on its own grid: (rows, cols, 8, 8)."""
    h, w = (plane.shape[0] // 8) * 8, (plane.shape[1] // 8) * 8
    return plane[:h, :w].reshape(h // 8, 8, w // 8, 8).swapaxes(1, 2)


def _forward(blocks: np.ndarray) -> np.ndarray:
    """The 2-D DCT of each level-shifted 8 × 8 block (JPEG's coefficients, unquantised)."""
    return _DCT @ blocks @ _DCT.T


def _blocks(plane: np.ndarray, clipped: np.ndarray) -> np.ndarray:
    """(n, 8, 8) float64 blocks of ``plane`` on its own 8-px grid, level-shifted: those
    whole, with no pixel ``clipped`` (a sample at 0 or 255, where a decode may have been
    clipped) and not of one value (a flat block's DC sits on the multiples of every step
    its value divides)."""
    b = _blocks_of(plane).reshape(-1, 8, 8)
    keep = ~_blocks_of(clipped).reshape(-1, 8, 8).any(axis=(1, 2)) & (b.min(axis=(1, 2)) < b.max(axis=(1, 2)))
    return b[keep].astype(np.float64) - 128.0


def _expected(steps: np.ndarray) -> np.ndarray:
    """How closely a JPEG decode's coefficients sit on multiples of each step (mean phase
    coherence, its samples rounded to integers: :data:`ROUNDING_NOISE`)."""
    return np.exp(-2 * (np.pi * ROUNDING_NOISE / steps) ** 2)


def _coherence(values: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """How closely ``values`` sit on multiples of each step, against how closely a JPEG
    decode's would (:func:`_expected`): ~1 on them, ~0 not at all, capped at 1."""
    phase = np.exp(2j * np.pi * values[None, :] / steps[:, None])
    return np.minimum(1.0, np.abs(phase.mean(axis=1)) / _expected(steps))


def _score(coef: np.ndarray, table: np.ndarray) -> float | None:
    """How well the blocks' AC coefficients ``coef`` (n, 8, 8) sit on ``table``'s
    multiples: the coherence of the 63 AC coefficients' values off zero, each coefficient
    weighed by how many it has (a value near zero sits on the multiples of every step: no
    evidence); None where too few values lie off zero."""
    steps = table.reshape(64)[1:].astype(np.float64)
    flat = coef.reshape(len(coef), 64).T[1:]                       # (63, n): the AC coefficients
    off = np.abs(flat) >= steps[:, None] / 2
    weight = off.sum(axis=1)
    if weight.sum() < MIN_BLOCKS:
        return None
    phase = np.where(off, np.exp(2j * np.pi * flat / steps[:, None]), 0)
    coherence = np.minimum(1.0, np.abs(phase.sum(axis=1)) / np.maximum(weight, 1) / _expected(steps))
    return float((coherence * weight).sum() / weight.sum())


def _dc_steps(coef: np.ndarray) -> set[int]:
    """The DC steps of the IJG tables the blocks' DCs sit on the multiples of, spread over
    at least :data:`MIN_SPREAD` of them (DCs bunched within a step, glass, sit near the
    multiples of any step)."""
    dc = coef[:, 0, 0]
    q1, q3 = np.percentile(dc, (25, 75))
    fit = (q3 - q1 >= MIN_SPREAD * _DC_STEPS) & (_coherence(dc, _DC_STEPS) >= MIN_COHERENCE)
    return {int(v) for v in _DC_STEPS[fit]}


def detect(rgb: np.ndarray) -> JpegSetting | None:
    """The IJG quality and colour a JPEG decode ``rgb`` ((h, w, 3) uint8, its corner on the
    JPEG's block grid) was coded with, read from its pixels, or None where they show none
    (not a JPEG decode, off its grid, too little tissue to tell, or tables libjpeg's
    qualities do not make).  Of qualities that fit equally well, the coarsest."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 8 or rgb.shape[1] < 8:
        return None
    y = np.clip(np.round(rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])), 0, 255)
    best: tuple[float, JpegSetting] | None = None
    clipped = (rgb == 0) | (rgb == 255)
    # the G component as coded (R, G, B); Y made again from R, G, B, wrong where any clipped
    for plane, is_rgb, clip in ((rgb[..., 1], True, clipped[..., 1]), (y, False, clipped.any(axis=2))):
        b = _blocks(plane, clip)
        if len(b) < MIN_BLOCKS:
            continue
        coef = _forward(b)
        dc_steps = _dc_steps(coef)
        for q in range(1, 101):                                  # coarsest first: ties keep it
            if int(_TABLES[q][0, 0]) not in dc_steps:
                continue
            score = _score(coef, _TABLES[q])
            if score is not None and score >= MIN_COHERENCE and (best is None or score > best[0] + 1e-6):
                best = (score, JpegSetting(q, is_rgb))
    return best[1] if best is not None else None


def encode(rgb: np.ndarray, setting: JpegSetting, subsampling: str = "444") -> bytes:
    """``rgb`` coded by libjpeg as ``setting`` says (baseline, Huffman tables optimised;
    ``subsampling`` for YCbCr)."""
    import imagecodecs

    if setting.rgb:
        return bytes(imagecodecs.jpeg8_encode(rgb, level=setting.quality, colorspace="RGB",
                                              outcolorspace="RGB", optimize=True))
    return bytes(imagecodecs.jpeg8_encode(rgb, level=setting.quality, colorspace="RGB",
                                          outcolorspace="YCBCR", subsampling=subsampling, optimize=True))


def coefficients(rgb: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The quantised coefficients ((3, rows, cols, 8, 8) int, natural order) whose JPEG of
    R, G, B components on ``table`` decodes to ``rgb`` ((h, w, 3) uint8, multiples of 8):
    each block's DCT over the table, rounded; where a block holds a sample at 0 or 255
    (the decode clipped it, so its DCT is off), again from the block with those samples
    replaced by what the coefficients found give beyond the clip, until that settles
    (:data:`DECLIP_ROUNDS` at most)."""
    q = table.astype(np.float64)
    out = []
    for k in range(3):
        x = _blocks_of(rgb[..., k]).astype(np.float64)
        c = np.round(_forward(x - 128.0) / q)
        hi, lo = x == 255, x == 0
        clipped = (hi | lo).any(axis=(2, 3))
        if clipped.any():
            xs, his, los, cs = x[clipped], hi[clipped], lo[clipped], c[clipped]
            for _ in range(DECLIP_ROUNDS):
                r = _DCT.T @ (cs * q) @ _DCT + 128.0
                x2 = np.where(his, np.maximum(r, 255.0), np.where(los, np.minimum(r, 0.0), xs))
                c2 = np.round(_forward(x2 - 128.0) / q)
                if np.array_equal(c2, cs):
                    break
                cs = c2
            c[clipped] = cs
        out.append(c)
    return np.stack(out).astype(np.int64)


def recover(rgb: np.ndarray, valid: tuple[int, int] | None = None) -> list[bytes]:
    """The JPEGs of ``rgb`` that may make the scan's coding again (for R, G, B components
    its coefficients written, where the tile is whole blocks, and libjpeg's coding; for
    YCbCr one per :data:`SUBSAMPLINGS`), or [] where :func:`detect` finds
    none in its part ``valid`` = (h, w) (an edge tile's part inside the level; default:
    all of it).  The caller decodes and measures them."""
    h, w = rgb.shape[:2] if valid is None else valid
    setting = detect(np.ascontiguousarray(rgb[:h, :w]))
    if setting is None:
        return []
    if setting.rgb:
        found = [encode(rgb, setting)]
        if rgb.shape[0] % 8 == 0 and rgb.shape[1] % 8 == 0:
            table = _TABLES[setting.quality]
            try:          # the coefficients themselves, where clipping hid them from libjpeg
                found.insert(0, write_rgb(coefficients(rgb, table), table, *rgb.shape[:2]))
            except ValueError:
                pass
        return found
    return [encode(rgb, setting, s) for s in SUBSAMPLINGS]
