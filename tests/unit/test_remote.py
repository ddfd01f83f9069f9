"""Idempotent helpers as data (given facts -> expected commands), then for real with sh.

The real runs write into tmp_path only: the backup directory is moved there and
files are owned by the current user, so no root and no sudo are needed.
"""

from __future__ import annotations

import io
import json
import shutil
import stat

import invoke
import pytest

from fabfile.core import remote
from fabfile.core.batch import ProbeResult
from fabfile.core.errors import RemoteCommandError
from fabfile.core.remote import APT_INSTALL, file_step, line_step, packages_step, service_step, write_file_command
from fabfile.core.steps import Reporter, run_steps
from fabfile.core.target import LocalTarget

missing = ProbeResult("", 1)


def ok(stdout=""):
    return ProbeResult(stdout, 0)


@pytest.fixture
def sh(monkeypatch, tmp_path):
    """This machine through /bin/sh, as if root (no sudo), with backups kept in tmp_path."""
    monkeypatch.setattr(remote, "BACKUP_DIR", str(tmp_path / "backups"))
    target = LocalTarget(invoke.Context())
    target.is_root = True
    return target


def converge(target, *steps, dry=False):
    """run_steps with a JSON reporter; returns the status each step was reported with."""
    out = io.StringIO()
    run_steps(target, list(steps), Reporter("test", json=True, stream=out), dry=dry)
    return {r["step"]: r["status"] for r in map(json.loads, out.getvalue().splitlines())}


def mode_of(path):
    return stat.S_IMODE(path.stat().st_mode)


# --- file_step as data ------------------------------------------------------

NGINX_SITE = "server {\n    listen 80;\n}\n"


def test_file_step_reads_content_and_mode_owner_of_the_quoted_path():
    step = file_step("site", "/etc/nginx/sites-available/my site", NGINX_SITE)
    assert step.probes == {
        "content": "cat -- '/etc/nginx/sites-available/my site'",
        "meta": "stat -c '%a %U:%G' -- '/etc/nginx/sites-available/my site'",
    }


def test_file_step_creates_a_missing_file_with_the_write_command():
    step = file_step("site", "/etc/nginx/sites-available/coachntt", NGINX_SITE, validate="nginx -t", then="systemctl reload nginx")
    plan = step.plan({"content": missing, "meta": missing})
    (change,) = plan.changes
    assert change.summary == f"create /etc/nginx/sites-available/coachntt ({len(NGINX_SITE)} bytes, mode 0644, root:root)"
    assert change.command == write_file_command(
        "/etc/nginx/sites-available/coachntt", NGINX_SITE, "0644", "root:root", "nginx -t", "systemctl reload nginx"
    )
    assert "+    listen 80;" in change.diff


def test_file_step_with_same_content_and_right_mode_is_ok():
    step = file_step("site", "/etc/x.conf", NGINX_SITE, mode="0640", owner="root:adm")
    plan = step.plan({"content": ok(NGINX_SITE.rstrip("\n")), "meta": ok("640 root:adm")})
    assert plan.changes == ()
    assert plan.reason == "/etc/x.conf up to date"


def test_file_step_with_only_mode_wrong_changes_mode_and_owner_only():
    step = file_step("env", "/opt/coachntt/.env.production", "A=1\n", mode="0600", owner="coachntt:coachntt")
    plan = step.plan({"content": ok("A=1"), "meta": ok("644 root:root")})
    (change,) = plan.changes
    assert change.command == "chmod 0600 /opt/coachntt/.env.production && chown coachntt:coachntt /opt/coachntt/.env.production"
    assert change.summary.endswith("(was 644 root:root)")


def test_file_step_with_different_content_updates_and_shows_a_diff():
    step = file_step("site", "/etc/x.conf", "new line\n")
    (change,) = step.plan({"content": ok("old line"), "meta": ok("644 root:root")}).changes
    assert change.summary.startswith("update /etc/x.conf")
    assert "-old line" in change.diff and "+new line" in change.diff


def test_secret_file_plans_show_no_content():
    step = file_step("env", "/opt/coachntt/.env.production", "JWT_SECRET=abcdef123456\n", mode="0600", secret=True)
    for facts in ({"content": missing, "meta": missing}, {"content": ok("JWT_SECRET=old"), "meta": ok("600 root:root")}):
        (change,) = step.plan(facts).changes
        assert change.diff == ""
        assert "abcdef123456" not in change.summary


