"""Many read-only probes, one round trip.

Facts are gathered by sending one script that runs each probe in turn and
frames its output between marker lines with its exit status:

    <marker> begin sshd_config
    ...probe stdout...
    <marker> end sshd_config 0

The marker is random per batch, so probe output cannot forge a frame.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace

from .target import Target, command_failed

_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")


@dataclass(frozen=True)
class ProbeResult:
    stdout: str
    status: int

    @property
    def ok(self) -> bool:
        return self.status == 0

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()


def batch_script(probes: Mapping[str, str], marker: str) -> str:
    parts = []
    for name, command in probes.items():
        if not _NAME.match(name):
            raise ValueError(f"probe name must be a plain word, got {name!r}")
        parts.append(
            f"printf '%s\\n' '{marker} begin {name}'\n"
            f"( {command}\n) </dev/null 2>/dev/null\n"
            f"printf '\\n%s %s\\n' '{marker} end {name}' \"$?\""
        )
    return "\n".join(parts) + "\n"


def parse_batch(output: str, marker: str) -> dict[str, ProbeResult]:
    results: dict[str, ProbeResult] = {}
    current: str | None = None
    body: list[str] = []
    for line in output.splitlines():
        if line.startswith(f"{marker} begin "):
            current, body = line.split(" ", 2)[2], []
        elif line.startswith(f"{marker} end ") and current is not None:
            status = int(line.rsplit(" ", 1)[1])
            results[current] = ProbeResult("\n".join(body).rstrip("\n"), status)
            current = None
        elif current is not None:
            body.append(line)
    return results


def gather(target: Target, probes: Mapping[str, str], *, sudo: bool = True) -> dict[str, ProbeResult]:
    """Run every probe in one round trip; return each one's stdout and status."""
    if not probes:
        return {}
    marker = "@@coachntt-" + secrets.token_hex(8)
    result = target.run(batch_script(probes, marker), sudo=sudo, check=False)
    found = parse_batch(result.stdout, marker)
    missing = [name for name in probes if name not in found]
    if missing:
        # The script itself died (sudo refused, shell missing): say so plainly,
        # never with the script's text or its frames, which mean nothing to the operator.
        raise command_failed(replace(result, stdout=""), target.label,
                             summary=f"reading facts on {target.label} failed (exit {result.exit_status})")
    return found
