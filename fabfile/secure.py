"""secure: a fresh VPS (root login by key) to a hardened host, without ever
locking the operator out.

Runbook (`fab -H root@HOST -i KEY secure`):
    0. sshd's config as found          `sshd -t` must pass BEFORE anything changes: a
                                       broken third-party drop-in is named and nothing
                                       is touched (exit 1), a reload would kill sshd
    1. install the hardening tools     ufw, fail2ban, unattended-upgrades
    2. deploy user                     coachntt in groups sudo + docker
    3. its SSH keys                    settings' authorized_keys plus the key this run
                                       logged in with (or --keys) ADDED; lines already
                                       there (other operators, CI) are always kept
    4. passwordless sudo               validated sudoers drop-in
    -- prove: a second connection logs in as coachntt and runs sudo --
    5. sshd hardening                  drop-in that wins over cloud-init; sshd -t; then a
                                       reload that works with ssh.socket activation too
    -- prove again: a NEW login as coachntt after the reload; if it fails the previous
       drop-in comes back (or ours goes), sshd is reloaded and the run fails --
    6. small DH moduli removed
    7. firewall                        allow every SSH port (the one this run is connected
                                       on, sshd's `Port`s, ssh.socket's ListenStream) and
                                       firewall.allow BEFORE enabling, deny the rest
    8. fail2ban                        sshd jail on the journal
    9. unattended security upgrades
   10. OS baseline                     fabfile/os_baseline.py: login.defs, pam_tmpdir, module
                                       blacklist, sysctl, needrestart, debsums, auditd, acct,
                                       login banner; `baseline.skip` leaves items alone

After the first run, use `fab -H coachntt@HOST secure`; a second run changes nothing.
`secure.audit` (secure_audit.py) reads the host once and reports each hardening item.
"""

from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass

from invoke import Collection

from . import os_baseline
from .core import remote, templates
from .core.errors import AuthError, OpsError, UsageError
from .core.fleet import CHANGES
from .core.steps import Change, Facts, Plan, Step
from .core.target import LocalTarget, RemoteTarget, login_public_keys, second_login
from .core.task import ops_task
from .secure_audit import audit

# Preferred algorithms, strongest first; the plan keeps those the host's
# OpenSSH knows (Ubuntu 24.04 ships 9.6 without ML-KEM; OpenSSH 10 has it).
KEX = [
    "mlkem768x25519-sha256",
    "sntrup761x25519-sha512",
    "sntrup761x25519-sha512@openssh.com",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
]
CIPHERS = [
    "chacha20-poly1305@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
]
MACS = ["hmac-sha2-512-etm@openssh.com", "hmac-sha2-256-etm@openssh.com", "umac-128-etm@openssh.com"]
HOST_KEY_ALGORITHMS = [
    "ssh-ed25519",
    "ssh-ed25519-cert-v01@openssh.com",
    "rsa-sha2-512",
    "rsa-sha2-512-cert-v01@openssh.com",
    "rsa-sha2-256",
    "rsa-sha2-256-cert-v01@openssh.com",
]
HOST_KEYS = ["/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_rsa_key"]

SSHD_DROP_IN = "/etc/ssh/sshd_config.d/00-coachntt-hardening.conf"
# Socket activation (Ubuntu 24.04's ssh.socket) is kept: the script restarts or
# reloads sshd the way each setup needs. Our drop-in sets no Port, so whatever
# ssh.socket's ListenStream and sshd_config agreed on stays as it is.
RELOAD_SSHD = f"sh -c {shlex.quote(templates.script('reload-sshd.sh'))}"
HARDENING_PACKAGES = ["ufw", "fail2ban", "python3-systemd", "unattended-upgrades"]
# sshd -t/-T need the privilege separation directory, which systemd removes when
# sshd stops (ssh.socket hosts between connections); recreating it is harmless.
PRIVSEP_DIR = "install -d -m 0755 /run/sshd"


# -- steps ------------------------------------------------------------------


