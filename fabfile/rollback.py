"""rollback: not built yet — its tasks exit 2 until its issue lands."""

from invoke import Collection

from .core.task import not_implemented

ns = Collection("rollback")
ns.add_task(not_implemented("rollback", "its issue"), name="rollback", default=True)
