#!/bin/sh
# The deploy lock: one release at a time. mkdir is atomic, so two deploys
# racing for the lock cannot both win (a check-then-write lock can).
#   deploy-lock.sh acquire STATE_DIR WHO SHA MESSAGE   exit 4 + holder info if held
#   deploy-lock.sh release STATE_DIR
#   deploy-lock.sh status  STATE_DIR                   prints holder info, exit 1 if free
set -u
action=$1 state_dir=$2
lock="$state_dir/deploy.lock"
case "$action" in
acquire)
    mkdir -p "$state_dir"
    if mkdir "$lock" 2>/dev/null; then
        printf 'holder=%s\nsince=%s\nsha=%s\nmessage=%s\nhost_pid=%s\n' \
            "$3" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$4" "$5" "$$" > "$lock/info"
        exit 0
    fi
    cat "$lock/info" 2>/dev/null || echo "holder=unknown"
    exit 4
    ;;
release)
    rm -rf "$lock"
    ;;
status)
    [ -d "$lock" ] || exit 1
    cat "$lock/info" 2>/dev/null || echo "holder=unknown"
    ;;
*)
    echo "usage: deploy-lock.sh acquire|release|status STATE_DIR ..." >&2
    exit 2
    ;;
esac