def test_write_file_command_keeps_backups_outside_the_service_directory():
    command = write_file_command("/etc/nginx/sites-enabled/coachntt", "x", "0644", "root:root")
    assert "/var/backups/coachntt-ops/etc__nginx__sites-enabled__coachntt" in command
    assert "sites-enabled/coachntt.bak" not in command


# --- file_step / write_file_command for real --------------------------------

AWKWARD = "quotes ' \" `backticks` $HOME \\ and unicode é\nno trailing newline"


def test_file_step_creates_the_file_then_reports_ok_on_the_second_run(sh, tmp_path, current_owner):
    path = tmp_path / "dir with space" / "app.conf"
    step = file_step("app conf", str(path), AWKWARD + "\n", mode="0640", owner=current_owner)
    assert converge(sh, step) == {"app conf": "changed"}
    assert path.read_text() == AWKWARD + "\n"
    assert mode_of(path) == 0o640
    assert converge(sh, step) == {"app conf": "ok"}
    assert not list(path.parent.glob("*.coachntt.*")), "no temp file left behind"


def test_file_step_repairs_a_wrong_mode_without_rewriting(sh, tmp_path, current_owner):
    path = tmp_path / "secret.env"
    path.write_text("A=1\n")
    path.chmod(0o644)
    inode = path.stat().st_ino
    step = file_step("env", str(path), "A=1\n", mode="0600", owner=current_owner)
    assert converge(sh, step) == {"env": "changed"}
    assert mode_of(path) == 0o600
    assert path.stat().st_ino == inode, "chmod in place, not a new file"


def test_dry_file_step_leaves_the_file_alone(sh, tmp_path, current_owner):
    path = tmp_path / "app.conf"
    path.write_text("old\n")
    assert converge(sh, file_step("conf", str(path), "new\n", owner=current_owner), dry=True) == {"conf": "would change"}
    assert path.read_text() == "old\n"


def test_failed_validation_restores_the_previous_file(sh, tmp_path, current_owner):
    path = tmp_path / "site.conf"
    path.write_text("valid old config\n")
    path.chmod(0o600)
    reloaded = tmp_path / "reloaded"
    step = file_step("site", str(path), "broken\n", owner=current_owner, validate=f"grep -q valid {path}", then=f"touch {reloaded}")
    with pytest.raises(RemoteCommandError) as info:
        converge(sh, step)
    assert info.value.exit_status == 97
    assert info.value.hint == "validation failed, previous file restored"
    assert path.read_text() == "valid old config\n"
    assert mode_of(path) == 0o600
    assert not reloaded.exists(), "`then` (the reload) must not run after a failed validation"


def test_failed_validation_of_a_new_file_removes_it(sh, tmp_path, current_owner):
    path = tmp_path / "new.conf"
    step = file_step("site", str(path), "broken\n", owner=current_owner, validate="false")
    with pytest.raises(RemoteCommandError):
        converge(sh, step)
    assert not path.exists()


def test_passing_validation_keeps_the_new_file_and_runs_then(sh, tmp_path, current_owner):
    path = tmp_path / "site.conf"
    path.write_text("valid old\n")
    reloaded = tmp_path / "reloaded"
    step = file_step("site", str(path), "valid new\n", owner=current_owner, validate=f"grep -q valid {path}", then=f"touch {reloaded}")
    assert converge(sh, step) == {"site": "changed"}
    assert path.read_text() == "valid new\n"
    assert reloaded.exists()
    assert (tmp_path / "backups" / str(path).strip("/").replace("/", "__")).read_text() == "valid old\n"


# --- line_step --------------------------------------------------------------

SSHD = "Port 22\n#PermitRootLogin prohibit-password\nPermitRootLogin yes\nUsePAM yes\n"


def test_line_present_is_ok():
    step = line_step("root login", "/etc/ssh/sshd_config", "PermitRootLogin no", replaces="^#?PermitRootLogin")
    assert step.plan({"lines": ok("Port 22\nPermitRootLogin no")}).changes == ()


def test_line_absent_without_replaces_is_appended():
    step = line_step("hosts", "/etc/hosts", "127.0.1.1 vps")
    (change,) = step.plan({"lines": ok("127.0.0.1 localhost")}).changes
    assert change.command.endswith("printf '%s\\n' '127.0.1.1 vps' >> /etc/hosts")
    assert change.summary == "add line to /etc/hosts: 127.0.1.1 vps"


