"""secure: a fresh VPS (root login by key) to a hardened host, without ever
locking the operator out.

Runbook (`fab -H root@HOST -i KEY secure`):
    1. install the hardening tools     ufw, fail2ban, unattended-upgrades
    2. deploy user                     coachntt in groups sudo + docker
    3. its SSH key                     the key this run logged in with (or settings)
    4. passwordless sudo               validated sudoers drop-in
    -- prove: a second connection logs in as coachntt and runs sudo --
    5. sshd hardening                  drop-in that wins over cloud-init; sshd -t; then a
                                       reload that works with ssh.socket activation too
    6. small DH moduli removed
    7. firewall                        allow 22/80/443 BEFORE enabling, deny the rest
    8. fail2ban                        sshd jail on the journal
    9. unattended security upgrades

After the first run, use `fab -H coachntt@HOST secure`; a second run changes nothing.
`secure.audit` reads the host once and reports each hardening item.
"""

from __future__ import annotations

import shlex

from invoke import Collection

from .core import remote, templates
from .core.batch import gather
from .core.errors import OpsError, UsageError
from .core.steps import Change, Facts, Plan, Step
from .core.target import LocalTarget, login_public_keys, second_login
from .core.task import ops_task

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
# reloads sshd the way each setup needs. We keep port 22, so ssh.socket's
# ListenStream and sshd_config agree.
RELOAD_SSHD = f"sh -c {shlex.quote(templates.script('reload-sshd.sh'))}"
HARDENING_PACKAGES = ["ufw", "fail2ban", "python3-systemd", "unattended-upgrades"]


# -- steps ------------------------------------------------------------------


def deploy_user_step(user: str, groups: list[str]) -> Step:
    def plan(facts: Facts) -> Plan:
        changes = []
        if not facts["docker_group"].ok and "docker" in groups:
            # Docker may come later (deps); the group must exist for usermod now.
            changes.append(Change("create group docker", "groupadd --system docker"))
        if not facts["groups"].ok:
            changes.append(Change(f"create user {user}", f"useradd --create-home --shell /bin/bash {shlex.quote(user)}"))
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


def authorized_keys_step(user: str, keys: list[str]) -> Step:
    path = f"/home/{user}/.ssh/authorized_keys"
    return remote.file_step(
        f"ssh key for {user}",
        path,
        "\n".join(keys) + "\n",
        mode="0600",
        owner=f"{user}:{user}",
        then=f"chown {shlex.quote(f'{user}:{user}')} {shlex.quote(f'/home/{user}/.ssh')} && chmod 700 {shlex.quote(f'/home/{user}/.ssh')}",
    )


def sudoers_step(user: str) -> Step:
    path = f"/etc/sudoers.d/90-{user}"
    return remote.file_step(
        "passwordless sudo",
        path,
        templates.render("sudoers/90-coachntt.j2", user=user),
        mode="0440",
        validate=f"visudo -cq -f {shlex.quote(path)}",
    )


