"""compress-many on a real Dask cluster (a ``dask scheduler`` and two ``dask worker``
processes on 127.0.0.1), its bands, inputs and report, and WsiSlide.to_dask."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import wsicodec
from wsicodec.cluster.bands import (CodecSpec, Segment, StripMemo, encode_band, level_strip,
                                    plan_tasks, worker_codec)
from wsicodec.cluster.inputs import assign_names, expand_sources, read_manifest
from wsicodec.container import open_container
from wsicodec.errors import InvalidSettingError
from wsicodec.tiling import iter_strips, open_source, plan_pyramid

ROOT = Path(__file__).resolve().parents[1]
SLIDES = ROOT.parent / "shared" / "data" / "slides"
CMU = SLIDES / "cmu_small_region.svs"
SMALL = SLIDES / "small_HE_levels.tiff"
BAD = SLIDES / "bad"
DASK = Path(sys.executable).parent / "dask"
FAST_JXL = ["--codec", "jpegxl", "--option", "effort=1"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}

pytestmark = pytest.mark.skipif(not SLIDES.is_dir(), reason="../shared/data/slides missing")


# ---------------------------------------------------------------------- helpers
class Cluster:
    """A scheduler and worker processes on 127.0.0.1 (no dashboards, no nannies: killing
    a worker kills it)."""

    def __init__(self, tmp: Path) -> None:
        self.file = tmp / "scheduler.json"
        self.log = open(tmp / "cluster.log", "w")
        self.procs: list[subprocess.Popen] = []
        self.scheduler = self._spawn(["scheduler", "--host", "127.0.0.1", "--port", "0",
                                      "--no-dashboard", "--scheduler-file", str(self.file)])
        deadline = time.monotonic() + 60
        while not self.file.is_file() or not self.file.read_text().strip():
            assert time.monotonic() < deadline, "scheduler did not start"
            time.sleep(0.2)
        self.address = json.loads(self.file.read_text())["address"]
        self.workers = [self.add_worker() for _ in range(2)]
        self.wait_workers(2)

    def _spawn(self, args: list[str]) -> subprocess.Popen:
        p = subprocess.Popen([str(DASK), *args], env=ENV, stdout=self.log, stderr=self.log)
        self.procs.append(p)
        return p

    def add_worker(self) -> subprocess.Popen:
        return self._spawn(["worker", self.address, "--nthreads", "1", "--no-nanny",
                            "--no-dashboard", "--host", "127.0.0.1"])

    def wait_workers(self, n: int) -> None:
        from distributed import Client

        with Client(self.address, timeout="30s", set_as_default=False) as c:
            c.wait_for_workers(n, timeout=60)

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        self.log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("dask"))
    yield c
    c.close()


def run_many(*args: str, wait: bool = True, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "wsicodec", "compress-many", *args]
    if not wait:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, **kw)


def report(out: Path) -> dict[str, dict]:
    with open(out / "report.csv", newline="") as f:
        return {r["name"]: r for r in csv.DictReader(f)}


def tiles_of(path: Path) -> dict:
    with open_container(path) as c:
        return {(lv, col, row): c.read_encoded_tile(lv, col, row)
                for lv in range(len(c.metadata.levels))
                for col in range(c.grid(lv).cols) for row in range(c.grid(lv).rows)}


def reference(tmp: Path, slide: Path, codec: str, tile_size: int = 256, **options) -> dict:
    out = tmp / f"ref-{slide.stem}-{codec}-{tile_size}.zarr.zip"
    wsicodec.compress(slide, out, wsicodec.get_codec(codec, None, **options), tile_size=tile_size)
    return tiles_of(out)


def wait_for_rows(out: Path, name: str, rows: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the partial write of ``name`` in ``out`` journalled ``rows`` tile rows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for j in out.glob(f".{name}.zarr.zip.partial-*.d/wsicodec-journal.jsonl"):
            if len(j.read_text().splitlines()) > rows:
                return
        time.sleep(0.05)
    raise AssertionError(f"{name}: no {rows} rows written in {timeout} s")


# ---------------------------------------------------------------------- on the cluster
def test_a_killed_worker_loses_only_its_tasks_and_a_bad_slide_fails_alone(cluster, tmp_path):
    out = tmp_path / "out"
    proc = run_many(str(CMU), str(SMALL), str(BAD), "--scheduler", cluster.address,
                    "--out-dir", str(out), "--task-tiles", "6", "--json", *FAST_JXL, wait=False)
    wait_for_rows(out, "cmu_small_region", 2, proc)
    cluster.workers[0].kill()                   # mid-run: its tasks run again on the other
    stdout, stderr = proc.communicate(timeout=300)
    try:
        assert proc.returncode == 1, stderr     # the bad slide failed, the rest completed
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("wsicodec: error: 1 of 3") and "bad" in last
        assert "Traceback" not in stderr
        rep = report(out)
        assert rep["bad"]["status"] == "failed" and "bad" in rep["bad"]["error"]
        assert not list(out.glob("bad*")) and not list(out.glob(".bad*"))
        for name in ("cmu_small_region", "small_HE_levels"):
            r = rep[name]
            assert r["status"] == "done", r
            assert int(r["container_bytes"]) == (out / f"{name}.zarr.zip").stat().st_size
            assert float(r["ratio"]) == pytest.approx(int(r["source_bytes"]) / int(r["container_bytes"]),
                                                      rel=1e-3)
        assert int(rep["cmu_small_region"]["source_bytes"]) == CMU.stat().st_size
        assert float(rep["cmu_small_region"]["level0_mp"]) == pytest.approx(2220 * 2967 / 1e6, rel=1e-3)
        js = json.loads(stdout)
        assert js["summary"]["by_status"] == {"done": 2, "failed": 1}
        assert tiles_of(out / "cmu_small_region.zarr.zip") == reference(tmp_path, CMU, "jpegxl", effort=1)
        assert not list(out.glob(".*partial*"))
    finally:
        cluster.workers[0] = cluster.add_worker()
        cluster.wait_workers(2)


def test_interrupted_run_keeps_finished_and_partial_slides_and_resume_completes(cluster, tmp_path):
    out = tmp_path / "out"
    args = [str(SMALL), str(CMU), "--scheduler", cluster.address, "--out-dir", str(out),
            "--task-tiles", "4", *FAST_JXL]
    proc = run_many(*args, wait=False)
    wait_for_rows(out, "cmu_small_region", 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    rep = report(out)
    assert rep["small_HE_levels"]["status"] == "done"
    assert rep["cmu_small_region"]["status"] == "interrupted"
    assert not (out / "cmu_small_region.zarr.zip").exists()      # nothing half-written looks valid
    assert list(out.glob(".cmu_small_region.zarr.zip.partial-*"))
    done = run_many(*args, "--resume")
    assert done.returncode == 0, done.stderr
    rep = report(out)
    assert rep["small_HE_levels"]["status"] == "complete"
    assert rep["cmu_small_region"]["status"] == "resumed"
    assert int(rep["cmu_small_region"]["resumed_tiles"]) > 0
    assert tiles_of(out / "cmu_small_region.zarr.zip") == reference(tmp_path, CMU, "jpegxl", effort=1)
    assert not list(out.glob(".*partial*"))


@pytest.fixture(scope="module")
def auto_reference(tmp_path_factory):
    """The default codec's tiles of SMALL at tile size 64, coded in this process."""
    return reference(tmp_path_factory.mktemp("ref"), SMALL, "auto", 64)


