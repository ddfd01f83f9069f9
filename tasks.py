"""Lets `inv` (on the server, or in CI) see the same task tree as `fab`."""

from fabfile import ns  # noqa: F401