def sshd_step() -> Step:
    # `sshd -t` validates; `sshd -T` shows the effective values, proving our
    # drop-in really wins over cloud-init's and the main file. sshd -t needs
    # its privilege separation directory, which systemd removes when sshd stops.
    validate = ("{ install -d -m 0755 /run/sshd && sshd -t && sshd -T | grep -qx 'permitrootlogin no' "
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
        return drop_in.plan(facts)

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


def firewall_step(allow: list[str]) -> Step:
    def plan(facts: Facts) -> Plan:
        status = facts["status"].stdout
        rules = [line.split()[0] for line in facts["status"].lines if " ALLOW " in f" {line} "]
        changes = [Change(f"allow {rule}", f"ufw allow {shlex.quote(rule)}") for rule in allow if rule not in rules]
        if "deny (incoming)" not in status:
            changes.append(Change("deny incoming by default", "ufw default deny incoming"))
        if "allow (outgoing)" not in status:
            changes.append(Change("allow outgoing by default", "ufw default allow outgoing"))
        if "Status: active" not in status:
            # Last: every allow rule above (SSH first) exists before the wall goes up.
            changes.append(Change("enable ufw", "ufw --force enable"))
        if not changes:
            return Plan.ok(f"active, default deny, allows {' '.join(allow)}")
        return Plan.change(*changes)

    return Step("firewall", probes={"status": "ufw status verbose"}, plan=plan)


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


# -- tasks ----------------------------------------------------------------------


@ops_task(default=True, help={
    "keys": "public key line(s) for the deploy user, comma separated (default: settings, else the key this run used)",
})
def secure(ops, keys=""):
    """Harden a fresh host: deploy user, sshd, ufw, fail2ban, unattended-upgrades."""
    settings = ops.settings
    user = settings.require("deploy_user")
    allow = list(settings.require("firewall.allow"))
    if not any(rule.split("/")[0] in ("22", "ssh", "OpenSSH") for rule in allow):
        raise UsageError(f"firewall.allow must keep SSH open, got {allow}", "add 22/tcp so you are not locked out")
    wanted_keys = [k.strip() for k in keys.split(",") if k.strip()] or list(settings.get("authorized_keys") or [])
    if not wanted_keys:
        wanted_keys = login_public_keys(ops.target)
    if not wanted_keys:
        raise UsageError(
            f"no public key to install for {user}",
            "set authorized_keys in invoke.yaml, pass --keys, or connect with -i KEY",
        )

    ops.run_steps([
        remote.packages_step("hardening packages", HARDENING_PACKAGES),
        deploy_user_step(user, list(settings.get("deploy_groups"))),
        authorized_keys_step(user, wanted_keys),
        sudoers_step(user),
    ])

    planned = ops.plan([
        sshd_step(),
        moduli_step(),
        firewall_step(allow),
        *fail2ban_steps(settings),
        *unattended_upgrades_steps(),
    ])
    sshd_changes = any(plan.changes for step, plan in planned if step.name == "sshd hardening")
    if sshd_changes and not ops.dry:
        prove_deploy_login(ops, user)
    ops.apply(planned)


AUDIT_PROBES = {
    "sshd": "sshd -T",
    "ufw": "ufw status verbose",
    "fail2ban": "fail2ban-client status sshd",
    "auto_upgrades": "cat /etc/apt/apt.conf.d/20auto-upgrades",
    "unattended_service": "systemctl is-enabled unattended-upgrades",
    "listening": "ss -Hltnp",
}


def audit_findings(facts: Facts, allowed_ports: set[str]) -> list[tuple[str, bool, str]]:
    """(item, passed, detail) for each hardening item. Pure: tested as data."""
    sshd = {}
    for line in facts["sshd"].lines:
        key, _, value = line.partition(" ")
        sshd.setdefault(key, value)
    ufw = facts["ufw"].stdout
    walled = "Status: active" in ufw and "deny (incoming)" in ufw
    opened_by_ufw = {line.split()[0].split("/")[0] for line in facts["ufw"].lines if " ALLOW " in f" {line} "}
    exposed = sorted(
        {
            addr
            for addr, owner in ((line.split()[3], line) for line in facts["listening"].lines if len(line.split()) >= 4)
            if not addr.startswith(("127.", "[::1]", "::1"))
            and addr.rsplit(":", 1)[-1] not in allowed_ports
            # Behind an active default-deny firewall only ports it opens are exposed,
            # except Docker-published ports: Docker's own rules bypass ufw.
            and (not walled or addr.rsplit(":", 1)[-1] in opened_by_ufw or "docker-proxy" in owner)
        }
    )
    auto = facts["auto_upgrades"].stdout
    return [
        ("root login refused", sshd.get("permitrootlogin") == "no", f"PermitRootLogin {sshd.get('permitrootlogin', '?')}"),
        ("password login refused", sshd.get("passwordauthentication") == "no" and sshd.get("kbdinteractiveauthentication") == "no",
         f"PasswordAuthentication {sshd.get('passwordauthentication', '?')}, "
         f"KbdInteractiveAuthentication {sshd.get('kbdinteractiveauthentication', '?')}"),
        ("firewall active, default deny", walled,
         ufw.splitlines()[0] if ufw else "ufw not installed"),
        ("fail2ban sshd jail", facts["fail2ban"].ok, "jail sshd running" if facts["fail2ban"].ok else "no sshd jail"),
        ("unattended-upgrades", 'Unattended-Upgrade "1"' in auto and facts["unattended_service"].stdout.strip() == "enabled",
         "enabled" if 'Unattended-Upgrade "1"' in auto else "not enabled"),
        ("no unexpected open ports", not exposed,
         "exposed: " + ", ".join(exposed) if exposed else "only " + " ".join(sorted(allowed_ports)) + " reachable"),
    ]


@ops_task
def audit(ops):
    """Report each hardening item as pass/fail (one round trip); exit 1 if any fails."""
    allowed_ports = {rule.split("/")[0] for rule in ops.settings.require("firewall.allow")}
    facts = gather(ops.target, AUDIT_PROBES)
    findings = audit_findings(facts, allowed_ports)
    for item, passed, detail in findings:
        ops.reporter.info(f"  {'pass' if passed else 'FAIL':<5} {item:<32} {detail}")
    failed = [item for item, passed, _ in findings if not passed]
    if failed:
        raise OpsError(f"{len(failed)} hardening item(s) fail on {ops.where}: {', '.join(failed)}", "run `secure` to fix them")
    ops.reporter.info(f"{ops.where}: all {len(findings)} hardening items pass")


ns = Collection("secure")
ns.add_task(secure, default=True)
ns.add_task(audit)
