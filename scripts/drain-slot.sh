#!/bin/sh
# Drain an api slot once nginx sends it no new request: wait until no connection
# from this host to its port is left (in-flight requests done, websockets closed),
# at least SETTLE seconds (a request an old nginx worker was still reading at the
# switch reaches the slot just after it), at most LIMIT seconds. The caller then
# stops the slot, which closes what is left cleanly (websockets: 1001 going away).
#   drain-slot.sh PORT LIMIT SETTLE
# Prints one line: how long it took and what was left.
set -u
port=$1 limit=$2 settle=$3
start=$(date +%s)
sleep "$settle"
while :; do
    # dst, not dport: docker-proxy's own connections to the containers use port 8000 too.
    open=$(ss -Htn state established dst "127.0.0.1:$port" 2>/dev/null | wc -l)
    waited=$(( $(date +%s) - start ))
    if [ "$open" -eq 0 ]; then
        echo "drained in ${waited}s: no connection left to 127.0.0.1:$port"
        exit 0
    fi
    if [ "$waited" -ge "$limit" ]; then
        echo "after ${waited}s, $open connection(s) still open to 127.0.0.1:$port (websockets): closed as the slot stops"
        exit 0
    fi
    sleep 0.5
done
