"""Fetch the LPIPS calibration pairs (IQA-PyTorch's ``ResultsCalibra``) into a local cache, once.

The five Kodak reference/distorted pairs ship inside the PyPI wheel ``pyiqa==0.1.16``. This helper runs
``pip download --no-deps pyiqa==0.1.16`` (an ordinary registry client call, nothing else is fetched),
extracts ``ResultsCalibra/{ref_dir,dist_dir}`` from the wheel and deletes the wheel. Tests never
download: ``tests/test_metrics.py`` reads the cache and skips with a reason when it is absent.

Cache directory: ``$WSICODEC_CACHE/pyiqa-calibra`` if ``WSICODEC_CACHE`` is set, else
``~/.cache/wsicodec/pyiqa-calibra``. Run from the repository root::

    .venv/bin/python tests/fetch_calibration.py          # no-op when already present
    .venv/bin/python tests/fetch_calibration.py --force  # fetch again

Exit status 0 when the data is in place, 1 when it could not be fetched (the message says why).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PYIQA_REQUIREMENT = "pyiqa==0.1.16"
PAIRS = ("I03", "I04", "I06", "I08", "I19")


def calibration_dir() -> Path:
    """Where the calibration pairs live: ``<cache>/pyiqa-calibra/ResultsCalibra``."""
    base = os.environ.get("WSICODEC_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "wsicodec"
    return root / "pyiqa-calibra" / "ResultsCalibra"


def is_complete(directory: Path) -> bool:
    return all((directory / sub / f"{name}.bmp").is_file()
               for sub in ("ref_dir", "dist_dir") for name in PAIRS)


def fetch(directory: Path, force: bool = False) -> Path:
    if is_complete(directory) and not force:
        return directory
    with tempfile.TemporaryDirectory(prefix="wsicodec-pyiqa-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, PYIQA_REQUIREMENT]
        subprocess.run(cmd, check=True)
        wheels = list(Path(tmp).glob("pyiqa-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download produced no wheel for {PYIQA_REQUIREMENT}")
        staging = directory.parent / (directory.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [m for m in wheel.namelist()
                       if m.startswith("ResultsCalibra/") and m.lower().endswith(".bmp")]
            for m in members:
                target = staging / Path(m).relative_to("ResultsCalibra")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(wheel.read(m))
        if not is_complete(staging):
            raise RuntimeError(f"{wheels[0].name} lacks some of ResultsCalibra/{{ref_dir,dist_dir}}/"
                               f"{{{','.join(PAIRS)}}}.bmp")
        shutil.rmtree(directory, ignore_errors=True)
        staging.rename(directory)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="fetch again even if present")
    args = parser.parse_args(argv)
    directory = calibration_dir()
    try:
        fetch(directory, force=args.force)
    except (subprocess.CalledProcessError, RuntimeError, OSError) as exc:
        print(f"fetch_calibration: could not fetch {PYIQA_REQUIREMENT}: {exc}", file=sys.stderr)
        return 1
    print(f"LPIPS calibration pairs in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
