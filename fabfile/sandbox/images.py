"""Container images for sandbox hosts, built without a registry (Docker Hub is unreachable).

Each image family is a Debian trixie tree made by `mmdebstrap --variant=essential` with the
packages it needs. The tree's tarball becomes the single layer of a `docker save` archive
that this module writes itself (manifest.json + image config + layer.tar, the format
`docker load` reads), so no Docker engine is needed on this machine: the result is what
`docker import --change 'USER ..' --change 'CMD ..'` followed by `docker save` would give.
The archive is compressed with zstd and cached under <sandbox cache>/images/, keyed by a
hash of everything that goes into it (suite, packages, hooks, entrypoint scripts, image
config). `load_images(host)` streams the cached archives into a sandbox host's
`docker load` (which reads zstd itself) and skips images the host already has.

    coachntt/python-base   python3 + aiohttp + psycopg2, user `app` (10001), WORKDIR /app
    coachntt/postgres      PostgreSQL (initdb on first start from POSTGRES_* env), user postgres
    coachntt/pgbouncer     the same tree, entrypoint writes pgbouncer.ini from the same env

The archives are ordinary `docker load` input, so any Docker host can take them
(`ssh host docker load < ctr-postgres-<key>.tar.zst`); production needs the same tags.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .image import mirror_lines
from .network import apt_proxy_url, ensure_network
from .paths import REPO_ROOT, SandboxError, images_dir
from .util import file_lock, shared_lock

SUITE = "trixie"
FORMAT_VERSION = 1  # bump when the archive layout or build recipe changes incompatibly
ENTRYPOINTS_DIR = REPO_ROOT / "examples" / "app" / "images"
STALE_ARCHIVE_AGE = 7 * 24 * 3600
ARCHIVE_PREFIX = "ctr-"  # images/ also holds the host trees; ours are ctr-<family>-<key>.tar.zst

# Documentation, man pages and translations are never read inside a container.
SLIM_EXCLUDES = (
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/lintian/*",
)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ImageConfig:
    """One tag made from a family's tree, with the settings `docker import --change` sets."""

    tag: str
    user: str
    cmd: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    workdir: str = "/"
    expose: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()

    def docker_config(self) -> dict:
        config = {
            "User": self.user,
            "Env": [f"PATH={DEFAULT_PATH}", "LANG=C.UTF-8", *self.env],
            "WorkingDir": self.workdir,
            "Cmd": list(self.cmd) or None,
            "Entrypoint": list(self.entrypoint) or None,
            "Labels": {"org.opencontainers.image.source": "coachntt-ops fabfile/sandbox/images.py"},
        }
        if self.expose:
            config["ExposedPorts"] = {port: {} for port in self.expose}
        if self.volumes:
            config["Volumes"] = {volume: {} for volume in self.volumes}
        return config


@dataclass(frozen=True)
class ImageFamily:
    """One mmdebstrap tree and the image tags made from it."""

    name: str
    packages: tuple[str, ...]
    images: tuple[ImageConfig, ...]
    # (source file, destination in the tree, mode), uploaded before the customize hooks run
    files: tuple[tuple[Path, str, int], ...] = ()
    # shell run on this machine after the packages are installed; $1 is the tree
    customize: tuple[str, ...] = ()
    excludes: tuple[str, ...] = field(default=SLIM_EXCLUDES)
    skip: tuple[str, ...] = ()  # extra mmdebstrap --skip= steps

    def key(self) -> str:
        """Hash of everything that decides the archive's content."""
        digest = hashlib.sha256()
        recipe = {
            "format": FORMAT_VERSION,
            "suite": SUITE,
            "mirrors": mirror_lines(SUITE),
            "packages": sorted(self.packages),
            "excludes": list(self.excludes),
            "customize": list(self.customize),
            "skip": list(self.skip),
            "files": [(dest, mode) for _, dest, mode in self.files],
            "images": [(image.tag, image.docker_config()) for image in self.images],
        }
        digest.update(json.dumps(recipe, sort_keys=True).encode())
        for source, _, _ in self.files:
            digest.update(source.read_bytes())
        return digest.hexdigest()[:16]

    def archive_path(self, cache: Path | None = None) -> Path:
        return (cache or images_dir()) / f"{ARCHIVE_PREFIX}{self.name}-{self.key()}.tar.zst"

    def tags(self) -> list[str]:
        return [image.tag for image in self.images]

    def mmdebstrap_command(self, output: Path) -> list[str]:
        cmd = [
            "mmdebstrap",
            "--variant=essential",
            "--quiet",
            "--mode=root",
            f"--include={','.join(self.packages)}",
            # downloads go through the sandbox's caching apt proxy, shared with the host images
            f'--aptopt=Acquire::http::Proxy "{apt_proxy_url()}"',
            "--skip=output/dev",  # docker provides /dev; device nodes in a layer only get in the way
        ]
        cmd += [f"--skip={step}" for step in self.skip]
        cmd += [f"--dpkgopt=path-exclude={pattern}" for pattern in self.excludes]
        for source, dest, mode in self.files:
            cmd.append(f"--customize-hook=upload {shlex.quote(str(source))} {shlex.quote(dest)}")
            cmd.append(f'--customize-hook=chmod {mode:o} "$1"{shlex.quote(dest)}')
        cmd += [f"--customize-hook={hook}" for hook in self.customize]
        cmd += [
            # apt's lists and the dpkg/debconf leftovers are not needed to run anything
            '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/* "$1"/etc/apt/apt.conf.d/99mmdebstrap',
            SUITE,
            str(output),
            *mirror_lines(SUITE),
        ]
        return cmd


