#!/bin/sh
# Health gate: poll URL about every INTERVAL seconds, each request with its own
# timeout, until it answers 200 or DEADLINE seconds pass. Prints one line per
# attempt ("<seconds> <http code> <first bytes of body>") so a failed gate
# shows what the service actually said, not an opaque "unhealthy".
#   health-gate.sh URL DEADLINE INTERVAL
set -u
url=$1 deadline=$2 interval=$3
start=$(date +%s)
while :; do
    body=$(curl -s -m 3 -o - -w '\n%{http_code}' "$url" 2>/dev/null)
    code=$(printf '%s' "$body" | tail -n 1)
    text=$(printf '%s' "$body" | sed '$d' | tr '\n' ' ' | cut -c1-120)
    elapsed=$(( $(date +%s) - start ))
    echo "${elapsed}s ${code:-000} $text"
    [ "$code" = "200" ] && exit 0
    [ "$elapsed" -ge "$deadline" ] && exit 1
    sleep "$interval"
done
