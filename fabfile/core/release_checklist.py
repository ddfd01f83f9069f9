"""The release checklist as data: its phases in order, what a failure in each one
means for the service (the rollback decision), which monitor checks gate a release,
and the summary. Pure, so every decision is tested without a host (fabfile/release.py
runs it).

    preflight   nothing has changed: a failure here needs no rollback
    backup      nothing has changed yet: the release stops, the old one serves on
    staging     the same sha on staging first (skipped, with the reason, when not set up)
    deploy      build, migrate, start, gate, switch (deploy's cutover)
    verify      monitor.check's checks on the new release
    watch       monitor.watch's 5xx share and /health for release.watch_seconds
    drain       only once the release held: the old slot drains and stops

From the deploy phase on, a failure puts the release before back: while the old
slot still runs (it stays up until the watch passed) that is nginx switched back to
it, at once; when a breaking release had stopped it, its database backup is
restored first and it starts again behind its health gate.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from . import checks

PHASES = ("preflight", "backup", "staging", "deploy", "verify", "watch", "drain")
# A failure in these leaves the service exactly as it was.
CHANGES_NOTHING = ("preflight", "backup", "staging")


# The monitor checks a preflight judges (the host can take a release), and the one a
# verify only shows: a release's own build loads the CPU, sustained load is monitor's call.
PREFLIGHT_CHECKS = ("disk", "memory", "certificate")
VERIFY_WARN_ONLY = ("cpu",)
# On a first release there was no database to back up: no backup yet is expected, not a failure.
FIRST_RELEASE_WARN_ONLY = ("backup age",)


@dataclass(frozen=True)
class PhaseResult:
    name: str
    status: str  # ok | changed | skipped | failed | would change | interrupted
    seconds: float = 0.0
    reason: str = ""


def not_run(results: list[PhaseResult], why: str) -> list[PhaseResult]:
    """The phases after the last one reported, each skipped with `why`: the table names every phase."""
    done = {r.name for r in results}
    return [PhaseResult(name, "skipped", 0.0, why) for name in PHASES if name not in done]


# -- which checks gate -------------------------------------------------------------


def preflight_verdict(found: list[checks.Check]) -> tuple[list[checks.Check], list[checks.Check]]:
    """(failures, warnings) among the checks a preflight judges. A missing certificate is a
    warning unless monitor.certificate_missing says fail, exactly as in monitor.check."""
    judged = [c for c in found if c.name.split(" ")[0] in PREFLIGHT_CHECKS]
    return [c for c in judged if c.status == checks.FAIL], [c for c in judged if c.status == checks.WARN]


def verify_verdict(found: list[checks.Check], first_release: bool = False) -> tuple[list[checks.Check], list[checks.Check]]:
    """(failures, warnings): every check of monitor.check must pass; CPU only warns, and so
    does the backup age on a first release (nothing existed to back up)."""
    warn_only = VERIFY_WARN_ONLY + (FIRST_RELEASE_WARN_ONLY if first_release else ())
    failures = [c for c in found if c.status == checks.FAIL and c.name not in warn_only]
    warnings = [c for c in found if c.status == checks.WARN or (c.status == checks.FAIL and c.name in warn_only)]
    return failures, warnings


def words(found: list[checks.Check]) -> str:
    return "; ".join(f"{c.name}: {c.detail}" for c in found)


# -- the rollback decision ------------------------------------------------------------


@dataclass(frozen=True)
class Recovery:
    """What puts the release before back after a failure, in order (empty: nothing to do)."""

    steps: tuple[str, ...]
    restore_database: bool
    why: str

    @property
    def needed(self) -> bool:
        return bool(self.steps)


RESTORE = "restore database"
START_OLD = "start old slot"
GATE_OLD = "health gate old slot"
SWITCH_BACK = "switch back"
STOP_NEW = "stop new slot"
CHECKOUT_OLD = "checkout old sha"


def recovery_for(failed: str, *, nginx_moved: bool, old_running: bool, new_running: bool, breaking_migrated: bool,
                 fallback: str, backup: str) -> Recovery:
    """How to undo a release that failed in phase `failed`. Pure.

    nginx_moved        nginx no longer sends the api to the old slot (switched, or the
                       503 page of a breaking release)
    old_running        the slot of the release before still runs: warm, no start, no gate
    new_running        the new release's slot runs (stopped once nginx is back)
    breaking_migrated  migrations declared breaking have run: only then is the database
                       restored (expand/contract ones leave a schema the old release runs on)
    """
    if failed in CHANGES_NOTHING:
        return Recovery((), False, "nothing had changed: the release before serves on")
    if not fallback:
        return Recovery((), False, "no release served before this one: nothing to go back to")
    restore = breaking_migrated and bool(backup)
    steps: list[str] = [RESTORE] if restore else []
    steps.append(CHECKOUT_OLD)
    if not old_running:
        steps += [START_OLD, GATE_OLD]
    if nginx_moved or not old_running:
        steps.append(SWITCH_BACK)  # also takes a breaking release's 503 page off
    if new_running:
        steps.append(STOP_NEW)
    if breaking_migrated and not backup:
        why = "breaking migrations ran but no backup was taken: the old release runs on the new schema"
    elif restore:
        why = "its migrations were declared breaking: the database went back to the backup taken before"
    elif old_running:
        why = "the old slot still ran: nginx went straight back to it"
    else:
        why = "the old slot had stopped: started again behind its health gate"
    return Recovery(tuple(steps), restore, why)


# -- what a release tells --------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    host: str
    result: str  # ok | failed | rolled back | verified | dry
    sha_before: str
    sha_after: str
    backup: str
    url: str
    phases: tuple[PhaseResult, ...]
    failed_phase: str = ""
    why: str = ""


def table(summary: Summary) -> list[str]:
    """The summary a person reads at the end of a release."""
    lines = [f"  {'phase':<10} {'result':<13} {'time':>8}"]
    for p in summary.phases:
        label = "FAILED" if p.status == "failed" else p.status
        lines.append(f"  {p.name:<10} {label:<13} {p.seconds:7.1f}s" + (f"  {p.reason}" if p.reason else ""))
    lines += [
        f"  sha before  {summary.sha_before[:12] or '-'}",
        f"  sha after   {summary.sha_after[:12] or '-'}" + ("" if summary.sha_after != summary.sha_before else " (unchanged)"),
        f"  backup      {summary.backup or 'none'}",
        f"  url         {summary.url}",
        f"  result      {summary.result}" + (f" (failed during {summary.failed_phase}: {summary.why})" if summary.failed_phase else ""),
    ]
    return lines


def summary_record(summary: Summary) -> str:
    """--json: the release as one object after its phases."""
    data = asdict(summary)
    data["phases"] = {p.name: p.status for p in summary.phases}
    return json.dumps({"release": data})


def log_phases(results: list[PhaseResult]) -> dict:
    """What the release log keeps of the phases (its `extra`): a list, in the order they ran
    (the log's keys are sorted)."""
    return {"phases": [{"phase": p.name, "result": p.status, "seconds": round(p.seconds, 1)} for p in results]}