def sshd_config_step() -> Step:
    """Preflight: the host's sshd config must already pass `sshd -t`, or we touch nothing.

    A broken third-party drop-in would make our reload kill sshd (or ssh.socket's
    next connection fail): better refuse now, naming the file and line.
    """

    def plan(facts: Facts) -> Plan:
        problem = sshd_config_problem(facts["sshd_t"])
        if problem:
            raise OpsError(
                f"sshd's configuration is already broken before any change: {problem}",
                "fix or remove that file until `sshd -t` passes (sshd keeps serving until it restarts), "
                "then rerun; nothing was changed",
            )
        return Plan.ok("sshd -t passes")

    return Step("sshd config as found", probes={"sshd_t": f"{PRIVSEP_DIR}; sshd -t 2>&1"}, plan=plan)


def sshd_config_problem(sshd_t) -> str:
    """The line of `sshd -t`'s output that names what is wrong ('' when it passes). Pure."""
    if sshd_t.ok:
        return ""
    lines = [line.strip() for line in sshd_t.lines if line.strip()]
    # OpenSSH prints "FILE: line N: Bad configuration option: X" then "FILE: terminating, ...".
    named = [line for line in lines if re.search(r": line \d+: ", line)]
    return (named or lines or [f"sshd -t exited {sshd_t.status} without saying why"])[0]


def deploy_user_step(user: str, groups: list[str]) -> Step:
    def plan(facts: Facts) -> Plan:
        changes = []
        if not facts["docker_group"].ok and "docker" in groups:
            # Docker may come later (deps); the group must exist for usermod now.
            changes.append(Change("create group docker", "groupadd --system docker"))
        if not facts["groups"].ok:
            # Its own group (login.defs' USERGROUPS_ENAB is off once the baseline ran) and no
            # password ageing: a key-only account must never be told its password expired.
            changes.append(Change(f"create user {user}", f"useradd --create-home --user-group -K PASS_MAX_DAYS=-1 "
                                                         f"--shell /bin/bash {shlex.quote(user)}"))
            missing = groups
        else:
            missing = [g for g in groups if g not in facts["groups"].stdout.split()]
        if missing:
            changes.append(Change(f"add {user} to {', '.join(missing)}",
                                  f"usermod -aG {shlex.quote(','.join(missing))} {shlex.quote(user)}"))
        if not changes:
            return Plan.ok(f"{user} in {', '.join(groups)}")
        return Plan.change(*changes)

    return Step(
        "deploy user",
        probes={"groups": f"id -nG {shlex.quote(user)}", "docker_group": "getent group docker"},
        plan=plan,
    )


_KEY_TYPE = re.compile(r"^(ssh-|ecdsa-|sk-)")


def key_identity(line: str) -> tuple[str, str] | None:
    """(type, base64) of an authorized_keys line, options and comment ignored; None for others."""
    if line.lstrip().startswith("#"):
        return None
    tokens = line.split()
    for kind, blob in zip(tokens, tokens[1:], strict=False):
        if _KEY_TYPE.match(kind):
            return kind, blob
    return None


def authorized_keys_step(user: str, keys: list[str]) -> Step:
    """ADD `keys` that are missing; every line already there (other operators, CI) is kept.

    Keys are appended on the host, each guarded by its own grep, so even a key
    another operator added between our read and our write survives.
    """
    home = f"/home/{user}/.ssh"
    path = f"{home}/authorized_keys"
    owner = f"{user}:{user}"
    q_user, q_home, q_path, q_owner = (remote.q(value) for value in (user, home, path, owner))

    def plan(facts: Facts) -> Plan:
        lines = facts["content"].lines if facts["content"].ok else []
        present = {key_identity(line) for line in lines} - {None}
        missing: list[str] = []
        for key in keys:
            identity = key_identity(key)
            if identity not in present:
                missing.append(key)
                present.add(identity)
        kept = sum(1 for line in lines if key_identity(line))
        if missing:
            commands = [
                f"install -d -m 0700 -o {q_user} -g {q_user} {q_home}",
                f"touch {q_path}",
                # A last line without its newline would otherwise get our key glued on.
                f"if [ -s {q_path} ] && [ -n \"$(tail -c 1 {q_path})\" ]; then echo >> {q_path}; fi",
                *(f"grep -v '^[[:space:]]*#' {q_path} | grep -qF -- {remote.q(key_identity(key)[1])} "
                  f"|| printf '%s\\n' {remote.q(key)} >> {q_path}"
                  for key in missing),
                f"chmod 0600 {q_path} && chown {q_owner} {q_path} && chown {q_owner} {q_home} && chmod 700 {q_home}",
            ]
            summary = f"add {len(missing)} key(s) to {path}" + (f", keeping the {kept} already there" if kept else "")
            return Plan.change(Change(summary, "\n".join(commands), "".join(f"+{key}\n" for key in missing)))
        if facts["meta"].stdout.strip() != f"600 {owner}":
            return Plan.change(Change(f"set {path} to mode 0600, owner {owner} (was {facts['meta'].stdout.strip()})",
                                      f"chmod 0600 {q_path} && chown {q_owner} {q_path}"))
        return Plan.ok(f"{len(keys)} wanted key(s) present among {kept} in {path}")

    return Step(f"ssh keys for {user}", probes=remote.file_probes(path), plan=plan)


