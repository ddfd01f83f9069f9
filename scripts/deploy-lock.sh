#!/bin/sh
# The deploy lock, and the work done under it where the client cannot cut it.
#
# One release at a time: mkdir is atomic, so two deploys racing for the lock
# cannot both win (a check-then-write lock can). Each phase of a release
# (fetch, backup, build, migrate, start, health gate) runs in its own session
# on the server, with its output and exit status kept in the lock directory.
# The waiter in front of it only watches: Ctrl-C on the operator's laptop, a
# killed CI job or a cut connection ends the waiter, never the migration
# halfway. A phase whose client is gone records the release as interrupted in
# the release log when it ends; the lock stays held for `deploy.recover`.
#
#   deploy-lock.sh acquire STATE_DIR TOKEN WHO SHA MESSAGE   exit 4 + holder info if held
#   deploy-lock.sh finish  STATE_DIR TOKEN ENTRY             append ENTRY (if any) to the log and free the lock,
#                                     as one step; exit 5, nothing written, if the lock is not (any more) ours
#   deploy-lock.sh release STATE_DIR TOKEN                   finish with no entry (deps' restart of Docker)
#   deploy-lock.sh status  STATE_DIR                         holder + phase info, exit 1 if free
#   deploy-lock.sh break   STATE_DIR                         exit 4 while a phase still runs under it
#   deploy-lock.sh run     STATE_DIR PHASE TIMEOUT ENTRY COMMAND
#                                     run COMMAND as the lock's phase, print its output, exit with its status
#   deploy-lock.sh wait    STATE_DIR SECONDS                 wait for the running phase; prints "finished PHASE STATUS"
#   deploy-lock.sh abandon STATE_DIR ENTRY                   the client leaves: record ENTRY now or when the phase ends
#
# ENTRY (run, abandon) is the release-log line to append if the client is gone,
# with @FINISHED@ and @STATUS@ filled in here. Once the release has its final
# entry (ok or failed), that entry is ENTRY: a release logged as finished is
# never undone by `deploy.recover`. finish's ENTRY is the final entry itself.
set -u
trap '' PIPE
action=$1 state_dir=$2
lock="$state_dir/deploy.lock"
log="$state_dir/releases.jsonl"

