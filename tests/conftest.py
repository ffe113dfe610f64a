"""Shared fixtures: the real slides in ../shared/data (skipped cleanly when absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SLIDES = DATA / "slides"

# name -> path of one file OpenSlide opens
REAL_SLIDES = {
    "svs-jpeg2000": SLIDES / "tcga-cr-7395-01a-01-ts1.svs",
    "svs-jpeg": SLIDES / "cmu_small_region.svs",
    "ndpi": SLIDES / "test3-DAPI-2-387.ndpi",
    "dicom": SLIDES / "dicom-cmu1-small" / "level-0-frames-0-30.dcm",
    "generic-tiff": SLIDES / "small_HE_levels.tiff",
}
BAD_DICOM = SLIDES / "bad" / "nonconforming_small_dicom.dcm"
HE_TEST_PNG = DATA / "he" / "test" / "TCGA-2Z-A9J9-01A-01-TS1.png"


def textured(h: int, w: int, seed: int, lo: int = 40, hi: int = 220) -> np.ndarray:
    """A synthetic (h, w, 3) uint8 texture: 4 px blocks of random colours in [lo, hi) with
    Gaussian noise (sigma 6), for tests that need pixels with detail but no data files."""
    rng = np.random.default_rng(seed)
    base = rng.integers(lo, hi, size=(h // 4 + 2, w // 4 + 2, 3)).astype(np.float64)
    up = np.kron(base, np.ones((4, 4, 1)))[:h, :w]
    return np.clip(up + rng.normal(0, 6, size=up.shape), 0, 255).astype(np.uint8)


def running_server(paths, **settings):
    """A context manager: ``wsicodec.server`` serving ``paths`` on 127.0.0.1 at a free port
    in a thread (``settings``: :class:`~wsicodec.server.ServerSettings` fields), shut down
    on exit."""
    import contextlib

    from wsicodec.server import ServerSettings, make_server, serve_in_thread

    @contextlib.contextmanager
    def run():
        srv = make_server(list(paths), port=0, settings=ServerSettings(**settings))
        serve_in_thread(srv)
        try:
            yield srv
        finally:
            srv.shutdown()
            srv.server_close()
    return run()


@pytest.fixture(scope="session")
def tissue() -> np.ndarray:
    """The first he/test image (:data:`HE_TEST_PNG`, 1000² H&E) as (H, W, 3) uint8 RGB, for
    the learned codec's tests; skips where the shared data is absent."""
    from PIL import Image
    return np.asarray(Image.open(need(HE_TEST_PNG)).convert("RGB"))


@pytest.fixture
def lpips_trunk() -> Path:
    """The AlexNet trunk ``bench/rd.py`` scores LPIPS with; skips the test where it is absent
    (``../shared/weights`` not next to the repository and ``$WSICODEC_WEIGHTS`` unset)."""
    import sys
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from bench import metrics
    try:
        return metrics.find_alexnet_weights()
    except FileNotFoundError as exc:
        pytest.skip(f"LPIPS trunk weights absent: {exc}")


def need(path: Path) -> Path:
    """Skip the calling test when a shared data file is missing."""
    if not path.exists():
        pytest.skip(f"shared test data not found: {path} (expected ../shared/data next to the "
                    "repository)")
    return path


