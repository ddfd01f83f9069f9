"""The items `secure` applies, as an Ansible playbook of ansible.builtin modules.

dev-sec's roles (devsec.hardening) are on Ansible Galaxy only: the `ansible` package
PyPI serves for this Python (12.3.0) does not bundle them, and Galaxy cannot be reached
here. So bench_secure.py compares against this playbook: the same items with the same
file contents (rendered from this project's own templates), written the way an Ansible
user writes them with the built-in modules (apt, user, copy, lineinfile, service, and
`command` where no built-in module exists: ufw, pam-auth-update, the moduli filter).
Items a container cannot take (sysctl, auditd, acct) are skipped by both, after
reading `systemd-detect-virt --container`.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from fabfile import os_baseline
from fabfile import secure as secure_task
from fabfile.core import templates
from fabfile.core.settings import Settings


def sshd_drop_in(algorithms: dict[str, list[str]], host_keys: list[str]) -> str:
    """secure's sshd drop-in for a host offering `algorithms` (its `ssh -Q` lists)."""
    return templates.render(
        "sshd/00-coachntt-hardening.conf.j2",
        kex=[a for a in secure_task.KEX if a in algorithms["kex"]],
        ciphers=[a for a in secure_task.CIPHERS if a in algorithms["cipher"]],
        macs=[a for a in secure_task.MACS if a in algorithms["mac"]],
        host_key_algorithms=[a for a in secure_task.HOST_KEY_ALGORITHMS if a in algorithms["key-sig"]],
        host_keys=[k for k in secure_task.HOST_KEYS if k in host_keys],
    )


def copy_task(name: str, path: str, source: Path, mode: str = "0644", validate: str = "", notify: str = "") -> dict:
    task = {"name": name, "ansible.builtin.copy": {"src": str(source), "dest": path, "owner": "root", "group": "root",
                                                    "mode": mode}}
    if validate:
        task["ansible.builtin.copy"]["validate"] = validate
    if notify:
        task["notify"] = notify
    return task


def command_task(name: str, command: str, *, changed: str | bool = False, when: str = "", register: str = "") -> dict:
    """A shell command; `changed` a Jinja test on its result, or a constant."""
    task: dict = {"name": name, "ansible.builtin.shell": {"cmd": "{% raw %}" + command + "{% endraw %}"},
                  "changed_when": changed}
    if when:
        task["when"] = when
    if register:
        task["register"] = register
    return task


