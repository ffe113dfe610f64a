"""Issue #26, model weights and codec settings: opening an untrusted container (or image
stream) never opens a path it names and never unpickles code; weights load with
``weights_only=True``; codec settings are checked in one place, before the weights load."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import forge_digests, shipped_weights_file
from wsicodec.cli import main
from wsicodec.errors import InvalidSettingError, ModelMismatchError, WsiCodecError

torch = pytest.importorskip("torch")


# ------------------------------------------------------------------ helpers

class _Payload:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def evil_weights(path: Path, marker: Path, *, plain_pickle: bool = False) -> Path:
    """A file shaped like wsicodec weights whose unpickling creates ``marker``."""
    import pickle

    state = {"format": "wsicodec-model", "version": 1,
             "config": {"N": 8, "M": 8, "lambdas": [0.01]},
             "state_dict": {"w": torch.zeros(1)}, "provenance": {"note": _Payload(marker)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    if plain_pickle:                       # the legacy (non-zip) format: pickle all the way
        path.write_bytes(pickle.dumps(state))
    else:
        torch.save(state, path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsicodec: error: "), err
    assert "Traceback" not in err and "unexpected" not in err, err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def _image() -> np.ndarray:
    """300 x 219 (w x h) with texture everywhere, so every tile is network-coded."""
    rng = np.random.default_rng(26)
    y, x = np.mgrid[0:219, 0:300]
    img = np.stack([(x * 3 + y) % 256, 128 + 60 * np.sin(y / 7.0), (x ^ y) % 256], axis=-1)
    return np.clip(img + rng.integers(0, 24, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """One small learned container (a .zarr folder, its metadata editable) and what its
    level-0 region decodes to with the shipped weights."""
    from PIL import Image

    import wsicodec
    from wsicodec.codecs import get_codec
    from wsicodec.pipeline import compress

    root = tmp_path_factory.mktemp("made")
    png = root / "small.png"
    Image.fromarray(_image()).save(png)
    box = root / "good.zarr"
    compress(png, box, get_codec("learned", 4), tile_size=128, workers=1)
    with wsicodec.open_slide(box) as slide:
        want = np.asarray(slide.read_region((0, 0), 0, (300, 219)))
    return {"png": png, "box": box, "want": want}


def _attrs_file(box: Path) -> Path:
    return box / "zarr.json"


def crafted(made: dict, dest: Path, edit) -> Path:
    """A copy of the container whose stored metadata ``edit(meta)`` changed, its digests
    recomputed (as a crafted file would have them: the metadata digest alone would refuse
    it before the codec is built, which is not what these tests are about)."""
    out = dest / "crafted.zarr"
    shutil.copytree(made["box"], out)
    f = _attrs_file(out)
    doc = json.loads(f.read_text())
    edit(doc["attributes"]["wsicodec"])
    f.write_text(json.dumps(doc))
    forge_digests(out)
    return out


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("WSICODEC_MODEL", raising=False)
    monkeypatch.delenv("WSICODEC_MODEL_DIR", raising=False)
    return monkeypatch


# ------------------------------------------------------------- the payload works

def test_the_payload_is_live_when_unpickled_unsafely(tmp_path):
    """So the tests below mean something: weights_only=False would run it."""
    probe = tmp_path / "probe-marker"
    evil = evil_weights(tmp_path / "probe.pt", probe)
    torch.load(evil, map_location="cpu", weights_only=False)
    assert probe.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("plain_pickle", [False, True])
def test_load_model_refuses_a_pickle_without_running_it(tmp_path, plain_pickle):
    from wsicodec.checkpoint import load_model
    marker = tmp_path / "MARKER"
    evil = evil_weights(tmp_path / "evil.pt", marker, plain_pickle=plain_pickle)
    with pytest.raises(InvalidSettingError) as exc:
        load_model(evil)
    assert not marker.exists()
    assert "\n" not in str(exc.value) and "evil.pt" in str(exc.value)


# --------------------------------------------- (a) containers and streams naming it

def test_a_stored_model_path_is_never_opened(made, tmp_path, clean_env, capsys):
    """The configuration names the pickle as ``model`` (model_id: the shipped weights'):
    the path is ignored, the tiles decode with the trusted weights."""
    import wsicodec
    marker = tmp_path / "MARKER"
    evil = evil_weights(tmp_path / "evil.pt", marker)
    box = crafted(made, tmp_path, lambda m: m["codec"]["configuration"].update(model=str(evil)))
    with wsicodec.open_slide(box) as slide:
        got = np.asarray(slide.read_region((0, 0), 0, (300, 219)))
    assert np.array_equal(got, made["want"])
    code, out, err = run(capsys, "verify", box, "--decode")
    assert code == 0, err
    code, out, err = run(capsys, "decompress", box, tmp_path / "out.tiff", "--quiet")
    assert code == 0, err
    assert (tmp_path / "out.tiff").stat().st_size > 0
    # a relative path, resolved against the working directory, is ignored as well
    clean_env.chdir(tmp_path)
    rel = crafted(made, tmp_path / "rel", lambda m: m["codec"]["configuration"].update(model="evil.pt"))
    with wsicodec.open_slide(rel) as slide:
        assert np.array_equal(np.asarray(slide.read_region((0, 0), 0, (300, 219))), made["want"])
    assert not marker.exists()


def _name_the_pickle_by_id(evil: Path):
    evil_id = sha256(evil)

    def edit(meta: dict) -> None:
        meta["codec"]["configuration"].update(model_id=evil_id, model=str(evil))
        meta["model_sha256"] = evil_id
    return edit


def test_a_stored_model_id_of_a_pickle_in_the_model_dir_is_refused(made, tmp_path, clean_env, capsys):
    """The pickle sits in a trusted folder under the id the container asks for: it is
    found, loaded as data only, and refused with one line; nothing runs."""
    import wsicodec
    marker = tmp_path / "MARKER"
    folder = tmp_path / "models"
    evil = evil_weights(folder / "evil.pt", marker)
    clean_env.setenv("WSICODEC_MODEL_DIR", str(folder))
    box = crafted(made, tmp_path, _name_the_pickle_by_id(evil))
    with pytest.raises(WsiCodecError, match="plain data"):
        with wsicodec.open_slide(box) as slide:
            slide.read_region((0, 0), 0, (64, 64))
    one_line_error(*run(capsys, "verify", box, "--decode")[::2], "plain data")
    one_line_error(*run(capsys, "decompress", box, tmp_path / "out.tiff")[::2], "plain data")
    assert not (tmp_path / "out.tiff").exists()
    assert not marker.exists()


def test_a_stored_model_id_not_found_says_where_to_put_the_weights(made, tmp_path, clean_env, capsys):
    import wsicodec
    marker = tmp_path / "MARKER"
    evil = evil_weights(tmp_path / "elsewhere" / "evil.pt", marker)    # not a trusted place
    box = crafted(made, tmp_path, _name_the_pickle_by_id(evil))
    with pytest.raises(ModelMismatchError, match="WSICODEC_MODEL_DIR"):
        with wsicodec.open_slide(box) as slide:
            slide.read_region((0, 0), 0, (64, 64))
    one_line_error(*run(capsys, "verify", box, "--decode")[::2], "WSICODEC_MODEL_DIR")
    one_line_error(*run(capsys, "decompress", box, tmp_path / "out.tiff")[::2], "WSICODEC_MODEL_DIR")
    assert not marker.exists()


@pytest.mark.parametrize("config, fragment", [
    ({"quality": 4, "effort": 7}, "unknown option(s) effort in stored codec settings; options are "
                                  "quality, margin, model_id, refine"),
    ({"quality": 99}, "1..8"),
    ({"quality": 4, "model_id": "not-hex"}, "sha256 in hex"),
    ({"quality": 4, "margin": [16]}, "margin"),
])
def test_bad_stored_codec_settings_are_one_line(made, tmp_path, clean_env, capsys, config, fragment):
    box = crafted(made, tmp_path, lambda m: m["codec"].update(configuration=config))
    one_line_error(*run(capsys, "verify", box, "--decode")[::2], fragment)


def test_an_image_stream_naming_a_pickle_is_refused(made, tmp_path, clean_env):
    import wsicodec
    from wsicodec.image import _HEAD
    marker = tmp_path / "MARKER"
    folder = tmp_path / "models"
    evil = evil_weights(folder / "evil.pt", marker)
    data = bytearray(wsicodec.encode(_image()[:64, :80], quality=4))
    off = _HEAD.size - 4 - 32                 # the model sha256 just before the tile count
    data[off:off + 32] = bytes.fromhex(sha256(evil))
    with pytest.raises(ModelMismatchError, match="WSICODEC_MODEL_DIR"):
        wsicodec.decode(bytes(data))
    clean_env.setenv("WSICODEC_MODEL_DIR", str(folder))
    with pytest.raises(InvalidSettingError, match="plain data"):
        wsicodec.decode(bytes(data))
    assert not marker.exists()


def test_the_stored_configuration_keeps_no_path(made, tmp_path):
    from wsicodec.checkpoint import DEFAULT_WEIGHTS
    from wsicodec.codecs import codec_from_dict, get_codec
    doc = json.loads(_attrs_file(made["box"]).read_text())["attributes"]["wsicodec"]
    assert set(doc["codec"]["configuration"]) == {"quality", "model_id", "margin"}
    copy = tmp_path / "mine.pt"
    shutil.copyfile(DEFAULT_WEIGHTS, copy)
    codec = get_codec("learned", 4, model=str(copy))        # the caller's own file: used
    assert codec.loaded.path == copy.resolve()
    assert "model" not in codec.to_dict()["configuration"]
    again = codec_from_dict({"name": "learned", "configuration": {
        "quality": 4, "model_id": codec.model_id, "model": str(tmp_path / "gone.pt"),
        "device": "cuda:7", "precision": "bfloat16"}})      # local options: ignored
    assert again.loaded.path != (tmp_path / "gone.pt") and str(again.device) == "cpu"
    assert again.precision == "float32"


# ------------------------------------------------------ (b) settings fail fast

@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any weights get loaded."""
    from wsicodec import checkpoint

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the settings were checked")
    monkeypatch.setattr(checkpoint, "load_model_for", refuse)
    monkeypatch.setattr(checkpoint, "load_model", refuse)


@pytest.mark.parametrize("argv, fragment", [
    (["--option", "foo=1"], "learned: unknown option(s) foo; options are quality, model, device, margin, "
                            "model_id, refine, precision"),
    (["--quality", "99"], "1..8"),
    (["--option", "refine=abc"], "refine must be an integer"),
    (["--option", "margin=true"], "margin must be an integer"),
    (["--option", "device=[1]"], "device"),
    (["--option", "device=tpu"], "device"),
    (["--option", "model_id=xyz"], "sha256 in hex"),
    (["--option", "model=[1]"], "weights file path"),
    (["--option", "precision=half"], "precision must be one of"),
    (["--codec", "jpeg", "--option", "effort=5"], "jpeg: unknown option(s) effort; options are quality, subsampling"),
    (["--codec", "jpeg", "--option", "quality=50"], "quality given twice"),
])
def test_bad_settings_fail_before_any_weights_load(tmp_path, capsys, no_weights, argv, fragment):
    png = tmp_path / "x.png"
    from PIL import Image
    Image.fromarray(_image()).save(png)
    codec = [] if "--codec" in argv else ["--codec", "learned"]       # the network's settings
    code, _, err = run(capsys, "compress", png, tmp_path / "out.zarr.zip", "--quality", "4", *codec, *argv)
    one_line_error(code, err, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_get_codec_checks_option_names_and_values(no_weights):
    from wsicodec.codecs import codec_from_dict, codec_options, get_codec
    with pytest.raises(InvalidSettingError, match=r"unknown option\(s\) foo; options are quality, model"):
        get_codec("learned", 4, foo=1)
    with pytest.raises(InvalidSettingError, match="options are quality, margin, model_id, refine$"):
        codec_from_dict({"name": "learned", "configuration": {"quality": 4, "effort": 7}})
    with pytest.raises(InvalidSettingError, match="effort"):
        get_codec("jpegxl", 1.0, effort="fast")
    assert codec_options("jpeg") == ("quality", "subsampling")
    assert "model" in codec_options("learned")


def test_a_factory_that_raises_type_error_becomes_a_setting_error():
    from wsicodec import codecs

    def fussy(quality=None, width=1):
        return int(width) + [quality]         # TypeError on purpose

    codecs.register_codec("fussy-test", fussy)
    try:
        with pytest.raises(InvalidSettingError, match="fussy-test: invalid settings"):
            codecs.get_codec("fussy-test", 3, width="2")
        with pytest.raises(InvalidSettingError, match="unknown option"):
            codecs.get_codec("fussy-test", 3, height=2)
    finally:
        codecs._REGISTRY.pop("fussy-test", None)


# ------------------------------------------- (c) the shipped and the old weights

def test_the_shipped_weights_load_weights_only_and_keep_their_id():
    from wsicodec.checkpoint import DEFAULT_WEIGHTS, check_header, load_model, shipped_history
    state = torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=True)
    check_header(state, DEFAULT_WEIGHTS)
    loaded = load_model(DEFAULT_WEIGHTS)
    assert loaded.model_id == sha256(DEFAULT_WEIGHTS) == shipped_history()[-1]["model_id"]


def test_an_old_shipped_file_loads_weights_only(tmp_path):
    """Every file history.json lists is a torch.save dict of tensors and plain data; the
    oldest one (fewest config keys) stands for them: it loads without a conversion."""
    from wsicodec.checkpoint import load_model, shipped_history
    oldest = shipped_history()[0]
    old = shipped_weights_file(oldest["model_id"], tmp_path)   # checks its sha256
    if old is None:
        pytest.skip("the git history of the weights is not here")
    assert sha256(old) == oldest["model_id"]
    assert load_model(old).model_id == oldest["model_id"]


@pytest.mark.parametrize("change, fragment", [
    (lambda s: s["config"].update(N="96"), "config N must be an integer"),
    (lambda s: s["config"].update(lambdas=[]), "config lambdas must be a list"),
    (lambda s: s["config"].update(wider=True), "keys this release does not know (wider)"),
    (lambda s: s.update(config=[1, 2]), "config must be a dict"),
    (lambda s: s["state_dict"].update(extra=[1.0]), "state_dict must map names to tensors"),
    (lambda s: s.update(provenance="x"), "provenance must be a dict"),
    (lambda s: s.update(format="other"), "not a wsicodec model"),
    (lambda s: s["config"].update(M=s["config"]["M"] + 8), "tensors do not fit"),
])
def test_weights_of_the_wrong_shape_are_one_line(tmp_path, change, fragment):
    from wsicodec.checkpoint import DEFAULT_WEIGHTS, load_model
    state = torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=True)
    change(state)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(InvalidSettingError) as exc:
        load_model(bad)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_export_writes_plain_data_only(tmp_path):
    """A provenance with objects (a Namespace, paths) is stored as plain data, so the
    exported file loads with weights_only=True."""
    from wsicodec.checkpoint import DEFAULT_WEIGHTS, load_model
    from wsicodec.export import export
    out = tmp_path / "re.pt"
    sha = export(DEFAULT_WEIGHTS, out, {"note": "t", "args": argparse.Namespace(data=[Path("a")], n=np.int64(3)),
                                        "where": Path("/x"), "pair": (1, 2)})
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert state["provenance"]["args"] == {"data": ["a"], "n": 3}
    assert state["provenance"]["where"] == "/x" and state["provenance"]["pair"] == [1, 2]
    json.dumps(state["provenance"])
    assert load_model(out).model_id == sha and load_model(out).decodes(sha256(DEFAULT_WEIGHTS))
    assert not list(tmp_path.glob("*.tmp"))
