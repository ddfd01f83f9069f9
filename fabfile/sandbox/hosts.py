"""Test VPS hosts: one systemd-nspawn machine per host, on the sandbox bridge.

A host is an overlay of a cached read-only base tree (image.py) booted with
`systemd-nspawn --boot` in its own network namespace, with its own IP, host keys
(pinned in known_hosts before it boots) and root's authorized_keys = the sandbox key.

State lives in <cache>/hosts/<name>/ (state.json, overlay upper/work, the merged
root, the ext4 dir for /var/lib/docker, nspawn.log) so `list`/`down` work from any
process. Every process of a host runs in its own cgroup pair
(/sys/fs/cgroup/{systemd,unified}/coachntt-sandbox-<name>), so teardown kills
exactly what we started and nothing else.

nspawn flags, and why (the minimal set for systemd + Docker inside, measured here):
  SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1  pure cgroup v2 in the guest; on the host's v1
                                      controllers `docker run` fails (read-only v1)
  --boot                              run the image's systemd as PID 1
  --register=no --keep-unit           PID 1 of this machine is not systemd/machined;
                                      --register=no needs --keep-unit here
  (launched from its own cgroup)      otherwise all guests share one cgroup
  --network-bridge=cntt-br0           private netns + veth vb-<name> on our bridge
  --capability=CAP_NET_ADMIN          ufw/iptables/docker networking (also implied
                                      by the private network; stated for clarity)
  --system-call-filter='keyctl bpf'   Docker: runc uses keyctl (session keyring) and
                                      bpf (cgroup v2 device filter); nspawn's default
                                      seccomp filter blocks both
  --bind=<ext4 dir>:/var/lib/docker   Docker's overlay2 cannot sit on overlayfs
  --resolv-conf=off --link-journal=no the per-host /etc/resolv.conf is ours; the
                                      host's journal dir is not touched
  No other capabilities, devices or host firewall changes are needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import image
from .network import BRIDGE, acme_ca_cert, ensure_network, teardown_network, unmap_domains_of
from .paths import (
    CGROUP_PREFIX,
    CGROUP_ROOTS,
    FIRST_HOST_OCTET,
    GATEWAY_IP,
    LAST_HOST_OCTET,
    NETMASK_BITS,
    SUBNET_PREFIX,
    SandboxError,
    hosts_dir,
    keys_dir,
    known_hosts_path,
    run_dir,
)
from .util import (
    children,
    file_lock,
    is_alive_with,
    require_root,
    require_tools,
    run,
    try_exclusive_lock,
    wait_for,
    wait_gone,
)

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,11}$")  # veth "vb-<name>" must fit 15 chars
# A loaded machine (two test workers, a benchmark) can take this long to boot a host.
SSH_WAIT_SECONDS = 30.0
REBOOT_EXIT_CODE = 133  # systemd-nspawn's exit code when the guest asks to reboot


@dataclass
class Host:
    name: str
    ip: str
    user: str = "root"
    key: Path = field(default_factory=lambda: sandbox_key())
    flavour: str = "fresh"
    known_hosts: Path = field(default_factory=known_hosts_path)
    suite: str = image.DEFAULT_SUITE
    # Names and IPs are reused once freed; this id tells this boot apart from a later
    # host under the same name, so a late teardown never destroys someone else's host.
    instance: str = ""

    def ssh_cmd(self, *remote: str, extra: tuple[str, ...] = ()) -> list[str]:
        """An ssh command line with strict host key checking against the pinned key."""
        return ["ssh", *ssh_options(self), *extra, f"{self.user}@{self.ip}", *remote]

    def as_dict(self) -> dict:
        return {k: str(v) for k, v in asdict(self).items()}


def ssh_options(host: Host) -> list[str]:
    return [
        "-i", str(host.key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={host.known_hosts}",
        "-o", "ConnectTimeout=3", "-o", "LogLevel=ERROR",
    ]


# --------------------------------------------------------------------------- layout


def host_dir(name: str) -> Path:
    return hosts_dir() / name


def state_file(name: str) -> Path:
    return host_dir(name) / "state.json"


def read_state(name: str) -> dict | None:
    try:
        return json.loads(state_file(name).read_text())
    except (OSError, ValueError):
        return None


def cgroup_dirs(name: str) -> list[Path]:
    return [root / f"{CGROUP_PREFIX}{name}" for root in CGROUP_ROOTS]


def supervisor_marker(name: str) -> str:
    return f"{CGROUP_PREFIX}{name} "  # $0 of the supervisor shell, see start_machine()


def veth_name(name: str) -> str:
    return f"vb-{name}"


# --------------------------------------------------------------------------- keys


def sandbox_key() -> Path:
    """The sandbox's own client keypair (root's key on every host), made once."""
    key = keys_dir() / "id_ed25519"
    if not key.exists():
        with file_lock("keys"):
            if not key.exists():
                run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "coachntt-sandbox", "-f", str(key)])
    return key


def pin_host_keys(ip: str, root: Path) -> None:
    """Replace known_hosts entries for ip with this host's freshly made public keys."""
    keys = sorted((root / "etc" / "ssh").glob("ssh_host_*_key.pub"))
    lines = [f"{ip} {' '.join(path.read_text().split()[:2])}\n" for path in keys]
    with file_lock("known_hosts"):
        kept = [line for line in read_lines(known_hosts_path()) if not is_entry_for(line, ip)]
        known_hosts_path().write_text("".join(kept + lines))


