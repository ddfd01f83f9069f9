#!/bin/sh
# Host patching with apt, as root (maintenance.patch, core/patching.py reads the output).
#
#   host-patch.sh pending                what an upgrade would do now, judged against a fresh
#                                        package index fetched into a scratch directory: the
#                                        host's own index, cache and packages stay as they are
#       inst NAME OLD NEW                one line per package (OLD "-": a new dependency)
#       summary N upgraded, ... and K not upgraded.
#   host-patch.sh upgrade LOG FLAG BACKUP_LOCK
#                                        once no backup runs (BACKUP_LOCK, held throughout):
#                                        refresh the index, finish any dpkg run cut off before,
#                                        upgrade every package (new dependencies installed,
#                                        nothing removed), changed config files kept as the
#                                        host has them; apt's own output goes to LOG
#       changed NAME OLD NEW             one line per package whose version changed (OLD or NEW "-")
#       summary ...                      apt's own count, kept-back packages included
#       reboot-required PKG...           when FLAG exists afterwards (the packages that asked)
#   host-patch.sh reboot BACKUP_LOCK     once no backup runs: reboot in 3 seconds, after this
#                                        command has answered, the backup lock taken again first
#
# Errors: one line on stdout starting "error:" (pending: a fact probe's stderr is not kept)
# or on stderr (upgrade), and a non-zero exit.
set -u
export DEBIAN_FRONTEND=noninteractive LC_ALL=C
action=${1:-}
# Never a question on a terminal: keep the host's version of a changed config file
# (confold), unless it was never edited (confdef takes the package's then).
DPKG_KEEP="--force-confdef --force-confold"
APT_KEEP="-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"
APT="apt-get -q -y -o DPkg::Lock::Timeout=300"

# The backup timers' runs take this flock (one at a time): a running backup finishes
# before apt restarts Docker under pg_dump or the host reboots, and none starts meanwhile.
hold_backups() {  # LOCK: wait up to an hour for it, keep it while this script runs (fd 9)
    if [ ! -e "$1" ]; then
        dir=$(dirname "$1")
        install -m 644 -o "$(stat -c %u "$dir")" -g "$(stat -c %g "$dir")" /dev/null "$1" || return 1
    fi
    exec 9>>"$1" || return 1
    flock -n 9 && return 0
    echo "waiting for the backup that runs now ($1)"
    flock -w 3600 9
}

installed() {  # NAME VERSION of every installed package
    dpkg-query -W -f '${db:Status-Abbrev}|${binary:Package}|${Version}\n' |
        awk -F'|' '$1 ~ /^[ih]i/ { print $2, $3 }' | sort
}

case "$action" in
pending)
    scratch=$(mktemp -d /tmp/coachntt-apt.XXXXXX) || { echo "error: cannot make a scratch directory in /tmp"; exit 1; }
    trap 'rm -rf "$scratch"' EXIT
    chmod 755 "$scratch"  # apt downloads as _apt
    mkdir -p "$scratch/lists/partial"
    # A copy of the index we have: apt then fetches only what changed since.
    cp -p /var/lib/apt/lists/*_* "$scratch/lists/" 2>/dev/null
    # The scratch index, no package cache written, and none of the hooks a real update
    # runs (motd, command-not-found): they would change the host.
    {
        echo "Dir::State::Lists \"$scratch/lists/\";"
        echo 'Dir::Cache::pkgcache "";'
        echo 'Dir::Cache::srcpkgcache "";'
        for hook in Pre-Invoke Post-Invoke Post-Invoke-Success Post-Invoke-Stats; do
            echo "#clear APT::Update::$hook;"
        done
    } > "$scratch/apt.conf"
    if ! apt-get -q -c "$scratch/apt.conf" update --error-on=any > "$scratch/update.out" 2>&1; then
        echo "error: apt-get update failed: $(grep -E '^(E|W|Err):' "$scratch/update.out" | tail -n 1)"
        exit 1
    fi
    if ! apt-get -s -c "$scratch/apt.conf" upgrade --with-new-pkgs > "$scratch/simulate.out" 2>&1; then
        echo "error: apt-get cannot plan the upgrade: $(grep -E '^E:' "$scratch/simulate.out" | tail -n 1)"
        exit 1
    fi
    # "Inst NAME [OLD] (NEW RELEASE [ARCH])"; a new package has no [OLD].
    sed -n -e 's/^Inst \([^ ]*\) \[\([^]]*\)\] (\([^ ]*\) .*/inst \1 \2 \3/p' \
           -e 's/^Inst \([^ ]*\) (\([^ ]*\) .*/inst \1 - \2/p' "$scratch/simulate.out"
    grep -E '^[0-9]+ upgraded, ' "$scratch/simulate.out" | tail -n 1 | sed 's/^/summary /'
    ;;
upgrade)
    log=$2 flag=$3
    hold_backups "$4" || { echo "a backup still runs after an hour ($4): patch later" >&2; exit 1; }
    { : > "$log" && chmod 600 "$log"; } || { echo "cannot write $log" >&2; exit 1; }
    before=$(mktemp) after=$(mktemp)
    trap 'rm -f "$before" "$after"' EXIT
    installed > "$before"
    fail() { tail -n 5 "$log" >&2; echo "$1 (apt's output: $log)" >&2; exit 1; }
    $APT update --error-on=any >> "$log" 2>&1 || fail "apt-get update failed"
    # A dpkg run cut off earlier (power, a killed shell) must finish before apt goes on.
    # shellcheck disable=SC2086
    dpkg --configure -a $DPKG_KEEP >> "$log" 2>&1 || fail "dpkg --configure -a failed"
    # shellcheck disable=SC2086
    $APT $APT_KEEP upgrade --with-new-pkgs >> "$log" 2>&1 || fail "apt-get upgrade failed"
    installed > "$after"
    # Versions before and after, by package: what changed, what came, what went.
    awk 'NR == FNR { old[$1] = $2; next }
         { if (!($1 in old)) print "changed", $1, "-", $2; else if (old[$1] != $2) print "changed", $1, old[$1], $2; delete old[$1] }
         END { for (name in old) print "changed", name, old[name], "-" }' "$before" "$after"
    grep -E '^[0-9]+ upgraded, ' "$log" | tail -n 1 | sed 's/^/summary /'
    if [ -e "$flag" ]; then
        echo "reboot-required $(sort -u "$flag.pkgs" 2>/dev/null | tr '\n' ' ')"
    fi
    ;;
reboot)
    hold_backups "$2" || { echo "a backup still runs after an hour ($2): reboot later" >&2; exit 1; }
    logger -t coachntt-ops "maintenance.patch: rebooting the host" 2>/dev/null
    # Later, not now: this command answers and the deploy lock records it first. The reboot
    # takes the backup lock again: a backup that started in those seconds ends first.
    systemd-run --quiet --on-active=3 --unit="coachntt-reboot-$(date +%s)" \
        --description="reboot asked by coachntt-ops maintenance.patch" /usr/bin/flock -w 3600 "$2" /bin/systemctl reboot
    ;;
*)
    echo "usage: host-patch.sh pending | upgrade LOG FLAG BACKUP_LOCK | reboot BACKUP_LOCK" >&2
    exit 2
    ;;
esac
