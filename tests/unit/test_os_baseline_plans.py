"""The OS baseline as data: which steps, which files, which changes for given facts.

Facts are ProbeResults keyed by the step's probe names; nothing connects.
"""

from __future__ import annotations

import base64
import re

import pytest

from fabfile import os_baseline
from fabfile.core import settings
from fabfile.core.batch import ProbeResult
from fabfile.core.errors import EXIT_USAGE, ConfigError
from fabfile.core.settings import BASELINE_ITEMS

missing = ProbeResult("", 1)
VM = ProbeResult("none", 1)  # systemd-detect-virt --container outside a container
NSPAWN = ProbeResult("systemd-nspawn", 0)


def ok(stdout=""):
    return ProbeResult(stdout, 0)


def step(name, skip=()):
    found = [s for s in os_baseline.baseline_steps(skip) if s.name == name]
    assert len(found) == 1, [s.name for s in os_baseline.baseline_steps(skip)]
    return found[0]


def fresh_facts(one_step):
    """What a host without any of it reports: every probe fails, not a container."""
    return {probe: (VM if probe.endswith("virt") else missing) for probe in one_step.probes}


def written(command: str) -> list[str]:
    return [base64.b64decode(p).decode() for p in re.findall(r"printf %s (\S+) \| base64 -d", command)]


# --- the items and the skip setting --------------------------------------------


def test_every_item_has_a_step_and_an_audit_judge():
    names = [s.name for s in os_baseline.baseline_steps()]
    assert names[0] == "baseline packages"
    for item in BASELINE_ITEMS:
        if item != "pam-tmpdir":  # its package is all it needs (pam-auth-update enables it)
            assert any(name.startswith(f"baseline {item}") for name in names), item
    assert set(os_baseline._JUDGES) == set(BASELINE_ITEMS)


def test_packages_of_enabled_items_come_in_one_apt_run():
    packages = step("baseline packages")
    change = packages.plan({"status": ok("")}).changes[0]
    assert change.summary == "apt install libpam-tmpdir kmod needrestart debsums"


def test_a_skipped_item_is_reported_skipped_and_changes_nothing():
    skip = ["module-blacklist", "pam-tmpdir", "auditd"]
    steps = os_baseline.baseline_steps(skip)
    for item in ("module-blacklist", "pam-tmpdir", "auditd"):
        plan = step(f"baseline {item}", skip).plan({})
        assert plan.skip and plan.reason == "turned off by baseline.skip" and not plan.changes
    commands = " ".join(s.probes.get("status", "") for s in steps)
    assert "libpam-tmpdir" not in commands and "kmod" not in commands
    assert all(os_baseline.BLACKLIST not in " ".join(s.probes.values()) for s in steps)


def test_skipping_everything_leaves_no_packages_step():
    assert [s.name for s in os_baseline.baseline_steps(BASELINE_ITEMS)] == [f"baseline {i}" for i in BASELINE_ITEMS]


def test_the_default_skips_nothing_and_passes_validation(defaults, tmp_path):
    s = settings.validate(settings.load(defaults, environ={}, project_dir=tmp_path))
    assert s.get("baseline.skip") == []
    s = settings.validate(settings.load(defaults, environ={"COACHNTT_BASELINE__SKIP": "auditd,sysctl"}, project_dir=tmp_path))
    assert s.get("baseline.skip") == ["auditd", "sysctl"]


def test_an_unknown_item_is_refused_in_one_line_with_exit_2(defaults, tmp_path):
    with pytest.raises(ConfigError) as info:
        settings.validate(settings.load(defaults, environ={"COACHNTT_BASELINE__SKIP": "sysctl,selinux"}, project_dir=tmp_path))
    assert info.value.exit_code == EXIT_USAGE
    assert info.value.what == ("baseline.skip must be a list of baseline items from: " + ", ".join(BASELINE_ITEMS)
                               + ", got 'selinux'")
    assert "\n" not in info.value.one_line()


# --- login.defs ------------------------------------------------------------------

UBUNTU_LOGIN_DEFS = """\
# comment
PASS_MAX_DAYS\t99999
PASS_MIN_DAYS\t0
PASS_WARN_AGE\t7
#UMASK 022
USERGROUPS_ENAB yes
ENCRYPT_METHOD YESCRYPT
"""


