"""Glass tiles: the plane (kind 3) round trip and its damage, kind 1 read as it always was,
and the blending that keeps the tile grid off the background (issue 28)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from wsicodec.errors import CorruptDataError
from wsicodec.learned.glass import (BLEND_FAR, BLEND_WIDTH, PLANE, UNIFORM_MAX_DEV, UNIFORM_MAX_STD,
                                    _uniform_fit_float, blend_toward_glass, decode_glass, encode_glass,
                                    encode_uniform, plane_edge, plane_values, uniform_colour, uniform_fit)
from wsicodec.learned.tileformat import KIND_PLANE, KIND_UNIFORM, PLANE_TILE_BYTES, VERSION, parse_header


def _ideal(h: int, w: int) -> np.ndarray:
    """Glass with vignetting: a few levels of slope per channel across the tile."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return np.stack([236 + 6 * xx / w - 3 * yy / h, 229 + 2 * yy / h, 241 - 5 * yy / h], -1)


def _glass(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(_ideal(h, w) + rng.normal(0, 0.8, (h, w, 3))), 0, 255).astype(np.uint8)


def _encode(tile: np.ndarray) -> bytes:
    fit = uniform_fit(tile)
    assert fit is not None
    return encode_glass(tile, *fit, VERSION)


def _grey_step(img: np.ndarray, col: int) -> float:
    g = img.astype(np.float64).mean(2)
    return float(np.abs(g[:, col] - g[:, col - 1]).mean())


def test_plane_glass_tile_round_trips_within_its_tolerance() -> None:
    tile = _glass(256, 256)
    specks = [(3, 4), (100, 200), (255, 0)]
    for r, c in specks:
        tile[r, c] = (40, 20, 90)
    data = _encode(tile)
    hd = parse_header(data)
    assert hd.kind == KIND_PLANE
    (n,) = struct.unpack_from("<H", data, PLANE_TILE_BYTES - 2)
    assert n == len(specks) and len(data) == PLANE_TILE_BYTES + 7 * n     # 24 bytes + the specks
    out = decode_glass(data, hd)
    assert np.abs(out.astype(int) - tile).max() <= UNIFORM_MAX_DEV
    assert all((out[r, c] == (40, 20, 90)).all() for r, c in specks)      # kept exactly
    keep = np.ones(tile.shape[:2], bool)
    keep[tuple(np.array(specks).T)] = False
    ideal = _ideal(256, 256)
    plane_err = np.abs(out[keep] - ideal[keep]).mean()
    flat = np.abs(tile[keep].mean(0) - ideal[keep]).mean()    # what a flat colour (kind 1) misses
    assert plane_err < 0.3 and flat > 1.0, (plane_err, flat)
    colour = np.frombuffer(uniform_colour(data, hd), np.uint8)       # the plane's mean: the latent's
    assert np.abs(colour - ideal.reshape(-1, 3).mean(0)).max() <= 0.6


@pytest.mark.parametrize("shape", [(1, 1), (1, 300), (37, 5), (256, 100)])
def test_plane_glass_odd_sizes_and_flat_glass_exact(shape) -> None:
    tile = _glass(*shape, seed=1)
    data = _encode(tile)
    out = decode_glass(data, parse_header(data))
    assert out.shape == tile.shape and np.abs(out.astype(int) - tile).max() <= UNIFORM_MAX_DEV
    flat = np.empty(shape + (3,), np.uint8)
    flat[:] = (240, 238, 245)
    data = _encode(flat)
    assert len(data) == PLANE_TILE_BYTES and (decode_glass(data, parse_header(data)) == flat).all()


def test_plane_is_evaluated_in_integers() -> None:
    """mean/16 + (gx/8)·(2x − (w − 1))/2w + (gy/8)·(2y − (h − 1))/2h, rounded half up,
    without floats: here against exact fractions, ties included."""
    from fractions import Fraction as F
    q = np.array([[3704, 3600, 4080], [48, 0, -127], [-24, 8, 127]])
    h, w = 4, 8
    v = plane_values(q, h, w, np.arange(h)[:, None], np.arange(w)[None, :])
    assert v.dtype == np.uint8 and v.shape == (h, w, 3)
    for y in range(h):
        for x in range(w):
            for c in range(3):
                e = (F(int(q[0, c]), 16) + F(int(q[1, c]), 8) * F(2 * x - (w - 1), 2 * w)
                     + F(int(q[2, c]), 8) * F(2 * y - (h - 1), 2 * h))
                assert v[y, x, c] == min(255, max(0, int(e + F(1, 2)) if e >= 0 else 0)), (y, x, c)
    assert v[0, 0, 0] == 230 and v[3, 0, 2] == 255                # 231.5 − 2.625 + 1.125; clipped


