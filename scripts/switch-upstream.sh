#!/bin/sh
# Point nginx's api upstream at one slot (run as root). The include is rewritten,
# `nginx -t` judges the whole configuration (the include before comes back when
# it fails), then a graceful reload: new workers take every new connection, old
# workers finish the requests and websockets they hold. Returns once every worker
# from before has been told to finish, so the old slot gets no new request after.
#   switch-upstream.sh FILE CONTENT
# Prints "unchanged" (nginx already has it: no reload) or "switched"; exit 1 with
# one line on stderr when it did not switch.
set -u
file=$1 content=$2
fail() { echo "$*" >&2; exit 1; }

# The plain workers of nginx's master ("worker process", not "... is shutting down").
workers() {
    for pid in $(pgrep -P "$1" 2>/dev/null); do
        case "$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null)" in
        *"is shutting down"*) ;;
        *"worker process"*) echo "$pid" ;;
        esac
    done
}

mkdir -p "$(dirname "$file")" || fail "cannot create $(dirname "$file")"
tmp=$(mktemp "$file.XXXXXX") || fail "cannot write beside $file"
if ! { printf '%s\n' "$content" > "$tmp" && chmod 644 "$tmp"; }; then rm -f "$tmp"; fail "cannot write $tmp"; fi
if [ -f "$file" ] && cmp -s "$tmp" "$file"; then
    rm -f "$tmp"
    echo unchanged
    exit 0
fi
had=no
if [ -f "$file" ]; then cp -p "$file" "$file.before" && had=yes; fi
mv -f "$tmp" "$file" || fail "cannot replace $file"
undo() { if [ $had = yes ]; then mv -f "$file.before" "$file"; else rm -f "$file"; fi; }

if ! why=$(nginx -t 2>&1); then
    undo
    first=$(printf '%s\n' "$why" | grep -v -e '^ *$' -e 'test failed' | head -n 1)
    fail "nginx -t refused the new upstream, the one before is back: $first"
fi
master=$(cat /run/nginx.pid 2>/dev/null)
if [ -z "$master" ] || [ ! -d "/proc/$master" ]; then
    undo
    fail "nginx is not running: start it (systemctl start nginx), nothing switched"
fi
before=$(workers "$master")
if ! systemctl reload nginx >/dev/null 2>&1; then
    undo
    fail "systemctl reload nginx failed, the upstream before is back: see journalctl -u nginx"
fi
rm -f "$file.before"
# The master starts new workers, then tells the old ones to finish; wait for that.
tries=0
while :; do
    still=""
    now=$(workers "$master")
    for pid in $before; do
        case " $(echo $now) " in *" $pid "*) still="$still $pid" ;; esac
    done
    [ -z "$still" ] && break
    tries=$((tries + 1))
    [ $tries -ge 100 ] && fail "nginx did not take the new upstream within 10s (workers$still still take connections)"
    sleep 0.1
done
echo switched
