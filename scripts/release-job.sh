#!/bin/sh
# Work under the deploy lock that the client cannot cut.
#
# Each phase of a release (fetch, backup, build, migrate, start, health gate)
# runs in its own session on the server, with its output and exit status kept
# in the lock directory. The waiter in front of it only watches: Ctrl-C on the
# operator's laptop, a killed CI job or a cut connection ends the waiter, never
# the migration halfway. A phase whose client is gone records the release as
# interrupted in the release log when it ends; the lock stays held for
# `deploy.recover`.
#
#   release-job.sh run     LOCK PHASE TIMEOUT ENTRY COMMAND   run COMMAND, print its output, exit with its status
#   release-job.sh wait    LOCK SECONDS                       wait for the running phase; prints "finished PHASE STATUS"
#   release-job.sh abandon LOCK ENTRY                         the client leaves: record ENTRY now or when the phase ends
#
# ENTRY is the release-log line to append if the client is gone, with
# @FINISHED@ and @STATUS@ filled in here.
set -u
trap '' PIPE
action=$1 lock=$2
log="$(dirname "$lock")/releases.jsonl"

# Kept as text so the detached phase below defines the very same functions.
#   alive PID            a process that exists and is no zombie (reaping may lag in containers)
#   record ENTRY STATUS  append the interrupted release to the log, once
shared_functions='alive() {
    proc_state=$(sed "s/.*) //" "/proc/$1/stat" 2>/dev/null | cut -d" " -f1) && [ -n "$proc_state" ] && [ "$proc_state" != Z ]
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

case "$action" in
run)
    phase=$3 timeout=$4 entry=$5 command=$6
    [ -d "$lock" ] || { echo "the deploy lock is gone: $phase not started" >&2; exit 75; }
    if running; then echo "phase $(cat "$lock/job.phase") still runs under the deploy lock" >&2; exit 75; fi
    rm -f "$lock/job.status" "$lock/job.out" "$lock/job.err" "$lock/job.pid"
    echo $$ > "$lock/job.waiter"
    printf '%s\n' "$phase" > "$lock/job.phase"
    [ -z "$entry" ] || printf '%s\n' "$entry" > "$lock/release.json"
    # setsid: a session of its own, out of reach of the ssh session's end.
    setsid sh -c '
        lock=$1 timeout=$2 command=$3 entry=$4 log=$5
        echo $$ > "$lock/job.pid"
        eval "$6"
        timeout --kill-after=10 "$timeout" sh -c "$command" < /dev/null
        status=$?
        # Decide before the status is written: the waiter leaves as soon as it
        # sees the status, and must not be taken for a client that is gone.
        # job.waiter, not the first waiter: a client that was interrupted and waits
        # again (release-job.sh wait) takes over, and is still there to settle it.
        if ! alive "$(cat "$lock/job.waiter")" || [ -e "$lock/client-left" ]; then record "$entry" "$status"; fi
        echo "$status" > "$lock/job.status.new" && mv "$lock/job.status.new" "$lock/job.status"
    ' release-job "$lock" "$timeout" "$command" "$entry" "$log" "$shared_functions" > "$lock/job.out" 2> "$lock/job.err" < /dev/null &
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
    [ ! -d "$lock" ] || echo $$ > "$lock/job.waiter"
    while running && [ "$(date +%s)" -lt "$end" ]; do
        sleep 0.5
        printf ' ' >&2 || exit 141  # the client went away again: let the phase record it
    done
    if running; then echo "running $(cat "$lock/job.phase") $(cat "$lock/job.pid")"; exit 4; fi
    echo "finished $(cat "$lock/job.phase" 2>/dev/null || echo none) $(cat "$lock/job.status" 2>/dev/null || echo -)"
    ;;
abandon)
    entry=$3
    [ -d "$lock" ] || exit 0
    : > "$lock/client-left"
    running && exit 0  # the phase records the release when it ends
    record "$entry" "$(cat "$lock/job.status" 2>/dev/null || echo -)"
    ;;
*)
    echo "usage: release-job.sh run|wait|abandon LOCK ..." >&2
    exit 2
    ;;
esac