PYTHON_BASE = ImageFamily(
    name="python-base",
    packages=("python3", "python3-aiohttp", "python3-psycopg2", "python-is-python3", "ca-certificates"),
    customize=(
        # the non-root user the API runs as (essential has no adduser: write the entries)
        'echo "app:x:10001:10001:CoachNTT API:/app:/usr/sbin/nologin" >> "$1/etc/passwd"',
        'echo "app:x:10001:" >> "$1/etc/group"',
        'mkdir -p "$1/app"',
    ),
    images=(
        ImageConfig(
            tag="coachntt/python-base:3.13-trixie",
            user="app",
            cmd=("python3",),
            env=("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"),
            workdir="/app",
        ),
    ),
)

POSTGRES = ImageFamily(
    name="postgres",
    packages=("postgresql", "pgbouncer"),
    skip=("cleanup/run",),
    # JIT is off in the entrypoint's config; LLVM and z3 alone would triple the image
    excludes=SLIM_EXCLUDES + ("/usr/lib/*/libLLVM*", "/usr/lib/*/libz3*", "/usr/lib/postgresql/*/lib/bitcode/*"),
    files=(
        (ENTRYPOINTS_DIR / "postgres-entrypoint.sh", "/usr/local/bin/postgres-entrypoint", 0o755),
        (ENTRYPOINTS_DIR / "pgbouncer-entrypoint.sh", "/usr/local/bin/pgbouncer-entrypoint", 0o755),
    ),
    customize=(
        # the package's own cluster is not used: the entrypoint initdb's into the volume
        'rm -rf "$1"/var/lib/postgresql/*/main "$1"/etc/postgresql/*/main',
        # server binaries (initdb, postgres, pg_ctl) on PATH, ahead of Debian's wrappers
        'for f in "$1"/usr/lib/postgresql/*/bin/*; do ln -sf "${f#"$1"}" "$1/usr/local/bin/"; done',
        # the socket directory lives in /run, which mmdebstrap would empty (skip=cleanup/run):
        # clean /run here instead, keeping only what the image needs
        'find "$1/run" -mindepth 1 -maxdepth 1 ! -name lock ! -name postgresql -exec rm -rf {} +',
        'mkdir -p "$1/var/lib/postgresql/data" "$1/run/postgresql"',
        'chroot "$1" chown postgres:postgres /var/lib/postgresql/data /run/postgresql',
        'chmod 700 "$1/var/lib/postgresql/data"; chmod 2775 "$1/run/postgresql"',
    ),
    images=(
        ImageConfig(
            tag="coachntt/postgres:17-trixie",
            user="postgres",
            entrypoint=("/usr/local/bin/postgres-entrypoint",),
            env=("PGDATA=/var/lib/postgresql/data",),
            workdir="/var/lib/postgresql",
            expose=("5432/tcp",),
            volumes=("/var/lib/postgresql/data",),
        ),
        ImageConfig(
            tag="coachntt/pgbouncer:1.24-trixie",
            user="postgres",
            entrypoint=("/usr/local/bin/pgbouncer-entrypoint",),
            workdir="/tmp",
            expose=("6432/tcp",),
        ),
    ),
)

