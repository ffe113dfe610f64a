"""The training script runs, checkpoints, resumes and exports (a few tiny steps)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "train"))
VGG = REPO.parent / "shared" / "weights" / "vgg16_features_imagenet.pth"
TRAIN = REPO.parent / "shared" / "data" / "he" / "train"


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """train.main sets torch's thread count (``--threads``), and g_s's float sums, so a
    decode's last bits, depend on it: restore it, or tests run after these (the golden
    pixels) see another machine."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(not (VGG.is_file() and TRAIN.is_dir()), reason="shared weights/data not found")
def test_train_resume_export_and_code(tmp_path):
    import train as train_script

    from wsicodec.checkpoint import load_model
    from wsicodec.export import export
    from wsicodec.learned import LearnedCodec

    from PIL import Image
    data = tmp_path / "data"
    data.mkdir()
    for p in sorted(TRAIN.glob("*.png"))[:2]:
        Image.open(p).crop((0, 0, 200, 150)).save(data / p.name)
    out = tmp_path / "run"
    common = ["--data", str(data), "--out", str(out), "--N", "16", "--M", "24", "--batch", "2",
              "--crop", "64", "--alpha", "0.1", "--vgg", str(VGG), "--log-every", "1"]
    assert train_script.main([*common, "--steps", "2"]) == 0
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["step"] == 2 and state["config"]["N"] == 16
    assert train_script.main([*common, "--steps", "3", "--resume", str(out / "last.pt"), "--feat-crop", "32"]) == 0
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 3
    log = (out / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,") and len(log) == 4     # header + 3 steps
    sha = export(out / "last.pt", tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.model_id == sha and loaded.provenance["train_step"] == 3
    codec = LearnedCodec(3, model=str(tmp_path / "m.pt"))
    tile = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    assert codec.decode(codec.encode(tile)).shape == tile.shape
    # training resumes from shipped weights too (the GPU session starts from them)
    out2 = tmp_path / "run2"
    args2 = [a if a != str(out) else str(out2) for a in common]
    assert train_script.main([*args2, "--steps", "4", "--resume", str(tmp_path / "m.pt"),
                              "--lambdas", "0.001", "0.004", "0.016", "0.03", "0.05", "0.07", "0.09", "0.1"]) == 0
    state2 = torch.load(out2 / "last.pt", weights_only=False)
    assert state2["step"] == 4 and state2["config"]["lambdas"][0] == 0.001
    # a training checkpoint onto a ladder of another length: the gains' Adam moments follow
    assert train_script.main([*args2, "--steps", "5", "--resume", str(out2 / "last.pt"),
                              "--lambdas", "0.0005", "0.001", "0.004", "0.1"]) == 0
    state3 = torch.load(out2 / "last.pt", weights_only=False)
    assert state3["step"] == 5 and state3["model"]["log_gain"].shape == (4, 24)
    moments = [st["exp_avg_sq"].shape for st in state3["optimizer"]["state"].values()]
    assert (4, 24) in moments and (8, 24) not in moments


def test_remap_gains_interpolates_and_extends_the_ladder():
    import surgery

    old = (0.001, 0.004, 0.016)
    log_gain = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    sd = {"log_gain": log_gain, "log_hgain": log_gain.clone(), "other": torch.ones(1)}
    same = surgery.remap_gains(sd, old, old)
    assert torch.allclose(same["log_gain"], log_gain) and same["other"] is sd["other"]
    new = surgery.remap_gains(sd, old, (0.00025, 0.002, 0.032))
    # 0.002 is halfway (in log λ) between 0.001 and 0.004
    assert torch.allclose(new["log_gain"][1], torch.tensor([1.0, 2.0]))
    # beyond the ends: ½·Δlog λ for the latent gain, ¼ for the hyper gain
    step = np.log(4.0)
    assert torch.allclose(new["log_gain"][0], log_gain[0] - 0.5 * step)
    assert torch.allclose(new["log_gain"][2], log_gain[2] + 0.5 * np.log(2.0))
    assert torch.allclose(new["log_hgain"][0], log_gain[0] - 0.25 * step)


def test_remap_adam_rows_takes_the_nearest_knot():
    import surgery

    from wsicodec.learned.network import ModelConfig, WsiHyperprior

    old = (0.001, 0.004, 0.016)
    cfg = ModelConfig(N=8, M=12, lambdas=old)
    names = [n for n, _ in WsiHyperprior(cfg).named_parameters() if not n.endswith("quantiles")]
    i = names.index("log_gain")
    rows = torch.arange(3.0)[:, None].repeat(1, 12)
    opt_state = {"state": {i: {"step": torch.tensor(7.0), "exp_avg": rows.clone(), "exp_avg_sq": rows + 1}}}
    surgery.remap_adam_rows(opt_state, names, old, (0.0002, 0.001, 0.005, 0.016))
    st = opt_state["state"][i]
    assert st["exp_avg"][:, 0].tolist() == [0.0, 0.0, 1.0, 2.0]
    assert st["exp_avg_sq"][:, 0].tolist() == [1.0, 1.0, 2.0, 3.0]


@pytest.mark.skipif(not VGG.is_file(), reason="shared VGG16 weights not found")
def test_feature_distance_from_the_trimmed_trunk_matches_the_full_one(tmp_path):
    """pack_device.sh carries only the layers up to relu2_2; the distance is the same."""
    import train as train_script

    full = torch.load(VGG, weights_only=True)
    trimmed = tmp_path / "vgg_relu2_2.pth"
    torch.save({k: v for k, v in full.items() if int(k.split(".")[0]) < 9}, trimmed)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    d_full = train_script.FeatureDistance(str(VGG))(a, b)
    d_trim = train_script.FeatureDistance(str(trimmed))(a, b)
    assert d_full.shape == (2,) and torch.equal(d_full, d_trim) and (d_full > 0).all()
    assert train_script.FeatureDistance(str(trimmed))(a, a).abs().max() < 1e-6
    a.requires_grad_(True)
    b.requires_grad_(True)
    train_script.FeatureDistance(str(trimmed))(a, b).sum().backward()
    assert a.grad.abs().sum() > 0 and b.grad is None     # the reference is never differentiated


@pytest.mark.skipif(not TRAIN.is_dir(), reason="shared data not found")
def test_sigterm_writes_the_checkpoint_and_exits_cleanly(tmp_path):
    import signal
    import subprocess
    import time

    from PIL import Image
    data = tmp_path / "data"
    data.mkdir()
    Image.open(sorted(TRAIN.glob("*.png"))[0]).crop((0, 0, 160, 160)).save(data / "a.png")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "train" / "train.py"), "--data", str(data),
                             "--out", str(out), "--N", "8", "--M", "8", "--batch", "1", "--crop", "64",
                             "--minutes", "30", "--log-every", "1", "--ckpt-every", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "log.csv").is_file() or len((out / "log.csv").read_text().splitlines()) < 3:
            assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        text, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, text
    assert "stopped by signal" in text
    assert torch.load(out / "last.pt", weights_only=False)["step"] >= 2


