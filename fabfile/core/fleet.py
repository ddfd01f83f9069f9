"""One task on several hosts at once: which hosts, in parallel, one verdict.

    fab -H coachntt@10.0.0.11,coachntt@10.0.0.12,coachntt@10.0.0.13 monitor.check
    fab monitor.check              # with roles.* set: every host of the layout (core/layout.py)

Tasks declared with `@ops_task(fleet=READS)` (monitor.check, secure.audit, deps.check,
ssl.status, deploy.status) or `fleet=CHANGES` (secure, deps, nginx) run their body once per
host, each in a worker thread over its own connection, at most `fleet.parallel_reads` /
`fleet.parallel_changes` hosts at a time. Every host ends ok, failed (its one line) or
unreachable (cannot reach or log in: exit 3); one host that fails never stops the others.
What a host's body prints is kept per host: `--json` prints each host's objects in host
order, then one object per host; a person gets one table, a row per host. The exit code
is the highest of the hosts' (1 failed, 3 unreachable, ...), 0 when all are ok.

Fabric itself runs `fab -H a,b task` as one call per host, one after another
(fabric.executor.Executor.expand_calls). FleetExecutor (invoke.yaml's
`tasks.executor_class`) gathers a fleet task's per-host calls back into one call that
carries the host list, so the body runs once per host, in parallel, and never twice.
One host given is today's path, unchanged.
"""

from __future__ import annotations

import io
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import invoke
from fabric.executor import Executor as FabricExecutor
from fabric.tasks import ConnectionCall
from invoke import Call, Context

from . import redact
from .errors import EXIT_CONNECT, EXIT_INTERRUPTED, OpsError, from_connection_failure
from .layout import Member

READS, CHANGES = "reads", "changes"
OK, FAILED, UNREACHABLE, NOT_RUN = "ok", "failed", "unreachable", "not run"
# How many hosts at once, by kind of task.
PARALLEL_SETTING = {READS: "fleet.parallel_reads", CHANGES: "fleet.parallel_changes"}


@dataclass
class HostResult:
    member: Member
    status: str = NOT_RUN
    exit_code: int = 0
    line: str = ""  # the error's one line (failed, unreachable)
    output: list[str] = field(default_factory=list)  # what the task printed for this host
    started: float = 0.0  # seconds after the run began (hosts past the fan-out bound wait their turn)
    seconds: float = 0.0

    @property
    def host(self) -> str:
        return self.member.login.login

    @property
    def summary(self) -> str:
        """The row's detail: the error line, else the task's last line without its `host: ` prefix."""
        if self.status != OK:
            return self.line or "not started (the run was interrupted)"
        last = next((line.strip() for line in reversed(self.output) if line.strip() and not line.startswith("{")), "done")
        where, said, rest = last.partition(": ")
        return rest if said and " " not in where and (self.member.login.host in where) else last


def outcome(exc: BaseException | None, where: str) -> tuple[str, int, str]:
    """(status, exit code, line) for a host's body that ended with `exc` (None: ok).
    An exception we do not recognise (a bug) is re-raised by `run` after every host ended."""
    if exc is None:
        return OK, 0, ""
    error = exc if isinstance(exc, OpsError) else from_connection_failure(exc, where)
    if error is None:
        return FAILED, 1, ""
    status = UNREACHABLE if error.exit_code == EXIT_CONNECT else FAILED
    return status, error.exit_code, redact.redact(error.one_line())


# -- output, kept per host ------------------------------------------------------------


class PerThreadStdout(io.TextIOBase):
    """sys.stdout while hosts run: a worker thread's lines go to its host's buffer, the
    main thread's to the real stdout, so hosts' output never interleaves."""

    def __init__(self, real: Any):
        self.real = real
        self.local = threading.local()

    def capture(self, buffer: io.StringIO | None) -> None:
        self.local.buffer = buffer

    def write(self, text: str) -> int:
        buffer = getattr(self.local, "buffer", None)
        return (buffer or self.real).write(text)

    def flush(self) -> None:
        if getattr(self.local, "buffer", None) is None:
            self.real.flush()

    def isatty(self) -> bool:
        return False  # a host's lines are shown later, in a table or as JSON: never colour


