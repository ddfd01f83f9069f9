"""Keep secret values out of everything we print.

Secrets are registered once (when settings load them, or when a task learns
one) and every line the reporter or an error prints passes through `redact`.
"""

from __future__ import annotations

MASK = "********"
# Values this short are too likely to occur by chance ("1", "yes") to mask
# without mangling ordinary output; secrets we generate are long.
_MIN_LENGTH = 6

_secrets: set[str] = set()


def register(*values: str | None) -> None:
    for value in values:
        if value and len(value) >= _MIN_LENGTH:
            _secrets.add(value)


def forget_all() -> None:
    """For tests: start from an empty registry."""
    _secrets.clear()


def redact(text: str) -> str:
    # Longest first, so a secret containing another is masked whole.
    for value in sorted(_secrets, key=len, reverse=True):
        text = text.replace(value, MASK)
    return text
