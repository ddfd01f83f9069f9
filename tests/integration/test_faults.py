"""Nothing lost under faults, proven on real sandbox hosts."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fabfile.sandbox.network import port_open
from opsrun import console, fab, host_state, ssh, ssh_retrying

# =============================================================================
# secure and nginx under faults: the operator is never locked out
#
# secure over another SSH port, a hardening that refuses the deploy user (undone),
# a vendor drop-in that already breaks sshd (refused before any change), a second
# operator's key (merged, never replacing), port 80 held by another program, and
# one connection per host for a whole multi-task run.
# =============================================================================

HARDENING_DROP_IN = "/etc/ssh/sshd_config.d/00-coachntt-hardening.conf"
DEPLOY_KEYS = "/home/coachntt/.ssh/authorized_keys"


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """A failed run ends with exactly one line on stderr and never a traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def on_port(host, port: int, tmp_path: Path, key: Path | None = None) -> tuple[SimpleNamespace, SimpleNamespace, dict]:
    """(host for fab, host for ssh, env) reaching `host` on `port` with its pinned keys.

    Host keys on another port are recorded as [ip]:port: a private known_hosts file
    keeps them out of the shared one (whose entries the sandbox manages).
    """
    known = tmp_path / f"known_hosts_{port}"
    lines = Path(host.known_hosts).read_text().splitlines()
    entries = [line.split(" ", 1)[1] for line in lines if line.split(" ", 1)[0] == host.ip]
    assert entries, f"no pinned host keys for {host.ip}"
    known.write_text("".join(f"[{host.ip}]:{port} {entry}\n{host.ip} {entry}\n" for entry in entries))
    key = key or host.key
    for_fab = SimpleNamespace(ip=f"{host.ip}:{port}", key=key)
    for_ssh = SimpleNamespace(ip=host.ip, key=key, known_hosts=known)
    return for_fab, for_ssh, {"COACHNTT_KNOWN_HOSTS": str(known)}


