"""The sandbox itself: hosts boot, are reachable, isolated, and leave nothing behind."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fabfile import sandbox
from fabfile.sandbox.hosts import CGROUP_PREFIX, hosts_dir, veth_name
from fabfile.sandbox.network import BRIDGE_MAC
from fabfile.sandbox.paths import APT_PROXY_PORT, BRIDGE, CGROUP_ROOTS, GATEWAY_IP

# down --all destroys every host, a parallel worker's too: `-m alone`, after the rest.
pytestmark = [pytest.mark.slow, pytest.mark.alone]


def ssh(host: sandbox.Host, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(host.ssh_cmd(command), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def poll(predicate, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def system_state(host: sandbox.Host) -> str:
    return ssh(host, "systemctl is-system-running").stdout.strip()


def test_a_new_host_boots_systemd_and_answers_ssh_with_the_sandbox_key(vps_factory):
    started = time.monotonic()
    host = vps_factory("fresh")
    states = []
    poll(lambda: states.append(system_state(host)) or states[-1] in ("running", "degraded"), 10)
    assert states[-1] in ("running", "degraded"), f"systemd states seen: {states}"
    assert time.monotonic() - started < 10 + 15
    assert host.user == "root" and host.ip.startswith("10.201.0.")


def test_five_hosts_come_up_in_parallel_and_all_are_reachable(vps_factory):
    with ThreadPoolExecutor(max_workers=5) as pool:
        hosts = list(pool.map(lambda _: vps_factory("fresh"), range(5)))
    assert len({host.ip for host in hosts}) == 5
    for host in hosts:
        result = ssh(host, "hostname")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == host.name
    # Hosts joining never move the gateway's MAC (each host's ARP entry for it stays right).
    assert Path(f"/sys/class/net/{BRIDGE}/address").read_text().strip() == BRIDGE_MAC
    for host in hosts:
        neighbour = ssh(host, f"ip neigh show {GATEWAY_IP}").stdout
        assert BRIDGE_MAC in neighbour, f"{host.name} sees the gateway at {neighbour!r}"


def test_apt_get_install_in_a_fresh_host_works_through_the_proxy(vps):
    result = ssh(vps, "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q jq && jq --version",
                 timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "jq-" in result.stdout


def test_the_proxy_refuses_any_destination_but_the_debian_archive(vps):
    outside = ssh(vps, f"curl -s -o /dev/null -w '%{{http_code}}' -x http://{GATEWAY_IP}:{APT_PROXY_PORT} "
                       "http://example.com/")
    assert outside.stdout.strip() == "403"
    # The same from this machine, with a path that only looks like Debian's.
    proxy = urllib.request.ProxyHandler({"http": f"http://{GATEWAY_IP}:{APT_PROXY_PORT}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.build_opener(proxy).open("http://download.docker.com/debian/dists/", timeout=10)
    assert refused.value.code == 403


def test_hosts_have_no_route_out_of_the_sandbox(vps):
    result = ssh(vps, "ip route; curl -s -m 3 http://192.0.2.1/ >/dev/null; echo rc=$?")
    assert "default" not in result.stdout
    assert "rc=0" not in result.stdout


def test_known_hosts_pins_the_host_key_and_strict_checking_ssh_works(vps):
    pinned = [line for line in vps.known_hosts.read_text().splitlines() if line.startswith(f"{vps.ip} ")]
    assert any(" ssh-ed25519 " in line for line in pinned)
    _, host_key = sandbox.console(vps.name, "cat /etc/ssh/ssh_host_ed25519_key.pub")
    assert host_key.split()[1] in "\n".join(pinned)
    strict = ssh(vps, "true")  # ssh_cmd uses StrictHostKeyChecking=yes + this known_hosts only
    assert strict.returncode == 0, strict.stderr


def test_root_logs_in_by_key_only_on_a_fresh_host(vps):
    # Read the effective config instead of trying a password: OpenSSH 10 penalises
    # sources that connect without authenticating (PerSourcePenalties).
    code, output = sandbox.console(vps.name, "sshd -T | grep -E '^(permitrootlogin|passwordauthentication) '")
    assert code == 0, output
    assert "permitrootlogin without-password" in output


def test_console_runs_a_command_without_ssh(vps):
    code, output = sandbox.console(vps.name, "systemctl stop ssh.service; hostname; exit 7")
    assert code == 7
    assert vps.name in output
    assert ssh(vps, "true").returncode != 0  # sshd really is down, the console still works
    code, output = sandbox.console(vps.name, "systemctl start ssh.service && systemctl is-active ssh")
    assert (code, output.strip()) == (0, "active")


def test_ubuntu_like_host_has_socket_activated_ssh_and_cloud_init_password_login(vps_factory):
    host = vps_factory("ubuntu-like")
    code, output = sandbox.console(host.name, "systemctl is-active ssh.socket; systemctl is-enabled ssh.service;"
                                              " cat /etc/ssh/sshd_config.d/50-cloud-init.conf")
    lines = output.split("\n")
    assert lines[0] == "active"
    assert lines[1] == "disabled"
    assert "PasswordAuthentication yes" in output and "PermitRootLogin yes" in output
    code, output = sandbox.console(host.name, "sshd -T | grep -E '^(passwordauthentication|permitrootlogin) '")
    assert "passwordauthentication yes" in output and "permitrootlogin yes" in output
    assert ssh(host, "docker --version").returncode == 0


def test_docker_and_compose_run_inside_a_provisioned_host(vps_factory):
    host = vps_factory("provisioned")
    info = ssh(host, "docker info --format '{{.Driver}} {{.CgroupVersion}}'")
    assert info.returncode == 0, info.stderr
    assert info.stdout.split() == ["overlay2", "2"]
    compose = ssh(host, "docker compose version")
    assert compose.returncode == 0 and "Docker Compose version" in compose.stdout
    # A container really runs (needs keyctl + bpf through nspawn's seccomp filter).
    run = ssh(host, 'set -e; r=$(mktemp -d); for f in /usr/bin/dash $(ldd /usr/bin/dash | grep -o "/[^ ]*"); '
                    'do cp --parents -L $f $r; done; ln -s usr/bin $r/bin; ln -s usr/lib $r/lib; '
                    '[ -d $r/usr/lib64 ] && ln -s usr/lib64 $r/lib64; tar -C $r -c . | docker import - mini >/dev/null; '
                    'docker run --rm mini /bin/dash -c "echo inside"', timeout=120)
    assert run.stdout.strip() == "inside", run.stderr


def test_certbot_gets_a_certificate_from_pebble_by_real_http_validation(vps_factory):
    host = vps_factory("provisioned")
    pebble = sandbox.ensure_pebble()
    sandbox.map_domain("api.coachntt.ai", host.ip)
    result = ssh(host, f"certbot certonly --nginx --non-interactive --agree-tos -m ops@coachntt.ai "
                       f"--server {pebble.directory_url} -d api.coachntt.ai", timeout=120)
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-1500:]
    assert ssh(host, "test -s /etc/letsencrypt/live/api.coachntt.ai/fullchain.pem").returncode == 0
    assert "BEGIN CERTIFICATE" in pebble.issuer_root_pem()


def test_latency_relay_adds_the_round_trip_time(vps):
    def connect_time(port: int, address: str) -> float:
        started = time.monotonic()
        with socket.create_connection((address, port), timeout=5) as conn:
            conn.recv(64)  # sshd's banner: one trip to the host and back
        return time.monotonic() - started

    with sandbox.LatencyRelay(vps.ip, 22, rtt_ms=100) as port:
        relayed = connect_time(port, "127.0.0.1")
        result = subprocess.run(["ssh", "-p", str(port), "-o", "HostKeyAlias=" + vps.ip,
                                 *vps.ssh_cmd()[1:-1], "root@127.0.0.1", "echo via-relay"],
                                capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert relayed >= 0.05  # sshd's banner crossed the relay once: RTT/2
    assert result.stdout.strip() == "via-relay", result.stderr


def test_the_relay_refuses_targets_outside_the_sandbox():
    with pytest.raises(sandbox.SandboxError):
        sandbox.LatencyRelay("192.0.2.10", 22)


# Last on purpose: down_all destroys every sandbox host on this machine.
def test_sandbox_release_rehearses_the_whole_runbook_through_the_cli(sandbox_ready):
    """The README's first command ends with this: it must stay true."""
    result = subprocess.run([str(Path(sys.executable).parent / "inv"), "sandbox.release"],
                            cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "rehearsal passed" in result.stdout
    assert "failed during watch" in result.stderr and "rolled back to" in result.stderr, \
        "the broken release must have passed staging and been rolled back automatically by its watch"
    summary = result.stdout[result.stdout.index("rehearsal passed"):]
    for step, outcome in (("release B", "ok"), ("release C", "failed, rolled back"), ("rollback --to A", "ok")):
        line = next(line for line in summary.splitlines() if line.strip().startswith(step))
        assert outcome in line and line.split()[len(step.split()) + 1 + len(outcome.split())] == "0", \
            f"no failed request during the cutover: {line}"
    assert "ssl.issue" in summary and "monitor.stack" in summary and "staging.setup" in summary, summary
    assert "rehearsal" not in [host.name for host in sandbox.list_hosts()], "the rehearsal host is gone"


def test_down_all_leaves_no_mount_veth_process_or_cgroup_of_ours(vps_factory):
    hosts = [vps_factory("fresh"), vps_factory("provisioned")]
    foreign = {h.name for h in sandbox.list_hosts()} - {h.name for h in hosts}
    if foreign:  # CI has the machine to itself; a developer's machine may not
        pytest.fail(f"other sandbox hosts are running ({', '.join(sorted(foreign))}); down_all would destroy them")
    network_removed = sandbox.down_all()
    assert not [line for line in Path("/proc/mounts").read_text().splitlines() if str(hosts_dir()) in line]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for host in hosts:
        assert veth_name(host.name) + "@" not in links and f" {veth_name(host.name)}:" not in links
    if network_removed:  # kept only while an image build (another process) uses the proxy
        assert f" {BRIDGE}:" not in links
    assert not list(hosts_dir().iterdir())
    for root in CGROUP_ROOTS:
        assert not list(root.glob(f"{CGROUP_PREFIX}*"))
    live = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True).stdout.splitlines()
    pattern = r"systemd-nspawn .*--machine=" + (r"|sandbox/services\.py|pebble -config" if network_removed else "")
    ours = [line for line in live if not line.startswith("Z") and re.search(pattern, line)]
    assert not ours
    assert not sandbox.list_hosts()