def test_login_defs_changes_only_the_keys_that_differ_and_keeps_a_copy():
    plan = os_baseline.login_defs_step().plan({"content": ok(UBUNTU_LOGIN_DEFS.rstrip("\n"))})
    (change,) = plan.changes
    assert change.summary == ("set in /etc/login.defs: UMASK (unset) -> 027, USERGROUPS_ENAB yes -> no, PASS_MAX_DAYS 99999 -> 60, "
                              "PASS_MIN_DAYS 0 -> 7, SHA_CRYPT_MIN_ROUNDS (unset) -> 640000, SHA_CRYPT_MAX_ROUNDS (unset) -> 640000")
    assert change.command.startswith("mkdir -p /var/backups/coachntt-ops && cp -p /etc/login.defs")
    assert "PASS_WARN_AGE" not in change.command and "ENCRYPT_METHOD" not in change.command
    assert "sed -i -E '/^[[:space:]]*UMASK[[:space:]]/d' /etc/login.defs && printf '%s\\n' 'UMASK 027' >> /etc/login.defs" in change.command


def test_login_defs_already_right_is_ok():
    lines = [line for line in UBUNTU_LOGIN_DEFS.splitlines() if not line.startswith(("PASS_", "USERGROUPS"))]
    lines += [f"{k}\t{v}" for k, v in os_baseline.LOGIN_DEFS_VALUES.items()]
    assert os_baseline.login_defs_values("\n".join(lines))["UMASK"] == "027"
    assert not os_baseline.login_defs_step().plan({"content": ok("\n".join(lines))}).changes


def test_umask_is_applied_by_a_pam_profile_without_usergroups():
    item = step("baseline login-defs")
    plan = item.plan({**fresh_facts(item), "0.content": ok(UBUNTU_LOGIN_DEFS)})
    summaries = [c.summary for c in plan.changes]
    assert summaries[1:] == [f"create {os_baseline.PAM_UMASK_PROFILE} (172 bytes, mode 0644, root:root)",
                             "pam-auth-update --enable coachntt-umask"]
    assert "optional\tpam_umask.so nousergroups" in written(plan.changes[1].command)[0]


def test_a_profile_written_but_not_enabled_is_enabled():
    profile_text = os_baseline.config("pam-umask").rstrip("\n")
    plan = os_baseline.pam_umask_step().plan({"content": ok(profile_text), "meta": ok("644 root:root"), "enabled": missing})
    assert [c.command for c in plan.changes] == ["pam-auth-update --enable coachntt-umask"]


# --- files: blacklist, sysctl, needrestart, audit rules, banner ------------------


def test_blacklist_refuses_unused_protocols_and_storage_with_bin_false():
    modules = os_baseline.blacklisted_modules()
    for module in ("dccp", "sctp", "rds", "tipc", "usb-storage", "firewire-core", "cramfs"):
        assert module in modules
    assert "squashfs" not in modules, "snaps are squashfs images"
    text = os_baseline.config("modprobe-blacklist.conf")
    assert all(line == f"install {m} /bin/false" for m, line in zip(modules, [x for x in text.splitlines() if x.startswith("install")],
                                                                      strict=True))
    plan = step("baseline module-blacklist").plan({"content": missing, "meta": missing})
    assert plan.changes[0].summary.startswith(f"create {os_baseline.BLACKLIST}")


def test_sysctl_keeps_ip_forward_on_for_docker():
    values = os_baseline.sysctl_values()
    assert values["net.ipv4.ip_forward"] == "1"
    assert values["net.ipv4.conf.all.accept_redirects"] == "0" and values["kernel.kptr_restrict"] == "2"
    assert not any("accept_ra" in key for key in values), "router advertisements stay as the provider set them"


def test_sysctl_is_written_and_loaded_on_a_vm():
    item = step("baseline sysctl")
    plan = item.plan({"content": missing, "meta": missing, "virt": VM})
    (change,) = plan.changes
    assert change.command.endswith("sysctl --system >/dev/null")
    assert written(change.command) == [os_baseline.config("sysctl-hardening.conf")]


@pytest.mark.parametrize("item", ["sysctl", "auditd", "process-accounting"])
def test_kernel_bound_items_are_skipped_in_a_container_with_the_reason(item):
    one = step(f"baseline {item}")
    plan = one.plan({**fresh_facts(one), "virt": NSPAWN})
    assert plan.skip and not plan.changes
    assert plan.reason.startswith("in a container (systemd-nspawn)")


