"""The OS baseline `secure` applies after sshd, ufw and fail2ban: the items of the
dev-sec os-hardening baseline that matter on a small single-purpose API server.

Runbook (each item one planned step, facts -> plan -> apply -> verify):
    login-defs          /etc/login.defs: UMASK 027, password ageing and SHA-crypt rounds
                        for local accounts; a pam-auth-update profile applies the umask
                        with `nousergroups`, so a login's new files are 640, not 660
    pam-tmpdir          libpam-tmpdir: a private $TMPDIR per login
    module-blacklist    modprobe.d file: `install X /bin/false` for unused protocols,
                        filesystems and removable storage
    sysctl              sysctl.d file, loaded with `sysctl --system`; ip_forward stays 1
                        (Docker). Skipped in a container: the kernel is the host's
    needrestart         restarts services still running old libraries, without asking
    debsums             installed, weekly check of package files
    auditd              rules on sshd config, sudoers, identity and PAM files; skipped
                        in a container: auditd cannot reach the kernel's audit interface
    process-accounting  acct; skipped in a container: accton is refused there
    login-banner        /etc/issue.net, /etc/issue and sshd's Banner (validated, reloaded)

The remaining sshd items (LogLevel VERBOSE, MaxAuthTries, MaxSessions, forwarding,
ClientAlive*) are in configs/sshd, fail2ban's jail in configs/fail2ban (secure.py).
`baseline.skip` lists items to leave alone; `secure.audit` reports each item.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable

from .core import remote, templates
from .core.settings import BASELINE_ITEMS
from .core.steps import Change, Facts, Plan, Step

# systemd-detect-virt prints the container type and exits 0 inside one; "none", 1 outside.
CONTAINER_PROBE = "systemd-detect-virt --container"
PRIVSEP_DIR = "install -d -m 0755 /run/sshd"
RELOAD_SSHD = f"sh -c {shlex.quote(templates.script('reload-sshd.sh'))}"

LOGIN_DEFS = "/etc/login.defs"
# dev-sec's values. USERGROUPS_ENAB no: with it, pam_umask copies the owner bits of
# UMASK to the group for users with their own group, and 027 would become 007 (660 files).
# Debian's pam_umask (PAM 1.7) does that by default whatever login.defs says, hence
# PAM_UMASK_PROFILE: a second pam_umask with `nousergroups`, after the packaged one.
# ENCRYPT_METHOD stays as the distribution sets it (yescrypt on Ubuntu 24.04, stronger
# than SHA-512); the rounds apply wherever SHA-crypt is chosen (chpasswd -c SHA512).
LOGIN_DEFS_VALUES = {
    "UMASK": "027",
    "USERGROUPS_ENAB": "no",
    "PASS_MAX_DAYS": "60",
    "PASS_MIN_DAYS": "7",
    "PASS_WARN_AGE": "7",
    "SHA_CRYPT_MIN_ROUNDS": "640000",
    "SHA_CRYPT_MAX_ROUNDS": "640000",
}
PAM_UMASK_PROFILE = "/usr/share/pam-configs/coachntt-umask"
PAM_UMASK_LINE = "pam_umask.so nousergroups"
BLACKLIST = "/etc/modprobe.d/coachntt-blacklist.conf"
SYSCTL = "/etc/sysctl.d/60-coachntt-hardening.conf"
NEEDRESTART = "/etc/needrestart/conf.d/coachntt.conf"
DEBSUMS_DEFAULTS = "/etc/default/debsums"
AUDIT_RULES = "/etc/audit/rules.d/coachntt.rules"
ISSUE_FILES = ("/etc/issue.net", "/etc/issue")
SSHD_BANNER = "/etc/ssh/sshd_config.d/01-coachntt-banner.conf"
# Packages of the items that install nothing else, installed in one apt run.
ITEM_PACKAGES = {
    "pam-tmpdir": ["libpam-tmpdir"],
    "module-blacklist": ["kmod"],  # modprobe, which reads the file (always there on Ubuntu)
    "needrestart": ["needrestart"],
    "debsums": ["debsums"],
}
# Why an item cannot take effect in a container (the sandbox's systemd-nspawn hosts, LXC).
CONTAINER_REASONS = {
    "sysctl": "in a container ({virt}) kernel settings belong to the host (kernel.* is refused)",
    "auditd": "in a container ({virt}) auditd cannot reach the kernel's audit interface (auditctl -s is refused)",
    "process-accounting": "in a container ({virt}) the kernel refuses accton",
}


def config(name: str) -> str:
    return templates.render(f"baseline/{name}")


def container(facts: Facts) -> str:
    """The container type the host runs in ('' on a VM or bare metal). Pure."""
    found = facts["virt"]
    return found.stdout.strip() if found.ok and found.stdout.strip() not in ("", "none") else ""


def blacklisted_modules() -> list[str]:
    return [line.split()[1] for line in config("modprobe-blacklist.conf").splitlines() if line.startswith("install ")]


def sysctl_values() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in config("sysctl-hardening.conf").splitlines() if "=" in line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def audit_rules() -> list[str]:
    return [line for line in config("audit.rules").splitlines() if line.startswith("-")]


# -- steps ----------------------------------------------------------------------


def login_defs_values(content: str) -> dict[str, str]:
    """The active KEY VALUE settings of a login.defs text (comments ignored). Pure."""
    found = {}
    for line in content.splitlines():
        fields = line.split()
        if len(fields) >= 2 and not fields[0].startswith("#"):
            found[fields[0]] = fields[1]
    return found


def login_defs_step() -> Step:
    def plan(facts: Facts) -> Plan:
        if not facts["content"].ok:
            return Plan.skipped(f"{LOGIN_DEFS} not found (shadow's login package missing)")
        current = login_defs_values(facts["content"].stdout)
        wrong = {key: value for key, value in LOGIN_DEFS_VALUES.items() if current.get(key) != value}
        if not wrong:
            return Plan.ok(" ".join(f"{key} {value}" for key, value in LOGIN_DEFS_VALUES.items()))
        # Each key: its active lines go, the wanted line is appended (order means nothing
        # to login.defs); the file as found is kept under remote.BACKUP_DIR.
        commands = [f"mkdir -p {remote.BACKUP_DIR} && cp -p {LOGIN_DEFS} {remote.q(remote.backup_path(LOGIN_DEFS))}"]
        for key, value in wrong.items():
            commands.append(f"sed -i -E '/^[[:space:]]*{key}[[:space:]]/d' {LOGIN_DEFS} && "
                            f"printf '%s\\n' {remote.q(f'{key} {value}')} >> {LOGIN_DEFS}")
        summary = ", ".join(f"{key} {current.get(key, '(unset)')} -> {value}" for key, value in wrong.items())
        return Plan.change(Change(f"set in {LOGIN_DEFS}: {summary}", "\n".join(commands)))

    return Step("login.defs", probes={"content": f"cat -- {LOGIN_DEFS}"}, plan=plan)


def pam_umask_step() -> Step:
    """pam-auth-update keeps our profile through later package installs (it rewrites
    common-session from the profiles each time)."""
    profile = remote.file_step("pam profile", PAM_UMASK_PROFILE, config("pam-umask"))

    def plan(facts: Facts) -> Plan:
        planned = profile.plan(facts)
        if planned.changes or not facts["enabled"].ok:
            enable = Change("pam-auth-update --enable coachntt-umask", "pam-auth-update --enable coachntt-umask")
            return Plan.change(*planned.changes, enable)
        return Plan.ok(f"{PAM_UMASK_LINE} in common-session")

    return Step("pam umask", probes={**profile.probes, "enabled": f"grep -qF {remote.q(PAM_UMASK_LINE)} /etc/pam.d/common-session"},
                plan=plan)


def in_container_only(name: str, step: Step) -> Step:
    """`step`, skipped with the item's reason when the host is a container."""

    def plan(facts: Facts) -> Plan:
        virt = container(facts)
        if virt:
            return Plan.skipped(CONTAINER_REASONS[name].format(virt=virt))
        return step.plan(facts)

    return Step(step.name, probes={**step.probes, "virt": CONTAINER_PROBE}, plan=plan, check=step.check)


