"""Idempotent building blocks (what patchwork would have given, done right).

Each helper returns a Step: probes that read the host, a pure plan that compares
them with what we want, and the shell that closes the gap. Nothing is written
when the host already matches, so a second run reports `ok`.
"""

from __future__ import annotations

import base64
import difflib
import re
import shlex
from collections.abc import Callable, Iterable

from . import templates
from .steps import Change, Facts, Plan, Step

BACKUP_DIR = "/var/backups/coachntt-ops"
# Refresh the package lists (retried) and install: `{APT_INSTALL} pkg...`; no packages: refresh only.
APT_INSTALL = f"sh -c {shlex.quote(templates.script('apt-install.sh'))} apt-install"
# After `nginx -t`: a graceful reload that returns once the old workers stopped taking
# connections (a bare `systemctl reload` returns before that); nginx down: a start.
RELOAD_NGINX = f"sh -c {shlex.quote(templates.script('reload-nginx.sh'))} reload-nginx"


def q(value: str) -> str:
    return shlex.quote(value)


def write_file_command(path: str, content: str, mode: str, owner: str, validate: str = "", then: str = "") -> str:
    """Shell that writes `content` atomically; on a failed `validate` the old file comes back.

    Content travels inline (base64 inside the command), so a small file costs no
    SFTP session. The previous version is kept under BACKUP_DIR, outside any
    directory a service includes wholesale (nginx would load a backup in sites-enabled).
    """
    payload = base64.b64encode(content.encode()).decode()
    backup = backup_path(path)
    lines = [
        f"mkdir -p {BACKUP_DIR} && chmod 700 {BACKUP_DIR}",
        f"mkdir -p \"$(dirname {q(path)})\"",
        f"tmp=$(mktemp {q(path)}.coachntt.XXXXXX)",
        f"printf %s {payload} | base64 -d > \"$tmp\"",
        f"chmod {q(mode)} \"$tmp\" && chown {q(owner)} \"$tmp\"",
        f"had_old=no; if [ -e {q(path)} ]; then cp -p {q(path)} {q(backup)}; had_old=yes; fi",
        f"mv -f \"$tmp\" {q(path)}",
    ]
    if validate:
        restore = f"if [ $had_old = yes ]; then {restore_command(path, True)}; else {restore_command(path, False)}; fi"
        # The validator's first complaint ends the message: that is the line the operator needs.
        lines.append(
            f"if ! why=$({validate} 2>&1); then {restore}; "
            "first=$(printf '%s' \"$why\" | grep -v '^ *$' | head -n 1); "
            "echo \"validation failed, previous file restored${first:+: $first}\" >&2; exit 97; fi"
        )
    if then:
        lines.append(then)
    return "\n".join(lines)


def backup_path(path: str) -> str:
    """Where write_file_command keeps the version of `path` it replaced."""
    return f"{BACKUP_DIR}/{path.strip('/').replace('/', '__')}"


def restore_command(path: str, had_old: bool) -> str:
    """Shell that undoes write_file_command: the previous version back, or no file when there was none."""
    return f"cp -p {q(backup_path(path))} {q(path)}" if had_old else f"rm -f {q(path)}"


def file_step(
    name: str,
    path: str,
    content: str,
    *,
    mode: str = "0644",
    owner: str = "root:root",
    validate: str = "",
    then: str = "",
    secret: bool = False,
) -> Step:
    """Ensure `path` holds exactly `content` with `mode` and `owner` (user or user:group)."""
    if ":" not in owner:
        owner = f"{owner}:{owner}"

    def plan(facts: Facts) -> Plan:
        current, meta = facts["content"], facts["meta"]
        want_meta = f"{int(mode, 8):o} {owner}"
        size = f"{len(content.encode())} bytes, mode {mode}, {owner}"
        write = write_file_command(path, content, mode, owner, validate, then)
        if not current.ok:
            return Plan.change(Change(f"create {path} ({size})", write, "" if secret else _diff(path, "", content)))
        if current.stdout != content.rstrip("\n"):
            return Plan.change(Change(f"update {path} ({size})", write, "" if secret else _diff(path, current.stdout + "\n", content)))
        if meta.stdout.strip() != want_meta:
            return Plan.change(Change(f"set {path} to mode {mode}, owner {owner} (was {meta.stdout.strip()})",
                                      f"chmod {q(mode)} {q(path)} && chown {q(owner)} {q(path)}"))
        return Plan.ok(f"{path} up to date")

    return Step(name, probes=file_probes(path), plan=plan)


