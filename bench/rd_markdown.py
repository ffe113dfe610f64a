"""The markdown report of ``bench/rd.py`` (rd_<tag>.md): BD-rates, the range each covers and
each codec's top PSNR, the wsicodec points against the anchors at equal PSNR, every measured
point, the visual comparison. Built from a results dict alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.rd_derive import floor_of
from bench.report import fmt_value


def ranges_markdown(result: dict) -> list[str]:
    """Top PSNR per codec and the quality range each BD-rate against JPEG-XL integrates over."""
    ranges = result.get("psnr_ranges") or {}
    if not ranges:
        return []
    jxl = result.get("bd_rate", {}).get("anchors", {}).get("jpegxl", {})
    lines = ["## Top PSNR and the range each BD-rate covers", ""]
    if "jpegxl" in ranges:
        j = ranges["jpegxl"]
        lines += [f"JPEG-XL spans {j['bottom_psnr']:.2f}–{j['top_psnr']:.2f} dB PSNR (distance "
                  f"{j['bottom_setting']:g} to {j['top_setting']:g}). A BD-rate integrates over the "
                  "quality range both curves share: where a codec's curve stops short of JPEG-XL's, "
                  "its BD-rate covers only the overlap below (share = overlap / JPEG-XL's range).", ""]
    lines += ["| codec | PSNR span dB | top PSNR dB (setting, bpp) | vs jpegxl: PSNR overlap (share) | "
              "MS-SSIM dB overlap (share) | LPIPS dB overlap (share) |",
              "| --- | --- | ---: | --- | --- | --- |"]
    for key, r in ranges.items():
        row = jxl.get(key)

        def span(metric: str) -> str:
            if key == "jpegxl":
                return "(anchor)"
            if not row or row.get(f"{metric}_overlap") is None:
                return "–"
            lo, hi = row[f"{metric}_overlap"]
            share = row.get(f"{metric}_overlap_share")
            if not hi > lo:
                return "none"
            return f"{lo:.2f}–{hi:.2f} ({fmt_value(None if share is None else 100 * share, '.0f')} %)"

        def db(v: Any) -> str:             # None: exact (lossless)
            return "exact" if v is None else f"{v:.2f}"

        lines.append(f"| {result['codecs'][key]['label']} | {db(r['bottom_psnr'])}–{db(r['top_psnr'])} | "
                     f"{db(r['top_psnr'])} ({result['codecs'][key]['knob']} {r['top_setting']:g}, "
                     f"{r['top_bpp']:.3f}) | {span('psnr')} | {span('ms_ssim_db')} | {span('lpips_db')} |")
    lines.append("")
    return lines


def equal_psnr_markdown(result: dict) -> list[str]:
    """Each point of the wsicodec series against each anchor at equal PSNR."""
    vs = result.get("points_vs_anchor") or {}
    keys = [k for k in ("learned", "auto", "learned_refine") if any(k in rows for rows in vs.values())]
    if not keys:
        return []
    lines = ["## Each point against the anchors at equal PSNR", "",
             "Bits a point takes against the anchor's mean curve at the same PSNR (pchip in log-rate); "
             "+: more than the anchor. `jpegxl` codes each image whole; `jpegxl_tiled` codes it in "
             "the 256² tiles a `--codec jpegxl` container stores.", "",
             "| codec | setting | bpp | PSNR dB | " + " | ".join(f"vs {a}" for a in vs) + " |",
             "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in vs) + " |"]
    for key in keys:
        first = next(rows[key] for rows in vs.values() if key in rows)
        for i, p in enumerate(first["points"]):
            setting = f"{result['codecs'][key]['knob']} {p['setting']:g}" + (
                f", floor {p['min_psnr']:g} dB" if p.get("min_psnr") else "")
            cells = []
            for rows in vs.values():
                v = rows.get(key, {}).get("points", [{}] * (i + 1))[i].get("rate_pct")
                cells.append(fmt_value(v, "+.1f") + (" %" if v is not None else ""))
            lines.append(f"| {result['codecs'][key]['label']} | {setting} | {p['bpp']:.3f} | "
                         f"{fmt_value(p['psnr'], '.2f')} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def write_markdown(result: dict, path: Path, png: str) -> None:
    env = result["environment"]
    lines = [
        f"# Rate-distortion: {result['images_dir']}",
        "",
        *([f"Set `{result['set']['name']}` of `bench/datasets.py`: {result['set']['description']}.", ""]
          if result.get("set") else []),
        f"{len(result['images'])} images, each coded "
        + (f"as its central {result['crop']}² crop" if result.get("crop") else "whole")
        + " by every codec; bpp from the actual bytes; "
        "PSNR over RGB, MS-SSIM (5 scales, mean over R,G,B), LPIPS-alex v0.1 (ImageNet trunk from "
        "`../shared/weights`); mean over images at each setting. \"Original\" means the decoded pixels of "
        "files that the scanner had already lossy-coded once (JPEG or JPEG 2000), which favours re-coding "
        "with the same family; see bench/README.md for what that means for the JPEG 2000 row on `he/test`.",
        "",
        f"Regenerate: `{result['command']}` (from the repository root). Plot: `{png}`. "
        f"Every number per image: `{path.with_suffix('.json').name}`.",
        "",
        f"Machine: {env['cpu']}, {env['cpus_usable']} usable cores, load {fmt_value(env['loadavg_1min_at_start'], '.1f')} "
        f"(1-minute average) at start, torch {env['packages'].get('torch')}, imagecodecs "
        f"{env['packages'].get('imagecodecs')}; date {env['date']}. Throughput is single-image wall time "
        "(best of up to 3 runs for fast codecs) with the thread count listed.",
        "",
    ]
    skipped = {k: v for k, v in result["codecs"].items() if v.get("status") not in ("ok", "partial")}
    if skipped:
        lines += ["Not measured here: " + "; ".join(f"`{k}` ({v.get('reason')})"
                                                   for k, v in skipped.items()), ""]
    bd = result.get("bd_rate", {}).get("anchors", {})
    if bd:
        lines += ["## BD-rate (negative = fewer bits for the same quality)", "",
                  "Bjøntegaard delta rate, pchip fit of log-rate over the shared quality range of the "
                  "mean curves; LPIPS as -10 log10(LPIPS). Per-image: median [min, max] over images "
                  "of the per-image BD-rate (PSNR). "
                  "\"–\": the two curves share no quality range, so no BD-rate exists (compare the "
                  "points below).", ""]
        header = "| codec |"
        sep = "| --- |"
        for anchor in bd:
            header += f" vs {anchor}: PSNR | vs {anchor}: MS-SSIM dB | vs {anchor}: LPIPS |"
            sep += " ---: | ---: | ---: |"
        header += " vs jpegxl PSNR, per image |" if "jpegxl" in bd else ""
        sep += " --- |" if "jpegxl" in bd else ""
        lines += [header, sep]
        keys = [k for k in result["codecs"] if result["codecs"][k].get("status") in ("ok", "partial")]
        for key in keys:
            row = f"| {result['codecs'][key]['label']} |"
            for anchor, rows in bd.items():
                r = rows.get(key)
                if r is None:
                    row += " (anchor) | (anchor) | (anchor) |"
                else:
                    row += "".join(f" {fmt_value(r.get(m), '+.1f')} % |" for m in ("psnr", "ms_ssim_db", "lpips_db"))
            if "jpegxl" in bd:
                r = bd["jpegxl"].get(key)
                row += (" (anchor) |" if r is None else
                        f" {fmt_value(r.get('psnr_per_image_median'), '+.1f')} % "
                        f"[{fmt_value(r.get('psnr_per_image_min'), '+.1f')}, "
                        f"{fmt_value(r.get('psnr_per_image_max'), '+.1f')}] |")
            lines.append(row)
        lines.append("")
    lines += ranges_markdown(result)
    lines += equal_psnr_markdown(result)
    lines += ["## Measured points (mean over images)", "",
              "| codec | setting | bpp | PSNR dB | MS-SSIM | MS-SSIM dB | LPIPS | enc MP/s | dec MP/s | threads |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, entry in result["codecs"].items():
        if entry.get("status") not in ("ok", "partial"):
            continue
        pts = sorted((p for p in entry["points"] if p.get("mean")), key=lambda p: p["mean"]["bpp"])
        for p in pts:
            m = p["mean"]
            floor = floor_of(p)
            setting = f"{entry['knob']} {p['quality']:g}" + (f", floor {floor:g} dB" if floor else "")
            lines.append(
                f"| {entry['label']} | {setting} | {m['bpp']:.3f} | {fmt_value(m['psnr'], '.2f')} | "
                f"{fmt_value(m['ms_ssim'], '.4f')} | {fmt_value(m['ms_ssim_db'], '.2f')} | {fmt_value(m['lpips'], '.4f')} | "
                f"{m['encode_mp_s']:.1f} | {m['decode_mp_s']:.1f} | {entry['threads']} |")
    lines.append("")
    if result.get("visual"):
        v = result["visual"]
        lines += ["## Visual comparison", "",
                  f"`{v['file']}`: {v['image']}, {v['crop']['size']}² crop at x={v['crop']['x']}, "
                  f"y={v['crop']['y']}, each codec set for ~{v['target_bpp']} bpp on the crop coded alone:", ""]
        for p in v["panels"][1:]:
            lines.append(f"- {p['label']}: quality {p['quality']}, {p['bpp']:.3f} bpp, PSNR {p['psnr']:.2f} dB")
        lines.append("")
    path.write_text("\n".join(lines))
