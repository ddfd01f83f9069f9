#!/bin/sh
# apt-install.sh PACKAGE...: refresh the package lists, then install the packages
# without recommends (run as root, non-interactive). With no PACKAGE: refresh only.
# A refresh that fails is tried again (a mirror or proxy hiccup, or index files an
# interrupted update left that apt cannot parse: those are fetched anew), three
# times at most, as Ansible's apt module does. The first "E:" line apt printed is
# the last line of output, so a failure's one-line summary names the cause.
set -u
export DEBIAN_FRONTEND=noninteractive
APT="apt-get -q -y -o DPkg::Lock::Timeout=300"
out=$(mktemp)
trap 'rm -f "$out"' EXIT

refresh() {
    try=1
    while ! $APT update >"$out" 2>&1; do
        if [ "$try" -ge 3 ]; then
            cat "$out" >&2
            grep -m1 '^E:' "$out" >&2
            return 100
        fi
        echo "apt-get update failed (try $try of 3): $(grep -m1 '^E:' "$out")" >&2
        # Index files only (their names hold "_"); the lock and partial/ stay.
        LISTS=/var/lib/apt/lists/
        eval "$(apt-config shell LISTS Dir::State::lists/d)"
        rm -f "$LISTS"*_*
        sleep "$try"
        try=$((try + 1))
    done
}

refresh || exit $?
[ $# -eq 0 ] && exit 0
if ! $APT install --no-install-recommends "$@" >"$out" 2>&1; then
    cat "$out" >&2
    grep -m1 '^E:' "$out" >&2
    exit 100
fi
cat "$out"
