"""tool: this project, installed on the server, so `inv TASK` runs there too
(`cd /opt/coachntt-ops && inv backup.now`, the backup timers, CI over SSH).

Runbook (`fab -H coachntt@HOST tool.install`):
    facts     the server's python3 (version, machine), the installed release and the
              ones kept, the settings file, the `inv` commands: one round trip
    1. settings      /etc/coachntt-ops/settings.env (0640 root:<deploy user's group>):
                     your non-default COACHNTT_* settings without host and secrets
                     (core/server_settings.py); the tool there reads it
    2. release       when the digest of what would be installed (core/bundle.py)
                     differs from the installed one: wheels for the server's Python
                     fetched HERE (cached), one tarball uploaded, then
                     scripts/install-tool.sh: python3-venv if missing, a new venv from
                     those wheels only (no PyPI needed there), the new tool proven to
                     start as the deploy user, /opt/coachntt-ops switched to it by one
                     rename, the release before kept, older ones removed
    3. commands      /usr/local/bin/coachntt-inv always; /usr/local/bin/inv only when
                     absent or already ours (never someone else's)
A second run with nothing changed reports ok everywhere. `tool.status` compares.
"""

from __future__ import annotations

import dataclasses
import secrets
import shlex
import tempfile
from pathlib import Path

from invoke import Collection

from .core import bundle, redact, remote, server_settings, templates
from .core.errors import OpsError, UsageError
from .core.steps import Change, Facts, Plan, Step, gather_facts
from .core.task import ops_task

LINK = "/opt/coachntt-ops"
RELEASES = "/opt/coachntt-ops-releases"
MARKER = ".coachntt-release"
COMMANDS = ("/usr/local/bin/coachntt-inv", "/usr/local/bin/inv")
OURS = "coachntt-ops: `inv` of the tool"
q = shlex.quote

RELEASE_PROBES = {
    "python": bundle.PYTHON_PROBE,
    "venv": "python3 -c 'import ensurepip'",
    "link": f"if [ -L {LINK} ]; then readlink {LINK}; elif [ -e {LINK} ]; then echo 'not a link'; fi",
    "installed": f"cat {LINK}/{MARKER}",
    "releases": (f"for d in {RELEASES}/*/; do [ -f \"$d{MARKER}\" ] && "
                 f"printf '%s %s\\n' \"$(basename \"$d\")\" \"$(cat \"$d{MARKER}\")\"; done; true"),
}


def installed_digest(facts: Facts) -> str:
    return facts["installed"].stdout.strip() if facts["installed"].ok else ""


def unpacked(facts: Facts) -> dict[str, str]:
    """digest -> release directory name, for every complete release on the host."""
    found = {}
    for line in facts["releases"].lines:
        name, _, digest = line.partition(" ")
        if digest:
            found[digest.strip()] = name
    return found


def plan_release(release: bundle.Release, facts: Facts) -> Plan:
    """ok when the installed digest is the one we would install; else switch (already
    unpacked) or install. The task applies it: an install needs an upload first."""
    current = facts["link"].stdout.strip()
    before = f"; keep {current.rsplit('/', 1)[-1]}" if current and current != "not a link" else ""
    if current == "not a link":
        before = f"; keep the copy in {LINK} as a release"
    if installed_digest(facts) == release.digest:
        return Plan.ok(f"{release.name} installed (python {release.python.version} {release.python.arch})")
    if release.digest in unpacked(facts):
        return Plan.change(Change(f"switch {LINK} to {release.name} (unpacked already){before}", ""))
    venv = "" if facts["venv"].ok else "apt install python3-venv; "
    return Plan.change(Change(
        f"{venv}install {release.name} for python {release.python.version} {release.python.arch} in {RELEASES}/{release.name} "
        f"from {len(release.pins)} pinned dependencies (wheels built here), switch {LINK} to it{before}", ""))


def install_command(tarball: str, sha256: str, release: bundle.Release, user: str, env: str) -> str:
    args = [tarball, sha256, release.name, release.digest, user, env, server_settings.SETTINGS_FILE]
    return f"bash -c {q(templates.script('install-tool.sh'))} install-tool " + " ".join(q(a) for a in args)


def settings_step(content: str, user: str) -> Step:
    """The settings file, group-readable by the deploy user (its group comes from the host)."""
    path = server_settings.SETTINGS_FILE

    def plan(facts: Facts) -> Plan:
        if not facts["group"].ok:
            raise UsageError(f"the deploy user {user} does not exist on the host", "run `secure` first")
        group = facts["group"].stdout.strip()
        return remote.file_step("server settings", path, content, mode="0640", owner=f"root:{group}").plan(facts)

    return Step("server settings", probes={**remote.file_probes(path), "group": f"id -gn {q(user)}"}, plan=plan)


