"""bench/nuclei_detect.py, bench/nuclei.py's detector and matching (issue #29), on a small crop of a real he/test image.

Seconds, not minutes: one 256² crop at 40x, classical codecs only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # bench/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))

pytest.importorskip("skimage")
from conftest import HE_TEST_PNG, need  # noqa: E402

from bench import nuclei_detect  # noqa: E402
from bench.datasets import DATASETS, area_downsample, load_png  # noqa: E402

MPP = DATASETS["he_test"].mpp  # 0.25 µm/px


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    rgb = load_png(need(HE_TEST_PNG))
    return np.ascontiguousarray(rgb[372:628, 372:628])  # central 256²


@pytest.fixture(scope="module")
def reference(crop):
    thr = nuclei_detect.otsu_threshold(crop, MPP)
    return thr, nuclei_detect.detect(crop, MPP, thr)


def test_plausible_number_of_nuclei(crop, reference):
    _, ref = reference
    # 64 × 64 µm of dense tissue at 40x: some tens of nuclei, each of a nuclear size
    assert 15 <= ref.n <= 120, ref.n
    area_um2 = ref.areas * MPP ** 2
    assert np.all(area_um2 >= nuclei_detect.MIN_AREA_UM2)
    assert 10 <= np.median(area_um2) <= 100
    assert ref.labels.max() == ref.n and ref.centroids.shape == (ref.n, 2)


def test_image_against_itself(crop, reference):
    thr, ref = reference
    again = nuclei_detect.detect(crop.copy(), MPP, thr)
    c = nuclei_detect.compare(ref, again, MPP)
    assert c["f1"] == 1.0 and c["tp"] == ref.n
    assert c["area_change"] == 0.0 and c["area_bias"] == 0.0 and c["mask_dice"] == 1.0


def test_own_otsu_is_the_reused_threshold_on_the_original(crop, reference):
    thr, ref = reference
    own = nuclei_detect.detect(crop, MPP)  # threshold=None: Otsu on the image itself
    assert own.threshold == pytest.approx(thr) and own.n == ref.n


def _blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage as ndi
    out = ndi.gaussian_filter(rgb.astype(np.float64), sigma=(sigma, sigma, 0))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def test_f1_drops_for_damaged_versions(crop, reference):
    from wsicodec.codecs import get_codec
    thr, ref = reference
    light = get_codec("jpeg", quality=90, subsampling="444")
    q5 = get_codec("jpeg", quality=5, subsampling="420")
    f1 = {}
    for name, img in (("jpeg90", light.decode(light.encode(crop))), ("jpeg5", q5.decode(q5.encode(crop))),
                      ("blur", _blur(crop, 6.0))):
        f1[name] = nuclei_detect.compare(ref, nuclei_detect.detect(np.asarray(img), MPP, thr), MPP)["f1"]
    assert f1["jpeg90"] > 0.9, f1
    assert f1["jpeg5"] < f1["jpeg90"] - 0.05, f1
    assert f1["blur"] < f1["jpeg90"] - 0.1, f1


def test_matching_is_symmetric():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 200, size=(80, 2))
    b = np.concatenate([a[:60] + rng.normal(0, 1.5, size=(60, 2)), rng.uniform(0, 200, size=(15, 2))])
    ia, ib = nuclei_detect.match(a, b, radius=4.0)
    jb, ja = nuclei_detect.match(b, a, radius=4.0)
    assert len(ia) == len(jb)                                   # the same number of pairs either way
    assert len(set(ia)) == len(ia) and len(set(ib)) == len(ib)  # one-to-one
    assert np.all(np.linalg.norm(a[ia] - b[ib], axis=1) <= 4.0)
    d_ab = np.linalg.norm(a[ia] - b[ib], axis=1).sum()
    d_ba = np.linalg.norm(a[ja] - b[jb], axis=1).sum()
    assert d_ab == pytest.approx(d_ba)                          # the same optimum either way


def test_matching_prefers_more_pairs():
    # greedy nearest-first would pair a0-b0 (distance 1) and leave a1 alone; the assignment
    # pairs both (a0-b1, a1-b0)
    a = np.array([[0.0, 0.0], [0.0, 2.0]])
    b = np.array([[0.0, 1.0], [0.0, -2.5]])
    ia, ib = nuclei_detect.match(a, b, radius=3.0)
    assert len(ia) == 2
    assert nuclei_detect.match(a, np.zeros((0, 2)), 3.0)[0].size == 0


def test_f1_symmetric_area_change_relative_to_the_original(crop, reference):
    thr, ref = reference
    dec = nuclei_detect.detect(_blur(crop, 1.5), MPP, thr)
    fwd, back = nuclei_detect.compare(ref, dec, MPP), nuclei_detect.compare(dec, ref, MPP)
    assert fwd["f1"] == pytest.approx(back["f1"]) and fwd["tp"] == back["tp"]
    assert fwd["mask_dice"] == pytest.approx(back["mask_dice"])
    assert fwd["precision"] == pytest.approx(back["recall"])
    # area change is relative to the original's nuclei: not symmetric, by definition
    assert fwd["area_bias"] != pytest.approx(back["area_bias"])


def test_area_downsample_is_an_exact_mean():
    img = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    out = area_downsample(img, 2)
    assert out.shape == (2, 3, 3)
    blocks = img[:4, :6].astype(np.float64).reshape(2, 2, 3, 2, 3).mean(axis=(1, 3))
    assert np.array_equal(out, np.rint(blocks).astype(np.uint8))
    assert area_downsample(img, 1) is img