FAMILIES = (PYTHON_BASE, POSTGRES)


def _log(log, message: str) -> None:
    if log:
        log(message)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


def image_configs(family: ImageFamily, diff_id: str, created: str, built_by: str) -> dict[str, bytes]:
    """The docker image config JSON of every tag of the family, as bytes (their sha is the image id)."""
    configs = {}
    for image in family.images:
        config = {
            "architecture": "amd64",
            "os": "linux",
            "created": created,
            "config": image.docker_config(),
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
            "history": [{"created": created, "created_by": built_by}],
        }
        configs[image.tag] = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    return configs


def write_docker_archive(family: ImageFamily, layer_tar: Path, output: Path) -> dict[str, str]:
    """Write `docker save` format (one shared layer, one config per tag) through zstd.

    Returns {tag: image id}.
    """
    diff_id = _sha256_file(layer_tar)
    now = time.time()
    created = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    built_by = f"mmdebstrap --variant=essential {SUITE} + {' '.join(family.packages)} (coachntt sandbox images)"
    configs = image_configs(family, diff_id, created, built_by)
    ids = {tag: hashlib.sha256(data).hexdigest() for tag, data in configs.items()}
    manifest = [
        {"Config": f"{ids[tag]}.json", "RepoTags": [tag], "Layers": [f"{diff_id}/layer.tar"]} for tag in configs
    ]
    with open(output, "wb") as sink:
        zstd = subprocess.Popen(["zstd", "-q", "-T0", "-6", "-c"], stdin=subprocess.PIPE, stdout=sink)
        try:
            with tarfile.open(fileobj=zstd.stdin, mode="w|", format=tarfile.PAX_FORMAT) as archive:
                for tag, data in configs.items():
                    _add_bytes(archive, f"{ids[tag]}.json", data, now)
                _add_bytes(archive, f"{diff_id}/VERSION", b"1.0", now)
                info = tarfile.TarInfo(f"{diff_id}/layer.tar")
                info.size = layer_tar.stat().st_size
                info.mtime = int(now)
                info.mode = 0o644
                with open(layer_tar, "rb") as layer:
                    archive.addfile(info, layer)
                _add_bytes(archive, "manifest.json", json.dumps(manifest).encode(), now)
        finally:
            zstd.stdin.close()
            code = zstd.wait()
    if code != 0:
        raise SandboxError(f"zstd failed (exit {code}) writing {output}")
    return {tag: f"sha256:{image_id}" for tag, image_id in ids.items()}


def require_build_tools() -> None:
    missing = [tool for tool in ("mmdebstrap", "zstd") if not shutil.which(tool)]
    if missing:
        raise SandboxError(f"building container images needs {', '.join(missing)}: apt-get install mmdebstrap zstd")
    if os.geteuid() != 0:
        raise SandboxError("building container images needs root (mmdebstrap chroots); run as root")


def prune_stale_archives(family: ImageFamily, *, keep: tuple[str, ...], directory: Path) -> None:
    """Archives of the family's other keys go once a week old, not at once: another
    checkout (a branch, a CI clone) may be loading its own key's archive into a host now."""
    for stale in directory.glob(f"{ARCHIVE_PREFIX}{family.name}-*.tar.zst*"):
        if stale.name not in keep and time.time() - stale.stat().st_mtime > STALE_ARCHIVE_AGE:
            stale.unlink(missing_ok=True)