def command_step(path: str, content: str) -> Step:
    """An `inv` command on PATH: written when absent or ours, never over someone else's."""
    ours = remote.file_step(f"command {path}", path, content, mode="0755", owner="root:root")

    def plan(facts: Facts) -> Plan:
        if facts["content"].ok and OURS not in facts["content"].stdout:
            return Plan.skipped(f"{path} belongs to something else: use coachntt-inv")
        return ours.plan(facts)

    return Step(ours.name, probes=ours.probes, plan=plan)


def wrapper(env: str) -> str:
    return templates.render("tool/coachntt-inv.j2", link=LINK, env_file=server_settings.SETTINGS_FILE, env=env)


def server_python(ops, facts: Facts) -> bundle.ServerPython:
    python = bundle.parse_python(facts["python"].stdout) if facts["python"].ok else None
    if python is None:
        raise UsageError(f"no python3 on {ops.where}", "install it (apt install python3) and rerun")
    bundle.require_supported(python, ops.where)
    return python


@ops_task
def install(ops):
    """Install this project on the server (own venv, pinned wheels, no PyPI needed there); a rerun changes nothing."""
    user = ops.settings.require("deploy_user")
    content = server_settings.checked(ops.settings, ops.context.config.get("coachntt"))
    probe_step = Step("tool release", probes=RELEASE_PROBES)
    steps = [settings_step(content, user), probe_step, *(command_step(path, wrapper(ops.settings.env)) for path in COMMANDS)]
    facts = gather_facts(ops.target, steps)  # one round trip
    release = bundle.release_for(server_python(ops, facts[1]))
    steps[1] = dataclasses.replace(probe_step, plan=lambda f: plan_release(release, f))
    planned = [(step, step.plan(f)) for step, f in zip(steps, facts, strict=True)]
    for step, plan in planned:
        if step.name == "tool release" and plan.changes and not ops.dry:
            put_release(ops, release, user, fresh=release.digest not in unpacked(facts[1]))
        else:
            ops.apply([(step, plan)])


def put_release(ops, release: bundle.Release, user: str, *, fresh: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="coachntt-ops-bundle.") as workdir:
        with ops.reporter.phase("tool release", reason=release.name):
            tarball, sha = "-", "-"
            if fresh:
                built = bundle.build(release, Path(workdir), log=ops.reporter.info)
                tarball, sha = f"/tmp/coachntt-ops.{secrets.token_hex(8)}.tar", built.sha256
                ops.target.put_file(built.path, tarball)
            result = ops.target.run(install_command(tarball, sha, release, user, ops.settings.env),
                                    sudo=True, check=False, timeout=1800)
            if not result.ok:
                said = [line for line in result.stderr.splitlines() if line.strip()]
                raise OpsError(redact.redact(f"{said[-1] if said else f'install-tool.sh exited {result.exit_status}'} "
                                             f"(on {ops.where})"), f"nothing switched: {LINK} runs what it ran before")
    for line in result.stdout.strip().splitlines()[-1:]:
        ops.reporter.info(f"  {line}")


@ops_task
def status(ops):
    """The release installed on the server against this checkout's, and whether its settings match yours."""
    content = server_settings.render(ops.settings)
    probes = {**RELEASE_PROBES, **{f"settings_{k}": v for k, v in remote.file_probes(server_settings.SETTINGS_FILE).items()}}
    (facts,) = gather_facts(ops.target, [Step("tool", probes=probes)])
    release = bundle.release_for(server_python(ops, facts))
    names = unpacked(facts)
    installed = installed_digest(facts)
    info = ops.reporter.info
    if not installed:
        info(f"  installed  nothing in {LINK}: run `tool.install`")
    else:
        info(f"  installed  {names.get(installed, installed[:12])} in {LINK}")
    info(f"  yours      {release.name}: " + ("the same" if installed == release.digest else "differs: run `tool.install`"))
    kept = [name for digest, name in names.items() if digest != installed]
    if kept:
        info(f"  kept       {', '.join(sorted(kept))}")
    same = facts["settings_content"].ok and facts["settings_content"].stdout == content.rstrip("\n")
    info(f"  settings   {server_settings.SETTINGS_FILE} " + ("matches yours" if same else "differs from yours: run `tool.install`"))


ns = Collection("tool")
ns.add_task(install)
ns.add_task(status)
