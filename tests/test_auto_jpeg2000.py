"""The ``auto`` codec's JPEG 2000 tiles: the fit, the choice of the fewer bytes, fix-up tails,
damage, settings.  The grid helpers are test_auto's (the same level encoder and readers)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_flush_denormal(True)

from test_auto import T, _check_floor_and_records, _encode, he_crop  # noqa: E402

from wsicodec.classical import J2K_SIGNATURE, JXL_SIGNATURES, Jpeg2000Codec  # noqa: E402
from wsicodec.codecs import codec_from_dict, get_codec  # noqa: E402
from wsicodec.errors import CorruptDataError, InvalidSettingError  # noqa: E402
from wsicodec.learned import choice  # noqa: E402
from wsicodec.learned.j2kfit import TOLERANCE, fit_jpeg2000, fit_jpeg2000_tile  # noqa: E402
from wsicodec.learned.jxlfit import fit_jpegxl, tile_psnr  # noqa: E402
from wsicodec.learned.tileformat import KIND_FIXUP, fixup_parts, parse_header  # noqa: E402


@pytest.fixture(scope="module")
def he_img(tissue):
    return he_crop(tissue)


@pytest.fixture(autouse=True)
def no_ring_hold(monkeypatch):
    """Fits here without a margin (``around``) would give way to the ring hold on he/test
    tissue; off here, where the tests are about JPEG 2000 tiles themselves (the hold is
    tested on its own, below)."""
    from wsicodec.learned import j2kfit
    monkeypatch.setattr(j2kfit, "RING_TOLERANCE", float("inf"))


def _around(codec, img: np.ndarray, r: int, c: int, x0: int = 0) -> np.ndarray:
    """Tile (r, c) of ``img`` (of its part from x = ``x0``) with the JPEG 2000 margin
    ``codec`` codes it with."""
    from wsicodec.image import context_region
    from wsicodec.learned.j2kfit import with_margin
    ys = slice(r * T, min(img.shape[0], (r + 1) * T))
    xs = slice(x0 + c * T, min(img.shape[1], x0 + (c + 1) * T))
    region, box = context_region(img, ys, xs, codec.context)
    return with_margin(region, box, codec.jpeg2000_margin)


def _tissue(he_img: np.ndarray, cols: int = 1) -> np.ndarray:
    """``cols`` tiles of he_img's first row from x = 64, where no tile has glass along its
    edges (the glass hold of the fit, tested on its own below, leaves them alone)."""
    return np.ascontiguousarray(he_img[:T, 64:64 + cols * T])


@pytest.mark.parametrize("target", [30.0, 38.0])
def test_fit_reaches_its_target_and_is_a_function_of_the_tile(he_img, target):
    tile = _tissue(he_img)
    fit = fit_jpeg2000(tile, target)
    assert fit is not None and fit.codec == "jpeg2000" and fit.data.startswith(J2K_SIGNATURE)
    assert target <= fit.psnr < target + 4 * TOLERANCE
    assert fit.psnr == tile_psnr(Jpeg2000Codec().decode(fit.data), tile, tile.shape[:2])
    assert (fit.pixels == Jpeg2000Codec().decode(fit.data)).all()
    assert fit_jpeg2000(tile, target).data == fit.data            # the same in any run
    assert fit.equal_bytes <= len(fit.data) and not fit.lossless


def test_fit_gives_way_where_it_cannot_reach_or_undercut(he_img):
    tile = _tissue(he_img)
    assert fit_jpeg2000(tile, 75.0) is None             # irreversible 9/7 tops out far below
    assert fit_jpeg2000(tile, 40.0, budget=100) is None  # 40 dB never fits in 100 bytes
    near = fit_jpeg2000(tile, 34.0)
    assert fit_jpeg2000(tile, 34.0, budget=near.equal_bytes + 1).data == near.data


def test_auto_keeps_the_fewer_bytes_of_both_codecs_and_the_floor(he_img):
    """At a floor over the network's reach every tissue tile is classical: with JPEG 2000
    fitted too (held to JPEG-XL's glass at the tile's edges), each tile is the codec whose
    fit takes fewer bytes at the floor, the floor
    holds as readers decode it, and the grid takes no more bytes than JPEG-XL alone."""
    floor = 40.0
    both = get_codec("auto", 4, min_psnr=floor)
    alone = get_codec("auto", 4, min_psnr=floor, jpeg2000=False)
    out_both, out_jxl = _encode(both, he_img), _encode(alone, he_img)
    kinds = _check_floor_and_records(both, he_img, out_both, floor, 0.05)
    assert "jpeg2000" in kinds
    assert "jpeg2000" not in _check_floor_and_records(alone, he_img, out_jxl, floor, 0.05)
    size = lambda out: sum(len(t) for row in out.values() for t in row.tiles)  # noqa: E731
    assert size(out_both) < size(out_jxl)
    for r, row in out_both.items():
        for c, (data, (kind, _)) in enumerate(zip(row.tiles, row.records)):
            src = np.ascontiguousarray(he_img[r * T:(r + 1) * T, c * T:(c + 1) * T])
            jxl = fit_jpegxl(src, floor, effort=both.effort)
            j2k = fit_jpeg2000_tile(src, floor, reference=jxl.pixels, around=_around(both, he_img, r, c))
            if kind == "jpeg2000":
                assert data == j2k.data and j2k.equal_bytes < jxl.equal_bytes
            elif kind == "jpegxl":
                assert data.startswith(JXL_SIGNATURES) and (j2k is None or jxl.equal_bytes <= j2k.equal_bytes)


def test_fixup_tiles_may_carry_jpeg2000_and_decode_to_it(he_img, monkeypatch):
    from wsicodec.dicom.source import stored_codestream
    monkeypatch.setattr(choice, "READER_SLACK_DB", 100.0)      # every network tile a fix-up
    floor = 33.0                      # on this tissue JPEG 2000 wins there (JPEG-XL at 30 dB)
    codec = get_codec("auto", 4, min_psnr=floor)
    img = _tissue(he_img, 2)
    out = _encode(codec, img)
    tails = [fixup_parts(d, parse_header(d))[1] for d, (k, _) in zip(out[0].tiles, out[0].records)
             if k == "fixup"]
    assert tails and any(t.startswith(J2K_SIGNATURE) for t in tails)
    _check_floor_and_records(codec, img, out, floor, 0.05)
    for d, (k, _) in zip(out[0].tiles, out[0].records):
        if k == "fixup" and parse_header(d).kind == KIND_FIXUP:
            tail = fixup_parts(d, parse_header(d))[1]
            # DICOM passes each codec's tails through for that transfer syntax only
            assert stored_codestream(d, "jpegxl") == (tail if tail.startswith(JXL_SIGNATURES) else None)
            assert stored_codestream(d, "jpeg2000") == (tail if tail.startswith(J2K_SIGNATURE) else None)


def test_a_damaged_jpeg2000_tile_is_an_error_naming_it(he_img):
    codec = get_codec("auto", 4, min_psnr=40.0)
    img = _tissue(he_img)
    data = _encode(codec, img)[0].tiles[0]
    assert data.startswith(J2K_SIGNATURE)
    for bad in (data[:40], data[:4] + b"\x00" * 60):
        got = codec.decode_tiles([(0, 0)], lambda c, r: bad, (1, 1), names=lambda c, r: "tile 0,0")[0]
        assert isinstance(got, CorruptDataError) and "tile 0,0" in str(got), got


def test_the_setting_is_recorded_and_older_containers_open(he_img):
    codec = get_codec("auto", 4, min_psnr=32.0)
    cfg = codec.to_dict()
    assert cfg["configuration"]["jpeg2000"] is True
    assert codec_from_dict(cfg).jpeg2000 is True
    off = get_codec("auto", 4, jpeg2000=False)
    assert codec_from_dict(off.to_dict()).jpeg2000 is False
    assert cfg["configuration"]["jpeg2000_margin"] == codec.jpeg2000_margin == 8
    assert codec_from_dict(get_codec("auto", 4, jpeg2000_margin=0).to_dict()).jpeg2000_margin == 0
    old = {"name": "auto", "configuration": {k: v for k, v in cfg["configuration"].items()
                                             if k not in ("jpeg2000", "jpeg2000_margin")}}
    assert codec_from_dict(old).min_psnr == 32.0          # written before the settings existed
    assert codec_from_dict(old).jpeg2000_margin == 0      # ... its JPEG 2000 tiles had no margin
    assert get_codec("auto", 4).jpeg2000_margin == 8      # a writer's default
    for bad in ("yes", 2, 0.5, None):
        with pytest.raises(InvalidSettingError, match="jpeg2000"):
            get_codec("auto", 4, jpeg2000=bad)
    for bad in (-1, 17, 2.5, "8", None):
        with pytest.raises(InvalidSettingError, match="jpeg2000_margin"):
            get_codec("auto", 4, jpeg2000_margin=bad)
    with pytest.raises(InvalidSettingError, match="jpeg2000_margin"):
        codec_from_dict({"name": "auto", "configuration": {**cfg["configuration"], "jpeg2000_margin": 99}})


def _glass_edged(he_img: np.ndarray) -> np.ndarray:
    """A tissue tile whose outer 24 px are glass (bright, flat, a little noise): what JPEG
    2000 at a PSNR target leaves further from the source than JPEG-XL does."""
    rng = np.random.default_rng(3)
    t = he_img[:T, :T].astype(np.float64)
    glass = np.array([232.0, 226.0, 236.0]) + rng.normal(0, 0.7, t.shape)
    edge = np.ones(t.shape[:2], bool)
    edge[24:-24, 24:-24] = False
    t[edge] = glass[edge]
    return np.ascontiguousarray(np.clip(np.rint(t), 0, 255).astype(np.uint8))


def test_the_fit_keeps_glass_at_the_tile_edges(he_img, monkeypatch):
    """Without the edge hold, the PSNR fit leaves the glass along the edges of this tile
    further off than EDGE_TOLERANCE (a grid in a viewer); with it, the coding kept holds
    it (a higher level) or JPEG 2000 gives way; beside a reference coding that is no
    closer, that coding's error is the bound."""
    from wsicodec.learned import j2kfit
    tile = _glass_edged(he_img)
    mask = j2kfit.edge_glass_mask(tile, tile.shape[:2])
    assert mask is not None
    monkeypatch.setattr(j2kfit, "EDGE_TOLERANCE", float("inf"))
    plain = fit_jpeg2000(tile, 32.0)
    assert plain is not None and j2kfit.edge_error(plain.pixels, tile, mask) > 0.45
    monkeypatch.undo()
    held = fit_jpeg2000(tile, 32.0)
    assert held is None or (j2kfit.edge_error(held.pixels, tile, mask) <= j2kfit.EDGE_TOLERANCE
                            and held.setting > plain.setting and held.psnr >= 32.0)
    worse = np.clip(tile.astype(np.int16) + 3, 0, 255).astype(np.uint8)   # 3 levels off everywhere
    beside = fit_jpeg2000(tile, 32.0, reference=worse)
    assert beside is not None and beside.data == plain.data               # held to 3 levels: as unheld
    tissue = _tissue(he_img)
    assert j2kfit.edge_glass_mask(tissue, tissue.shape[:2]) is None      # no glass: nothing held


