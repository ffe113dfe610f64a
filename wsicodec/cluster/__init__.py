"""Compressing many slides on a Dask cluster (``wsicodec compress-many``), and reading a
container's level as a lazy Dask array (:meth:`wsicodec.slide.WsiSlide.to_dask`).

::

    inputs: SOURCE... ─► slides ─► SlideJob (name, output)      (wsicodec.cluster.inputs)
    run:    connect ─► Run: a slide per client thread, compress(..., encode_rows) whose rows
            are coded as band tasks on the workers               (wsicodec.cluster.run)
    bands:  band tasks: planned, then coded on a worker          (wsicodec.cluster.bands)
    report: report.csv / JSON                                    (wsicodec.cluster.report)
    arrays: to_dask: chunks read through the slide's BatchDecoder (wsicodec.cluster.arrays)

Nothing here imports ``distributed`` or ``dask`` until it is used.
"""

from wsicodec.cluster.bands import (DEFAULT_TASK_TILES, BandRow, CodecSpec, Segment, TaskSpec,
                                    encode_task, plan_tasks)
from wsicodec.cluster.inputs import SlideJob, assign_names, expand_sources
from wsicodec.cluster.report import SlideReport, report_csv, report_json, write_text_atomic
from wsicodec.cluster.run import ClusterError, ClusterSettings, Run, connect, dashboard_link

__all__ = ["BandRow", "ClusterError", "ClusterSettings", "CodecSpec", "DEFAULT_TASK_TILES",
           "Run", "Segment", "SlideJob", "SlideReport", "TaskSpec", "assign_names", "connect",
           "dashboard_link", "encode_task", "expand_sources", "plan_tasks", "report_csv",
           "report_json", "write_text_atomic"]
