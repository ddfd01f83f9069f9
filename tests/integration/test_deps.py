"""deps on real sandbox hosts: packages really installed through apt, Docker kept when it works."""

from __future__ import annotations

from opsrun import console, fab, json_lines


def test_deps_installs_nginx_certbot_and_docker_compose_on_a_fresh_host(vps_factory):
    host = vps_factory(flavour="fresh")
    assert fab(host, "deps.check").returncode != 0, "a fresh host has none of them"

    result = fab(host, "deps")
    assert result.returncode == 0, result.stdout + result.stderr

    check = fab(host, "deps.check")
    assert check.returncode == 0, check.stdout + check.stderr
    for name in ("nginx", "certbot", "docker", "compose"):
        assert name in check.stdout
    code, out = console(host, "docker compose version --short && systemctl is-active docker nginx")
    assert code == 0, out

    again = fab(host, "deps", "--json")
    steps = [r for r in json_lines(again.stdout) if "step" in r]
    assert again.returncode == 0 and steps and all(r["status"] == "ok" for r in steps), again.stdout


def test_deps_keeps_a_working_preinstalled_docker(vps_factory):
    host = vps_factory(flavour="ubuntu-like")
    _, before = console(host, "dpkg-query -W -f='${Version}' docker.io; stat -c %Y /usr/bin/dockerd")
    result = fab(host, "deps", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    docker = next(r for r in json_lines(result.stdout) if r.get("step") == "docker + compose")
    assert docker["status"] == "ok" and "keeping Docker" in docker["reason"], docker
    assert console(host, "dpkg-query -W -f='${Version}' docker.io; stat -c %Y /usr/bin/dockerd")[1] == before