def _counted(monkeypatch) -> list:
    """The codings :mod:`~wsicodec.learned.j2kfit` makes from here on, by level."""
    from wsicodec.learned import j2kfit
    levels: list = []
    real = j2kfit.encode_at
    monkeypatch.setattr(j2kfit, "encode_at",
                        lambda tile, level, *a, **k: levels.append(level) or real(tile, level, *a, **k))
    return levels


def test_a_passing_coding_that_cannot_undercut_the_budget_ends_the_fit(he_img, monkeypatch):
    """A first coding above the target whose bytes, cut down to the target at the steepest
    slope a tile's JPEG 2000 bytes fall (RATE_SLOPE_MAX per dB), still take the budget: the
    fit gives way at once instead of refining a coding that cannot win."""
    import math

    from wsicodec.learned import j2kfit
    tile = _tissue(he_img)
    monkeypatch.setattr(j2kfit, "START_OFFSET", 2.0)            # a first coding well above 34 dB
    first = j2kfit.encode_at(tile, 36.0, tile.shape[:2])
    assert first.psnr >= 34.5
    bound = len(first.data) * math.exp(-j2kfit.RATE_SLOPE_MAX * (first.psnr - 34.0))
    levels = _counted(monkeypatch)
    assert fit_jpeg2000(tile, 34.0, budget=bound) is None and levels == [36.0]
    levels.clear()
    kept = fit_jpeg2000(tile, 34.0, budget=1.05 * bound)          # under it: the search goes on
    assert len(levels) > 1 and (kept is None or kept.equal_bytes < 1.05 * bound)