def unpin_host_keys(ip: str) -> None:
    with file_lock("known_hosts"):
        lines = read_lines(known_hosts_path())
        kept = [line for line in lines if not is_entry_for(line, ip)]
        if kept != lines:
            known_hosts_path().write_text("".join(kept))


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines(keepends=True)
    except OSError:
        return []


def is_entry_for(line: str, ip: str) -> bool:
    hosts = line.split(" ", 1)[0].split(",")
    return ip in hosts or f"[{ip}]:22" in hosts


# --------------------------------------------------------------------------- up


def up(name: str | None = None, flavour: str = "fresh", suite: str | None = None,
       wait: float = SSH_WAIT_SECONDS) -> Host:
    """Create and boot a host; return when sshd accepts the sandbox key."""
    require_root()
    require_tools("systemd-nspawn", "ssh", "ssh-keygen", "nsenter", "ip", "mount")
    if name is not None and not NAME_PATTERN.match(name):
        raise SandboxError(f"host name must match {NAME_PATTERN.pattern} (veth name limit), got {name!r}")
    tree = image.ensure_image(flavour, suite)
    host = reserve(name, flavour, image.check_suite(suite))
    try:
        root = prepare_root(host, tree)
        start_machine(host, root)
        wait_for_ssh(host, wait)
    except BaseException:
        keep_failure_log(host.name)
        down(host.name)
        raise
    return host


def keep_failure_log(name: str) -> None:
    """Keep nspawn's console log of a failed boot where the error message points."""
    with contextlib.suppress(OSError):
        shutil.copy(host_dir(name) / "nspawn.log", run_dir() / f"{name}-failed-boot.log")


def reserve(name: str | None, flavour: str, suite: str) -> Host:
    """Pick the next free IP (and a name if none given) and record the host, under a lock."""
    with file_lock("hosts"):  # also orders us against teardown_network_if_unused()
        ensure_network()
        used = {int(state["ip"].rsplit(".", 1)[1]) for state in all_states()}
        octet = next_free_octet(used, last_octet_file())
        ip = f"{SUBNET_PREFIX}{octet}"
        name = name or f"vps{octet}"
        if state_file(name).exists():
            raise SandboxError(f"host {name} already exists; run sandbox.down --name {name} first")
        host = Host(name=name, ip=ip, flavour=flavour, suite=suite, instance=uuid.uuid4().hex)
        host_dir(name).mkdir(parents=True, exist_ok=True)
        write_state(host)
        return host


def last_octet_file() -> Path:
    return hosts_dir().parent / "last-host-octet"


