"""secure as data: given what the host reports, expect these changes (or ok).

Facts are ProbeResults keyed by the step's probe names; nothing connects.
"""

from __future__ import annotations

import base64
import re
import subprocess

import pytest
from invoke.exceptions import Exit

from fabfile import secure
from fabfile.core import task as task_module
from fabfile.core import templates
from fabfile.core.batch import ProbeResult
from fabfile.secure import (
    SSHD_DROP_IN,
    audit_findings,
    deploy_user_step,
    firewall_step,
    moduli_step,
    sshd_step,
)

missing = ProbeResult("", 1)


def ok(stdout=""):
    return ProbeResult(stdout, 0)


def failed(stdout=""):
    return ProbeResult(stdout, 1)


def summaries(plan):
    return [change.summary for change in plan.changes]


def commands(plan):
    return [change.command for change in plan.changes]


def written(change) -> str:
    """The file content a write_file_command carries inline (base64)."""
    payload = re.search(r"printf %s (\S+) \| base64 -d", change.command)[1]
    return base64.b64decode(payload).decode()


# --- deploy user ---------------------------------------------------------------

GROUPS = ["sudo", "docker"]


def test_deploy_user_probes_its_groups_and_the_docker_group():
    assert deploy_user_step("coachntt", GROUPS).probes == {"groups": "id -nG coachntt", "docker_group": "getent group docker"}


def test_missing_user_is_created_then_added_to_every_group():
    plan = deploy_user_step("coachntt", GROUPS).plan({"groups": missing, "docker_group": ok("docker:x:999:")})
    assert commands(plan) == ["useradd --create-home --shell /bin/bash coachntt", "usermod -aG sudo,docker coachntt"]
    assert summaries(plan) == ["create user coachntt", "add coachntt to sudo, docker"]


def test_present_user_is_added_only_to_the_groups_it_lacks():
    plan = deploy_user_step("coachntt", GROUPS).plan({"groups": ok("coachntt sudo"), "docker_group": ok("docker:x:999:")})
    assert commands(plan) == ["usermod -aG docker coachntt"]


def test_missing_docker_group_is_created_before_anyone_joins_it():
    plan = deploy_user_step("coachntt", GROUPS).plan({"groups": ok("coachntt sudo"), "docker_group": missing})
    assert commands(plan) == ["groupadd --system docker", "usermod -aG docker coachntt"]


def test_fresh_host_without_user_or_docker_group_creates_group_first():
    plan = deploy_user_step("coachntt", GROUPS).plan({"groups": missing, "docker_group": missing})
    assert [c.split()[0] for c in commands(plan)] == ["groupadd", "useradd", "usermod"]


def test_docker_group_is_not_created_when_the_user_need_not_join_it():
    plan = deploy_user_step("coachntt", ["sudo"]).plan({"groups": ok("coachntt sudo"), "docker_group": missing})
    assert plan.changes == ()


def test_user_in_all_groups_is_ok():
    plan = deploy_user_step("coachntt", GROUPS).plan({"groups": ok("coachntt sudo docker"), "docker_group": ok("docker:x:999:coachntt")})
    assert plan.changes == ()
    assert plan.reason == "coachntt in sudo, docker"


# --- sshd hardening ------------------------------------------------------------

# What `ssh -Q ...` and `ls /etc/ssh/ssh_host_*_key` print on real hosts.
OPENSSH_9_6 = {
    "kex": "diffie-hellman-group14-sha256\ndiffie-hellman-group16-sha512\necdh-sha2-nistp256\n"
    "curve25519-sha256\ncurve25519-sha256@libssh.org\nsntrup761x25519-sha512@openssh.com",
    "ciphers": "3des-cbc\naes128-cbc\naes128-ctr\naes192-ctr\naes256-ctr\naes128-gcm@openssh.com\n"
    "aes256-gcm@openssh.com\nchacha20-poly1305@openssh.com",
    "macs": "hmac-sha1\nhmac-sha2-256\nhmac-sha2-512\numac-128@openssh.com\nhmac-sha2-256-etm@openssh.com\n"
    "hmac-sha2-512-etm@openssh.com\numac-128-etm@openssh.com",
    "key_algorithms": "ssh-ed25519\nssh-ed25519-cert-v01@openssh.com\necdsa-sha2-nistp256\nrsa-sha2-256\n"
    "rsa-sha2-512\nssh-rsa\nrsa-sha2-256-cert-v01@openssh.com\nrsa-sha2-512-cert-v01@openssh.com",
}
OPENSSH_10 = {
    **OPENSSH_9_6,
    "kex": "mlkem768x25519-sha256\nsntrup761x25519-sha512\nsntrup761x25519-sha512@openssh.com\n"
    "curve25519-sha256\ncurve25519-sha256@libssh.org\necdh-sha2-nistp256",
}
ALL_HOST_KEYS = "/etc/ssh/ssh_host_ecdsa_key\n/etc/ssh/ssh_host_ed25519_key\n/etc/ssh/ssh_host_rsa_key"


