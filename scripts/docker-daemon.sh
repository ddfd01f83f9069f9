#!/bin/sh
# docker-daemon.sh CONTENT_BASE64: make /etc/docker/daemon.json say CONTENT and
# restart Docker so it applies, without stopping the containers (run as root,
# under the deploy lock, so never in the middle of a release).
#
# live-restore keeps containers running while dockerd restarts, but only once the
# running daemon has it: it is one of the settings a reload (SIGHUP) applies, so a
# daemon without it is reloaded first and the restart that applies the rest
# (no-new-privileges, logging, userland-proxy, icc) leaves the containers up. A
# file dockerd refuses never replaces the old one; a daemon that does not come
# back gets the old file back and is started again.
set -u
conf=/etc/docker/daemon.json
previous=/etc/docker/daemon.json.coachntt-previous

fail() { echo "$*" >&2; exit 1; }
answers() { timeout 5 docker info --format '{{.LiveRestoreEnabled}}' 2>/dev/null; }
wait_for_daemon() {
    for _ in $(seq 1 60); do
        [ "$(answers)" = "$1" ] && return 0
        sleep 0.5
    done
    return 1
}

mkdir -p /etc/docker
new=$(mktemp /etc/docker/daemon.json.XXXXXX)
trap 'rm -f "$new"' EXIT
printf %s "$1" | base64 -d > "$new"
chmod 644 "$new"
if ! why=$(dockerd --validate --config-file "$new" 2>&1); then
    fail "dockerd refuses the new daemon.json: $(printf '%s' "$why" | tail -n 1); nothing changed"
fi

running_before=$(docker ps -q --no-trunc | sort)
if [ -e "$conf" ]; then cp -p "$conf" "$previous"; else rm -f "$previous"; fi
mv -f "$new" "$conf"

if [ "$(answers)" != true ]; then
    systemctl reload docker
    wait_for_daemon true || echo "dockerd did not turn live-restore on by reload; its containers restart with it" >&2
fi
if ! systemctl restart docker || ! wait_for_daemon true; then
    if [ -e "$previous" ]; then mv -f "$previous" "$conf"; else rm -f "$conf"; fi
    systemctl restart docker
    fail "Docker did not come back with the new daemon.json: the previous one is back ($(journalctl -u docker -n 1 -o cat 2>/dev/null))"
fi

# What ran before runs now (live-restore kept it, or its restart policy brought it back).
stopped_since() {
    now=$(docker ps -q --no-trunc)
    for id in $running_before; do printf '%s\n' "$now" | grep -qx "$id" || echo "$id"; done
}
for _ in $(seq 1 30); do
    stopped=$(stopped_since)
    [ -z "$stopped" ] && exit 0
    sleep 1
done
# shellcheck disable=SC2086 # one argument per container id
fail "Docker restarted with the new daemon.json but these containers stopped: $(docker inspect --format '{{.Name}}' $stopped | tr -d / | tr '\n' ' ')"
