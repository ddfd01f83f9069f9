"""secure on real sandbox hosts: a fresh VPS ends up hardened, nobody is locked out."""

from __future__ import annotations

import time

import pytest

from fabfile.sandbox.network import port_open
from opsrun import console, fab, host_state, install_tool_on_host, json_lines, ssh, ssh_retrying

FLAVOURS = ["fresh", "ubuntu-like"]


def start_listener(host, port: int) -> None:
    code, out = console(host, f"systemd-run --unit=probe-{port} python3 -m http.server {port} --bind 0.0.0.0")
    assert code == 0, out
    for _ in range(20):
        if console(host, f"curl -s -o /dev/null http://127.0.0.1:{port}/")[0] == 0:
            return
        time.sleep(0.25)
    raise AssertionError(f"listener on {port} did not start")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_secure_hardens_a_fresh_host_without_locking_out_the_operator(vps_factory, flavour):
    host = vps_factory(flavour=flavour)
    start_listener(host, 8080)
    assert port_open(host.ip, 8080), "before secure the test port must be reachable, or the test proves nothing"
    assert fab(host, "secure.audit").returncode != 0, "audit must fail on a fresh host"

    result = fab(host, "secure")
    assert result.returncode == 0, result.stdout + result.stderr

    root = ssh_retrying(host, "true", user="root")
    assert root.returncode == 255 and "Permission denied" in root.stderr, root.stderr
    no_key = ssh_retrying(host, "true", user="root", extra=("-o", "PubkeyAuthentication=no"))
    methods = no_key.stderr.split("Permission denied", 1)[-1]
    assert no_key.returncode == 255 and "publickey" in methods and "password" not in methods, no_key.stderr

    deploy = ssh_retrying(host, "sudo -n id -u", user="coachntt")
    assert deploy.returncode == 0 and deploy.stdout.strip() == "0", deploy.stderr

    assert not port_open(host.ip, 8080), "ufw must block ports outside 22/80/443"
    assert console(host, "curl -s -o /dev/null http://127.0.0.1:8080/")[0] == 0, "the listener itself still runs"

    audit = fab(host, "secure.audit", user="coachntt")
    assert audit.returncode == 0, audit.stdout + audit.stderr

    again = fab(host, "secure", "--json", user="coachntt")
    assert again.returncode == 0, again.stdout + again.stderr
    steps = [r for r in json_lines(again.stdout) if "step" in r]
    # The OS baseline's kernel-bound items are skipped in the sandbox's containers (test_os_baseline.py).
    container_bound = {"baseline sysctl", "baseline auditd", "baseline process-accounting"}
    assert steps and all(r["status"] == "ok" or (r["step"] in container_bound and r["status"] == "skipped") for r in steps), again.stdout


def test_secure_refuses_to_harden_sshd_when_the_deploy_login_cannot_be_proven(vps_factory, tmp_path):
    host = vps_factory(flavour="fresh")
    # A key the operator does not hold: coachntt's login would not work.
    stranger = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDvYJdaKkBzbdPPL1ztG3Te2yRAXX4LBpQp/bxLmuVdm stranger"
    result = fab(host, "secure", "--keys", stranger)
    assert result.returncode != 0
    assert "refusing to harden sshd" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr

    assert ssh(host, "true", user="root").returncode == 0, "root must still get in by key"
    code, _ = console(host, "test -e /etc/ssh/sshd_config.d/00-coachntt-hardening.conf")
    assert code != 0, "sshd drop-in must not have been written"


def test_secure_dry_run_lists_changes_and_changes_nothing(vps_factory):
    host = vps_factory(flavour="fresh")
    before = host_state(host)
    result = fab(host, "secure", "--dry")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "would change" in result.stdout
    assert "deploy user" in result.stdout and "create user coachntt" in result.stdout
    assert host_state(host) == before


def test_fail2ban_bans_a_client_after_repeated_failed_logins(vps_factory):
    host = vps_factory(flavour="fresh")
    assert fab(host, "secure").returncode == 0
    for _ in range(8):  # maxretry is 5; a few more for PerSourcePenalties refusals
        ssh(host, "true", user="nosuchuser")
    deadline = time.monotonic() + 60
    banned = ""
    while time.monotonic() < deadline:
        _, banned = console(host, "fail2ban-client status sshd")
        if "10.201.0.1" in banned:
            break
        ssh(host, "true", user="nosuchuser")
        time.sleep(2)
    assert "10.201.0.1" in banned, banned
    # fail2ban lists the ban before its action (`ufw insert`, a Python program) has run:
    # on a loaded machine the rule lands a few seconds later.
    deadline = time.monotonic() + 30
    while port_open(host.ip, 22) and time.monotonic() < deadline:
        time.sleep(1)
    assert not port_open(host.ip, 22), "a banned client must not reach sshd"
    _, rules = console(host, "ufw status")
    assert "10.201.0.1" in rules and ("REJECT" in rules or "DENY" in rules), rules


def test_secure_runs_on_the_server_itself_under_inv(vps_factory):
    """No SSH at all: `inv` on the host works through a local Context."""
    host = vps_factory(flavour="fresh")
    install_tool_on_host(host)
    operator_key = host.key.with_name(host.key.name + ".pub").read_text().strip()

    code, out = console(host, "cd /opt/coachntt-ops && inv secure.audit")
    assert code == 1 and "FAIL  root login refused" in out, out

    code, out = console(host, f"cd /opt/coachntt-ops && inv secure --keys '{operator_key}'")
    assert code == 0, out
    assert "log in as coachntt from a second terminal" in out, "local runs must tell the operator to prove the login"

    code, out = console(host, "cd /opt/coachntt-ops && inv secure.audit")
    assert code == 0, out
    assert ssh_retrying(host, "sudo -n true", user="coachntt").returncode == 0
    assert ssh_retrying(host, "true", user="root").returncode == 255