def next_free_octet(used: set[int], record: Path) -> int:
    """The first free octet after the last one handed out (wrapping), recorded in `record`.

    Handing out the lowest free one would give a just-freed IP and name to the next host at
    once, while a test that took its host down on purpose may still expect it unreachable.
    """
    try:
        last = int(record.read_text())
    except (OSError, ValueError):
        last = FIRST_HOST_OCTET - 1
    span = range(FIRST_HOST_OCTET, LAST_HOST_OCTET + 1)
    start = last + 1 if last + 1 in span else FIRST_HOST_OCTET
    ordered = [*range(start, LAST_HOST_OCTET + 1), *range(FIRST_HOST_OCTET, start)]
    octet = next((o for o in ordered if o not in used), None)
    if octet is None:
        raise SandboxError("no free sandbox IP left; run sandbox.down --all")
    record.write_text(str(octet))
    return octet


def write_state(host: Host, **extra) -> None:
    state = {**(read_state(host.name) or {}), **host.as_dict(), **extra}
    state_file(host.name).write_text(json.dumps(state, indent=1))


def prepare_root(host: Host, tree: Path) -> Path:
    """Mount the host's overlay and write its identity into it (before boot)."""
    base = host_dir(host.name)
    for sub in ("upper", "work", "root", "docker"):
        (base / sub).mkdir(exist_ok=True)
    root = base / "root"
    run(["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={tree},upperdir={base / 'upper'},workdir={base / 'work'}", str(root)])
    write_identity(host, root)
    return root


def write_identity(host: Host, root: Path) -> None:
    put(root / "etc/hostname", f"{host.name}\n")
    put(root / "etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{host.name}\n{GATEWAY_IP}\tsandbox-gateway\n"
                            "::1\tlocalhost ip6-localhost ip6-loopback\n")
    put(root / "etc/resolv.conf", f"nameserver {GATEWAY_IP}\noptions timeout:1 attempts:1\n")
    # No Gateway= on purpose: hosts can reach the bridge and each other, nothing else.
    put(root / "etc/systemd/network/10-host0.network",
        f"[Match]\nName=host0\n\n[Network]\nAddress={host.ip}/{NETMASK_BITS}\n"
        "LinkLocalAddressing=no\nIPv6AcceptRA=no\n")
    run(["ssh-keygen", "-A", "-f", str(root)])  # rsa, ecdsa, ed25519 host keys, new per host
    pin_host_keys(host.ip, root)
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    put(ssh_dir / "authorized_keys", Path(f"{sandbox_key()}.pub").read_text(), mode=0o600)
    trust_acme_ca(root)


def trust_acme_ca(root: Path) -> None:
    """Let certbot/curl in the host trust Pebble's HTTPS endpoint (system bundle + our CA)."""
    ca = acme_ca_cert().read_text()
    put(root / "usr/local/share/ca-certificates/coachntt-sandbox-acme.crt", ca)
    bundle = root / "etc/ssl/certs/ca-certificates.crt"
    existing = bundle.read_text() if bundle.exists() else ""
    put(bundle, existing + ca)


