"""Which slides a ``compress-many`` run codes, and the name each one's output gets.

SOURCE arguments are slide files, folders (searched recursively) and manifests (a
``.txt``/``.lst`` file of one path a line, or a ``.csv`` with a ``path`` column; relative
paths are taken from the manifest's folder)::

    expand_sources(SOURCE...) ─► [path, ...] (first mention wins, duplicates dropped)
        ─► assign_names ─► [SlideJob(source, name, output)]  ("x", "x-2", ... on clashes)

In a folder, a file is taken for a slide when its suffix is one of
:data:`SLIDE_SUFFIXES` or OpenSlide recognises it; the ``.dcm`` files of one folder are
one DICOM slide (OpenSlide reads them all from any one), named after the folder.
Containers (``.zarr``, ``.zarr.zip``) and hidden files are never taken.  A file named
directly is always taken: if it is no slide, its run says so.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from wsicodec.errors import InvalidSettingError, SlideNotFoundError

#: suffixes a folder search takes for slides without asking OpenSlide
SLIDE_SUFFIXES = frozenset({".svs", ".ndpi", ".dcm", ".mrxs", ".tif", ".tiff", ".btf", ".vms",
                            ".vmu", ".scn", ".bif", ".svslide", ".png", ".jpg", ".jpeg"})
#: suffixes of manifest files
MANIFEST_SUFFIXES = frozenset({".txt", ".lst", ".csv"})
#: the suffix of every output
OUTPUT_SUFFIX = ".zarr.zip"


@dataclass(frozen=True)
class SlideJob:
    """One slide of a run: where it is, the name it goes by and its output path."""

    source: Path
    name: str
    output: Path
    #: the name it would have had without a clash (equal to ``name`` when none)
    wanted: str


def _is_container(p: Path) -> bool:
    n = p.name.lower()
    return n.endswith(".zarr") or n.endswith(".zarr.zip")


def _looks_like_slide(p: Path) -> bool:
    if p.suffix.lower() in SLIDE_SUFFIXES:
        return True
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(p)) is not None
    except openslide.OpenSlideError:
        return False


def find_in_folder(folder: Path, skip: Sequence[Path] = ()) -> list[Path]:
    """The slides in ``folder`` and below, sorted (module docstring); folders in
    ``skip`` (the output folder) are not searched."""
    skipped = {os.path.realpath(s) for s in skip}
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.lower().endswith(".zarr")
                         and os.path.realpath(os.path.join(root, d)) not in skipped)
        dicom = False
        for f in sorted(files):
            p = Path(root) / f
            if f.startswith(".") or _is_container(p) or not p.is_file():
                continue
            if p.suffix.lower() == ".dcm":
                if not dicom:
                    found.append(p)        # one file stands for the folder's slide
                    dicom = True
            elif _looks_like_slide(p):
                found.append(p)
    return found


def read_manifest(path: Path) -> list[Path]:
    """The slide paths a manifest lists (module docstring).  Raises InvalidSettingError
    for a CSV without a ``path`` column."""
    text = path.read_text(encoding="utf-8-sig")
    base = path.parent
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        columns = {c.strip().lower(): c for c in (rows[0].keys() if rows else [])}
        if rows and "path" not in columns:
            raise InvalidSettingError(f"{path}: a CSV manifest needs a 'path' column "
                                      f"(has {', '.join(columns) or 'none'})")
        items = [(r[columns["path"]] or "").strip() for r in rows]
    else:
        items = [line.strip() for line in text.splitlines()]
    return [base / i if not os.path.isabs(i) else Path(i) for i in items
            if i and not i.startswith("#")]


def expand_sources(sources: Iterable[str | os.PathLike[str]], skip: Sequence[Path] = ()
                   ) -> list[Path]:
    """Every slide the SOURCE arguments name, in order, each once.  Raises
    SlideNotFoundError for a SOURCE that does not exist (a manifest's missing entries
    are kept: their runs fail and say so)."""
    out: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            out += find_in_folder(p, skip)
        elif p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
            out += read_manifest(p)
        elif p.exists():
            out.append(p)
        else:
            raise SlideNotFoundError(f"{p}: no such file or folder")
    seen: set[str] = set()
    unique = []
    for p in out:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def slide_name(path: Path) -> str:
    """The name of a slide's output: its file name without the suffix; a DICOM slide's
    folder name."""
    if path.suffix.lower() == ".dcm":
        return path.resolve().parent.name
    return path.stem or path.name


def assign_names(paths: Sequence[Path], out_dir: Path) -> list[SlideJob]:
    """A :class:`SlideJob` per slide, named by :func:`slide_name`; a name already taken
    (case-insensitively, for file systems that fold case) by an earlier slide of the list
    gets ``-2``, ``-3``, ... (the first free one)."""
    taken: set[str] = set()
    jobs = []
    for p in paths:
        wanted = slide_name(p)
        name, k = wanted, 1
        while name.lower() in taken:
            k += 1
            name = f"{wanted}-{k}"
        taken.add(name.lower())
        jobs.append(SlideJob(p, name, out_dir / f"{name}{OUTPUT_SUFFIX}", wanted))
    return jobs


__all__ = ["MANIFEST_SUFFIXES", "OUTPUT_SUFFIX", "SLIDE_SUFFIXES", "SlideJob", "assign_names",
           "expand_sources", "find_in_folder", "read_manifest", "slide_name"]