def files_step(name: str, files: dict[str, str], *, validate: tuple[str, str] = ("", ""), then: tuple[str, str] = ("", ""),
               extra_probes: dict[str, str] | None = None, render: Callable[[Facts], dict[str, str]] | None = None) -> Step:
    """Several files as one step: written only where they differ; `validate` (what, command)
    checks them all together, every changed file put back if it fails; `then` (what, command)
    runs once after a change. `render(facts)` gives content that depends on facts."""
    probes = dict(extra_probes or {})
    for index, path in enumerate(files):
        probes.update({f"{key}{index}": command for key, command in file_probes(path).items()})

    def plan(facts: Facts) -> Plan:
        wanted = render(facts) if render else files
        changes, restores = [], []
        for index, (path, content) in enumerate(wanted.items()):
            single = file_step(name, path, content).plan({"content": facts[f"content{index}"], "meta": facts[f"meta{index}"]})
            if single.changes:
                changes += single.changes
                restores.append(restore_command(path, facts[f"content{index}"].ok))
        if not changes:
            return Plan.ok(f"{len(wanted)} file{'s' if len(wanted) > 1 else ''} up to date")
        if validate[1]:
            # The validator's first complaint ends the message: that is the line the operator needs.
            changes.append(Change(validate[0], (
                f"if ! why=$({validate[1]} 2>&1); then {'; '.join(restores)}; "
                "first=$(printf '%s' \"$why\" | grep -v '^ *$' | head -n 1); "
                "echo \"validation failed, previous files restored${first:+: $first}\" >&2; exit 97; fi")))
        if then[1]:
            changes.append(Change(then[0], then[1]))
        return Plan.change(*changes)

    return Step(name, probes=probes, plan=plan)


def file_probes(path: str) -> dict[str, str]:
    """The facts file_step plans from, for steps that render content from other facts."""
    return {"content": f"cat -- {q(path)}", "meta": f"stat -c '%a %U:%G' -- {q(path)}"}


def line_step(name: str, path: str, line: str, *, replaces: str = "", mode: str = "0644") -> Step:
    """Ensure `line` is in `path`; lines matching the regex `replaces` are removed first."""

    def plan(facts: Facts) -> Plan:
        lines = facts["lines"].lines if facts["lines"].ok else []
        conflicting = [other for other in lines if other != line and replaces and re.search(replaces, other)]
        if line in lines and not conflicting:
            return Plan.ok(f"line present in {path}")
        if replaces:
            command = (
                f"touch {q(path)} && tmp=$(mktemp) && "
                f"{{ grep -vE -- {q(replaces)} {q(path)} || true; }} > \"$tmp\" && "
                f"printf '%s\\n' {q(line)} >> \"$tmp\" && chmod {q(mode)} \"$tmp\" && mv -f \"$tmp\" {q(path)}"
            )
        else:
            # A last line without its newline would otherwise get ours glued on.
            command = (
                f"if [ -s {q(path)} ] && [ -n \"$(tail -c 1 {q(path)})\" ]; then echo >> {q(path)}; fi; "
                f"printf '%s\\n' {q(line)} >> {q(path)}"
            )
        return Plan.change(Change(f"add line to {path}: {line}", command))

    return Step(name, probes={"lines": f"cat -- {q(path)}"}, plan=plan)


def packages_step(name: str, packages: Iterable[str]) -> Step:
    """Ensure Debian packages are installed (apt, non-interactive, waits for the dpkg lock)."""
    wanted = list(packages)

    def plan(facts: Facts) -> Plan:
        installed = {
            fields[0].split(":")[0]
            for fields in (line.split() for line in facts["status"].lines)
            if len(fields) >= 2 and fields[-1] == "installed"
        }
        missing = [p for p in wanted if p not in installed]
        if not missing:
            return Plan.ok(f"installed: {' '.join(wanted)}")
        return Plan.change(
            Change(
                f"apt install {' '.join(missing)}",
                f"{APT_INSTALL} {' '.join(q(p) for p in missing)}",
            )
        )

    probe = "dpkg-query -W -f='${Package} ${db:Status-Status}\\n' " + " ".join(q(p) for p in wanted)
    return Step(name, probes={"status": probe}, plan=plan)


def service_step(name: str, unit: str, *, enabled: bool = True, running: bool = True) -> Step:
    """Ensure a systemd unit is enabled and running."""

    def plan(facts: Facts) -> Plan:
        is_enabled = facts["enabled"].stdout.strip() in ("enabled", "static", "alias")
        is_active = facts["active"].stdout.strip() == "active"
        commands = []
        if enabled and not is_enabled:
            commands.append(Change(f"enable {unit}", f"systemctl enable {q(unit)}"))
        if running and not is_active:
            commands.append(Change(f"start {unit}", f"systemctl start {q(unit)}"))
        if not commands:
            return Plan.ok(f"{unit} enabled and running")
        return Plan.change(*commands)

    return Step(
        name,
        probes={"enabled": f"systemctl is-enabled {q(unit)}", "active": f"systemctl is-active {q(unit)}"},
        plan=plan,
    )


def _diff(path: str, old: str, new: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"{path} (host)", f"{path} (wanted)"))