def sshd_facts(openssh=OPENSSH_9_6, host_keys=ALL_HOST_KEYS, content=missing, meta=missing):
    return {
        "content": content,
        "meta": meta,
        **{name: ok(out) for name, out in openssh.items()},
        "host_keys": ok(host_keys),
    }


def rendered_drop_in(facts) -> str:
    (change,) = sshd_step().plan(facts).changes
    return written(change)


def setting(config: str, keyword: str) -> str:
    (line,) = [each for each in config.splitlines() if each.startswith(keyword + " ")]
    return line.split(" ", 1)[1]


def test_sshd_reads_the_algorithms_and_host_keys_the_host_offers():
    probes = sshd_step().probes
    assert probes["kex"] == "ssh -Q kex"
    assert probes["host_keys"] == "ls /etc/ssh/ssh_host_*_key"
    assert probes["content"] == f"cat -- {SSHD_DROP_IN}"


def test_openssh_9_6_gets_no_mlkem_and_keeps_preference_order():
    config = rendered_drop_in(sshd_facts(OPENSSH_9_6))
    assert setting(config, "KexAlgorithms") == "sntrup761x25519-sha512@openssh.com,curve25519-sha256,curve25519-sha256@libssh.org"
    assert "mlkem" not in config


def test_openssh_10_gets_mlkem_first():
    kex = setting(rendered_drop_in(sshd_facts(OPENSSH_10)), "KexAlgorithms").split(",")
    assert kex[0] == "mlkem768x25519-sha256"
    assert kex == [
        "mlkem768x25519-sha256",
        "sntrup761x25519-sha512",
        "sntrup761x25519-sha512@openssh.com",
        "curve25519-sha256",
        "curve25519-sha256@libssh.org",
    ]


def test_weak_algorithms_the_host_offers_are_never_listed():
    config = rendered_drop_in(sshd_facts())
    assert setting(config, "Ciphers") == (
        "chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,aes128-gcm@openssh.com,aes256-ctr,aes192-ctr,aes128-ctr"
    )
    assert setting(config, "MACs") == "hmac-sha2-512-etm@openssh.com,hmac-sha2-256-etm@openssh.com,umac-128-etm@openssh.com"
    assert setting(config, "HostKeyAlgorithms").split(",") == [
        "ssh-ed25519",
        "ssh-ed25519-cert-v01@openssh.com",
        "rsa-sha2-512",
        "rsa-sha2-512-cert-v01@openssh.com",
        "rsa-sha2-256",
        "rsa-sha2-256-cert-v01@openssh.com",
    ]  # no ssh-rsa (SHA-1), no ECDSA


def test_only_host_keys_that_exist_are_named():
    config = rendered_drop_in(sshd_facts(host_keys="/etc/ssh/ssh_host_ecdsa_key\n/etc/ssh/ssh_host_ed25519_key"))
    assert [line for line in config.splitlines() if line.startswith("HostKey ")] == ["HostKey /etc/ssh/ssh_host_ed25519_key"]


def test_both_preferred_host_keys_are_named_when_present():
    config = rendered_drop_in(sshd_facts())
    assert [line for line in config.splitlines() if line.startswith("HostKey ")] == [
        "HostKey /etc/ssh/ssh_host_ed25519_key",
        "HostKey /etc/ssh/ssh_host_rsa_key",
    ]


def test_drop_in_refuses_root_and_passwords():
    config = rendered_drop_in(sshd_facts())
    for line in ("PermitRootLogin no", "PasswordAuthentication no", "KbdInteractiveAuthentication no", "AuthenticationMethods publickey"):
        assert line in config.splitlines()