def test_auditd_on_a_vm_installs_loads_rules_and_runs():
    item = step("baseline auditd")
    plan = item.plan(fresh_facts(item))
    assert [c.summary.split(" (")[0] for c in plan.changes] == [
        "apt install auditd", f"create {os_baseline.AUDIT_RULES}", "enable auditd", "start auditd"]
    assert "augenrules --load" in plan.changes[1].command
    assert "-w /etc/ssh/sshd_config -p wa -k sshd" in os_baseline.audit_rules()
    assert "-w /etc/sudoers.d/ -p wa -k sudoers" in os_baseline.audit_rules()


def test_needrestart_restarts_automatically_and_is_checked_by_perl():
    plan = step("baseline needrestart").plan({"content": missing, "meta": missing})
    assert "$nrconf{restart} = 'a';" in written(plan.changes[0].command)[0]
    assert "perl -c /etc/needrestart/conf.d/coachntt.conf" in plan.changes[0].command


def test_banner_goes_to_issue_files_and_sshd_validated_then_reloaded():
    item = step("baseline login-banner")
    plan = item.plan({probe: missing for probe in item.probes})
    summaries = [c.summary for c in plan.changes]
    assert summaries[-2:] == ["sshd -t passes and shows the banner", "reload sshd"]
    assert "sshd -T | grep -qx 'banner /etc/issue.net'" in plan.changes[-2].command
    assert "Banner /etc/issue.net" in written(plan.changes[2].command)[0]


# --- audit ---------------------------------------------------------------------


def host_facts(**overrides):
    values = os_baseline.sysctl_values()
    facts = {
        "virt": VM,
        "login_defs": ok("\n".join(f"{k} {v}" for k, v in os_baseline.LOGIN_DEFS_VALUES.items())),
        "pam_umask": ok("session optional pam_umask.so nousergroups"),
        "pam_tmpdir": ok("session optional pam_tmpdir.so"),
        "blacklist": ok(os_baseline.config("modprobe-blacklist.conf")),
        "modprobe": ok("install /bin/false"),
        "sysctl": ok("\n".join(f"{k} = {v}" for k, v in values.items())),
        "needrestart": ok(os_baseline.config("needrestart.conf")),
        "debsums": ok("CRON_CHECK=weekly"),
        "auditctl": ok("\n".join(rule.rstrip("/") for rule in os_baseline.audit_rules())),
        "acct": ok("active"),
        "banner": ok("banner /etc/issue.net\n" + os_baseline.config("issue.net")),
    }
    facts.update(overrides)
    assert set(facts) == set(os_baseline.AUDIT_PROBES)
    return facts


def statuses(findings):
    return {item: status for item, status, _ in findings}


def test_audit_passes_a_hardened_vm():
    assert set(statuses(os_baseline.audit_findings(host_facts())).values()) == {"pass"}


def test_audit_fails_each_item_on_a_fresh_vm():
    fresh = {probe: missing for probe in os_baseline.AUDIT_PROBES} | {"virt": VM}
    assert set(statuses(os_baseline.audit_findings(fresh)).values()) == {"fail"}


def test_audit_skips_kernel_items_in_a_container_and_skip_setting_items():
    findings = os_baseline.audit_findings(host_facts(virt=NSPAWN, sysctl=missing, auditctl=missing, acct=ok("failed")), ["debsums"])
    found = statuses(findings)
    assert [i for i, s in found.items() if s == "skipped"] == ["sysctl", "debsums", "auditd", "process-accounting"]
    assert dict((i, d) for i, _, d in findings)["debsums"] == "turned off by baseline.skip"


def test_audit_names_what_is_wrong():
    findings = dict((i, (s, d)) for i, s, d in os_baseline.audit_findings(host_facts(
        sysctl=ok("net.ipv4.ip_forward = 0"), pam_umask=missing,
        auditctl=ok("-w /etc/passwd -p wa -k identity"), modprobe=ProbeResult("modprobe: FATAL", 1))))
    assert findings["sysctl"][0] == "fail" and "net.ipv4.ip_forward=0" in findings["sysctl"][1]
    assert findings["login-defs"] == ("fail", "wrong: no pam_umask.so nousergroups in common-session")
    assert findings["auditd"][0] == "fail" and "-w /etc/ssh/sshd_config -p wa -k sshd" in findings["auditd"][1]
    assert findings["module-blacklist"] == ("fail", f"modprobe does not read {os_baseline.BLACKLIST}")
