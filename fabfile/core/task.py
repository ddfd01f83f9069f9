"""The task decorator: every task gets the same flags, the same `ops` handle,
and the same one-line error handling under both `fab` and `inv`.

    @ops_task(help={"sha": "commit to deploy"})
    def deploy(ops, sha=""):
        ops.run_steps([...])

`ops` carries the settings, the target (connected on first use, so argument
validation happens before any connection), the reporter and the plan flag.
Every task accepts --dry (print the plan, change nothing), --diff and --json.
"""

from __future__ import annotations

import functools
import inspect
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fabric import Connection
from fabric import task as fabric_task
from invoke.exceptions import Exit

from . import fleet as fleets
from . import layout, redact
from . import settings as settings_module
from .errors import EXIT_INTERRUPTED, OpsError, Stop, from_connection_failure
from .steps import Plan, Reporter, Step, apply_steps, plan_steps, run_steps
from .target import Target, target_for

COMMON_HELP = {
    "dry": "show what would change (reads facts only, changes nothing)",
    "json": "print one JSON object per line for machines",
    "diff": "with --dry (or a real run): show the content changes of files",
}


class Ops:
    """What a task body works with: settings, target, reporter, dry flag."""

    def __init__(self, context: Any, *, dry: bool = False, json: bool = False, diff: bool = False,
                 settings: settings_module.Settings | None = None):
        self.context = context
        self.dry = dry
        self.json = json
        self.diff = diff
        self.settings = settings if settings is not None else settings_module.from_context(context)
        self._target: Target | None = None
        self._trips_before = 0  # a connection kept for the whole run has counted earlier tasks' trips
        self._reporter: Reporter | None = None

    @property
    def where(self) -> str:
        host = getattr(self.context, "host", None)
        if host:
            user = getattr(self.context, "user", "")
            port = getattr(self.context, "port", 22)
            # The port too when not 22, as RemoteTarget's label: hosts behind one address differ by it.
            where = f"{user}@{host}" if user else host
            return f"{where}:{port}" if port != 22 else where
        return self.settings.get("host") or "localhost"

    @property
    def target(self) -> Target:
        if self._target is None:
            self._target = target_for(self.context, self.settings)
            self._trips_before = self._target.round_trips
        return self._target

    @property
    def round_trips(self) -> int:
        """Commands this task has sent to its host so far."""
        return self._target.round_trips - self._trips_before if self._target is not None else 0

    @property
    def reporter(self) -> Reporter:
        if self._reporter is None:
            self._reporter = Reporter(self.where, json=self.json, show_diff=self.diff)
        return self._reporter

    def run_steps(self, steps: list[Step]) -> dict[str, Plan]:
        """Facts (one round trip), plans, then apply unless --dry."""
        return run_steps(self.target, steps, self.reporter, dry=self.dry)

    def plan(self, steps: list[Step]) -> list[tuple[Step, Plan]]:
        """Facts and plans only, for tasks that must look before they leap."""
        return plan_steps(self.target, steps)

    def apply(self, planned: list[tuple[Step, Plan]]) -> None:
        apply_steps(self.target, planned, self.reporter, dry=self.dry)

    def finish(self) -> None:
        if self._reporter is not None and self._target is not None and self._reporter.reported_steps:
            self._reporter.summary(self.round_trips)
        if self._target is not None:
            self._target.close()  # a connection kept for the run's later tasks stays open (core/target.py)


@contextmanager
def ops_at(c: Any, login: str, settings: settings_module.Settings, *, dry: bool = False, json: bool = False,
           diff: bool = False) -> Iterator[Ops]:
    """An `ops` for another host (user@host[:port]) with this run's SSH options and key,
    finished (its summary, its connection kept for the run) when the block ends: a task
    body run per host (core/fleet.py, a rolling release)."""
    ops = Ops(Connection(login, config=c.config.clone()), dry=dry, json=json, diff=diff, settings=settings)
    try:
        yield ops
    finally:
        ops.finish()


