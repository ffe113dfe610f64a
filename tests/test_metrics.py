"""Tests of bench/metrics.py: LPIPS against published values, MS-SSIM on small tiles, BD-rate math.

The LPIPS calibration pairs are fetched once, outside the tests, by
``.venv/bin/python tests/fetch_calibration.py``; without them the calibration test skips and says so.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # bench/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))

from bench import metrics  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_calibration import calibration_dir, is_complete  # noqa: E402

# IQA-PyTorch (pyiqa) published LPIPS-alex values on its calibration pairs (ResultsCalibra).
PUBLISHED_LPIPS_ALEX = {"I03": 0.7237, "I04": 0.2572, "I06": 0.0508, "I08": 0.0520, "I19": 0.4253}
HE_TEST = REPO.parent / "shared" / "data" / "he" / "test"


def _rng_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # smooth-ish content so SSIM is not dominated by white noise
    base = rng.integers(0, 256, size=(h // 4 + 2, w // 4 + 2, 3)).astype(np.float64)
    up = np.kron(base, np.ones((4, 4, 1)))[:h, :w]
    return np.clip(up + rng.normal(0, 8, size=up.shape), 0, 255).astype(np.uint8)


def _noisy(img: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- PSNR

def test_psnr_known_value():
    a = np.zeros((7, 5, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 10  # MSE = 100 / 105
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 * 105 / 100))
    assert metrics.psnr(a, a) == math.inf


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        metrics.psnr(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        metrics.ms_ssim(np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 3), np.float32))


# ---------------------------------------------------------------------------------------- MS-SSIM

@pytest.mark.parametrize("h,w,scales", [(64, 64, 3), (100, 37, 2), (161, 300, 5), (160, 160, 4),
                                        (11, 40, 1), (7, 9, 1)])
def test_ms_ssim_plan_scales(h, w, scales):
    plan = metrics.ms_ssim_plan(h, w)
    assert plan.scales == scales
    assert sum(plan.weights) == pytest.approx(1.0, abs=2e-4)
    assert min(h, w) > (plan.win_size - 1) * 2 ** (plan.scales - 1)
    assert plan.standard == (scales == 5)
    if not plan.standard:
        assert "scale" in plan.describe()


@pytest.mark.parametrize("h,w", [(64, 64), (100, 37), (37, 100), (160, 161), (12, 12), (5, 8)])
def test_ms_ssim_small_tiles_do_not_crash(h, w):
    a = _rng_image(h, w)
    assert metrics.ms_ssim(a, a) == pytest.approx(1.0, abs=1e-9)
    v = metrics.ms_ssim(a, _noisy(a, 20))
    assert 0.0 < v < 1.0
    assert metrics.ms_ssim(a, _noisy(a, 40)) < v  # more noise, lower score


def test_ms_ssim_reduced_path_matches_pytorch_msssim_at_five_scales():
    """Our own scale loop (used for small tiles) is pytorch_msssim's loop: same number at 5 scales."""
    import pytorch_msssim

    a = _rng_image(200, 170)
    b = _noisy(a, 15)
    plan = metrics.MsSsimPlan(scales=5, win_size=11, weights=metrics.MS_SSIM_WEIGHTS)
    x, y = metrics._to_tensor(a, "float64"), metrics._to_tensor(b, "float64")
    ours = float(metrics._ms_ssim_scales(x, y, plan))
    ref = float(pytorch_msssim.ms_ssim(x, y, data_range=255))
    assert ours == pytest.approx(ref, abs=1e-12)
    assert metrics.ms_ssim(a, b, dtype="float64") == pytest.approx(ref, abs=1e-12)
    assert metrics.ms_ssim(a, b) == pytest.approx(ref, abs=1e-5)  # the float32 default


@pytest.mark.parametrize("h,w", [(200, 170), (64, 64), (100, 37), (5, 8)])
def test_ms_ssim_cached_reference_matches(h, w):
    a = _rng_image(h, w, seed=3)
    ref = metrics.MsSsimReference(a)
    for sigma in (3, 30):
        b = _noisy(a, sigma, seed=sigma)
        assert ref.against(b) == pytest.approx(metrics.ms_ssim(a, b), abs=2e-6)
    assert ref.against(a) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="reference"):
        ref.against(a[:-1])


def test_msssim_db():
    assert metrics.msssim_db(0.9) == pytest.approx(10.0)
    assert metrics.msssim_db(0.99) == pytest.approx(20.0)
    np.testing.assert_allclose(metrics.msssim_db(np.array([0.9, 0.999])), [10.0, 30.0])


def test_lpips_db_rises_as_lpips_falls():
    assert metrics.lpips_db(0.1) == pytest.approx(10.0)
    np.testing.assert_allclose(metrics.lpips_db(np.array([0.01, 0.0])), [20.0, 60.0])


# ---------------------------------------------------------------------------------------- BD-rate

