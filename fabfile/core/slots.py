"""The api's two slots and the nginx upstream that picks one: releases without downtime.

    slot a   compose service api_a   127.0.0.1:<cutover.port_a>   (8000)
    slot b   compose service api_b   127.0.0.1:<cutover.port_b>   (8002)

nginx sends the api site to the upstream `coachntt_api`, defined in one include
(UPSTREAM_FILE) that names the live slot. A cutover to a release:

    start    its slot: the one already holding its image, else the idle one
             (`up -d --no-deps`: the live slot and the database are not touched)
    gate     /health on that slot's own port, before any request reaches it
    switch   the include rewritten, `nginx -t` (the include before comes back if
             it fails), graceful reload: new connections go to the new slot, old
             workers finish what they hold (scripts/switch-upstream.sh)
    drain    the old slot keeps its in-flight requests and websockets until they
             end, at most cutover.drain_seconds (scripts/drain-slot.sh), then
             stops: the app finishes its requests and closes websockets with 1001
             "going away". Its container and image stay for an instant rollback.

A slot that fails its gate is never switched to. The include also holds the
maintenance flag: while a breaking migration runs the api site answers 503 with
Retry-After (configs/nginx/coachntt.conf.j2).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from . import templates
from .batch import ProbeResult, gather
from .errors import OpsError
from .settings import Settings
from .target import Target

if TYPE_CHECKING:  # core/app.py builds on this module (preflight facts, settle)
    from .app import App, GateResult

SITE_FILE = "/etc/nginx/conf.d/coachntt.conf"
UPSTREAM_DIR = "/etc/nginx/coachntt"
UPSTREAM_FILE = f"{UPSTREAM_DIR}/api-upstream.conf"
UPSTREAM = "coachntt_api"
MAINTENANCE_PAGE = "maintenance.html"  # in UPSTREAM_DIR
# The api service of releases from before slots: it held slot a's port.
LEGACY_SERVICE = "api"
# SIGTERM to SIGKILL when a slot stops; the app ends its requests and websockets within it.
STOP_GRACE = 20
# A request an old nginx worker was still reading at the switch reaches the old slot
# just after it: the drain waits at least this long before it may call the slot idle.
DRAIN_SETTLE = 2
# Margin on top of drain + stop grace for nginx's own bound on old workers.
NGINX_SHUTDOWN_MARGIN = 30

_SERVER = re.compile(r"^\s*server\s+127\.0\.0\.1:(\d+)\s*;", re.MULTILINE)
_MAINTENANCE = re.compile(r"^\s*default\s+1\s*;", re.MULTILINE)
_SHA = re.compile(r"[0-9a-f]{7,64}")

Phase = Callable[..., AbstractContextManager]  # phase(name, reason="")


@dataclass(frozen=True)
class Slot:
    name: str  # a | b
    port: int

    @property
    def service(self) -> str:
        return f"api_{self.name}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __str__(self) -> str:
        return f"slot {self.name} ({self.address})"


def slots_of(app: App) -> tuple[Slot, Slot]:
    return slots_of_ports(*app.slot_ports)


def slots_of_ports(port_a: int, port_b: int) -> tuple[Slot, Slot]:
    return Slot("a", int(port_a)), Slot("b", int(port_b))


def health_url(app: App, slot: Slot) -> str:
    """app.health_url's path, asked on the slot's own port."""
    return _on_port(app.health_url, slot.port)


def _on_port(url: str, port: int) -> str:
    return urlsplit(url)._replace(netloc=f"127.0.0.1:{int(port)}").geturl()


@dataclass(frozen=True)
class HealthProbe:
    """For scripts that ask the api's /health on their own, on the server (monitor.check,
    monitor.watch): each slot's /health URL and the include naming the live one. The
    script finds the live slot itself with scripts/live-slot.sh (with_live_slot), by the
    rule Layout.answering() follows: the slot the include names, slot a without one."""

    urls: tuple[str, str]  # slot a's /health, slot b's
    ports: tuple[int, int]
    include: str = UPSTREAM_FILE

    @classmethod
    def from_settings(cls, s: Settings) -> HealthProbe:
        ports = (int(s.require("cutover.port_a")), int(s.require("cutover.port_b")))
        url = s.require("app.health_url")
        return cls((_on_port(url, ports[0]), _on_port(url, ports[1])), ports)

    def args(self) -> list[str]:
        """live_slot's arguments: INCLUDE PORT_B URL_A URL_B."""
        return [self.include, str(self.ports[1]), *self.urls]

    def slot(self, name: str) -> Slot:
        """The slot a script reported (a | b; anything else is slot a)."""
        pair = slots_of_ports(*self.ports)
        return pair[1] if name == "b" else pair[0]

    def other(self, slot: Slot) -> Slot:
        return self.slot("a" if slot.name == "b" else "b")

    def url(self, name: str) -> str:
        return self.urls[1] if name == "b" else self.urls[0]

    def describe(self) -> str:
        return f"the live api slot's /health ({self.urls[0]} or {self.urls[1]}, by {self.include})"