def test_added_residual_blocks_start_as_the_identity():
    """``--enc-blocks`` / ``--dec-blocks``: a trained g_a and g_s given blocks compute what they did."""
    import surgery

    from wsicodec.learned.fast import FastTransform
    from wsicodec.learned.network import ModelConfig, WsiHyperprior

    cfg = ModelConfig(N=8, M=12, lambdas=(1e-3, 4e-3))
    old = WsiHyperprior(cfg)
    with torch.no_grad():
        for p in [*old.g_a.parameters(), *old.g_s.parameters()]:
            p.add_(0.01 * torch.randn_like(p))
    grown = ModelConfig.from_dict({**cfg.to_dict(), "enc_blocks": 2, "dec_blocks": 1})
    sd = surgery.add_blocks(old.state_dict(), cfg, grown)
    assert "g_a.6.weight" not in sd and "g_a.8.weight" in sd
    assert torch.equal(sd["g_s.3.weight"], old.state_dict()["g_s.2.weight"])    # g_s's layers after the block move
    assert torch.equal(sd["g_s.0.weight"], old.state_dict()["g_s.0.weight"])    # those before stay
    new = WsiHyperprior(grown)
    missing, unexpected = new.load_state_dict(sd, strict=False)
    assert not unexpected and sorted({k.rsplit(".", 2)[0] for k in missing}) == ["g_a.6", "g_a.7", "g_s.2"]
    assert sorted({n.rsplit(".", 2)[0] for n in surgery.block_params(new)}) == ["g_a.6", "g_a.7", "g_s.2"]
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    y = torch.rand(2, 12, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(new.g_a(x), old.g_a(x))
        assert torch.equal(new.g_s(y), old.g_s(y))
        for p in [*new.g_a[6].parameters(), *new.g_s[2].parameters()]:   # once trained the blocks count,
            p.add_(0.1 * torch.randn_like(p))                               # in the fast copies too
        for part, inp in (("g_a", x), ("g_s", y)):
            moved, fast = getattr(new, part)(inp), FastTransform(getattr(new, part))(inp)
            assert (moved - getattr(old, part)(inp)).abs().max() > 1e-3
            assert (fast - moved).abs().max() <= 1e-5 * moved.abs().max()
    with pytest.raises(SystemExit, match="already has 2"):
        surgery.add_blocks(sd, grown, ModelConfig.from_dict({**grown.to_dict(), "enc_blocks": 1}))
    # weights written before the fields existed have no blocks
    old_cfg = ModelConfig.from_dict({"N": 8, "M": 12, "lambdas": [1e-3, 4e-3]})
    assert old_cfg.enc_blocks == 0 and old_cfg.dec_blocks == 0


def test_added_latent_channels_leave_the_old_ones_computing_what_they_did():
    """``--grow-M``: pixels, old channels' symbols, μ, σ and z are those of the narrower network,
    the new channels carry g_a's output from the start and nothing reads them yet; and it trains."""
    import dataclasses

    import surgery


    from wsicodec.learned.network import ModelConfig, WsiHyperprior

    cfg = ModelConfig(N=8, M=12, lambdas=(1e-3, 4e-3, 1.6e-2), enc_blocks=1, dec_blocks=1)
    old = WsiHyperprior(cfg)
    with torch.no_grad():
        for p in old.parameters():
            p.add_(0.01 * torch.randn_like(p))
    wide = dataclasses.replace(cfg, M=20)
    sd = surgery.add_latent_channels(old.state_dict(), cfg, wide)
    new = WsiHyperprior(wide)
    missing, unexpected = new.load_state_dict(sd, strict=False)
    assert not missing and not unexpected
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    q = torch.tensor([1.5, 3.0])
    old.eval()
    new.eval()
    with torch.no_grad():
        ya, yb = old.analysis_y(x, q), new.analysis_y(x, q)
        assert torch.equal(yb[:, :12], ya) and yb[:, 12:].abs().amax() > 0    # new channels carry something
        za, zb = old.hyper_analysis(ya, q), new.hyper_analysis(yb, q)
        assert torch.allclose(za, zb, atol=1e-6)                                # h_a ignores them
        sa, ma = old.h_s(za / old.gains(q)[1]).chunk(2, 1)
        sb, mb = new.h_s(zb / new.gains(q)[1]).chunk(2, 1)
        assert torch.allclose(sb[:, :12], sa, atol=1e-6) and torch.allclose(mb[:, :12], ma, atol=1e-6)
        assert torch.equal(mb[:, 12:], torch.zeros_like(mb[:, 12:]))           # μ = 0, σ one bias
        assert torch.allclose(sb[:, 12:], torch.full_like(sb[:, 12:], surgery.NEW_SIGMA))
        silent = torch.cat([ya, torch.zeros_like(yb[:, 12:])], 1)
        assert torch.allclose(new.g_s(silent), old.g_s(ya), atol=1e-6)         # old rows as they were,
        rows = new.g_s[0].weight.abs().mean((1, 2, 3))                           # the new ones small
        scale = surgery.NEW_ROWS_SCALE
        assert rows[12:].mean().item() == pytest.approx(scale * rows[:12].mean().item(), rel=1e-4)
    with pytest.raises(SystemExit, match="already has M = 20"):
        surgery.add_latent_channels(sd, wide, cfg)
    with pytest.raises(SystemExit, match="changes M only"):
        surgery.add_latent_channels(old.state_dict(), cfg, dataclasses.replace(wide, N=16))
    # one training step moves the new filters and the rows that read them (small, not zero)
    new.train()
    g_a_last = lambda m: m.g_a[len(m.g_a) - 1]    # noqa: E731
    with torch.no_grad():     # this tiny random g_a's new latents all round to 0: give them size
        g_a_last(new).weight[12:] *= 1e3
    out = new(x, q)
    loss = (out["bits_y"] + out["bits_z"]).mean() / 1e4 + (out["x_hat"] - x).pow(2).mean()
    loss.backward()
    assert g_a_last(new).weight.grad[12:].abs().amax() > 0 and new.g_s[0].weight.grad[12:].abs().amax() > 0


def test_bf16_body_runs_the_inner_layers_in_bfloat16_and_keeps_the_rest():
    """``--bf16-body``: g_a's/g_s's inner layers in bfloat16, their ends, the parameters and
    the checkpoint's names float32; the network computes nearly what it did."""
    import train as train_script

    from wsicodec.learned.network import ModelConfig, WsiHyperprior

    cfg = ModelConfig(N=16, M=24, lambdas=(1e-3, 4e-3), enc_blocks=1, dec_blocks=1)
    torch.manual_seed(0)
    ref, mixed = WsiHyperprior(cfg), WsiHyperprior(cfg)
    mixed.load_state_dict(ref.state_dict())
    for part in (mixed.g_a, mixed.g_s):
        train_script.bf16_body(part)
    assert list(mixed.state_dict()) == list(ref.state_dict())
    assert all(p.dtype == torch.float32 for p in mixed.parameters())
    dtypes = {}   # every convolution's output: (part, layer index, module name) -> dtype
    for name in ("g_a", "g_s"):
        for i, layer in enumerate(getattr(mixed, name)):
            for sub, mod in layer.named_modules():
                if isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                    mod.register_forward_hook(
                        lambda m, inp, out, key=(name, i, sub): dtypes.__setitem__(key, out.dtype))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    q = torch.tensor([1.0, 2.0])
    out_ref, out_mix = ref(x, q), mixed(x, q)
    for name in ("g_a", "g_s"):
        last = len(getattr(mixed, name)) - 1
        ends = {d for (part, i, _), d in dtypes.items() if part == name and i in (0, last)}
        body = {d for (part, i, _), d in dtypes.items() if part == name and 0 < i < last}
        assert ends == {torch.float32} and body == {torch.bfloat16}, (name, dtypes)
    assert out_mix["x_hat"].dtype == torch.float32
    err = (out_mix["x_hat"] - out_ref["x_hat"]).abs().max() / out_ref["x_hat"].abs().max()
    assert 0 < err < 0.05
    out_mix["x_hat"].float().pow(2).mean().add(out_mix["bits_y"].sum() * 1e-4).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for n, p in mixed.named_parameters() if n.startswith(("g_a.", "g_s.")))


