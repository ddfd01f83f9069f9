"""What `release` reads before it changes anything: its settings, and the preflight's
one round trip — deploy's preconditions (core/app.release_probes) with monitor.check's
script (core/checks) inside the same batch, judged by monitor.check's own rules."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from . import checks, slots, state
from . import watch as watching
from .app import App, HostState, release_probes
from .batch import gather, parse_batch
from .errors import OpsError


@dataclass(frozen=True)
class Config:
    watch_seconds: int
    checks: checks.CheckConfig
    watch: watching.WatchConfig
    url: str

    @classmethod
    def from_settings(cls, s) -> Config:
        return cls(int(s.require("release.watch_seconds")), checks.CheckConfig.from_settings(s),
                   watching.WatchConfig.from_settings(s), f"https://{s.require('domains.api')}")


def judge_checks(output: str, marker: str, cfg: checks.CheckConfig) -> list[checks.Check]:
    """monitor.check's judgement of its script's frames, read inside the preflight's round trip."""
    facts = parse_batch(output, marker)
    if any(name not in facts for name in checks.PROBES):
        raise OpsError("monitor.check's probes did not run", "run `monitor.check` to see why")
    return checks.evaluate(facts, cfg)


def preflight_facts(target, app: App, cfg: Config) -> tuple[HostState, list[checks.Check]]:
    """The release's preconditions and monitor.check's thresholds: one round trip."""
    marker = "@@coachntt-" + secrets.token_hex(8)
    facts = gather(target, {**release_probes(app), "checks": checks.command(cfg.checks, marker)}, sudo=False)
    log = state.parse_log(facts["log"].stdout)
    host = HostState(log, facts["head"].stdout.strip() if facts["head"].ok else "", facts, slots.layout_from(facts, app))
    return host, judge_checks(facts["checks"].stdout, marker, cfg.checks)
