"""The output-path rules: a command never writes where it would destroy one of its
inputs, nor over an existing output unless told to, nor into a folder that is not there.

Every command that writes an output (``compress``, ``decompress``) calls
:func:`check_output_against_inputs` before it does anything else, whatever its flags
(``--overwrite`` and ``--resume`` included). It refuses, with one
:class:`~wsicodec.errors.OutputPathError`, an output that

* is an input (the same path, a symbolic link to it, or a hard link: the same inode);
* lies inside an input folder: a ``.zarr`` directory container, the folder of a DICOM
  slide (OpenSlide reads every ``.dcm`` of the folder), a MIRAX slide's data folder;
* contains an input (a directory output, replaced as a whole by ``--overwrite``);
* would have its hidden temporary siblings (``.OUT.partial-*``, ``.OUT.old-*``, which a
  writer creates, takes over with ``--resume`` and removes) on an input.

:func:`check_output_path` refuses an output that exists (without ``--overwrite``) or
whose folder does not.

Nothing here reads or writes a file's contents.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from wsicodec.errors import OutputExistsError, OutputPathError

#: the prefixes of the hidden siblings ``.OUT<prefix>XXXXXXXX`` a writer of OUT creates
#: and removes (temporary output, resume partial, an overwritten output set aside)
HIDDEN_SIBLING_PREFIXES = (".partial-", ".old-")


def _absolute(path: Path) -> Path:
    """``path`` absolute with every symbolic link that exists resolved (the path itself
    need not exist)."""
    return Path(os.path.realpath(os.path.abspath(path)))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:          # one of them does not exist (yet)
        return False


def _is_hidden_sibling(name: str, output_name: str) -> bool:
    return any(name.startswith(f".{output_name}{p}") for p in HIDDEN_SIBLING_PREFIXES)


def check_output_against_inputs(output: str | os.PathLike[str],
                                inputs: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse to write ``output`` where it would replace, or be written into, an input.

    ``inputs``: the input files and folders (see :func:`slide_inputs` for what a slide
    reads). Call it before anything else, whatever the flags.

    Raises:
        OutputPathError: one line naming the output, the input and why.
    """
    out = Path(output)
    out_abs = _absolute(out)
    for given in inputs:
        inp = Path(given)
        in_abs = _absolute(inp)
        if in_abs == out_abs or _same_file(inp, out):
            what = "folder" if in_abs.is_dir() else "file"
            raise OutputPathError(f"{out}: refusing to write the output over the input "
                                  f"{inp} (the same {what})")
        if in_abs.is_dir() and out_abs.is_relative_to(in_abs):
            raise OutputPathError(f"{out}: refusing to write the output inside the input "
                                  f"folder {inp}; write it somewhere else")
        if in_abs.is_relative_to(out_abs):
            raise OutputPathError(f"{out}: refusing to write the output there: the input "
                                  f"{inp} lies inside it")
        for p in (in_abs, *in_abs.parents):
            if p.parent == out_abs.parent and _is_hidden_sibling(p.name, out_abs.name):
                raise OutputPathError(f"{out}: refusing to write the output there: its "
                                      f"hidden temporary files ({p.name}) would be the input "
                                      f"{inp}")


def check_output_path(path: str | os.PathLike[str], overwrite: bool) -> None:
    """Refuse an output that exists (unless ``overwrite``) or whose folder does not.

    Outputs are written as a hidden temporary sibling and renamed into place, so the
    folder must exist; a mistyped folder is reported, never created.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: already exists (use --overwrite to replace it)")
    parent = path.absolute().parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise OutputPathError(f"{path}: cannot write there: {parent} {what}")


def slide_inputs(path: str | os.PathLike[str]) -> list[Path]:
    """What compressing the slide ``path`` reads: the file, and for a DICOM slide its
    folder (OpenSlide reads every ``.dcm`` file of it), for a MIRAX ``.mrxs`` the data
    folder of the same name beside it."""
    p = Path(path)
    found = [p]
    if p.is_file() and p.suffix.lower() == ".mrxs":
        found.append(p.with_suffix(""))
    elif p.is_file() and _is_dicom(p):
        found.append(p.parent)
    return found


def _is_dicom(p: Path) -> bool:
    if p.suffix.lower() == ".dcm":
        return True
    try:
        with open(p, "rb") as f:             # DICOM part 10: 128-byte preamble, "DICM"
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


__all__ = ["check_output_against_inputs", "check_output_path", "slide_inputs",
           "HIDDEN_SIBLING_PREFIXES"]