def test_a_first_coding_that_misses_the_glass_is_raised_at_once(he_img, monkeypatch):
    """Where the search's first coding reaches the target but leaves the glass at the
    edges off, the level is raised from that coding in EDGE_STEP steps, with no search
    below it first."""
    from wsicodec.learned import j2kfit
    tile = _glass_edged(he_img)
    monkeypatch.setattr(j2kfit, "START_OFFSET", 1.0)    # a first coding the search would refine
    first = j2kfit.encode_at(tile, 33.0, tile.shape[:2])
    hold = j2kfit._hold(tile, tile.shape[:2], None)
    assert first.psnr >= 32.0 + j2kfit.TOLERANCE and not hold.glass_met(first.pixels)
    levels = _counted(monkeypatch)
    held = fit_jpeg2000(tile, 32.0)
    steps = [32.0 + j2kfit.START_OFFSET + k * j2kfit.EDGE_STEP for k in range(j2kfit.EDGE_TRIES + 1)]
    assert levels == steps[:len(levels)]
    assert held is None or (held.setting == levels[-1] and hold.glass_met(held.pixels))


def test_a_margin_keeps_the_tile_edge_as_accurate_as_its_inside_and_the_hold_needs_it(he_img, monkeypatch):
    """Coded as a tile of its own, JPEG 2000's outermost pixels on he/test tissue lie about
    twice as far off as its inside (the wavelet's edge) and further than JPEG-XL's: held to
    JPEG-XL's ring, that coding gives way.  Coded with the margin, the tile's edge is inside
    the codestream: its ring error is its inside's, under JPEG-XL's, and the fit keeps it,
    still in fewer bytes; its pixels are the codestream's, cropped."""
    from wsicodec.learned import j2kfit
    codec = get_codec("auto", 4, min_psnr=36.0)
    img = _tissue(he_img)
    tile, around = img[:T, :T], _around(codec, he_img, 0, 0, x0=64)
    assert around.shape == (T + 16, T + 16, 3)           # the image's own pixels around it ...
    assert (around[8:-8, 8:-8] == tile).all() and (around[8:, :] == he_img[:T + 8, 56:64 + T + 8]).all()
    assert (around[:8] == around[8]).all()               # ... and its edge repeated above it
    valid = tile.shape[:2]
    jxl = fit_jpegxl(tile, 36.0, effort=5)
    plain = fit_jpeg2000(tile, 36.0, reference=jxl.pixels)            # the fixture: no hold
    margin = fit_jpeg2000(tile, 36.0, reference=jxl.pixels, around=around)
    ring, inner = j2kfit.ring_error(plain.pixels, tile, valid)
    assert ring > 1.6 * inner and ring > 1.5 * j2kfit.ring_error(jxl.pixels, tile, valid)[0]
    ring, inner = j2kfit.ring_error(margin.pixels, tile, valid)
    assert ring < 1.1 * inner and ring < j2kfit.ring_error(jxl.pixels, tile, valid)[0]
    assert margin.equal_bytes < jxl.equal_bytes
    px = Jpeg2000Codec().decode(margin.data)
    assert px.shape == (T + 16, T + 16, 3) and (margin.pixels == px[8:-8, 8:-8]).all()
    monkeypatch.undo()                                                  # the hold as shipped
    assert fit_jpeg2000(tile, 36.0, reference=jxl.pixels) is None
    assert fit_jpeg2000(tile, 36.0, reference=jxl.pixels, around=around).data == margin.data
    assert fit_jpeg2000(tile, 36.0, around=around).data == margin.data  # held to its own inside
    assert j2kfit.ring_error(tile, tile, valid) == (0.0, 0.0)
    with pytest.raises(ValueError, match="margin"):
        fit_jpeg2000(tile, 36.0, around=around[:-1])


