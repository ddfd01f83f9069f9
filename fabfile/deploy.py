"""deploy: ship one exact sha, gated, locked, recorded, reversible.

Runbook (`fab -H coachntt@HOST deploy --sha <sha>`):
    0. deploy lock          one release at a time (who/when if refused; --lock-wait N)
       preflight            checkout, env file, Docker, database container, disk:
                            any of them wrong stops here, nothing changed
    1. fetch                git fetch; the sha must exist (else exit 2, nothing changed)
       pre_deploy hook      optional; a failure stops here, nothing changed
    2. backup database      pg_dump before anything touches the schema
    3. checkout + build     exactly that sha; images tagged with it
    4. database up          PostgreSQL first, wait until healthy
    5. migrate              python -m scripts.migrate in the api container
    6. start                docker compose up -d
    7. health gate          /health must answer 200 before the deadline
    on failure after 3:     automatic rollback to the last good release
    always:                 a release log entry with the phase; the lock released
    after success:          optional post_deploy hook
    cut off (Ctrl-C, lost   every phase runs on the server where the client cannot
    connection, SIGTERM):   cut it; one Ctrl-C lets it finish and puts back what served
                            before, anything harsher leaves the lock held for
                            `deploy.recover`

`deploy.setup` prepares a host once (checkout, .env.production with generated
secrets, state and backup directories). `deploy.history` shows the release log,
`deploy.status` what runs now, `deploy.unlock` breaks a stale lock, and
`deploy.recover` settles a release that was cut off (see core/lock.py).
"""

from __future__ import annotations

import json
import shlex
import time

from invoke import Collection

from .core import backups, lock, state, templates
from .core.app import (
    App,
    fetch_sha,
    gate_and_record,
    health_gate,
    phase,
    preflight_error,
    release_facts,
    release_lock,
    report_failed_gate,
    settle,
    switch_to,
    validate_sha,
)
from .core.batch import gather
from .core.errors import LockHeldError, OpsError, UsageError
from .core.steps import Change, Facts, Plan, Step
from .core.target import Target
from .core.task import ops_task

# -- setup ------------------------------------------------------------------------


def directories_step(app: App) -> Step:
    wanted = {app.state_dir: "755", app.backup_dir: "700"}

    def plan(facts: Facts) -> Plan:
        changes = []
        for index, (path, mode) in enumerate(wanted.items()):
            if facts[f"d{index}"].stdout.strip() != f"{mode} {app.owner}":
                owner = shlex.quote(app.owner)
                changes.append(Change(f"directory {path} (mode {mode}, {app.owner})",
                                      f"install -d -m {mode} -o {owner} -g {owner} {shlex.quote(path)}"))
        return Plan.change(*changes) if changes else Plan.ok("state and backup directories ready")

    return Step(
        "state + backup directories",
        probes={f"d{i}": f"stat -c '%a %U' {shlex.quote(p)}" for i, p in enumerate(wanted)},
        plan=plan,
    )


def checkout_step(app: App) -> Step:
    owner = shlex.quote(app.owner)

    def plan(facts: Facts) -> Plan:
        if not facts["owner"].ok:
            return Plan.skipped(f"user {app.owner} missing: run `secure` first")
        if facts["git"].ok:
            return Plan.ok(f"{app.dir} is a checkout")
        if not app.repo:
            raise UsageError("missing config value 'app.repo'", "set COACHNTT_APP__REPO=<git url> in the env file")
        return Plan.change(Change(
            f"clone {app.repo} into {app.dir}",
            f"install -d -o {owner} -g {owner} {shlex.quote(app.dir)} && "
            f"sudo -n -u {owner} git clone --quiet -- {shlex.quote(app.repo)} {shlex.quote(app.dir)}",
        ))

    return Step("app checkout", probes={"owner": f"id -u {owner}", "git": f"test -d {shlex.quote(app.dir + '/.git')}"}, plan=plan)


def env_file_step(app: App) -> Step:
    env_path = f"{app.dir}/{app.env_file}"

    def plan(facts: Facts) -> Plan:
        if facts["env"].ok:
            return Plan.ok(f"{env_path} exists (never overwritten)")
        return Plan.change(Change(
            f"create {env_path} from .env.example with generated secrets (mode 600)",
            f"sh -c {shlex.quote(templates.script('make-env.sh'))} make-env "
            f"{shlex.quote(app.dir + '/.env.example')} {shlex.quote(env_path)} {shlex.quote(f'{app.owner}:{app.owner}')}",
        ))

    return Step("env file + secrets", probes={"env": f"test -e {shlex.quote(env_path)}"}, plan=plan)


