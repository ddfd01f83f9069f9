"""secure: not built yet — its tasks exit 2 until its issue lands."""

from invoke import Collection

from .core.task import not_implemented

ns = Collection("secure")
ns.add_task(not_implemented("secure", "its issue"), name="secure", default=True)