def _tiny_weights(tmp_path: Path) -> tuple[Path, list[str], Path, str]:
    """A tiny network trained 2 steps on one crop, exported: (data, args, weights, id)."""
    import train as train_script

    from PIL import Image

    from wsicodec.export import export

    data = tmp_path / "data"
    data.mkdir()
    Image.open(sorted(TRAIN.glob("*.png"))[0]).crop((0, 0, 160, 160)).save(data / "a.png")
    common = ["--data", str(data), "--batch", "2", "--crop", "64", "--log-every", "1"]
    assert train_script.main([*common, "--out", str(tmp_path / "a"), "--N", "8", "--M", "12", "--steps", "2",
                              "--lambdas", "0.001", "0.004", "0.016"]) == 0
    old = tmp_path / "old.pt"
    return data, common, old, export(tmp_path / "a" / "last.pt", old)


@pytest.mark.skipif(not TRAIN.is_dir(), reason="shared data not found")
def test_freeze_decoder_trains_the_encoder_and_keeps_every_decoder_tensor(tmp_path):
    """``--freeze-decoder``: the exported weights decode the old ones' bitstreams bit for bit."""
    import train as train_script

    from PIL import Image

    from wsicodec.export import export
    from wsicodec.learned import LearnedCodec
    from wsicodec.learned.network import WsiHyperprior

    data, common, _, sha_old = _tiny_weights(tmp_path)
    assert train_script.main([*common, "--out", str(tmp_path / "b"), "--resume", str(tmp_path / "old.pt"),
                              "--steps", "5", "--lr", "1e-2", "--enc-blocks", "1", "--freeze-decoder", "--hard-rate"]) == 0
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert state["config"]["enc_blocks"] == 1 and state["step"] == 5
    assert all(n.startswith(("g_a.", "h_a.")) for n in state["trainable"])
    sha_new = export(tmp_path / "b" / "last.pt", tmp_path / "new.pt")
    old_sd = torch.load(tmp_path / "old.pt", weights_only=False)["state_dict"]
    new_sd = torch.load(tmp_path / "new.pt", weights_only=False)["state_dict"]
    decoder = [k for k in old_sd if k.startswith(WsiHyperprior.DECODER_PARTS)]
    assert decoder and all(torch.equal(old_sd[k], new_sd[k]) for k in decoder)      # tables included
    assert not torch.equal(old_sd["h_a.0.weight"], new_sd["h_a.0.weight"])         # the encoder moved
    assert sha_new != sha_old
    tile = np.asarray(Image.open(data / "a.png").convert("RGB"))[:128, :128].copy()
    codec = LearnedCodec(4, model=str(tmp_path / "new.pt"))     # g_a with its block, fast copy included
    assert codec.decode(codec.encode(tile)).shape == tile.shape


