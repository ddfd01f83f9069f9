"""The project's lint rules ([tool.ruff] in pyproject.toml) hold for every file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fabfile.core.settings import PROJECT_DIR

# The venv's own ruff (pinned in the `test` extra), whatever PATH holds.
RUFF = Path(sys.executable).parent / "ruff"


def test_ruff_check_is_clean():
    assert RUFF.is_file(), f"{RUFF} is missing: pip install -e '.[test]'"
    result = subprocess.run([str(RUFF), "check", "--no-cache", "."], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
