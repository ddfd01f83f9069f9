"""monitor: not built yet — each task fails with exit 2 until its issue: monitor (check, watch, stack) lands."""

from invoke import Collection

from .core.task import not_implemented

ns = Collection("monitor")
for _name in ("check", "watch", "stack"):
    ns.add_task(not_implemented(f"monitor.{_name}", "the monitor issue"), name=_name)