@pytest.mark.parametrize("method", ["pchip", "cubic"])
@pytest.mark.parametrize("factor", [0.8, 1.25, 0.5])
def test_bd_rate_constant_rate_factor_is_exact(method, factor):
    """Same curve, every rate times `factor`: BD-rate is exactly (factor - 1) * 100 %."""
    rate = np.array([0.1, 0.2, 0.35, 0.6, 1.0, 1.7, 2.8])
    quality = 30 + 4 * np.log2(rate) - 0.3 * np.log2(rate) ** 2  # concave, increasing in rate
    got = metrics.bd_rate(rate, quality, rate * factor, quality, method=method)
    assert got == pytest.approx((factor - 1) * 100, abs=1e-9)


@pytest.mark.parametrize("method", ["pchip", "cubic"])
def test_bd_rate_shifted_samples_linear_curve(method):
    """Quality linear in log-rate, test sampled at other points: still the exact factor."""
    r1 = np.geomspace(0.1, 3.0, 7)
    r2 = np.geomspace(0.08, 2.0, 6)
    q = lambda r: 35 + 6 * np.log(r)  # noqa: E731
    # test reaches the same quality with 0.7x the rate: q_test(r) = q(r / 0.7)
    got = metrics.bd_rate(r1, q(r1), r2, q(r2 / 0.7), method=method)
    assert got == pytest.approx(-30.0, abs=1e-9)
    # and symmetric: the reference against the test
    back = metrics.bd_rate(r2, q(r2 / 0.7), r1, q(r1), method=method)
    assert back == pytest.approx(100 / 0.7 - 100, abs=1e-9)


def test_bd_rate_no_overlap_or_too_few_points_is_nan():
    assert math.isnan(metrics.bd_rate([1, 2], [30, 31], [1, 2], [40, 41]))
    assert math.isnan(metrics.bd_rate([1, 2, 3], [30, 31, 32], [1, 2, 3], [30, 31, 32], method="cubic"))
    with pytest.raises(ValueError, match="pchip"):
        metrics.bd_rate([1, 2], [30, 31], [1, 2], [30, 31], method="akima")


def test_bd_rate_identical_is_zero():
    r = [0.2, 0.5, 1.0, 2.0]
    q = [30.0, 33.0, 36.5, 40.0]
    assert metrics.bd_rate(r, q, r, q) == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------------ LPIPS

@pytest.fixture(scope="module")
def lpips_alex():
    try:
        return metrics.load_lpips()
    except FileNotFoundError as exc:
        pytest.skip(f"LPIPS trunk weights absent: {exc}")


def test_lpips_reproduces_published_alex_values(lpips_alex):
    from PIL import Image

    directory = calibration_dir()
    if not is_complete(directory):
        pytest.skip(f"LPIPS calibration pairs absent from {directory}; fetch them once with "
                    "`.venv/bin/python tests/fetch_calibration.py`")
    for name, expected in PUBLISHED_LPIPS_ALEX.items():
        ref = np.asarray(Image.open(directory / "ref_dir" / f"{name}.bmp").convert("RGB"))
        dist = np.asarray(Image.open(directory / "dist_dir" / f"{name}.bmp").convert("RGB"))
        assert lpips_alex(ref, dist) == pytest.approx(expected, abs=1e-3), name


def test_lpips_identity_zero_and_batch_consistent(lpips_alex):
    a = _rng_image(64, 96)
    b = _noisy(a, 25)
    assert lpips_alex(a, a) == pytest.approx(0.0, abs=1e-6)
    single = lpips_alex(a, b)
    assert single > 0.01
    assert lpips_alex.batch([a, a], [b, a]) == pytest.approx([single, 0.0], abs=1e-5)
    # cached reference features give what lpips.LPIPS.forward gives
    import torch

    assert lpips_alex.against(lpips_alex.reference(a), a, b) == pytest.approx(single, abs=1e-6)
    with torch.no_grad():
        direct = float(lpips_alex.net(lpips_alex._prep([a]), lpips_alex._prep([b])))
    assert single == pytest.approx(direct, abs=1e-6)


def test_lpips_weights_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no AlexNet weights"):
        metrics.find_alexnet_weights(tmp_path)


def test_lpips_accepts_weights_dir_env(monkeypatch, tmp_path):
    shared = REPO.parent / "shared" / "weights" / metrics.ALEXNET_FEATURES_FILE
    if not shared.is_file():
        pytest.skip(f"{shared} absent")
    (tmp_path / metrics.ALEXNET_FEATURES_FILE).symlink_to(shared)
    monkeypatch.setenv("WSICODEC_WEIGHTS", str(tmp_path))
    assert metrics.find_alexnet_weights() == tmp_path / metrics.ALEXNET_FEATURES_FILE


def test_metrics_on_real_he_tile():
    """On a real H&E crop, heavier degradation scores worse on every metric (sanity, not a golden)."""
    from PIL import Image

    files = sorted(HE_TEST.glob("*.png"))
    if not files:
        pytest.skip(f"no H&E test images in {HE_TEST}")
    a = np.asarray(Image.open(files[0]).convert("RGB"))[:219, :301]
    b1, b2 = _noisy(a, 5), _noisy(a, 20)
    assert metrics.psnr(a, b1) > metrics.psnr(a, b2)
    assert metrics.ms_ssim(a, b1) > metrics.ms_ssim(a, b2)


