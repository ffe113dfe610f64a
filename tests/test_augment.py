"""train/augment.py: the augmented crops of `train.py --augment` (seconds, no network)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "train"))
DATA = REPO.parent / "shared" / "data"

import augment  # noqa: E402


def tissue(h: int = 96, w: int = 96, seed: int = 0) -> np.ndarray:
    """A smooth, H&E-coloured synthetic image (uint8): no shared data needed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / 12.0
    base = np.array([200.0, 120.0, 190.0])
    wave = np.stack([np.sin(yy + c) * np.cos(xx * 0.7 - c) for c in (0.0, 1.0, 2.0)], -1)
    return np.clip(base + 40 * wave + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0 ** 2 / np.mean((a.astype(np.float64) - b) ** 2)))


def test_area_downsample_is_the_exact_block_mean_rounded_half_up():
    a = np.random.default_rng(1).integers(0, 256, (37, 42, 3), dtype=np.uint8)
    for f in (1, 2, 4):
        d = augment.area_downsample(a, f)
        assert d.dtype == np.uint8 and d.shape == (37 // f, 42 // f, 3)
        for y, x, c in [(0, 0, 0), (3, 5, 1), (d.shape[0] - 1, d.shape[1] - 1, 2)]:
            block = a[y * f:(y + 1) * f, x * f:(x + 1) * f, c].astype(np.float64)
            assert d[y, x, c] == np.floor(block.mean() + 0.5)
    # a constant image stays constant; halves round up (1 and 2 average to 1.5 -> 2)
    assert (augment.area_downsample(np.full((8, 8, 3), 77, np.uint8), 4) == 77).all()
    two = np.array([[1, 2], [1, 2]], np.uint8)[..., None]
    assert augment.area_downsample(two, 2)[0, 0, 0] == 2


def test_flips_and_rotations_are_exact_permutations():
    c = np.arange(16 * 16 * 3, dtype=np.int64).reshape(16, 16, 3) % 251
    c = c.astype(np.uint8)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(64):
        out = augment.flip_rotate(c, rng)
        assert out.shape == c.shape and out.dtype == c.dtype and out.flags["C_CONTIGUOUS"]
        # the same multiset of pixels, each an exact copy, and one of the square's eight symmetries
        assert sorted(map(tuple, out.reshape(-1, 3))) == sorted(map(tuple, c.reshape(-1, 3)))
        sym = [np.rot90(m, k) for m in (c, c[:, ::-1]) for k in range(4)]
        idx = [i for i, s in enumerate(sym) if np.array_equal(s, out)]
        assert len(idx) == 1
        seen.add(idx[0])
    assert seen == set(range(8))


def test_hed_jitter_of_zero_magnitude_is_the_identity_and_small_magnitudes_move_a_little():
    c = tissue()
    rng = np.random.default_rng(0)
    assert np.array_equal(augment.hed_jitter(c, rng, 0.0, 0.0), c)
    # the conversion is skimage's (no clip at 0): equal to rgb2hed wherever rgb2hed does not clip
    from skimage.color import hed_from_rgb, rgb2hed, rgb_from_hed
    assert np.allclose(augment.RGB_FROM_HED, rgb_from_hed) and np.allclose(augment.HED_FROM_RGB,
                                                                           hed_from_rgb)
    ours, theirs = augment.rgb_to_hed(c), rgb2hed(c)
    unclipped = (ours > 0).all(-1)
    assert unclipped.any() and np.allclose(ours[unclipped], theirs[unclipped], atol=1e-12)
    out = augment.hed_jitter(c, rng, 0.1, 0.01)
    assert out.shape == c.shape and out.dtype == np.uint8
    d = np.abs(out.astype(int) - c).mean()
    assert 0.2 < d < 30


def test_jpeg_and_jpeg2000_recoding_change_pixels_a_little():
    c = tissue(128, 128)
    for q in (30, 95):
        for phase in ((0, 0), (5, 11)):
            out = augment.recode_jpeg(c, q, phase)
            assert out.shape == c.shape and out.dtype == np.uint8
            assert 25.0 < psnr(c, out) < 55.0 and not np.array_equal(out, c)
    assert psnr(c, augment.recode_jpeg(c, 95)) > psnr(c, augment.recode_jpeg(c, 30))
    for db in (30.0, 50.0):
        out = augment.recode_j2k(c, db)
        assert out.shape == c.shape and out.dtype == np.uint8
        assert db - 6 < psnr(c, out) < db + 8
    # the grid phase matters: the same quality at another phase gives other pixels
    assert not np.array_equal(augment.recode_jpeg(c, 50, (0, 0)), augment.recode_jpeg(c, 50, (3, 7)))


def test_pillow_recodes_as_imagecodecs_did():
    """The re-codes run through Pillow, which a lent GPU machine has, and are the CPU runs'
    (imagecodecs until 2026-12-07): JPEG pixels identical at every quality and phase, JPEG 2000
    within a level at the same target."""
    import imagecodecs
    c = tissue(256, 256, 4)
    for q in (30, 61, 95):
        for phase in ((0, 0), (5, 11)):
            dy, dx = phase
            pb, pr = (-(256 + dy)) % 16, (-(256 + dx)) % 16
            padded = np.pad(c, ((dy, pb), (dx, pr), (0, 0)), mode="symmetric")
            old = imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(padded, level=q, subsampling="420"))
            assert np.array_equal(augment.recode_jpeg(c, q, phase), old[dy:dy + 256, dx:dx + 256]), (q, phase)
    for db in (30.0, 40.0, 50.0):
        old = imagecodecs.jpeg2k_decode(imagecodecs.jpeg2k_encode(c, level=db))
        new = augment.recode_j2k(c, db)
        assert new.shape == old.shape and np.abs(new.astype(int) - old).max() <= 1, db
        assert abs(psnr(c, new) - psnr(c, old)) < 0.05


