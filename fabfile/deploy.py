"""deploy: ship one exact sha, gated, locked, recorded, reversible.

Runbook (`fab -H coachntt@HOST deploy --sha <sha>`):
    0. deploy lock          one release at a time (who/when if refused; --lock-wait N)
    1. fetch                git fetch; the sha must exist (else exit 2, nothing changed)
       pre_deploy hook      optional; a failure stops here, nothing changed
    2. backup database      pg_dump before anything touches the schema
    3. checkout + build     exactly that sha; images tagged with it
    4. database up          PostgreSQL first, wait until healthy
    5. migrate              python -m scripts.migrate in the api container
    6. start                docker compose up -d
    7. health gate          /health must answer 200 before the deadline
    on failure after 3:     automatic rollback to the last good release
    always:                 a release log entry; the lock released
    after success:          optional post_deploy hook

`deploy.setup` prepares a host once (checkout, .env.production with generated
secrets, state and backup directories). `deploy.history` shows the release log,
`deploy.status` what runs now, `deploy.unlock` breaks a stale lock.
"""

from __future__ import annotations

import shlex

from invoke import Collection

from .core import state, templates
from .core.app import (
    App,
    fetch_sha,
    gate_and_record,
    health_gate,
    release_facts,
    report_failed_gate,
    switch_to,
    validate_sha,
)
from .core.batch import gather
from .core.errors import OpsError, UsageError
from .core.steps import Change, Facts, Plan, Step
from .core.target import command_failed
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


def migrate(ops, app: App, sha: str) -> str:
    """Run the migrations; return the schema version the app reports."""
    result = ops.target.run(app.compose("run --rm -T api python -m scripts.migrate", sha), user=app.owner, timeout=600)
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    return last.split(":", 1)[1].strip() if last.startswith("schema version:") else ""


def backup_before_migrate(ops, app: App, sha: str) -> str:
    """pg_dump before the schema can change; '' on a first deploy (no database yet)."""
    result = ops.target.run(
        f"bash -c {shlex.quote(templates.script('backup-db.sh'))} backup-db "
        f"{shlex.quote(app.db_container)} {shlex.quote(app.db_user)} {shlex.quote(app.db_name)} "
        f"{shlex.quote(app.backup_dir)} {shlex.quote('pre-' + sha[:12])}",
        user=app.owner, check=False, timeout=1800,
    )
    if result.exit_status == 3:
        return ""
    if not result.ok:
        raise command_failed(result, ops.target.label, what="backup before migrate")
    return result.stdout.strip().splitlines()[-1]


def run_hook(ops, app: App, name: str, release: state.Release) -> None:
    """An operator's hook (settings app.hooks.<name>), with the release in its environment."""
    command = ops.settings.get(f"app.hooks.{name}")
    if not command:
        return
    env = " ".join(
        f"{key}={shlex.quote(value)}"
        for key, value in (("COACHNTT_HOOK", name), ("COACHNTT_SHA", release.sha),
                           ("COACHNTT_PREVIOUS_SHA", release.previous), ("COACHNTT_WHO", release.who))
    )
    with ops.reporter.phase(f"{name} hook"):
        ops.target.run(app.in_dir(f"{env} sh -c {shlex.quote(command)}"), user=app.owner, timeout=600)


def roll_back_after_failure(ops, app: App, release: state.Release, good: list[str], why: str) -> None:
    """Put the last good release back, log the failed attempt, and raise."""
    fallback = next((sha for sha in good if sha != release.sha), "")
    release.result, release.finished, release.message = state.RESULT_FAILED, state.now(), why
    if not fallback:
        state.append(ops.target, app.state_dir, release)
        raise OpsError(f"release {release.sha[:12]} failed: {why}", "no earlier good release to roll back to; fix and deploy again")
    with ops.reporter.phase(f"automatic rollback to {fallback[:12]}"):
        switch_to(ops.target, app, fallback, recreate=True)
        gate = health_gate(ops.target, app)
        if not gate.passed:
            report_failed_gate(ops.reporter, gate)
    release.rolled_back_to = fallback if gate.passed else ""
    state.append(ops.target, app.state_dir, release)
    if gate.passed:
        raise OpsError(f"release {release.sha[:12]} failed: {why}", f"rolled back to {fallback[:12]}, which is healthy")
    raise OpsError(f"release {release.sha[:12]} failed: {why}; the rollback to {fallback[:12]} is unhealthy too",
                   "check `deploy.status` and the api logs now")


@ops_task(default=True, help={
    "sha": "commit to deploy (default: tip of app.branch)",
    "message": "why this release, for the release log",
    "break_lock": "remove a stale deploy lock first (its holder is gone)",
    "lock_wait": "seconds to wait for another release to finish (default: refuse at once)",
})
def deploy(ops, sha="", message="", break_lock=False, lock_wait=0):
    """Deploy one exact sha: lock, fetch, backup, migrate, start, health gate, log."""
    sha = validate_sha(sha)
    if not message.isprintable():
        # The release log keeps one entry per line; its reader skips control characters.
        raise UsageError("--message must be one line of text", "leave out newlines and control characters")
    app = App.from_settings(ops.settings)
    log, head = release_facts(ops.target, app)
    current = state.current_release(log)
    good = state.good_releases(log)
    if ops.dry:
        ops.reporter.info(f"  would deploy {sha or 'origin/' + app.branch} over {current.sha[:12] if current else 'nothing'}: "
                          "lock, fetch, backup, checkout + build, database up, migrate, start, health gate")
        return

    with state.deploy_lock(ops.target, app.state_dir, sha or app.branch, message, break_stale=break_lock, wait=int(lock_wait)):
        with ops.reporter.phase("fetch"):
            full_sha = fetch_sha(ops.target, app, sha)
        release = state.Release(sha=full_sha, kind="deploy", previous=current.sha if current else "",
                                who=state.operator(), started=state.now(), message=message)

        if current and current.sha == full_sha and head == full_sha:
            check_live_release(ops, app, release)
        else:
            ship(ops, app, release, good)