def test_default_codec_on_the_cluster_equals_one_process(cluster, tmp_path, auto_reference):
    """auto on workers (one torch thread, denormals flushed) gives compress's bytes."""
    out = tmp_path / "out"
    r = run_many(str(SMALL), "--scheduler", cluster.address, "--out-dir", str(out),
                 "--tile-size", "64", "--task-tiles", "8", "--quiet")
    assert r.returncode == 0, r.stderr
    assert int(report(out)["small_HE_levels"]["tasks"]) > 1
    assert tiles_of(out / "small_HE_levels.zarr.zip") == auto_reference


def test_band_rows_equal_compress_for_the_default_codec(auto_reference):
    """Bands of auto (each coding the rows around it as context) give the bytes of one
    pass over the level: the first row, two middle rows, the last row."""
    ref = auto_reference
    codec = worker_codec(CodecSpec("auto", None, (), None))
    with open_source(SMALL) as src:
        plan = plan_pyramid(src.level_dimensions, src.level_downsamples, 64)
        cols = plan.levels[0].grid.cols
        assert plan.levels[0].grid.rows == 4
        for lo, hi in ((0, 1), (1, 3), (3, 4)):
            rows = encode_band(codec, src, plan, Segment(0, lo, hi))
            assert [r.row for r in rows] == list(range(lo, hi))
            for row in rows:
                assert row.records is not None and len(row.records) == cols
                assert row.tiles == [ref[(0, c, row.row)] for c in range(cols)]


def test_to_dask_on_the_cluster_reopens_the_container_by_path(cluster, tmp_path):
    from distributed import Client

    out = tmp_path / "s.zarr.zip"
    wsicodec.compress(SMALL, out, wsicodec.get_codec("jpegxl", None, effort=1), tile_size=64)
    with wsicodec.open_slide(out) as slide, Client(cluster.address, set_as_default=False) as c:
        arr = slide.to_dask(0, chunks=(48, 80))
        got = c.compute(arr[5:, 7:]).result()
        w, h = slide.level_dimensions[0]
        ref = slide.read_region((7, 5), 0, (w - 7, h - 5), as_array=True, rgba=True)
    np.testing.assert_array_equal(got, ref)