def build_family(family: ImageFamily, *, cache: Path | None = None, force: bool = False, log=None) -> Path:
    """Build (or reuse) the family's cached archive; return its path.

    The archive's sidecar `<archive>.json` records the tags and image ids.
    """
    output = family.archive_path(cache)
    meta = output.with_name(output.name + ".json")
    with file_lock(f"ctr-image-{family.name}"):
        if output.exists() and meta.exists() and not force:
            _log(log, f"image {family.name}: cached {output.name}")
            return output
        require_build_tools()
        output.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"ctr-{family.name}-", dir=output.parent) as tmp:
            layer = Path(tmp) / "rootfs.tar"
            cmd = family.mmdebstrap_command(layer)
            _log(log, f"image {family.name}: mmdebstrap {SUITE} {' '.join(family.packages)}")
            with shared_lock("network-users"):  # keeps the proxy up meanwhile
                ensure_network()
                result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                lines = (result.stderr or result.stdout).strip().splitlines()
                errors = [line for line in lines if line.startswith("E:")] or lines[-3:]
                raise SandboxError(f"mmdebstrap for image {family.name} failed: {' | '.join(errors)[-400:]}")
            tree_seconds = time.monotonic() - started
            partial = Path(tmp) / output.name
            ids = write_docker_archive(family, layer, partial)
            os.replace(partial, output)
        prune_stale_archives(family, keep=(output.name, meta.name), directory=output.parent)
        meta.write_text(json.dumps({"family": family.name, "key": family.key(), "images": ids}, indent=2) + "\n")
        _log(
            log,
            f"image {family.name}: built in {time.monotonic() - started:.1f}s "
            f"(tree {tree_seconds:.1f}s, {output.stat().st_size / 1e6:.0f} MB)",
        )
        return output


def build_images(
    families=FAMILIES, *, cache: Path | None = None, force: bool = False, log=None
) -> dict[str, Path]:
    """Build the families (in parallel: downloads and dpkg overlap); {family: archive path}."""
    with ThreadPoolExecutor(max_workers=len(families)) as pool:
        futures = {family.name: pool.submit(build_family, family, cache=cache, force=force, log=log) for family in families}
        return {name: future.result() for name, future in futures.items()}


def archive_images(archive: Path) -> dict[str, str]:
    """{tag: image id} of a built archive, from its sidecar."""
    meta = archive.with_name(archive.name + ".json")
    try:
        return json.loads(meta.read_text())["images"]
    except (OSError, ValueError, KeyError) as exc:
        raise SandboxError(f"{meta} is missing or unreadable ({exc}); rebuild with force=True") from None


# --- loading into sandbox hosts ------------------------------------------------------


def host_exec(host, command: str, *, stdin=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a shell command as root inside a sandbox host (works after `secure` turns root login off)."""
    from .hosts import enter

    return enter(host.name, command, stdin=stdin, timeout=timeout)


def _present_ids(host, tags: list[str]) -> dict[str, str]:
    quoted = " ".join(shlex.quote(tag) for tag in tags)
    script = f"for t in {quoted}; do printf '%s %s\\n' \"$t\" \"$(docker image inspect -f '{{{{.Id}}}}' \"$t\" 2>/dev/null)\"; done"
    result = host_exec(host, script, timeout=60)
    present = {}
    for line in result.stdout.decode(errors="replace").splitlines():
        tag, _, image_id = line.partition(" ")
        if image_id.strip():
            present[tag] = image_id.strip()
    return present


def load_images(host, *, cache: Path | None = None, families=FAMILIES, log=None) -> dict[str, str]:
    """Make the host's Docker hold every image of `families`; build archives if needed.

    Images whose id already matches are not sent again. Returns {tag: image id}.
    """
    archives = build_images(families, cache=cache, log=log)
    wanted: dict[str, str] = {}
    for family in families:
        images = archive_images(archives[family.name])
        present = _present_ids(host, list(images))
        wanted.update(images)
        if all(present.get(tag) == image_id for tag, image_id in images.items()):
            _log(log, f"image {family.name}: already loaded on {host.name}")
            continue
        started = time.monotonic()
        with open(archives[family.name], "rb") as stream:
            # docker load reads zstd itself: the compressed archive goes over the wire
            result = host_exec(host, "docker load -q", stdin=stream, timeout=600)
        if result.returncode != 0:
            detail = result.stderr.decode(errors="replace").strip().splitlines()
            raise SandboxError(
                f"docker load of {family.name} on {host.name} failed: {detail[-1] if detail else result.returncode}"
            )
        _log(log, f"image {family.name}: loaded on {host.name} in {time.monotonic() - started:.1f}s")
    present = _present_ids(host, list(wanted))
    wrong = [tag for tag, image_id in wanted.items() if present.get(tag) != image_id]
    if wrong:
        raise SandboxError(f"after docker load, {host.name} lacks {', '.join(wrong)}")
    return wanted

