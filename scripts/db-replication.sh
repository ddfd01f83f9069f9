#!/bin/sh
# The database of a layout: the primary published for the app hosts, and PostgreSQL's own
# streaming replication, both ends; fabfile/db.py decides what to run.
# Nothing secret is printed or put on a command line: the replication password lives in
# the app's env file on the primary (REPLICATION_PASSWORD), and reaches a replica as a
# file only its login user can read, removed here once used.
#
#   db-replication.sh facts CONTAINER SUPERUSER DB ENV_FILE USER
#       primary or replica, read only: "password yes|no", "role yes|no|noreplication",
#       "slot NAME", "hba USER ADDRESS" (replication lines), "keep SIZE", "recovery t|f",
#       "receiver STATUS"
#   db-replication.sh publish APP_DIR ADDRESS
#       DB_PUBLISH=ADDRESS and DB_PUBLISH_PORT=5432 in APP_DIR/.env, the file compose reads
#       for them (the caller recreates the postgres service after it)
#   db-replication.sh password ENV_FILE
#       REPLICATION_PASSWORD in ENV_FILE, generated once (64 hex characters), mode kept
#   db-replication.sh grant CONTAINER SUPERUSER DB ENV_FILE USER KEEP [SLOT=ADDRESS...]
#       the replication role with the env file's password, a physical slot and a
#       pg_hba.conf line per replica, max_slot_wal_keep_size = KEEP, configuration reloaded
#   db-replication.sh volume VOLUME
#       (as root) what the data volume holds: "empty", "standby" or "database"
#   db-replication.sh copy VOLUME IMAGE PRIMARY USER SLOT SECRET_FILE
#       pg_basebackup -R from PRIMARY:5432 into VOLUME (must be empty) as the image's
#       postgres user; a failed copy leaves the volume empty again
#   db-replication.sh streaming CONTAINER SUPERUSER DB TIMEOUT
#       waits until the standby's WAL receiver streams; else exit 1 with its last log line
#   db-replication.sh database-url ENV_FILE SECRET_FILE
#       DATABASE_URL in ENV_FILE := the URL in SECRET_FILE (the primary's, at its private
#       address), mode kept; SECRET_FILE removed
#   db-replication.sh readonly-url ENV_FILE check|set HOST:PORT...
#       DATABASE_URL_READONLY: DATABASE_URL with the replicas as its hosts and
#       target_session_attrs=read-only; check prints "current" or "differs"
set -eu
command=$1
shift

sql() {  # sql CONTAINER SUPERUSER DB: the statements on stdin, rows as "a|b" lines
    docker exec -i "$1" psql -AtX -q -v ON_ERROR_STOP=1 -U "$2" -d "$3"
}

env_value() {  # env_value FILE KEY: the value of KEY= in FILE (last one wins), empty if none
    sed -n "s/^$2=//p" "$1" | tail -n 1
}

set_env_line() {  # set_env_line FILE KEY VALUE: replace or append, atomically, mode and owner kept
    file=$1 key=$2 value=$3
    tmp=$(mktemp "$file.XXXXXX")
    if [ -e "$file" ]; then
        chmod --reference="$file" "$tmp"
        chown --reference="$file" "$tmp" 2> /dev/null || true
        grep -v "^$key=" "$file" > "$tmp" || true
    fi
    printf '%s=%s\n' "$key" "$value" >> "$tmp"
    mv -f "$tmp" "$file"
}

case $command in
facts)
    container=$1 superuser=$2 db=$3 env_file=$4 user=$5
    if [ -n "$(env_value "$env_file" REPLICATION_PASSWORD 2> /dev/null)" ]; then echo "password yes"; else echo "password no"; fi
    sql "$container" "$superuser" "$db" <<SQL
select 'recovery ' || pg_is_in_recovery();
select 'role ' || coalesce((select case when rolreplication then 'yes' else 'noreplication' end
                            from pg_roles where rolname = '$user'), 'no');
select 'slot ' || slot_name from pg_replication_slots where slot_type = 'physical';
select 'hba ' || array_to_string(user_name, ',') || ' ' || coalesce(address, '-')
  from pg_hba_file_rules where 'replication' = any(database);
select 'keep ' || current_setting('max_slot_wal_keep_size');
select 'receiver ' || coalesce((select status from pg_stat_wal_receiver), 'none');
SQL
    ;;
publish)
    app_dir=$1 address=$2
    set_env_line "$app_dir/.env" DB_PUBLISH "$address"
    set_env_line "$app_dir/.env" DB_PUBLISH_PORT 5432
    echo "DB_PUBLISH=$address, DB_PUBLISH_PORT=5432 in $app_dir/.env"
    ;;
password)
    env_file=$1
    if [ -n "$(env_value "$env_file" REPLICATION_PASSWORD)" ]; then
        echo "kept REPLICATION_PASSWORD in $env_file"
        exit 0
    fi
    set_env_line "$env_file" REPLICATION_PASSWORD "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    echo "generated REPLICATION_PASSWORD in $env_file"
    ;;
