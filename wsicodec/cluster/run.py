"""Compressing many slides on a Dask cluster (``wsicodec compress-many``).

::

    connect (LocalCluster here, or a running scheduler) ─► Client
    compress_many(jobs):  a client thread per slide in flight (at most ``in_flight``)
        compress(slide, output, codec, encode_rows=...) ── the one compress: metadata,
        │   associated images, ContainerWriter (atomic, CRCs, journal for --resume)
        └─ encode_rows: plan_tasks ─► client.submit(encode_task) per band ─► each result's
           rows written as it arrives (any order) ─► commit
    ─► [SlideReport]

A worker that dies loses only the tasks it held: the scheduler runs them again on another
worker (tasks are pure: a band codes the same bytes wherever it runs).  An interrupt
(:meth:`Run.stop`: Ctrl-C, SIGTERM) or a lost scheduler stops every slide in flight:
each keeps its finished rows for ``--resume`` (:class:`~wsicodec.writer.ContainerWriter`),
finished slides stay.  A slide that cannot be read or coded fails alone.

Workers read the slides by path: every worker must see them at the same path as the
client (a shared file system), and the client alone writes the outputs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait as wait_threads
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from wsicodec.cluster.bands import (DEFAULT_TASK_TILES, CodecSpec, TaskSpec, codec_record,
                                    encode_task, plan_tasks)
from wsicodec.cluster.inputs import SlideJob
from wsicodec.cluster.report import SlideReport
from wsicodec.errors import (CompressInterrupted, PartialKeptError, WsiCodecError, error_text)

#: seconds between checks for an interrupt while waiting on a slide's tasks
POLL_S = 0.25


class ClusterError(WsiCodecError, OSError):
    """The cluster cannot be reached or was lost (the scheduler gone, a connection
    closed); a slide in flight keeps its finished rows, as after an I/O error."""


@dataclass(frozen=True)
class ClusterSettings:
    """Where the tasks run.

    ``scheduler``: a running scheduler's address (``tcp://HOST:PORT``) or
    ``scheduler_file``: the file ``dask scheduler --scheduler-file`` wrote; neither: a
    LocalCluster on this machine with ``workers`` worker processes (default: the CPU
    count), one thread each, its dashboard on ``dashboard_address`` (None: none).
    """

    scheduler: str | None = None
    scheduler_file: str | None = None
    workers: int | None = None
    dashboard_address: str | None = ":8787"


@contextlib.contextmanager
def connect(settings: ClusterSettings) -> Iterator[Any]:
    """A ``distributed.Client`` for ``settings``, closed (and a LocalCluster stopped) on
    leaving.  Raises ClusterError when the scheduler cannot be reached,
    InvalidSettingError for a worker count out of 1..256."""
    from distributed import Client, LocalCluster

    from wsicodec.errors import InvalidSettingError

    cluster = None
    try:
        if settings.scheduler or settings.scheduler_file:
            where = settings.scheduler or settings.scheduler_file
            client = Client(settings.scheduler, scheduler_file=settings.scheduler_file,
                            timeout="20s", set_as_default=False)
        else:
            n = settings.workers or max(1, os.cpu_count() or 1)
            if not 1 <= n <= 256:
                raise InvalidSettingError(f"workers must be in 1..256, got {n}")
            where = "a local cluster"
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                   host="127.0.0.1", dashboard_address=settings.dashboard_address,
                                   silence_logs=logging.CRITICAL)
            client = Client(cluster, set_as_default=False)
    except (OSError, TimeoutError) as e:
        if cluster is not None:
            cluster.close()
        raise ClusterError(f"cannot reach the Dask scheduler at {where}: {error_text(e)}") from e
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close()


def dashboard_link(client: Any) -> str | None:
    """The address of the cluster's dashboard, or None when it serves none (bokeh missing)."""
    try:
        if "dashboard" not in client.scheduler_info().get("services", {}):
            return None
        return client.dashboard_link
    except Exception:  # noqa: BLE001 - only for a line of output
        return None


