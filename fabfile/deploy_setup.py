"""deploy.setup: prepare a host once for releases (`fab -H coachntt@HOST deploy.setup`).

    1. state + backup directories   state_dir (755) and backup.dir (700), the deploy user's
    2. app checkout                 app.repo cloned into app.dir as the deploy user
    3. env file + secrets           .env.production from .env.example, secrets generated on
                                    the server (mode 600); never overwritten once it exists

Idempotent: a second run changes nothing. The task is `deploy.setup` (fabfile/deploy.py).
"""

from __future__ import annotations

import shlex

from .core import templates
from .core.app import CODE_UMASK, App
from .core.errors import UsageError
from .core.steps import Change, Facts, Plan, Step
from .core.task import ops_task


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
            # umask inside sudo: sudo's PAM session sets login.defs' umask again.
            f"sudo -n -u {owner} sh -c "
            + shlex.quote(f"{CODE_UMASK} && exec git clone --quiet -- {shlex.quote(app.repo)} {shlex.quote(app.dir)}"),
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
