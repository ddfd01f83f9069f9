"""This project as one tarball for a server: its files, the wheels of its pinned
dependencies for the server's Python, and a digest that names the result.

    release   0.1.0-3f9c2a1b7d4e          pyproject's version + the digest's first 12 hex digits
    digest    sha256 over the project files (path, mode, content), the pinned
              requirements, the versions they are constrained to, and the server's
              Python (cp3.13-x86_64). Equal digests = the same install, so a
              second `tool.install` compares digests and changes nothing.
    tarball   the project files + .bundle/requirements.txt + .bundle/wheels/*.whl

Servers may have no PyPI (the sandbox has only a Debian mirror), so the wheels are
fetched HERE with `pip download --platform manylinux2014_<arch> --python-version X.Y`
and cached under ~/.cache/coachntt-ops/wheels/<X.Y>-<arch>/: a second build reads the
cache offline and downloads nothing. Dependencies beyond the pins are constrained to
the versions this machine runs, so the server runs what the operator tested.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .errors import OpsError, UsageError
from .settings import PROJECT_DIR

# What runs on the server. Tests, benchmarks, examples and CI files stay home;
# .env.* never travel (secrets), whatever lists them.
RUNTIME = ("fabfile/", "configs/", "scripts/", "tasks.py", "invoke.yaml", "fabric.yaml", "pyproject.toml", "README.md")
BUNDLE_FORMAT = "coachntt-ops bundle 1"
ARCHES = ("x86_64", "aarch64")
WHEEL_CACHE = Path("~/.cache/coachntt-ops/wheels")


@dataclass(frozen=True)
class ServerPython:
    """The server's `python3`: version X.Y and machine, read in one probe."""

    version: str
    arch: str

    @property
    def tag(self) -> str:
        return f"cp{self.version}-{self.arch}"


PYTHON_PROBE = "python3 -c 'import platform, sys; print(\"%d.%d\" % sys.version_info[:2], platform.machine())'"


def parse_python(text: str) -> ServerPython | None:
    found = re.fullmatch(r"(3\.\d{1,2}) ([A-Za-z0-9_]+)", text.strip())
    return ServerPython(found.group(1), found.group(2)) if found else None


def require_supported(python: ServerPython, where: str) -> None:
    if python.arch not in ARCHES:
        raise UsageError(f"python3 on {where} runs on {python.arch}: wheels are built for {' and '.join(ARCHES)} only",
                         "install the tool there by hand (pip install fabric==3.2.2 ...)")
    if tuple(int(p) for p in python.version.split(".")) < (3, 11):
        raise UsageError(f"python3 on {where} is {python.version}; the tool needs 3.11 or newer", "upgrade the server's Python")


# -- what goes in ------------------------------------------------------------------