def _is_cluster_error(e: BaseException) -> bool:
    import asyncio

    mod = type(e).__module__ or ""
    return (mod.startswith("distributed") or mod.startswith("tornado")
            or isinstance(e, (asyncio.CancelledError, asyncio.TimeoutError)))


class Run:
    """One ``compress-many`` run over ``jobs`` on ``client``.

    ``compress_kwargs``: what :func:`wsicodec.pipeline.compress` takes besides the slide,
    output and codec (tile_size, overwrite, associated, resume, deidentify); ``codec``:
    ``spec`` built here (for the container's metadata; the workers build their own).
    ``on_tiles(n)`` / ``on_slide(report)`` / ``on_total(n)``: progress callbacks (tiles
    finished, a slide finished, tiles added to the run's total), called from the
    client's threads.
    """

    def __init__(self, client: Any, jobs: Sequence[SlideJob], spec: CodecSpec, codec: Any, *,
                 compress_kwargs: dict[str, Any], task_tiles: int = DEFAULT_TASK_TILES,
                 in_flight: int | None = None, on_tiles: Callable[[int], None] | None = None,
                 on_slide: Callable[[SlideReport], None] | None = None,
                 on_total: Callable[[int], None] | None = None) -> None:
        self.client, self.jobs, self.spec, self.codec = client, list(jobs), spec, codec
        self.kwargs, self.task_tiles = dict(compress_kwargs), task_tiles
        threads = sum(client.nthreads().values()) or 1
        self.in_flight = in_flight or max(2, min(32, 2 * threads))
        self.on_tiles, self.on_slide, self.on_total = on_tiles, on_slide, on_total
        self.reports = [SlideReport(str(j.source), j.name, str(j.output),
                                    renamed_from=j.wanted if j.wanted != j.name else "")
                        for j in self.jobs]
        self._stop = threading.Event()
        self.cluster_lost: str | None = None
        self._tag = uuid.uuid4().hex[:8]

    def stop(self) -> None:
        """Stop every slide in flight (each keeps its finished rows); start no more."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def run(self) -> list[SlideReport]:
        """Code every slide; returns the reports (in ``jobs`` order).  A KeyboardInterrupt
        while waiting stops the run as :meth:`stop` does, then re-raises once the slides
        in flight have kept their rows."""
        pool = ThreadPoolExecutor(max_workers=self.in_flight, thread_name_prefix="wsicodec-slide")
        futures = [pool.submit(self._slide, i) for i in range(len(self.jobs))]
        try:
            pending = set(futures)
            while pending:
                _, pending = wait_threads(pending, timeout=POLL_S)
        except KeyboardInterrupt:
            self.stop()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return self.reports

    # ------------------------------------------------------------------ one slide
    def _slide(self, i: int) -> None:
        job, rep = self.jobs[i], self.reports[i]
        if self.stopped:
            return
        t0 = time.perf_counter()
        try:
            if job.output.exists() and self.kwargs.get("resume") and not self.kwargs.get("overwrite"):
                self._complete(job, rep)
            else:
                self._compress(i, job, rep)
        except CompressInterrupted as e:
            rep.status, rep.error = "interrupted", str(e)
        except KeyboardInterrupt:
            rep.status, rep.error = "interrupted", "no tile row finished"
        except PartialKeptError as e:
            rep.status, rep.error = "interrupted", " ".join(error_text(e).split())
            if isinstance(e.__cause__, ClusterError):
                self._lost(str(e.__cause__))
        except ClusterError as e:           # before its first row: nothing kept
            rep.status, rep.error = "interrupted", " ".join(str(e).split())
            self._lost(str(e))
        except BaseException as e:  # noqa: BLE001 - the slide fails alone, the run goes on
            rep.status = "failed"
            rep.error = " ".join((error_text(e) or type(e).__name__).split())
        rep.seconds = time.perf_counter() - t0
        if self.on_slide:
            self.on_slide(rep)

    def _lost(self, why: str) -> None:
        self.cluster_lost = self.cluster_lost or " ".join(why.split())
        self.stop()

    def _complete(self, job: SlideJob, rep: SlideReport) -> None:
        """An output an earlier run finished (``--resume``): kept, reported from its
        metadata."""
        from wsicodec.container import open_container
        from wsicodec.store import path_size

        with open_container(job.output) as c:
            meta = c.metadata
        w, h = meta.levels[0].dimensions
        rep.status, rep.level0_mp = "complete", w * h / 1e6
        rep.source_bytes = int(meta.source_bytes or 0)
        rep.container_bytes = path_size(job.output)
        rep.ratio = rep.source_bytes / max(rep.container_bytes, 1)
        rep.tiles = sum(lv.grid(meta.tile_size).tile_count for lv in meta.levels)

    def _compress(self, i: int, job: SlideJob, rep: SlideReport) -> None:
        from wsicodec.pipeline import compress

        seen: set[str] = set()

        def encode_rows(writer: Any, source: Any, plan: Any, codec: Any, done: set, progress: Any
                        ) -> None:
            self._encode_rows(i, job, rep, writer, plan, codec, done, progress, seen)

        result = compress(job.source, job.output, self.codec, progress=self.on_tiles,
                          encode_rows=encode_rows, **self.kwargs)
        w, h = result.dimensions
        rep.status = "resumed" if result.resumed_tiles else "done"
        rep.source_bytes, rep.container_bytes = result.source_bytes, result.container_bytes
        rep.ratio, rep.level0_mp = result.ratio_vs_source, w * h / 1e6
        rep.tiles, rep.resumed_tiles = result.tiles, result.resumed_tiles
        rep.workers = sorted(seen)

    def _encode_rows(self, i: int, job: SlideJob, rep: SlideReport, writer: Any, plan: Any,
                     codec: Any, done: set, progress: Any, seen: set[str]) -> None:
        """:data:`~wsicodec.pipeline.EncodeRows` on the cluster (module docstring)."""
        from wsicodec.pipeline import row_records

        if self.on_total:
            self.on_total(plan.tile_count)
        todo = {(lv.index, r) for lv in plan.levels for r in range(lv.grid.rows)} - set(done)
        st = job.source.stat()
        record = codec_record(codec)
        tasks = [TaskSpec(str(job.source.resolve()), st.st_size, st.st_mtime_ns, self.spec,
                          plan.tile_size, segs, record)
                 for segs in plan_tasks(plan, todo, self.task_tiles, codec.level_encoder(0) is not None)]
        priority = len(self.jobs) - i               # earlier slides first
        finished: queue.Queue = queue.Queue()
        pending: set = set()
        try:
            for k, t in enumerate(tasks):
                f = self.client.submit(encode_task, t, pure=False, priority=priority,
                                       key=f"wsicodec-{job.name}-{k}-{self._tag}")
                pending.add(f)
                f.add_done_callback(finished.put)
            while pending:
                if self.stopped:
                    raise KeyboardInterrupt
                if self.client.status not in ("running", "connecting"):
                    raise ClusterError(f"the Dask cluster was lost (client {self.client.status})")
                try:
                    f = finished.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                res = f.result()
                pending.discard(f)
                seen.add(res.worker)
                rep.cpu_seconds += res.cpu_s
                rep.tasks += 1
                for r in res.rows:
                    writer.write_row(r.level, r.row, r.tiles, **row_records(codec, r.records))
                    if progress:
                        progress(len(r.tiles))
                f.release()
        except ClusterError:
            raise
        except Exception as e:
            if type(e).__name__ == "KilledWorker":      # this slide's task, not the cluster
                raise WsiCodecError(f"a task of this slide killed the workers that ran it: "
                                    f"{error_text(e)}") from e
            if _is_cluster_error(e):
                raise ClusterError(f"the Dask cluster was lost: {error_text(e)}") from e
            raise
        finally:
            if pending:
                with contextlib.suppress(Exception):
                    self.client.cancel(list(pending))


__all__ = ["ClusterError", "ClusterSettings", "Run", "connect", "dashboard_link"]