def test_new_drop_in_is_validated_with_sshd_t_and_effective_values_then_reloaded():
    (change,) = sshd_step().plan(sshd_facts()).changes
    assert change.summary.startswith(f"create {SSHD_DROP_IN} ")
    assert "sshd -t" in change.command
    assert "sshd -T | grep -qx 'permitrootlogin no'" in change.command
    assert "sshd -T | grep -qx 'passwordauthentication no'" in change.command
    assert "validation failed, previous file restored" in change.command
    # The reload comes after the validation, never before it.
    assert change.command.index("sshd -t") < change.command.index("systemctl reload ssh.service")


def test_drop_in_that_differs_is_updated():
    plan = sshd_step().plan(sshd_facts(content=ok("PermitRootLogin yes"), meta=ok("644 root:root")))
    assert summaries(plan)[0].startswith(f"update {SSHD_DROP_IN} ")


def test_unchanged_drop_in_is_ok():
    facts = sshd_facts()
    content = rendered_drop_in(facts)
    plan = sshd_step().plan(sshd_facts(content=ok(content.rstrip("\n")), meta=ok("644 root:root")))
    assert plan.changes == ()
    assert plan.reason == f"{SSHD_DROP_IN} up to date"


def test_the_same_drop_in_on_a_newer_openssh_is_updated_to_add_mlkem():
    content = rendered_drop_in(sshd_facts(OPENSSH_9_6))
    plan = sshd_step().plan(sshd_facts(OPENSSH_10, content=ok(content.rstrip("\n")), meta=ok("644 root:root")))
    assert "mlkem768x25519-sha256" in written(plan.changes[0])


# --- applying sshd configuration (scripts/reload-sshd.sh with a stub systemctl) ----


def run_reload_script(tmp_path, *, socket_active: bool, accept: str = "no", service_active: bool = True) -> list[str]:
    calls = tmp_path / "calls"
    stub = tmp_path / "bin" / "systemctl"
    stub.parent.mkdir()
    stub.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        'case "$*" in\n'
        f'  "is-active --quiet ssh.socket") exit {0 if socket_active else 3} ;;\n'
        f'  "is-active --quiet ssh.service") exit {0 if service_active else 3} ;;\n'
        f'  "show -p Accept --value ssh.socket") echo {accept} ;;\n'
        "esac\n"
    )
    stub.chmod(0o755)
    subprocess.run(["sh", "-c", templates.script("reload-sshd.sh")], check=True,
                   env={"PATH": f"{stub.parent}:/usr/bin:/bin"})
    return [line for line in calls.read_text().splitlines() if not line.startswith(("is-active", "show"))]


def test_socket_activated_sshd_like_ubuntu_is_restarted_to_get_the_socket_handed_over(tmp_path):
    assert run_reload_script(tmp_path, socket_active=True, accept="no") == ["restart ssh.service"]


def test_per_connection_socket_activation_needs_nothing(tmp_path):
    assert run_reload_script(tmp_path, socket_active=True, accept="yes") == []


def test_a_plain_ssh_service_is_reloaded(tmp_path):
    assert run_reload_script(tmp_path, socket_active=False) == ["reload ssh.service"]


def test_a_stopped_ssh_service_is_started(tmp_path):
    assert run_reload_script(tmp_path, socket_active=False, service_active=False) == ["start ssh.service"]


# --- DH moduli -------------------------------------------------------------------


def test_no_weak_moduli_is_ok():
    assert moduli_step().plan({"weak": ok("0")}).changes == ()


def test_weak_moduli_are_counted_and_filtered_out():
    plan = moduli_step().plan({"weak": ok("12")})
    assert summaries(plan) == ["remove 12 DH moduli under 2048 bits"]
    assert "$5 >= 2047" in commands(plan)[0]
    assert commands(plan)[0].endswith("mv /etc/ssh/moduli.new /etc/ssh/moduli")


# --- firewall --------------------------------------------------------------------

ALLOW = ["22/tcp", "80/tcp", "443/tcp"]
UFW_HARDENED = """Status: active
Logging: on (low)
Default: deny (incoming), allow (outgoing), deny (routed)
New profiles: skip

To                         Action      From
--                         ------      ----
22/tcp                     ALLOW IN    Anywhere
80/tcp                     ALLOW IN    Anywhere
443/tcp                    ALLOW IN    Anywhere
22/tcp (v6)                ALLOW IN    Anywhere (v6)
80/tcp (v6)                ALLOW IN    Anywhere (v6)
443/tcp (v6)               ALLOW IN    Anywhere (v6)"""


