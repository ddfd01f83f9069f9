"""ssl: not built yet — each task fails with exit 2 until its issue: ssl (certbot --nginx, renew, status) lands."""

from invoke import Collection

from .core.task import not_implemented

ns = Collection("ssl")
for _name in ("issue", "renew", "status"):
    ns.add_task(not_implemented(f"ssl.{_name}", "the ssl issue"), name=_name)