def test_the_ring_is_held_only_where_the_tile_meets_another(he_img):
    """A level's edge shows no seam: the ring error counts the tile's edges that meet
    another tile (:func:`~wsicodec.learned.j2kfit.tile_sides`, from the encoder's region
    clipped at the level's edges), none for a tile alone."""
    from wsicodec.image import context_region
    from wsicodec.learned import j2kfit
    tile = np.ascontiguousarray(he_img[:T, :T])
    off = np.clip(tile.astype(np.int16) + np.pad(np.zeros((T - 2, T - 2, 3), np.int16), ((1, 1), (1, 1), (0, 0)),
                                                 constant_values=4), 0, 255).astype(np.uint8)
    assert j2kfit.ring_error(off, tile, (T, T)) == (4.0, 0.0)             # 4 levels off on the ring only
    assert j2kfit.ring_error(off, tile, (T, T), (False, False, False, False)) == (0.0, 0.0)
    for ys, xs, sides in ((slice(0, T), slice(0, T), (False, True, False, True)),       # top left
                          (slice(T, 2 * T), slice(T, 2 * T), (True, False, True, True)),  # bottom row
                          (slice(T, 2 * T), slice(2 * T, 3 * T), (True, False, True, False))):
        region, box = context_region(he_img, ys, xs, 16)
        assert j2kfit.tile_sides(region, box, (T, T)) == sides
    region, box = context_region(he_img, slice(0, T), slice(0, T), 16)
    assert j2kfit.tile_sides(region, box, (T - 8, T)) == (False, False, False, True)  # a part tile


