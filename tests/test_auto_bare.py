"""The ``auto`` codec's tiles meeting their bare neighbours (JPEG 2000 or JPEG-XL): kind-4
glass and kind-5 network tiles drawn toward the bare tile's edge where that keeps the floor,
and every reader path showing the same pixels.  The grid helpers are test_auto's."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_flush_denormal(True)

from test_auto import T, _check_floor_and_records, _encode, he_crop  # noqa: E402

from wsicodec.codecs import get_codec  # noqa: E402
from wsicodec.learned import choice  # noqa: E402
from wsicodec.learned.tileformat import KIND_NETWORK, KIND_NETWORK_MIXED, parse_header, with_kind  # noqa: E402


@pytest.fixture(scope="module")
def he_img(tissue):
    return he_crop(tissue)


# ------------------------------------------------------------------ glass beside a bare tile (kind 4)
def _glass_then_tissue(he_img: np.ndarray, offset: int) -> np.ndarray:
    """One row: a glass tile, then a tissue tile whose 6 columns at the border are the
    glass ``offset`` levels brighter (JPEG-XL's glass meeting the plane)."""
    rng = np.random.default_rng(7)
    glass = np.clip(np.rint(np.array([236.0, 230.0, 240.0]) + rng.normal(0, 0.8, (T, T, 3))), 0, 255)
    tissue = he_img[:T, :T].astype(np.float64)
    tissue[:, :6] = np.clip(glass[:, -6:] + offset, 0, 255)
    return np.ascontiguousarray(np.concatenate([glass, tissue], 1).astype(np.uint8))


#: the bare codecs a tile beside glass or a network tile may be coded with, and the
#: ``jpeg2000`` setting that makes the auto codec choose each in these tests
BARE = [("jpeg2000", True), ("jpegxl", False)]
SIGNATURES = {"jpeg2000": b"\xff\x4f\xff\x51", "jpegxl": b"\xff\x0a"}


def _allow_jpeg2000_edges(monkeypatch, j2k: bool) -> None:
    """These fixtures put glass along the bare tile's edge, where JPEG 2000's glass hold
    (:mod:`wsicodec.learned.j2kfit`) hands the tile to JPEG-XL, and he/test tissue, whose
    JPEG 2000 borders its ring hold may refuse; both off, so that the bare tile is JPEG 2000
    in the JPEG 2000 cases (the holds are tested in test_auto_jpeg2000)."""
    if j2k:
        from wsicodec.learned import j2kfit
        monkeypatch.setattr(j2kfit, "EDGE_TOLERANCE", math.inf)
        monkeypatch.setattr(j2kfit, "RING_TOLERANCE", math.inf)


@pytest.mark.parametrize("bare, j2k", BARE)
@pytest.mark.parametrize("offset, met", [(0, True), (14, False)])
def test_glass_meets_its_bare_neighbour_only_where_it_keeps_the_floor(he_img, monkeypatch, offset, met, bare, j2k):
    """Kind-4 glass is drawn toward its bare neighbour's edge (JPEG 2000 or JPEG-XL); where
    that would take it under the floor (the neighbour's glass 14 levels off the plane, a
    44 dB floor) it is written as kind 3, which readers leave as the plane.  Every tile's
    PSNR as readers show it reaches the floor and is the one recorded; the bare tile is its
    codestream's pixels."""
    from wsicodec.learned.glass import decode_glass
    from wsicodec.learned.tileformat import KIND_PLANE, KIND_PLANE_MIXED
    floor = 44.0
    _allow_jpeg2000_edges(monkeypatch, j2k)
    img = _glass_then_tissue(he_img, offset)
    codec = get_codec("auto", 4, min_psnr=floor, jpeg2000=j2k)
    out = _encode(codec, img)
    (k0, p0), (k1, _) = out[0].records
    assert k0 == "glass" and k1.startswith(bare) and out[0].tiles[1].startswith(SIGNATURES[bare]), out[0].records
    glass = out[0].tiles[0]
    assert parse_header(glass).kind == (KIND_PLANE_MIXED if met else KIND_PLANE)
    _check_floor_and_records(codec, img, out, floor, 1e-9)
    got = codec.decode_tiles([(0, 0), (1, 0)], lambda c, r: out[r].tiles[c], (2, 1))
    assert (got[1] == codec.decoder.bare_pixels(out[0].tiles[1], None, "t")).all()
    plane = decode_glass(glass, parse_header(glass))
    assert (got[0] == plane).all() != met              # drawn only where kind 4 was kept
    if met:
        def step(x: np.ndarray) -> float:           # grey step across the border
            g = x.astype(float).mean(2)
            return float(np.abs(g[:, T] - g[:, T - 1]).mean())
        assert step(np.concatenate(got, 1)) < 0.5 * step(np.concatenate([plane, got[1]], 1))


# ------------------------------------------------------------------ network beside a bare tile (kind 5)
def _network_then_jpegxl(he_img: np.ndarray, band: int = 32) -> np.ndarray:
    """One row: a tissue tile (the network's), then noise no network codes (JPEG-XL's),
    under a flat bright band ``band`` rows high across both: where a viewer sees the grid."""
    rng = np.random.default_rng(9)
    glass = np.clip(np.rint(np.array([236.0, 230.0, 240.0]) + rng.normal(0, 0.8, (band, 2 * T, 3))), 0, 255)
    img = np.concatenate([he_img[:T, :T].astype(np.float64),
                          rng.integers(0, 256, (T, T, 3)).astype(np.float64)], 1)
    img[:band] = glass
    return np.ascontiguousarray(img.astype(np.uint8))


def _band_step(tiles: list[np.ndarray], band: int = 32) -> float:
    """Mean grey step across the border of two tiles side by side, in the band."""
    g = np.concatenate(tiles, 1)[:band].astype(float).mean(2)
    return float(np.abs(g[:, T] - g[:, T - 1]).mean())


@pytest.mark.parametrize("bare, j2k", BARE)
@pytest.mark.parametrize("met", [True, False])
def test_network_tile_meets_its_bare_neighbour_only_where_that_costs_no_fidelity(he_img, monkeypatch, met,
                                                                                   bare, j2k):
    """A network tile beside a bare tile (JPEG 2000 or JPEG-XL) is written as kind 5, which
    readers draw toward the bare tile's edge as they draw it toward a plane's; where what that shows
    would be further from the source than the undrawn tile (here: the encoder's drawn
    pixels made black) it is written as kind 0, which readers leave as g_s made it.  Every tile's PSNR as readers show it
    reaches the floor and is the one recorded; the bare tile is its codestream's pixels."""
    from wsicodec.learned.glass import bare_edge, blend_toward_glass
    if not met:
        marked: set[int] = set()
        real_edges, real_blend = choice.bare_edges, choice.blend_toward_glass

        def edges(*a, **k):
            out = real_edges(*a, **k)
            marked.update(id(v) for v in out.values())
            return out

        def blend(px, e):
            return np.zeros_like(px) if any(id(v) in marked for v in e.values()) else real_blend(px, e)
        monkeypatch.setattr(choice, "bare_edges", edges)
        monkeypatch.setattr(choice, "blend_toward_glass", blend)
    floor = 27.0
    _allow_jpeg2000_edges(monkeypatch, j2k)
    img = _network_then_jpegxl(he_img)
    codec = get_codec("auto", 3, min_psnr=floor, jpeg2000=j2k)
    out = _encode(codec, img)
    (k0, _), (k1, _) = out[0].records
    assert k0 == "learned" and k1 == bare and out[0].tiles[1].startswith(SIGNATURES[bare]), out[0].records
    net, jxl = out[0].tiles
    assert parse_header(net).kind == (KIND_NETWORK_MIXED if met else KIND_NETWORK)
    _check_floor_and_records(codec, img, out, floor, 1e-9)
    got = codec.decode_tiles([(0, 0), (1, 0)], lambda c, r: out[r].tiles[c], (2, 1))
    assert (got[1] == codec.decoder.bare_pixels(jxl, None, "t")).all()
    plain = [with_kind(net, KIND_NETWORK), jxl]
    undrawn = codec.decode_tiles([(0, 0)], lambda c, r: plain[c], (2, 1))[0]
    if met:
        assert (got[0] == blend_toward_glass(undrawn, {(0, 1): bare_edge(got[1], (0, 1), T, T)})).all()
        assert _band_step(got) < 0.6 * _band_step([undrawn, got[1]]), (_band_step(got), _band_step([undrawn, got[1]]))
        assert (got[0][T // 2:, : T - 16] == undrawn[T // 2:, : T - 16]).all()   # tissue: as g_s made it
    else:
        assert (got[0] == undrawn).all()


@pytest.mark.parametrize("bare, j2k", BARE)
@pytest.mark.parametrize("case", ["glass", "network"])
def test_every_reader_path_shows_the_same_met_tiles(he_img, tmp_path, monkeypatch, case, bare, j2k):
    """A container with kind-4 glass or a kind-5 network tile beside a bare tile (JPEG
    2000 or JPEG-XL): open_slide's
    read_region, tiles decoded one call each (each call fetching its own neighbours) and
    all in one call, and an image stream of the same tiles agree to the pixel."""
    import wsicodec
    from wsicodec.container import open_container
    from wsicodec.image import read_stream
    from wsicodec.pipeline import compress_source
    from wsicodec.tiling.sources import ArraySource
    _allow_jpeg2000_edges(monkeypatch, j2k)
    img, quality, floor, kind = ((_glass_then_tissue(he_img, 0), 4, 44.0, 4) if case == "glass"
                                 else (_network_then_jpegxl(he_img), 3, 27.0, KIND_NETWORK_MIXED))
    codec = get_codec("auto", quality, min_psnr=floor, jpeg2000=j2k)
    box = tmp_path / "met.zarr.zip"
    compress_source(ArraySource(img), box, codec, tile_size=T)
    with open_container(box) as c:
        tiles = {(col, r): data for col, r, data in c.iter_encoded_tiles(0)}
    assert parse_header(tiles[(0, 0)]).kind == kind and tiles[(1, 0)].startswith(SIGNATURES[bare])
    keys = sorted(tiles)
    together = codec.decode_tiles(keys, lambda c, r: tiles[(c, r)], (2, 1))
    alone = [codec.decode_tiles([k], lambda c, r: tiles[(c, r)], (2, 1))[0] for k in keys]
    with wsicodec.open_slide(box) as s:
        region = np.asarray(s.read_region((0, 0), 0, s.dimensions))[..., :3]
    for k, a, b in zip(keys, together, alone):
        assert (a == b).all() and (region[:, k[0] * T:(k[0] + 1) * T] == a).all(), k
    stream = wsicodec.encode(img, quality, tile_size=T, codec="auto", min_psnr=floor, jpeg2000=j2k)
    assert read_stream(stream).tiles == [tiles[k] for k in keys]
    assert (wsicodec.decode(stream) == region).all()


def test_a_side_strips_second_pass_is_the_whole_tiles_outside_its_strips(tissue):
    """With ``side_strips`` the second pass runs g_s over a strip of STRIP px along each bare
    side and keeps the first pass elsewhere: outside the strips the very pixels of the
    second pass over the whole tile (no pixel there depends on a bare side's latents),
    inside within a level of them; it changes the strips (the pass does something).  An
    AutoCodec records it; a container that does not is decoded over whole tiles."""
    from wsicodec.codecs import codec_from_dict
    from wsicodec.errors import InvalidSettingError
    from wsicodec.learned.decoder import TileDecoder
    from wsicodec.learned.secondpass import STRIP, second_pass, strip_boxes
    from wsicodec.learned.synthesis import stitch_window

    codec = get_codec("auto", 4)
    whole, strips = (TileDecoder(codec.learned.loaded, codec.device, codec.precision, 2, mixed=True,
                                 side_strips=s) for s in (False, True))
    t, o = 256, 300
    lat = {(dr, dc): whole.pixel_latents(np.ascontiguousarray(tissue[o + dr * t:o + (dr + 1) * t,
                                                                     o + dc * t:o + (dc + 1) * t]))
           for dr in (-1, 0, 1) for dc in (-1, 0, 1)}
    centre, around = lat[(0, 0)], {k: v for k, v in lat.items() if k != (0, 0)}
    win, top, left = stitch_window(centre, around)
    first = whole.synthesize([win], [(top, left, t, t)])[0]
    for sides in ([(0, 1)], [(-1, 0), (0, -1)], [(1, 0), (0, 1), (-1, 0)]):
        bare = {(dr, dc): np.ascontiguousarray(tissue[o + dr * t:o + (dr + 1) * t, o + dc * t:o + (dc + 1) * t])
                for dr, dc in sides}
        ref, got = (second_pass(d, [(centre, around, first, bare)])[0] for d in (whole, strips))
        inside = np.zeros((t, t), bool)
        for b in strip_boxes(sides, 0, 0, t, t):
            inside[b[0]:b[0] + b[2], b[1]:b[1] + b[3]] = True
        assert (got[~inside] == ref[~inside]).all() and (got[~inside] == first[~inside]).all(), sides
        assert np.abs(got[inside].astype(int) - ref[inside]).max() <= 1, sides
        assert (got[inside] != first[inside]).any(), sides
    assert strip_boxes([(1, 0), (0, -1)], 32, 16, 100, 40) == [(32 + 100 - STRIP, 16, STRIP, 40), (32, 16, 100, 40)]
    assert codec.to_dict()["configuration"]["side_strips"] is True
    cfg = {k: v for k, v in codec.to_dict()["configuration"].items() if k != "side_strips"}
    assert codec_from_dict({"name": "auto", "configuration": cfg}).decoder.side_strips is False
    with pytest.raises(InvalidSettingError, match="side_strips"):
        get_codec("auto", 4, side_strips=2)
