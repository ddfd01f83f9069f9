"""Watching a release settle: nginx's 5xx share and /health for a while after a deploy.

scripts/monitor-watch.sh runs on the server for the whole window and prints one
line per interval (requests nginx logged, how many were 5xx, what the live api
slot's /health said: the slot nginx sends requests to, read again each interval
by scripts/live-slot.sh); the client follows those lines over ONE round trip
(Target.follow) and a Judge decides, line by line:

    fails   as soon as more than thresholds.error_rate_percent_max % of the
            requests so far were 5xx, once at least error_rate_min_requests
            were seen (a quiet host is not judged on three requests);
            or as soon as /health has failed for health_grace_seconds in a row
    passes  when the window is over and /health answers 200; while /health is
            failing at the end, the watch goes on until it recovers or its
            grace runs out

The watch then stops the script at once. `watch()` is the plain function
`release` calls; the monitor.watch task prints what it sees.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass

from . import slots
from .errors import OpsError
from .settings import Settings
from .target import Target

SCRIPT = "monitor-watch.sh"
NO_LOG = 3  # monitor-watch.sh: no readable access log


@dataclass(frozen=True)
class WatchConfig:
    access_log: str
    health: slots.HealthProbe
    interval: int
    error_rate_percent_max: int
    error_rate_min_requests: int
    health_grace_seconds: int

    @classmethod
    def from_settings(cls, s: Settings) -> WatchConfig:
        return cls(
            access_log=s.require("monitor.access_log"),
            health=slots.HealthProbe.from_settings(s),
            interval=int(s.require("monitor.watch_interval")),
            error_rate_percent_max=int(s.require("thresholds.error_rate_percent_max")),
            error_rate_min_requests=int(s.require("thresholds.error_rate_min_requests")),
            health_grace_seconds=int(s.require("thresholds.health_grace_seconds")),
        )


@dataclass(frozen=True)
class Sample:
    """One interval: seconds since the watch began, requests and 5xx in it, /health's code,
    the api slot that was asked (a | b)."""

    elapsed: int
    requests: int
    errors: int
    health: str
    slot: str = "a"

    @property
    def healthy(self) -> bool:
        return self.health == "200"


def parse_sample(line: str) -> Sample | None:
    """A "sample <elapsed> <requests> <5xx> <code> [<slot>]" line, or None for anything else. Pure."""
    fields = line.split()
    if len(fields) not in (5, 6) or fields[0] != "sample" or not all(f.isdigit() for f in fields[1:5]):
        return None
    slot = fields[5] if len(fields) == 6 else "a"
    return None if slot not in ("a", "b") else Sample(int(fields[1]), int(fields[2]), int(fields[3]), fields[4], slot)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str
    elapsed: int
    requests: int
    errors: int
    unhealthy_samples: int
    slot: str = "a"  # the api slot /health was last asked on

    @property
    def error_rate(self) -> float:
        return self.errors * 100 / self.requests if self.requests else 0.0


class Judge:
    """Fed one Sample at a time; returns the Verdict once it is certain, else None. Pure."""

    def __init__(self, cfg: WatchConfig, window_seconds: int):
        self.cfg = cfg
        self.window = window_seconds
        self.elapsed = self.requests = self.errors = self.unhealthy = 0
        self.failing_since: int | None = None  # elapsed of the first failed /health in the current run
        self.slot = "a"

    def add(self, sample: Sample) -> Verdict | None:
        self.elapsed, self.slot = sample.elapsed, sample.slot
        self.requests += sample.requests
        self.errors += sample.errors
        if sample.healthy:
            self.failing_since = None
        else:
            self.unhealthy += 1
            if self.failing_since is None:
                self.failing_since = sample.elapsed
        cfg = self.cfg
        if self.requests >= cfg.error_rate_min_requests and self.errors * 100 > cfg.error_rate_percent_max * self.requests:
            return self._verdict(False, f"{self.errors} of {self.requests} requests ({self.errors * 100 / self.requests:.1f}%) "
                                        f"were 5xx (max {cfg.error_rate_percent_max}%)")
        if self.failing_since is not None and sample.elapsed - self.failing_since >= cfg.health_grace_seconds:
            return self._verdict(False, f"/health failed for {sample.elapsed - self.failing_since}s in a row "
                                        f"(last: {_code(sample.health)}; grace {cfg.health_grace_seconds}s)")
        if sample.elapsed >= self.window and self.failing_since is None:
            return self._verdict(True, self.summary())
        return None

    def finish(self) -> Verdict:
        """The script ended before a verdict: judge what was seen."""
        if self.elapsed >= self.window and self.failing_since is None:
            return self._verdict(True, self.summary())
        if self.failing_since is not None:
            return self._verdict(False, f"/health was still failing when the watch ended after {self.elapsed}s")
        return self._verdict(False, f"the watch ended after {self.elapsed}s of {self.window}s")

    def summary(self) -> str:
        rate = f" ({self.errors * 100 / self.requests:.1f}%)" if self.requests else ""
        health = "/health 200 throughout" if not self.unhealthy else f"/health failed in {self.unhealthy} sample(s), within grace"
        return f"{self.errors} of {self.requests} requests were 5xx{rate}; {health}"

    def _verdict(self, passed: bool, reason: str) -> Verdict:
        return Verdict(passed, reason, self.elapsed, self.requests, self.errors, self.unhealthy, self.slot)


def _code(health: str) -> str:
    return "no answer" if health in ("", "000") else f"HTTP {health}"


def command(cfg: WatchConfig, seconds: int) -> str:
    args = [cfg.access_log, str(seconds), str(cfg.interval), *cfg.health.args()]
    return f"sh -c {shlex.quote(slots.with_live_slot(SCRIPT))} monitor-watch " + " ".join(shlex.quote(a) for a in args)


def watch(target: Target, cfg: WatchConfig, minutes: float,
          on_sample: Callable[[Sample, Judge], None] | None = None) -> Verdict:
    """Follow nginx's 5xx share and /health on `target` for `minutes` (one round trip);
    the Verdict says whether the release held. `on_sample` sees each interval as it comes.
    Raises OpsError only when it cannot watch at all (no access log, the script did not run)."""
    window = max(1, round(minutes * 60))
    judge = Judge(cfg, window)
    verdict: list[Verdict] = []

    def on_line(line: str) -> bool:
        sample = parse_sample(line)
        if sample is None:
            return False
        decided = judge.add(sample)
        if on_sample:
            on_sample(sample, judge)
        if decided:
            verdict.append(decided)
        return decided is not None

    # The script may run past the window by the grace (and an interval): /health failing
    # at the end gets its grace before the watch says so.
    seconds = window + cfg.health_grace_seconds + cfg.interval
    result = target.follow(command(cfg, seconds), on_line, sudo=True, timeout=seconds + 60)
    if verdict:
        return verdict[0]
    if result.exit_status == NO_LOG:
        raise OpsError(f"no readable nginx access log at {cfg.access_log} on {target.label}",
                       "run `nginx` (it fronts the api and writes that log), or point monitor.access_log at it")
    if judge.elapsed == 0 and result.exit_status != 0:
        why = (result.stderr.strip().splitlines() or [f"exit {result.exit_status}"])[-1]
        raise OpsError(f"the watch could not run on {target.label}: {why}", "check sudo and curl on the server")
    return judge.finish()