def with_live_slot(script: str) -> str:
    """scripts/<script> after scripts/live-slot.sh's function, to send inline."""
    return templates.script("live-slot.sh") + "\n" + templates.script(script)


def nginx_shutdown_seconds(drain_seconds: int) -> int:
    """nginx's worker_shutdown_timeout: longer than a cutover needs to close the old
    slot's websockets itself (drain + stop grace), so nginx never cuts one first."""
    return drain_seconds + STOP_GRACE + NGINX_SHUTDOWN_MARGIN


# -- what the host says -------------------------------------------------------------


@dataclass(frozen=True)
class Container:
    service: str
    state: str  # running | exited | created | ...
    sha: str  # the release its image is tagged with, '' when not one


@dataclass(frozen=True)
class Layout:
    """Which slot nginx sends the api to and what each slot holds. Pure: built from facts."""

    slots: tuple[Slot, Slot]
    live: Slot | None = None  # the slot the include names; None without an include
    maintenance: bool = False
    include: bool = False
    site_uses_slots: bool = False
    containers: dict[str, Container] = field(default_factory=dict)

    def other(self, slot: Slot) -> Slot:
        return self.slots[1] if slot == self.slots[0] else self.slots[0]

    def running(self, slot: Slot) -> bool:
        found = self.containers.get(slot.service)
        return bool(found and found.state == "running")

    def sha(self, slot: Slot) -> str:
        found = self.containers.get(slot.service)
        return found.sha if found else ""

    @property
    def legacy(self) -> Container | None:
        """A running api container from before slots: it answers on slot a's port."""
        found = self.containers.get(LEGACY_SERVICE)
        return found if found and found.state == "running" else None

    def serving(self) -> Slot | None:
        """The slot whose port answers the requests nginx sends now, if anything does."""
        if self.live and (self.running(self.live) or (self.legacy and self.live == self.slots[0])):
            return self.live
        return None

    def serving_sha(self) -> str:
        slot = self.serving()
        if slot is None:
            return ""
        return self.sha(slot) if self.running(slot) else (self.legacy.sha if self.legacy else "")

    def answering(self) -> Slot:
        """The slot the api's requests reach, for anything that checks or restarts the api
        outside a cutover: the one serving, else the one nginx names (slot a without an
        include, where app.health_url pointed before slots)."""
        return self.serving() or self.idle()

    def idle(self) -> Slot:
        """Where a new release starts: the slot nginx does not send requests to. With
        nothing serving yet, the slot the include names (slot a on a new host)."""
        serving = self.serving()
        if serving:
            return self.other(serving)
        return self.live or self.slots[0]

    def slot_for(self, sha: str) -> Slot:
        """The slot `sha` goes live from: the one serving it already, else one whose
        container holds its image (warm: started, not rebuilt), else the idle one."""
        serving = self.serving()
        if serving and self.running(serving) and self.sha(serving) == sha:
            return serving
        for slot in self.slots:
            if slot != serving and self.sha(slot) == sha:
                return slot
        return self.idle()


def probes(app: App) -> dict[str, str]:
    """The facts a Layout is read from (joined to a release's preflight round trip)."""
    return {
        "upstream": f"cat {shlex.quote(UPSTREAM_FILE)}",
        "site_slots": f"grep -qF {shlex.quote('include ' + UPSTREAM_FILE + ';')} {shlex.quote(SITE_FILE)}",
        "containers": app.compose("ps -a --format json"),
    }


