#!/bin/sh
# Make nginx serve its new configuration (run as root, after `nginx -t` passed).
# A reload is asynchronous: `systemctl reload` returns once the master got SIGHUP,
# while the old workers still accept connections on the shared ports until the
# master has started new ones and told the old ones to finish. Returns once every
# worker from before is shutting down (or gone), so the next request sees the new
# configuration; bounded at 10 s. nginx not running: the reload fails, it is started.
set -u
master=$(cat /run/nginx.pid 2>/dev/null)

# The plain workers of nginx's master ("worker process", not "... is shutting down").
workers() {
    for pid in $(pgrep -P "$master" 2>/dev/null); do
        case "$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null)" in
        *"is shutting down"*) ;;
        *"worker process"*) echo "$pid" ;;
        esac
    done
}

before=""
[ -n "$master" ] && [ -d "/proc/$master" ] && before=$(workers)
systemctl reload nginx || exec systemctl restart nginx
tries=0
while [ $tries -lt 100 ]; do
    now=" $(echo $(workers)) "
    still=""
    for pid in $before; do
        case $now in *" $pid "*) still="$still $pid" ;; esac
    done
    [ -z "$still" ] && exit 0
    tries=$((tries + 1))
    sleep 0.1
done
echo "nginx reloaded, but workers$still still took connections after 10s" >&2
exit 0