# ------------------------------------------------------------------------- bench/rd.py end to end

def test_rd_script_sweeps_merges_and_refuses_other_images(tmp_path, lpips_trunk):
    """rd.py on two tiny awkward-size images: JSON, table and plot written; --update merges."""
    import json

    import torch
    from PIL import Image

    from bench import rd

    if "jpeg" not in __import__("wsicodec.codecs", fromlist=["available_codecs"]).available_codecs():
        pytest.skip("JPEG backend not available")
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(_rng_image(100, 37)).save(images / "a.png")
    Image.fromarray(_rng_image(64, 80, seed=2)).save(images / "b.png")
    out = tmp_path / "out"
    common = ["--images", str(images), "--out", str(out), "--tag", "t", "--no-visual", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert rd.main(common + ["--codecs", "jpeg444"]) == 0
        first = json.loads((out / "rd_t.json").read_text())
        assert [im["ms_ssim_scales"] for im in first["images"]] == [2, 3]
        entry = first["codecs"]["jpeg444"]
        assert entry["status"] == "ok" and len(entry["points"]) == len(rd.SWEEPS["jpeg444"].qualities)
        p = entry["points"][0]
        assert {r["image"] for r in p["per_image"]} == {"a.png", "b.png"}
        assert p["mean"]["bpp"] == pytest.approx(np.mean([r["bpp"] for r in p["per_image"]]))
        assert first["environment"]["cpu"] and first["environment"]["packages"]["torch"]

        assert rd.main(common + ["--update", "jpeg420"]) == 0
        merged = json.loads((out / "rd_t.json").read_text())
        assert list(merged["codecs"]) == ["jpeg420", "jpeg444"]
        assert merged["codecs"]["jpeg444"]["points"] == entry["points"]  # untouched
        assert "jpeg420" in merged["bd_rate"]["anchors"]["jpeg444"]
        assert (out / "rd_t.png").stat().st_size > 0 and "JPEG 4:2:0" in (out / "rd_t.md").read_text()

        with pytest.raises(SystemExit, match="--crop None"):
            rd.main(common + ["--update", "jpeg420", "--crop", "32"])
        (images / "c.png").write_bytes((images / "a.png").read_bytes())
        with pytest.raises(SystemExit, match="other images"):
            rd.main(common + ["--update", "jpeg420"])
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(SystemExit, match="unknown codec"):
        rd.select("jpeg,bogus")
    assert rd.select("jpeg") == ["jpeg420", "jpeg444"]
    # the 130x-slower encoder search runs only when named
    assert "learned_refine" not in rd.select(None) and "learned" in rd.select(None)
    assert rd.select("learned") == ["learned"]
    assert rd.select("learned_refine,learned") == ["learned_refine", "learned"]


def test_rd_crop_codes_the_central_square(tmp_path, lpips_trunk):
    import json

    import torch
    from PIL import Image

    from bench import rd

    img = _rng_image(90, 70)
    crop = metrics.center_crop(img, 40)
    assert crop.shape == (40, 40, 3) and np.array_equal(crop, img[25:65, 15:55])
    assert np.array_equal(metrics.center_crop(img, 200), img)   # a side shorter than the crop: all of it
    assert metrics.center_crop(img, None) is img
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(img).save(images / "a.png")
    threads = torch.get_num_threads()
    try:
        assert rd.main(["--images", str(images), "--out", str(tmp_path), "--tag", "c", "--no-visual",
                        "--threads", "1", "--codecs", "jpeg444", "--crop", "48"]) == 0
    finally:
        torch.set_num_threads(threads)
    r = json.loads((tmp_path / "rd_c.json").read_text())
    assert r["crop"] == 48 and (r["images"][0]["width"], r["images"][0]["height"]) == (48, 48)
    assert "central 48² crop" in (tmp_path / "rd_c.md").read_text()


def test_grid_steps_sees_a_grid_on_flat_glass_and_nothing_else() -> None:
    """bench/grid_steps.py: flat bright tiles whose colours differ by 3 levels from tile to
    tile show as border steps of ~3 against ~0 inside; the same noisy glass everywhere
    shows the same step across borders as inside."""
    from bench.grid_steps import grid_steps

    rng = np.random.default_rng(0)
    tiles = 220 + 3 * rng.integers(0, 3, (4, 5))
    rgb = np.repeat(np.repeat(tiles, 64, 0), 64, 1)[..., None].repeat(3, 2).astype(np.uint8)
    r = grid_steps(rgb, 64)
    assert r["border_step"] > 1.0 and r["inside_step"] < 0.01 and r["border_n"] > 0
    glass = (225 + rng.normal(0, 1, (256, 320)))[..., None].repeat(3, 2).round().astype(np.uint8)
    r = grid_steps(glass, 64)
    assert abs(r["ratio"] - 1.0) < 0.1
    assert grid_steps(np.zeros((64, 64, 3), np.uint8), 16)["ratio"] is None   # no glass at all