def sysctl_step() -> Step:
    # `sysctl --system` reloads every file; it fails when a key this kernel lacks is set.
    files = remote.file_step("baseline sysctl", SYSCTL, config("sysctl-hardening.conf"), then="sysctl --system >/dev/null")
    return in_container_only("sysctl", files)


def combine(name: str, steps: list[Step]) -> Step:
    """Several steps as one item: their probes side by side, their changes in order."""

    def plan(facts: Facts) -> Plan:
        plans = [step.plan({probe: facts[f"{index}.{probe}"] for probe in step.probes}) for index, step in enumerate(steps)]
        changes = [change for planned in plans for change in planned.changes]
        if changes:
            return Plan.change(*changes)
        return Plan.ok("; ".join(planned.reason for planned in plans if planned.reason))

    probes = {f"{index}.{probe}": command for index, step in enumerate(steps) for probe, command in step.probes.items()}
    return Step(name, probes=probes, plan=plan)


def auditd_step() -> Step:
    rules = remote.file_step("rules", AUDIT_RULES, config("audit.rules"), mode="0640", then="augenrules --load >/dev/null")
    item = combine("baseline auditd", [
        remote.packages_step("auditd", ["auditd"]),
        rules,
        remote.service_step("auditd running", "auditd"),
    ])
    return in_container_only("auditd", item)


