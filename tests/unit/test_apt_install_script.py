"""scripts/apt-install.sh's contract, run against stand-ins for apt-get, apt-config and
sleep on a PATH of nothing else: this machine's own apt is never reached."""

from __future__ import annotations

import subprocess

import pytest
from stand_ins import script_path

from fabfile.core.templates import SCRIPTS_DIR

SCRIPT = SCRIPTS_DIR / "apt-install.sh"
PLAIN_TOOLS = ("sh", "cat", "grep", "mktemp", "rm")
UNPARSABLE = "E: The package lists or status file could not be parsed or opened."

STAND_INS = {
    # Fails `update` as many times as $REC/update-failures says, like lists apt cannot parse.
    "apt-get": r"""#!/bin/sh
echo "$*" >> "$REC/calls"
case " $* " in
*" update "*)
    left=$(cat "$REC/update-failures" 2>/dev/null || echo 0)
    if [ "$left" -gt 0 ]; then
        echo $((left - 1)) > "$REC/update-failures"
        echo "E: Encountered a section with no Package: header"; echo "E: Problem with MergeList $LISTS_DIR/x_Packages"
        echo "E: The package lists or status file could not be parsed or opened."; exit 100
    fi ;;
*" install "*) [ -z "${FAIL_INSTALL:-}" ] || { echo "E: Unable to locate package nosuch"; exit 100; }
    echo "Setting up nginx ..." ;;
esac
""",
    "apt-config": "#!/bin/sh\necho \"LISTS='$LISTS_DIR/'\"\n",
    "sleep": "#!/bin/sh\necho \"sleep $*\" >> \"$REC/calls\"\n",
}


@pytest.fixture
def host(tmp_path):
    bin_dir, rec, lists = tmp_path / "bin", tmp_path / "rec", tmp_path / "lists"
    for directory in (rec, lists / "partial"):
        directory.mkdir(parents=True)
    script_path(bin_dir, PLAIN_TOOLS, STAND_INS)
    for name in ("lock", "deb.debian.org_debian_dists_trixie_InRelease", "deb.debian.org_debian_dists_trixie_main_Packages"):
        (lists / name).write_text("x")

    def run(*packages: str, failures: int = 0, **env: str) -> subprocess.CompletedProcess:
        (rec / "update-failures").write_text(str(failures))
        return subprocess.run(["sh", str(SCRIPT), *packages], capture_output=True, text=True, timeout=30,
                              env={"PATH": str(bin_dir), "REC": str(rec), "LISTS_DIR": str(lists), **env})

    run.calls = lambda: (rec / "calls").read_text().splitlines()
    run.lists = lambda: sorted(p.name for p in lists.iterdir())
    return run


def test_refreshes_then_installs_without_recommends_non_interactively(host):
    result = host("nginx", "curl")
    assert result.returncode == 0, result.stderr
    assert host.calls() == ["-q -y -o DPkg::Lock::Timeout=300 update",
                            "-q -y -o DPkg::Lock::Timeout=300 install --no-install-recommends nginx curl"]
    assert "Setting up nginx" in result.stdout


def test_unparsable_lists_are_fetched_anew_and_the_install_goes_on(host):
    result = host("nginx", failures=1)
    assert result.returncode == 0, result.stderr
    assert [c.split()[-1] for c in host.calls()] == ["update", "1", "update", "nginx"]
    assert host.lists() == ["lock", "partial"], "index files removed, apt's lock and partial/ kept"
    assert "apt-get update failed (try 1 of 3): E: Encountered a section with no Package: header" in result.stderr


def test_three_failed_refreshes_end_with_the_first_error_as_the_last_line(host):
    result = host("nginx", failures=5)
    assert result.returncode == 100
    assert [c.split()[-1] for c in host.calls()] == ["update", "1", "update", "2", "update"], "no install tried"
    assert result.stderr.strip().splitlines()[-1] == "E: Encountered a section with no Package: header"
    assert UNPARSABLE in result.stderr, "apt's whole output is kept for the log"


def test_a_failed_install_names_its_cause_last(host):
    result = host("nosuch", FAIL_INSTALL="1")
    assert result.returncode == 100
    assert result.stderr.strip().splitlines()[-1] == "E: Unable to locate package nosuch"


def test_no_packages_only_refreshes(host):
    assert host().returncode == 0
    assert [c.split()[-1] for c in host.calls()] == ["update"]
