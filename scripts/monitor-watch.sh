#!/bin/sh
# monitor.watch on the server: every INTERVAL seconds, count the requests nginx
# logged since the last look (and how many answered 5xx) and ask the live api
# slot's /health once, printing one line per interval, until SECONDS have passed.
# The client follows the lines as they come (fabfile/core/watch.py judges them)
# and may cut the script off once it has seen enough.
#
#   monitor-watch.sh ACCESS_LOG SECONDS INTERVAL INCLUDE PORT_B URL_A URL_B
#
# INCLUDE PORT_B URL_A URL_B: live_slot's (scripts/live-slot.sh, sent before this
# script), read again every interval: a rollback during the watch is followed.
# Output: "start <epoch>", then "sample <elapsed s> <requests> <5xx> <http code> <slot>"
# per interval ("000" when /health did not answer; slot a or b). Exit 3: no
# readable access log.
# The log is read from where it ended at the last look (byte offset); a rotated
# log (new inode or shorter file) is read from its start. Lines are nginx's
# combined format: the status is the first field after the quoted request.
set -u
log=$1 seconds=$2 interval=$3 include=$4 port_b=$5 url_a=$6 url_b=$7
[ -r "$log" ] || { echo "cannot read $log" >&2; exit 3; }

position() { stat -L -c '%i %s' "$log" 2>/dev/null || echo "0 0"; }
set -- $(position)
inode=$1 offset=$2
start=$(date +%s)
echo "start $start"
step=0
while :; do
    step=$((step + 1))
    wait_for=$((start + step * interval - $(date +%s)))
    [ "$wait_for" -le 0 ] || sleep "$wait_for"
    set -- $(position)
    if [ "$1" != "$inode" ] || [ "$2" -lt "$offset" ]; then
        inode=$1 offset=0
    fi
    counts=$(tail -c +$((offset + 1)) "$log" 2>/dev/null | head -c $(($2 - offset)) |
        awk -F'"' 'NF >= 3 {n++; split($3, f, " "); if (f[1] ~ /^5[0-9][0-9]$/) e++} END {print n + 0, e + 0}')
    offset=$2
    live_slot "$include" "$port_b" "$url_a" "$url_b"
    code=$(curl -s -m 3 -o /dev/null -w '%{http_code}' "$live_url" 2>/dev/null)
    elapsed=$(($(date +%s) - start))
    echo "sample $elapsed ${counts:-0 0} ${code:-000} $live_name"
    [ "$elapsed" -lt "$seconds" ] || exit 0
done