# -- running -------------------------------------------------------------------------


def run(members: Sequence[Member], work: Callable[[Member], Any], *, parallel: int) -> list[HostResult]:
    """`work(member)` for every member, at most `parallel` at once; results in member order.

    Ctrl-C (or SIGTERM, raised here as KeyboardInterrupt) starts no further host, lets the
    running ones finish their task and re-raises; their results are kept on the exception
    (`results`) so the caller can still show them."""
    results = [HostResult(member) for member in members]
    stdout = PerThreadStdout(sys.stdout)
    bugs: list[BaseException] = []
    began = time.monotonic()

    def one(result: HostResult) -> None:
        buffer = io.StringIO()
        stdout.capture(buffer)
        started = time.monotonic()
        result.started = round(started - began, 3)
        try:
            work(result.member)
            error: BaseException | None = None
        except Exception as exc:  # each host's failure is its own row
            error = exc
        finally:
            stdout.capture(None)
            result.seconds = round(time.monotonic() - started, 3)
            result.output = buffer.getvalue().splitlines()
        result.status, result.exit_code, result.line = outcome(error, result.host)
        if error is not None and not result.line:
            bugs.append(error)
            result.line = f"internal error: {type(error).__name__}: {redact.redact(str(error))}"

    previous, sys.stdout = sys.stdout, stdout
    pool = ThreadPoolExecutor(max_workers=max(1, min(parallel, len(members))), thread_name_prefix="fleet")
    try:
        futures: list[Future] = []
        try:
            for r in results:
                futures.append(pool.submit(one, r))
            pending = set(futures)
            while pending:  # short waits: Ctrl-C reaches this thread between them
                _, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
        except KeyboardInterrupt as stop:
            for future in futures:
                future.cancel()  # hosts not started yet stay "not run"
            wait([f for f in futures if not f.cancelled()])
            stop.results = results  # type: ignore[attr-defined]
            raise
    finally:
        pool.shutdown(wait=True)
        sys.stdout = previous
    if bugs:
        raise bugs[0]  # a bug shows its traceback, as on one host
    return results


def exit_code(results: Sequence[HostResult]) -> int:
    """The worst host's: the highest exit code; interrupted when a host never ran."""
    if any(r.status == NOT_RUN for r in results):
        return EXIT_INTERRUPTED
    return max((r.exit_code for r in results), default=0)


def counts(results: Sequence[HostResult]) -> dict[str, int]:
    found = {status: sum(1 for r in results if r.status == status) for status in (OK, FAILED, UNREACHABLE)}
    if any(r.status == NOT_RUN for r in results):
        found[NOT_RUN] = sum(1 for r in results if r.status == NOT_RUN)
    return found


# -- rendering -----------------------------------------------------------------------