def test_inactive_ufw_gets_every_allow_rule_before_it_is_enabled_last():
    plan = firewall_step(ALLOW).plan({"status": ok("Status: inactive")})
    assert commands(plan) == [
        "ufw allow 22/tcp",
        "ufw allow 80/tcp",
        "ufw allow 443/tcp",
        "ufw default deny incoming",
        "ufw default allow outgoing",
        "ufw --force enable",
    ]


def test_the_whole_plan_as_one_script_allows_ssh_before_the_wall_goes_up():
    script = firewall_step(ALLOW).plan({"status": ok("Status: inactive")}).script
    assert script.index("ufw allow 22/tcp") < script.index("ufw --force enable")
    assert script.rstrip().endswith("ufw --force enable")


def test_active_default_deny_with_every_rule_is_ok():
    plan = firewall_step(ALLOW).plan({"status": ok(UFW_HARDENED)})
    assert plan.changes == ()
    assert plan.reason == "active, default deny, allows 22/tcp 80/tcp 443/tcp"


def test_a_missing_rule_on_an_active_firewall_is_the_only_change():
    status = "\n".join(line for line in UFW_HARDENED.splitlines() if not line.startswith("443/tcp"))
    plan = firewall_step(ALLOW).plan({"status": ok(status)})
    assert commands(plan) == ["ufw allow 443/tcp"]


def test_active_firewall_that_allows_incoming_by_default_gets_deny():
    status = UFW_HARDENED.replace("deny (incoming)", "allow (incoming)")
    assert commands(firewall_step(ALLOW).plan({"status": ok(status)})) == ["ufw default deny incoming"]


# --- audit -----------------------------------------------------------------------

ALLOWED_PORTS = {"22", "80", "443"}
SSHD_HARDENED = "port 22\npermitrootlogin no\npasswordauthentication no\nkbdinteractiveauthentication no\npubkeyauthentication yes"
LISTENING_HARDENED = (
    "LISTEN 0      4096   127.0.0.53%lo:53        0.0.0.0:*\n"
    "LISTEN 0      4096         0.0.0.0:22        0.0.0.0:*\n"
    "LISTEN 0      511          0.0.0.0:80        0.0.0.0:*\n"
    "LISTEN 0      4096       127.0.0.1:8000      0.0.0.0:*\n"
    "LISTEN 0      4096            [::]:22           [::]:*\n"
    "LISTEN 0      4096           [::1]:631          [::]:*"
)


def audit_facts(**overrides):
    facts = {
        "sshd": ok(SSHD_HARDENED),
        "ufw": ok(UFW_HARDENED),
        "fail2ban": ok("Status for the jail: sshd"),
        "auto_upgrades": ok('APT::Periodic::Update-Package-Lists "1";\nAPT::Periodic::Unattended-Upgrade "1";'),
        "unattended_service": ok("enabled"),
        "listening": ok(LISTENING_HARDENED),
    }
    facts.update(overrides)
    return facts


def verdicts(facts):
    return {item: passed for item, passed, _ in audit_findings(facts, ALLOWED_PORTS)}


def detail(facts, item):
    return {name: text for name, _, text in audit_findings(facts, ALLOWED_PORTS)}[item]


def test_audit_asks_the_host_the_effective_values():
    assert secure.AUDIT_PROBES["sshd"] == "sshd -T"
    assert secure.AUDIT_PROBES["listening"] == "ss -Hltnp"


def test_a_docker_published_port_is_exposed_even_behind_ufw():
    facts = audit_facts()
    facts["listening"] = ProbeResult(
        'LISTEN 0 4096 0.0.0.0:8000 0.0.0.0:* users:(("docker-proxy",pid=812,fd=7))', 0
    )
    assert verdicts(facts)["no unexpected open ports"] is False


def test_hardened_host_passes_every_item():
    assert verdicts(audit_facts()) == {
        "root login refused": True,
        "password login refused": True,
        "firewall active, default deny": True,
        "fail2ban sshd jail": True,
        "unattended-upgrades": True,
        "no unexpected open ports": True,
    }
    assert detail(audit_facts(), "no unexpected open ports") == "only 22 443 80 reachable"


def test_root_login_yes_fails_and_says_so():
    facts = audit_facts(sshd=ok(SSHD_HARDENED.replace("permitrootlogin no", "permitrootlogin yes")))
    assert verdicts(facts)["root login refused"] is False
    assert detail(facts, "root login refused") == "PermitRootLogin yes"


def test_keyboard_interactive_login_left_on_fails_password_item():
    facts = audit_facts(sshd=ok(SSHD_HARDENED.replace("kbdinteractiveauthentication no", "kbdinteractiveauthentication yes")))
    assert verdicts(facts)["password login refused"] is False