def health_probes(app: App) -> dict[str, str]:
    """Each slot's /health on its own port (its HTTP code, '000' when nothing answers), to
    join the round trip that reads the layout: `answers` picks them up."""
    return {f"health_{slot.name}": f"curl -s -m 3 -o /dev/null -w '%{{http_code}}' {shlex.quote(health_url(app, slot))}"
            for slot in slots_of(app)}


def answers(facts: dict[str, ProbeResult], app: App) -> dict[str, str]:
    """What each slot's /health said (health_probes), by slot name."""
    return {slot.name: facts[f"health_{slot.name}"].stdout.strip() or "000" for slot in slots_of(app)}


def layout_from(facts: dict[str, ProbeResult], app: App) -> Layout:
    slots = slots_of(app)
    live, maintenance = parse_upstream(facts["upstream"].stdout, slots) if facts["upstream"].ok else (None, False)
    return Layout(slots=slots, live=live, maintenance=maintenance, include=facts["upstream"].ok,
                  site_uses_slots=facts["site_slots"].ok, containers=parse_containers(facts["containers"].stdout))


def read(target: Target, app: App) -> Layout:
    """The layout now, one round trip."""
    return layout_from(gather(target, probes(app), sudo=False), app)


def parse_upstream(text: str, slots: tuple[Slot, Slot]) -> tuple[Slot | None, bool]:
    """(the slot the include names, whether the maintenance page is on). Pure."""
    found = _SERVER.search(text)
    port = int(found.group(1)) if found else None
    return next((slot for slot in slots if slot.port == port), None), bool(_MAINTENANCE.search(text))


def parse_containers(text: str) -> dict[str, Container]:
    """`docker compose ps -a --format json`: one object per line (compose >= 2.21) or
    one array (older). Containers by service; the release is the api image's tag."""
    text = text.strip()
    try:
        items = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError:
        return {}
    found: dict[str, Container] = {}
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("Service"), str):
            continue
        tag = str(item.get("Image", "")).rpartition(":")[2]
        container = Container(item["Service"], str(item.get("State", "")), tag if _SHA.fullmatch(tag) else "")
        # A service with two containers (a scale-up by hand): the running one counts.
        if item["Service"] not in found or container.state == "running":
            found[item["Service"]] = container
    return found


def describe(layout: Layout, answers: dict[str, str]) -> list[str]:
    """`deploy.status`'s lines for the slots; `answers` maps a slot's name to what its
    /health said (HTTP code). Pure. The first line names the release that serves."""
    lines = [f"running     {layout.serving_sha()[:12] or 'no api slot serves'}"]
    live = f"{layout.live}" if layout.live else f"no slot upstream ({UPSTREAM_FILE}): run `nginx`"
    lines.append(f"nginx       api -> {live}" + ("  MAINTENANCE: 503 + Retry-After" if layout.maintenance else ""))
    for slot in layout.slots:
        container = layout.containers.get(slot.service)
        role = "live" if slot == layout.live else ("kept for rollback" if layout.sha(slot) else "idle")
        lines.append(f"slot {slot.name}      {container.state if container else 'no container':<12} "
                     f"{layout.sha(slot)[:12] or '-':<12}  HTTP {answers.get(slot.name, '---')} on {slot.address}  ({role})")
    if layout.legacy:
        lines.append(f"legacy      an api container from before slots runs ({layout.legacy.sha[:12] or '?'}): "
                     "the next release replaces it")
    return lines


# -- what a cutover sends -----------------------------------------------------------


def render_upstream(slot: Slot, sha: str = "", *, maintenance: bool = False) -> str:
    """The include naming `slot` (and the release it holds, for people reading it)."""
    return templates.render("nginx/api-upstream.conf.j2", upstream=UPSTREAM, slot=slot.name, address=slot.address,
                            sha=sha[:12], maintenance=maintenance)


def start_command(app: App, slot: Slot, sha: str) -> str:
    # --no-deps: the database is up already, and nothing else may be recreated.
    return app.compose(f"up -d --no-deps {slot.service}", sha)


def stop_command(app: App, slot: Slot) -> str:
    return app.compose(f"stop -t {STOP_GRACE} {slot.service}")


def remove_legacy_command(app: App, keep: Slot, sha: str) -> str:
    """The api container from before slots is an orphan of the compose file now; this
    removes it and leaves `keep` (running `sha`, same definition) as it is."""
    return app.compose(f"up -d --no-deps --remove-orphans {keep.service}", sha)


