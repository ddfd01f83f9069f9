#!/bin/sh
# The deploy lock: one release at a time. mkdir is atomic, so two deploys
# racing for the lock cannot both win (a check-then-write lock can). The lock
# directory also holds the phase running under it (scripts/release-job.sh).
#   deploy-lock.sh acquire STATE_DIR TOKEN WHO SHA MESSAGE   exit 4 + holder info if held
#   deploy-lock.sh release STATE_DIR TOKEN                   exit 5 if the lock is not (any more) ours
#   deploy-lock.sh status  STATE_DIR                         holder + phase info, exit 1 if free
#   deploy-lock.sh break   STATE_DIR                         exit 4 while a phase still runs under it
set -u
action=$1 state_dir=$2
lock="$state_dir/deploy.lock"

# /proc, not kill -0: the phase may run as another user than the one asking.
alive() {  # a process that exists and is no zombie (reaping may lag on containers)
    proc_state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) && [ -n "$proc_state" ] && [ "$proc_state" != Z ]
}

running() {
    [ -f "$lock/job.pid" ] && [ ! -f "$lock/job.status" ] && alive "$(cat "$lock/job.pid")"
}

status() {
    cat "$lock/info" 2>/dev/null || echo "holder=unknown"
    if running; then
        echo "job=running"
    elif [ -f "$lock/job.status" ]; then
        echo "job=finished"
        echo "job_status=$(cat "$lock/job.status")"
    else
        echo "job=none"
    fi
    [ ! -f "$lock/job.phase" ] || echo "phase=$(cat "$lock/job.phase")"
    [ ! -f "$lock/job.pid" ] || echo "job_pid=$(cat "$lock/job.pid")"
    # The waiter lives as long as the client that started the phase is connected.
    if [ -f "$lock/job.waiter" ] && alive "$(cat "$lock/job.waiter")"; then echo "client=connected"; fi
    [ ! -e "$lock/recorded" ] || echo "recorded=yes"
    [ ! -e "$lock/client-left" ] || echo "client_left=yes"
    [ ! -f "$lock/release.json" ] || echo "release=$(head -c 4096 "$lock/release.json" | head -n 1)"
}

case "$action" in
acquire)
    mkdir -p "$state_dir"
    if mkdir "$lock" 2>/dev/null; then
        # Phases run as the deploy user (the state dir's owner) and write here
        # and to the release log too.
        touch "$state_dir/releases.jsonl"
        [ "$(id -u)" != 0 ] || chown "$(stat -c %u:%g "$state_dir")" "$lock" "$state_dir/releases.jsonl"
        printf 'holder=%s\nsince=%s\nsha=%s\nmessage=%s\ntoken=%s\n' \
            "$4" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$5" "$6" "$3" > "$lock/info"
        exit 0
    fi
    status
    exit 4
    ;;
release)
    [ -d "$lock" ] || exit 0
    if ! grep -qx "token=$3" "$lock/info" 2>/dev/null; then
        echo "the deploy lock is no longer ours:" >&2
        status >&2
        exit 5
    fi
    rm -rf "$lock"
    ;;
status)
    [ -d "$lock" ] || exit 1
    status
    ;;
break)
    [ -d "$lock" ] || exit 0
    if running; then
        status
        exit 4
    fi
    rm -rf "$lock"
    ;;
*)
    echo "usage: deploy-lock.sh acquire|release|status|break STATE_DIR ..." >&2
    exit 2
    ;;
esac