def sudoers_step(user: str) -> Step:
    path = f"/etc/sudoers.d/90-{user}"
    return remote.file_step(
        "passwordless sudo",
        path,
        templates.render("sudoers/90-coachntt.j2", user=user),
        mode="0440",
        validate=f"visudo -cq -f {shlex.quote(path)}",
    )


@dataclass(frozen=True)
class SshdPlan(Plan):
    """The sshd plan, plus what puts the host back if the new config refuses the deploy user."""

    undo: Change | None = None


def sshd_undo(facts: Facts) -> Change:
    """Pure: the previous drop-in back (write_file_command kept it), or ours removed; then reload."""
    had_old = facts["content"].ok
    summary = f"restored the previous {SSHD_DROP_IN}" if had_old else f"removed {SSHD_DROP_IN}"
    return Change(f"{summary} and reloaded sshd", f"{remote.restore_command(SSHD_DROP_IN, had_old)}\n{RELOAD_SSHD}")


def sshd_step() -> Step:
    # `sshd -t` validates; `sshd -T` shows the effective values, proving our
    # drop-in really wins over cloud-init's and the main file. sshd -t needs
    # its privilege separation directory, which systemd removes when sshd stops.
    validate = ("{ " + PRIVSEP_DIR + " && sshd -t && sshd -T | grep -qx 'permitrootlogin no' "
                "&& sshd -T | grep -qx 'passwordauthentication no'; }")

    def plan(facts: Facts) -> Plan:
        content = templates.render(
            "sshd/00-coachntt-hardening.conf.j2",
            kex=supported(KEX, facts["kex"]),
            ciphers=supported(CIPHERS, facts["ciphers"]),
            macs=supported(MACS, facts["macs"]),
            host_key_algorithms=supported(HOST_KEY_ALGORITHMS, facts["key_algorithms"]),
            host_keys=[k for k in HOST_KEYS if k in facts["host_keys"].lines],
        )
        drop_in = remote.file_step("sshd hardening", SSHD_DROP_IN, content, validate=validate, then=RELOAD_SSHD)
        planned = drop_in.plan(facts)
        return SshdPlan(planned.changes, planned.reason, planned.skip, undo=sshd_undo(facts))

    return Step(
        "sshd hardening",
        probes={
            **remote.file_probes(SSHD_DROP_IN),
            "kex": "ssh -Q kex",
            "ciphers": "ssh -Q cipher",
            "macs": "ssh -Q mac",
            "key_algorithms": "ssh -Q key-sig",
            "host_keys": "ls /etc/ssh/ssh_host_*_key",
        },
        plan=plan,
    )


def supported(preferred: list[str], available) -> list[str]:
    offered = set(available.lines)
    return [name for name in preferred if name in offered]


def moduli_step() -> Step:
    def plan(facts: Facts) -> Plan:
        weak = int(facts["weak"].stdout or 0)
        if weak == 0:
            return Plan.ok("no DH moduli under 2048 bits")
        return Plan.change(
            Change(
                f"remove {weak} DH moduli under 2048 bits",
                "awk '$1 ~ /^#/ || $5 >= 2047' /etc/ssh/moduli > /etc/ssh/moduli.new && mv /etc/ssh/moduli.new /etc/ssh/moduli",
            )
        )

    return Step("weak DH moduli", probes={"weak": "awk '$1 !~ /^#/ && $5 < 2047' /etc/ssh/moduli | wc -l"}, plan=plan)