def put(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    path.write_text(text)
    path.chmod(mode)


def start_machine(host: Host, root: Path) -> None:
    """Boot systemd-nspawn from its own cgroup pair, restarted when the guest reboots."""
    for cgroup in cgroup_dirs(host.name):
        cgroup.mkdir(exist_ok=True)
    nspawn = [
        "systemd-nspawn", "--boot", "-D", str(root), f"--machine={host.name}",
        f"--network-bridge={BRIDGE}", "--register=no", "--keep-unit", "--console=read-only",
        "--capability=CAP_NET_ADMIN", "--system-call-filter=keyctl bpf",
        f"--bind={host_dir(host.name) / 'docker'}:/var/lib/docker",
        "--resolv-conf=off", "--link-journal=no",
    ]
    supervisor = (
        'echo $$ > "$1/cgroup.procs" && echo $$ > "$2/cgroup.procs" && shift 2 || exit 1\n'
        f'while :; do "$@"; rc=$?; [ "$rc" -eq {REBOOT_EXIT_CODE} ] || exit "$rc"; done'
    )
    cgroups = [str(c) for c in cgroup_dirs(host.name)]
    log = (host_dir(host.name) / "nspawn.log").open("ab")
    process = subprocess.Popen(
        ["sh", "-c", supervisor, f"{CGROUP_PREFIX}{host.name}", *cgroups, *nspawn],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        env={**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"},
    )
    write_state(host, supervisor_pid=process.pid)
    # Teardown finds processes through the cgroup: make sure the supervisor is in it.
    wait_for(lambda: process.pid in cgroup_pids(host.name) or process.poll() is not None, 5,
             interval=0.01, what="the supervisor to join its cgroup")


def wait_for_ssh(host: Host, timeout: float) -> None:
    """Poll until key login works; OpenSSH refuses while booting, so retry (bounded)."""
    def key_login_works() -> bool:
        if not machine_running(host.name):
            raise SandboxError(f"host {host.name} stopped while booting")
        result = subprocess.run(host.ssh_cmd("true"), capture_output=True, timeout=10,
                                stdin=subprocess.DEVNULL)
        return result.returncode == 0

    try:
        wait_for(key_login_works, timeout, interval=0.2, what=f"sshd on {host.name} ({host.ip})")
    except SandboxError as exc:
        raise SandboxError(f"{exc}; see {run_dir() / (host.name + '-failed-boot.log')}") from None


# --------------------------------------------------------------------------- processes


def supervisor_pid(name: str) -> int | None:
    pid = (read_state(name) or {}).get("supervisor_pid")
    return pid if is_alive_with(pid, supervisor_marker(name)) else None


def machine_running(name: str) -> bool:
    return supervisor_pid(name) is not None


def leader_pid(name: str) -> int:
    """PID (on this machine) of the guest's systemd: nspawn's child in another pid namespace."""
    supervisor = supervisor_pid(name)
    if not supervisor:
        raise SandboxError(f"host {name} is not running; run sandbox.up --name {name}")
    own_pidns = os.readlink("/proc/self/ns/pid")
    for nspawn in children(supervisor):
        for child in children(nspawn):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{child}/ns/pid") != own_pidns:
                    return child
    raise SandboxError(f"host {name} has no running guest (booting or rebooting?)")


def cgroup_pids(name: str) -> set[int]:
    """Every process in the host's cgroup subtrees: all of them are ours by construction."""
    pids = set()
    for cgroup in cgroup_dirs(name):
        for procs in cgroup.rglob("cgroup.procs") if cgroup.exists() else []:
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(line) for line in procs.read_text().split())
    return pids


def kill_host_processes(name: str) -> None:
    """SIGKILL the guest's PID 1 (ends its whole pid namespace), let nspawn and the supervisor
    exit by themselves (so they reap each other: PID 1 of this machine reaps no orphans),
    then SIGKILL whatever is still in the host's cgroups."""
    supervisor = supervisor_pid(name)
    guest = None
    with contextlib.suppress(SandboxError):
        guest = leader_pid(name)
    if guest:
        with contextlib.suppress(ProcessLookupError):
            os.kill(guest, signal.SIGKILL)
        wait_gone(guest, 5)
    if supervisor:
        wait_gone(supervisor, 3)  # reaps it when we are its parent (same process as up())
    deadline = time.monotonic() + 10
    while (pids := cgroup_pids(name)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    if supervisor:
        wait_gone(supervisor, 2)


def remove_cgroups(name: str) -> None:
    for cgroup in cgroup_dirs(name):
        if not cgroup.exists():
            continue
        for directory in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            rmdir_retrying(directory)
        rmdir_retrying(cgroup)


def rmdir_retrying(directory: Path, timeout: float = 3.0) -> None:
    """A cgroup can be busy for a moment after its last process died."""
    deadline = time.monotonic() + timeout
    while directory.exists():
        try:
            directory.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise SandboxError(f"cannot remove cgroup {directory}") from None
            time.sleep(0.05)


# --------------------------------------------------------------------------- down


def mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    targets = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    return [t for t in targets if t.startswith(prefix) or t == str(path)]


def unmount_all_under(path: Path) -> None:
    for target in sorted(mounts_under(path), key=len, reverse=True):
        if run(["umount", target], check=False).returncode != 0:
            run(["umount", "-l", target], check=False)
    leftover = mounts_under(path)
    if leftover:
        raise SandboxError(f"cannot unmount {leftover[0]}; not removing {path}")


def down(name: str, instance: str | None = None) -> None:
    """Destroy a host: processes, mounts, cgroups, veth, state, pinned key. Idempotent.

    With `instance`, only that boot of the host: when it is gone already and the name now
    belongs to a newer host (or to none), nothing is touched.
    """
    require_root()
    state = read_state(name) or {}
    if instance is not None and state.get("instance") != instance:
        return
    kill_host_processes(name)
    remove_cgroups(name)
    if Path(f"/sys/class/net/{veth_name(name)}").exists():
        run(["ip", "link", "del", veth_name(name)], check=False)
    if state.get("ip"):
        # Before the state goes: that frees the IP, and a host another run brings up at once
        # may take it and pin its own keys under it, which unpinning afterwards would remove.
        unpin_host_keys(state["ip"])
        unmap_domains_of(state["ip"])
    base = host_dir(name)
    unmount_all_under(base)  # never rm -rf through a mounted overlay (it would hit the base tree)
    shutil.rmtree(base, ignore_errors=True)


def all_states() -> list[dict]:
    return [state for path in sorted(hosts_dir().iterdir()) if (state := read_state(path.name))]


def list_hosts() -> list[Host]:
    hosts = []
    for state in all_states():
        hosts.append(Host(name=state["name"], ip=state["ip"], user=state.get("user", "root"),
                          key=Path(state["key"]), flavour=state["flavour"],
                          known_hosts=Path(state["known_hosts"]), suite=state.get("suite", image.DEFAULT_SUITE),
                          instance=state.get("instance", "")))
    return hosts


def down_all() -> bool:
    """Destroy every host of ours, then the bridge and the helper daemons (unless an image
    build still uses the proxy). Returns True when the network was torn down too."""
    require_root()
    names = {path.name for path in hosts_dir().iterdir() if path.is_dir()}
    names |= {c.name.removeprefix(CGROUP_PREFIX) for root in CGROUP_ROOTS if root.exists()
              for c in root.glob(f"{CGROUP_PREFIX}*")}  # strays whose state dir is gone
    for name in sorted(names):
        down(name)
    return teardown_network_if_unused()


def teardown_network_if_unused() -> bool:
    """Stop bridge + helpers unless a host exists or an image build uses the proxy."""
    with file_lock("hosts"), try_exclusive_lock("network-users") as unused:
        if unused and not all_states():
            teardown_network()
            return True
    return False


GUEST_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
             "LANG": "C.UTF-8", "TERM": "dumb"}


def enter(name: str, cmd: str, *, stdin=None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run cmd as root in the host's namespaces, bytes in and out; stdin: bytes or an open file.

    Harness-side only, like a provider's console: it works whatever sshd allows.
    """
    require_root()
    pid = leader_pid(name)
    feed = {"input": stdin} if isinstance(stdin, bytes) else {"stdin": stdin or subprocess.DEVNULL}
    try:
        return subprocess.run(["nsenter", "-t", str(pid), "-a", "--", "/bin/sh", "-c", cmd],
                              capture_output=True, env=GUEST_ENV, timeout=timeout, **feed)
    except subprocess.TimeoutExpired:
        raise SandboxError(f"console command on {name} timed out after {timeout:.0f}s") from None


def console(name: str, cmd: str, timeout: float = 120) -> tuple[int, str]:
    """Run cmd as root inside the host without ssh (the provider's web console stand-in)."""
    result = enter(name, cmd, timeout=timeout)
    return result.returncode, (result.stdout + result.stderr).decode(errors="replace")


def get_host(name: str) -> Host:
    for host in list_hosts():
        if host.name == name:
            return host
    raise SandboxError(f"no sandbox host named {name}; see sandbox.list")
