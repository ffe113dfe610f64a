"""Write an open container as a DICOM WSI series into a folder, atomically.

wsidicom writes the files (``WsiDicom(ContainerSource(...)).save``) into a hidden
sibling folder; only when every file is written does the folder take the output's name
(an existing output, when replaced, is moved aside first and removed after).  A failed
or interrupted write leaves no folder at the output's name.  An existing output is
replaced only if it holds DICOM files alone (``.dcm``), so ``--overwrite`` never
removes a folder of anything else.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from wsicodec.dicom import INSTALL_HINT, DicomSettings
from wsicodec.errors import CodecUnavailableError, InvalidSettingError, OutputExistsError, WsiCodecError

#: suffix of the files wsidicom writes
DICOM_SUFFIX = ".dcm"


def _wsidicom() -> Any:
    try:
        import wsidicom
    except ImportError as e:
        raise CodecUnavailableError(f"{INSTALL_HINT} ({e})") from None
    return wsidicom


def check_replaceable(out: Path) -> None:
    """Raise OutputExistsError unless ``out`` may be replaced by a DICOM series: absent,
    a file, or a folder of ``.dcm`` files only."""
    if out.is_dir() and not out.is_symlink():
        other = [p.name for p in out.iterdir()
                 if not (p.is_file() and p.suffix.lower() == DICOM_SUFFIX)]
        if other:
            raise OutputExistsError(f"{out}: a folder holding more than DICOM files "
                                    f"({other[0]!r} among them); not replacing it")


def write_container_dicom(container: Any, out: str | os.PathLike[str], settings: DicomSettings,
                          *, workers: int = 1, deidentify: bool = False,
                          progress: Any = None) -> list[Path]:
    """Write ``container`` (open) as a DICOM WSI series into the folder ``out`` (which
    the caller has checked: absent, or replaceable and ``--overwrite`` given); return
    the files written, sorted.  ``workers``: wsidicom's threads; ``progress(n)``: n more
    tiles done.

    Raises CodecUnavailableError (wsidicom not installed), InvalidSettingError (no mpp, or a
    pyramid wsidicom cannot hold: levels not a whole power of two apart within its 1 %),
    OutputExistsError (``out`` is a folder of other things), CorruptTileError /
    CorruptDataError (damage; nothing is left at ``out``), OSError."""
    _wsidicom()
    from wsidicom import WsiDicom

    from wsicodec.dicom.source import ContainerSource

    out = Path(out)
    check_replaceable(out)
    source = ContainerSource(container, settings, deidentify=deidentify, progress=progress)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with WsiDicom(source) as wsi:
            try:
                written = wsi.save(tmp, workers=workers)
            except WsiCodecError:
                raise
            except Exception as e:   # wsidicom's own, or a tile error it wrapped
                cause = _wsicodec_cause(e)
                if cause is not None:
                    raise cause from e
                raise
        names = sorted(Path(str(p)).name for p in written)
        if out.exists() or out.is_symlink():
            os.replace(out, old)
        os.replace(tmp, out)
    except NotImplementedError as e:   # wsidicom: levels not integer steps apart (small slides)
        raise InvalidSettingError(f"wsidicom cannot write this pyramid as DICOM WSI: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        elif old.exists() or old.is_symlink():
            old.unlink()
    return [out / n for n in names]


def _wsicodec_cause(e: BaseException) -> WsiCodecError | None:
    """The wsicodec error (a damaged tile) somewhere in ``e``'s causes, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, WsiCodecError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return None


__all__ = ["DICOM_SUFFIX", "check_replaceable", "write_container_dicom"]
