"""secure as data: given what the host reports, expect these changes (or ok).

Facts are ProbeResults keyed by the step's probe names; nothing connects.
"""

from __future__ import annotations

import base64
import re
import subprocess

import pytest
from invoke.exceptions import Exit

from fabfile import secure, secure_audit
from fabfile.core import task as task_module
from fabfile.core import templates
from fabfile.core.batch import ProbeResult
from fabfile.core.errors import AuthError, ConnectError, OpsError
from fabfile.core.remote import backup_path
from fabfile.core.target import RemoteTarget, Result
from fabfile.secure import (
    SSHD_DROP_IN,
    authorized_keys_step,
    deploy_user_step,
    firewall_step,
    key_identity,
    moduli_step,
    prove_login_after_reload,
    ssh_ports,
    sshd_config_problem,
    sshd_config_step,
    sshd_step,
    sshd_undo,
)
from fabfile.secure_audit import audit_findings

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
    assert commands(plan) == ["useradd --create-home --user-group -K PASS_MAX_DAYS=-1 --shell /bin/bash coachntt",
                              "usermod -aG sudo,docker coachntt"]
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


def ufw_facts(status, sshd_ports="port 22", socket_listen=missing):
    """What the firewall step reads: ufw's status, sshd -T's port lines, ssh.socket's Listen."""
    return {"status": ok(status), "sshd_ports": ok(sshd_ports), "socket_listen": socket_listen}


def test_inactive_ufw_gets_every_allow_rule_before_it_is_enabled_last():
    plan = firewall_step(ALLOW).plan(ufw_facts("Status: inactive"))
    assert commands(plan) == [
        "ufw allow 22/tcp",
        "ufw allow 80/tcp",
        "ufw allow 443/tcp",
        "ufw default deny incoming",
        "ufw default allow outgoing",
        "ufw --force enable",
    ]


def test_the_whole_plan_as_one_script_allows_ssh_before_the_wall_goes_up():
    script = firewall_step(ALLOW).plan(ufw_facts("Status: inactive")).script
    assert script.index("ufw allow 22/tcp") < script.index("ufw --force enable")
    assert script.rstrip().endswith("ufw --force enable")


def test_active_default_deny_with_every_rule_is_ok():
    plan = firewall_step(ALLOW).plan(ufw_facts(UFW_HARDENED))
    assert plan.changes == ()
    assert plan.reason == "active, default deny, allows 22/tcp 80/tcp 443/tcp"


def test_a_missing_rule_on_an_active_firewall_is_the_only_change():
    status = "\n".join(line for line in UFW_HARDENED.splitlines() if not line.startswith("443/tcp"))
    plan = firewall_step(ALLOW).plan(ufw_facts(status))
    assert commands(plan) == ["ufw allow 443/tcp"]


def test_active_firewall_that_allows_incoming_by_default_gets_deny():
    status = UFW_HARDENED.replace("deny (incoming)", "allow (incoming)")
    assert commands(firewall_step(ALLOW).plan(ufw_facts(status))) == ["ufw default deny incoming"]


def test_sshd_on_another_port_is_allowed_first_and_says_why():
    plan = firewall_step(ALLOW).plan(ufw_facts("Status: inactive", sshd_ports="port 2222"))
    assert commands(plan)[0] == "ufw allow 2222/tcp"
    assert summaries(plan)[0] == "allow 2222/tcp (SSH: sshd Port)"
    assert commands(plan).index("ufw allow 2222/tcp") < commands(plan).index("ufw --force enable")


def test_the_port_this_run_is_connected_on_is_always_allowed():
    plan = firewall_step(ALLOW, login_port=2222).plan(ufw_facts("Status: inactive"))
    assert summaries(plan)[0] == "allow 2222/tcp (SSH: this run is connected on it)"
    # 22 is sshd's and already in the allow list: no second rule for it.
    assert commands(plan).count("ufw allow 22/tcp") == 1


def test_ssh_socket_listen_streams_are_allowed_too():
    socket = ok("0.0.0.0:2222 (Stream) [::]:2222 (Stream)")
    plan = firewall_step(ALLOW, login_port=2222).plan(ufw_facts("Status: inactive", sshd_ports="port 2222", socket_listen=socket))
    assert summaries(plan)[0] == "allow 2222/tcp (SSH: sshd Port, ssh.socket, this run is connected on it)"


