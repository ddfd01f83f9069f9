"""Prometheus, asked on the server through its HTTP API: are the targets up, which rules did
it load. One round trip: scripts/monitoring-verify.sh polls there until the answer is
complete or a deadline passes, then prints every answer after a marker line; `judge`
turns that output into problems, as data.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from . import templates

PROMETHEUS_URL = "http://127.0.0.1:9090"


def verify_command(*, grafana_url: str, domain: str, jobs: Sequence[str], deadline: int, thresholds: Mapping[str, str]) -> str:
    """The script that waits for each of `jobs` to have a target up and the rules to carry `thresholds`
    (alert name -> the `threshold` annotation it must have), then reports."""
    needles = sorted({f'"threshold":"{value}"' for value in thresholds.values()})
    args = (PROMETHEUS_URL, grafana_url, domain, len(jobs), deadline, *needles)
    return (f"sh -c {shlex.quote(templates.script('monitoring-verify.sh'))} monitoring-verify "
            + " ".join(shlex.quote(str(arg)) for arg in args))


@dataclass(frozen=True)
class Verdict:
    up: list[str]  # jobs with a target up
    down: list[str]  # "job (last error)" of jobs with none up
    missing: list[str]  # jobs Prometheus does not scrape at all
    rules: dict[str, str]  # alert name -> threshold annotation, as loaded
    wrong_rules: list[str]  # "name (loaded x, wanted y)"
    grafana: str  # HTTP status of Grafana's /api/health
    nginx: str  # HTTP status nginx gives the metrics domain
    answered: bool  # Prometheus answered at all
    # "job instance" of targets down beside one of their job's up: the api slot kept for rollback
    idle: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        if not self.answered:
            return [f"Prometheus does not answer on {PROMETHEUS_URL}"]
        found = []
        if self.down:
            found.append("target(s) not up: " + "; ".join(self.down))
        if self.missing:
            found.append("Prometheus does not scrape " + ", ".join(self.missing))
        if self.wrong_rules:
            found.append("Prometheus has not loaded the alert rules written: " + ", ".join(self.wrong_rules))
        if self.grafana != "200":
            found.append(f"Grafana's /api/health answers HTTP {self.grafana or '---'}")
        return found

    def summary(self) -> str:
        idle = f"; {', '.join(self.idle)} down (the idle api slot)" if self.idle else ""
        return (f"{len(self.up)}/{len(self.up) + len(self.down)} jobs up ({', '.join(sorted(self.up))}{idle}), "
                f"{len(self.rules)} alert rules with their thresholds, Grafana answers")


def judge(output: str, *, jobs: Sequence[str], thresholds: Mapping[str, str]) -> Verdict:
    """The verify script's output, judged. Pure."""
    sections: dict[str, str] = {}
    current = ""
    for line in output.splitlines():
        if line.startswith("@@"):
            current, _, rest = line[2:].partition(" ")
            sections[current] = rest
        elif current:
            sections[current] += line + "\n"
    targets = _data(sections.get("targets", "")).get("activeTargets") or []
    # A job is up when one of its targets is: job api scrapes both slots, one stopped after a cutover.
    up = sorted({_job(t) for t in targets if t.get("health") == "up"})
    errors: dict[str, str] = {}  # a job with no target up, by the first one's error
    for t in targets:
        if t.get("health") != "up" and _job(t) not in up:
            errors.setdefault(_job(t), str(t.get("lastError") or t.get("health") or "unknown"))
    down = [f"{job} ({error})" for job, error in errors.items()]
    idle = [f"{_job(t)} {(t.get('labels') or {}).get('instance', '?')}" for t in targets
            if t.get("health") != "up" and _job(t) in up]
    scraped = {_job(t) for t in targets}
    rules = {str(rule.get("name")): str((rule.get("annotations") or {}).get("threshold", ""))
             for group in _data(sections.get("rules", "")).get("groups") or [] for rule in group.get("rules") or []}
    wrong = [f"{name} (loaded {rules.get(name) or 'none'}, wanted {value})"
             for name, value in thresholds.items() if rules.get(name) != value]
    return Verdict(up=up, down=down, missing=sorted(set(jobs) - scraped), rules=rules, wrong_rules=wrong,
                   grafana=sections.get("grafana", "").strip(), nginx=sections.get("nginx", "").strip(), answered=bool(targets),
                   idle=idle)


def _job(target: Mapping) -> str:
    return str((target.get("labels") or {}).get("job", "?"))


def _data(text: str) -> dict:
    try:
        answer = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    data = answer.get("data") if isinstance(answer, dict) else None
    return data if isinstance(data, dict) else {}
