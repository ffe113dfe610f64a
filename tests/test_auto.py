"""The ``auto`` codec: per-tile choice among glass, the network and the classical codecs over a
PSNR floor (their meetings: test_auto_bare.py; JPEG 2000 tiles: test_auto_jpeg2000.py).

Grids are coded through the level encoder exactly as ``compress`` codes a level (rows in
order, as the pipeline pushes them) and decoded through ``decode_tiles`` as every reader decodes them;
each tile's PSNR against its source is then measured here, independently of what the
encoder recorded.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_flush_denormal(True)

from wsicodec.codecs import get_codec  # noqa: E402
from wsicodec.errors import CorruptDataError, InvalidSettingError  # noqa: E402
from wsicodec.image import context_region  # noqa: E402
from wsicodec.learned import choice, levelencoder, stepsearch  # noqa: E402
from wsicodec.learned.jxlfit import MAX_DISTANCE, TOLERANCE, fit_jpegxl, tile_psnr  # noqa: E402
from wsicodec.learned.tileformat import (KIND_FIXUP, KIND_NETWORK, NETWORK_KINDS,  # noqa: E402
                                         fixup_parts, pack_fixup, parse_header)

T = 128


def he_crop(tissue: np.ndarray) -> np.ndarray:
    """2 x 3 tiles of the shared H&E image (conftest's ``tissue``)."""
    return tissue[200:456, 200:584].copy()


def _grid_rows(img: np.ndarray, margin: int):
    h, w = img.shape[:2]
    rows, cols = -(-h // T), -(-w // T)
    for r in range(rows):
        regions, boxes, valid = [], [], []
        for c in range(cols):
            ys, xs = slice(r * T, min(h, (r + 1) * T)), slice(c * T, min(w, (c + 1) * T))
            reg, box = context_region(img, ys, xs, margin)
            regions.append(reg)
            boxes.append(box)
            valid.append((ys.stop - ys.start, xs.stop - xs.start))
        yield r, regions, boxes, valid


def _encode(codec, img, stored_rows: dict | None = None):
    enc = codec.level_encoder(0)
    out = {}
    for r, regions, boxes, valid in _grid_rows(img, codec.context):
        stored = (stored_rows or {}).get(r)
        for er in enc.push(r, regions, boxes, valid=valid, stored=stored):
            out[er.row] = er
    for er in enc.finish():
        out[er.row] = er
    return out


def _decode(codec, img, out):
    h, w = img.shape[:2]
    rows, cols = -(-h // T), -(-w // T)
    tiles = {(c, r): out[r].tiles[c] for r in out for c in range(cols)}
    got = codec.decode_tiles(list(tiles), lambda c, r: tiles[(c, r)], (cols, rows),
                             lambda c, r: (min(T, h - r * T), min(T, w - c * T), 3))
    result = {}
    for (c, r), px in zip(tiles, got):
        assert not isinstance(px, BaseException), px
        src = img[r * T:(r + 1) * T, c * T:(c + 1) * T]
        result[(c, r)] = tile_psnr(px, src, src.shape[:2])
    return result


@pytest.fixture(scope="module")
def he_img(tissue):
    return he_crop(tissue)


def _check_floor_and_records(codec, img: np.ndarray, out: dict, floor: float, tol: float) -> set:
    """Every tile as readers decode it reaches ``floor`` and its record is within ``tol`` dB
    of what they show; returns the kinds recorded."""
    kinds = set()
    for (c, r), p in _decode(codec, img, out).items():
        kind, rec = out[r].records[c]
        kinds.add(kind)
        assert p >= floor, (c, r, kind, p)
        assert abs(p - rec) < tol, (c, r, kind, p, rec)
    return kinds


def test_every_tile_reaches_the_floor_and_its_record(he_img):
    floor = 33.0
    codec = get_codec("auto", 2, min_psnr=floor)
    out = _encode(codec, he_img)
    kinds = _check_floor_and_records(codec, he_img, out, floor, 0.05)   # the map says what readers show
    assert kinds <= set(choice.KINDS)
    # quality 2 alone misses 33 dB on this tissue: some tiles climbed the ladder
    qualities = {parse_header(t).quality for row in out.values() for t in row.tiles
                 if t[:4] == b"WSLT" and parse_header(t).kind in NETWORK_KINDS}
    assert qualities and max(qualities) > 2


def test_unreachable_for_the_network_goes_to_jpegxl_and_lossless_is_the_last_resort(he_img):
    codec = get_codec("auto", 4, min_psnr=60.0)         # far above the network's top
    out = _encode(codec, he_img[:T, :2 * T])
    kinds = [k for row in out.values() for k, _ in row.records]
    assert set(kinds) <= {"jpegxl", "jpegxl-lossless", "glass"}
    measured = _decode(codec, he_img[:T, :2 * T], out)
    assert all(p >= 60.0 for p in measured.values())


def test_fixup_tiles_keep_their_latents_and_the_floor(he_img, monkeypatch):
    # stage 2 made to refuse every network tile: each becomes a fix-up tile
    monkeypatch.setattr(choice, "READER_SLACK_DB", 100.0)
    floor = 30.0
    codec = get_codec("auto", 4, min_psnr=floor)
    img = he_img[:T, :2 * T]
    out = _encode(codec, img)
    kinds = [k for row in out.values() for k, _ in row.records]
    assert "fixup" in kinds
    for row in out.values():
        for data, (kind, _) in zip(row.tiles, row.records):
            if kind == "fixup":
                assert parse_header(data).kind == KIND_FIXUP
    measured = _decode(codec, img, out)
    assert all(p >= floor for p in measured.values())


def test_a_resumed_row_gives_the_same_bytes(he_img):
    codec = get_codec("auto", 4, min_psnr=30.0)
    first = _encode(codec, he_img)
    again = _encode(codec, he_img, stored_rows={0: first[0].tiles})
    assert 0 not in again                                 # a stored row is context only
    assert again[1].tiles == first[1].tiles


def test_fixup_tile_format_and_damage():
    net = (b"WSLT" + bytes([3, KIND_NETWORK]) + struct.pack("<HH", 16, 16)
           + struct.pack("<f8sIIBBHH", 4.0, b"\0" * 8, 0, 2, 0, 0, 16, 16) + b"zzyy")
    tile = pack_fixup(net, b"\xff\x0aPIX")
    hd = parse_header(tile)
    assert (hd.kind, hd.inner_len, hd.quality) == (KIND_FIXUP, len(net), 4.0)
    assert fixup_parts(tile, hd) == (net, b"\xff\x0aPIX")
    with pytest.raises(CorruptDataError):
        parse_header(tile[:len(tile) - 5])                   # no pixels left
    bad = bytearray(tile)
    bad[14 + 6] = 32                                       # the inner tile another size
    with pytest.raises(CorruptDataError):
        parse_header(bytes(bad))
    old = bytearray(tile)
    old[4] = 2                                             # fix-up tiles are format 3
    with pytest.raises(CorruptDataError):
        parse_header(bytes(old))
    with pytest.raises(ValueError):
        pack_fixup(net, b"")
    with pytest.raises(ValueError):
        pack_fixup(tile, b"\xff\x0a")                      # never nested


@pytest.mark.parametrize("bad", ["abc", 0, -3, 99.5, float("nan"), True, [32]])
def test_min_psnr_out_of_range_is_refused(bad):
    with pytest.raises(InvalidSettingError, match="min_psnr"):
        get_codec("auto", 4, min_psnr=bad)


def test_encoder_decodes_in_small_batches_on_the_cpu_while_readers_keep_theirs():
    from wsicodec.learned.auto import CPU_ENCODE_BATCH
    from wsicodec.learned.codec import CPU_MAX_BATCH
    assert get_codec("auto", 4).decoder.synthesis.max_batch == CPU_MAX_BATCH     # the CPU's default
    codec = get_codec("auto", 4, max_batch=16)                     # readers: 16 windows a pass
    assert codec.decoder.synthesis.max_batch == 16
    assert codec.chooser.decoder.synthesis.max_batch == CPU_ENCODE_BATCH < 16
    small = get_codec("auto", 4, max_batch=2)                     # never more than asked
    assert small.chooser.decoder is small.decoder and small.decoder.synthesis.max_batch == 2


def test_stage_1_estimates_in_their_own_precision_and_every_measurement_in_the_codecs(he_img, monkeypatch):
    """``estimate_precision`` steers stage 1's search only: its g_s passes run in it, every
    other pass (stage 2's measurements, as readers decode) in the codec's precision, and
    the floor and the records hold as readers decode in float32."""
    from wsicodec.learned.synthesis import Synthesis
    seen, where = [], ["other"]
    pass_, network = Synthesis._pass, choice.TileChooser._network

    def spy_pass(self, batch):
        seen.append((where[0], batch[0][3][0]))
        return pass_(self, batch)

    def spy_network(self, *a, **k):
        where[0] = "stage 1"
        try:
            return network(self, *a, **k)
        finally:
            where[0] = "other"

    monkeypatch.setattr(Synthesis, "_pass", spy_pass)
    monkeypatch.setattr(choice.TileChooser, "_network", spy_network)
    floor = 33.0
    codec = get_codec("auto", 2, min_psnr=floor, estimate_precision="bfloat16")
    assert codec.precision == "float32" and codec.estimate_precision == "bfloat16"
    out = _encode(codec, he_img)
    assert {p for w, p in seen if w == "stage 1"} == {"bfloat16"}
    assert {p for w, p in seen if w == "other"} == {"float32"}
    _check_floor_and_records(codec, he_img, out, floor, 0.05)


def test_estimate_precision_is_the_machines_and_never_stored(monkeypatch):
    from wsicodec.codecs import codec_from_dict
    from wsicodec.learned import auto
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(auto, "native_bfloat16", lambda device, n=native: n)
        assert get_codec("auto", 4).estimate_precision == expected               # "auto", the default
        assert get_codec("auto", 4, estimate_precision="float32").estimate_precision == "float32"
    codec = get_codec("auto", 4, estimate_precision="bfloat16")
    assert "estimate_precision" not in codec.to_dict()["configuration"]
    stored = {"name": "auto", "configuration": {**codec.to_dict()["configuration"], "estimate_precision": "bfloat16"}}
    monkeypatch.setattr(auto, "native_bfloat16", lambda device: False)
    assert codec_from_dict(stored).estimate_precision == "float32"               # a container says nothing
    with pytest.raises(InvalidSettingError, match="estimate_precision"):
        get_codec("auto", 4, estimate_precision="float16")


def test_the_fits_run_on_as_many_threads_as_torch_codes_with_and_code_the_same(he_img, monkeypatch):
    old = torch.get_num_threads()
    try:
        for n, expected in ((1, levelencoder.MIN_FIT_THREADS), (3, 3), (64, levelencoder.MAX_FIT_THREADS)):
            torch.set_num_threads(n)
            assert levelencoder.fit_threads() == expected
    finally:
        torch.set_num_threads(old)
    img = he_img[:T, :3 * T]
    codec = get_codec("auto", 4, min_psnr=33.0)
    coded = []
    for n in (1, 4):
        monkeypatch.setattr(levelencoder, "fit_threads", lambda n=n: n)
        enc = codec.level_encoder(0)
        _, regions, boxes, valid = next(_grid_rows(img, codec.context))
        enc.push(0, regions, boxes, valid=valid)
        assert enc.pool._max_workers == n
        coded.append([t for row in enc.finish() for t in row.tiles])
    assert coded[0] == coded[1] and len(coded[0]) == 3


def test_as_written_refuses_a_quality_off_the_steps(he_img):
    codec = get_codec("auto", 4, min_psnr=20.0)
    out = _encode(codec, he_img[:T, :T])
    data = out[0].tiles[0]
    assert parse_header(data).kind == KIND_NETWORK
    forged = bytearray(data)
    struct.pack_into("<f", forged, 10, 4.1)                # between two steps
    got = codec.decode_tiles([(0, 0)], lambda c, r: bytes(forged), (1, 1), as_written=True)
    assert isinstance(got[0], CorruptDataError)
    assert stepsearch.quality_steps(4.0) == tuple(4.0 + k / 4 for k in range(17))
    assert set(stepsearch.quality_steps(4.3)) >= {np.float32(4.3 + k).item() for k in range(4)}  # whole steps as before


def _search(curve, quality=4.0, target=32.3):
    """Stage 1's quality search run on a known PSNR per step: (quality chosen, estimates
    made by step, the steps)."""
    steps = stepsearch.quality_steps(quality)
    search = stepsearch.StepSearch(len(steps), target)
    while search.next is not None:
        search.record(curve(steps[search.next]))
    return (steps[search.chosen] if search.chosen is not None else None), search.tried, steps


@pytest.mark.parametrize("curve", [
    lambda q: 24.0 + 2.0 * q,                        # as the prior slope says
    lambda q: 28.0 + 0.6 * q,                        # flatter than it
    lambda q: 14.0 + 4.5 * q,                        # steeper
    lambda q: 37.0 - 9.0 / q,                        # flattening toward the top
    lambda q: 35.0 - 2.0 * abs(q - 6.1) ** 0.5,      # rises, then falls: not monotone
], ids=["prior", "flat", "steep", "flattening", "not-monotone"])
def test_quality_search_lands_on_a_step_near_the_target_in_few_estimates(curve):
    target = 32.3
    q, tried, steps = _search(curve, target=target)
    reaching = [st for st in steps if curve(st) >= target]
    assert len(tried) <= stepsearch.MAX_TRIES + 1
    if not reaching:                # the top was tried, or the line through the last two said no
        assert q is None
        if len(steps) - 1 not in tried:
            (a, pa), (b, pb) = sorted(tried.items())[-2:]
            assert pb < pa + (pb - pa) / (b - a) * (len(steps) - 1 - b) < target
        return
    assert curve(q) >= target
    below = steps[steps.index(q) - 1] if q > steps[0] else None
    # near the target, or the lowest step that reaches it
    assert curve(q) - target <= stepsearch.STEP_TOLERANCE_DB or below is None or curve(below) < target


def test_quality_search_keeps_the_asked_quality_and_reports_the_unreachable():
    assert _search(lambda q: 40.0)[0] == 4.0 and len(_search(lambda q: 40.0)[1]) == 1
    q, tried, steps = _search(lambda q: 20.0 + q)                 # 28 dB at the top
    assert q is None and len(steps) - 1 in tried                    # the first jump tried it
    q, tried, steps = _search(lambda q: 28.0 + 0.3 * q)             # 30.4 at the top
    assert q is None and len(tried) == 2 and len(steps) - 1 not in tried     # the line says so
    # a close miss, or estimates that do not rise, still try the top
    q, tried, steps = _search(lambda q: 31.2 + 0.1 * q)             # 31.6 at 4: 0.7 dB short
    assert q is None and len(steps) - 1 in tried
    q, tried, steps = _search(lambda q: {4.0: 30.0}.get(q, 29.0 if q < 7.5 else 33.0))
    assert q is not None and q >= 7.5                               # a dip, then the top reaches


def test_jpegxl_fit_reaches_its_target_or_gives_way_to_a_budget(he_img):
    tile = np.ascontiguousarray(he_img[:T, :T])
    fit = fit_jpegxl(tile, 38.0, start=MAX_DISTANCE)       # a start far off the target
    assert 38.0 <= fit.psnr and not fit.lossless
    assert fit.data == fit_jpegxl(tile, 38.0, start=MAX_DISTANCE).data   # the tile's alone
    near = fit_jpegxl(tile, 38.0)                           # from the predicted distance
    assert 38.0 <= near.psnr < 38.0 + 4 * TOLERANCE
    assert near.equal_bytes <= len(near.data)               # its bytes at exactly 38 dB
    exact = fit_jpegxl(tile, 99.0)
    assert exact.lossless and math.isinf(exact.psnr)
    assert fit_jpegxl(tile, 45.0, budget=100) is None       # 45 dB never fits in 100 bytes


def test_the_jpegxl_search_starts_from_the_tiles_texture(he_img):
    """A textured tile needs a smaller distance for a target than a smooth one: the start
    follows the tile's texture (fitted on training crops) and lands nearer the distance the
    tile reaches the target at than the start from the target alone does."""
    from wsicodec.learned import jxlfit
    tile = np.ascontiguousarray(he_img[:T, :T])
    smooth = np.ascontiguousarray((tile.astype(np.float32) * 0.25 + 170).astype(np.uint8))
    rough, flat = jxlfit.texture(tile, tile.shape[:2]), jxlfit.texture(smooth, smooth.shape[:2])
    assert rough > 3 * flat >= 3 * jxlfit.MIN_TEXTURE
    assert jxlfit.start_distance(36.0, rough) < jxlfit.start_distance(36.0, flat)
    assert jxlfit.start_distance(36.0) == jxlfit.start_distance(36.0, None)      # target alone
    fit = fit_jpegxl(tile, 36.0, effort=jxlfit.SEARCH_EFFORT)
    def off(start: float) -> float:
        return abs(math.log2(start) - math.log2(fit.setting))
    assert off(jxlfit.start_distance(36.0, rough)) < off(jxlfit.start_distance(36.0))
    assert jxlfit.texture(tile[:1, :1], (1, 1)) == jxlfit.MIN_TEXTURE             # a 1-px tile


def test_at_the_search_effort_the_coding_kept_is_a_search_coding(he_img, monkeypatch):
    import inspect

    from wsicodec.learned import jxlfit
    from wsicodec.learned.auto import AutoCodec
    assert inspect.signature(AutoCodec).parameters["effort"].default == jxlfit.SEARCH_EFFORT
    made = []
    real = jxlfit.encode_at
    monkeypatch.setattr(jxlfit, "encode_at", lambda *a: made.append(a[1:]) or real(*a))
    tile = np.ascontiguousarray(he_img[:T, :T])
    fit = fit_jpegxl(tile, 38.0, effort=jxlfit.SEARCH_EFFORT)
    assert all(e == jxlfit.SEARCH_EFFORT for _, _, e in made)
    assert len({d for d, _, _ in made}) == len(made)          # no distance coded twice
    assert fit.setting in {d for d, _, _ in made} and fit.psnr >= 38.0


def test_rows_come_out_in_order_and_a_stored_row_settles_the_rows_above(he_img):
    """The level encoder holds a row while the row below's JPEG-XL fits run; a stored row
    (a resumed run) has none, so the rows above it come out at once."""
    codec = get_codec("auto", 4, min_psnr=30.0)
    img = np.ascontiguousarray(np.concatenate([he_img, he_img[::-1]]))        # 4 x 3 tiles
    grid = list(_grid_rows(img, codec.context))
    first = _encode(codec, img)
    enc = codec.level_encoder(0)
    got = []
    for r, regions, boxes, valid in grid[:3]:
        got += [er.row for er in enc.push(r, regions, boxes, valid=valid)]
    assert got == [0]                                      # row 1 waits for row 2's fits
    r, regions, boxes, valid = grid[3]
    out = enc.push(r, regions, boxes, valid=valid, stored=first[3].tiles)
    assert [er.row for er in out] == [1, 2]
    assert [er.tiles for er in out] == [first[1].tiles, first[2].tiles]
    assert enc.finish() == []                               # a stored row never comes out


def test_mixed_decoder_refuses_a_tile_that_is_neither(he_img):
    codec = get_codec("auto", 4, min_psnr=20.0)
    got = codec.decode_tiles([(0, 0)], lambda c, r: b"GIF89a....", (1, 1))
    assert isinstance(got[0], CorruptDataError) and "neither" in str(got[0])


@pytest.mark.parametrize("floor", [34.0, 40.0])
def test_image_api_codes_and_decodes_a_mixed_stream(he_img, floor):
    """Streams of the auto codec (version 3: JPEG 2000 tiles may have a margin, edge tiles
    included) decode to every tile at the floor; a version-2 stream (no margins) too."""
    import struct

    import wsicodec
    from wsicodec.classical import J2K_SIGNATURE, jpeg2000_declared_size
    from wsicodec.image import MARGIN_VERSION, MIXED_VERSION, read_stream
    img = np.ascontiguousarray(he_img[:200, :300])        # edge tiles smaller than the tile
    for margin, version in ((None, MARGIN_VERSION), (0, MIXED_VERSION)):
        data = wsicodec.encode(img, 4, tile_size=T, codec="auto", min_psnr=floor, jpeg2000_margin=margin)
        if version == MIXED_VERSION:                       # as written before margins
            data = data[:4] + struct.pack("<BB", MIXED_VERSION, 0) + data[6:]
        st = read_stream(data)
        assert (st.version, st.jpeg2000_margin) == (version, 8 if margin is None else 0)
        sizes = [jpeg2000_declared_size(t) for t in st.tiles if t.startswith(J2K_SIGNATURE)]
        if floor == 40.0 and margin is None:               # JPEG 2000 tiles with margins, an edge one too
            assert (T + 16, T + 16) in sizes and (300 - 2 * T + 16, T + 16) in sizes, sizes
        out = wsicodec.decode(data)
        assert out.shape == img.shape
        for r in range(0, 200, T):
            for c in range(0, 300, T):
                a, b = out[r:r + T, c:c + T], img[r:r + T, c:c + T]
                assert tile_psnr(a, b, b.shape[:2]) >= floor
    with pytest.raises(CorruptDataError, match="margin"):
        read_stream(data[:4] + struct.pack("<BB", MARGIN_VERSION, 17) + data[6:])
    with pytest.raises(InvalidSettingError):
        wsicodec.encode(img, 4, codec="auto", refine=3)
    with pytest.raises(InvalidSettingError):
        wsicodec.encode(img, 4, min_psnr=30)               # the learned codec has no floor


# ------------------------------------------------------------------ through compress
def _levels(img: np.ndarray, tile: int) -> list[np.ndarray]:
    """The source pixels of every level, as compress makes them (its own strips)."""
    from wsicodec.tiling import iter_strips, plan_pyramid
    from wsicodec.tiling.sources import ArraySource
    src = ArraySource(img)
    plan = plan_pyramid(src.level_dimensions, src.level_downsamples, tile)
    out = [np.zeros((lv.info.height, lv.info.width, 3), np.uint8) for lv in plan.levels]
    for s in iter_strips(src, plan):
        out[s.level][s.row * tile:s.row * tile + s.pixels.shape[0], :] = s.pixels[:, :out[s.level].shape[1]]
    return out


@pytest.mark.parametrize("floor", [33.0, 40.0])
def test_compress_holds_the_floor_on_every_tile_of_every_level(he_img, tmp_path, floor):
    """At 40 dB the container holds JPEG 2000 tiles with their margin, read (cropped) by
    open_slide like every other tile."""
    import wsicodec
    from wsicodec.classical import J2K_SIGNATURE, jpeg2000_declared_size
    from wsicodec.pipeline import compress_source
    from wsicodec.tiling.sources import ArraySource
    img = np.ascontiguousarray(he_img[:250, :300])            # edge tiles on both sides
    out = tmp_path / "a.zarr.zip"
    compress_source(ArraySource(img), out, get_codec("auto", 3, min_psnr=floor), tile_size=T)
    ref = _levels(img, T)
    with wsicodec.open_slide(out) as s:
        for lv, want in enumerate(ref):
            w, h = s.level_dimensions[lv]
            got = np.asarray(s.read_region((0, 0), lv, (w, h)))[..., :3]
            for r in range(0, h, T):
                for col in range(0, w, T):
                    a, b = got[r:r + T, col:col + T], want[r:r + T, col:col + T]
                    assert tile_psnr(a, b, b.shape[:2]) >= floor, (lv, r, col)
    from wsicodec.container import open_container
    with open_container(out) as c:
        assert c.metadata.tile_kinds == choice.KINDS
        for lv in range(c.level_count):
            rec = c.tile_records(lv)
            assert rec is not None and float(np.min(rec.psnr)) >= floor
        sizes = [jpeg2000_declared_size(d) for _, _, d in c.iter_encoded_tiles(0) if d.startswith(J2K_SIGNATURE)]
    if floor == 40.0:
        assert (T + 16, T + 16) in sizes, sizes


@pytest.mark.parametrize("floor", [30.0, 40.0])
def test_an_interrupted_auto_compress_resumes_to_the_same_container(he_img, tmp_path, monkeypatch, floor):
    """At 40 dB the stored row holds JPEG 2000 tiles with margins, whose pixels (cropped)
    its neighbours' stitching takes."""
    from wsicodec.classical import J2K_SIGNATURE, jpeg2000_declared_size
    from wsicodec.container import open_container
    from wsicodec.errors import CompressInterrupted
    from wsicodec.pipeline import compress_source
    from wsicodec.tiling.sources import ArraySource
    img = np.ascontiguousarray(np.concatenate([he_img, he_img[::-1]]))   # level 0: 4 x 3 tiles
    codec = get_codec("auto", 4, min_psnr=floor)
    ref = tmp_path / "ref.zarr.zip"
    compress_source(ArraySource(img), ref, codec, tile_size=T)
    if floor == 40.0:
        with open_container(ref) as c:
            row0 = [c.read_encoded_tile(0, col, 0) for col in range(3)]
        assert (T + 16, T + 16) in [jpeg2000_declared_size(d) for d in row0 if d.startswith(J2K_SIGNATURE)]
    real_push, calls = levelencoder.MixedLevelEncoder.push, []

    def push(self, row, *a, **kw):
        calls.append(row)
        if len(calls) == 4:            # level 0's row 0 written, rows 1-2 coded but not, Ctrl-C
            raise KeyboardInterrupt
        return real_push(self, row, *a, **kw)

    monkeypatch.setattr(levelencoder.MixedLevelEncoder, "push", push)
    out = tmp_path / "run.zarr.zip"
    with pytest.raises(CompressInterrupted):
        compress_source(ArraySource(img), out, codec, tile_size=T)
    monkeypatch.setattr(levelencoder.MixedLevelEncoder, "push", real_push)
    stored = []
    real_stored = choice.TileChooser.stored_tile
    monkeypatch.setattr(choice.TileChooser, "stored_tile",
                        lambda self, *a: stored.append(a[0]) or real_stored(self, *a))
    compress_source(ArraySource(img), out, codec, tile_size=T, resume=True)
    assert len(stored) == 3                # row 0 entered row 1's decisions as its stored bytes
    with open_container(ref) as a, open_container(out) as b:
        for lv in range(a.level_count):
            assert list(a.iter_encoded_tiles(lv)) == list(b.iter_encoded_tiles(lv))
            np.testing.assert_array_equal(a.tile_records(lv).psnr, b.tile_records(lv).psnr)
            np.testing.assert_array_equal(a.tile_records(lv).kind, b.tile_records(lv).kind)


def test_plane_glass_beside_tissue_holds_the_floor_as_readers_blend_it(he_img):
    from wsicodec.learned.tileformat import PLANE_KINDS
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:2 * T, 0:2 * T].astype(np.float64)
    glass = np.stack([232 + 8 * xx / (2 * T), 228 + 5 * yy / (2 * T), 238 - 4 * yy / (2 * T)], -1)
    glass = np.clip(np.rint(glass + rng.normal(0, 0.8, glass.shape)), 0, 255).astype(np.uint8)
    img = np.ascontiguousarray(np.concatenate([he_img[:2 * T, :2 * T], glass], axis=1))
    floor = 36.0
    codec = get_codec("auto", 4, min_psnr=floor)
    out = _encode(codec, img)
    kinds = [k for row in out.values() for k, _ in row.records]
    planes = [t for row in out.values() for t in row.tiles
              if t[:4] == b"WSLT" and parse_header(t).kind in PLANE_KINDS]
    assert "glass" in kinds and planes
    _check_floor_and_records(codec, img, out, floor, 0.05)


def test_a_wide_row_goes_through_g_a_a_few_regions_at_a_time(tissue, monkeypatch):
    """Stage 1's g_a takes at most the stages decoder's ``max_batch`` regions per pass,
    whatever the row's width (it once took a whole row: 6.9 GB on a 49152-px-wide slide),
    and the row codes to the same bytes as one pass over it."""
    img = np.ascontiguousarray(np.concatenate([he_crop(tissue)[:T]] * 2, axis=1))     # 1 x 6 tiles
    codec = get_codec("auto", min_psnr=28.0)
    chooser = codec.chooser
    one_pass = _encode(codec, img)
    sizes = []
    real = type(chooser.net).transform

    def transform(self, x, *a, **kw):
        sizes.append(x.shape[0])
        return real(self, x, *a, **kw)

    monkeypatch.setattr(type(chooser.net), "transform", transform)
    monkeypatch.setattr(type(chooser.decoder), "max_batch", property(lambda self: 2))
    batched = _encode(codec, img)
    assert sizes and max(sizes) <= 2 and sum(1 for s in sizes if s == 2) >= 2
    assert [er.tiles for er in batched.values()] == [er.tiles for er in one_pass.values()]


def test_settled_rows_keep_only_what_the_row_below_reads(tissue, monkeypatch):
    """A settled row stays only as the row above of the next (a wide slide holds hundreds
    of tiles a row): no source pixels, margin or standing-by codings, and only the
    stitching ring of its latents; every tile still reaches the floor as readers show it.
    Tiles waiting for stage 2 keep no decoded pixels of a coding they do not show, a bare
    tile no source, and a tile's source is held once (a view of its margin, or its own)."""
    from wsicodec.learned.synthesis import STITCH_RING

    img = np.ascontiguousarray(tissue[200:712, 200:584])            # 4 x 3 tiles
    floor = 36.0                        # some tiles go bare
    codec = get_codec("auto", 4, min_psnr=floor)
    chooser = codec.chooser
    seen = {"above": 0, "waiting": 0, "bare": 0}
    real = type(chooser).settle_row

    def settle_row(self, tiles, above, below):
        for t in above or ():
            assert t.source is None and t.around is None and t.carried is None
            assert t.inner is None or t.fit is None
            if t.context is not None:
                assert t.context.shape[-2] <= STITCH_RING
            seen["above"] += 1
        for t in [*tiles, *(below or ())]:
            for fit in (t.fit, t.carried):
                if fit is not None and t.data != fit.data:
                    assert fit.pixels is None
            if t.inner is None:
                assert t.source is None and t.around is None
                seen["bare"] += 1
            else:
                assert t.source.base is None or t.source.base is t.around
            seen["waiting"] += 1
        return real(self, tiles, above, below)

    monkeypatch.setattr(type(chooser), "settle_row", settle_row)
    out = _encode(codec, img)
    assert seen["above"] == 3 * 3 and seen["waiting"] > 0 and seen["bare"] > 0
    _check_floor_and_records(codec, img, out, floor, 0.05)
