"""Nothing lost under faults, proven on real sandbox hosts."""

from __future__ import annotations

import time

from opsrun import console, fab, ssh

# =============================================================================
# Bad settings: refused before any connection
#
# A setting that would reach a shell on the host (here as root) is refused with
# exit 2 and one error line, for `--dry` too, and no SSH session is opened.
# =============================================================================

HOSTILE_SETTINGS = [
    # (variable, value, setting named in the error, file the value would create)
    ("COACHNTT_DEPLOY_USER", "coachntt;touch /tmp/x", "deploy_user", "/tmp/x"),
    ("COACHNTT_BACKUP__DB_NAME", "x$(touch /tmp/y)", "backup.db_name", "/tmp/y"),
]


def accepted_ssh_logins(host) -> int:
    """Logins sshd accepted so far, read from the host's journal through the console."""
    code, out = console(host, "journalctl --no-pager -o cat | grep -c 'Accepted publickey' || true")
    assert code == 0, out
    return int(out.strip().splitlines()[-1])


def wait_for_logins(host, at_least: int, seconds: float = 10) -> int:
    """journald may take a moment to show a login: poll, bounded."""
    deadline = time.monotonic() + seconds
    count = accepted_ssh_logins(host)
    while count < at_least and time.monotonic() < deadline:
        time.sleep(0.5)
        count = accepted_ssh_logins(host)
    return count


def test_a_hostile_setting_is_refused_before_any_ssh_session(vps_factory):
    host = vps_factory(flavour="fresh")
    # The counter must see a real login, or "no new login" below proves nothing.
    before = accepted_ssh_logins(host)
    assert ssh(host, "true").returncode == 0
    before = wait_for_logins(host, before + 1)
    assert before >= 1, "the journal shows no accepted SSH login even after one"

    for variable, value, setting, witness in HOSTILE_SETTINGS:
        for task in (("secure", "--dry"), ("deploy", "--dry")):
            result = fab(host, *task, env={variable: value})
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2, (task, variable, result.stdout + result.stderr)
            assert "Traceback" not in result.stderr, result.stderr
            assert len(lines) == 1 and lines[0].startswith(f"error: {setting} must be "), result.stderr
            assert f"got '{value}'" in lines[0] and variable in lines[0], lines[0]
            assert console(host, f"test -e {witness}")[0] != 0, f"{witness} was created on the host"

    time.sleep(2)  # what journald would still show of a login
    assert accepted_ssh_logins(host) == before, "a refused run opened an SSH session"