def check_live_release(ops, app: App, release: state.Release) -> None:
    """Redeploying what already runs: only the health gate, and a log entry."""
    release.kind = "verify"
    unhealthy = OpsError(f"{release.sha[:12]} is live but unhealthy", "see the responses above; `rollback` to the previous good release")
    with ops.reporter.phase("health gate", reason=f"{release.sha[:12]} already live: checked only"):
        gate_and_record(ops.target, ops.reporter, app, release, unhealthy)


def ship(ops, app: App, release: state.Release, good: list[str]) -> None:
    """A new sha: hook, backup, checkout + build, database, migrate, start, gate."""
    sha = release.sha
    run_hook(ops, app, "pre_deploy", release)  # may veto: nothing has changed yet
    with ops.reporter.phase("backup database"):
        release.backup = backup_before_migrate(ops, app, sha)
    try:
        with ops.reporter.phase("checkout + build"):
            ops.target.run(app.in_dir(f"git checkout --quiet --detach {shlex.quote(sha)}"), user=app.owner)
            ops.target.run(app.compose("build --quiet api", sha), user=app.owner, timeout=1800)
        with ops.reporter.phase("database up"):
            ops.target.run(app.compose("up -d --wait postgres", sha), user=app.owner, timeout=300)
        with ops.reporter.phase("migrate"):
            release.schema = migrate(ops, app, sha)
        with ops.reporter.phase("start"):
            switch_to(ops.target, app, sha)
        with ops.reporter.phase("health gate"):
            gate = health_gate(ops.target, app)
            if not gate.passed:
                report_failed_gate(ops.reporter, gate)
                raise OpsError(f"/health did not answer 200 within {app.health_deadline}s")
    except OpsError as exc:
        roll_back_after_failure(ops, app, release, good, exc.one_line())
    release.result, release.finished = state.RESULT_OK, state.now()
    state.append(ops.target, app.state_dir, release)
    ops.reporter.info(f"  live: {sha[:12]} (schema {release.schema or '?'}, backup {release.backup or 'none'})")
    try:
        run_hook(ops, app, "post_deploy", release)
    except OpsError as exc:
        ops.reporter.info(f"  warning: the post_deploy hook failed ({exc.one_line()}); the release stays live")


@ops_task
def history(ops):
    """The release log: every deploy and rollback attempt, newest last."""
    app = App.from_settings(ops.settings)
    log, _ = release_facts(ops.target, app)
    for r in log:
        extra = f" -> rolled back to {r.rolled_back_to[:12]}" if r.rolled_back_to else ""
        ops.reporter.info(f"  {r.started or r.finished:<20} {r.kind:<8} {r.sha[:12]:<12} {r.result:<6} "
                          f"schema {r.schema or '-':<4} {r.who}{extra}")
    if not log:
        ops.reporter.info("  no releases yet")
    if log.skipped:
        ops.reporter.info(f"  warning: skipped {log.skipped} unreadable line(s) of {state.log_path(app.state_dir)}")


@ops_task
def status(ops):
    """Current sha, container states, health, and the deploy lock."""
    app = App.from_settings(ops.settings)
    facts = gather(ops.target, {
        "head": f"git -C {shlex.quote(app.dir)} rev-parse --short=12 HEAD",
        "containers": app.compose("ps --format '{{.Service}} {{.State}} {{.Status}}'"),
        "health": f"curl -s -m 3 -o /dev/null -w '%{{http_code}}' {shlex.quote(app.health_url)}",
        "lock": state.lock_status_command(app.state_dir),
    }, sudo=False)
    ops.reporter.info(f"  sha         {facts['head'].stdout or 'no checkout'}")
    ops.reporter.info(f"  health      HTTP {facts['health'].stdout or '---'} from {app.health_url}")
    ops.reporter.info(f"  lock        {facts['lock'].stdout.replace(chr(10), ', ') if facts['lock'].ok else 'free'}")
    for line in facts["containers"].lines:
        ops.reporter.info(f"  container   {line}")
    if facts["health"].stdout != "200":
        raise OpsError(f"the app on {ops.where} is not healthy", "see `deploy.history` and the api logs")


@ops_task(help={"yes": "do not ask for confirmation"})
def unlock(ops, yes=False):
    """Break a stale deploy lock (its holder is gone)."""
    app = App.from_settings(ops.settings)
    holder = ops.target.run(state.lock_status_command(app.state_dir), check=False)
    if not holder.ok:
        ops.reporter.info("  lock is free")
        return
    if not yes:
        raise UsageError(f"lock held: {holder.stdout.strip().replace(chr(10), ', ')}", "rerun with --yes to break it")
    with state.deploy_lock(ops.target, app.state_dir, "unlock", "break stale lock", break_stale=True):
        pass
    ops.reporter.info("  lock removed")


ns = Collection("deploy")
ns.add_task(deploy, default=True)
ns.add_task(setup)
ns.add_task(history)
ns.add_task(status)
ns.add_task(unlock)