@pytest.mark.skipif(not TRAIN.is_dir(), reason="shared data not found")
def test_only_new_channels_moves_them_and_keeps_the_old_channels_path(tmp_path):
    """``--grow-M 20 --only-new-channels 12``: the new channels' filters, rows, σ/μ and gains
    move; every entry the first 12 channels' symbols, z and pixels depend on stays bit for bit."""
    import surgery
    import train as train_script

    from wsicodec.learned.network import ModelConfig, WsiHyperprior

    data, common, old, _ = _tiny_weights(tmp_path)
    assert train_script.main([*common, "--out", str(tmp_path / "w"), "--resume", str(old), "--grow-M", "20",
                              "--only-new-channels", "12", "--steps", "4", "--lr", "1e-2"]) == 0
    grown = torch.load(tmp_path / "w" / "last.pt", weights_only=False)
    assert grown["config"]["M"] == 20
    first = torch.load(old, weights_only=False)
    start = surgery.add_latent_channels(surgery.from_shipped(first)["model"],
                                             ModelConfig.from_dict(first["config"]),
                                             ModelConfig.from_dict(grown["config"]))
    masks = surgery.new_channel_masks(WsiHyperprior(ModelConfig.from_dict(grown["config"])), 12)
    sd = grown["model"]
    for k, v in start.items():
        m = masks.get(k)
        if m is None:
            assert torch.equal(sd[k], v), k
        else:
            assert torch.equal(sd[k][m == 0], v[m == 0]), k
    moved = [k for k, m in masks.items() if not torch.equal(sd[k][m == 1], start[k][m == 1])]
    assert {"g_a.6.weight", "g_s.0.weight", "h_s.4.bias", "log_gain"} <= set(moved)
    with pytest.raises(SystemExit, match="M = 20"):
        surgery.new_channel_masks(WsiHyperprior(ModelConfig.from_dict(grown["config"])), 20)


