"""The code stays clean by the project's own checks: ruff over everything, mypy --strict
over the package (its settings are in pyproject.toml; both tools are pinned there)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_ruff() -> None:
    result = _run("ruff", "check", "--no-cache", "src", "tests", "benchmarks")
    if result.returncode != 0:
        pytest.fail(result.stdout + result.stderr)


def test_mypy_strict(tmp_path: Path) -> None:
    result = _run("mypy", "--cache-dir", str(tmp_path), "src")
    if result.returncode != 0:
        pytest.fail(result.stdout + result.stderr)
