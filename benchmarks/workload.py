"""The probes every contender runs: read-only checks like `secure.audit` and the facts
phase of `secure`/`deps`/`nginx` send. Some exit non-zero on some hosts (that is a
fact too); every contender is told to carry on and keep the status.
"""

from __future__ import annotations

PROBE_POOL: dict[str, str] = {
    "sshd_effective": "sshd -T",
    "ufw": "ufw status verbose",
    "fail2ban_jail": "fail2ban-client status sshd",
    "auto_upgrades": "cat /etc/apt/apt.conf.d/20auto-upgrades",
    "unattended_enabled": "systemctl is-enabled unattended-upgrades",
    "listening": "ss -Hltnp",
    "ssh_active": "systemctl is-active ssh",
    "ssh_socket": "systemctl is-enabled ssh.socket",
    "nginx_active": "systemctl is-active nginx",
    "docker_active": "systemctl is-active docker",
    "sshd_config_stat": "stat -c '%a %U:%G %s' /etc/ssh/sshd_config",
    "nginx_version": "dpkg-query -W -f='${Version}\\n' nginx",
    "docker_group": "getent group docker",
    "compose_version": "docker compose version",
    "weak_moduli": "awk '$1 !~ /^#/ && $5 < 2047' /etc/ssh/moduli | wc -l",
    "os_release": "cat /etc/os-release",
}

MAX_PROBES = 200


def probes(count: int) -> dict[str, str]:
    """`count` named probes: the pool in order, then again with a numbered suffix."""
    if not 1 <= count <= MAX_PROBES:
        raise ValueError(f"--probes must be between 1 and {MAX_PROBES}")
    pool = list(PROBE_POOL.items())
    chosen = {}
    for index in range(count):
        name, command = pool[index % len(pool)]
        lap = index // len(pool)
        chosen[f"{name}_{lap}" if lap else name] = command
    return chosen