def ssh_ports(facts: Facts, login_port: int | None) -> dict[str, str]:
    """Every port SSH may come in on -> why. Pure: sshd -T's `port` lines, ssh.socket's
    ListenStream (when the socket is active) and the port this run is connected on."""
    found: dict[str, list[str]] = {}
    for port in (line.split()[1] for line in facts["sshd_ports"].lines if line.startswith("port ") and len(line.split()) == 2):
        found.setdefault(port, []).append("sshd Port")
    if facts["socket_listen"].ok:
        for port in re.findall(r"(?:^|[:\s])(\d+) \(Stream\)", facts["socket_listen"].stdout):
            found.setdefault(port, []).append("ssh.socket")
    if login_port:
        found.setdefault(str(login_port), []).append("this run is connected on it")
    return {port: ", ".join(dict.fromkeys(why)) for port, why in sorted(found.items(), key=lambda item: int(item[0]))}


def allowed_port(rule: str) -> str:
    """The port a ufw rule opens ("22/tcp" -> "22"; the ssh/OpenSSH profiles -> "22")."""
    name = rule.split("/")[0]
    return "22" if name in ("ssh", "OpenSSH") else name


def firewall_step(allow: list[str], login_port: int | None = None) -> Step:
    """ufw default deny with SSH always open: no setting can wall off the port we use."""

    def plan(facts: Facts) -> Plan:
        status = facts["status"].stdout
        rules = [line.split()[0] for line in facts["status"].lines if " ALLOW " in f" {line} "]
        opened = {allowed_port(rule) for rule in allow}
        ssh = [(f"{port}/tcp", why) for port, why in ssh_ports(facts, login_port).items() if port not in opened]
        # SSH first: those rules exist before anything else is done to the firewall.
        changes = [Change(f"allow {rule} (SSH: {why})", f"ufw allow {shlex.quote(rule)}") for rule, why in ssh if rule not in rules]
        changes += [Change(f"allow {rule}", f"ufw allow {shlex.quote(rule)}") for rule in allow if rule not in rules]
        if "deny (incoming)" not in status:
            changes.append(Change("deny incoming by default", "ufw default deny incoming"))
        if "allow (outgoing)" not in status:
            changes.append(Change("allow outgoing by default", "ufw default allow outgoing"))
        if "Status: active" not in status:
            # Last: every allow rule above (SSH first) exists before the wall goes up.
            changes.append(Change("enable ufw", "ufw --force enable"))
        if not changes:
            return Plan.ok(f"active, default deny, allows {' '.join([rule for rule, _ in ssh] + allow)}")
        return Plan.change(*changes)

    return Step(
        "firewall",
        probes={
            "status": "ufw status verbose",
            "sshd_ports": f"{PRIVSEP_DIR}; sshd -T | grep '^port '",
            "socket_listen": "systemctl is-active --quiet ssh.socket && systemctl show -p Listen --value ssh.socket",
        },
        plan=plan,
    )


def fail2ban_steps(settings) -> list[Step]:
    jail = remote.file_step(
        "fail2ban sshd jail",
        "/etc/fail2ban/jail.d/coachntt.local",
        templates.render(
            "fail2ban/coachntt.local.j2",
            bantime=settings.get("fail2ban.bantime", "1h"),
            findtime=settings.get("fail2ban.findtime", "10m"),
            maxretry=settings.get("fail2ban.maxretry", 5),
        ),
        validate="fail2ban-client -t >/dev/null",
        then="systemctl restart fail2ban",
    )
    return [jail, remote.service_step("fail2ban running", "fail2ban")]


def unattended_upgrades_steps() -> list[Step]:
    return [
        remote.file_step(
            "unattended upgrades on",
            "/etc/apt/apt.conf.d/20auto-upgrades",
            templates.render("apt/20auto-upgrades"),
        ),
        remote.service_step("unattended-upgrades running", "unattended-upgrades"),
    ]


# -- lockout protection ---------------------------------------------------------


