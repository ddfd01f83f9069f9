#!/bin/sh
# The postgres exporter's login to the app's database, derived ON the server from the app's
# env file (POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB), so the password never travels
# and never shows: only the words below are printed.
#   postgres-exporter-env.sh check APP_ENV OUT DB_HOST OWNER   -> current | stale | missing
#   postgres-exporter-env.sh write APP_ENV OUT DB_HOST OWNER   -> OUT rewritten (mode 600, OWNER)
# Exit 3 when APP_ENV is missing or lacks one of the three.
set -eu
mode=$1 app_env=$2 out=$3 db_host=$4 owner=$5
if [ ! -r "$app_env" ]; then
    echo "cannot read $app_env" >&2
    exit 3
fi
value() { sed -n "s/^$1=//p" "$app_env" | tail -n 1; }
user=$(value POSTGRES_USER) password=$(value POSTGRES_PASSWORD) db=$(value POSTGRES_DB)
if [ -z "$user" ] || [ -z "$password" ] || [ -z "$db" ]; then
    echo "$app_env lacks POSTGRES_USER, POSTGRES_PASSWORD or POSTGRES_DB" >&2
    exit 3
fi
umask 077
if [ "$mode" = write ]; then tmp=$(mktemp "$out.XXXXXX"); else tmp=$(mktemp); fi
trap 'rm -f "$tmp"' EXIT
# Written like the app's env file (compose reads both the same way): no quoting added.
printf '%s\n' "# Managed by coachntt-ops (monitor.stack), derived from $app_env." \
    "DATA_SOURCE_URI=$db_host:5432/$db?sslmode=disable" \
    "DATA_SOURCE_USER=$user" \
    "DATA_SOURCE_PASS=$password" > "$tmp"
case $mode in
check)
    if [ ! -e "$out" ]; then echo missing
    elif cmp -s "$tmp" "$out" && [ "$(stat -c '%a %U:%G' "$out")" = "600 $owner" ]; then echo current
    else echo stale
    fi ;;
write)
    chown "$owner" "$tmp"
    mv -f "$tmp" "$out"
    trap - EXIT
    echo "wrote $out" ;;
*)
    echo "unknown mode $mode" >&2
    exit 2 ;;
esac
