"""deps on real sandbox hosts: packages really installed through apt, Docker kept when it works,
the Docker daemon hardened without stopping what runs."""

from __future__ import annotations

import json

from fabfile.core import lock, remote
from fabfile.sandbox import images
from opsrun import console, fab, json_lines, one_line


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


STATE_DIR = "/var/lib/coachntt-ops"
# On a network of its own, as the app's containers are on theirs: live-restore keeps a
# network in use as it was, and the default bridge must be free to get icc off.
PROBE = "docker network create probe-net >/dev/null && docker run -d --name probe --network probe-net --restart=no " \
        "-p 127.0.0.1:8099:8000 coachntt/python-base:3.13-trixie python3 -m http.server 8000"


def docker_facts(host) -> dict[str, str]:
    """dockerd's pid, whether it live-restores, and the probe container's start time and answer."""
    code, out = console(host, "systemctl show -p MainPID --value docker; "
                              "docker info --format '{{.LiveRestoreEnabled}} {{json .SecurityOptions}}'; "
                              "docker inspect -f '{{.Id}} {{.State.StartedAt}}' probe; "
                              "curl -s -o /dev/null -w '%{http_code}' -m 5 http://127.0.0.1:8099/")
    assert code == 0, out
    pid, info, started, answer = out.strip().splitlines()
    return {"pid": pid, "info": info, "probe": started, "answer": answer}


