"""examples/app's production compose file as data: the plan's Docker security bullets
(non-root, no capabilities, read-only, limits, AppArmor, pinned images) hold for every
service, and the sandbox builds exactly the images it names."""

from __future__ import annotations

import re

import pytest
import yaml

from fabfile.core.settings import PROJECT_DIR
from fabfile.sandbox import images

APP = PROJECT_DIR / "examples" / "app"


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((APP / "docker-compose.prod.yml").read_text())["services"]


def test_every_service_runs_non_root_with_no_capabilities_on_a_read_only_root(services):
    assert set(services) == {"postgres", "pgbouncer", "api_a", "api_b"}
    for name, service in services.items():
        assert service["user"] not in ("", "0", "root"), f"{name} runs as root"
        assert service["cap_drop"] == ["ALL"] and "cap_add" not in service, name
        assert service["read_only"] is True, name
        assert "/tmp" in service["tmpfs"], f"{name} needs a writable /tmp on a read-only root"
        assert {"apparmor=docker-default", "no-new-privileges:true"} <= set(service["security_opt"]), name
        assert service["deploy"]["resources"]["limits"]["memory"], name
    # The image makes its socket directory postgres-owned; a tmpfs there is root-owned unless opened up.
    assert "/run/postgresql:mode=1777" in services["postgres"]["tmpfs"], "PostgreSQL's socket directory"


def test_images_are_pinned_by_version_never_latest(services):
    for name, service in services.items():
        assert "latest" not in service["image"], f"{name}: {service['image']}"
        assert re.fullmatch(r"[a-z0-9/-]+:[0-9][0-9.]*-[a-z]+|coachntt/api:\$\{APP_VERSION:-unreleased\}", service["image"]), \
            f"{name}: {service['image']}"
    assert "FROM coachntt/python-base:3.13-trixie" in (APP / "Dockerfile").read_text()


def test_the_sandbox_builds_the_very_tags_the_compose_file_and_dockerfile_name(services):
    built = {config.tag for family in images.FAMILIES for config in family.images}
    named = {service["image"] for service in services.values() if not service["image"].startswith("coachntt/api:")}
    base = re.search(r"^FROM (\S+)", (APP / "Dockerfile").read_text(), re.M).group(1)
    assert named | {base} <= built, (named | {base}) - built


def test_published_ports_are_on_loopback_only(services):
    """PostgreSQL's address comes from DB_PUBLISH (db.replica writes the host's private
    one) and is loopback, on a port Docker picks, without it; everything else is loopback, always."""
    for name, service in services.items():
        for port in service.get("ports", []):
            if name == "postgres":
                assert port == "${DB_PUBLISH:-127.0.0.1}:${DB_PUBLISH_PORT:-}:5432", port
                continue
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback (Docker bypasses ufw)"

