"""Render files from configs/ (Jinja2). Undefined variables are errors, not blanks."""

from __future__ import annotations

from typing import Any

import jinja2

from .settings import PROJECT_DIR

CONFIGS_DIR = PROJECT_DIR / "configs"
SCRIPTS_DIR = PROJECT_DIR / "scripts"

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(CONFIGS_DIR)),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,
)


def render(name: str, **variables: Any) -> str:
    """configs/<name> rendered with `variables` (plain files come back unchanged)."""
    return _env.get_template(name).render(**variables)


def script(name: str) -> str:
    """The text of scripts/<name>, to send inline to the host."""
    return (SCRIPTS_DIR / name).read_text()
