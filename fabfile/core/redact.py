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


def url(address: str) -> str:
    """A URL without the password or token in its user part (https://user:TOKEN@host/...)."""
    scheme, sep, rest = address.partition("://")
    userinfo, at, host = rest.partition("@")
    if not (sep and at) or "/" in userinfo:
        return address
    if ":" in userinfo:
        return f"{scheme}://{userinfo.split(':', 1)[0]}:{MASK}@{host}"
    # https://TOKEN@host is a token; ssh://git@host is only a user name.
    return f"{scheme}://{MASK}@{host}" if scheme.lower() in ("http", "https") else address


def redact(text: str) -> str:
    # Longest first, so a secret containing another is masked whole.
    for value in sorted(_secrets, key=len, reverse=True):
        text = text.replace(value, MASK)
    return text