def write_playbook(workdir: Path, settings: Settings, public_key: str, login_port: int, drop_in: str) -> Path:
    """playbook.yml (JSON is YAML) and its files under `workdir`; returns the playbook's path."""
    files = workdir / "files"
    files.mkdir(parents=True, exist_ok=True)
    user = settings.require("deploy_user")
    groups = list(settings.require("deploy_groups"))
    allow = list(settings.require("firewall.allow"))
    contents = {
        "sudoers": templates.render("sudoers/90-coachntt.j2", user=user),
        "sshd": drop_in,
        "jail": templates.render("fail2ban/coachntt.local.j2", bantime=settings.get("fail2ban.bantime", "1h"),
                                 findtime=settings.get("fail2ban.findtime", "10m"),
                                 maxretry=settings.get("fail2ban.maxretry", 5)),
        "auto-upgrades": templates.render("apt/20auto-upgrades"),
        **{name: os_baseline.config(name) for name in ("pam-umask", "modprobe-blacklist.conf", "sysctl-hardening.conf",
                                                       "needrestart.conf", "audit.rules", "issue.net", "sshd-banner.conf")},
    }
    for name, text in contents.items():
        (files / name).write_text(text)
    # The SSH port this run comes in on first, then firewall.allow (as secure's firewall step).
    rules = [f"{login_port}/tcp"] + [rule for rule in allow if rule != f"{login_port}/tcp"]
    in_container = "virt.rc == 0"
    home = f"/home/{user}"
    tasks = [
        command_task("sshd config as found", f"{os_baseline.PRIVSEP_DIR} && sshd -t"),
        {"name": "hardening packages", "ansible.builtin.apt": {
            "name": secure_task.HARDENING_PACKAGES, "state": "present", "update_cache": True, "cache_valid_time": 3600,
            "install_recommends": False}},
        {"name": "group docker", "ansible.builtin.group": {"name": "docker", "system": True}},
        {"name": "deploy user", "ansible.builtin.user": {"name": user, "groups": groups, "append": True, "shell": "/bin/bash",
                                                         "create_home": True}},
        {"name": "ssh dir", "ansible.builtin.file": {"path": f"{home}/.ssh", "state": "directory", "mode": "0700",
                                                     "owner": user, "group": user}},
        {"name": "ssh key", "ansible.builtin.lineinfile": {"path": f"{home}/.ssh/authorized_keys", "line": public_key,
                                                           "create": True, "mode": "0600", "owner": user, "group": user}},
        copy_task("passwordless sudo", f"/etc/sudoers.d/90-{user}", files / "sudoers", "0440", validate="visudo -cf %s"),
        copy_task("sshd hardening", secure_task.SSHD_DROP_IN, files / "sshd", notify="reload sshd"),
        command_task("weak DH moduli", "n=$(awk '$1 !~ /^#/ && $5 < 2047' /etc/ssh/moduli | wc -l); [ \"$n\" = 0 ] || "
                     "{ awk '$1 ~ /^#/ || $5 >= 2047' /etc/ssh/moduli > /etc/ssh/moduli.new && "
                     "mv /etc/ssh/moduli.new /etc/ssh/moduli && echo removed; }",
                     changed="'removed' in result.stdout", register="result"),
        command_task("firewall status", "ufw status verbose", register="ufw"),
        *[command_task(f"allow {rule}", f"ufw allow {shlex.quote(rule)}", changed=True,
                       when=f"not ufw.stdout is search('(?m)^{rule} +ALLOW ')") for rule in rules],
        command_task("deny incoming by default", "ufw default deny incoming", changed=True,
                     when="'deny (incoming)' not in ufw.stdout"),
        command_task("allow outgoing by default", "ufw default allow outgoing", changed=True,
                     when="'allow (outgoing)' not in ufw.stdout"),
        command_task("enable ufw", "ufw --force enable", changed=True, when="'Status: active' not in ufw.stdout"),
        copy_task("fail2ban sshd jail", "/etc/fail2ban/jail.d/coachntt.local", files / "jail", notify="restart fail2ban"),
        {"name": "fail2ban running", "ansible.builtin.service": {"name": "fail2ban", "state": "started", "enabled": True}},
        copy_task("unattended upgrades on", "/etc/apt/apt.conf.d/20auto-upgrades", files / "auto-upgrades"),
        {"name": "unattended-upgrades running", "ansible.builtin.service": {"name": "unattended-upgrades", "state": "started",
                                                                            "enabled": True}},
        # -- the OS baseline
        command_task("container?", os_baseline.CONTAINER_PROBE, register="virt") | {"failed_when": False},
        {"name": "baseline packages", "ansible.builtin.apt": {
            "name": [p for ps in os_baseline.ITEM_PACKAGES.values() for p in ps], "state": "present",
            "install_recommends": False}},
        {"name": "login.defs", "ansible.builtin.lineinfile": {"path": os_baseline.LOGIN_DEFS, "regexp": "^\\s*{{ item.key }}\\s",
                                                              "line": "{{ item.key }} {{ item.value }}"},
         "loop": "{{ login_defs | dict2items }}"},
        copy_task("pam umask profile", os_baseline.PAM_UMASK_PROFILE, files / "pam-umask"),
        command_task("pam umask enabled", f"grep -qF {shlex.quote(os_baseline.PAM_UMASK_LINE)} /etc/pam.d/common-session || "
                     "{ pam-auth-update --enable coachntt-umask && echo enabled; }",
                     changed="'enabled' in pam.stdout", register="pam"),
        copy_task("module blacklist", os_baseline.BLACKLIST, files / "modprobe-blacklist.conf"),
        copy_task("sysctl", os_baseline.SYSCTL, files / "sysctl-hardening.conf") | {"when": f"not {in_container}",
                                                                                     "notify": "load sysctl"},
        copy_task("needrestart", os_baseline.NEEDRESTART, files / "needrestart.conf", validate="perl -c %s"),
        {"name": "debsums weekly", "ansible.builtin.lineinfile": {"path": os_baseline.DEBSUMS_DEFAULTS, "regexp": "^CRON_CHECK=",
                                                                  "line": "CRON_CHECK=weekly", "create": True}},
        {"name": "auditd", "ansible.builtin.apt": {"name": "auditd", "state": "present", "install_recommends": False},
         "when": f"not {in_container}"},
        copy_task("audit rules", os_baseline.AUDIT_RULES, files / "audit.rules", "0640") | {"when": f"not {in_container}"},
        {"name": "acct", "ansible.builtin.apt": {"name": "acct", "state": "present", "install_recommends": False},
         "when": f"not {in_container}"},
        *[copy_task(f"banner {path}", path, files / "issue.net") for path in os_baseline.ISSUE_FILES],
        copy_task("sshd banner", os_baseline.SSHD_BANNER, files / "sshd-banner.conf", notify="reload sshd"),
    ]
    handlers = [
        command_task("reload sshd", f"{os_baseline.PRIVSEP_DIR} && sshd -t && {secure_task.RELOAD_SSHD}", changed=True),
        {"name": "restart fail2ban", "ansible.builtin.service": {"name": "fail2ban", "state": "restarted"}},
        command_task("load sysctl", "sysctl --system >/dev/null", changed=True),
    ]
    play = [{"hosts": "all", "become": True, "gather_facts": False,
             "vars": {"login_defs": os_baseline.LOGIN_DEFS_VALUES}, "tasks": tasks, "handlers": handlers}]
    playbook = workdir / "playbook.yml"
    playbook.write_text(json.dumps(play, indent=1) + "\n")
    return playbook