@ops_task
def setup(ops):
    """First-time setup: checkout in app.dir, .env.production with generated secrets."""
    app = App.from_settings(ops.settings)
    ops.run_steps([directories_step(app), checkout_step(app)])
    ops.run_steps([env_file_step(app)])


# -- deploy -------------------------------------------------------------------------

# Phases that leave the running release as it was: a failure there needs no rollback.
PHASES_BEFORE_CHANGE = ("fetch", "pre_deploy hook", "backup database")


def migrate(target: Target, app: App, sha: str) -> str:
    """Run the migrations; return the schema version the app reports."""
    result = target.run(app.compose("run --rm -T api python -m scripts.migrate", sha), user=app.owner, timeout=600)
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    return last.split(":", 1)[1].strip() if last.startswith("schema version:") else ""


def backup_before_migrate(target: Target, app: App, sha: str, *, first_release: bool) -> str:
    """pg_dump before the schema can change (core/backups.py); '' only on a first
    release with no database container yet."""
    try:
        path, _ = backups.dump(target, app, "pre-" + sha[:12], min_free_mb=app.backup_min_free_mb, tool=backups.TOOL)
    except backups.NoDatabase:
        if first_release:
            return ""
        raise
    return path


def run_hook(ops, target: Target, app: App, name: str, release: state.Release) -> None:
    """An operator's hook (settings app.hooks.<name>), with the release in its environment."""
    command = ops.settings.get(f"app.hooks.{name}")
    if not command:
        return
    env = " ".join(
        f"{key}={shlex.quote(value)}"
        for key, value in (("COACHNTT_HOOK", name), ("COACHNTT_SHA", release.sha),
                           ("COACHNTT_PREVIOUS_SHA", release.previous), ("COACHNTT_WHO", release.who))
    )
    target.run(app.in_dir(f"{env} sh -c {shlex.quote(command)}"), user=app.owner, timeout=600)


@ops_task(default=True, help={
    "sha": "commit to deploy (default: tip of app.branch)",
    "message": "why this release, for the release log",
    "break_lock": "remove a deploy lock whose holder is gone (never one whose work still runs)",
    "lock_wait": "seconds to wait for another release to finish (default: refuse at once)",
})
def deploy(ops, sha="", message="", break_lock=False, lock_wait=0):
    """Deploy one exact sha: lock, preflight, fetch, backup, migrate, start, health gate, log."""
    sha = validate_sha(sha)
    if not message.isprintable():
        # The release log keeps one entry per line; its reader skips control characters.
        raise UsageError("--message must be one line of text", "leave out newlines and control characters")
    app = App.from_settings(ops.settings)
    if ops.dry:
        host = release_facts(ops.target, app)
        current = state.current_release(host.log)
        problem = preflight_error(host, app, ops.where)
        ops.reporter.info(f"  would deploy {sha or 'origin/' + app.branch} over {current.sha[:12] if current else 'nothing'}: "
                          "lock, preflight, fetch, backup, checkout + build, database up, migrate, start, health gate")
        if problem:
            ops.reporter.info(f"  but preflight refuses now: {problem.one_line()}")
        return

    if break_lock:
        lock.break_stale(ops.target, app.state_dir)
    with release_lock(ops, app, sha or app.branch, message, wait=int(lock_wait)) as held:
        # Read under the lock: with --lock-wait the log may have moved meanwhile.
        host = release_facts(ops.target, app)
        problem = preflight_error(host, app, ops.where)
        if problem:
            raise problem
        current = state.current_release(host.log)
        release = state.Release(sha=sha, kind="deploy", previous=current.sha if current else "",
                                who=state.operator(), started=state.now(), message=message)
        held.release = release if sha else None
        with phase(ops, held, "fetch"):
            release.sha = fetch_sha(held, app, sha)
        held.release = release

        if current and current.sha == release.sha and host.head == release.sha:
            check_live_release(ops, app, held, release)
        else:
            ship(ops, app, held, release, state.good_releases(host.log), first_release=current is None)


def check_live_release(ops, app: App, held: lock.HeldLock, release: state.Release) -> None:
    """Redeploying what already runs: only the health gate, and a log entry."""
    release.kind = "verify"
    unhealthy = OpsError(f"{release.sha[:12]} is live but unhealthy", "see the responses above; `rollback` to the previous good release")
    with phase(ops, held, "health gate", reason=f"{release.sha[:12]} already live: checked only"):
        gate_and_record(held, ops.reporter, app, release, unhealthy, log_target=ops.target)