def sshd_only_on(host, port: int) -> None:
    """Through the console, as a provider's image or an admin would: sshd listens on `port` only."""
    code, out = console(host, f"printf 'Port {port}\\n' > /etc/ssh/sshd_config.d/10-port.conf && "
                              "systemctl is-active --quiet ssh.socket && echo socket || echo service")
    assert code == 0, out
    if out.strip().splitlines()[-1] == "socket":
        # ssh.socket (Ubuntu 24.04) owns the listening socket: move its ListenStream too.
        command = (f"mkdir -p /etc/systemd/system/ssh.socket.d && "
                   f"printf '[Socket]\\nListenStream=\\nListenStream={port}\\n' > /etc/systemd/system/ssh.socket.d/port.conf && "
                   "systemctl daemon-reload && systemctl stop ssh.service; systemctl restart ssh.socket")
    else:
        command = "systemctl reload ssh.service"
    code, out = console(host, command)
    assert code == 0, out
    deadline = time.monotonic() + 10
    while not port_open(host.ip, port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert port_open(host.ip, port) and not port_open(host.ip, 22), f"sshd should listen on {port} only"


@pytest.mark.parametrize("flavour", ["fresh", "ubuntu-like"])
def test_secure_over_port_2222_keeps_the_operator_in(vps_factory, tmp_path, flavour):
    host = vps_factory(flavour=flavour)
    sshd_only_on(host, 2222)
    for_fab, for_ssh, env = on_port(host, 2222, tmp_path)

    # firewall.allow without 22: the SSH port comes from the host and this connection.
    result = fab(for_fab, "secure", env={**env, "COACHNTT_FIREWALL__ALLOW": "80/tcp,443/tcp"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "allow 2222/tcp (SSH: " in result.stdout, result.stdout

    deploy = ssh_retrying(for_ssh, "sudo -n id -u", user="coachntt", extra=("-p", "2222"))
    assert deploy.returncode == 0 and deploy.stdout.strip() == "0", deploy.stderr
    code, ufw = console(host, "ufw status")
    assert code == 0 and "Status: active" in ufw, ufw
    rules = {line.split()[0] for line in ufw.splitlines() if " ALLOW " in f" {line} "}
    assert "2222/tcp" in rules and "22/tcp" not in rules, ufw

    audit = fab(for_fab, "secure.audit", user="coachntt", env=env)
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_a_hardening_that_refuses_the_deploy_user_is_undone(vps_factory):
    """A team host: coachntt's home is writable by a shared group, which a vendor drop-in's
    `StrictModes no` tolerated. Our hardening says `StrictModes yes` (first value wins), so
    sshd now refuses coachntt's key: the login proof after the reload must catch it and put
    the previous drop-in (an older coachntt-ops version) back."""
    host = vps_factory(flavour="fresh")
    older = "# written by an older coachntt-ops\nPasswordAuthentication no\n"
    code, out = console(
        host,
        f"printf '{older}' > {HARDENING_DROP_IN} && printf 'StrictModes no\\n' > /etc/ssh/sshd_config.d/60-vendor.conf && "
        "useradd --create-home --shell /bin/bash coachntt && groupadd team && useradd -M -G team alice && "
        "usermod -aG team coachntt && chgrp team /home/coachntt && chmod 2775 /home/coachntt && "
        f"systemctl reload ssh.service && cat {HARDENING_DROP_IN} | sha256sum",
    )
    assert code == 0, out
    older_sum = out.strip().splitlines()[-1]

    result = fab(host, "secure")
    line = one_error_line(result)
    assert result.returncode == 1, line
    assert line.startswith("error: a new login as coachntt failed after hardening sshd (authentication failed"), line
    assert f"restored the previous {HARDENING_DROP_IN} and reloaded sshd" in line, line

    code, out = console(host, f"cat {HARDENING_DROP_IN} | sha256sum; sshd -T | grep -E '^(strictmodes|permitrootlogin) '")
    assert code == 0 and out.splitlines()[0] == older_sum, out
    assert "strictmodes no" in out and "permitrootlogin no" not in out, out
    assert ssh_retrying(host, "true", user="root").returncode == 0, "the operator must still get in as root"
    assert ssh_retrying(host, "true", user="coachntt").returncode == 0, "and coachntt as before the run"
    code, ufw = console(host, "ufw status")
    assert "Status: inactive" in ufw, "the run stopped before the firewall"


VENDOR_DROP_IN = "/etc/ssh/sshd_config.d/60-vendor.conf"


def test_a_broken_vendor_sshd_dropin_stops_secure_before_any_change(vps_factory):
    host = vps_factory(flavour="fresh")
    code, out = console(host, f"printf '# vendor agent\\nVendorTelemetry yes\\n' > {VENDOR_DROP_IN}")
    assert code == 0, out
    before = host_state(host)

    result = fab(host, "secure")
    line = one_error_line(result)
    assert result.returncode == 1, line
    assert f"{VENDOR_DROP_IN}: line 2: Bad configuration option: VendorTelemetry" in line, line
    assert "nothing was changed" in line, line

    assert host_state(host) == before, "nothing may change"
    assert ssh_retrying(host, "true", user="root").returncode == 0, "sshd keeps serving logins"


def test_two_operators_keys_are_both_kept(vps_factory, tmp_path):
    host = vps_factory(flavour="fresh")
    key_b = tmp_path / "operator_b"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "operator-b", "-f", str(key_b)], check=True)
    ci_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDvYJdaKkBzbdPPL1ztG3Te2yRAXX4LBpQp/bxLmuVdm ci@coachntt"
    pub_b = Path(f"{key_b}.pub").read_text().strip()
    code, out = console(host, f"echo '{pub_b}' >> /root/.ssh/authorized_keys")
    assert code == 0, out
    operator_b = SimpleNamespace(ip=host.ip, key=key_b, known_hosts=host.known_hosts)

    first = fab(host, "secure", env={"COACHNTT_AUTHORIZED_KEYS": ci_key})
    assert first.returncode == 0, first.stdout + first.stderr
    # Operator B's first contact comes while root may log in (here: root login turned
    # back on through the console, as after a rebuilt sshd config).
    code, out = console(host, f"rm {HARDENING_DROP_IN} && systemctl reload ssh.service")
    assert code == 0, out

    second = fab(operator_b, "secure")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "add 1 key(s) to /home/coachntt/.ssh/authorized_keys, keeping the 2 already there" in second.stdout, second.stdout

    for key_holder in (host, operator_b):
        login = ssh_retrying(key_holder, "true", user="coachntt")
        assert login.returncode == 0, f"{key_holder.key}: {login.stderr}"
    code, keys = console(host, f"cat {DEPLOY_KEYS}")
    assert code == 0 and ci_key in keys.splitlines(), keys
    assert len([line for line in keys.splitlines() if line.strip()]) == 3, keys


def root_logins(host) -> int:
    """Root logins sshd accepted so far, from the host's journal (read through the console)."""
    code, out = console(host, "journalctl --no-pager -o cat | grep -c 'Accepted publickey for root' || true")
    assert code == 0, out
    return int(out.strip().splitlines()[-1])


def test_one_run_keeps_one_connection_across_tasks(vps_factory):
    host = vps_factory(flavour="fresh")
    time.sleep(1)  # the sandbox's own boot-time login reaches the journal
    before = root_logins(host)
    result = fab(host, "secure", "secure.audit")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all 6 hardening items pass" in result.stdout, result.stdout

    deadline = time.monotonic() + 5
    while root_logins(host) == before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert root_logins(host) == before + 1, "both tasks must share one root login"

    # A later run as root is refused, and the error says how to continue.
    again = fab(host, "secure.audit")
    line = one_error_line(again)
    assert again.returncode == 3, line
    assert f"root login is now off: continue with fab -H coachntt@{host.ip}" in line, line


def test_port_80_taken_is_refused_naming_the_holder(vps_factory):
    host = vps_factory(flavour="provisioned")
    code, out = console(host, "systemctl stop nginx && systemd-run --unit fake80 python3 -m http.server 80")
    assert code == 0, out
    try:
        deadline = time.monotonic() + 10
        while not port_open(host.ip, 80) and time.monotonic() < deadline:
            time.sleep(0.2)
        code, pid = console(host, "systemctl show -p MainPID --value fake80")
        assert code == 0 and pid.strip().isdigit() and pid.strip() != "0", pid
        pid = pid.strip()
        before = host_state(host)

        refused = fab(host, "nginx")
        line = one_error_line(refused)
        assert refused.returncode == 1, line
        assert line == f"error: port 80 is held by python3 (pid {pid}); stop it or move it, then rerun", line
        assert host_state(host) == before, "nothing may change"
        assert console(host, "test -e /etc/nginx/conf.d/coachntt.conf")[0] != 0

        status = fab(host, "nginx.status")
        line = one_error_line(status)
        assert status.returncode == 1, line
        assert f"answered by python3 (pid {pid}), not nginx" in line, line
        assert "NOT nginx" in status.stdout, status.stdout
    finally:
        console(host, "systemctl stop fake80")

    installed = fab(host, "nginx")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    status = fab(host, "nginx.status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert any(line.split()[:3] == ["port", "80", "nginx"] for line in status.stdout.splitlines()), status.stdout