def ops_task(*args: Any, fleet: str | None = None, **kwargs: Any) -> Any:
    """Like @task, for bodies that take `ops` instead of a Context.

    `fleet=READS` / `fleet=CHANGES` (core/fleet.py): given several hosts (fab -H a,b or
    roles.*), the body runs on each of them in parallel, with one verdict."""

    def decorate(body: Callable[..., Any]) -> Any:
        @functools.wraps(body)
        def run(c: Any, *a: Any, dry: bool = False, json: bool = False, diff: bool = False, **kw: Any) -> Any:
            if fleet is not None and not isinstance(c, Connection):
                hosts = getattr(c, "fleet_hosts", None)
                if hosts is not None or _layout_set(c):
                    return run_fleet(c, body, fleet, hosts, a, kw, dry=dry, json=json, diff=diff)
            ops = None
            try:
                with signals_as_stop():
                    ops = Ops(c, dry=dry, json=json, diff=diff)
                    return body(ops, *a, **kw)
            except KeyboardInterrupt as stop:
                # Tasks that change a release catch it themselves (core/app.py release_lock).
                name = getattr(stop, "signal_name", "SIGINT")
                raise Exit(f"error: interrupted ({name}) on {ops.where if ops else 'localhost'}; "
                           "rerun the task: each step checks the host again before changing it", code=EXIT_INTERRUPTED) from None
            except Exception as exc:
                raise as_exit(exc, ops.where if ops else "localhost") from None
            finally:
                if ops is not None:
                    ops.finish()

        # invoke reads the signature to build CLI flags: the body's own
        # parameters (minus `ops`) plus the flags every task shares.
        params = list(inspect.signature(body).parameters.values())[1:]
        shared = [
            inspect.Parameter("dry", inspect.Parameter.KEYWORD_ONLY, default=False),
            inspect.Parameter("json", inspect.Parameter.KEYWORD_ONLY, default=False),
            inspect.Parameter("diff", inspect.Parameter.KEYWORD_ONLY, default=False),
        ]
        context = inspect.Parameter("c", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        run.__signature__ = inspect.Signature([context, *params, *shared])  # type: ignore[attr-defined]
        run.fleet = fleet  # type: ignore[attr-defined]
        kwargs["help"] = {**COMMON_HELP, **kwargs.get("help", {})}
        return fabric_task(run, **kwargs)

    if len(args) == 1 and callable(args[0]) and not kwargs:
        return decorate(args[0])
    return decorate


def _layout_set(c: Any) -> bool:
    """Whether roles.* name hosts: then a fleet task without -H runs on all of them."""
    try:
        settings = settings_module.from_context(c)
    except OpsError:
        return False  # the task's own run reports the bad setting: one line, exit 2
    return bool(layout.role_hosts(settings.get("roles") or {}))


def run_fleet(c: Any, body: Callable[..., Any], kind: str, given: list[str] | None, args: tuple, kwargs: dict,
              *, dry: bool, json: bool, diff: bool) -> None:
    """`body` on every host (the -H list, else the layout's), in parallel: one table (or
    JSON per host), one line on stderr and the worst host's exit code when any fails."""
    module, name = body.__module__.rsplit(".", 1)[-1], body.__name__
    task = module if name == module else f"{module}.{name}"
    started = time.monotonic()
    try:
        with signals_as_stop():
            # Every setting and every host is checked before the first connection (exit 2).
            settings = settings_module.from_context(c)
            members = layout.check(settings.get("roles") or {})
            hosts = layout.hosts_given(given, members) if given is not None else members

            def on_host(member: layout.Member) -> None:
                with ops_at(c, member.login.login, settings, dry=dry, json=json, diff=diff) as ops:
                    body(ops, *args, **kwargs)

            results = fleets.run(hosts, on_host, parallel=int(settings.require(fleets.PARALLEL_SETTING[kind])))
    except KeyboardInterrupt as stop:
        results = getattr(stop, "results", None)
        if results is not None:
            show_fleet(results, task, time.monotonic() - started, json=json)
        name = getattr(stop, "signal_name", "SIGINT")
        raise Exit(f"error: interrupted ({name}): hosts not started yet were left alone, the running ones finished "
                   f"{task}; rerun it: each step checks its host again before changing it", code=EXIT_INTERRUPTED) from None
    except Exception as exc:
        raise as_exit(exc, "several hosts") from None
    show_fleet(results, task, time.monotonic() - started, json=json)
    code = fleets.exit_code(results)
    if code:
        raise Exit(redact.redact(f"error: {fleets.verdict(results, task, json=json)}"), code=code)


def show_fleet(results: list[fleets.HostResult], task: str, seconds: float, *, json: bool) -> None:
    lines = fleets.json_lines(results, task, seconds) if json else fleets.table(results, task, seconds)
    for line in lines:
        print(redact.redact(line), flush=True)


@contextmanager
def signals_as_stop() -> Iterator[None]:
    """SIGTERM (a cancelled CI job) and SIGHUP (a closed terminal) stop a task the
    way Ctrl-C does, so it can leave the server in order instead of dying mid-step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def as_exit(exc: Exception, where: str) -> Exception:
    """An OpsError (or a connection failure we recognise) -> invoke's Exit: one line, a code."""
    error = exc if isinstance(exc, OpsError) else from_connection_failure(exc, where)
    if error is None:
        return exc
    return Exit(redact.redact(f"error: {error.one_line()}"), code=error.exit_code)


def run_body(task: Any, ops: Ops, *args: Any, **kwargs: Any) -> Any:
    """Run another task's body with this task's `ops` (same settings, target and
    reporter), for tasks made of tasks: errors stay OpsErrors for the caller."""
    return task.body.__wrapped__(ops, *args, **kwargs)