def ship(ops, app: App, held: lock.HeldLock, release: state.Release, good: list[str], *, first_release: bool) -> None:
    """A new sha: hook, backup, checkout + build, database, migrate, start, gate."""
    sha = release.sha
    try:
        with phase(ops, held, "pre_deploy hook"):  # may veto: nothing has changed yet
            run_hook(ops, held, app, "pre_deploy", release)
        with phase(ops, held, "backup database"):
            release.backup = backup_before_migrate(held, app, sha, first_release=first_release)
        with phase(ops, held, "checkout + build"):
            held.run(app.in_dir(f"git checkout --quiet --force --detach {shlex.quote(sha)}"), user=app.owner, timeout=300)
            held.run(app.compose("build --quiet api", sha), user=app.owner, timeout=1800)
        with phase(ops, held, "database up"):
            held.run(app.compose("up -d --wait postgres", sha), user=app.owner, timeout=300)
        with phase(ops, held, "migrate"):
            release.schema = migrate(held, app, sha)
        with phase(ops, held, "start"):
            switch_to(held, app, sha)
        with phase(ops, held, "health gate"):
            gate = health_gate(held, app)
            if not gate.passed:
                report_failed_gate(ops.reporter, gate)
                raise OpsError(f"/health did not answer 200 within {app.health_deadline}s")
    except OpsError as exc:
        if exc.keeps_lock:  # cut off: nothing to roll back from here, recover settles it
            raise
        roll_back_after_failure(ops, app, held, release, good, exc)
    release.result, release.finished = state.RESULT_OK, state.now()
    state.append(ops.target, app.state_dir, release)
    ops.reporter.info(f"  live: {sha[:12]} (schema {release.schema or '?'}, backup {release.backup or 'none'})")
    try:
        with phase(ops, held, "post_deploy hook"):
            run_hook(ops, held, app, "post_deploy", release)
    except OpsError as exc:
        ops.reporter.info(f"  warning: the post_deploy hook failed ({exc.one_line()}); the release stays live")


def roll_back_after_failure(ops, app: App, held: lock.HeldLock, release: state.Release, good: list[str], exc: OpsError) -> None:
    """Log the failed attempt with its phase, put the last good release back when
    anything had changed, and raise one line that says where things stand."""
    failed_in, why = held.phase, exc.one_line()
    release.result, release.finished, release.message, release.phase = state.RESULT_FAILED, state.now(), why, failed_in
    fallback = next((sha for sha in good if sha != release.sha), "")
    what = f"release {release.sha[:12]} failed during {failed_in}: {exc.what}"
    if failed_in in PHASES_BEFORE_CHANGE:
        state.append(ops.target, app.state_dir, release)
        raise OpsError(what, f"{exc.hint + '; ' if exc.hint else ''}nothing changed, the running release serves on") from None
    if not fallback:
        state.append(ops.target, app.state_dir, release)
        raise OpsError(what, "no earlier good release to roll back to; fix and deploy again") from None
    try:
        with phase(ops, held, f"automatic rollback to {fallback[:12]}"):
            switch_to(held, app, fallback, recreate=True)
            gate = health_gate(held, app)
            if not gate.passed:
                report_failed_gate(ops.reporter, gate)
    except OpsError as rollback_exc:
        if rollback_exc.keeps_lock:
            raise
        release.message = f"{why}; the rollback to {fallback[:12]} failed too: {rollback_exc.one_line()}"
        state.append(ops.target, app.state_dir, release)
        raise OpsError(f"{what}; the rollback to {fallback[:12]} failed too ({rollback_exc.what})",
                       f"check `deploy.status`; then `rollback --to {fallback[:12]}`") from None
    release.rolled_back_to = fallback if gate.passed else ""
    state.append(ops.target, app.state_dir, release)
    if gate.passed:
        raise OpsError(what, f"rolled back to {fallback[:12]}, which is healthy") from None
    raise OpsError(f"{what}; the rollback to {fallback[:12]} is unhealthy too", "check `deploy.status` and the api logs now") from None