def table(results: Sequence[HostResult], task: str, seconds: float) -> list[str]:
    """One row per host for people, then the count."""
    rows = [(r.host, ",".join(r.member.roles) or "-", r.status, f"{r.seconds:.1f}s", r.summary) for r in results]
    head = ("HOST", "ROLES", "RESULT", "TIME", task)
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(4)]
    lines = []
    for row in [head, *rows]:
        lines.append("  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4])
    found = counts(results)
    lines.append(f"{task} on {len(results)} hosts in {seconds:.1f}s: " + ", ".join(f"{n} {status}" for status, n in found.items()))
    return lines


def json_lines(results: Sequence[HostResult], task: str, seconds: float) -> list[str]:
    """Each host's own objects (they name their host), in host order; then one object per
    host with its result; then the run's counts."""
    lines = [line for r in results for line in r.output if line.startswith("{")]
    for r in results:
        lines.append(json.dumps({"host": r.host, "roles": list(r.member.roles), "task": task, "result": r.status,
                                 "exit_code": r.exit_code, "error": r.line, "started": r.started,
                                 "seconds": r.seconds}))
    lines.append(json.dumps({"task": task, "hosts": len(results), **counts(results), "seconds": round(seconds, 3),
                             "exit_code": exit_code(results)}))
    return lines


def verdict(results: Sequence[HostResult], task: str, *, json: bool) -> str:
    """The one line on stderr when some host did not pass."""
    parts = []
    for status in (FAILED, UNREACHABLE, NOT_RUN):
        hosts = [r.host for r in results if r.status == status]
        if hosts:
            parts.append(f"{len(hosts)} {status} ({', '.join(hosts)})")
    bad = sum(1 for r in results if r.status != OK)
    where = "in its JSON object" if json else "in the table above"
    return f"{task}: {bad} of {len(results)} hosts did not pass: {'; '.join(parts)}; each host's line is {where}"


# -- Fabric's per-host calls, gathered ---------------------------------------------------


class FleetContext(Context):
    """The context a fleet task gets for `fab -H a,b,...`: the config and the hosts given."""

    def __init__(self, config: Any, hosts: Sequence[str]):
        super().__init__(config=config)
        self.fleet_hosts = list(hosts)


class FleetCall(Call):
    """One call of a fleet task for several hosts (instead of Fabric's call per host)."""

    def __init__(self, task: Any, hosts: Sequence[str], **kwargs: Any):
        super().__init__(task, **kwargs)
        self.hosts = list(hosts)

    def clone_kwargs(self) -> dict[str, Any]:
        return {**super().clone_kwargs(), "hosts": self.hosts}

    def make_context(self, config: Any) -> FleetContext:
        return FleetContext(config, self.hosts)


def fleet_kind(task: Any) -> str | None:
    return getattr(getattr(task, "body", None), "fleet", None)


def gather(calls: Sequence[Call], hosts: Sequence[str]) -> list[Call]:
    """Fabric's expansion for `-H hosts`, with each fleet task's run of per-host calls (one
    per host given, in order, same arguments) turned back into one FleetCall. Other tasks,
    and every task when one host is given, keep Fabric's calls."""
    gathered: list[Call] = []
    hosts, i = list(hosts), 0
    while i < len(calls):
        run = calls[i:i + len(hosts)]
        first = run[0]
        if (len(hosts) > 1 and len(run) == len(hosts) and fleet_kind(first.task) is not None
                and all(isinstance(c, ConnectionCall) and c.init_kwargs == {"host": h} and c.task is first.task
                        and c.args == first.args and c.kwargs == first.kwargs for c, h in zip(run, hosts, strict=True))):
            gathered.append(FleetCall(first.task, hosts, called_as=first.called_as, args=first.args, kwargs=first.kwargs))
            i += len(hosts)
        else:
            gathered.append(first)
            i += 1
    return gathered


class FleetExecutor(FabricExecutor):
    """Fabric's executor under `fab`, gathering fleet tasks' hosts; invoke's under `inv`
    (one executor class serves both: invoke.yaml is fabric.yaml)."""

    def _under_fab(self) -> bool:
        return bool(self.core) and "hosts" in self.core[0].args

    def expand_calls(self, calls: Any, apply_hosts: bool = True) -> list[Call]:
        if not self._under_fab():
            return invoke.Executor.expand_calls(self, calls)
        hosts = self.core[0].args.hosts.value
        expanded = super().expand_calls(calls, apply_hosts=apply_hosts)
        return gather(expanded, hosts.split(",")) if apply_hosts and hosts else expanded

    def dedupe(self, calls: Any) -> Any:
        return super().dedupe(calls) if self._under_fab() else invoke.Executor.dedupe(self, calls)
