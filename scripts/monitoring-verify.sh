#!/bin/sh
# Verify the monitoring stack from the server itself. Polls Prometheus' HTTP API until
# EXPECTED jobs each have a target with up == 1 (job api scrapes both api slots; the idle
# one is stopped, so one up is what a healthy api looks like) and the loaded alert rules
# contain every NEEDLE, or
# DEADLINE seconds pass; then prints, each after its marker line, what the task judges:
# the targets and the rules as Prometheus reports them, Grafana's /api/health status and
# what nginx answers for the metrics domain.
#   monitoring-verify.sh PROMETHEUS_URL GRAFANA_URL METRICS_DOMAIN EXPECTED DEADLINE [NEEDLE...]
set -u
prom=$1 grafana=$2 domain=$3 expected=$4 deadline=$5
shift 5
start=$(date +%s)
while :; do
    up=$(curl -s -m 3 -G "$prom/api/v1/query" --data-urlencode 'query=max by (job) (up)' |
        grep -o '"value":\[[0-9.e+]*,"1"\]' | wc -l)
    rules=$(curl -s -m 3 "$prom/api/v1/rules?type=alert")
    complete=yes
    for needle in "$@"; do
        case $rules in *"$needle"*) ;; *) complete=no ;; esac
    done
    [ "$up" -ge "$expected" ] && [ $complete = yes ] && break
    [ $(( $(date +%s) - start )) -ge "$deadline" ] && break
    sleep 2
done
echo "@@targets"
curl -s -m 5 "$prom/api/v1/targets?state=active"
echo
echo "@@rules"
printf '%s\n' "$rules"
echo "@@grafana"
curl -s -m 5 -o /dev/null -w '%{http_code}\n' "$grafana/api/health"
echo "@@nginx"
curl -s -m 5 -o /dev/null -w '%{http_code}\n' -H "Host: $domain" http://127.0.0.1/api/health
echo "@@seconds $(( $(date +%s) - start ))"
