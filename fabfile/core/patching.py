"""Host patching: what apt would upgrade, what it did, whether the host asks for a reboot.

scripts/host-patch.sh does the work on the host, as root; this module holds its
command lines and reads what it prints (pure, tested as data):

    pending     inst NAME OLD NEW      judged against a fresh index in a scratch directory
    upgrade     changed NAME OLD NEW   versions before and after, by package
                summary ...            apt's count ("... and K not upgraded.")
                reboot-required PKG... the host's /var/run/reboot-required, afterwards
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from . import templates
from .batch import ProbeResult
from .errors import OpsError

SCRIPT = "host-patch.sh"
# Ubuntu's packages (kernel, libc, systemd, ...) create it when only a reboot finishes their upgrade.
REBOOT_FLAG = "/var/run/reboot-required"
# apt's own output of the last patch, on the host (root's, mode 600).
APT_LOG = "/var/log/coachntt-ops-patch.log"
_NOT_UPGRADED = re.compile(r"and (\d+) not upgraded")


@dataclass(frozen=True)
class Package:
    """One package's move: OLD or NEW is '-' when it came or went."""

    name: str
    old: str
    new: str

    def describe(self) -> str:
        if self.old == "-":
            return f"{self.name} {self.new} (new)"
        if self.new == "-":
            return f"{self.name} {self.old} (removed)"
        return f"{self.name} {self.old} -> {self.new}"


@dataclass(frozen=True)
class AptReport:
    """What apt would do or did: packages, how many it kept back, and the reboot asked
    for afterwards (None: not asked; a tuple of the packages that asked, maybe empty)."""

    packages: tuple[Package, ...] = ()
    kept_back: int = 0
    reboot_for: tuple[str, ...] | None = None


def _script(action: str, *args: str) -> str:
    return f"sh -c {shlex.quote(templates.script(SCRIPT))} host-patch {action}" + "".join(f" {shlex.quote(a)}" for a in args)


def pending_command() -> str:
    """The fact probe (run as root by gather): pending upgrades, nothing on the host changed."""
    return _script("pending")


def upgrade_command(backup_lock: str) -> str:
    """Run as the deploy user under the deploy lock (its job files stay the deploy user's), root
    inside; it waits for a running backup first and holds the backups' lock (`backup_lock`) throughout."""
    return "sudo -n " + _script("upgrade", APT_LOG, REBOOT_FLAG, backup_lock)


def reboot_command(backup_lock: str) -> str:
    return "sudo -n " + _script("reboot", backup_lock)


REBOOT_PROBE = f"test -e {REBOOT_FLAG} && {{ cat {REBOOT_FLAG}.pkgs 2>/dev/null; true; }}"


def reboot_asked(probe: ProbeResult) -> tuple[str, ...] | None:
    """The packages that asked for a reboot (maybe none named), or None when none is asked."""
    if not probe.ok:
        return None
    return tuple(dict.fromkeys(line.strip() for line in probe.lines if line.strip()))


def parse(output: str, *, record: str) -> AptReport:
    """host-patch.sh's lines (`record`: 'inst' for pending, 'changed' for upgrade) as data.

    A pending probe that failed says so on a line starting 'error:': that is an OpsError.
    """
    packages, kept_back, reboot_for = [], 0, None
    for line in output.splitlines():
        if line.startswith("error:"):
            raise OpsError(f"apt cannot tell what would be upgraded: {line.removeprefix('error:').strip()}",
                           "check the host's apt sources (`sudo apt-get update`); nothing changed")
        kind, _, rest = line.partition(" ")
        fields = rest.split()
        if kind == record and len(fields) == 3:
            packages.append(Package(*fields))
        elif kind == "summary":
            found = _NOT_UPGRADED.search(rest)
            kept_back = int(found.group(1)) if found else 0
        elif kind == "reboot-required":
            reboot_for = tuple(fields)
    return AptReport(tuple(sorted(packages, key=lambda p: p.name)), kept_back, reboot_for)