def project_files(project_dir: Path = PROJECT_DIR) -> list[str]:
    """Relative paths of the files to ship: what git tracks or would track (not ignored) inside
    RUNTIME, so a new module not yet committed travels too; a walk of RUNTIME without git."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *RUNTIME],
                                cwd=project_dir, capture_output=True, timeout=60)
        names = listed.stdout.decode().split("\0") if listed.returncode == 0 and listed.stdout else None
    except (OSError, subprocess.TimeoutExpired):
        names = None
    if names is None:  # not a git checkout (an unpacked copy): the runtime set itself
        names = []
        for entry in RUNTIME:
            path = project_dir / entry
            if path.is_dir():
                names += [str(p.relative_to(project_dir)) for p in path.rglob("*") if p.is_file() or p.is_symlink()]
            elif path.exists() or path.is_symlink():
                names.append(entry)
    return sorted(n for n in set(names) if n and shippable(n) and ((project_dir / n).exists() or (project_dir / n).is_symlink()))


def shippable(name: str) -> bool:
    parts = name.split("/")
    return not (any(p.startswith(".env.") for p in parts) or parts[0] == "tests" or "__pycache__" in parts or name.endswith(".pyc"))


def requirements(project_dir: Path = PROJECT_DIR) -> list[str]:
    """The pinned dependencies from pyproject.toml, as pip requirement lines."""
    return list(tomllib.loads((project_dir / "pyproject.toml").read_text())["project"]["dependencies"])


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _name_of(requirement: str) -> str:
    found = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return canonical(found.group(1)) if found else ""


_OPTIONAL = re.compile(r"\bextra\s*==")


def local_constraints(pins: list[str]) -> list[str]:
    """`name==version` for every dependency below the pins, as installed on this machine.

    The closure follows each distribution's requirements except optional extras;
    the pins themselves are left to pyproject.toml."""
    pinned = {_name_of(p) for p in pins}
    seen: dict[str, str] = {}
    queue = sorted(pinned)
    while queue:
        name = queue.pop()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = dist.version
        queue += [_name_of(r) for r in dist.requires or [] if not _OPTIONAL.search(r)]
    return [f"{name}=={version}" for name, version in sorted(seen.items()) if name not in pinned]


@dataclass(frozen=True)
class Release:
    """What one install puts on a server for one Python."""

    version: str
    digest: str
    python: ServerPython
    files: tuple[str, ...]
    pins: tuple[str, ...]
    constraints: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.version}-{self.digest[:12]}"


def project_version(project_dir: Path = PROJECT_DIR) -> str:
    version = str(tomllib.loads((project_dir / "pyproject.toml").read_text())["project"]["version"])
    return re.sub(r"[^A-Za-z0-9.+]", "", version)[:40] or "0"


def release_for(python: ServerPython, project_dir: Path = PROJECT_DIR, *, constraints: list[str] | None = None) -> Release:
    files = project_files(project_dir)
    pins = requirements(project_dir)
    held = local_constraints(pins) if constraints is None else constraints
    digest = hashlib.sha256()
    digest.update(f"{BUNDLE_FORMAT}\n{python.tag}\n".encode())
    for name in files:
        digest.update(f"{name}\0{file_kind(project_dir / name)}\0".encode())
        digest.update(hashlib.sha256(file_bytes(project_dir / name)).digest())
    digest.update(("\n".join(pins) + "\n--\n" + "\n".join(held)).encode())
    return Release(project_version(project_dir), digest.hexdigest(), python, tuple(files), tuple(pins), tuple(held))


def file_kind(path: Path) -> str:
    if path.is_symlink():
        return "link"
    return "exec" if os.access(path, os.X_OK) else "file"


def file_bytes(path: Path) -> bytes:
    return os.readlink(path).encode() if path.is_symlink() else path.read_bytes()


# -- wheels --------------------------------------------------------------------------


def pip_download(python: ServerPython, dest: Path, wanted: list[str], constraints_file: Path | None, *,
                 offline_from: Path | None) -> list[str]:
    """The `pip download` command line: wheels only, for the server's interpreter and
    platform. Offline (from the cache alone, ignoring pip's configuration) when
    `offline_from` is given."""
    command = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input", "--quiet"]
    if offline_from is not None:
        command += ["--isolated", "--no-index", "--find-links", str(offline_from)]
    command += ["--only-binary=:all:", "--platform", f"manylinux2014_{python.arch}", "--python-version", python.version,
                "--implementation", "cp", "--dest", str(dest)]
    if constraints_file is not None:
        command += ["--constraint", str(constraints_file)]
    return command + wanted


def wheels(release: Release, into: Path, cache_root: Path = WHEEL_CACHE, *, log=print) -> list[Path]:
    """Exactly the wheels `release` installs, copied into `into` (from the cache; fetched into it when missing)."""
    cache = cache_root.expanduser() / f"{release.python.version}-{release.python.arch}"
    cache.mkdir(parents=True, exist_ok=True)
    constraints = into.parent / "constraints.txt"
    constraints.write_text("".join(f"{c}\n" for c in release.constraints))
    pins = list(release.pins)
    for held in (constraints, None):  # the operator's versions first; without them if they have no wheel there
        if _pip(pip_download(release.python, into, pins, held, offline_from=cache)).returncode == 0:
            break
        fetched = _pip(pip_download(release.python, cache, pins, held, offline_from=None))
        if fetched.returncode == 0 and _pip(pip_download(release.python, into, pins, held, offline_from=cache)).returncode == 0:
            break
        why = _last_line(fetched.stderr)
        if held is None:
            raise OpsError(f"cannot fetch the wheels for python {release.python.version} on {release.python.arch}: {why}",
                           "this machine needs PyPI (or a mirror in pip's configuration) once; later installs use "
                           f"the cache in {cache}")
        log(f"  warning: your versions of the dependencies have no wheels for python {release.python.version} "
            f"on {release.python.arch} ({why}); the server gets the newest that do")
    return sorted(into.glob("*.whl"))


def _pip(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "pip failed without a message"


# -- the tarball ------------------------------------------------------------------------


def tarball(release: Release, wheel_files: list[Path], dest: Path, project_dir: Path = PROJECT_DIR) -> str:
    """Write the release's tarball to `dest`; returns its sha256. Owners are root, times are zero."""
    with tarfile.open(dest, "w") as tar:
        for name in release.files:
            tar.addfile(*_member(name, project_dir / name))
        for path in wheel_files:
            tar.addfile(*_member(f".bundle/wheels/{path.name}", path))
        text = ("".join(f"{p}\n" for p in release.pins)).encode()
        info = tarfile.TarInfo(".bundle/requirements.txt")
        info.size, info.mode = len(text), 0o644
        tar.addfile(info, io.BytesIO(text))
    return hashlib.sha256(dest.read_bytes()).hexdigest()


def _member(name: str, path: Path) -> tuple[tarfile.TarInfo, io.BytesIO | None]:
    info = tarfile.TarInfo(name)
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if path.is_symlink():
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, os.readlink(path), 0o777
        return info, None
    data = path.read_bytes()
    info.size, info.mode = len(data), 0o755 if os.access(path, os.X_OK) else 0o644
    info.mtime = int(path.stat().st_mtime)
    return info, io.BytesIO(data)


@dataclass(frozen=True)
class Built:
    path: Path
    sha256: str
    wheels: int


def build(release: Release, workdir: Path, *, log=print) -> Built:
    """Wheels and tarball for `release` in `workdir` (a temporary directory the caller removes)."""
    wheel_dir = Path(tempfile.mkdtemp(prefix="wheels.", dir=workdir))
    found = wheels(release, wheel_dir, log=log)
    if not found:
        raise OpsError("pip fetched no wheels", "check pyproject.toml's dependencies")
    path = workdir / f"coachntt-ops-{release.name}.tar"
    return Built(path, tarball(release, found, path), len(found))