def test_an_allow_list_without_ssh_still_opens_the_ssh_port_before_enabling():
    plan = firewall_step(["80/tcp", "443/tcp"], login_port=22).plan(ufw_facts("Status: inactive"))
    assert commands(plan)[0] == "ufw allow 22/tcp"
    assert commands(plan)[-1] == "ufw --force enable"


def test_the_openssh_profile_counts_as_port_22():
    plan = firewall_step(["OpenSSH", "80/tcp"], login_port=22).plan(ufw_facts("Status: inactive"))
    assert "ufw allow 22/tcp" not in commands(plan)


def test_a_hardened_firewall_with_the_other_ssh_port_open_is_ok_and_names_it():
    status = UFW_HARDENED + "\n2222/tcp                   ALLOW IN    Anywhere"
    plan = firewall_step(ALLOW, login_port=2222).plan(ufw_facts(status, sshd_ports="port 2222"))
    assert plan.changes == ()
    assert plan.reason == "active, default deny, allows 2222/tcp 22/tcp 80/tcp 443/tcp"


def test_ssh_ports_gathers_every_source_sorted_numerically():
    facts = ufw_facts("", sshd_ports="port 2222\nport 22", socket_listen=ok("[::]:22 (Stream)"))
    assert ssh_ports(facts, 10022) == {"22": "sshd Port, ssh.socket", "2222": "sshd Port", "10022": "this run is connected on it"}


def test_an_inactive_ssh_socket_adds_nothing():
    assert ssh_ports(ufw_facts("", socket_listen=failed("")), None) == {"22": "sshd Port"}


# --- sshd config as found (before any change) ---------------------------------------

VENDOR_BROKEN = (
    "/etc/ssh/sshd_config.d/60-vendor.conf: line 3: Bad configuration option: FooBar\n"
    "/etc/ssh/sshd_config.d/60-vendor.conf: terminating, 1 bad configuration options"
)


def test_a_passing_sshd_t_is_ok():
    assert sshd_config_problem(ok("")) == ""
    assert sshd_config_step().plan({"sshd_t": ok("")}).reason == "sshd -t passes"


def test_a_broken_drop_in_is_named_by_file_and_line():
    assert sshd_config_problem(ProbeResult(VENDOR_BROKEN, 255)) == (
        "/etc/ssh/sshd_config.d/60-vendor.conf: line 3: Bad configuration option: FooBar"
    )


def test_other_sshd_t_failures_give_their_first_line():
    assert sshd_config_problem(ProbeResult("\nsshd: no hostkeys available -- exiting.\n", 1)) == "sshd: no hostkeys available -- exiting."
    assert sshd_config_problem(ProbeResult("", 255)) == "sshd -t exited 255 without saying why"


def test_a_broken_config_refuses_the_whole_run_with_exit_1_and_one_line():
    with pytest.raises(OpsError) as info:
        sshd_config_step().plan({"sshd_t": ProbeResult(VENDOR_BROKEN, 255)})
    assert info.value.exit_code == 1
    line = info.value.one_line()
    assert "\n" not in line
    assert "60-vendor.conf: line 3: Bad configuration option: FooBar" in line
    assert "nothing was changed" in line


def test_the_sshd_preflight_probe_runs_sshd_t_with_its_output():
    assert sshd_config_step().probes["sshd_t"].endswith("sshd -t 2>&1")


# --- the deploy user's authorized_keys: merged, never replaced -----------------------

KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA operator-a"
KEY_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB operator-b"
KEY_CI = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC ci"
KEYS_PATH = "/home/coachntt/.ssh/authorized_keys"


def keys_facts(content=None, meta="600 coachntt:coachntt"):
    return {"content": missing if content is None else ok(content), "meta": ok(meta) if content is not None else missing}


def test_keys_are_identified_by_type_and_blob_not_comment_or_options():
    assert key_identity(KEY_A) == key_identity('from="10.0.0.0/8",no-pty ' + KEY_A.replace("operator-a", "laptop"))
    assert key_identity("# " + KEY_A) is None
    assert key_identity("") is None


def test_no_file_gets_every_wanted_key():
    (change,) = authorized_keys_step("coachntt", [KEY_CI, KEY_B]).plan(keys_facts()).changes
    assert change.summary == f"add 2 key(s) to {KEYS_PATH}"
    assert change.command.startswith("install -d -m 0700 -o coachntt -g coachntt /home/coachntt/.ssh")
    assert "ci'" in change.command and "operator-b'" in change.command