@ops_task(help={"wait": "seconds to wait for a phase that still runs on the server (default 600)"})
def recover(ops, wait=600):
    """Settle a release that was cut off: let its phase end, put back what served, log it, free the lock."""
    app = App.from_settings(ops.settings)
    adopted = lock.adopt(ops.target, app.state_dir)
    if adopted is None:
        ops.reporter.info("  the deploy lock is free: nothing to recover")
        return
    held, info = adopted
    for _ in range(5):  # a client that just died takes sshd a moment to notice
        if not info.client_connected or info.client_left:
            break
        time.sleep(1)
        info = lock.read(ops.target, app.state_dir) or info
    if info.client_connected and not info.client_left:
        raise LockHeldError(f"the release of {info.describe()} is still followed by its client",
                            "let it finish; `deploy.recover` is for a run that was cut off")
    if ops.dry:
        ops.reporter.info(f"  would settle the release of {info.describe()}")
        return
    if info.job == "running":
        ops.reporter.info(f"  waiting for '{info.phase}' to finish on the server (up to {int(wait)}s)")
        info = held.wait_for_phase(int(wait))
        if info.job == "running":
            raise LockHeldError(f"'{info.phase}' still runs under the deploy lock", "wait for it, then run `deploy.recover` again")
    healthy, outcome = settle(ops.target, ops.reporter, app, held, info)
    ops.reporter.info(f"  recovered: {outcome}")
    if not healthy:
        raise OpsError(f"recovered the lock, but {outcome}")


@ops_task
def history(ops):
    """The release log: every deploy and rollback attempt, newest last."""
    app = App.from_settings(ops.settings)
    log = release_facts(ops.target, app).log
    for r in log:
        extra = f" -> rolled back to {r.rolled_back_to[:12]}" if r.rolled_back_to else ""
        where = f" (during {r.phase})" if r.phase else ""
        ops.reporter.info(f"  {r.started or r.finished:<20} {r.kind:<8} {r.sha[:12]:<12} {r.result:<11} "
                          f"schema {r.schema or '-':<4} {r.who}{where}{extra}")
    if not log:
        ops.reporter.info("  no releases yet")
    if log.skipped:
        ops.reporter.info(f"  warning: skipped {log.skipped} unreadable line(s) of {state.log_path(app.state_dir)}")


@ops_task
def status(ops):
    """What runs now (the api's image, not just the checkout), health, and the deploy lock."""
    app = App.from_settings(ops.settings)
    facts = gather(ops.target, {
        "head": f"git -C {shlex.quote(app.dir)} rev-parse --short=12 HEAD",
        "running": app.compose("images --format json api"),
        "containers": app.compose("ps --format '{{.Service}} {{.State}} {{.Status}}'"),
        "health": f"curl -s -m 3 -o /dev/null -w '%{{http_code}}' {shlex.quote(app.health_url)}",
        "lock": lock.status_command(app.state_dir),
    }, sudo=False)
    ops.reporter.info(f"  running     {running_sha(facts['running'].stdout) or 'no api container'}")
    ops.reporter.info(f"  checkout    {facts['head'].stdout or 'no checkout'}")
    ops.reporter.info(f"  health      HTTP {facts['health'].stdout or '---'} from {app.health_url}")
    held = lock.LockInfo.parse(facts["lock"].stdout) if facts["lock"].ok else None
    ops.reporter.info(f"  lock        {held.describe() if held else 'free'}")
    for line in facts["containers"].lines:
        ops.reporter.info(f"  container   {line}")
    if facts["health"].stdout != "200":
        raise OpsError(f"the app on {ops.where} is not healthy", "see `deploy.history` and the api logs")


def running_sha(images_json: str) -> str:
    """The release the api container runs: its image is tagged with the sha."""
    try:
        images = json.loads(images_json or "[]")
    except json.JSONDecodeError:
        return ""
    tags = [image.get("Tag", "") for image in images if isinstance(image, dict)] if isinstance(images, list) else []
    return next((tag[:12] for tag in tags if tag and tag != "latest"), "")


@ops_task(help={"yes": "do not ask for confirmation"})
def unlock(ops, yes=False):
    """Break a deploy lock whose holder is gone (never one whose work still runs)."""
    app = App.from_settings(ops.settings)
    held = lock.read(ops.target, app.state_dir)
    if held is None:
        ops.reporter.info("  lock is free")
        return
    if not yes:
        raise UsageError(f"lock held by {held.describe()}", "rerun with --yes to break it")
    lock.break_stale(ops.target, app.state_dir)
    ops.reporter.info("  lock removed")


ns = Collection("deploy")
ns.add_task(deploy, default=True)
ns.add_task(setup)
ns.add_task(history)
ns.add_task(status)
ns.add_task(unlock)
ns.add_task(recover)
