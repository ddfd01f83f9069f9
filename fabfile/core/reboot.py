"""Waiting for a host that reboots, over SSH (maintenance.patch).

The proof that the host really started again is its boot id
(/proc/sys/kernel/random/boot_id, new at every boot): SSH answering proves
nothing, a host whose reboot has not begun yet answers too. Each look opens the
same fabric Connection again (RemoteTarget.reconnect: the same host key checks,
a changed key stops the wait at once), bounded by a deadline.

    wait_for_new_boot(ask, old_boot, timeout)   seconds it took, or
        HostGone     no answer at the deadline: exit 3, the deploy lock stays held
        NotRebooted  the old boot still answers at the deadline: exit 1, lock held
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .errors import ConnectionLost, HostKeyError, OpsError, from_connection_failure
from .target import RemoteTarget

BOOT_ID = "cat /proc/sys/kernel/random/boot_id"
POLL_SECONDS = 2.0


class HostGone(ConnectionLost):
    """Asked to reboot and not back in time (exit 3); whatever it runs, the lock stays held."""


class NotRebooted(OpsError):
    """Asked to reboot, still on the same boot at the deadline: it may reboot later."""

    keeps_lock = True


def boot_id(target: RemoteTarget) -> str:
    """Connect afresh and read the boot id; any failure to get it is a ConnectError or an OpsError."""
    try:
        target.reconnect()
        return target.run(BOOT_ID, timeout=20).stdout.strip()
    except OpsError:
        raise
    except Exception as exc:  # the connection died under the command (the reboot began)
        mapped = from_connection_failure(exc, target.label)
        if mapped is None:
            raise
        raise mapped from None


def wait_for_new_boot(ask: Callable[[], str], old_boot: str, timeout: float, *, where: str, hint: str,
                      clock: Callable[[], float] | None = None, sleep: Callable[[float], None] | None = None,
                      interval: float = POLL_SECONDS) -> float:
    """Ask for the boot id until it is a new one; seconds it took.

    `ask` raises an OpsError while the host cannot answer. `hint` says what to do when
    it does not come back (the caller knows what is left held).
    """
    clock, sleep = clock or time.monotonic, sleep or time.sleep
    started = clock()
    last = "no answer yet"
    old_answered = False
    while True:
        try:
            boot = ask()
        except HostKeyError:
            raise  # another key is not our host rebooted: never wait on it
        except OpsError as exc:
            last, old_answered = exc.what, False
        else:
            if boot and boot != old_boot:
                return clock() - started
            old_answered = True
        waited = clock() - started
        if waited >= timeout:
            if old_answered:
                raise NotRebooted(f"{where} was asked to reboot but still runs the same boot after {waited:.0f}s",
                                  "see `journalctl -t coachntt-ops` and `systemd-inhibit --list` there; " + hint)
            raise HostGone(f"{where} did not come back within {waited:.0f}s of its reboot ({last})", hint)
        sleep(interval)