def test_a_batch_is_the_same_on_worker_processes_and_resumes_from_the_generator():
    images = [tissue(300, 280, 1), tissue(520, 540, 2)]
    spec = augment.AugmentSpec(stain=0.5, jpeg=0.4, j2k=0.4)

    def draw(workers: int):
        s = augment.AugmentedSampler(images, 64, np.random.default_rng(5), spec, workers=workers)
        try:
            return s.batch_uint8(12), s.batch_uint8(12), s
        finally:
            s.close()

    a1, a2, here = draw(0)
    b1, b2, two = draw(2)
    assert np.array_equal(a1, b1) and np.array_equal(a2, b2) and not np.array_equal(a1, a2)
    assert here.counts == two.counts and here.counts["jpeg"] and here.counts["j2k"], here.counts
    # the generator's state after a batch is where the next batch starts (what train.py checkpoints)
    s = augment.AugmentedSampler(images, 64, np.random.default_rng(5), spec)
    s.batch_uint8(12)
    resumed = augment.AugmentedSampler(images, 64, np.random.default_rng(99), spec)
    resumed.rng.bit_generator.state = s.rng.bit_generator.state
    assert np.array_equal(resumed.batch_uint8(12), a2)


def test_sampler_keeps_shapes_and_dtypes_and_is_deterministic_by_seed():
    images = [tissue(300, 280, 1), tissue(520, 540, 2), tissue(130, 140, 3)]
    spec = augment.AugmentSpec(stain=0.5, jpeg=0.3, j2k=0.3)

    def draw(seed: int):
        s = augment.AugmentedSampler(images, 64, np.random.default_rng(seed), spec)
        return s.batch(24), s

    (a, sa), (b, _), (c, _) = draw(7), draw(7), draw(8)
    assert a.shape == (24, 3, 64, 64) and str(a.dtype) == "torch.float32"
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert (a == b).all() and not (a == c).all()
    # every piece was used at least once in 24 crops
    assert all(sa.counts[k] > 0 for k in ("1x", "2x", "4x", "stain", "jpeg", "j2k")), sa.counts
    # a uint8 crop keeps its dtype
    s = augment.AugmentedSampler(images, 64, np.random.default_rng(0), spec)
    x = s.sample()
    assert x.shape == (64, 64, 3) and x.dtype == np.uint8


