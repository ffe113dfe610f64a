"""Why a network tile's border costs more beside a JPEG-XL tile: its second pass under other side contexts.

    python bench/seam_context.py [--specs cmu:4:32:1 cmu:5:30:1 cmu:6:28:1]
                                 [--refine 40:1:0 40:1:4 40:1:4:held]
                                 [--out bench/results/seam_context.json]

Readers decode a network tile beside a bare JPEG-XL tile twice: the second pass joins, on that
side, g_a's latents of the JPEG-XL pixels joined to :data:`~wsicodec.learned.secondpass.SIDE_CONTEXT`
px of the tile's own first pass (:func:`~wsicodec.learned.secondpass.side_latents`).
``bench/seams.py --mixed`` measures what that costs the tile's border (``seam_cost_db``).  This
script asks why: each spec ``SET:QUALITY:FLOOR[:IMAGES]`` (a set of ``bench/datasets.py``) is coded
by the ``auto`` codec and by the network alone, and every network tile auto kept at the asked
quality with a JPEG-XL side neighbour is decoded again with that side's latents made otherwise:

- ``first pass only``: g_a of the JPEG-XL pixels alone (readers before the second pass);
- ``(a) readers``: today's second pass (checked equal to ``wsicodec.decode``'s pixels);
- ``(b)``: (a) rounded at the tile's quality (gained, rounded, ungained);
- ``(c)``: g_a of the neighbour's *source* pixels, in the whole image's g_a (an upper bound no
  reader has); rounded; and the network-alone container's coded ŷ of that tile (what a fix-up
  tile with its network tile at the same quality would give; its bytes are reported);
- ``(d)``: joins of 16 and 128 px instead of 64;
- ``(e)``: the join made of the tile's *source* (not for readers), of a mirror of the JPEG-XL
  tile (no first pass), g_a over the 3×3 mosaic of what readers show around the tile, and a
  third pass (the join taken from the second pass);
- ``refine`` (each of ``--refine STEPS:ROUNDS:WEIGHT[:held]``): an encoder-only change, no
  reader change: the tile's latents searched by :func:`~wsicodec.learned.refine.refine_latents`
  (from g_a's y and z of the tile with 16 px of context, as auto codes them; checked to code
  the bytes auto stored) with its neighbours' latents held at what readers' second pass gives
  them, STEPS steps per round, the side context recomputed after each round, the squared
  error within :data:`~wsicodec.learned.seamsearch.SEAM_BAND` px of the JPEG-XL sides counted 1 + WEIGHT times; ``held``:
  z and the latents any other tile than a bare JPEG-XL one sees kept (what a stage 2 that has
  measured those tiles needs for the floor to hold).  Then coded and decoded in two passes as
  readers do; its bytes, the tile's PSNR and the seconds per tile are reported.

For each, the PSNR of the tile's pixels within 1, 2, 4 and 8 px of its JPEG-XL sides, and the
cost: the same pixels' PSNR in the network-alone decode minus this one (``seam_cost_db`` of
``bench/seams.py`` at 4 px).  Single-threaded torch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import wsicodec  # noqa: E402
from bench.datasets import get_dataset  # noqa: E402
from bench.metrics import psnr_from_sse  # noqa: E402
from bench.report import log, run_environment, write_json  # noqa: E402
from wsicodec.codecs import get_codec  # noqa: E402
from wsicodec.image import read_stream  # noqa: E402
from wsicodec.learned.secondpass import SIDE_CONTEXT  # noqa: E402
from wsicodec.learned.glass import SIDES  # noqa: E402
from wsicodec.learned.refine import refine_latents  # noqa: E402
from wsicodec.learned.seamsearch import held_mask, seam_weights  # noqa: E402
from wsicodec.learned.synthesis import STITCH_RING, stitch_window  # noqa: E402
from wsicodec.learned.tileformat import MAGIC, NETWORK_KINDS, PIXEL_STRIDE, parse_header  # noqa: E402

TILE, MARGIN, DISTS = 256, 16, (1, 2, 4, 8)
P = PIXEL_STRIDE


class Grid:
    """One image coded by ``auto`` and by the network alone, with every tile's latents as
    readers compute them (``dec``: the auto codec's decoder)."""

    def __init__(self, dec, img: np.ndarray, q: float, floor: float) -> None:
        self.dec, self.img, self.q = dec, img, q
        self.auto = wsicodec.encode(img, q, codec="auto", min_psnr=floor)
        net_alone = wsicodec.encode(img, q)
        self.shown, self.alone = wsicodec.decode(self.auto), wsicodec.decode(net_alone)
        h, w = img.shape[:2]
        self.rows, self.cols = -(-h // TILE), -(-w // TILE)
        self.tiles, ltiles = read_stream(self.auto).tiles, read_stream(net_alone).tiles
        self.lat, self.jxl, self.hd, self.llat, self.lbytes = {}, {}, {}, {}, {}
        for r in range(self.rows):
            for c in range(self.cols):
                t, lt = self.tiles[r * self.cols + c], ltiles[r * self.cols + c]
                if t[:4] != MAGIC:
                    self.jxl[(c, r)] = dec.bare_pixels(t, None, "tile")
                    self.lat[(c, r)] = dec.pixel_latents(self.jxl[(c, r)])
                else:
                    self.hd[(c, r)] = parse_header(t)
                    self.lat[(c, r)] = dec.latents(t, self.hd[(c, r)], "tile")
                self.llat[(c, r)] = dec.latents(lt, parse_header(lt), "tile")
                self.lbytes[(c, r)] = len(lt)
        self.y_src = dec.pixel_latents(img)
        self.targets = [k for k, hd in self.hd.items() if hd.kind in NETWORK_KINDS and hd.quality == q
                        and self.jxl_sides(k)]
        self.first = {k: self.synth(k, self.lat[k], self.around(k)) for k in self.targets}

    def box(self, key):
        c, r = key
        return np.s_[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]

    @staticmethod
    def nb(key, side):
        return key[0] + side[1], key[1] + side[0]

    def jxl_sides(self, key):
        return [s for s in SIDES if self.nb(key, s) in self.jxl]

    def around(self, key) -> dict:
        return {(dr, dc): self.lat.get((key[0] + dc, key[1] + dr))
                for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc}

    def synth(self, key, centre, around) -> np.ndarray:
        win, top, left = stitch_window(centre, around, STITCH_RING)
        x = self.dec.synthesize([win])[0]
        return x[top:top + self.hd[key].height, left:left + self.hd[key].width]

    def join(self, tile_px, side, px, s: int = SIDE_CONTEXT, mirror: bool = False):
        """g_a of the neighbour's pixels ``px`` with ``s`` px of ``tile_px`` (or, ``mirror``,
        of ``px`` mirrored) on the tile's side: the neighbour's part."""
        dr, dc = side
        axis = 1 if dc else 0
        after = dr + dc > 0                              # neighbour below / right: tile first
        take = (lambda a, sl: a[sl] if axis == 0 else a[:, sl])
        if mirror:
            part = np.flip(take(px, np.s_[:s] if after else np.s_[-s:]), axis)
        else:
            part = take(tile_px, np.s_[-s:] if after else np.s_[:s])
        y = self.dec.pixel_latents(np.concatenate([part, px] if after else [px, part], axis))
        n = -(-px.shape[axis] // P)
        sl = np.s_[s // P:] if after else np.s_[:n]
        return y[..., sl, :] if axis == 0 else y[..., sl]

    def rounded(self, y, key):
        with torch.inference_mode():
            g, _ = self.dec.model.gains(torch.tensor([self.hd[key].quality]), torch.float32)
            return torch.round(y * g) / g

    def source_latents(self, key, side):
        c, r = self.nb(key, side)
        lh, lw = self.lat[(c, r)].shape[-2:]
        return self.y_src[..., r * TILE // P:r * TILE // P + lh, c * TILE // P:c * TILE // P + lw]

    def mosaic(self, key, side):
        c, r = key
        r0, r1, c0, c1 = max(r - 1, 0), min(r + 2, self.rows), max(c - 1, 0), min(c + 2, self.cols)
        px = np.ascontiguousarray(self.shown[r0 * TILE:r1 * TILE, c0 * TILE:c1 * TILE])
        y = self.dec.pixel_latents(px)
        cn, rn = self.nb(key, side)
        lh, lw = self.lat[(cn, rn)].shape[-2:]
        return y[..., (rn - r0) * TILE // P:(rn - r0) * TILE // P + lh, (cn - c0) * TILE // P:(cn - c0) * TILE // P + lw]

    def second(self, key, centre, side_latents) -> np.ndarray:
        """The tile's pass with each JPEG-XL side given ``side_latents(key, side)``."""
        a = self.around(key)
        for s in self.jxl_sides(key):
            a[s] = side_latents(key, s)
        return self.synth(key, centre, a)

    def readers(self, key, centre=None):
        """What readers show of ``key`` (``centre``: other latents for the tile)."""
        centre = self.lat[key] if centre is None else centre
        first = self.synth(key, centre, self.around(key)) if centre is not self.lat[key] else self.first[key]
        return self.second(key, centre, lambda k, s: self.join(first, s, self.jxl[self.nb(k, s)]))


def variants(g: Grid) -> dict:
    """name → f(key) = the tile's pixels under that side context."""
    px = lambda k, s: g.jxl[g.nb(k, s)]   # noqa: E731
    side = lambda fn: (lambda k: g.second(k, g.lat[k], fn))   # noqa: E731

    def third(k):
        return g.second(k, g.lat[k], lambda k2, s: g.join(g.readers(k), s, px(k, s)))
    return {
        "first pass only": side(lambda k, s: g.lat[g.nb(k, s)]),
        "(a) readers: join 64 px of the first pass": g.readers,
        "(b) (a) rounded at the tile's quality": side(lambda k, s: g.rounded(g.join(g.first[k], s, px(k, s)), k)),
        "(c) g_a of the neighbour's source": side(g.source_latents),
        "(c) the same, rounded": side(lambda k, s: g.rounded(g.source_latents(k, s), k)),
        "(c) network-alone's coded latents (fix-up)": side(lambda k, s: g.llat[g.nb(k, s)]),
        "(d) join 16 px": side(lambda k, s: g.join(g.first[k], s, px(k, s), 16)),
        "(d) join 128 px": side(lambda k, s: g.join(g.first[k], s, px(k, s), 128)),
        "(e) join 64 px of the tile's source": side(lambda k, s: g.join(g.img[g.box(k)], s, px(k, s))),
        "(e) mirror of the JPEG-XL tile": side(lambda k, s: g.join(None, s, px(k, s), mirror=True)),
        "(e) g_a over the 3x3 shown mosaic": side(g.mosaic),
        "(e) third pass": third,
    }


def held(g: Grid, key) -> torch.Tensor:
    """The latents of ``key`` that a tile other than a bare JPEG-XL one sees
    (:func:`~wsicodec.learned.seamsearch.held_mask`): what a stage 2 that has measured
    those tiles must keep."""
    c, r = key
    return held_mask(tuple(g.lat[key].shape), [
        (dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)
        if (dr or dc) and (c + dc, r + dr) in g.lat and (c + dc, r + dr) not in g.jxl])


def refined(g: Grid, key, cfg: dict):
    """(bytes, pixels readers show) of ``key`` re-coded with :func:`refine_latents` against
    its second pass's side context (module docstring): ``cfg["rounds"]`` times
    ``cfg["steps"]`` steps, each round from where the last left y and z with the side
    context recomputed from the last coding; the squared error within ``SEAM_BAND`` px
    of the JPEG-XL sides counting ``1 + cfg["weight"]`` times; ``cfg["held"]``: the latents
    other tiles see (:func:`held`) and z kept."""
    dec, net, q = g.dec, g.dec.model, g.q
    hd, (c, r) = g.hd[key], key
    r0, c0 = max(r * TILE - MARGIN, 0), max(c * TILE - MARGIN, 0)
    region = np.ascontiguousarray(g.img[r0:(r + 1) * TILE + MARGIN, c0:(c + 1) * TILE + MARGIN])
    ty, tx = (r * TILE - r0) // P, (c * TILE - c0) // P
    lh, lw = g.lat[key].shape[-2:]
    qt = torch.tensor([q])
    with torch.inference_mode():
        gain = net.gains(qt, torch.float32)[0]
        y = dec.pixel_latents(region)[..., ty:ty + lh, tx:tx + lw] * gain
        z = net.hyper_analysis(y, qt, 4)
    y, z = y.clone(), z.clone()
    enc = get_codec("auto", q).chooser.encoder_at(q)
    if enc.code_and_reconstruct(y, z, hd.height, hd.width)[0] != g.tiles[r * g.cols + c]:
        raise SystemExit(f"tile {key}: g_a's latents here do not code the bytes auto stored")
    hold = held(g, key) if cfg["held"] else None
    centre, first = g.lat[key], g.first[key]
    for _ in range(cfg["rounds"]):
        a = g.around(key)
        for s in g.jxl_sides(key):
            a[s] = g.join(first, s, g.jxl[g.nb(key, s)])
        with torch.inference_mode():
            win, top, left = stitch_window(torch.zeros_like(y), a, STITCH_RING)
            win = (win * gain).clone()
        pr, pc = r * TILE - top, c * TILE - left
        x = torch.from_numpy(np.ascontiguousarray(
            g.img[pr:pr + win.shape[-2] * P, pc:pc + win.shape[-1] * P])).permute(2, 0, 1)[None].float() / 255
        shown = seam_weights(tuple(x.shape[-2:]), top, left, hd.height, hd.width, g.jxl_sides(key),
                             cfg["weight"])
        y, z, _ = refine_latents(net, x, qt, y, z, shown, cfg["steps"], window=(win, top // P, left // P),
                                 hold=hold)
        data, y_hat = enc.code_and_reconstruct(y, z, hd.height, hd.width)
        centre = dec.ungain(y_hat, q)
        first = g.synth(key, centre, g.around(key))
    if hold is not None and not torch.equal(centre[hold], g.lat[key][hold]):
        raise SystemExit(f"tile {key}: latents held moved")
    return data, g.readers(key, centre)


def band_sse(px: np.ndarray, src: np.ndarray, sides) -> dict:
    """SSE and sample count within d px of each of ``sides``, per d of DISTS."""
    h, w = px.shape[:2]
    out = {}
    for d in DISTS:
        sl = {(-1, 0): np.s_[:d], (1, 0): np.s_[h - d:], (0, -1): np.s_[:, :d], (0, 1): np.s_[:, w - d:]}
        e = [((px[sl[s]].astype(np.float64) - src[sl[s]]) ** 2) for s in sides]
        out[d] = (sum(x.sum() for x in e), sum(x.size for x in e))
    return out


def parse_refine(spec: str) -> dict:
    """"STEPS:ROUNDS:WEIGHT[:held]" → a :func:`refined` configuration with its row name."""
    steps, rounds, weight, *rest = spec.split(":")
    cfg = {"steps": int(steps), "rounds": int(rounds), "weight": float(weight), "held": rest == ["held"]}
    cfg["name"] = (f"refine {cfg['rounds']}x{cfg['steps']} steps, seam weight {cfg['weight']:g}"
                   + (", held" if cfg["held"] else "") + " (encoder only)")
    return cfg


def measure(spec: str, dec, configs: list[dict]) -> dict:
    name, q, floor, *rest = spec.split(":")
    acc: dict[str, dict] = {}
    stats = {"tiles": 0, "sides": 0, "jpegxl_neighbour_bytes": 0, "their_network_bytes": 0}
    rstats = {cfg["name"]: dict.fromkeys(("bytes_before", "bytes_after", "sse_before", "sse_after", "sse_alone",
                                          "n", "seconds"), 0) for cfg in configs}
    for _, img in get_dataset(name).images(int(rest[0]) if rest else 4):
        g = Grid(dec, np.ascontiguousarray(img), float(q), float(floor))
        vs = variants(g)
        nbs = {g.nb(k, s) for k in g.targets for s in g.jxl_sides(k)}
        stats["jpegxl_neighbour_bytes"] += sum(len(g.tiles[r * g.cols + c]) for c, r in nbs)
        stats["their_network_bytes"] += sum(g.lbytes[n] for n in nbs)
        for k in g.targets:
            src, sides = g.img[g.box(k)], g.jxl_sides(k)
            stats["tiles"] += 1
            stats["sides"] += len(sides)
            ref = band_sse(g.alone[g.box(k)], src, sides)
            readers = g.readers(k)
            if not np.array_equal(readers, g.shown[g.box(k)]):
                raise SystemExit(f"{spec} tile {k}: the second pass here is not what readers show")
            rows = {v: fn(k) for v, fn in vs.items()}
            for cfg in configs:
                t0 = time.perf_counter()
                data, px = refined(g, k, cfg)
                rf = rstats[cfg["name"]]
                rf["seconds"] += time.perf_counter() - t0
                rf["bytes_before"] += len(g.tiles[k[1] * g.cols + k[0]])
                rf["bytes_after"] += len(data)
                for key, im in (("sse_before", readers), ("sse_after", px), ("sse_alone", g.alone[g.box(k)])):
                    rf[key] += ((im.astype(np.float64) - src) ** 2).sum()
                rf["n"] += src.size
                rows[cfg["name"]] = px
            for v, px in rows.items():
                a = acc.setdefault(v, {d: [0.0, 0.0, 0] for d in DISTS})
                for d, (sse, n) in band_sse(px, src, sides).items():
                    a[d][0] += sse
                    a[d][1] += ref[d][0]
                    a[d][2] += n
    out = {"spec": spec, **stats, "variants": {}, "refine": {}}
    for v, a in acc.items():
        out["variants"][v] = {f"{d}px": {"psnr": psnr_from_sse(s, n), "cost_db": psnr_from_sse(r, n) - psnr_from_sse(s, n)}
                              for d, (s, r, n) in a.items()}
        log(f"{spec} {v:45s} " + "  ".join(f"{d}: {x['psnr']:.2f} ({x['cost_db']:+.2f})"
                                             for d, x in out["variants"][v].items()))
    for cfg in configs:
        rf = rstats[cfg["name"]]
        if not rf["n"]:
            continue
        out["refine"][cfg["name"]] = {
            **{k: cfg[k] for k in ("steps", "rounds", "weight", "held")},
            "bytes_before": rf["bytes_before"], "bytes_after": rf["bytes_after"],
            "tile_psnr_before": psnr_from_sse(rf["sse_before"], rf["n"]),
            "tile_psnr_after": psnr_from_sse(rf["sse_after"], rf["n"]),
            "tile_psnr_network_alone": psnr_from_sse(rf["sse_alone"], rf["n"]),
            "seconds_per_tile": rf["seconds"] / stats["tiles"]}
        log(f"{spec} {cfg['name']}: {out['refine'][cfg['name']]}")
    log(f"{spec}: {stats['tiles']} tiles, {stats['sides']} sides")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specs", nargs="+", default=["cmu:4:32:1", "cmu:5:30:1", "cmu:6:28:1"])
    ap.add_argument("--refine", nargs="*", default=["40:1:0", "40:1:4", "40:1:4:held"],
                    help="STEPS:ROUNDS:WEIGHT[:held]: encoder-side rows (none: skip them)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "seam_context.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    dec = get_codec("auto", 4.0).decoder
    configs = [parse_refine(r) for r in args.refine]
    doc = {"what": "border PSNR (1/2/4/8 px) of network tiles beside JPEG-XL tiles under other side "
                   "contexts; cost_db = network-alone decode's PSNR of the same pixels minus this one",
           "command": " ".join(["python bench/seam_context.py"] + (argv if argv is not None else sys.argv[1:])),
           "environment": run_environment(REPO, ("torch", "numpy")), "model_sha256": dec.loaded.model_id,
           "specs": [measure(s, dec, configs) for s in args.specs]}
    write_json(args.out, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