def test_a_second_operator_adds_their_key_and_keeps_the_others():
    (change,) = authorized_keys_step("coachntt", [KEY_CI, KEY_B]).plan(keys_facts(f"{KEY_A}\n{KEY_CI}")).changes
    assert change.summary == f"add 1 key(s) to {KEYS_PATH}, keeping the 2 already there"
    assert "operator-b" in change.command
    # Appends only: the file is never rewritten, so the lines already there cannot be lost.
    assert "operator-a" not in change.command and "ci'" not in change.command
    assert f">> {KEYS_PATH}" in change.command and f"> {KEYS_PATH}" not in change.command.replace(f">> {KEYS_PATH}", "")
    assert change.diff == f"+{KEY_B}\n"


def test_a_key_present_with_another_comment_or_options_is_not_added_again():
    present = 'no-agent-forwarding ' + KEY_A.replace("operator-a", "old-laptop")
    plan = authorized_keys_step("coachntt", [KEY_A]).plan(keys_facts(present))
    assert plan.changes == ()
    assert plan.reason == f"1 wanted key(s) present among 1 in {KEYS_PATH}"


def test_a_commented_out_key_does_not_count_as_present():
    plan = authorized_keys_step("coachntt", [KEY_A]).plan(keys_facts("# " + KEY_A))
    assert summaries(plan) == [f"add 1 key(s) to {KEYS_PATH}"]
    assert "grep -v '^[[:space:]]*#'" in commands(plan)[0]


def test_the_same_key_wanted_twice_is_added_once():
    (change,) = authorized_keys_step("coachntt", [KEY_A, KEY_A.replace("operator-a", "again")]).plan(keys_facts()).changes
    assert change.summary == f"add 1 key(s) to {KEYS_PATH}"


def test_present_keys_with_loose_mode_only_get_the_mode_fixed():
    plan = authorized_keys_step("coachntt", [KEY_A]).plan(keys_facts(KEY_A, meta="644 root:root"))
    assert commands(plan) == [f"chmod 0600 {KEYS_PATH} && chown coachntt:coachntt {KEYS_PATH}"]


def test_the_append_script_keeps_existing_lines_and_adds_only_missing_keys(tmp_path):
    """The plan's shell, run against a real file (paths and ownership mapped to tmp_path)."""
    import getpass
    import grp
    import os

    user, group = getpass.getuser(), grp.getgrgid(os.getgid()).gr_name
    target = tmp_path / "authorized_keys"
    target.write_text(f"{KEY_A}\n{KEY_CI}")  # no trailing newline: ours must not be glued on
    (change,) = authorized_keys_step("coachntt", [KEY_CI, KEY_B]).plan(keys_facts(f"{KEY_A}\n{KEY_CI}")).changes
    script = (change.command.replace("/home/coachntt/.ssh", str(tmp_path))
              .replace("-o coachntt -g coachntt", f"-o {user} -g {group}").replace("coachntt:coachntt", f"{user}:{group}"))
    subprocess.run(["sh", "-ec", script], check=True)
    assert target.read_text() == f"{KEY_A}\n{KEY_CI}\n{KEY_B}\n"
    subprocess.run(["sh", "-ec", script], check=True)  # run again: the grep guard adds nothing
    assert target.read_text() == f"{KEY_A}\n{KEY_CI}\n{KEY_B}\n"


# --- after the sshd reload: prove a new login, or put the old config back ------------


def test_no_previous_drop_in_means_the_undo_removes_ours_and_reloads():
    undo = sshd_undo(sshd_facts())
    assert undo.summary == f"removed {SSHD_DROP_IN} and reloaded sshd"
    assert undo.command.startswith(f"rm -f {SSHD_DROP_IN}\n")
    assert "systemctl reload ssh.service" in undo.command