def test_deps_hardens_the_docker_daemon_keeping_containers_up_and_never_during_a_release(vps_factory):
    host = vps_factory(flavour="provisioned")
    images.load_images(host, families=(images.PYTHON_BASE,))
    code, out = console(host, f"{PROBE} && for i in $(seq 50); do curl -sf -o /dev/null http://127.0.0.1:8099/ && break; "
                              "sleep 0.2; done")
    assert code == 0, out
    before = docker_facts(host)
    assert before["answer"] == "200" and before["info"].startswith("false"), before

    # A release holds the deploy lock: deps refuses the restart, nothing changes.
    held = f"{lock.LOCK_SCRIPT} acquire {STATE_DIR} test-token release-under-test abc123 'a release'"
    assert console(host, held)[0] == 0
    refused = fab(host, "deps")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "a release holds the deploy lock: rerun deps when it is done" in one_line(refused)
    assert console(host, "test -e /etc/docker/daemon.json")[0] != 0, "nothing written"
    assert docker_facts(host) == before
    assert console(host, f"{lock.LOCK_SCRIPT} release {STATE_DIR} test-token")[0] == 0

    result = fab(host, "deps", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    step = next(r for r in json_lines(result.stdout) if r.get("step") == "docker daemon")
    assert step["status"] == "changed", step
    after = docker_facts(host)
    assert after["pid"] != before["pid"], "dockerd restarted with the new daemon.json"
    assert after["info"].startswith("true") and "no-new-privileges" in after["info"], after
    assert after["probe"] == before["probe"], "live-restore: the container ran on through the restart"
    assert after["answer"] == "200", "its published port still answers (userland-proxy off)"
    assert console(host, f"test -d {STATE_DIR}/deploy.lock")[0] != 0, "the lock deps took is free again"

    # A container started now gets the daemon's defaults.
    code, out = console(host, "docker run --rm coachntt/python-base:3.13-trixie grep NoNewPrivs /proc/self/status && "
                              "docker create --name fresh coachntt/python-base:3.13-trixie >/dev/null && "
                              "docker inspect -f '{{json .HostConfig.LogConfig}}' fresh && docker rm fresh >/dev/null")
    assert code == 0, out
    nnp, log_config = out.strip().splitlines()
    assert nnp.split() == ["NoNewPrivs:", "1"], out
    assert json.loads(log_config) == {"Type": "json-file", "Config": {"max-file": "3", "max-size": "10m"}}, out

    again = fab(host, "deps", "--json")
    steps = [r for r in json_lines(again.stdout) if "step" in r]
    assert again.returncode == 0 and all(r["status"] == "ok" for r in steps), again.stdout
    assert docker_facts(host)["pid"] == after["pid"], "no change, no restart"

    # icc: live-restore keeps the default bridge as it was while containers run on; Docker's
    # next start with none running (a reboot) makes it anew, and neighbours there cannot talk.
    code, out = console(host, "docker rm -f probe >/dev/null && systemctl restart docker && "
                              "docker run -d --name server coachntt/python-base:3.13-trixie python3 -m http.server 8000 >/dev/null && "
                              "ip=$(docker inspect -f '{{.NetworkSettings.IPAddress}}' server) && sleep 1 && "
                              "docker run --rm coachntt/python-base:3.13-trixie python3 -c \"import urllib.request as u; "
                              "u.urlopen('http://'+'$ip'+':8000/', timeout=3); print('answered')\" 2>&1 | tail -n 1")
    assert code == 0, out
    assert "timed out" in out, f"icc off: a neighbour on the default bridge must be unreachable ({out.strip()})"


REGISTRY_IMAGE = "127.0.0.1:5000/coachntt/python-base:3.13-trixie"
# Debian's package asks for htpasswd logins; this registry on loopback needs none.
REGISTRY_CONFIG = ("version: 0.1\\nstorage:\\n  filesystem:\\n    rootdirectory: /var/lib/docker-registry\\n"
                   "http:\\n  addr: 127.0.0.1:5000\\n")
IMAGES_ENV = {"COACHNTT_APP__DIR": "/srv/images-test", "COACHNTT_APP__COMPOSE_FILE": "compose.yml"}


def test_deps_images_finds_a_newer_image_in_the_registry_and_pulls_it_on_request(vps_factory):
    """A real registry (Debian's docker-registry) on the host: an app whose compose file
    and Dockerfile name an image there; a newer push under the same tag is an update."""
    host = vps_factory(flavour="provisioned")
    images.load_images(host, families=(images.PYTHON_BASE,))
    code, out = console(host, f"{remote.APT_INSTALL} docker-registry >/dev/null && "
                              f"printf '{REGISTRY_CONFIG}' > /etc/docker/registry/config.yml && systemctl restart docker-registry && "
                              "for i in $(seq 50); do curl -sf http://127.0.0.1:5000/v2/ >/dev/null && break; sleep 0.2; done && "
                              f"docker tag coachntt/python-base:3.13-trixie {REGISTRY_IMAGE} && docker push -q {REGISTRY_IMAGE} && "
                              "mkdir -p /srv/images-test && cd /srv/images-test && "
                              f"printf 'FROM {REGISTRY_IMAGE}\\nCOPY . /app\\n' > Dockerfile && "
                              f"printf 'services:\\n  worker:\\n    image: {REGISTRY_IMAGE}\\n' > compose.yml")
    assert code == 0, out

    current = fab(host, "deps.images", "--json", env=IMAGES_ENV)
    assert current.returncode == 0, current.stdout + current.stderr
    (row,) = [r for r in json_lines(current.stdout) if "image" in r]
    assert (row["image"], row["status"]) == (REGISTRY_IMAGE, "current"), row

    # The registry gets a newer image under the same tag; the host keeps the one it has.
    code, out = console(host, f"old=$(docker image inspect -f '{{{{.Id}}}}' {REGISTRY_IMAGE}) && "
                              f"printf 'FROM {REGISTRY_IMAGE}\\nLABEL rebuilt=yes\\n' | "
                              f"docker build -q -t {REGISTRY_IMAGE} - >/dev/null 2>&1 && "
                              f"docker push -q {REGISTRY_IMAGE} >/dev/null && "
                              f"new=$(docker image inspect -f '{{{{.Id}}}}' {REGISTRY_IMAGE}) && "
                              f"docker tag $old {REGISTRY_IMAGE} && echo $new")
    assert code == 0, out
    newer_id = out.strip().splitlines()[-1]

    behind = fab(host, "deps.images", env=IMAGES_ENV)
    assert behind.returncode == 1, behind.stdout + behind.stderr
    assert f"1 image(s) have updates on root@{host.ip}: {REGISTRY_IMAGE}" in one_line(behind)
    assert "update" in behind.stdout and "127.0.0.1:5000 has sha256:" in behind.stdout

    pulled = fab(host, "deps.images", "--pull", env=IMAGES_ENV)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert "pulled 1: the next `release` builds the api on them" in pulled.stdout
    assert console(host, f"docker image inspect -f '{{{{.Id}}}}' {REGISTRY_IMAGE}")[1].strip() == newer_id
    again = fab(host, "deps.images", env=IMAGES_ENV)
    assert again.returncode == 0 and "current" in again.stdout, again.stdout + again.stderr
