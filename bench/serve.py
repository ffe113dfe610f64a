"""Serving speed: 256² tile latency (cold/warm), batch decode throughput, HTTP load test.

    python bench/serve.py CONTAINER [--tiles 40] [--warm 400] [--batch-sizes 1,2,4,8,16]
                          [--clients 32] [--requests 5000] [--device auto]
                          [--precision float32|bfloat16]
                          [--torch-threads N]
                          [--skip latency,throughput,load] [--update]
                          [--out bench/results/serve.json]

CONTAINER is any wsicodec container (make one with ``wsicodec compress``; the
learned codec is the interesting case).  Measured, on the device ``--device`` picks
(CUDA when present with ``auto``, else the CPU):

- **latency**: ``read_region`` of one aligned 256² level-0 tile with tissue (network
  coded), p50/p99: ``cold`` (both caches off: the tile's and its 8 neighbours' bytes →
  entropy decode → h_s, then g_s over the stitched latents → RGBA: a tile nobody near
  it was asked for), ``cold_neighbours_cached`` (pixel cache off, latent cache on, tiles
  asked in row order: what a viewer panning over a region pays per new tile) and warm
  (the decoded tile in the LRU cache); cold is split into rANS decoding and h_s (exact,
  + CDF-table index) per tile, and g_s over one stitched window, by re-running the
  codec's steps.
- **throughput**: ``BatchDecoder.decode`` of B distinct network tiles in one call
  (cache off), MP/s of 256² tile pixels, against B.
- **load test**: ``wsicodec serve`` in a subprocess on loopback, ``--clients`` threads
  with keep-alive connections issuing ``--requests`` DeepZoom tile requests spread
  over the slide's levels (a mix of first and repeated requests, as a viewer does);
  errors, latency p50/p99/max, requests/s and the server's peak RSS; then 200 warm
  requests from one client (HTTP + DeepZoom + JPEG encoding of a cached tile).

Writes JSON with the environment (CPU, threads, load average, torch, model sha256).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from wsicodec.batch import BatchDecoder, DecoderSettings
from wsicodec.container import open_container
from wsicodec.slide import WsiSlide


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1e3 for s in seconds]
    return {"n": len(ms), "p50_ms": round(_pct(ms, 50), 2), "p99_ms": round(_pct(ms, 99), 2),
            "mean_ms": round(float(np.mean(ms)), 2), "max_ms": round(max(ms), 2)}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(container: Any, device: str, note: str = "") -> dict[str, Any]:
    env: dict[str, Any] = {
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
        "platform": platform.platform(), "device": device,
        "codec": container.metadata.codec, "model_sha256": container.metadata.model_id,
        "tile_size": container.tile_size,
        "note": note,
    }
    try:
        import torch

        env.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                   cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except ImportError:
        pass
    return env


def network_tiles(container: Any, level: int = 0) -> list[tuple[int, int]]:
    """Full 256² tiles of ``level`` that take the network path (tissue), row-major."""
    grid = container.grid(level)
    t = container.tile_size
    keys = []
    for col, row in grid:
        r = grid.tile_rect(col, row)
        if r.width != t or r.height != t:
            continue
        data = container.read_encoded_tile(level, col, row)
        if container.metadata.codec.get("name") == "learned":
            from wsicodec.learned import KIND_NETWORK, parse_header

            if parse_header(data).kind != KIND_NETWORK:
                continue
        keys.append((col, row))
    return keys


def bench_latency(path: Path, n_cold: int, n_warm: int, device: str,
                  precision: str = "float32") -> dict[str, Any]:
    c = open_container(path)
    keys = network_tiles(c)[:n_cold]
    t = c.tile_size
    cold_slide = WsiSlide(c, DecoderSettings(cache_bytes=0, latent_cache_bytes=0, device=device,
                                                 precision=precision))
    cold_slide.read_region((keys[0][0] * t, keys[0][1] * t), 0, (t, t))  # load the model
    cold = []
    for col, row in keys:
        t0 = time.perf_counter()
        cold_slide.read_region((col * t, row * t), 0, (t, t))
        cold.append(time.perf_counter() - t0)
    pan_slide = WsiSlide(open_container(path), DecoderSettings(cache_bytes=0, device=device,
                                                                    precision=precision))
    pan_slide.read_region((keys[0][0] * t, keys[0][1] * t), 0, (t, t))   # load the model
    pan_slide.decoder.close()
    pan = []
    for col, row in sorted(keys, key=lambda k: (k[1], k[0])):
        t0 = time.perf_counter()
        pan_slide.read_region((col * t, row * t), 0, (t, t))
        pan.append(time.perf_counter() - t0)
    pan_slide.close()
    warm_slide = WsiSlide(open_container(path), DecoderSettings(device=device, precision=precision))
    for col, row in keys:
        warm_slide.read_region((col * t, row * t), 0, (t, t))
    warm = []
    rng = random.Random(0)
    for _ in range(n_warm):
        col, row = rng.choice(keys)
        t0 = time.perf_counter()
        warm_slide.read_region((col * t, row * t), 0, (t, t))
        warm.append(time.perf_counter() - t0)
    out = {"tiles": len(keys), "cold": _summary_ms(cold),
           "cold_neighbours_cached": _summary_ms(pan), "warm": _summary_ms(warm),
           "device": cold_slide.decoder.device}
    if c.metadata.codec.get("name") == "learned":
        out["cold_breakdown"] = _profile_learned(c, keys, cold_slide.decoder.device, precision)
    cold_slide.close()
    warm_slide.close()
    return out


def _profile_learned(c: Any, keys: list[tuple[int, int]], device: str,
                     precision: str = "float32") -> dict[str, Any]:
    """Decode tiles one at a time through the codec decoder's public steps (rANS of z
    and y, the exact h_s; a cold stitched tile runs them for itself and each neighbour)
    and g_s over the stitched window (the tile's pixels, as readers compute them), and
    time each."""
    import torch

    from wsicodec.learned import parse_header, stitch_window

    dec = c.codec.decoder
    m = dec.model
    parts: dict[str, list[float]] = {"rans_z_and_y_per_tile": [], "h_s_and_index_per_tile": [],
                                     "g_s_stitched": []}
    g_model = m if device == "cpu" else None
    grid = c.grid(0)
    window = None
    for col, row in keys:
        around = {}
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                cc, rr = col + dc, row + dr
                if not (0 <= cc < grid.cols and 0 <= rr < grid.rows):
                    continue
                data = c.read_encoded_tile(0, cc, rr)
                hd = parse_header(data)
                if hd.kind == 0:
                    t0 = time.perf_counter()
                    zs = dec.decode_z(data, hd)
                    t1 = time.perf_counter()
                    _, index = dec.hyper_parameters(zs, hd)
                    t2 = time.perf_counter()
                    dec.decode_y(data, hd, index)
                    t3 = time.perf_counter()
                    parts["rans_z_and_y_per_tile"].append((t1 - t0) + (t3 - t2))
                    parts["h_s_and_index_per_tile"].append(t2 - t1)
                around[(dr, dc)] = dec.latents(data, hd, "tile")
                if (dr, dc) == (0, 0):
                    size = (hd.height, hd.width)
        window, top, left = stitch_window(around.pop((0, 0)), around)
        if g_model is not None:
            t1 = time.perf_counter()
            with torch.inference_mode():      # as readers run it: only the tile's pixels
                m.synthesize(window, precision, (top, left, *size))
            parts["g_s_stitched"].append(time.perf_counter() - t1)
    out: dict[str, Any] = {k: _summary_ms(v) for k, v in parts.items() if v}
    out["window_shape"] = list(window.shape) if window is not None else None
    if g_model is None:
        out["note"] = "g_s timed on the CPU only; on CUDA see latency/throughput"
    return out


def bench_throughput(path: Path, sizes: list[int], repeats: int, device: str,
                     precision: str = "float32") -> list[dict[str, Any]]:
    c = open_container(path)
    keys = network_tiles(c)
    t = c.tile_size
    dec = BatchDecoder(c, DecoderSettings(cache_bytes=0, latent_cache_bytes=0, device=device,
                                          precision=precision,
                                          max_batch=max(sizes)))
    dec.decode(0, keys[:1])
    rows = []
    for b in sizes:
        if b > len(keys):
            break
        times = []
        for r in range(repeats):
            start = (r * b) % max(1, len(keys) - b + 1)
            batch = keys[start:start + b]
            t0 = time.perf_counter()
            dec.decode(0, batch)
            times.append(time.perf_counter() - t0)
        best, med = min(times), float(np.median(times))
        rows.append({"batch": b, "repeats": repeats, "median_s": round(med, 4),
                     "mp_per_s_median": round(b * t * t / 1e6 / med, 3),
                     "mp_per_s_best": round(b * t * t / 1e6 / best, 3),
                     "ms_per_tile_median": round(med / b * 1e3, 1)})
    dec.close()
    c.close()
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_load(path: Path, clients: int, requests: int, device: str,
               threads: int | None = None, precision: str = "float32") -> dict[str, Any]:
    import psutil

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "wsicodec", "serve", str(path), "--port",
                             str(port), "--device", device, "--precision", precision]
                            + (["--threads", str(threads)] if threads else []), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line} {proc.stderr.read()}")
    name = line and json.loads(_http_get(port, "/slides")[1])[0]["name"]
    levels = _dz_levels(port, name)
    # a viewer's mix: every tile of the 4 finest DeepZoom levels, then random repeats
    urls = [f"/slides/{name}_files/{z}/{c}_{r}.jpeg"
            for z, (cols, rows) in levels[-4:] for c in range(cols) for r in range(rows)]
    rng = random.Random(1)
    plan = (urls + [rng.choice(urls) for _ in range(max(0, requests - len(urls)))])[:requests]
    rng.shuffle(plan)
    ps = psutil.Process(proc.pid)
    peak = [ps.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], ps.memory_info().rss)
            except psutil.Error:
                return
            stop.wait(0.05)

    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    it = iter(plan)

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        while True:
            with lock:
                url = next(it, None)
            if url is None:
                break
            t0 = time.perf_counter()
            try:
                conn.request("GET", url)
                resp = conn.getresponse()
                body = resp.read()
                ok = resp.status == 200 and len(body) > 0
            except (OSError, http.client.HTTPException) as e:
                ok, body = False, str(e).encode()
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)
                if not ok:
                    errors.append(f"{url}: {body[:100]!r}")
        conn.close()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    # warm HTTP latency, one client: tiles already decoded and cached by the run above
    warm: list[float] = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for url in urls[:200]:
        t1 = time.perf_counter()
        conn.request("GET", url)
        conn.getresponse().read()
        warm.append(time.perf_counter() - t1)
    conn.close()
    stop.set()
    proc.terminate()
    proc.wait(30)
    return {"http_warm_one_client": _summary_ms(warm), "clients": clients, "requests": len(plan), "distinct_tiles": len(set(plan)),
            "errors": len(errors), "error_examples": errors[:5], "wall_s": round(wall, 2),
            "requests_per_s": round(len(plan) / wall, 1), "latency": _summary_ms(lat),
            "server_peak_rss_mb": round(peak[0] / 2**20, 1)}


def _http_get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read().decode()
    conn.close()
    return r.status, body


def _dz_levels(port: int, name: str) -> list[tuple[int, tuple[int, int]]]:
    import math
    import xml.etree.ElementTree as ET

    root = ET.fromstring(_http_get(port, f"/slides/{name}.dzi")[1])
    ts = int(root.get("TileSize"))
    size = root.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
    w, h = int(size.get("Width")), int(size.get("Height"))
    dims = [(w, h)]
    while dims[-1] != (1, 1):
        dims.append(tuple(max(1, math.ceil(v / 2)) for v in dims[-1]))
    dims.reverse()
    return [(z, (math.ceil(dw / ts), math.ceil(dh / ts))) for z, (dw, dh) in enumerate(dims)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("container", type=Path)
    ap.add_argument("--tiles", type=int, default=40, help="cold-latency tiles")
    ap.add_argument("--warm", type=int, default=400, help="warm-latency reads")
    ap.add_argument("--batch-sizes", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="float32", choices=("float32", "bfloat16"),
                    help="how g_s runs (DecoderSettings.precision)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch intra-op threads (here and in the served process)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: latency,"
                                                "throughput,load")
    ap.add_argument("--update", action="store_true",
                    help="merge into an existing --out (parts not run are kept)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.json")
    ap.add_argument("--note", default="", help="what else ran on the machine, recorded with the results")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    result: dict[str, Any] = {}
    if args.update and args.out.is_file():
        result = json.loads(args.out.read_text())
    with open_container(args.container) as c:
        result.update({"container": str(args.container),
                       "environment": environment(c, args.device, args.note)})
        result["environment"]["precision"] = args.precision
    if "latency" not in skip:
        result["latency_256"] = bench_latency(args.container, args.tiles, args.warm, args.device,
                                              args.precision)
        print(json.dumps(result["latency_256"], indent=1), flush=True)
    if "throughput" not in skip:
        sizes = [int(s) for s in args.batch_sizes.split(",")]
        result["batch_throughput"] = bench_throughput(args.container, sizes, args.repeats,
                                                      args.device, args.precision)
        print(json.dumps(result["batch_throughput"], indent=1), flush=True)
    if "load" not in skip:
        result["load_test"] = bench_load(args.container, args.clients, args.requests,
                                         args.device, args.torch_threads, args.precision)
        print(json.dumps(result["load_test"], indent=1), flush=True)
    result["environment"]["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
