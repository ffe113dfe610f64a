"""The viewer page in headless Chromium: OpenSeadragon loads DeepZoom tiles from
``wsicodec serve`` and the screenshot shows tissue.

Needs the Debian packages chromium (+ chromium-driver) and OpenSeadragon from the npm
registry (``npm ci --prefix wsicodec/static``); ``.ci/run`` installs both.  Skips with
the reason when either is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REAL_SLIDES, need
from wsicodec.codecs import get_codec
from wsicodec.pipeline import compress
from wsicodec.server import OPENSEADRAGON_DIR, make_server, serve_in_thread


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium not found (apt-get install chromium chromium-driver; "
                ".ci/run does it)")


def _tissue_fraction(rgb: np.ndarray) -> float:
    """Share of pixels stained like H&E: pink/purple, clearly not white, grey or black."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    stained = (r - g > 20) & (b - g > 0) & (g < 230)
    return float(stained.mean())


def test_viewer_shows_tissue(tmp_path: Path) -> None:
    chromium = _chromium()
    if not (OPENSEADRAGON_DIR / "openseadragon.min.js").is_file():
        pytest.skip(f"OpenSeadragon not installed at {OPENSEADRAGON_DIR} (npm ci --prefix "
                    "wsicodec/static; .ci/run does it)")
    container = tmp_path / "cmu.zarr.zip"
    compress(need(REAL_SLIDES["svs-jpeg"]), container, get_codec("jpeg", 90), workers=2)
    server = make_server([container], port=0)
    serve_in_thread(server)
    shot = tmp_path / "viewer.png"

    def run(*what: str) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as profile:
            cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                   "--no-first-run", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                   f"--user-data-dir={profile}", *what,
                   "--window-size=800,600", "--hide-scrollbars",
                   "--virtual-time-budget=15000", server.url + "?slide=cmu"]
            return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                                  env={**os.environ, "HOME": profile})

    try:
        proc = run(f"--screenshot={shot}")
        dom = run("--dump-dom").stdout
    finally:
        server.shutdown()
        server.server_close()
    for name, ext in (("label", "png"), ("macro", "jpeg"), ("thumbnail", "jpeg")):   # header links
        assert f'href="/slides/cmu/associated/{name}.{ext}"' in dom, dom[-3000:]
    assert shot.is_file(), f"no screenshot; chromium said: {proc.stderr[-2000:]}"
    rgb = np.asarray(Image.open(shot).convert("RGB"))
    assert rgb.shape[:2] == (600, 800)
    # below the 32-px header bar: the slide, fitted to the window
    frac = _tissue_fraction(rgb[40:])
    assert frac > 0.03, f"screenshot shows no tissue ({frac:.2%} stained pixels): {shot}"


def _flat_fidelity_container(path: Path) -> None:
    """A 512x384 mid-grey slide in 128-px tiles, a fidelity map: the left half of each
    row JPEG-XL lossless (exact), the right half JPEG-XL d1 (flat grey: a high PSNR)."""
    import imagecodecs

    from wsicodec.fidelity import TileRecord
    from wsicodec.metadata import ContainerMetadata
    from wsicodec.tiling.geometry import LevelInfo
    from wsicodec.writer import ContainerWriter

    tile = np.full((128, 128, 3), 128, np.uint8)
    meta = ContainerMetadata(codec=get_codec("jpegxl").to_dict(), tile_size=128,
                             levels=(LevelInfo(512, 384, 1.0),),
                             tile_kinds=("jpegxl", "jpegxl-lossless"))
    lossless = bytes(imagecodecs.jpegxl_encode(tile, lossless=True))
    lossy = get_codec("jpegxl").encode(tile)
    with ContainerWriter(path, meta) as w:
        for row in range(3):
            w.write_row(0, row, [lossless, lossless, lossy, lossy],
                        [TileRecord("jpegxl-lossless", float("inf"))] * 2
                        + [TileRecord("jpegxl", 50.0)] * 2)
        w.commit()


def test_fidelity_overlay_colours_tiles(tmp_path: Path) -> None:
    """?fidelity=1 turns the overlay on: exact tiles (left half) tinted blue, the
    others (50 dB) green, on a grey slide; without it the slide stays grey."""
    chromium = _chromium()
    if not (OPENSEADRAGON_DIR / "openseadragon.min.js").is_file():
        pytest.skip(f"OpenSeadragon not installed at {OPENSEADRAGON_DIR} (npm ci --prefix "
                    "wsicodec/static; .ci/run does it)")
    container = tmp_path / "flat.zarr"
    _flat_fidelity_container(container)
    server = make_server([container], port=0)
    serve_in_thread(server)

    def shot(query: str, name: str) -> tuple[np.ndarray, str]:
        out = tmp_path / name
        with tempfile.TemporaryDirectory() as profile:
            common = [chromium, "--headless", "--no-sandbox", "--disable-gpu",
                      "--no-first-run", "--disable-background-networking",
                      "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                      "--window-size=800,600", "--hide-scrollbars",
                      "--virtual-time-budget=15000"]
            env = {**os.environ, "HOME": profile}
            subprocess.run(common + [f"--screenshot={out}", server.url + query],
                           capture_output=True, timeout=120, env=env)
            dom = subprocess.run(common + ["--dump-dom", server.url + query],
                                 capture_output=True, text=True, timeout=120, env=env).stdout
        assert out.is_file(), f"no screenshot for {query}"
        return np.asarray(Image.open(out).convert("RGB"))[40:].astype(int), dom

    try:
        on, dom = shot("?slide=flat&fidelity=1", "on.png")
        off, _ = shot("?slide=flat", "off.png")
    finally:
        server.shutdown()
        server.server_close()
    assert "kinds: jpegxl, jpegxl-lossless" in dom, dom[-3000:]

    def tints(rgb: np.ndarray) -> tuple[float, float]:
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        return float(((b - r > 30) & (b - g > 10)).mean()), float(((g - r > 30) & (g - b > 30)).mean())

    blue, green = tints(on)
    assert blue > 0.05 and green > 0.05, (blue, green)
    # the exact (blue) tiles are the slide's left half
    r, g, b = on[..., 0], on[..., 1], on[..., 2]
    bcols = np.flatnonzero(((b - r > 30) & (b - g > 10)).any(axis=0))
    gcols = np.flatnonzero(((g - r > 30) & (g - b > 30)).any(axis=0))
    assert bcols.max() < gcols.min() + 3, (bcols.max(), gcols.min())
    assert tints(off) == (0.0, 0.0)