def test_line_step_replaces_matching_lines_for_real(sh, tmp_path):
    path = tmp_path / "sshd_config"
    path.write_text(SSHD)
    step = line_step("root login", str(path), "PermitRootLogin no", replaces="^#?PermitRootLogin", mode="0600")
    assert converge(sh, step) == {"root login": "changed"}
    assert path.read_text() == "Port 22\nUsePAM yes\nPermitRootLogin no\n"
    assert mode_of(path) == 0o600
    assert converge(sh, step) == {"root login": "ok"}


def test_line_step_creates_a_missing_file(sh, tmp_path):
    path = tmp_path / "jail.local"
    assert converge(sh, line_step("jail", str(path), "[sshd]", replaces=r"^\[sshd\]")) == {"jail": "changed"}
    assert path.read_text() == "[sshd]\n"


def test_line_step_appends_for_real(sh, tmp_path):
    path = tmp_path / "hosts"
    path.write_text("127.0.0.1 localhost\n")
    converge(sh, line_step("hosts", str(path), "127.0.1.1 vps"))
    assert path.read_text() == "127.0.0.1 localhost\n127.0.1.1 vps\n"


def test_appending_to_a_file_without_trailing_newline_keeps_lines_separate(sh, tmp_path):
    path = tmp_path / "hosts"
    path.write_text("127.0.0.1 localhost")
    converge(sh, line_step("hosts", str(path), "127.0.1.1 vps"))
    assert path.read_text().splitlines() == ["127.0.0.1 localhost", "127.0.1.1 vps"]


def test_line_present_but_a_conflicting_line_remains_is_a_change():
    step = line_step("root login", "/etc/ssh/sshd_config", "PermitRootLogin no", replaces="^#?PermitRootLogin")
    plan = step.plan({"lines": ok("PermitRootLogin yes\nPermitRootLogin no")})
    assert plan.changes != ()


# --- packages_step ----------------------------------------------------------


def test_only_missing_packages_are_installed_non_interactively_with_a_lock_timeout():
    step = packages_step("web", ["nginx", "certbot", "python3-certbot-nginx", "fail2ban"])
    facts = {"status": ProbeResult("nginx installed\ncertbot not-installed\nfail2ban config-files", 1)}
    (change,) = step.plan(facts).changes
    assert change.summary == "apt install certbot python3-certbot-nginx fail2ban"
    assert change.command == f"{APT_INSTALL} certbot python3-certbot-nginx fail2ban"
    for setting in ("DEBIAN_FRONTEND=noninteractive", " -y ", "DPkg::Lock::Timeout=300", "--no-install-recommends"):
        assert setting in APT_INSTALL, setting


def test_all_packages_installed_is_ok():
    step = packages_step("web", ["nginx", "curl"])
    plan = step.plan({"status": ok("curl installed\nnginx installed")})
    assert plan.changes == () and plan.reason == "installed: nginx curl"


@pytest.mark.skipif(not shutil.which("dpkg-query"), reason="needs dpkg")
def test_package_probe_against_the_real_dpkg_database(sh):
    installed = "dash" if shutil.which("dash") else "coreutils"
    step = packages_step("pkgs", [installed, "coachntt-no-such-package"])
    plans = run_steps(sh, [step], Reporter("t", stream=io.StringIO()), dry=True)
    assert plans["pkgs"].changes[0].summary == "apt install coachntt-no-such-package"


# --- service_step -----------------------------------------------------------


def service_facts(enabled, active):
    return {"enabled": ok(enabled), "active": ProbeResult(active, 0 if active == "active" else 3)}


def test_enabled_and_running_service_is_ok():
    assert service_step("nginx", "nginx").plan(service_facts("enabled", "active")).changes == ()


def test_disabled_stopped_service_is_enabled_then_started():
    plan = service_step("nginx", "nginx.service").plan(service_facts("disabled", "inactive"))
    assert [c.command for c in plan.changes] == ["systemctl enable nginx.service", "systemctl start nginx.service"]


def test_static_unit_counts_as_enabled():
    plan = service_step("timer", "certbot.timer").plan(service_facts("static", "inactive"))
    assert [c.command for c in plan.changes] == ["systemctl start certbot.timer"]


def test_service_that_need_not_be_enabled_is_only_started():
    plan = service_step("x", "x", enabled=False).plan(service_facts("disabled", "inactive"))
    assert [c.command for c in plan.changes] == ["systemctl start x"]


def test_service_probes_ask_systemctl():
    assert service_step("s", "ssh.socket").probes == {
        "enabled": "systemctl is-enabled ssh.socket", "active": "systemctl is-active ssh.socket",
    }