@pytest.mark.skipif(not (VGG.is_file() and TRAIN.is_dir()), reason="shared weights/data not found")
def test_probe_checkpoint_compares_a_wider_network_with_its_base(tmp_path, capsys):
    """train/probe_checkpoint.py: per quality both networks' rate, PSNR and objective, and for a
    grown one whether its new channels carry bits; the same network probed against itself ties."""
    import probe_checkpoint
    import train as train_script

    data, common, old, _ = _tiny_weights(tmp_path)
    assert train_script.main([*common, "--out", str(tmp_path / "w"), "--resume", str(old), "--grow-M", "20",
                              "--steps", "3"]) == 0
    assert probe_checkpoint.main([str(tmp_path / "w" / "last.pt"), "--base", str(old), "--images", str(data),
                                  "--count", "1", "--crop", "128", "--vgg", str(VGG)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(ln.startswith("q") and "new channels:" in ln for ln in lines) == 8
    assert lines[-2].startswith("unquantised") and lines[-1].startswith("g_s rows reading the new channels")
    assert probe_checkpoint.main([str(old), "--base", str(old), "--images", str(data), "--count", "1",
                                  "--crop", "128", "--vgg", str(VGG)]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("q")]
    for ln in rows:
        base, probed = ln.split(" | ")[:2]
        assert base.split("base ")[1] == probed.split("probed ")[1]


@pytest.mark.skipif(not TRAIN.is_dir(), reason="shared data not found")
def test_free_rate_spares_the_new_channels_and_logs_the_full_rate(tmp_path, capsys):
    """``--free-rate K FREE RAMP``: while channels K.. ride free their filters see no rate gradient,
    the log still shows every bit; bad settings are refused before any work."""
    import csv

    import train as train_script

    data, common, old, _ = _tiny_weights(tmp_path)
    args = [*common, "--resume", str(old), "--grow-M", "20", "--steps", "4", "--lr", "1e-2"]
    assert train_script.main([*args, "--out", str(tmp_path / "f"), "--free-rate", "12", "60", "60"]) == 0
    for d in ("p", "q"):
        assert train_script.main([*args, "--out", str(tmp_path / d)]) == 0
    logged = [float(r["bpp_est"]) for r in csv.DictReader(open(tmp_path / "f" / "log.csv"))]
    assert logged and all(b > 0 for b in logged)
    free, paid, again = (torch.load(tmp_path / d / "last.pt", weights_only=False)["model"]["g_a.6.weight"][12:]
                         for d in "fpq")
    # the same crops and noise: beyond the float noise between two identical runs, the rate differs
    assert (free - paid).abs().amax() > 10 * (paid - again).abs().amax()
    with pytest.raises(SystemExit):
        train_script.main([*args, "--out", str(tmp_path / "x"), "--free-rate", "12", "30", "10"])
    assert "FREE_MIN <= RAMP_MIN" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="M = 20"):
        train_script.main([*args, "--out", str(tmp_path / "y"), "--free-rate", "20", "0", "1"])


@pytest.mark.skipif(not TRAIN.is_dir(), reason="shared data not found")
def test_decoder_blocks_train_faster_resume_and_code(tmp_path):
    """``--dec-blocks 1 --block-lr-mult``: the block trains at its own rate, a resume keeps the two
    optimiser groups, and the exported weights code a tile; the decoder differs, so export refuses
    to call them the old weights' decoder."""
    import train as train_script

    from PIL import Image

    from wsicodec.export import export
    from wsicodec.errors import WsiCodecError
    from wsicodec.learned import LearnedCodec

    data, common, old, _ = _tiny_weights(tmp_path)
    grow = [*common, "--out", str(tmp_path / "b"), "--lr", "1e-3", "--lr-final", "1e-3", "--dec-blocks", "1",
            "--block-lr-mult", "10"]
    assert train_script.main([*grow, "--resume", str(old), "--steps", "4"]) == 0
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert state["config"]["dec_blocks"] == 1 and state["step"] == 4
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx([1e-3, 1e-2])
    assert state["model"]["g_s.2.conv2.weight"].abs().max() > 0          # the block moved off the identity
    assert train_script.main([*grow, "--resume", str(tmp_path / "b" / "last.pt"), "--steps", "6"]) == 0
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert state["step"] == 6 and len(state["optimizer"]["state"]) == len(state["trainable"])
    with pytest.raises(WsiCodecError, match="decoder"):
        export(tmp_path / "b" / "last.pt", tmp_path / "x.pt", decoder_of=old)
    assert not (tmp_path / "x.pt").exists()
    export(tmp_path / "b" / "last.pt", tmp_path / "new.pt")
    tile = np.asarray(Image.open(data / "a.png").convert("RGB"))[:128, :128].copy()
    codec = LearnedCodec(4, model=str(tmp_path / "new.pt"))
    assert codec.decode(codec.encode(tile)).shape == tile.shape
    with pytest.raises(SystemExit):
        train_script.main([*grow, "--resume", str(old), "--freeze-decoder", "--steps", "1"])


@pytest.mark.skipif(not TRAIN.is_dir(), reason="shared data not found")
def test_weights_with_the_same_decoder_open_the_data_of_the_weights_before(tmp_path, monkeypatch):
    """Exported with ``decoder_of``, retrained-encoder weights decode the old ones' streams and
    containers exactly (and the old weights still refuse the new data)."""
    import train as train_script

    from PIL import Image

    import wsicodec
    from wsicodec.checkpoint import load_model, load_model_for
    from wsicodec.export import export
    from wsicodec.errors import ModelMismatchError, WsiCodecError
    from wsicodec.learned import LearnedCodec
    from wsicodec.pipeline import compress

    data, common, old, old_id = _tiny_weights(tmp_path)
    assert train_script.main([*common, "--out", str(tmp_path / "b"), "--resume", str(old),
                              "--steps", "4", "--lr", "1e-2", "--freeze-decoder"]) == 0
    new = tmp_path / "new.pt"
    export(tmp_path / "b" / "last.pt", new, decoder_of=old)
    assert load_model(new).provenance["decodes_for"] == [old_id]
    # and from its own joint-training sibling, whose decoder moved, nothing is written
    assert train_script.main([*common, "--out", str(tmp_path / "c"), "--resume", str(old), "--steps", "3",
                              "--lr", "1e-2"]) == 0
    with pytest.raises(WsiCodecError, match="not the decoder of old.pt: .* differs"):
        export(tmp_path / "c" / "last.pt", tmp_path / "sib.pt", decoder_of=old)
    assert not (tmp_path / "sib.pt").exists()

    tile = np.asarray(Image.open(data / "a.png").convert("RGB"))[:150, :140].copy()
    stream = wsicodec.encode(tile, model=str(old))
    assert np.array_equal(wsicodec.decode(stream, model=str(new)), wsicodec.decode(stream, model=str(old)))
    with pytest.raises(ModelMismatchError):                  # one way only: old weights, new data
        wsicodec.decode(wsicodec.encode(tile, model=str(new)), model=str(old))
    # a container made with the old weights, opened where only the new ones are (the default)
    box = compress(data / "a.png", tmp_path / "old.zarr.zip", LearnedCodec(4, model=str(old)))
    assert box.tiles > 0
    # the container names no weights file: its reader points a trusted place at them
    monkeypatch.setenv("WSICODEC_MODEL", str(old))
    want = wsicodec.open_slide(tmp_path / "old.zarr.zip").read_region((0, 0), 0, (160, 160))
    old.rename(tmp_path / "elsewhere.pt")
    monkeypatch.setenv("WSICODEC_MODEL", str(new))
    monkeypatch.delenv("WSICODEC_MODEL_DIR", raising=False)
    assert load_model_for(old_id).model_id != old_id
    with wsicodec.open_slide(tmp_path / "old.zarr.zip") as slide:
        assert np.array_equal(np.asarray(slide.read_region((0, 0), 0, (160, 160))), np.asarray(want))


@pytest.mark.skipif(not (VGG.is_file() and TRAIN.is_dir()), reason="shared weights/data not found")
def test_accum_sums_micro_batches_into_one_optimiser_step(tmp_path, monkeypatch):
    import train as train_script

    from PIL import Image
    data = tmp_path / "data"
    data.mkdir()
    for p in sorted(TRAIN.glob("*.png"))[:2]:
        Image.open(p).crop((0, 0, 200, 150)).save(data / p.name)
    drawn, steps = [], []
    batch = train_script.CropSampler.batch
    monkeypatch.setattr(train_script.CropSampler, "batch", lambda self, n: drawn.append(n) or batch(self, n))
    adam_step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: steps.append(1) or adam_step(self, *a, **k))
    out = tmp_path / "run"
    assert train_script.main(["--data", str(data), "--out", str(out), "--N", "16", "--M", "24",
                              "--batch", "2", "--accum", "3", "--crop", "64", "--steps", "2",
                              "--log-every", "1"]) == 0
    assert drawn == [2] * 6             # 3 micro-batches of 2 crops per step
    assert len(steps) == 2 * 2          # per step: the main optimiser and the quantiles'
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 2
    assert len((out / "log.csv").read_text().splitlines()) == 3


