"""secure.audit: every hardening item `secure` applies, judged in one round trip.

Runbook (`fab -H coachntt@HOST secure.audit`): one batch of read-only probes (sshd -T,
ufw, fail2ban, unattended-upgrades, listening sockets, and the OS baseline's own
probes), then a pass/fail/skipped line per item; exit 1 when any item fails.
"""

from __future__ import annotations

from . import os_baseline
from .core.batch import gather
from .core.errors import OpsError
from .core.fleet import READS
from .core.steps import Facts
from .core.task import ops_task

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
    # sshd's own ports are meant to be reachable, whichever they are (secure opens them).
    sshd_ports = {line.split()[1] for line in facts["sshd"].lines if line.startswith("port ") and len(line.split()) == 2}
    allowed_ports = set(allowed_ports) | sshd_ports
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


@ops_task(fleet=READS)
def audit(ops):
    """Report each hardening item as pass/fail (one round trip); exit 1 if any fails."""
    allowed_ports = {rule.split("/")[0] for rule in ops.settings.require("firewall.allow")}
    skip = ops.settings.get("baseline.skip") or []
    # One round trip: secure's probes and the baseline's (prefixed) together.
    facts = gather(ops.target, {**AUDIT_PROBES, **{f"baseline.{k}": v for k, v in os_baseline.AUDIT_PROBES.items()}})
    baseline_facts = {k: facts[f"baseline.{k}"] for k in os_baseline.AUDIT_PROBES}
    findings = [(item, "pass" if passed else "fail", detail) for item, passed, detail in audit_findings(facts, allowed_ports)]
    findings += [(f"baseline {item}", status, detail) for item, status, detail in os_baseline.audit_findings(baseline_facts, skip)]
    for item, status, detail in findings:
        ops.reporter.info(f"  {status.upper() if status == 'fail' else status:<5} {item:<32} {detail}")
    failed = [item for item, status, _ in findings if status == "fail"]
    if failed:
        raise OpsError(f"{len(failed)} hardening item(s) fail on {ops.where}: {', '.join(failed)}", "run `secure` to fix them")
    skipped = sum(1 for _, status, _ in findings if status == "skipped")
    ops.reporter.info(f"{ops.where}: all {len(findings) - skipped} hardening items pass"
                      + (f", {skipped} skipped" if skipped else ""))