def test_a_previous_drop_in_is_restored_from_the_backup_taken_when_it_was_replaced():
    facts = sshd_facts(content=ok("PasswordAuthentication no"), meta=ok("644 root:root"))
    undo = sshd_undo(facts)
    assert undo.summary == f"restored the previous {SSHD_DROP_IN} and reloaded sshd"
    assert undo.command.startswith(f"cp -p {backup_path(SSHD_DROP_IN)} {SSHD_DROP_IN}\n")
    # The backup the write keeps is the one the undo reads.
    (change,) = sshd_step().plan(facts).changes
    assert f"cp -p {SSHD_DROP_IN} {backup_path(SSHD_DROP_IN)}" in change.command


def test_the_sshd_plan_carries_its_undo():
    plan = sshd_step().plan(sshd_facts())
    assert plan.undo == sshd_undo(sshd_facts())


class FakeOps:
    def __init__(self, mocker, undo_result=None):
        undo_result = undo_result or Result("", "", "", 0)
        self.target = mocker.Mock(spec=RemoteTarget)
        self.target.run.return_value = undo_result
        self.settings = object()
        self.reporter = mocker.Mock()


UNDO = sshd_undo(sshd_facts())


def test_a_new_login_that_works_leaves_the_hardening_in_place(mocker):
    proof = mocker.Mock()
    mocker.patch.object(secure, "second_login", return_value=proof)
    ops = FakeOps(mocker)
    prove_login_after_reload(ops, "coachntt", UNDO)
    proof.run.assert_called_once_with("true")
    proof.close.assert_called_once()
    ops.target.run.assert_not_called()


def test_a_refused_new_login_undoes_the_drop_in_at_once_and_says_what_was_undone(mocker):
    second = mocker.patch.object(secure, "second_login", side_effect=AuthError("authentication failed for coachntt@h", "pass -i"))
    ops = FakeOps(mocker)
    with pytest.raises(OpsError) as info:
        prove_login_after_reload(ops, "coachntt", UNDO)
    assert second.call_count == 1, "a refused login is not retried (sshd penalises repeated failures)"
    ops.target.run.assert_called_once_with(UNDO.command, sudo=True, check=False)
    line = info.value.one_line()
    assert line.startswith("a new login as coachntt failed after hardening sshd (authentication failed for coachntt@h); "
                           f"removed {SSHD_DROP_IN} and reloaded sshd; ")
    assert "\n" not in line and info.value.exit_code == 1


def test_a_connection_that_cannot_open_is_retried_before_undoing(mocker):
    mocker.patch.object(secure.time, "sleep")
    proof = mocker.Mock()
    mocker.patch.object(secure, "second_login", side_effect=[ConnectError("cannot reach h: connection refused"), proof])
    ops = FakeOps(mocker)
    prove_login_after_reload(ops, "coachntt", UNDO)
    ops.target.run.assert_not_called()


def test_an_undo_that_fails_too_says_so_and_points_at_the_console(mocker):
    mocker.patch.object(secure, "second_login", side_effect=AuthError("authentication failed for coachntt@h"))
    ops = FakeOps(mocker, undo_result=Result("", "", "Job for ssh.service failed.", 1))
    with pytest.raises(OpsError) as info:
        prove_login_after_reload(ops, "coachntt", UNDO)
    assert "putting the old config back failed too (Job for ssh.service failed.)" in info.value.what
    assert "provider's console" in info.value.hint


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
    assert secure_audit.AUDIT_PROBES["sshd"] == "sshd -T"
    assert secure_audit.AUDIT_PROBES["listening"] == "ss -Hltnp"


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


def test_sshd_on_another_port_is_not_an_unexpected_open_port():
    facts = audit_facts(sshd=ok(SSHD_HARDENED.replace("port 22", "port 2222")),
                        ufw=ok("Status: inactive"), listening=ok("LISTEN 0 128 0.0.0.0:2222 0.0.0.0:*"))
    assert verdicts(facts)["no unexpected open ports"] is True


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


@pytest.mark.parametrize("ssh_rule", ["22", "OpenSSH", "ssh", "80/tcp"])
def test_firewall_allow_need_not_name_ssh(project_context, mocker, monkeypatch, ssh_rule):
    """SSH ports are opened from what the host reports, so any allow list is accepted;
    the task goes on to look for a key to install and, with none, stops there."""
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
    active = ufw_facts("Status: active\ndeny (incoming)\nallow (outgoing)\n22/tcp ALLOW IN Anywhere")
    (allow,) = commands(firewall_step(["22/tcp;ufw disable"]).plan(active))
    assert allow == "ufw allow '22/tcp;ufw disable'"
