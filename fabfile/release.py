"""release: not built yet — each task fails with exit 2 until its issue: release (the checklist as one command) lands."""

from invoke import Collection

from .core.task import not_implemented

ns = Collection("release")
ns.add_task(not_implemented("release", "the release issue"), name="release", default=True)
