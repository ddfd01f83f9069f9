"""deploy: not built yet — its tasks exit 2 until its issue lands."""

from invoke import Collection

from .core.task import not_implemented

ns = Collection("deploy")
ns.add_task(not_implemented("deploy", "its issue"), name="deploy", default=True)