# Kept as text so the detached phase below defines the very same functions.
#   identity PID         "PID START BOOT": the process's start time (clock ticks since boot) and
#                        the boot's id, what job.pid and job.waiter hold (written whole: a
#                        .new file renamed, so no reader sees it half written)
#   alive "PID [START BOOT]"  that very process exists and is no zombie (reaping may lag in
#                        containers); after a reboot, or once its number is reused, another
#                        process with that PID is not it. /proc, not kill -0: it may run as
#                        another user than the one asking
#   record ENTRY STATUS  append the interrupted release to the log, once
shared_functions='identity() {
    printf "%s %s %s\n" "$1" "$(sed "s/.*) //" "/proc/$1/stat" | cut -d" " -f20)" "$(cat /proc/sys/kernel/random/boot_id)"
}
alive() {
    set -- $1
    [ -n "${1:-}" ] || return 1
    proc_fields=$(sed "s/.*) //" "/proc/$1/stat" 2>/dev/null) || return 1
    proc_state=${proc_fields%% *}
    [ -n "$proc_state" ] && [ "$proc_state" != Z ] || return 1
    [ -z "${2:-}" ] || [ "$(printf "%s" "$proc_fields" | cut -d" " -f20)" = "$2" ] || return 1
    [ -z "${3:-}" ] || [ "$(cat /proc/sys/kernel/random/boot_id)" = "$3" ]
}
record() {
    [ -n "$1" ] && [ ! -e "$lock/recorded" ] || return 0
    printf "%s\n" "$1" | sed -e "s/@FINISHED@/$(date -u +%Y-%m-%dT%H:%M:%SZ)/" -e "s/@STATUS@/$2/" >> "$log" &&
        : > "$lock/recorded"
}'
eval "$shared_functions"

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
    [ ! -f "$lock/job.pid" ] || echo "job_pid=$(cut -d' ' -f1 "$lock/job.pid")"
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
finish|release)
    entry=${4:-}
    # Once begun it runs to its end: a client that goes away now cannot leave
    # the release logged with the lock still held (deploy.recover would undo it).
    trap '' HUP INT TERM
    if [ -d "$lock" ] && ! grep -qx "token=$3" "$lock/info" 2>/dev/null; then
        echo "the deploy lock is no longer ours:" >&2
        status >&2
        exit 5
    fi
    [ -z "$entry" ] || printf '%s\n' "$entry" >> "$log" || exit 1
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
run)
    phase=$3 timeout=$4 entry=$5 command=$6
    [ -d "$lock" ] || { echo "the deploy lock is gone: $phase not started" >&2; exit 75; }
    if running; then echo "phase $(cat "$lock/job.phase") still runs under the deploy lock" >&2; exit 75; fi
    rm -f "$lock/job.status" "$lock/job.out" "$lock/job.err" "$lock/job.pid"
    identity $$ > "$lock/job.waiter.new" && mv "$lock/job.waiter.new" "$lock/job.waiter"
    printf '%s\n' "$phase" > "$lock/job.phase"
    [ -z "$entry" ] || printf '%s\n' "$entry" > "$lock/release.json"
    # setsid: a session of its own, out of reach of the ssh session's end.
    setsid sh -c '
        lock=$1 timeout=$2 command=$3 entry=$4 log=$5
        eval "$6"
        identity $$ > "$lock/job.pid.new" && mv "$lock/job.pid.new" "$lock/job.pid"
        timeout --kill-after=10 "$timeout" sh -c "$command" < /dev/null
        status=$?
        # Decide before the status is written: the waiter leaves as soon as it
        # sees the status, and must not be taken for a client that is gone.
        # job.waiter, not the first waiter: a client that was interrupted and waits
        # again (deploy-lock.sh wait) takes over, and is still there to settle it.
        if ! alive "$(cat "$lock/job.waiter")" || [ -e "$lock/client-left" ]; then record "$entry" "$status"; fi
        echo "$status" > "$lock/job.status.new" && mv "$lock/job.status.new" "$lock/job.status"
    ' deploy-lock "$lock" "$timeout" "$command" "$entry" "$log" "$shared_functions" > "$lock/job.out" 2> "$lock/job.err" < /dev/null &
    beats=0
    while [ ! -f "$lock/job.status" ]; do
        if [ -f "$lock/job.pid" ] && ! alive "$(cat "$lock/job.pid")"; then
            sleep 0.2; [ -f "$lock/job.status" ] || { echo "phase $phase vanished without a status" >&2; exit 70; }
        fi
        sleep 0.1
        beats=$((beats + 1))
        # A client that is gone has closed this pipe: the failed write ends the waiter.
        if [ $((beats % 10)) -eq 0 ]; then printf ' ' >&2 || exit 141; fi
    done
    cat "$lock/job.out"
    cat "$lock/job.err" >&2
    exit "$(cat "$lock/job.status")"
    ;;
wait)
    seconds=$3
    end=$(( $(date +%s) + seconds ))
    [ ! -d "$lock" ] || { identity $$ > "$lock/job.waiter.new" && mv "$lock/job.waiter.new" "$lock/job.waiter"; }
    while running && [ "$(date +%s)" -lt "$end" ]; do
        sleep 0.5
        printf ' ' >&2 || exit 141  # the client went away again: let the phase record it
    done
    if running; then echo "running $(cat "$lock/job.phase") $(cut -d' ' -f1 "$lock/job.pid")"; exit 4; fi
    echo "finished $(cat "$lock/job.phase" 2>/dev/null || echo none) $(cat "$lock/job.status" 2>/dev/null || echo -)"
    ;;
abandon)
    entry=$3
    [ -d "$lock" ] || exit 0
    : > "$lock/client-left"
    running && exit 0  # the phase records the release when it ends
    # What was recorded is what deploy.recover reads: a final entry says the release had finished.
    [ -z "$entry" ] || printf '%s\n' "$entry" > "$lock/release.json"
    record "$entry" "$(cat "$lock/job.status" 2>/dev/null || echo -)"
    ;;
*)
    echo "usage: deploy-lock.sh acquire|finish|release|status|break|run|wait|abandon STATE_DIR ..." >&2
    exit 2
    ;;
esac