def test_a_margin_container_decodes_both_kinds_of_tile_and_refuses_other_sizes(he_img, monkeypatch):
    """In a grid whose JPEG 2000 tiles may have a margin, a tile's codestream is the tile
    and its margin (read as its middle) or the tile alone, whichever the fit kept (its SIZ
    says which); a codestream of any other size is a one-line error naming the tile, and
    so is one with a margin in a grid without (a container written before margins)."""
    monkeypatch.undo()                                   # the holds as shipped: margins kept
    codec = get_codec("auto", 4, min_psnr=40.0)
    img = _tissue(he_img)
    tiles = [d for row in _encode(codec, he_img).values() for d in row.tiles]
    data = next(d for d in tiles if d.startswith(J2K_SIGNATURE))
    assert Jpeg2000Codec().decode(data).shape == (T + 16, T + 16, 3)
    got = codec.decode_tiles([(0, 0)], lambda c, r: data, (1, 1), (T, T, 3))[0]
    assert (got == Jpeg2000Codec().decode(data)[8:-8, 8:-8]).all()
    plain = Jpeg2000Codec(quality=40).encode(img[:T, :T])
    got = codec.decode_tiles([(0, 0)], lambda c, r: plain, (1, 1), (T, T, 3))[0]
    assert (got == Jpeg2000Codec().decode(plain)).all()
    older = get_codec("auto", 4, min_psnr=40.0, jpeg2000_margin=0)
    odd = Jpeg2000Codec(quality=40).encode(np.ascontiguousarray(he_img[:T + 8, :T + 8]))
    for reader, bad in ((older, data), (codec, odd), (older, odd)):
        got = reader.decode_tiles([(0, 0)], lambda c, r: bad, (1, 1), (T, T, 3), names=lambda c, r: "tile 0,0")[0]
        assert isinstance(got, CorruptDataError) and "tile 0,0" in str(got), got
        assert "\n" not in str(got)


def test_mutated_jpeg2000_tiles_decode_or_fail_cleanly(he_img):
    """Seeded mutations of a stored JPEG 2000 tile (bytes flipped, cut, spliced, the SIZ
    marker's size forged): the mixed decoder gives the tile's pixels (h, w, 3) uint8 or a
    CorruptDataError naming the tile, never another error, a crash or another size."""
    import struct
    codec = get_codec("auto", 4, min_psnr=40.0)
    img = _tissue(he_img)
    data = _encode(codec, img)[0].tiles[0]
    assert data.startswith(J2K_SIGNATURE)
    rng = np.random.default_rng(2026)
    cases = [data[:8] + struct.pack(">II", 60000, 60000) + data[16:]]   # SIZ's Xsiz, Ysiz: 60000²
    for _ in range(60):
        b = bytearray(data)
        how = rng.integers(4)
        if how == 0:                                    # flip bytes
            for i in rng.integers(0, len(b), rng.integers(1, 8)):
                b[i] ^= int(rng.integers(1, 256))
        elif how == 1:                                  # cut
            b = b[:int(rng.integers(4, len(b)))]
        elif how == 2:                                  # a run of another part spliced in
            i, j = sorted(rng.integers(4, len(b), 2))
            b[i:j] = bytes(b[j:j + (j - i)])
        else:                                           # header bytes only
            for i in rng.integers(4, min(len(b), 200), 3):
                b[i] = int(rng.integers(0, 256))
        cases.append(bytes(b))
    for bad in cases:
        got = codec.decode_tiles([(0, 0)], lambda c, r: bad, (1, 1), (T, T, 3), names=lambda c, r: "tile 0,0")[0]
        if isinstance(got, np.ndarray):
            assert got.shape == (T, T, 3) and got.dtype == np.uint8
        else:
            assert isinstance(got, CorruptDataError) and "tile 0,0" in str(got), repr(got)