def process_accounting_step() -> Step:
    item = combine("baseline process-accounting", [
        remote.packages_step("acct", ["acct"]),
        remote.service_step("acct running", "acct"),
    ])
    return in_container_only("process-accounting", item)


def login_banner_step() -> Step:
    files = {path: config("issue.net") for path in ISSUE_FILES}
    files[SSHD_BANNER] = config("sshd-banner.conf")
    return remote.files_step(
        "baseline login-banner",
        files,
        validate=("sshd -t passes and shows the banner",
                  f"{{ {PRIVSEP_DIR} && sshd -t && sshd -T | grep -qx 'banner /etc/issue.net'; }}"),
        then=("reload sshd", RELOAD_SSHD),
    )


def item_steps(name: str) -> list[Step]:
    """The step(s) of one item, besides its share of the common packages step."""
    return {
        "login-defs": lambda: [combine("baseline login-defs", [login_defs_step(), pam_umask_step()])],
        "pam-tmpdir": lambda: [],
        "module-blacklist": lambda: [remote.file_step("baseline module-blacklist", BLACKLIST, config("modprobe-blacklist.conf"))],
        "sysctl": lambda: [sysctl_step()],
        "needrestart": lambda: [remote.file_step("baseline needrestart", NEEDRESTART, config("needrestart.conf"),
                                                 validate=f"perl -c {NEEDRESTART}")],
        "debsums": lambda: [remote.line_step("baseline debsums", DEBSUMS_DEFAULTS, "CRON_CHECK=weekly",
                                             replaces="^CRON_CHECK=")],
        "auditd": lambda: [auditd_step()],
        "process-accounting": lambda: [process_accounting_step()],
        "login-banner": lambda: [login_banner_step()],
    }[name]()


def turned_off(name: str) -> Step:
    return Step(f"baseline {name}", plan=lambda facts: Plan.skipped("turned off by baseline.skip"))


def baseline_steps(skip: Iterable[str] = ()) -> list[Step]:
    """Every item in order: its steps, or one skipped step when `skip` names it."""
    skip = set(skip)
    enabled = [name for name in BASELINE_ITEMS if name not in skip]
    packages = [package for name in enabled for package in ITEM_PACKAGES.get(name, [])]
    steps = [remote.packages_step("baseline packages", packages)] if packages else []
    for name in BASELINE_ITEMS:
        steps += [turned_off(name)] if name in skip else item_steps(name)
    return steps


# -- audit ----------------------------------------------------------------------

_MODULE_PROBE = blacklisted_modules()[0]
AUDIT_PROBES = {
    "virt": CONTAINER_PROBE,
    "login_defs": f"cat -- {LOGIN_DEFS}",
    "pam_umask": f"grep -hF {remote.q(PAM_UMASK_LINE)} /etc/pam.d/common-session",
    "pam_tmpdir": "grep -h pam_tmpdir /etc/pam.d/common-session",
    "blacklist": f"cat -- {BLACKLIST}",
    # modprobe's view of the first module: `install /bin/false` when the file is read.
    "modprobe": f"modprobe -n -v {_MODULE_PROBE}",
    "sysctl": "sysctl " + " ".join(sysctl_values()),
    "needrestart": f"command -v needrestart >/dev/null && cat -- {NEEDRESTART}",
    "debsums": f"command -v debsums >/dev/null && grep -h '^CRON_CHECK=' {DEBSUMS_DEFAULTS}",
    "auditctl": "auditctl -l",
    "acct": "systemctl is-active acct",
    "banner": f"{PRIVSEP_DIR}; sshd -T | grep '^banner '; cat -- /etc/issue.net",
}