def test_sampler_scales_take_only_images_large_enough_padding_at_most_max_pad():
    images = [tissue(250, 250, 1), tissue(200, 200, 2)]
    s = augment.AugmentedSampler(images, 64, np.random.default_rng(0),
                                 augment.AugmentSpec(scales={4: 1.0}, stain=0, jpeg=0, j2k=0))
    # 250 / 4 = 62 (2 short of 64: padded); 200 / 4 = 50 (14 short: not used)
    assert [a.shape[0] for a in s.levels[4]] == [62]
    assert s.sample().shape == (64, 64, 3)
    with pytest.raises(SystemExit):
        augment.AugmentedSampler([tissue(40, 40)], 64, np.random.default_rng(0))


def test_parse_spec_reads_overrides_and_refuses_nonsense():
    assert augment.parse_spec("on") == augment.AugmentSpec()
    s = augment.parse_spec("scale=1:.5/2:.5,stain=0,jpeg=.4,jpeg_q=50-90,j2k=.1,j2k_db=35-45,max_pad=4")
    assert s.scales == {1: 0.5, 2: 0.5} and s.stain == 0 and s.jpeg == 0.4
    assert s.jpeg_q == (50, 90) and s.j2k_db == (35.0, 45.0) and s.max_pad == 4
    for bad in ("jpeg=1.5", "colour=1", "jpeg=.7,j2k=.7", "stain"):
        with pytest.raises(ValueError):
            augment.parse_spec(bad)


def test_evaluation_folders_are_refused_before_anything_is_read(tmp_path, monkeypatch, capsys):
    import train as train_script

    from PIL import Image
    test_dir = tmp_path / "he" / "test"
    slides = tmp_path / "slides" / "x"
    ok = tmp_path / "he" / "train"
    for d in (test_dir, slides, ok):
        d.mkdir(parents=True)
        Image.fromarray(tissue(64, 64)).save(d / "a.png")
    sneaky = tmp_path / "sneaky"
    sneaky.mkdir()
    (sneaky / "a.png").symlink_to(test_dir / "a.png")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    for bad in (test_dir, slides, sneaky, tmp_path / "he" / "test" / ".." / "test"):
        with pytest.raises(SystemExit, match="evaluation data"):
            train_script.load_images([str(ok), str(bad)], 32)
        with pytest.raises(SystemExit, match="evaluation data"):
            train_script.main(["--data", str(ok), str(bad), "--out", str(tmp_path / "run"), "--steps", "1"])
    assert opened == []
    assert not (tmp_path / "run").exists()      # refused before the output folder was made
    assert len(train_script.load_images([str(ok)], 32)) == 1


@pytest.mark.skipif(not (DATA / "he" / "train").is_dir(), reason="shared data not found")
def test_training_data_reads_no_evaluation_file(monkeypatch):
    """The shared training folders pass the guard and every file opened lies outside he/test and slides/."""
    import train as train_script

    from PIL import Image
    opened = []
    real_open = Image.open

    def spy(p, *a, **k):  # noqa: ANN001, ANN202 - files only: re-coded crops are opened from memory
        if isinstance(p, (str, Path)):
            opened.append(Path(p))
        return real_open(p, *a, **k)
    monkeypatch.setattr(Image, "open", spy)
    tiles = DATA / "he" / "tiles"
    images = train_script.load_images([str(tiles)], 256)
    s = augment.AugmentedSampler(images, 256, np.random.default_rng(0))
    assert s.batch(2).shape == (2, 3, 256, 256)
    assert opened and not any(augment.is_evaluation_path(p) for p in opened)
    assert augment.is_evaluation_path(DATA / "he" / "test") and augment.is_evaluation_path(DATA / "slides")
    assert not augment.is_evaluation_path(DATA / "he" / "train")