def switch_command(content: str) -> str:
    """As the deploy user, the script itself as root (nginx's files and reload)."""
    script = shlex.quote(templates.script("switch-upstream.sh"))
    return f"sudo -n sh -c {script} switch-upstream {shlex.quote(UPSTREAM_FILE)} {shlex.quote(content)}"


def drain_command(slot: Slot, limit: int) -> str:
    script = shlex.quote(templates.script("drain-slot.sh"))
    return f"sh -c {script} drain-slot {int(slot.port)} {int(limit)} {min(DRAIN_SETTLE, int(limit))}"


# -- doing it (each a command under the deploy lock when `target` is a HeldLock) -----------


def start(target: Target, app: App, slot: Slot, sha: str) -> None:
    target.run(start_command(app, slot, sha), user=app.owner, timeout=600)


def gate(target: Target, app: App, slot: Slot, *, deadline: int | None = None) -> GateResult:
    """/health on the slot's own port until 200 (app.health_deadline, or `deadline`)."""
    from .app import health_gate  # app.py imports this module: resolved at call time

    return health_gate(target, app, url=health_url(app, slot), service=slot.service, deadline=deadline)


def switch(target: Target, app: App, slot: Slot, sha: str, *, maintenance: bool = False) -> bool:
    """nginx to `slot` (maintenance page on or off); True when nginx was reloaded."""
    result = target.run(switch_command(render_upstream(slot, sha, maintenance=maintenance)), user=app.owner, timeout=120)
    return result.stdout.strip().endswith("switched")


def retire(target: Target, app: App, slot: Slot, *, drain_seconds: int, legacy_keep: tuple[Slot, str] | None = None) -> str:
    """Drain `slot` (bounded), stop it, keep its container; (an api container from before
    slots goes too). Returns what the drain saw, in words."""
    said = ""
    if drain_seconds > 0:
        said = target.run(drain_command(slot, drain_seconds), user=app.owner, timeout=drain_seconds + 60).stdout.strip()
    target.run(stop_command(app, slot), user=app.owner, timeout=STOP_GRACE + 60)
    if legacy_keep:
        keep, sha = legacy_keep
        target.run(remove_legacy_command(app, keep, sha), user=app.owner, timeout=STOP_GRACE + 120)
    return said.splitlines()[-1] if said else f"{slot.service} stopped"


@dataclass(frozen=True)
class Outcome:
    gate: GateResult
    slot: Slot
    switched: bool = False  # nginx was reloaded onto `slot`
    drained: str = ""  # what the old slot's drain saw
    warning: str = ""


def serve(target: Target, app: App, sha: str, phase: Phase, *, layout: Layout | None = None) -> Outcome:
    """Make `sha` the release nginx sends the api to: start its slot, gate it there,
    switch, retire the other slot. Never switches to a slot that fails its gate (a
    slot started for it is stopped again); the maintenance page goes off with the switch."""
    layout = layout or read(target, app)
    slot = layout.slot_for(sha)
    serving = layout.serving()
    fresh = not (layout.running(slot) and layout.sha(slot) == sha)
    with phase("start", f"{sha[:12]} in {slot}" + ("" if fresh else ", already running")):
        if fresh:
            start(target, app, slot, sha)
    with phase("health gate", f"{health_url(app, slot)}"):
        result = gate(target, app, slot)
        if not result.passed and fresh and slot != serving:
            target.run(stop_command(app, slot), user=app.owner, check=False, timeout=STOP_GRACE + 60)
    if not result.passed:
        return Outcome(result, slot)
    with phase("switch", f"nginx -> {slot}"):
        switched = switch(target, app, slot, sha)
    other = layout.other(slot)
    legacy = layout.legacy if serving == other else None
    drained = warning = ""
    if layout.running(other) or legacy:
        with phase("drain", f"{other}, at most {app.drain_seconds}s, then stopped (container kept)"):
            try:
                drained = retire(target, app, other, drain_seconds=app.drain_seconds,
                                 legacy_keep=(slot, sha) if legacy else None)
            except OpsError as exc:
                if exc.keeps_lock:
                    raise
                # The release is live and healthy: an old slot that will not stop is no reason to undo it.
                warning = f"{other} did not stop ({exc.one_line()}); it runs beside the live slot"
    return Outcome(result, slot, switched, drained, warning)
