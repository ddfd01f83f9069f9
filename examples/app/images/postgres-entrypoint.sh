#!/bin/sh
# Entrypoint of the coachntt/postgres image (a registry-free stand-in for the official
# postgres image, same environment): on first start, initdb into $PGDATA with
# POSTGRES_USER (superuser) / POSTGRES_PASSWORD / POSTGRES_DB, then run postgres in the
# foreground. Runs as the `postgres` user; $PGDATA is a named volume owned by it.
set -eu
PGDATA=${PGDATA:-/var/lib/postgresql/data}
export PGDATA

if [ "$(id -u)" = 0 ]; then
    echo "postgres-entrypoint: run this container as the postgres user (compose: user: postgres)" >&2
    exit 1
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?postgres-entrypoint: POSTGRES_PASSWORD must be set (it comes from .env.production)}"
    user=${POSTGRES_USER:-postgres}
    db=${POSTGRES_DB:-$user}
    mkdir -p "$PGDATA"
    chmod 700 "$PGDATA"
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    # Other containers on the compose network connect over TCP with a password;
    # `docker exec ccp_postgres pg_dump -U ...` uses the local socket (trust).
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    cat >> "$PGDATA/postgresql.conf" <<CONF
listen_addresses = '*'
unix_socket_directories = '/var/run/postgresql'
jit = off
CONF
    if [ "$db" != postgres ]; then
        escaped=$(printf '%s' "$db" | sed 's/"/""/g')
        echo "CREATE DATABASE \"$escaped\"" | postgres --single -D "$PGDATA" postgres >/dev/null
    fi
    echo "postgres-entrypoint: initialised $PGDATA (user $user, database $db)"
fi

exec postgres -D "$PGDATA" "$@"
