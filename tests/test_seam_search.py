"""The ``auto`` codec's opt-in seam search (``seam_search``, :mod:`wsicodec.learned.seamsearch`).

The image: 2 x 3 tiles of H&E with the middle top tile made noisy, which the network cannot
code at the floor and JPEG 2000 takes, so three network tiles meet a bare side and
two of them have network neighbours too (their latents those see are held).  Grids go
through the level encoder and ``decode_tiles`` as in ``test_auto.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_flush_denormal(True)

from test_auto import T, _decode, _encode, he_crop  # noqa: E402

from wsicodec.codecs import codec_from_dict, get_codec  # noqa: E402
from wsicodec.errors import InvalidSettingError  # noqa: E402
from wsicodec.learned import seamsearch  # noqa: E402
from wsicodec.learned.tileformat import MAGIC, parse_header  # noqa: E402

Q, FLOOR, STEPS = 4, 32.0, 10


@pytest.fixture(scope="module")
def img(tissue):
    a = he_crop(tissue)
    rng = np.random.default_rng(5)
    a[:T, T:2 * T] = np.clip(a[:T, T:2 * T] + rng.normal(0, 10, (T, T, 3)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


@pytest.fixture(scope="module")
def coded(img):
    """(codec, rows) with the search off and on."""
    off = get_codec("auto", Q, min_psnr=FLOOR)
    on = get_codec("auto", Q, min_psnr=FLOOR, seam_search=STEPS)
    return {"off": (off, _encode(off, img)), "on": (on, _encode(on, img))}


def _tile(rows, c, r):
    return rows[r].tiles[c]


@pytest.mark.parametrize("bad", [-1, seamsearch.MAX_SEAM_SEARCH + 1, 2.5, True, "40", None, [40]])
def test_bad_seam_search_is_refused(bad):
    with pytest.raises(InvalidSettingError, match="seam_search must be an integer in 0..1000"):
        get_codec("auto", Q, seam_search=bad)


def test_seam_search_is_the_auto_codecs_option():
    import wsicodec
    with pytest.raises(InvalidSettingError, match="seam_search"):
        wsicodec.encode(np.zeros((16, 16, 3), np.uint8), 4, seam_search=3)     # learned
    with pytest.raises(InvalidSettingError, match="seam_search"):
        get_codec("learned", 4, seam_search=3)


def test_cli_refuses_a_bad_seam_search_in_one_line(tmp_path, capsys):
    from PIL import Image

    from wsicodec.cli import main
    src = tmp_path / "a.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(src)
    code = main(["compress", str(src), str(tmp_path / "o.zarr"), "--option", "seam_search=-4"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and "seam_search" in lines[0] and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_off_is_the_default_and_codes_as_before(coded, img):
    off, rows = coded["off"]
    assert off.seam_search == 0 and "seam_search" not in off.to_dict()["configuration"]
    zero = get_codec("auto", Q, min_psnr=FLOOR, seam_search=0)
    assert zero.to_dict() == off.to_dict()
    again = _encode(zero, img)
    assert all(again[r].tiles == rows[r].tiles for r in rows)


def test_the_fixture_has_network_tiles_beside_a_bare_tile(coded):
    _, rows = coded["off"]
    assert [k for k, _ in rows[0].records] == ["learned", "jpeg2000", "learned"], rows[0].records
    assert [k for k, _ in rows[1].records] == ["learned"] * 3, rows[1].records


def test_on_holds_the_floor_and_the_record_is_what_readers_show(coded, img):
    on, rows = coded["on"]
    measured = _decode(on, img, rows)
    for (c, r), p in measured.items():
        kind, rec = rows[r].records[c]
        assert p >= FLOOR, (c, r, kind, p)
        assert abs(p - rec) < 0.05, (c, r, kind, p, rec)


def test_on_changes_only_the_latents_no_other_network_tile_sees(coded):
    (off, r_off), (_, r_on) = coded["off"], coded["on"]
    dec = off.decoder
    searched = 0
    for (c, r), nb_jxl in (((0, 0), (1, 0)), ((2, 0), (1, 0)), ((1, 1), (1, 0))):
        a, b = _tile(r_off, c, r), _tile(r_on, c, r)
        assert a[:4] == MAGIC == b[:4]
        la, lb = (dec.latents(t, parse_header(t), "t") for t in (a, b))
        seen_by = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                   if (dr or dc) and 0 <= c + dc < 3 and 0 <= r + dr < 2 and (c + dc, r + dr) != nb_jxl]
        hold = seamsearch.held_mask(tuple(la.shape), seen_by)
        assert hold.any()
        assert torch.equal(la[hold], lb[hold]), (c, r)
        searched += a != b
    assert searched                               # the search kept a coding somewhere
    for c in range(3):                            # nobody else's bytes moved
        if (c, 1) != (1, 1):
            assert _tile(r_off, c, 1) == _tile(r_on, c, 1)
    assert _tile(r_off, 1, 0) == _tile(r_on, 1, 0)


def test_a_search_that_moved_held_latents_is_an_error(img, monkeypatch):
    real = seamsearch.refine_latents

    def unheld(*a, **kw):
        kw["hold"] = None
        return real(*a, **kw)
    monkeypatch.setattr(seamsearch, "refine_latents", unheld)
    with pytest.raises(RuntimeError, match="neighbours see"):
        _encode(get_codec("auto", Q, min_psnr=FLOOR, seam_search=STEPS), img)


def test_on_is_deterministic_and_a_resumed_row_gives_the_same_bytes(coded, img):
    on, rows = coded["on"]
    again = _encode(on, img, stored_rows={0: rows[0].tiles})
    assert 0 not in again and again[1].tiles == rows[1].tiles


def test_container_and_image_stream_decode_and_record_the_option(coded, img, tmp_path):
    import wsicodec
    from wsicodec.container import open_container
    from wsicodec.pipeline import compress_source
    from wsicodec.tiling.sources import ArraySource
    on, rows = coded["on"]
    assert on.to_dict()["configuration"]["seam_search"] == STEPS
    back = codec_from_dict(on.to_dict())
    assert back.seam_search == STEPS and back.to_dict() == on.to_dict()
    box = tmp_path / "s.zarr.zip"
    compress_source(ArraySource(img), box, on, tile_size=T)
    with open_container(box) as c:
        assert c.metadata.codec["configuration"]["seam_search"] == STEPS
        assert c.codec.seam_search == STEPS
        tiles = {(col, r): data for col, r, data in c.iter_encoded_tiles(0)}
    assert all(tiles[(col, r)] == rows[r].tiles[col] for col, r in tiles)
    with wsicodec.open_slide(box) as s:
        region = np.asarray(s.read_region((0, 0), 0, s.dimensions))[..., :3]
    stream = wsicodec.encode(img, Q, tile_size=T, codec="auto", min_psnr=FLOOR, seam_search=STEPS)
    assert (wsicodec.decode(stream) == region).all()
    for r in range(2):
        for col in range(3):
            a, b = region[r * T:(r + 1) * T, col * T:(col + 1) * T], img[r * T:(r + 1) * T, col * T:(col + 1) * T]
            assert 10 * np.log10(255 ** 2 / ((a.astype(float) - b) ** 2).mean()) >= FLOOR
