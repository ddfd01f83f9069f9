#!/bin/bash
# Install a release of coachntt-ops on the server, as root, in one round trip.
#
#   install-tool.sh TARBALL SHA256 RELEASE DIGEST USER ENV ENV_FILE
#
# TARBALL (uploaded by `tool.install`, checked against SHA256, always removed) holds
# the project files and .bundle/wheels: the venv is built from those wheels alone
# (pip --no-index), so the server needs no PyPI. TARBALL "-" = RELEASE is unpacked
# already (going back to the release before): only the switch happens.
#
#   /opt/coachntt-ops-releases/RELEASE/       project files + .venv, root-owned, read-only
#   /opt/coachntt-ops -> ...releases/RELEASE  switched by renaming a new symlink over it
#
# A release is complete once its .coachntt-release file holds DIGEST (written last,
# after the new tool loaded the server's settings as USER); an incomplete one is
# rebuilt. The release that served before is kept, older ones are removed.
set -euo pipefail
tarball=$1 tarball_sha=$2 release=$3 digest=$4 user=$5 env=$6 env_file=$7
link=/opt/coachntt-ops
releases=/opt/coachntt-ops-releases
new=$releases/$release
marker=.coachntt-release
APT="apt-get -q -y -o DPkg::Lock::Timeout=300"

fail() { echo "$*" >&2; exit 1; }
if [ "$tarball" != "-" ]; then
    trap 'rm -f "$tarball"' EXIT
    [ -f "$tarball" ] && [ ! -L "$tarball" ] || fail "the uploaded bundle $tarball is missing"
    [ "$(sha256sum < "$tarball" | cut -d' ' -f1)" = "$tarball_sha" ] || fail "the uploaded bundle $tarball is damaged (sha256 differs)"
fi

# Debian and Ubuntu ship python3 without ensurepip: `python3 -m venv` needs python3-venv.
if ! python3 -c 'import ensurepip' 2>/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    { $APT update && $APT install --no-install-recommends python3-venv; } >/dev/null 2>&1 \
        || fail "cannot install python3-venv (apt-get failed): install it by hand and rerun tool.install"
fi

install -d -m 755 "$releases"
exec 9>"$releases/.install.lock"
flock -w 600 9 || fail "another tool.install runs on this host: wait for it and rerun"

if [ "$(cat "$new/$marker" 2>/dev/null)" != "$digest" ]; then
    [ "$tarball" != "-" ] || fail "release $release is not unpacked on this host: rerun tool.install"
    rm -rf "$new"
    install -d -m 755 "$new"
    tar -x -f "$tarball" -C "$new" --no-same-owner || fail "cannot unpack the bundle into $new"
    python3 -m venv "$new/.venv" >/dev/null || fail "python3 -m venv failed in $new"
    if ! out=$("$new/.venv/bin/pip" install --isolated --disable-pip-version-check --no-input --quiet --no-index \
            --find-links "$new/.bundle/wheels" --requirement "$new/.bundle/requirements.txt" 2>&1); then
        fail "pip could not install the bundled wheels in $new/.venv: $(printf '%s' "$out" | tail -n 1)"
    fi
    rm -rf "$new/.bundle/wheels"
    # Root-owned: USER can never write bytecode there, so compile it now.
    "$new/.venv/bin/python" -m compileall -q "$new/fabfile" "$new/tasks.py" >/dev/null || true
    # The new tool must load and accept the server's settings, as USER, before it goes live.
    home=$(getent passwd "$user" | cut -d: -f6)
    if ! why=$(cd "$new" && runuser -u "$user" -- env HOME="${home:-/}" COACHNTT_ENV="$env" COACHNTT_ENV_FILE="$env_file" \
            "$new/.venv/bin/python" -c 'import sys, yaml; from fabfile.core import settings
try:
    settings.validate(settings.load(yaml.safe_load(open("invoke.yaml"))["coachntt"]))
except settings.ConfigError as exc:
    sys.exit(exc.one_line())' 2>&1 && runuser -u "$user" -- env HOME="${home:-/}" "$new/.venv/bin/inv" --search-root "$new" --list 2>&1 >/dev/null); then
        fail "the new tool does not start on this host as $user: $(printf '%s' "$why" | tail -n 1)"
    fi
    printf '%s\n' "$digest" > "$new/$marker.tmp" && mv -f "$new/$marker.tmp" "$new/$marker"
fi

previous=$(readlink -e "$link" || true)
if [ -d "$link" ] && [ ! -L "$link" ]; then
    # A copy put there by hand before tool.install: kept as a release, then replaced by the link.
    previous="$releases/by-hand-$(date -u +%Y%m%d%H%M%S)"
    mv "$link" "$previous"
fi
if [ "$previous" != "$new" ]; then
    ln -sfn "$new" "$link.new.$$"
    mv -T -f "$link.new.$$" "$link"   # rename(2): the path always names a whole release
fi

for dir in "$releases"/*; do
    [ -d "$dir" ] || continue
    [ "$dir" = "$new" ] || [ "$dir" = "$previous" ] || rm -rf "$dir"
done
echo "installed $release${previous:+ (kept $(basename "$previous"))}"