def test_augmented_crops_on_worker_processes_train_as_in_the_process(tmp_path, monkeypatch):
    """--augment with --sampler-workers (what gpu_session.sh runs on a GPU): the worker
    processes start from train.py, and the run trains on the crops the training process
    itself would draw."""
    import augment
    import train as train_script

    from PIL import Image
    data = tmp_path / "data"
    data.mkdir()
    for p in sorted(TRAIN.glob("*.png"))[:2]:
        Image.open(p).crop((0, 0, 300, 280)).save(data / p.name)
    drawn: dict[str, list] = {"0": [], "2": []}
    batch = augment.AugmentedSampler.batch_uint8
    for workers in drawn:
        monkeypatch.setattr(augment.AugmentedSampler, "batch_uint8",
                            lambda self, n, w=workers: drawn[w].append(batch(self, n)) or drawn[w][-1])
        out = tmp_path / f"run{workers}"
        assert train_script.main(["--data", str(data), "--out", str(out), "--N", "16", "--M", "24",
                                  "--batch", "2", "--crop", "64", "--steps", "2", "--log-every", "1",
                                  "--augment", "jpeg=.5,j2k=.5", "--sampler-workers", workers]) == 0
        assert len((out / "log.csv").read_text().splitlines()) == 3
    assert len(drawn["0"]) == len(drawn["2"]) == 2
    assert all(np.array_equal(a, b) for a, b in zip(drawn["0"], drawn["2"]))


