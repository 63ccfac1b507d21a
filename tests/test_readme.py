"""CI runs the README's test command: keep `.ci/run` and the README in step."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme = (ROOT / "README.md").read_text()
    assert ci in readme.splitlines(), f"README must show {ci!r} verbatim"
    assert "pytest" in ci