@pytest.fixture
def odd_image() -> np.ndarray:
    """A 219 (wide) x 301 (high) RGB image with structure in every channel, so edge tiles
    and 2x reductions are exercised with sizes that do not divide."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:301, 0:219]
    img = np.stack([(x * 3 + y) % 256, (y * 2) % 256, (x ^ y) % 256], axis=-1)
    img = img + rng.integers(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


FIXTURES = REPO / "tests" / "data"


def shipped_weights_file(model_id: str, folder: Path) -> Path | None:
    """The file of a model wsicodec once shipped (``weights/history.json``), written into
    ``folder`` from the git history, or None where that history is not here (a source
    archive without ``.git``).  This is how a user gets old weights back: the history's
    ``git show COMMIT:PATH``.  A file whose sha256 is not the model id fails the test:
    history.json names the wrong commit."""
    import hashlib
    import subprocess

    from wsicodec.checkpoint import shipped_history
    entry = next((m for m in shipped_history() if m["model_id"] == model_id), None)
    if entry is None:
        return None
    out = folder / f"{model_id[:16]}.pt"
    if not out.exists():
        try:
            blob = subprocess.run(["git", "-C", str(REPO), "show", f"{entry['git_commit']}:{entry['path']}"],
                                  capture_output=True, check=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        assert hashlib.sha256(blob).hexdigest() == model_id, \
            f"history.json: {entry['git_commit']}:{entry['path']} is not model {model_id[:8]}"
        folder.mkdir(parents=True, exist_ok=True)
        out.write_bytes(blob)
    return out


def weights_that_decode(model_id: str, what: str, tmp_path_factory, monkeypatch):
    """The loaded model that decodes data made with ``model_id``: the shipped file while it
    still holds that decoder; after a retrained network has shipped, the old file from the
    git history (as ``weights/history.json`` tells users to do), with ``$WSICODEC_MODEL_DIR``
    naming its folder so containers find it by id.  Skips only where neither is here."""
    from wsicodec.checkpoint import load_model
    model = load_model()
    if not model.decodes(model_id):
        old = shipped_weights_file(model_id, tmp_path_factory.getbasetemp() / "old-weights")
        if old is None:
            pytest.skip(f"the weights {what} were made with ({model_id[:8]}) "
                        "are neither shipped nor in this checkout's git history")
        monkeypatch.setenv("WSICODEC_MODEL_DIR", str(old.parent))
        model = load_model(old)
    return model


@pytest.fixture
def format2(tmp_path_factory, monkeypatch) -> dict:
    """tests/data/format2_q4.json: which weights (and κ) the format-2 fixtures beside it were
    written with, plus ``weights``: a file that decodes them (:func:`weights_that_decode`).
    ``same_g_s``: whether that file's g_s is the one that decoded them (``export
    --synthesis`` keeps the symbols but not the pixels)."""
    import json

    made = json.loads((FIXTURES / "format2_q4.json").read_text())
    model = weights_that_decode(made["model_id"], "the format-2 fixtures", tmp_path_factory, monkeypatch)
    return {**made, "weights": model.path, "same_g_s": g_s_digest(model.model) == made["g_s_sha256"]}


@pytest.fixture(params=["auto_kind3", "auto_kind0", "auto_jpeg2000"])
def old_auto(request, tmp_path_factory, monkeypatch) -> dict:
    """An ``auto`` container an older release wrote (tests/data/NAME.zarr.zip) and NAME.json:
    how it was made and the sha256 of the level-0 pixels that release read, plus ``path``;
    its weights findable by id (:func:`weights_that_decode`).  ``auto_kind3``: a kind-3
    plane beside a bare JPEG-XL tile, written before kind 4; ``auto_kind0``: a kind-0
    network tile beside one, written before kind 5; ``auto_jpeg2000``: network tiles beside
    JPEG 2000 tiles of the tile's own size, written before those had a margin."""
    import json

    made = json.loads((FIXTURES / f"{request.param}.json").read_text())
    weights_that_decode(made["model_id"], f"{request.param}.zarr.zip", tmp_path_factory, monkeypatch)
    return {**made, "path": FIXTURES / f"{request.param}.zarr.zip"}


def g_s_digest(model) -> str:
    """sha256 over g_s's tensors (names and float32 bytes, in name order)."""
    import hashlib

    h = hashlib.sha256()
    state = model.g_s.state_dict()
    for k in sorted(state):
        h.update(f"g_s.{k}".encode())
        h.update(state[k].detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def other_weights(path: Path, note: str) -> Path:
    """A copy of the shipped weights with other provenance: same network, another model id."""
    import torch

    from wsicodec.checkpoint import DEFAULT_WEIGHTS
    path.parent.mkdir(parents=True, exist_ok=True)
    state = torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=False)
    state["provenance"] = {"note": note}
    torch.save(state, path)
    return path


def forge_digests(container_dir: Path) -> None:
    """Recompute every digest of a format-3 *directory* container after a test changed
    its tiles or metadata, as someone would who edits a container on purpose: what a
    reader can still find then is only what decoding finds (checksums, geometry)."""
    import json
    import zlib

    import zarr

    from wsicodec.integrity import blob_digest, level_digest, metadata_digest, tile_digest
    doc_path = container_dir / "zarr.json"
    doc = json.loads(doc_path.read_text())
    attrs = doc["attributes"]["wsicodec"]
    cid = attrs["container_id"]
    g = zarr.open_group(str(container_dir), mode="r+")
    for level, entry in enumerate(attrs["levels"]):
        tiles = g[f"levels/{level}/tiles"][...]
        digest = np.zeros(tiles.shape + (16,), np.uint8)
        crc = np.zeros(tiles.shape, np.uint32)
        for (row, col), data in np.ndenumerate(tiles):
            digest[row, col] = np.frombuffer(tile_digest(cid, level, col, row, bytes(data)), np.uint8)
            crc[row, col] = zlib.crc32(bytes(data))
        g[f"levels/{level}/digest"][...] = digest
        g[f"levels/{level}/crc32"][...] = crc
        entry["tiles_digest"] = level_digest(cid, level, digest)
    attrs["associated_digests"] = {
        name: blob_digest(cid, name, bytes(np.asarray(g[f"associated/{name}"][...], np.uint8)))
        for name in attrs["associated_images"]}
    attrs["metadata_digest"] = metadata_digest(attrs)
    doc_path.write_text(json.dumps(doc))
