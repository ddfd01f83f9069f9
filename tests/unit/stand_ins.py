"""What the unit tests of scripts/ share: a PATH that holds only what a test gives it."""

from __future__ import annotations

import shutil
from pathlib import Path


def script_path(directory: Path, plain_tools, stand_ins: dict[str, str] | None = None) -> Path:
    """A bin directory to be a script's whole PATH: links to this machine's `plain_tools`
    and executable `stand_ins` (name -> text), so the script can reach nothing else."""
    directory.mkdir(parents=True)
    for tool in plain_tools:
        found = shutil.which(tool)
        assert found, f"{tool} is needed to run the script here"
        (directory / tool).symlink_to(found)
    for name, text in (stand_ins or {}).items():
        (directory / name).write_text(text)
        (directory / name).chmod(0o755)
    return directory