# ---------------------------------------------------------------------- in this process
@pytest.mark.parametrize("slide,tile", [(CMU, 256), (SMALL, 32)])
def test_level_strips_equal_the_pyramid_stream(slide, tile):
    with open_source(slide) as src:
        plan = plan_pyramid(src.level_dimensions, src.level_downsamples, tile)
        memo = StripMemo(plan, max_bytes=1 << 20)       # keeps the coarse levels only
        for s in iter_strips(src, plan):
            np.testing.assert_array_equal(level_strip(src, plan, s.level, s.row).pixels, s.pixels)
            np.testing.assert_array_equal(level_strip(src, plan, s.level, s.row, memo).pixels, s.pixels)
        assert memo.strips and 0 not in memo.keep or slide == SMALL


def test_plan_tasks_cover_every_missing_row_once():
    plan = plan_pyramid(((2220, 2967),), (1.0,), 256)      # 9 x 12 tiles, 5 levels
    rows = {(lv.index, r) for lv in plan.levels for r in range(lv.grid.rows)}
    todo = rows - {(0, 3), (0, 4)}
    for encoder in (False, True):
        tasks = plan_tasks(plan, todo, 20, encoder)
        covered = [(s.level, r) for t in tasks for s in t for r in range(s.lo, s.hi)]
        assert sorted(covered) == sorted(todo)
        assert all(not (s.level == 0 and s.lo <= 3 < s.hi) for t in tasks for s in t)
    assert len(plan_tasks(plan, rows, 10_000, True)) == 1          # small: one task
    last = plan_tasks(plan, rows, 32, False)[-1]                     # levels 1.. (44 tiles): one
    assert [s.level for s in last] == [1, 2, 3, 4]
    with pytest.raises(Exception):
        plan_tasks(plan, rows, 0, False)


def test_inputs_folders_manifests_and_name_clashes(tmp_path):
    found = expand_sources([SLIDES])
    names = [p.name for p in found]
    assert "cmu_small_region.svs" in names and "nonconforming_small_dicom.dcm" in names
    assert sum(p.suffix == ".dcm" and p.parent.name == "dicom-cmu1-small" for p in found) == 1
    (tmp_path / "a").mkdir()
    shutil.copy(SMALL, tmp_path / "a" / "cmu_small_region.svs")   # another slide, same name
    (tmp_path / "b.svs").symlink_to(CMU)                           # the same slide again
    man = tmp_path / "list.csv"
    man.write_text(f"id,path\n1,{CMU}\n2,a/cmu_small_region.svs\n3,b.svs\n")
    jobs = assign_names(expand_sources([man]), tmp_path / "out")
    assert [j.name for j in jobs] == ["cmu_small_region", "cmu_small_region-2"]
    assert jobs[1].wanted == "cmu_small_region"
    bad = tmp_path / "bad.csv"
    bad.write_text("file\nx.svs\n")
    with pytest.raises(InvalidSettingError, match="path"):
        read_manifest(bad)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from wsicodec.cli import main

    assert main(["compress-many", str(tmp_path / "missing.svs"), "--out-dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.svs" in err
    assert main(["compress-many", str(SMALL), "--out-dir", str(tmp_path / "o"), "--scheduler",
                 "tcp://127.0.0.1:1", "--workers", "2"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert main(["compress-many", str(SMALL), "--out-dir", str(tmp_path / "o"), "--task-tiles", "0"]) == 2
    assert main(["compress-many", str(SMALL), "--out-dir", str(tmp_path / "o"), "--scheduler",
                 "tcp://127.0.0.1:1", "--scheduler-file", "x"]) == 2
    assert not (tmp_path / "o").exists()


def test_to_dask_equals_read_region_on_every_level_and_edge(tmp_path):
    out = tmp_path / "s.zarr.zip"
    wsicodec.compress(CMU, out, wsicodec.get_codec("jpegxl", None, effort=1), tile_size=256)
    with wsicodec.open_slide(out) as slide:
        for level in range(slide.level_count):
            w, h = slide.level_dimensions[level]
            arr = slide.to_dask(level, chunks=300)             # chunks across tile edges
            assert arr.shape == (h, w, 4) and arr.dtype == np.uint8
            full = arr.compute(scheduler="threads")
            ds = slide.level_downsamples[level]
            np.testing.assert_array_equal(full, slide.read_region((0, 0), level, (w, h),
                                                                  as_array=True, rgba=True))
            x, y = max(0, w - 77), max(0, h - 45)              # the bottom-right edge
            loc = (math.ceil(x * ds), math.ceil(y * ds))
            assert (math.floor(loc[0] / ds), math.floor(loc[1] / ds)) == (x, y)
            np.testing.assert_array_equal(
                full[y:, x:], slide.read_region(loc, level, (w - x, h - y), as_array=True, rgba=True))
        assert (full[..., 3] == 255).all()
        with pytest.raises(Exception):
            slide.to_dask(slide.level_count)