def test_kind_1_tiles_decode_as_always() -> None:
    """A flat glass tile of older containers: its colour and exact outliers, nothing else."""
    tile = np.empty((64, 48, 3), np.uint8)
    tile[:] = (233, 228, 239)
    tile[5, 7] = (1, 2, 3)
    rgb, outliers = uniform_fit(tile)
    data = encode_uniform(tile, rgb, outliers, VERSION)
    assert len(data) == 15 + 7 and data[5] == KIND_UNIFORM
    hd = parse_header(data)
    assert (decode_glass(data, hd) == tile).all()
    assert (decode_glass(data, hd, around={(0, 1): np.zeros((64, 3), np.uint8)}) == tile).all()
    assert uniform_colour(data, hd) == bytes((233, 228, 239))


def _plane_tile() -> bytes:
    tile = _glass(32, 32, seed=2)
    tile[3, 3] = (0, 0, 0)
    return _encode(tile)


def _bad_plane_tiles():
    data = _plane_tile()
    for cut in range(len(data)):                        # every truncation
        yield f"cut at {cut}", data[:cut]
    yield "one byte more", data + b"\x00"
    yield "count too high", data[:22] + struct.pack("<H", 2) + data[24:]
    yield "count too low", data[:22] + struct.pack("<H", 0) + data[24:]
    yield "outlier outside", data[:24] + struct.pack("<HH", 32, 0) + data[28:]
    yield "mean past 255", data[:10] + struct.pack("<H", 255 * 16 + 1) + data[12:]


@pytest.mark.parametrize("what, data", list(_bad_plane_tiles()), ids=lambda v: v if isinstance(v, str) else "")
def test_damaged_plane_tiles_are_corrupt_data(what: str, data: bytes) -> None:
    with pytest.raises(CorruptDataError):
        decode_glass(data, parse_header(data))


def test_blend_draws_only_near_glass_coloured_pixels_near_the_border() -> None:
    px = np.empty((20, 40, 3), np.uint8)
    px[:] = (238, 236, 240)
    px[:, :5] = (120, 60, 140)                           # tissue far from the glass colour
    edge = np.empty((20, 3), np.uint8)
    edge[:] = (242, 240, 244)
    assert blend_toward_glass(px, {}) is px
    out = blend_toward_glass(px, {(0, 1): edge})         # glass on the right
    assert (out[:, -1] == (242, 240, 244)).all()         # the border takes the glass colour
    assert (out[:, :40 - BLEND_WIDTH] == px[:, :40 - BLEND_WIDTH]).all()
    assert (np.diff(out[0, 40 - BLEND_WIDTH:, 0].astype(int)) >= 0).all()     # a ramp
    tissue = px.copy()
    tissue[:] = (238 - BLEND_FAR, 236, 240)
    assert (blend_toward_glass(tissue, {(0, 1): edge}) == tissue).all()       # too far: untouched


# --------------------------------------------------------------- through the decoder
@pytest.fixture(scope="module")
def codec():
    from wsicodec.checkpoint import DEFAULT_WEIGHTS
    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip("shipped weights missing")
    from wsicodec.learned import LearnedCodec
    return LearnedCodec(4)


def test_damaged_plane_tiles_name_the_tile_through_the_codec(codec) -> None:
    data = _plane_tile()
    bad = data[:22] + struct.pack("<H", 5) + data[24:]
    res = codec.decode_tiles([(0, 0)], lambda c, r: bad, (1, 1))
    assert isinstance(res[0], CorruptDataError) and "col=0 row=0" in str(res[0])
    with pytest.raises(CorruptDataError):
        codec.decode(data[:20])


def test_two_plane_tiles_meet_without_a_step(codec) -> None:
    h = 64
    a = _glass(h, 64, seed=3)
    b = np.clip(_glass(h, 64, seed=4).astype(int) + 4, 0, 255).astype(np.uint8)     # 4 levels brighter
    tiles = {(0, 0): _encode(a), (1, 0): _encode(b)}
    alone = np.concatenate([decode_glass(t, parse_header(t)) for t in tiles.values()], 1)
    res = codec.decode_tiles([(0, 0), (1, 0)], lambda c, r: tiles[(c, r)], (2, 1))
    out = np.concatenate(res, 1)
    src = np.concatenate([a, b], 1)
    assert _grey_step(alone, 64) > 1.5 and _grey_step(out, 64) < 0.5, (_grey_step(alone, 64), _grey_step(out, 64))
    assert np.abs(out.astype(int) - src).max() <= UNIFORM_MAX_DEV
    assert (out[:, :64 - BLEND_WIDTH] == alone[:, :64 - BLEND_WIDTH]).all()     # only the border band
    edge = plane_edge(tiles[(1, 0)], parse_header(tiles[(1, 0)]), (0, -1))
    assert edge.shape == (h, 3)


