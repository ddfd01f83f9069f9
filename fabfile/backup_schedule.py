"""backup.schedule: the plan's backup schedule as systemd timers on the server;
backup.scheduled: what those timers run there.

Its own module (the tasks join the `backup` namespace in fabfile/__init__.py):
backup.py holds what a backup IS (dump, verify, restore, prune); this holds WHEN it
runs; together they would pass 500 lines, two rooms in one file.

Runbook (`fab -H coachntt@HOST backup.schedule [--remove]`):
    facts     the tool installed in /opt/coachntt-ops (else exit 2: run `tool.install`),
              the deploy user, state_dir, both calendar specs checked by the host's
              own `systemd-analyze calendar`, the unit files and timer states: one trip
    plan      coachntt-backup-db.{service,timer}     backup.db_schedule (daily 02:00)
              coachntt-backup-data.{service,timer}   backup.data_schedule (Sun 03:00)
              written when they differ, daemon-reload, timers enabled and started
              (restarted when their file changed); --remove: timers off, files gone
Each service is a oneshot as the deploy user: `flock` on <state_dir>/backup.lock (one
lock for both, so runs never overlap; a second waits) around the installed tool's
`inv backup.scheduled [--data]`; output to the journal, a failed run leaves the unit
failed, Persistent=true makes up a run missed while the server was off.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass

from . import backup, backup_copies, tool
from .core import backups, bundle, remote, server_settings, templates
from .core.errors import ConfigError, OpsError, UsageError
from .core.settings import Settings
from .core.steps import Change, Facts, Plan, Step, gather_facts
from .core.task import ops_task, run_body

UNIT_DIR = "/etc/systemd/system"
LOCK_WAIT = 3 * 3600  # seconds a run waits for the other one before it fails
TIMEOUT = "6h"  # well under a day: a stuck run never blocks the next day's
DELAY = "5min"
q = shlex.quote


@dataclass(frozen=True)
class Timer:
    name: str  # unit name without suffix
    what: str
    setting: str  # the backup.* setting holding its calendar spec
    args: str  # what the service runs with the installed inv

    def calendar(self, settings: Settings) -> str:
        return settings.require(f"backup.{self.setting}")


TIMERS = (
    Timer("coachntt-backup-db", "database", "db_schedule", "backup.scheduled"),
    Timer("coachntt-backup-data", "data directory", "data_schedule", "backup.scheduled --data"),
)


def units(settings: Settings) -> dict[str, str]:
    """path -> content of every unit file, rendered from configs/systemd/."""
    rendered = {}
    for timer in TIMERS:
        common = {"unit": timer.name, "what": timer.what}
        rendered[f"{UNIT_DIR}/{timer.name}.service"] = templates.render(
            "systemd/coachntt-backup.service.j2", **common, user=settings.require("deploy_user"), tool=tool.LINK,
            env=settings.env, env_file=server_settings.SETTINGS_FILE, lock=backups.run_lock(settings.require('state_dir')),
            lock_wait=LOCK_WAIT, args=timer.args, timeout=TIMEOUT)
        rendered[f"{UNIT_DIR}/{timer.name}.timer"] = templates.render(
            "systemd/coachntt-backup.timer.j2", **common, calendar=timer.calendar(settings), setting=timer.setting, delay=DELAY)
    return rendered


def probes(settings: Settings) -> dict[str, str]:
    found = {
        "tool": f"test -x {tool.LINK}/.venv/bin/inv && cat {tool.LINK}/{tool.MARKER}",
        "python": bundle.PYTHON_PROBE,
        "user": f"id -u {q(settings.require('deploy_user'))}",
        "state_dir": f"test -d {q(settings.require('state_dir'))}",
    }
    for index, path in enumerate(units(settings)):
        found.update({f"u{index}_{k}": v for k, v in remote.file_probes(path).items()})
    for timer in TIMERS:
        found[f"{timer.setting}_ok"] = f"systemd-analyze calendar -- {q(timer.calendar(settings))} 2>&1"
        found[f"{timer.name}_enabled"] = f"systemctl is-enabled {timer.name}.timer"
        found[f"{timer.name}_active"] = f"systemctl is-active {timer.name}.timer"
    return found


def refusal(settings: Settings, facts: Facts, where: str) -> OpsError | None:
    """Why the timers cannot be installed (nothing is changed), or None."""
    if not facts["tool"].ok:
        return UsageError(f"the tool is not installed on {where} ({tool.LINK})", "run `tool.install` first: the timers run it")
    if not facts["user"].ok:
        return UsageError(f"the deploy user {settings.get('deploy_user')} does not exist on {where}", "run `secure` first")
    if not facts["state_dir"].ok:
        return UsageError(f"{settings.get('state_dir')} is missing on {where}", "run `deploy.setup` first")
    for timer in TIMERS:
        answer = facts[f"{timer.setting}_ok"]
        if not answer.ok:
            said = answer.lines[-1].strip() if answer.lines else "refused"
            return ConfigError(f"backup.{timer.setting} must be a systemd calendar time (man systemd.time), "
                               f"got '{timer.calendar(settings)}': {said}", "fix it, e.g. '*-*-* 02:00:00' or 'Sun *-*-* 03:00:00'")
    return None


def plan_schedule(wanted: dict[str, str], facts: Facts) -> Plan:
    """Unit files written where they differ, then reload, enable, (re)start the timers."""
    changes, changed = [], set()
    for index, (path, content) in enumerate(wanted.items()):
        step_facts = {k: facts[f"u{index}_{k}"] for k in ("content", "meta")}
        plan = remote.file_step(path, path, content).plan(step_facts)
        changes += plan.changes
        if plan.changes:
            changed.add(path)
    if changed:
        changes.append(Change("systemctl daemon-reload", "systemctl daemon-reload"))
    for timer in TIMERS:
        unit = f"{timer.name}.timer"
        if facts[f"{timer.name}_enabled"].stdout.strip() != "enabled":
            changes.append(Change(f"enable {unit}", f"systemctl enable --quiet {unit}"))
        if facts[f"{timer.name}_active"].stdout.strip() != "active" or f"{UNIT_DIR}/{unit}" in changed:
            changes.append(Change(f"start {unit}", f"systemctl restart {unit}"))
    if not changes:
        return Plan.ok("timers enabled: " + ", ".join(f"{t.name} ({calendar_of(wanted, t)})" for t in TIMERS))
    return Plan.change(*changes)


def calendar_of(wanted: dict[str, str], timer: Timer) -> str:
    text = wanted.get(f"{UNIT_DIR}/{timer.name}.timer", "")
    return next((line.split("=", 1)[1] for line in text.splitlines() if line.startswith("OnCalendar=")), "?")


def plan_remove(wanted: dict[str, str], facts: Facts) -> Plan:
    """Timers stopped and disabled, unit files removed; a backup running now finishes."""
    present = [path for index, path in enumerate(wanted) if facts[f"u{index}_content"].ok]
    running = [t for t in TIMERS if facts[f"{t.name}_enabled"].stdout.strip() in ("enabled", "disabled")
               or facts[f"{t.name}_active"].stdout.strip() == "active"]
    if not present and not running:
        return Plan.ok("no backup timers")
    changes = [Change(f"stop and disable {t.name}.timer", f"systemctl disable --now --quiet {t.name}.timer") for t in running]
    if present:
        changes.append(Change(f"remove {', '.join(p.rsplit('/', 1)[1] for p in present)}",
                              f"rm -f {' '.join(q(p) for p in present)} && systemctl daemon-reload && "
                              f"{{ systemctl reset-failed {' '.join(t.name + '.service' for t in TIMERS)} 2>/dev/null || true; }}"))
    return Plan.change(*changes)


def timers_run(names: list[str]):
    def check(target) -> None:
        target.run(" && ".join(f"systemctl is-active --quiet {name}.timer" for name in names), sudo=True)

    return check


@ops_task(help={"remove": "stop the backup timers and remove their units"})
def schedule(ops, remove=False):
    """Backups on a schedule: systemd timers running the installed tool (db daily 02:00, data Sun 03:00)."""
    wanted = units(ops.settings)  # rendered, so bad settings stop here before any connection
    step = Step("backup timers", probes=probes(ops.settings))
    (facts,) = gather_facts(ops.target, [step])  # one round trip
    if remove:
        ops.apply([(step, plan_remove(wanted, facts))])
        return
    problem = refusal(ops.settings, facts, ops.where)
    if problem:
        raise problem
    python = bundle.parse_python(facts["python"].stdout)
    if python and facts["tool"].stdout.strip() != bundle.release_for(python).digest:
        ops.reporter.info(f"  warning: the tool on {ops.where} is not this checkout's: run `tool.install` so the timers run it")
    plan = plan_schedule(wanted, facts)
    ops.apply([(dataclasses.replace(step, check=timers_run([t.name for t in TIMERS])), plan)])


@ops_task(help={"data": "archive the data directory (app.data_dir) instead of dumping the database"})
def scheduled(ops, data=False):
    """What the backup timers run on the server: a backup, prune, the off-site copy when configured."""
    if data:
        run_body(backup.now, ops, label="weekly", data=True)
    else:
        run_body(backup.now, ops, label="daily")
    run_body(backup.prune, ops)  # only after a good backup: a failed one ends the run above
    push_offsite(ops)


def push_offsite(ops) -> None:
    """The off-site copy (backup.offsite's push), when backup.offsite_repo is set."""
    if not ops.settings.get("backup.offsite_repo"):
        return
    run_body(backup_copies.offsite_, ops)
