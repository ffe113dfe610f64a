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
