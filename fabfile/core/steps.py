"""Steps and the runner: facts -> plan -> apply -> verify, with a reporter.

A Step is data: the read-only probes it needs (its facts), a pure `plan`
function from those facts to the changes to make, and an optional `check`
that proves the host really ended up right. The runner:

1. gathers the facts of ALL steps in one round trip (core/batch.py),
2. plans every step (pure, so `--dry` is just "print the plans"),
3. applies each step's changes as one script (one round trip per changed step),
4. runs the step's check, if any.

Each step is reported as ok / changed / skipped / FAILED with its time.
"""

from __future__ import annotations

import json as jsonlib
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO

from . import redact
from .batch import ProbeResult, gather
from .errors import OpsError
from .target import Target, command_failed

Facts = Mapping[str, ProbeResult]


@dataclass(frozen=True)
class Change:
    """One change to the host: what `--dry` shows and the shell that makes it."""

    summary: str
    command: str
    diff: str = ""


@dataclass(frozen=True)
class Plan:
    changes: tuple[Change, ...] = ()
    reason: str = ""
    skip: bool = False

    @classmethod
    def ok(cls, reason: str = "") -> Plan:
        return cls(reason=reason)

    @classmethod
    def skipped(cls, reason: str) -> Plan:
        return cls(reason=reason, skip=True)

    @classmethod
    def change(cls, *changes: Change, reason: str = "") -> Plan:
        return cls(changes=tuple(changes), reason=reason)

    @property
    def script(self) -> str:
        """All changes as one script that stops at the first failure."""
        return "set -e\n" + "\n".join(change.command for change in self.changes) + "\n"


def no_facts_plan(facts: Facts) -> Plan:  # pragma: no cover - trivial default
    return Plan.ok()


@dataclass(frozen=True)
class Step:
    name: str
    probes: Mapping[str, str] = field(default_factory=dict)
    plan: Callable[[Facts], Plan] = no_facts_plan
    check: Callable[[Target], None] | None = None
    sudo: bool = True


class Reporter:
    """Prints one line per step and a summary per host; JSON lines with json=True."""

    def __init__(self, host: str, *, json: bool = False, stream: TextIO | None = None, show_diff: bool = False):
        self.host = host
        self.json = json
        self.stream = stream or sys.stdout
        self.show_diff = show_diff
        self.counts = {"ok": 0, "changed": 0, "skipped": 0, "failed": 0, "would change": 0, "interrupted": 0}
        self.started = time.monotonic()
        self.unheard = False  # the terminal or pipe we print to is gone

    def step(self, name: str, status: str, seconds: float, *, reason: str = "", changes: tuple[Change, ...] = ()) -> None:
        self.counts[status] += 1
        if self.json:
            record = {
                "host": self.host,
                "step": name,
                "status": status,
                "seconds": round(seconds, 3),
                "reason": reason,
                "changes": [c.summary for c in changes],
            }
            self._emit(jsonlib.dumps(record))
            return
        label = "FAILED" if status == "failed" else status
        line = f"  {label:<13} {name:<40} {seconds:6.2f}s"
        if reason:
            line += f"  {reason}"
        self._emit(line)
        for change in changes:
            self._emit(f"      - {change.summary}")
            if self.show_diff and change.diff:
                for diff_line in change.diff.splitlines():
                    self._emit(f"        {diff_line}")

    @property
    def reported_steps(self) -> int:
        return sum(self.counts.values())

    def summary(self, round_trips: int) -> None:
        seconds = time.monotonic() - self.started
        if self.json:
            self._emit(jsonlib.dumps({"host": self.host, "summary": self.counts, "seconds": round(seconds, 3), "round_trips": round_trips}))
            return
        parts = [f"{n} {status}" for status, n in self.counts.items() if n or status in ("ok", "changed", "failed")]
        self._emit(f"{self.host}: {', '.join(parts)} in {seconds:.1f}s ({round_trips} round trips)")

    @contextmanager
    def phase(self, name: str, reason: str = "") -> Iterator[None]:
        """Report a block of work as one step: changed when it returns, FAILED when it raises."""
        started = time.monotonic()
        try:
            yield
        except OpsError as exc:
            self.step(name, "failed", time.monotonic() - started, reason=exc.one_line())
            raise
        except KeyboardInterrupt:
            self.step(name, "interrupted", time.monotonic() - started)
            raise
        except Exception:
            self.step(name, "failed", time.monotonic() - started, reason="lost contact with the host")
            raise
        self.step(name, "changed", time.monotonic() - started, reason=reason)

    def info(self, text: str) -> None:
        if not self.json:
            self._emit(text)

    def _emit(self, text: str) -> None:
        if self.unheard:
            return
        try:
            print(redact.redact(text), file=self.stream, flush=True)
        except OSError:
            # Nobody reads us any more (a cancelled CI job took the terminal): the run goes
            # on putting the server in order, a failed print must not become its error.
            self.unheard = True