@pytest.mark.parametrize("bad", [["--crop", "80"], ["--crop", "32"], ["--crop", "64", "--feat-crop", "96"],
                                 ["--accum", "0"], ["--sampler-workers", "-2"]])
def test_crop_sizes_the_network_cannot_take_are_refused_before_loading(tmp_path, bad, capsys):
    import train as train_script
    with pytest.raises(SystemExit) as exc:
        train_script.main(["--data", str(tmp_path), "--out", str(tmp_path / "run"), *bad])
    assert exc.value.code == 2 and bad[0].lstrip("-") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "he" / "test").is_dir(), reason="shared data not found")
def test_eval_bytes_measures_ms_ssim_and_its_bd_rate_as_rd_does(tmp_path):
    """``--ms-ssim``: the shipped weights on one he/test image at qualities 2 and 4 give the MS-SSIM
    bench/rd.py committed for them (the same bytes), and BD-rates against the committed curves."""
    import json

    import eval_bytes

    from wsicodec.checkpoint import DEFAULT_WEIGHTS, load_model

    rd = json.loads(eval_bytes.RD_JSON.read_text())
    if rd["codecs"]["learned"].get("model_sha256") != load_model(DEFAULT_WEIGHTS).model_id:
        pytest.skip("the committed learned curve is of other weights")
    out = tmp_path / "eval.json"
    assert eval_bytes.main([str(DEFAULT_WEIGHTS), "--max-images", "1", "--qualities", "2", "4",
                            "--ms-ssim", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    committed = {p["quality"]: p["per_image"][0] for p in rd["codecs"]["learned"]["points"]}
    for row in result["points"]:
        ref = committed[row["quality"]]
        assert row["bpp"] == pytest.approx(ref["bpp"], abs=1e-9)
        assert row["ms_ssim"] == pytest.approx(ref["ms_ssim"], abs=1e-4)
    assert {"jpegxl_ms_ssim", "jpeg444_ms_ssim", "learned_ms_ssim"} <= set(result["bd_rate"])
    assert abs(result["bd_rate"]["learned_ms_ssim"]) < 2    # itself as benchmarked, fitted on 2 of its 8 points
    assert result["bd_rate"]["jpegxl_ms_ssim"] < 0                # ahead of JPEG-XL on this image


def test_eval_bytes_names_quality_steps_that_are_not_bigger_and_better():
    from eval_bytes import non_monotonic_steps
    rows = [{"quality": 2, "per_image_bpp": [0.30, 0.28], "per_image_psnr": [26.0, 26.5]},
            {"quality": 1, "per_image_bpp": [0.29, 0.30], "per_image_psnr": [24.0, 24.2]},
            {"quality": 3, "per_image_bpp": [0.45, 0.40], "per_image_psnr": [28.0, 26.5]}]
    assert non_monotonic_steps(rows) == ["q1 -> q2: 1 of 2 images not bigger, 0 not better",
                                         "q2 -> q3: 0 of 2 images not bigger, 1 not better"]
    assert non_monotonic_steps(rows[1:2]) == []


@pytest.mark.skipif(not TRAIN.is_dir(), reason="shared data not found")
def test_tune_reconstruction_scores_what_the_codec_decodes_and_export_stores_it(tmp_path):
    """tune_reconstruction's κ = 0 column is the codec's own decode (same PSNR); the κ it
    picks goes into the weights through export --reconstruction, and the decoder uses it."""
    import json

    import tune_reconstruction

    from PIL import Image

    import wsicodec
    from wsicodec.checkpoint import load_model
    from wsicodec.export import export
    from wsicodec.errors import InvalidSettingError

    data, _, old, _ = _tiny_weights(tmp_path)
    report = tmp_path / "tune.json"
    assert tune_reconstruction.main([str(old), "--images", str(data), "--count", "1", "--crop", "128",
                                     "--kappas", "0", "0.5", "--json", str(report)]) == 0
    tuned = json.loads(report.read_text())
    assert [r["quality"] for r in tuned["rows"]] == list(range(1, 9))
    assert all(k in (0.0, 0.5) for k in tuned["reconstruction"])
    img = np.asarray(Image.open(data / "a.png").convert("RGB"))[16:144, 16:144]
    dec = wsicodec.decode(wsicodec.encode(img, quality=4, model=str(old)), model=str(old))
    mse = float(np.mean((dec.astype(np.float64) - img) ** 2))
    assert tuned["rows"][3]["psnr"]["0"] == pytest.approx(10 * np.log10(255 ** 2 / mse), abs=1e-3)

    new = tmp_path / "k.pt"
    export(tmp_path / "a" / "last.pt", new, reconstruction=[0.5, 0.0])
    m = load_model(new).model
    assert m.config.reconstruction == (0.5, 0.0) and m.reconstruction_kappa(1) == 0.5
    for bad in ([1.5], [0.2, -4.5]):
        with pytest.raises(InvalidSettingError, match="reconstruction"):
            export(tmp_path / "a" / "last.pt", tmp_path / "bad.pt", reconstruction=bad)

    # exported weights (a GPU session's) get κ too: same tensors, and they open the data of
    # the file they came from (same symbols)
    again = tmp_path / "k2.pt"
    sha = export(old, again, reconstruction=[0.3])
    loaded, parent = load_model(again), load_model(old)
    assert loaded.model.config.reconstruction == (0.3,) and loaded.decodes(parent.model_id)
    for name, t in parent.model.state_dict().items():
        assert torch.equal(t, loaded.model.state_dict()[name]), name
    data = wsicodec.encode(img, quality=2, model=str(old))
    assert wsicodec.decode(data, model=str(again)).shape == img.shape and sha == loaded.model_id
    with pytest.raises(InvalidSettingError, match="decoder_of"):
        export(old, tmp_path / "bad2.pt", decoder_of=old)


@pytest.mark.skipif(not TRAIN.is_dir(), reason="shared data not found")
def test_finetune_synthesis_moves_only_g_s_and_its_export_opens_the_parent_data(tmp_path):
    """train/finetune_synthesis.py trains g_s alone on the planes the codec writes, resumes,
    and ``export --synthesis`` puts that g_s into the parent's weights: every other tensor
    stays, the parent's streams decode (same symbols) to the new g_s's pixels, and a
    checkpoint of other weights or a training checkpoint is refused."""
    import finetune_synthesis

    from PIL import Image

    import wsicodec
    from wsicodec.checkpoint import load_model
    from wsicodec.export import export
    from wsicodec.errors import InvalidSettingError

    data, _, old, old_id = _tiny_weights(tmp_path)
    for name, src in (("b.png", 1), ("c.png", 2)):        # a.png (160²) is below a 320² window
        Image.open(sorted(TRAIN.glob("*.png"))[src]).crop((0, 0, 330, 340)).save(data / name)
    out = tmp_path / "gs"
    common = [str(old), "--out", str(out), "--data", str(data), "--holdout", "1", "--batch", "2",
              "--feat-crop", "32", "--vgg", str(VGG), "--lr", "1e-3", "--lr-final", "1e-3"]
    assert finetune_synthesis.main([*common, "--steps", "2"]) == 0
    st = torch.load(out / "last.pt", weights_only=False)
    assert st["step"] == 2 and st["parent_id"] == old_id and (out / "planes.pt").exists()
    assert finetune_synthesis.main([*common, "--steps", "3", "--resume"]) == 0
    st = torch.load(out / "last.pt", weights_only=False)
    assert st["step"] == 3
    log = (out / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,") and len(log) == 3          # header + the end row of each run

    new = tmp_path / "gs.pt"
    export(old, new, synthesis=out / "last.pt")
    parent, tuned = load_model(old), load_model(new)
    assert tuned.decodes(old_id) and tuned.provenance["synthesis"]["step"] == 3
    moved = [k for k, t in parent.model.state_dict().items() if not torch.equal(t, tuned.model.state_dict()[k])]
    assert moved and all(k.startswith("g_s.") for k in moved)
    img = np.asarray(Image.open(data / "a.png").convert("RGB"))[:150, :140].copy()
    stream = wsicodec.encode(img, quality=4, model=str(old))
    a, b = wsicodec.decode(stream, model=str(old)), wsicodec.decode(stream, model=str(new))
    assert a.shape == b.shape == img.shape and not np.array_equal(a, b)

    with pytest.raises(InvalidSettingError, match="not of these weights"):
        export(new, tmp_path / "bad.pt", synthesis=out / "last.pt")
    with pytest.raises(InvalidSettingError, match="exported weights"):
        export(tmp_path / "a" / "last.pt", tmp_path / "bad.pt", synthesis=out / "last.pt")
    assert not (tmp_path / "bad.pt").exists()