def test_unknown_sshd_values_fail_with_a_question_mark():
    facts = audit_facts(sshd=missing)
    assert verdicts(facts)["root login refused"] is False
    assert detail(facts, "root login refused") == "PermitRootLogin ?"


def test_listener_on_all_addresses_behind_an_active_default_deny_firewall_passes():
    facts = audit_facts(listening=ok(LISTENING_HARDENED + "\nLISTEN 0 4096 0.0.0.0:8080 0.0.0.0:*"))
    assert verdicts(facts)["no unexpected open ports"] is True


def test_same_listener_with_ufw_inactive_fails_and_names_it():
    facts = audit_facts(ufw=ok("Status: inactive"), listening=ok(LISTENING_HARDENED + "\nLISTEN 0 4096 0.0.0.0:8080 0.0.0.0:*"))
    assert verdicts(facts)["no unexpected open ports"] is False
    assert verdicts(facts)["firewall active, default deny"] is False
    assert detail(facts, "no unexpected open ports") == "exposed: 0.0.0.0:8080"
    assert detail(facts, "firewall active, default deny") == "Status: inactive"


def test_port_opened_by_ufw_beyond_the_allowed_ones_fails():
    ufw = UFW_HARDENED + "\n8080/tcp                   ALLOW IN    Anywhere"
    facts = audit_facts(ufw=ok(ufw), listening=ok(LISTENING_HARDENED + "\nLISTEN 0 4096 [::]:8080 [::]:*"))
    assert verdicts(facts)["no unexpected open ports"] is False
    assert detail(facts, "no unexpected open ports") == "exposed: [::]:8080"


def test_missing_ufw_fails_the_firewall_item_with_a_reason():
    facts = audit_facts(ufw=ProbeResult("", 127))
    assert verdicts(facts)["firewall active, default deny"] is False
    assert detail(facts, "firewall active, default deny") == "ufw not installed"


def test_no_fail2ban_jail_and_no_auto_upgrades_fail():
    facts = audit_facts(fail2ban=failed(), auto_upgrades=missing)
    assert verdicts(facts)["fail2ban sshd jail"] is False
    assert verdicts(facts)["unattended-upgrades"] is False


def test_auto_upgrades_file_without_the_service_enabled_fails():
    assert verdicts(audit_facts(unattended_service=failed("disabled")))["unattended-upgrades"] is False


# --- the task refuses before connecting -------------------------------------------


def test_secure_refuses_a_firewall_without_ssh_with_exit_2_before_connecting(refused_before_connecting):
    exit_ = refused_before_connecting(secure.secure, env={"COACHNTT_FIREWALL__ALLOW": "80/tcp,443/tcp"})
    assert exit_.code == 2
    assert exit_.message == (
        "error: firewall.allow must keep SSH open, got ['80/tcp', '443/tcp']; add 22/tcp so you are not locked out"
    )


@pytest.mark.parametrize("ssh_rule", ["22", "OpenSSH", "ssh"])
def test_ssh_may_be_named_by_port_or_profile(project_context, mocker, monkeypatch, ssh_rule):
    """Past the firewall check the task looks for a key to install; with none it stops there."""
    monkeypatch.setenv("COACHNTT_FIREWALL__ALLOW", f"{ssh_rule},80/tcp")
    mocker.patch.object(task_module, "target_for")
    mocker.patch.object(secure, "login_public_keys", return_value=[])
    with pytest.raises(Exit) as info:
        secure.secure(project_context)
    assert info.value.code == 2
    assert info.value.message.startswith("error: no public key to install for coachntt; ")


# --- defence in depth: a value that slipped past validation is still one word -----


def test_user_and_group_names_are_quoted_in_every_command():
    hostile = "x$(touch /tmp/y)"
    step = deploy_user_step(hostile, ["sudo", hostile])
    assert step.probes["groups"] == f"id -nG '{hostile}'"
    for command in commands(step.plan({"groups": missing, "docker_group": ok()})):
        assert "$(touch" not in command.replace(f"'{hostile}'", "").replace(f"'sudo,{hostile}'", ""), command
    (allow,) = commands(firewall_step(["22/tcp;ufw disable"]).plan({"status": ok("Status: active\ndeny (incoming)\nallow (outgoing)")}))
    assert allow == "ufw allow '22/tcp;ufw disable'"
