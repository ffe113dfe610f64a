"""The report of a ``compress-many`` run: one :class:`SlideReport` per slide, written as
``DIR/report.csv`` (atomically) and as JSON."""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

#: what happened to a slide
STATUSES = ("done", "resumed", "complete", "failed", "interrupted", "not started")


@dataclass
class SlideReport:
    """One slide of a run.

    ``status``: ``done`` (coded in this run), ``resumed`` (an interrupted run's rows taken
    over, the rest coded), ``complete`` (its output existed and ``--resume`` kept it),
    ``failed`` (``error`` says why; nothing at ``output``), ``interrupted`` (``error``
    says where its finished rows were kept, if any) or ``not started``."""

    source: str
    name: str
    output: str
    status: str = "not started"
    error: str = ""
    source_bytes: int = 0
    container_bytes: int = 0
    ratio: float = 0.0                  #: source bytes / container bytes
    level0_mp: float = 0.0              #: level-0 megapixels
    seconds: float = 0.0                #: wall time of the slide in this run
    tiles: int = 0
    resumed_tiles: int = 0
    workers: list[str] = field(default_factory=list)   #: addresses of the workers that coded it
    tasks: int = 0                      #: tasks that coded its rows (a small slide: one)
    cpu_seconds: float = 0.0            #: the workers' CPU seconds in those tasks
    renamed_from: str = ""              #: the name it would have had without a clash

    @property
    def ok(self) -> bool:
        return self.status in ("done", "resumed", "complete")


COLUMNS = tuple(f.name for f in fields(SlideReport))


def report_csv(reports: Sequence[SlideReport]) -> str:
    """The reports as CSV text, one row each (``workers`` joined with ``;``)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in reports:
        row = asdict(r)
        row["workers"] = ";".join(r.workers)
        row["ratio"] = f"{r.ratio:.4f}"
        row["level0_mp"] = f"{r.level0_mp:.4f}"
        row["seconds"] = f"{r.seconds:.3f}"
        row["cpu_seconds"] = f"{r.cpu_seconds:.3f}"
        w.writerow(row)
    return buf.getvalue()


def report_json(reports: Sequence[SlideReport], **extra: object) -> str:
    """The reports as a JSON object: ``slides`` (each a report's fields), a ``summary``
    (slides per status, MP, bytes, ratio, seconds) and ``extra``."""
    by_status: dict[str, int] = {}
    for r in reports:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    src = sum(r.source_bytes for r in reports if r.ok)
    out = sum(r.container_bytes for r in reports if r.ok)
    summary = {"slides": len(reports), "by_status": by_status,
               "level0_mp": sum(r.level0_mp for r in reports if r.ok),
               "source_bytes": src, "container_bytes": out,
               "ratio": src / out if out else 0.0}
    return json.dumps({"slides": [asdict(r) for r in reports], "summary": summary, **extra},
                      indent=2)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a hidden sibling and a rename."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


__all__ = ["COLUMNS", "STATUSES", "SlideReport", "report_csv", "report_json", "write_text_atomic"]