grant)
    container=$1 superuser=$2 db=$3 env_file=$4 user=$5 keep=$6
    shift 6
    password=$(env_value "$env_file" REPLICATION_PASSWORD)
    case $password in
    '' | *[!A-Za-z0-9_-]*)
        echo "REPLICATION_PASSWORD in $env_file is missing or holds characters other than letters, digits, _ and -" >&2
        exit 1 ;;
    esac
    {
        echo "do \$\$ begin"
        echo "  if not exists (select from pg_roles where rolname = '$user') then"
        echo "    create role \"$user\" with login replication;"
        echo "  end if;"
        echo "end \$\$;"
        echo "alter role \"$user\" with login replication password '$password';"
        for pair in "$@"; do
            slot=${pair%%=*}
            echo "select pg_create_physical_replication_slot('$slot')"
            echo "  where not exists (select from pg_replication_slots where slot_name = '$slot');"
        done
        echo "alter system set max_slot_wal_keep_size = '$keep';"
    } | sql "$container" "$superuser" "$db" > /dev/null
    for pair in "$@"; do
        line="host replication $user ${pair#*=}/32 scram-sha-256"
        docker exec "$container" sh -c 'grep -qxF "$1" "$PGDATA/pg_hba.conf" || printf "%s\n" "$1" >> "$PGDATA/pg_hba.conf"' \
            hba "$line"
    done
    echo "select pg_reload_conf();" | sql "$container" "$superuser" "$db" > /dev/null
    echo "replication role $user, slots and pg_hba.conf lines for $# replica(s) in place"
    ;;
volume)
    volume=$1
    mountpoint=$(docker volume inspect -f '{{.Mountpoint}}' "$volume" 2> /dev/null) || { echo empty; exit 0; }
    if [ -e "$mountpoint/standby.signal" ]; then echo standby
    elif [ -e "$mountpoint/PG_VERSION" ]; then echo database
    else echo empty
    fi
    ;;
copy)
    volume=$1 image=$2 primary=$3 user=$4 slot=$5 secret=$6
    env_file=$(mktemp)
    trap 'rm -f "$secret" "$env_file"' EXIT
    chmod 600 "$env_file"
    printf 'PGPASSWORD=%s\n' "$(cat "$secret")" > "$env_file"
    rm -f "$secret"
    data=/var/lib/postgresql/data
    in_volume() {  # in_volume PROGRAM ARGS...: PROGRAM in the image, the volume at $data
        program=$1
        shift
        docker run --rm --user postgres -v "$volume:$data" --entrypoint "$program" "$image" "$@"
    }
    docker volume create "$volume" > /dev/null
    # Checked here again, not only by the caller: whatever is in the volume is never touched.
    listing=$(in_volume ls -A "$data" 2>&1) || { echo "cannot look into the volume $volume with $image: $listing" >&2; exit 1; }
    if [ -n "$listing" ]; then
        echo "the volume $volume is not empty; nothing was copied into it" >&2
        exit 1
    fi
    if ! out=$(docker run --rm --network host --user postgres --env-file "$env_file" \
            -v "$volume:$data" --entrypoint pg_basebackup "$image" \
            -h "$primary" -p 5432 -U "$user" -D "$data" -R -X stream -S "$slot" -c fast 2>&1); then
        # It was empty before: all that is in it now is the half-done copy.
        in_volume find "$data" -mindepth 1 -delete > /dev/null 2>&1 || true
        echo "pg_basebackup from $primary failed: $(printf '%s\n' "$out" | grep -v '^ *$' | tail -n 1)" >&2
        exit 1
    fi
    echo "copied the primary's database from $primary into $volume (slot $slot)"
    ;;
streaming)
    container=$1 superuser=$2 db=$3 timeout=$4
    waited=0
    while [ "$waited" -lt "$timeout" ]; do
        status=$(echo "select coalesce((select status from pg_stat_wal_receiver), 'none');" \
            | sql "$container" "$superuser" "$db" 2> /dev/null) || status=down
        [ "$status" = streaming ] && { echo "streaming from the primary"; exit 0; }
        sleep 1
        waited=$((waited + 1))
    done
    echo "the standby is not streaming after ${timeout}s (WAL receiver: $status); last log line:" \
        "$(docker logs --tail 1 "$container" 2>&1)" >&2
    exit 1
    ;;
readonly-url)
    env_file=$1 mode=$2
    shift 2
    url=$(env_value "$env_file" DATABASE_URL)
    [ -n "$url" ] || { echo "no DATABASE_URL in $env_file to derive the read-only URL from" >&2; exit 1; }
    hosts=$(printf '%s\n' "$@" | paste -sd, -)
    # scheme://userinfo@HOSTS/db?query: the hosts replaced, the session attribute added.
    wanted=$(printf '%s' "$url" | sed -E "s#^([a-z]+://[^@/]*@)[^/?]*#\\1$hosts#")
    case $wanted in *\?*) wanted="$wanted&target_session_attrs=read-only" ;; *) wanted="$wanted?target_session_attrs=read-only" ;; esac
    current=$(env_value "$env_file" DATABASE_URL_READONLY)
    if [ "$mode" = check ]; then
        if [ "$current" = "$wanted" ]; then echo current; else echo differs; fi
        exit 0
    fi
    set_env_line "$env_file" DATABASE_URL_READONLY "$wanted"
    echo "DATABASE_URL_READONLY in $env_file names $hosts"
    ;;
database-url)
    env_file=$1 secret=$2
    trap 'rm -f "$secret"' EXIT
    url=$(cat "$secret" 2> /dev/null) || url=""
    [ -n "$url" ] || { echo "no URL was handed over in $secret" >&2; exit 1; }
    set_env_line "$env_file" DATABASE_URL "$url"
    echo "DATABASE_URL in $env_file names the primary"
    ;;
*)
    echo "db-replication.sh: unknown command $command" >&2
    exit 2
    ;;
esac