def gather_facts(target: Target, steps: list[Step]) -> list[Facts]:
    """Facts of every step in one round trip; each step sees its own probe names."""
    probes: dict[str, str] = {}
    for index, step in enumerate(steps):
        for probe, command in step.probes.items():
            probes[f"s{index}.{probe}"] = command
    found = gather(target, probes, sudo=any(step.sudo for step in steps))
    return [
        {probe: found[f"s{index}.{probe}"] for probe in step.probes}
        for index, step in enumerate(steps)
    ]


def plan_steps(target: Target, steps: list[Step]) -> list[tuple[Step, Plan]]:
    """Gather the facts of all steps (one round trip) and plan each one. Pure after the read."""
    return [(step, step.plan(facts)) for step, facts in zip(steps, gather_facts(target, steps), strict=True)]


def apply_steps(target: Target, planned: list[tuple[Step, Plan]], reporter: Reporter, *, dry: bool = False) -> None:
    """Report each planned step and, unless dry, apply the ones with changes."""
    for step, plan in planned:
        if plan.skip:
            reporter.step(step.name, "skipped", 0.0, reason=plan.reason)
        elif not plan.changes:
            reporter.step(step.name, "ok", 0.0, reason=plan.reason)
        elif dry:
            reporter.step(step.name, "would change", 0.0, reason=plan.reason, changes=plan.changes)
        else:
            apply_plan(target, step, plan, reporter, time.monotonic())


def run_steps(target: Target, steps: list[Step], reporter: Reporter, *, dry: bool = False) -> dict[str, Plan]:
    """Plan and (unless dry) apply `steps` in order. Returns each step's plan."""
    planned = plan_steps(target, steps)
    apply_steps(target, planned, reporter, dry=dry)
    return {step.name: plan for step, plan in planned}


def apply_plan(target: Target, step: Step, plan: Plan, reporter: Reporter, started: float) -> None:
    try:
        result = target.run(plan.script, sudo=step.sudo, check=False)
        if not result.ok:
            raise command_failed(result, target.label, what=f"step '{step.name}'")
        if step.check:
            step.check(target)
    except OpsError as exc:
        reporter.step(step.name, "failed", time.monotonic() - started, reason=exc.one_line(), changes=plan.changes)
        raise
    reporter.step(step.name, "changed", time.monotonic() - started, reason=plan.reason, changes=plan.changes)


class DetailReporter:
    """A Reporter for work done inside one step of a bigger task (staging inside a release):
    its steps are indented detail lines for people, not steps of their own (nor JSON objects)."""

    def __init__(self, reporter: Reporter):
        self.reporter = reporter

    def step(self, name: str, status: str, seconds: float, *, reason: str = "", changes: tuple[Change, ...] = ()) -> None:
        self.reporter.info(f"      {name:<34} {seconds:6.1f}s  {status:<8} {reason}".rstrip())

    def info(self, text: str) -> None:
        self.reporter.info(text)

    @contextmanager
    def phase(self, name: str, reason: str = "") -> Iterator[None]:
        started = time.monotonic()
        yield
        self.step(name, "changed", time.monotonic() - started, reason=reason)