def test_network_tile_beside_glass_meets_a_plane_without_a_step_and_a_flat_tile_as_before(codec, monkeypatch):
    """Tissue on the left of the left tile, glass up to and across the border: beside a plane
    (kind 3) the network tile's glass is drawn to the plane at the border; beside a flat
    (kind 1) tile, as in older containers, its pixels are exactly what g_s gives."""
    from wsicodec.checkpoint import DEFAULT_WEIGHTS  # noqa: F401
    from wsicodec.image import read_stream
    import wsicodec
    import wsicodec.learned.decoder as decoder

    from conftest import DATA, need
    from PIL import Image
    tissue = np.asarray(Image.open(sorted(need(DATA / "he" / "test").glob("*.png"))[0]).convert("RGB"))
    img = np.concatenate([_glass(256, 256, seed=5), _glass(256, 256, seed=6)], 1)
    img[:, :120] = tissue[:256, :120]
    data = wsicodec.encode(img, quality=4)
    tiles = dict(zip([(0, 0), (1, 0)], read_stream(data).tiles))
    assert tiles[(1, 0)][5] == KIND_PLANE and tiles[(0, 0)][5] == 0
    plane = codec.decode_tiles([(0, 0), (1, 0)], lambda c, r: tiles[(c, r)], (2, 1))
    fit = uniform_fit(img[:, 256:])
    flat_tiles = dict(tiles)
    flat_tiles[(1, 0)] = encode_uniform(img[:, 256:], *fit, VERSION)
    calls = []
    real = decoder.blend_toward_glass
    monkeypatch.setattr(decoder, "blend_toward_glass", lambda px, edges: calls.append(edges) or real(px, edges))
    flat = codec.decode_tiles([(0, 0), (1, 0)], lambda c, r: flat_tiles[(c, r)], (2, 1))
    assert calls == [{}]                                  # beside kind 1: nothing to blend
    plane_img, flat_img = np.concatenate(plane, 1), np.concatenate(flat, 1)
    inside = np.s_[:, :256 - BLEND_WIDTH]                # only the latent of the glass colour differs
    assert np.abs(plane_img[inside].astype(int) - flat_img[inside]).max() <= 3
    assert _grey_step(plane_img, 256) < 0.5 * _grey_step(flat_img, 256), (
        _grey_step(plane_img, 256), _grey_step(flat_img, 256))
    err = lambda o: float(((o[:, 200:256].astype(float) - img[:, 200:256]) ** 2).mean())  # noqa: E731
    assert err(plane_img) <= err(flat_img)                # nearer the source, too


# ------------------------------------------------------------------ kind 4: meets JPEG-XL too
def test_kind4_plane_round_trips_as_kind3_and_switches_kind() -> None:
    from wsicodec.learned.tileformat import KIND_PLANE_MIXED, with_kind
    tile = _glass(96, 160, seed=11)
    tile[5, 7] = (30, 60, 90)
    fit = uniform_fit(tile)
    k3, k4 = encode_glass(tile, *fit, VERSION), encode_glass(tile, *fit, VERSION, KIND_PLANE_MIXED)
    assert parse_header(k4).kind == KIND_PLANE_MIXED and len(k4) == len(k3) == PLANE_TILE_BYTES + 7
    assert k4[:5] == k3[:5] and k4[6:] == k3[6:]                  # one layout, the kind byte apart
    assert with_kind(k4, KIND_PLANE) == k3 and with_kind(k3, KIND_PLANE_MIXED) == k4
    assert (decode_glass(k4, parse_header(k4)) == decode_glass(k3, parse_header(k3))).all()
    assert uniform_colour(k4, parse_header(k4)) == uniform_colour(k3, parse_header(k3))
    with pytest.raises(CorruptDataError):
        parse_header(k4[:PLANE_TILE_BYTES - 1])
    with pytest.raises(CorruptDataError):
        decode_glass(k4 + b"\0", parse_header(k4 + b"\0"))
    with pytest.raises(ValueError):
        with_kind(k4, KIND_UNIFORM)


