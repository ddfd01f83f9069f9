#!/bin/sh
# Entrypoint of the coachntt/pgbouncer image: write pgbouncer.ini and the auth file from
# the same environment as the postgres container (POSTGRES_USER / POSTGRES_PASSWORD),
# then run pgbouncer in the foreground on :6432. Runs as the `postgres` user.
set -eu
: "${POSTGRES_PASSWORD:?pgbouncer-entrypoint: POSTGRES_PASSWORD must be set (it comes from .env.production)}"
user=${POSTGRES_USER:-postgres}
conf_dir=${PGBOUNCER_CONF_DIR:-/tmp/pgbouncer}
mkdir -p "$conf_dir"
chmod 700 "$conf_dir"
umask 077
quote() { printf '"%s"' "$(printf '%s' "$1" | sed 's/"/""/g')"; }
printf '%s %s\n' "$(quote "$user")" "$(quote "$POSTGRES_PASSWORD")" > "$conf_dir/userlist.txt"
cat > "$conf_dir/pgbouncer.ini" <<CONF
[databases]
* = host=${PGBOUNCER_DB_HOST:-postgres} port=${PGBOUNCER_DB_PORT:-5432}

[pgbouncer]
listen_addr = 0.0.0.0
listen_port = ${PGBOUNCER_PORT:-6432}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $conf_dir/userlist.txt
admin_users = $user
stats_users = $user
pool_mode = ${PGBOUNCER_POOL_MODE:-session}
max_client_conn = ${PGBOUNCER_MAX_CLIENT_CONN:-200}
default_pool_size = ${PGBOUNCER_DEFAULT_POOL_SIZE:-20}
ignore_startup_parameters = extra_float_digits
CONF
exec pgbouncer "$@" "$conf_dir/pgbouncer.ini"
