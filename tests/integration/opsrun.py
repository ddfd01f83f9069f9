"""How integration tests drive the tool and look at a sandbox host.

`fab(...)` runs the real CLI in a subprocess exactly as an operator would;
`ssh(...)` uses the system OpenSSH client with strict host-key checking;
`console(...)` is the provider's console (no SSH) for checking state.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fabfile import sandbox

PROJECT_DIR = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def fab(host, *args: str, user: str = "root", env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    command = [str(BIN / "fab"), "-H", f"{user}@{host.ip}", "-i", str(host.key), *args]
    return subprocess.run(
        command, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def fab_in_background(host, *args: str, user: str = "coachntt", env: dict | None = None) -> subprocess.Popen:
    """The real CLI in the background, in its own process group (for signals)."""
    command = [str(BIN / "fab"), "-H", f"{user}@{host.ip}", "-i", str(host.key), *args]
    return subprocess.Popen(command, cwd=PROJECT_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def one_line(result: subprocess.CompletedProcess, *words: str) -> str:
    """The one stderr line a refused or failed task prints (never a traceback), holding `words`."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def ssh(host, command: str, *, user: str = "root", extra: tuple[str, ...] = (), timeout: int = 30) -> subprocess.CompletedProcess:
    """The system ssh client, key only, strict host keys, never a prompt."""
    return subprocess.run(
        ["ssh", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={host.known_hosts}", "-o", "ConnectTimeout=5",
         "-i", str(host.key), *extra, f"{user}@{host.ip}", command],
        capture_output=True, text=True, timeout=timeout,
    )


def ssh_retrying(host, command: str, *, user: str = "root", attempts: int = 5, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """OpenSSH 10 briefly penalises sources that failed to log in: back off, bounded."""
    result = ssh(host, command, user=user, extra=extra)
    for attempt in range(attempts - 1):
        if result.returncode != 255 or "Permission denied" in result.stderr:
            break
        time.sleep(1 + attempt)
        result = ssh(host, command, user=user, extra=extra)
    return result


def console(host, command: str) -> tuple[int, str]:
    return sandbox.console(host.name, command)


def host_state(host) -> str:
    """A fingerprint of what `secure`/`nginx` may change, read through the console."""
    code, out = console(
        host,
        "find /etc/ssh /etc/sudoers.d /etc/ufw /etc/fail2ban /etc/nginx /etc/apt/apt.conf.d /home "
        "-xdev -type f -exec sha256sum {} + 2>/dev/null | sort; getent passwd coachntt; "
        "dpkg-query -W -f='${Package} ${Version}\\n' | sha256sum; ufw status 2>&1 | head -1",
    )
    assert code == 0, out
    return out



OVERRIDE = PROJECT_DIR / "configs" / "sandbox" / "compose.sandbox.yml"
OVERRIDE_ON_HOST = "/etc/coachntt-sandbox/compose.sandbox.yml"


def ready_for_the_app(host, env: dict | None = None) -> None:
    """A provisioned host made ready to deploy examples/app: the container images
    loaded, the sandbox's compose override in place (no CPU limits in guests), secured,
    nginx in front (a release switches nginx between the api's slots)."""
    from fabfile.sandbox import images

    images.load_images(host)
    payload = base64.b64encode(OVERRIDE.read_bytes()).decode()
    code, out = console(host, f"mkdir -p {Path(OVERRIDE_ON_HOST).parent} && echo {payload} | base64 -d > {OVERRIDE_ON_HOST}")
    assert code == 0, out
    secured = fab(host, "secure")
    assert secured.returncode == 0, secured.stdout + secured.stderr
    proxy = fab(host, "nginx", user="coachntt", env=env)
    assert proxy.returncode == 0, proxy.stdout + proxy.stderr


# What serves the api is whichever slot nginx sends it to: ask nginx, as a client would.
API_DOMAIN = "api.coachntt.ai"


def through_nginx(path: str, curl: str = "curl") -> str:
    """A curl command line (run on the host) for `path` of the api, through nginx."""
    return f"{curl} -s -m 5 -H 'Host: {API_DOMAIN}' http://127.0.0.1{path}"


@contextmanager
def example_app_served(directory: Path) -> Iterator[tuple[Path, str, dict]]:
    """examples/app as a git repository in `directory`, served by a git daemon on the
    bridge for as long as the block runs: (repository, its first sha, the settings
    that deploy it)."""
    from fabfile.sandbox import example_repo

    repo = directory / "app"
    first = example_repo.make_example_repo(repo)
    with example_repo.GitDaemon(directory) as git:
        yield repo, first, {
            "COACHNTT_APP__REPO": git.url("app"),
            "COACHNTT_APP__COMPOSE_OVERRIDES": OVERRIDE_ON_HOST,
            "COACHNTT_APP__HEALTH_DEADLINE": "25",
        }


DEBIAN_RUNTIME = "python3-fabric python3-invoke python3-dotenv python3-jinja2 python3-yaml"


def install_tool_on_host(host, path: str = "/opt/coachntt-ops") -> None:
    """Put this checkout on the host with Debian's Python packages, as an operator
    would to run `inv TASK` on the server itself (no PyPI needed there)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=PROJECT_DIR, capture_output=True, check=True).stdout
    archive = subprocess.run(["tar", "-c", "--null", "-T", "-"], cwd=PROJECT_DIR, input=files, capture_output=True, check=True).stdout
    code, out = console(
        host,
        f"DEBIAN_FRONTEND=noninteractive apt-get -q -y update >/dev/null && "
        f"DEBIAN_FRONTEND=noninteractive apt-get -q -y install --no-install-recommends {DEBIAN_RUNTIME} >/dev/null",
    )
    assert code == 0, out
    unpacked = sandbox.hosts.enter(host.name, f"mkdir -p {path} && tar -x -C {path}", stdin=archive)
    assert unpacked.returncode == 0, unpacked.stderr


# -- several hosts, and work on a host's console

# The sandbox's /proc/stat is this shared build machine's (see test_monitor.py).
SHARED_CPU = {"COACHNTT_THRESHOLDS__CPU_PERCENT_MAX": "100"}


def fab_many(hosts, *args: str, env: dict | None = None, timeout: int = 300) -> tuple[subprocess.CompletedProcess, float]:
    """The real CLI over several hosts (`fab -H a,b,c`), and how long it took."""
    command = [str(BIN / "fab"), "-H", ",".join(f"root@{h.ip}" for h in hosts), "-i", str(hosts[0].key), *args]
    started = time.monotonic()
    result = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **SHARED_CPU, **(env or {})})
    return result, time.monotonic() - started


def sh(host, command: str, timeout: float = 300) -> str:
    code, out = console(host, command) if timeout <= 120 else _long_console(host, command, timeout)
    assert code == 0, out
    return out


def _long_console(host, command: str, timeout: float) -> tuple[int, str]:
    result = sandbox.hosts.enter(host.name, command, timeout=timeout)
    return result.returncode, (result.stdout + result.stderr).decode(errors="replace")


def put(host, path: str, data: bytes, mode: str = "644") -> None:
    payload = base64.b64encode(data).decode()
    sh(host, f"mkdir -p $(dirname {path}) && echo {payload} | base64 -d > {path} && chmod {mode} {path}")
