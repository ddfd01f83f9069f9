"""The rolling release's order as data: the first app host alone, then release.roll_parallel
at a time, each host out of the load balancer while it is released, a shared database's
backup handed from the first host to the rest, and a failed host left out while the rest
of its batch goes back in. The load balancer and the hosts are stand-ins here; the roll
through a real lb under load is tests/integration/test_multihost.py's."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from fabfile import load_balancer, rolling_release
from fabfile.core.errors import ConfigError, OpsError
from fabfile.core.settings import Settings, validate

APPS = ["coachntt@10.201.0.31", "coachntt@10.201.0.32", "coachntt@10.201.0.33", "coachntt@10.201.0.34"]


def hosts(n: int) -> list[rolling_release.HostRoll]:
    return [rolling_release.HostRoll(f"10.201.0.{31 + i}", APPS[i]) for i in range(n)]


def test_the_first_host_goes_alone_then_roll_parallel_at_a_time():
    four = hosts(4)
    assert [[h.address for h in b] for b in rolling_release.batches(four, 1)] == [[a.address] for a in four]
    assert [[h.address[-2:] for h in b] for b in rolling_release.batches(four, 2)] == [["31"], ["32", "33"], ["34"]]
    assert [[h.address[-2:] for h in b] for b in rolling_release.batches(four, 10)] == [["31"], ["32", "33", "34"]]


def test_roll_parallel_is_a_whole_number_of_hosts(defaults):
    defaults["release"]["roll_parallel"] = 0
    with pytest.raises(ConfigError, match="release.roll_parallel"):
        validate(Settings("production", defaults))


class Recorder:
    """The lb's moves and each host's release, in the order they happened."""

    def __init__(self, fail: set[str] = frozenset()):
        self.events: list[str] = []
        self.given: dict[str, str] = {}
        self.running = self.most_at_once = 0
        self.fail, self.lock = fail, threading.Lock()

    def move(self, ops, address, *, leaving):
        with self.lock:
            self.events.append(("out " if leaving else "in ") + address[-2:])

    def release_here(self, host_ops, sha, shared_backup=""):
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.given[host_ops.where] = shared_backup
        time.sleep(0.05)
        with self.lock:
            self.running -= 1
            self.events.append("released " + host_ops.where[-2:])
        if host_ops.where in self.fail:
            raise OpsError(f"/health did not answer 200 on {host_ops.where}")
        return shared_backup or "/backups/db_x_pre-abc.dump"


def roll(defaults, monkeypatch, recorder: Recorder, *, at_once: int, apps: int = 3):
    defaults["roles"] = {"app": APPS[:apps], "lb": "root@10.201.0.30", "db": "coachntt@10.201.0.20", "replica": []}
    defaults["release"]["roll_parallel"] = at_once
    settings = Settings("production", defaults)
    balancing = SimpleNamespace(apps=[login.split("@")[1] for login in APPS[:apps]])
    monkeypatch.setattr(load_balancer, "the_lb", lambda ops: (object(), balancing))
    monkeypatch.setattr(load_balancer, "probes", lambda ops, b: {})
    monkeypatch.setattr(rolling_release, "gather", lambda target, probes: {})
    monkeypatch.setattr(load_balancer, "states", lambda facts, b: {a: ("in", "200") for a in b.apps})
    monkeypatch.setattr(load_balancer, "move", recorder.move)

    @contextmanager
    def at(context, login, settings, **kwargs):
        yield SimpleNamespace(where=login)

    monkeypatch.setattr(rolling_release, "ops_at", at)
    lines: list[str] = []
    ops = SimpleNamespace(settings=settings, context=SimpleNamespace(host=None), dry=False, json=False, diff=False,
                          reporter=SimpleNamespace(info=lines.append))
    rolling_release.roll(ops, "a" * 40, recorder.release_here)
    return lines


def test_one_at_a_time_each_host_is_back_in_before_the_next_goes_out(defaults, monkeypatch):
    recorder = Recorder()
    roll(defaults, monkeypatch, recorder, at_once=1)
    assert recorder.events == ["out 31", "released 31", "in 31", "out 32", "released 32", "in 32",
                               "out 33", "released 33", "in 33"]
    assert recorder.most_at_once == 1


def test_a_batch_goes_out_together_is_released_at_once_and_comes_back(defaults, monkeypatch):
    recorder = Recorder()
    lines = roll(defaults, monkeypatch, recorder, at_once=2, apps=4)
    events = recorder.events
    assert events[:3] == ["out 31", "released 31", "in 31"], "the first host alone, back in before more go out"
    assert events[3:5] == ["out 32", "out 33"] and set(events[5:7]) == {"released 32", "released 33"}
    assert events[7:] == ["in 32", "in 33", "out 34", "released 34", "in 34"]
    assert recorder.most_at_once == 2
    # The first host's backup of the shared database is handed to every host after it.
    assert recorder.given == {APPS[0]: "", APPS[1]: "/backups/db_x_pre-abc.dump", APPS[2]: "/backups/db_x_pre-abc.dump",
                              APPS[3]: "/backups/db_x_pre-abc.dump"}
    assert [line.split()[:2] for line in lines[-4:]] == [[f"10.201.0.{n}", "released"] for n in (31, 32, 33, 34)]


def test_a_host_failing_in_a_batch_stays_out_the_rest_of_it_goes_back_in_and_the_roll_stops(defaults, monkeypatch):
    recorder = Recorder(fail={APPS[1]})
    with pytest.raises(OpsError, match="the rolling release stopped at 10.201.0.32") as stopped:
        roll(defaults, monkeypatch, recorder, at_once=2, apps=4)
    assert "in 32" not in recorder.events and "in 33" in recorder.events
    assert not [e for e in recorder.events if e.endswith("34")], "the hosts after the batch are not touched"
    assert "10.201.0.32 is out of the load balancer" in stopped.value.one_line()