def test_kind4_meets_jpegxl_pixels_and_kind3_ignores_them() -> None:
    """A kind-4 plane is drawn toward a JPEG-XL neighbour's edge (here on its right), by the
    same blend as a network tile toward a plane; kind 3 stays the plane, as it always was."""
    from wsicodec.learned.glass import bare_edge
    from wsicodec.learned.tileformat import KIND_PLANE_MIXED, with_kind
    h, w = 64, 64
    fit_tile = _glass(h, w, seed=12)
    k4 = encode_glass(fit_tile, *uniform_fit(fit_tile), VERSION, KIND_PLANE_MIXED)
    k3 = with_kind(k4, KIND_PLANE)
    right = np.clip(_glass(h, w, seed=13).astype(int) + 8, 0, 255).astype(np.uint8)   # JPEG-XL's glass
    right[: h // 2, :] = (120, 40, 150)                                             # and tissue
    plane = decode_glass(k3, parse_header(k3))
    assert (decode_glass(k3, parse_header(k3), jpegxl={(0, 1): right}) == plane).all()
    met = decode_glass(k4, parse_header(k4), jpegxl={(0, 1): right})
    edge = bare_edge(right, (0, 1), h, w)
    assert (edge == right[:, 0]).all()
    assert (met == blend_toward_glass(plane, {(0, 1): edge})).all()
    joined_before = np.concatenate([plane, right], 1)[h // 2:]
    joined = np.concatenate([met, right], 1)[h // 2:]
    assert _grey_step(joined_before, w) > 5 and _grey_step(joined, w) < 1, (
        _grey_step(joined_before, w), _grey_step(joined, w))
    assert (met[: h // 2] == plane[: h // 2]).all()          # beside tissue: the plane
    assert (met[:, : w - BLEND_WIDTH] == plane[:, : w - BLEND_WIDTH]).all()
    assert bare_edge(right[:, :10], (-1, 0), h, w) is None     # sides that do not match
    assert (decode_glass(k4, parse_header(k4), jpegxl={(-1, 0): right[:, :10]}) == plane).all()


def test_an_auto_container_an_older_release_wrote_reads_as_it_did(old_auto) -> None:
    """``auto`` containers written before kind 4 (a kind-3 plane beside a bare JPEG-XL
    tile), before kind 5 (a kind-0 network tile beside one), which those releases never
    drew together, and before JPEG 2000 tiles had a margin: their level-0 pixels hash as
    those releases read them."""
    import hashlib

    import wsicodec
    from wsicodec.classical import J2K_SIGNATURE
    from wsicodec.container import open_container
    want = old_auto
    with open_container(want["path"]) as c:
        tiles = [data for _, _, data in sorted(c.iter_encoded_tiles(0), key=lambda t: (t[1], t[0]))]
    bare = lambda t: "jpeg2000" if t.startswith(J2K_SIGNATURE) else "jpegxl"  # noqa: E731
    assert [parse_header(t).kind if t[:4] == b"WSLT" else bare(t) for t in tiles] == want["level0_kinds"]
    slide = wsicodec.open_slide(want["path"])
    with slide as s:
        px = np.ascontiguousarray(np.asarray(s.read_region((0, 0), 0, s.dimensions))[..., :3])
    assert list(px.shape) == want["level0_shape"]
    assert hashlib.sha256(px.tobytes()).hexdigest() == want["level0_sha256"]


def _same_fit(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_integer_glass_test_decides_every_tile_as_the_float_definition() -> None:
    """uniform_fit's exact integer way gives _uniform_fit_float's verdict, colour and
    outliers on tiles of every kind near its thresholds: noise around the std limit,
    outliers around their limit, odd sizes, a view into a larger region."""
    rng = np.random.default_rng(7)
    verdicts = [0, 0]
    for _ in range(400):
        h, w = (int(v) for v in rng.integers(1, 160, 2))
        sd = float(rng.choice([0.3, 1.0, 2.5, 3.0, 3.5, 5.0]))
        tile = np.clip(rng.integers(0, 256, 3) + np.rint(rng.normal(0, sd, (h, w, 3))), 0, 255)
        tile = tile.astype(np.uint8)
        k = int(rng.choice([0, 0, rng.integers(1, 500)]))
        if k:
            tile.reshape(-1, 3)[rng.integers(0, h * w, k)] = rng.integers(0, 256, (k, 3))
        want = _uniform_fit_float(tile)
        verdicts[want is None] += 1
        assert _same_fit(uniform_fit(tile), want), (h, w, sd, k)
    assert min(verdicts) > 50          # both verdicts were tried, many times
    region = _glass(300, 300, seed=3)
    region[30:40, 40:50] = 0                        # 100 exact outliers in the view
    view = region[20:276, 30:286]
    assert view.base is not None and _same_fit(uniform_fit(view), _uniform_fit_float(view))
    assert len(uniform_fit(view)[1]) == 100


def test_glass_std_on_its_threshold_is_decided_by_float32_std() -> None:
    """A channel whose exact std is the threshold goes the float32 std's way (here: not
    over it, so glass), as it always did."""
    tile = np.full((64, 64, 3), 200, np.uint8)
    tile[:, ::2, 0] = 200 - int(UNIFORM_MAX_STD)
    tile[:, 1::2, 0] = 200 + int(UNIFORM_MAX_STD)
    want = _uniform_fit_float(tile)
    assert want is not None and _same_fit(uniform_fit(tile), want)
    tile[0, 0, 0] = 200 - int(UNIFORM_MAX_STD) - 1   # a little over: not glass either way
    assert uniform_fit(tile) is None and _uniform_fit_float(tile) is None
