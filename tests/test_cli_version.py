"""``wsicodec --version``: the package's version on stdout, exit 0, as the installed
metadata (pyproject.toml) says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import wsicodec
from wsicodec.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    out, err = capsys.readouterr()
    assert out == f"wsicodec {wsicodec.__version__}\n" and err == ""


def test_version_matches_pyproject() -> None:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")   # tomllib is 3.11+
    found = re.search(r'^\[project\][^\[]*?^version = "([^"]+)"', text, re.M | re.S)
    assert found and wsicodec.__version__ == found[1]


def test_version_as_a_program() -> None:
    done = subprocess.run([sys.executable, "-m", "wsicodec", "--version"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wsicodec {wsicodec.__version__}"


def test_version_is_not_a_subcommand_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--version"]) == 2          # a usage error, one line
    err = capsys.readouterr().err
    assert err.startswith("wsicodec: error: ") and len(err.strip().splitlines()) == 1
