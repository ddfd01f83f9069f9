"""secure's OS baseline on real sandbox hosts: each item observably in effect, the
kernel-bound ones skipped with their reason, baseline.skip honoured, and the app
still deploys on the hardened host.

The sandbox hosts are systemd-nspawn containers: the kernel is this machine's, so
sysctl (kernel.* refused), auditd (auditctl -s refused) and acct (accton refused)
cannot take effect there; secure skips them with that reason and the tests assert
exactly that. There are no kernel modules to load in a container either: `modprobe
dccp` failing with modprobe's "Error running install command '/bin/false'" shows the
refusal comes from our modprobe.d file, not from a missing module.
"""

from __future__ import annotations

import json

import pytest

from opsrun import console, example_app_served, fab, json_lines, ready_for_the_app, ssh

pytestmark = pytest.mark.slow

FLAVOURS = ["fresh", "ubuntu-like"]
CONTAINER_SKIPPED = {"baseline sysctl", "baseline auditd", "baseline process-accounting"}
BANNER = "Authorised access only."


def secured(host, *args: str, env: dict | None = None) -> list[dict]:
    result = fab(host, "secure", "--json", *args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return [r for r in json_lines(result.stdout) if "step" in r]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_baseline_item_is_in_effect_after_secure(vps_factory, flavour):
    host = vps_factory(flavour=flavour)
    code, out = console(host, "test -e /etc/modprobe.d/coachntt-blacklist.conf || test -e /etc/sudoers.d/90-coachntt")
    assert code != 0, "a fresh host must not look hardened already, or the test proves nothing"

    steps = {r["step"]: r for r in secured(host)}
    for name in CONTAINER_SKIPPED:
        assert steps[name]["status"] == "skipped" and steps[name]["reason"].startswith("in a container (systemd-nspawn)"), steps[name]

    # login.defs + pam_umask: a file made on a NEW login is 640, not 644 (or 660 by usergroups).
    made = ssh(host, "umask; rm -f /tmp/baseline-umask; touch /tmp/baseline-umask; stat -c %a /tmp/baseline-umask; echo $TMPDIR",
               user="coachntt")
    assert made.returncode == 0, made.stderr
    umask, mode, tmpdir = made.stdout.split()
    assert (umask, mode) == ("0027", "640"), made.stdout
    # libpam-tmpdir: that login got its own private TMPDIR.
    assert tmpdir.startswith("/tmp/user/"), made.stdout
    code, out = console(host, f"stat -c '%a %U' {tmpdir}")
    assert code == 0 and out.split() == ["700", "coachntt"], out
    code, out = console(host, "chage -l coachntt | grep -i 'Maximum number'")
    assert code == 0 and out.split(":")[-1].strip() in ("-1", "99999"), "the key-only deploy user's password never ages: " + out

    # Module blacklist: modprobe runs our `install dccp /bin/false` and fails.
    code, out = console(host, "modprobe dccp")
    assert code != 0 and "Error running install command '/bin/false' for module dccp" in out, out
    code, out = console(host, "modprobe usb-storage")
    assert code != 0 and "/bin/false" in out, out

    # needrestart restarts without asking; debsums checks weekly.
    code, out = console(host, "needrestart -b -r a >/dev/null && grep -h restart /etc/needrestart/conf.d/coachntt.conf; "
                              "grep -h '^CRON_CHECK=' /etc/default/debsums")
    assert code == 0 and "$nrconf{restart} = 'a';" in out and "CRON_CHECK=weekly" in out, out

    # The banner: shown by sshd before authentication, on a new connection.
    login = ssh(host, "true", user="coachntt", extra=("-o", "LogLevel=INFO"))
    assert login.returncode == 0 and BANNER in login.stderr, login.stderr

    # Kernel-bound items were not half applied: no file claiming settings that are not live.
    code, out = console(host, "test -e /etc/sysctl.d/60-coachntt-hardening.conf; echo sysctl=$?; "
                              "dpkg-query -W -f='${db:Status-Status}' auditd acct 2>/dev/null; echo")
    assert "sysctl=1" in out and "installed" not in out, out

    audit = fab(host, "secure.audit", user="coachntt")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "all 12 hardening items pass, 3 skipped" in audit.stdout, audit.stdout
    for item in ("login-defs", "pam-tmpdir", "module-blacklist", "needrestart", "debsums", "login-banner"):
        assert any(line.split()[:3] == ["pass", "baseline", item] for line in audit.stdout.splitlines()), (item, audit.stdout)
    for item in ("sysctl", "auditd", "process-accounting"):
        line = next(line for line in audit.stdout.splitlines() if line.split()[1:3] == ["baseline", item])
        assert line.split()[0] == "skipped" and "in a container" in line, line

    again = fab(host, "secure", "--json", user="coachntt")
    assert again.returncode == 0, again.stdout + again.stderr
    steps = [r for r in json_lines(again.stdout) if "step" in r]
    assert steps and all(r["status"] == "ok" or (r["step"] in CONTAINER_SKIPPED and r["status"] == "skipped") for r in steps), again.stdout


def test_baseline_skip_leaves_items_alone_and_an_unknown_item_is_refused(vps_factory):
    host = vps_factory(flavour="fresh")
    refused = fab(host, "secure", env={"COACHNTT_BASELINE__SKIP": "auditd,selinux"})
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "baseline.skip must be a list of baseline items" in refused.stderr
    assert "'selinux'" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    code, _ = console(host, "id coachntt")
    assert code != 0, "the refusal came before any change"

    skip = {"COACHNTT_BASELINE__SKIP": "module-blacklist,login-banner"}
    steps = {r["step"]: r for r in secured(host, env=skip)}
    for name in ("baseline module-blacklist", "baseline login-banner"):
        assert steps[name]["status"] == "skipped" and steps[name]["reason"] == "turned off by baseline.skip", steps[name]
    assert steps["baseline login-defs"]["status"] == "changed", "the other items still apply"

    code, out = console(host, "test -e /etc/modprobe.d/coachntt-blacklist.conf; echo blacklist=$?; "
                              "test -e /etc/ssh/sshd_config.d/01-coachntt-banner.conf; echo banner=$?")
    assert "blacklist=1" in out and "banner=1" in out, out
    login = ssh(host, "true", user="coachntt", extra=("-o", "LogLevel=INFO"))
    assert login.returncode == 0 and BANNER not in login.stderr, login.stderr

    audit = fab(host, "secure.audit", user="coachntt", env=skip)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "all 10 hardening items pass, 5 skipped" in audit.stdout, audit.stdout
    # Without the setting, the audit holds the host to every item again.
    strict = fab(host, "secure.audit", user="coachntt")
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert "baseline module-blacklist" in strict.stderr and "baseline login-banner" in strict.stderr, strict.stderr


def test_the_app_deploys_and_passes_its_health_gate_on_the_hardened_host(vps_factory, tmp_path):
    host = vps_factory(flavour="provisioned")
    ready_for_the_app(host)  # runs secure, baseline included
    code, out = console(host, "grep -c 'pam_umask.so nousergroups' /etc/pam.d/common-session; sysctl -n net.ipv4.ip_forward")
    assert code == 0 and out.split()[0] == "1", "the app must meet the baseline, or this proves nothing: " + out
    assert out.split()[1] == "1", "Docker needs forwarding: " + out
    with example_app_served(tmp_path) as (_, first, env):
        for args in (("deploy.setup",), ("deploy", "--sha", first)):
            result = fab(host, *args, user="coachntt", env=env)
            assert result.returncode == 0, result.stdout + result.stderr
    code, out = console(host, "curl -s -m 5 http://127.0.0.1:8000/health")
    assert code == 0 and json.loads(out).get("status") == "ok", out
    audit = fab(host, "secure.audit", user="coachntt")
    assert audit.returncode == 0, audit.stdout + audit.stderr