def audit_findings(facts: Facts, skip: Iterable[str] = ()) -> list[tuple[str, str, str]]:
    """(item, pass|fail|skipped, detail) for each baseline item. Pure: tested as data."""
    skip = set(skip)
    virt = container(facts)
    found = []
    for name in BASELINE_ITEMS:
        if name in skip:
            found.append((name, "skipped", "turned off by baseline.skip"))
        elif virt and name in CONTAINER_REASONS:
            found.append((name, "skipped", CONTAINER_REASONS[name].format(virt=virt)))
        else:
            passed, detail = _JUDGES[name](facts)
            found.append((name, "pass" if passed else "fail", detail))
    return found


def _login_defs(facts: Facts) -> tuple[bool, str]:
    current = login_defs_values(facts["login_defs"].stdout) if facts["login_defs"].ok else {}
    wrong = [f"{key} {current.get(key, '(unset)')}" for key, value in LOGIN_DEFS_VALUES.items() if current.get(key) != value]
    if not facts["pam_umask"].ok:
        wrong.append(f"no {PAM_UMASK_LINE} in common-session")
    return not wrong, "wrong: " + ", ".join(wrong) if wrong else f"UMASK {current['UMASK']}, PASS_MAX_DAYS {current['PASS_MAX_DAYS']}"


def _pam_tmpdir(facts: Facts) -> tuple[bool, str]:
    ok = facts["pam_tmpdir"].ok
    return ok, "pam_tmpdir in common-session" if ok else "pam_tmpdir not in /etc/pam.d/common-session"


def _blacklist(facts: Facts) -> tuple[bool, str]:
    present = {line.split()[1] for line in facts["blacklist"].lines if line.startswith("install ") and line.endswith(" /bin/false")}
    missing = [module for module in blacklisted_modules() if module not in present]
    if missing:
        return False, f"not refused: {', '.join(missing)}"
    if "install /bin/false" not in facts["modprobe"].stdout:
        return False, f"modprobe does not read {BLACKLIST}"
    return True, f"{len(present)} modules refused by modprobe"


def _sysctl(facts: Facts) -> tuple[bool, str]:
    live = {}
    for line in facts["sysctl"].lines:
        key, _, value = line.partition(" = ")
        live[key.strip()] = value.strip()
    wrong = [f"{key}={live.get(key, '?')}" for key, value in sysctl_values().items() if live.get(key) != value]
    return not wrong, "live values differ: " + ", ".join(wrong) if wrong else f"{len(live)} values live, ip_forward 1 (Docker)"


def _needrestart(facts: Facts) -> tuple[bool, str]:
    ok = facts["needrestart"].ok and "$nrconf{restart} = 'a';" in facts["needrestart"].stdout
    return ok, "restarts services automatically" if ok else f"needrestart missing or {NEEDRESTART} not ours"


def _debsums(facts: Facts) -> tuple[bool, str]:
    ok = facts["debsums"].stdout.strip() == "CRON_CHECK=weekly"
    return ok, "weekly check" if ok else "debsums missing or its weekly check off"


def _auditd(facts: Facts) -> tuple[bool, str]:
    loaded = set(facts["auditctl"].lines)
    missing = [rule for rule in audit_rules() if rule.rstrip("/") not in {line.rstrip("/") for line in loaded}]
    if not facts["auditctl"].ok:
        return False, "auditd not running (auditctl -l failed)"
    return not missing, f"missing rules: {', '.join(missing)}" if missing else f"{len(audit_rules())} watch rules loaded"


def _acct(facts: Facts) -> tuple[bool, str]:
    state = facts["acct"].stdout.strip() or "not installed"
    return state == "active", f"acct {state}"


def _banner(facts: Facts) -> tuple[bool, str]:
    lines = facts["banner"].lines
    ok = "banner /etc/issue.net" in lines and config("issue.net").splitlines()[0] in lines
    return ok, "sshd shows /etc/issue.net" if ok else "sshd shows no banner, or not ours"


_JUDGES = {
    "login-defs": _login_defs,
    "pam-tmpdir": _pam_tmpdir,
    "module-blacklist": _blacklist,
    "sysctl": _sysctl,
    "needrestart": _needrestart,
    "debsums": _debsums,
    "auditd": _auditd,
    "process-accounting": _acct,
    "login-banner": _banner,
}