def prove_deploy_login(ops, user: str) -> None:
    """Before sshd stops accepting root/passwords, the deploy user must get in and sudo."""
    if isinstance(ops.target, LocalTarget):
        ops.target.run(f"sudo -n -u {shlex.quote(user)} sudo -n true", sudo=True)
        ops.reporter.info(f"  note: running on the host itself; log in as {user} from a second terminal before closing this one")
        return
    try:
        proof = second_login(ops.target, ops.settings, user)
        proof.run("sudo -n true")
        proof.close()
    except OpsError as exc:
        raise OpsError(
            f"refusing to harden sshd: a second login as {user} failed ({exc.what})",
            "nothing about root or password login was changed; fix the key for "
            f"{user} (authorized_keys setting or -i KEY) and rerun",
        ) from None
    ops.reporter.info(f"  proven        second login as {user} with sudo works")


def prove_login_after_reload(ops, user: str, undo: Change) -> None:
    """After sshd reloaded the hardening, a NEW login as `user` must work; else `undo` it.

    The connection this run uses stays open through the reload, so it can always
    put the previous config back. Refused logins are not retried (sshd penalises
    them); a connection that fails to open while sshd restarts is, briefly.
    """
    if not isinstance(ops.target, RemoteTarget):
        return  # on the host itself: prove_deploy_login told the operator to log in from a second terminal
    failure = None
    for attempt in range(3):
        try:
            proof = second_login(ops.target, ops.settings, user)
            try:
                proof.run("true")
            finally:
                proof.close()
            ops.reporter.info(f"  proven        a new login as {user} works with the hardened sshd")
            return
        except AuthError as exc:
            failure = exc
            break
        except OpsError as exc:
            failure = exc
            time.sleep(1 + attempt)
    undone = ops.target.run(undo.command, sudo=True, check=False)
    if not undone.ok:
        why = ((undone.stderr or undone.stdout).strip().splitlines() or ["no output"])[-1]
        raise OpsError(
            f"a new login as {user} failed after hardening sshd ({failure.what}) and putting the old config back "
            f"failed too ({why})",
            "keep this session open and fix /etc/ssh/sshd_config.d through the provider's console",
        )
    raise OpsError(
        f"a new login as {user} failed after hardening sshd ({failure.what}); {undo.summary}",
        f"root login and the firewall are as before; see `journalctl -u ssh` on the host for why sshd refused {user}, fix that and rerun",
    )


# -- tasks ----------------------------------------------------------------------


@ops_task(default=True, fleet=CHANGES, help={
    "keys": "public key line(s) for the deploy user, comma separated (default: settings, else the key this run used)",
})
def secure(ops, keys=""):
    """Harden a fresh host: deploy user, sshd, ufw, fail2ban, unattended-upgrades."""
    settings = ops.settings
    user = settings.require("deploy_user")
    # SSH needs no rule here: the firewall step always opens the ports SSH really uses.
    allow = list(settings.require("firewall.allow"))
    # --keys is the operator's explicit choice; otherwise settings' keys (CI, other
    # operators) plus the key of this login. Either way they are added, never replacing.
    wanted_keys = [k.strip() for k in keys.split(",") if k.strip()]
    if not wanted_keys:
        wanted_keys = list(settings.get("authorized_keys") or []) + login_public_keys(ops.target)
    if not wanted_keys:
        raise UsageError(
            f"no public key to install for {user}",
            "set authorized_keys in invoke.yaml, pass --keys, or connect with -i KEY",
        )

    ops.run_steps([
        sshd_config_step(),  # refuses, before anything below changes, when sshd -t already fails
        remote.packages_step("hardening packages", HARDENING_PACKAGES),
        deploy_user_step(user, list(settings.get("deploy_groups"))),
        authorized_keys_step(user, wanted_keys),
        sudoers_step(user),
    ])

    login_port = ops.target.connection.port if isinstance(ops.target, RemoteTarget) else None
    (sshd, sshd_plan), *rest = ops.plan([
        sshd_step(),
        moduli_step(),
        firewall_step(allow, login_port),
        *fail2ban_steps(settings),
        *unattended_upgrades_steps(),
    ])
    hardening = bool(sshd_plan.changes) and not ops.dry
    if hardening:
        prove_deploy_login(ops, user)
    ops.apply([(sshd, sshd_plan)])
    if hardening:
        prove_login_after_reload(ops, user, sshd_plan.undo)
    ops.apply(rest)
    ops.run_steps(os_baseline.baseline_steps(settings.get("baseline.skip") or []))


ns = Collection("secure")
ns.add_task(secure, default=True)
ns.add_task(audit)
