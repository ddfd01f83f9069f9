"""Base images of the test VPS hosts, built with mmdebstrap and cached.

Three honest flavours, each its own tree (built in parallel, ~1-2 min cold):

* fresh        — a new VPS: systemd, sshd (key login for root), sudo, ufw, python3,
                 curl, git, cron. `deps` really installs nginx/docker through the proxy.
* ubuntu-like  — fresh + Docker pre-installed + what Ubuntu 24.04 cloud images do:
                 ssh.socket activation, 50-cloud-init.conf (password + root login on),
                 a root password. Hardening must win over all of it.
* provisioned  — fresh + everything `deps` and `secure` install (nginx, certbot,
                 fail2ban, unattended-upgrades, Docker + compose v2, psql), for the
                 deploy/backup/ssl/monitor tests.

Each tree is stored as images/<flavour>-<suite>-<key>.tar.zst, where key hashes the
package list, suite, mirrors and every file baked in (configs/sandbox, the customize
script). The unpacked tree in base/ is the read-only lower layer of every host's overlay.
Package downloads go through the sandbox apt proxy, so rebuilds reuse cached .debs.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .network import apt_proxy_url, ensure_network
from .paths import CONFIGS_DIR, SCRIPTS_DIR, SandboxError, base_trees_dir, images_dir
from .util import file_lock, require_tools, run, shared_lock

FLAVOURS = ("fresh", "ubuntu-like", "provisioned")
SUITES = ("trixie", "bookworm")
DEFAULT_SUITE = "trixie"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
IMAGE_FORMAT = "1"  # bump to invalidate every cached image

FRESH_PACKAGES = [
    "systemd", "systemd-sysv", "dbus", "libpam-systemd", "openssh-server", "sudo",
    "python3", "curl", "ca-certificates", "iproute2", "iputils-ping", "procps",
    "ufw", "cron", "git", "less", "rsync",
]
DOCKER_PACKAGES = ["docker.io", "docker-cli", "docker-compose"]  # docker-cli: only a Recommends
PROVISIONED_EXTRA = [
    "nginx", "certbot", "python3-certbot-nginx", "fail2ban", "python3-systemd",
    "unattended-upgrades", "needrestart", "postgresql-client", "iptables", "nftables",
]
CUSTOMIZE_SCRIPT = SCRIPTS_DIR / "customize-image.sh"


def packages_for(flavour: str, suite: str) -> list[str]:
    if flavour not in FLAVOURS:
        raise SandboxError(f"flavour must be one of {', '.join(FLAVOURS)}, got {flavour!r}")
    docker = [p for p in DOCKER_PACKAGES if not (suite == "bookworm" and p == "docker-cli")]
    extra = {"fresh": [], "ubuntu-like": docker, "provisioned": docker + PROVISIONED_EXTRA}[flavour]
    return FRESH_PACKAGES + extra


def mirror_lines(suite: str) -> list[str]:
    return [
        f"deb {MIRROR} {suite} main",
        f"deb {MIRROR} {suite}-updates main",
        f"deb {SECURITY_MIRROR} {suite}-security main",
    ]


def image_key(flavour: str, suite: str) -> str:
    """Hash of everything that goes into the image: change any of it, get a new image."""
    digest = hashlib.sha256()
    for part in [IMAGE_FORMAT, flavour, suite, *packages_for(flavour, suite), *mirror_lines(suite)]:
        digest.update(part.encode() + b"\0")
    for path in sorted([CUSTOMIZE_SCRIPT, *CONFIGS_DIR.rglob("*")]):
        if path.is_file():
            digest.update(str(path.relative_to(CONFIGS_DIR.parent.parent)).encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def image_name(flavour: str, suite: str) -> str:
    return f"{flavour}-{suite}-{image_key(flavour, suite)}"


def check_suite(suite: str | None) -> str:
    suite = suite or DEFAULT_SUITE
    if suite not in SUITES:
        raise SandboxError(f"suite must be one of {', '.join(SUITES)}, got {suite!r}")
    return suite


def ensure_image(flavour: str = "fresh", suite: str | None = None, force: bool = False) -> Path:
    """The unpacked, ready base tree for flavour/suite: built or unpacked only when missing."""
    suite = check_suite(suite)
    name = image_name(flavour, suite)
    tree = base_trees_dir() / name
    tarball = images_dir() / f"{name}.tar.zst"
    with file_lock(f"image-{flavour}-{suite}"):
        if force:
            refuse_if_in_use(tree)
            shutil.rmtree(tree, ignore_errors=True)
            tarball.unlink(missing_ok=True)
        if is_complete(tree):
            return tree
        require_tools("zstd", "tar")
        if tarball.exists():
            unpack(tarball, tree)
        else:
            build(flavour, suite, tree, tarball)
        prune_old_images(flavour, suite, keep=name)
    return tree


def ensure_images(suite: str | None = None, force: bool = False, flavours=FLAVOURS) -> dict[str, Path]:
    """Build/unpack several flavours at once (the builds are I/O + dpkg bound)."""
    with ThreadPoolExecutor(max_workers=len(flavours)) as pool:
        futures = {flavour: pool.submit(ensure_image, flavour, suite, force) for flavour in flavours}
        return {flavour: future.result() for flavour, future in futures.items()}


def is_complete(tree: Path) -> bool:
    return (tree / ".coachntt-complete").exists()


def mark_complete(tree: Path) -> None:
    (tree / ".coachntt-complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))


def build(flavour: str, suite: str, tree: Path, tarball: Path) -> None:
    require_tools("mmdebstrap")
    building = tree.with_name(tree.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    log = images_dir() / f"{tree.name}.build.log"
    cmd = [
        "mmdebstrap", "--variant=apt", "--mode=root",
        f"--include={','.join(packages_for(flavour, suite))}",
        f'--aptopt=Acquire::http::Proxy "{apt_proxy_url()}"',
        f'--customize-hook="{CUSTOMIZE_SCRIPT}" "$1" {flavour} "{CONFIGS_DIR}"',
        suite, str(building), *mirror_lines(suite),
    ]
    with log.open("w") as out, shared_lock("network-users"):  # keeps the proxy up meanwhile
        ensure_network()  # the build downloads through the caching proxy
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        raise SandboxError(f"building the {flavour} image failed; see {log}")
    pack(building, tarball)
    mark_complete(building)
    building.rename(tree)


TAR_OPTS = "--numeric-owner --xattrs --xattrs-include='*'"


def pack(tree: Path, tarball: Path) -> None:
    partial = tarball.with_name(tarball.name + ".part")
    run(["bash", "-o", "pipefail", "-c",
         f"tar {TAR_OPTS} -C '{tree}' -cf - . | zstd -T0 -3 -q -f -o '{partial}'"])
    partial.rename(tarball)


def unpack(tarball: Path, tree: Path) -> None:
    partial = tree.with_name(tree.name + ".unpacking")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    run(["bash", "-o", "pipefail", "-c", f"zstd -dc -T0 '{tarball}' | tar {TAR_OPTS} -C '{partial}' -xf -"])
    mark_complete(partial)
    partial.rename(tree)


def mounted_lowerdirs() -> str:
    return Path("/proc/mounts").read_text()


def refuse_if_in_use(tree: Path) -> None:
    if str(tree) in mounted_lowerdirs():
        raise SandboxError(f"image {tree.name} is in use by running hosts; run sandbox.down --all first")


def prune_old_images(flavour: str, suite: str, keep: str) -> None:
    """Drop trees/tarballs of older keys of the same flavour+suite that no host uses."""
    prefix = f"{flavour}-{suite}-"
    mounts = mounted_lowerdirs()
    for path in [*base_trees_dir().glob(prefix + "*"), *images_dir().glob(prefix + "*")]:
        if path.name.startswith(keep) or str(path) in mounts:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
