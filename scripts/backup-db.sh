#!/bin/bash
# Backups of the app database, on the server, each action one round trip.
#
# Format: pg_dump's custom format (-Fc), compressed by pg_dump itself. Unlike
# plain SQL + gzip, pg_restore reads its table of contents without restoring,
# reads the whole archive to /dev/null to prove every block decompresses, and
# restores straight into a database without a shell pipeline into psql.
# Compression is zstd level 1 when pg_dump is 16 or newer, else pg_dump's
# default zlib. Measured on 2 cores with a 1.3 GiB database
# (benchmarks/bench_backup.py, benchmarks/README.md): zlib dumped about as
# slowly as `pg_dump | gzip`; zstd:1 in less than half the time and CPU, into
# a slightly smaller file that reads back 3x faster and restores with less
# CPU. lz4 is as fast but its files are 1.7x larger; an external compressor
# (pg_dump -Z0 | zstd) costs twice the CPU, because the uncompressed stream
# must cross `docker exec` first. zstd archives need pg_restore 16 or newer:
# the one in the same container. Older zlib *.dump files and plain-SQL dumps
# (*.sql.gz) still restore: pg_restore reads each archive's compression from
# its header.
#
# A dump is written under a temporary name and renamed only once it is whole:
# pg_dump ended well, the archive reads back completely, its sha256 and its
# manifest are written. Any failure before that (pg_dump dying, the container
# stopping, a full disk) leaves no file behind and one line on stderr.
# Table row counts in the manifest are read in the very snapshot pg_dump dumps
# (pg_export_snapshot), so a restore can be checked against them exactly.
#
#   backup-db.sh dump CONTAINER USER DB DIR LABEL STATE_DIR MIN_FREE_MB TOOL
#       warnings, then the final path on the last line. Exit 3: no running
#       database container; 4: no backup directory; 5: not enough free space
#   backup-db.sh list DIR
#       one line per backup (database dumps and data archives alike):
#       name size mtime has_sha256 has_manifest last_verification
#   backup-db.sh load CONTAINER USER DIR NAME NEWDB KEEP
#       checksum, CREATE DATABASE NEWDB, restore into it, print its tables
#       ("restored=<json>") and the manifest's ("manifest=<json>"); NEWDB is
#       dropped on failure, and at the end unless KEEP=yes. Exit 6: no such backup
#   backup-db.sh swap CONTAINER USER LIVE REPLACEMENT ASIDE STOP START
#       stop the writers, rename LIVE to ASIDE and REPLACEMENT to LIVE in one
#       transaction, start the writers again (also when anything failed)
#   backup-db.sh drop CONTAINER USER DB...
#   backup-db.sh record DIR NAME RESULT WHY     the outcome of a verification (either kind)
#   backup-db.sh remove DIR NAME...             a backup and its sidecar files (either kind)
set -uo pipefail
action=$1
shift

fail() { echo "$*" >&2; exit 1; }

# Every table with its exact row count, and the server's version, as one JSON object.
COUNTS_SQL="SELECT json_build_object('postgres', current_setting('server_version'), 'tables', coalesce((
  SELECT json_agg(json_build_object('table', n.nspname || '.' || c.relname, 'rows',
           (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', n.nspname, c.relname),
                                                false, true, '')))[1]::text::bigint) ORDER BY n.nspname, c.relname)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
    AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'), '[]'::json));"

psql_in() {  # psql_in CONTAINER USER DB ARGS...: quiet, unaligned, stop at the first error
    local container=$1 user=$2 db=$3
    shift 3
    docker exec -i "$container" psql -X -q -At -v ON_ERROR_STOP=1 -U "$user" -d "$db" "$@"
}

stopped() {  # stopped CONTAINER WHY: WHY, led by "the container stopped" when it did
    local i
    # A client inside the container can die a moment before Docker reports it stopped.
    for i in 1 2 3 4 5 6; do
        [ "$(docker inspect -f '{{.State.Running}}' "$1" 2>/dev/null)" = "true" ] || { echo "the container $1 stopped ($2)"; return; }
        sleep 0.5
    done
    echo "$2"
}

require_container() {
    if [ "$(docker inspect -f '{{.State.Running}}' "$1" 2>/dev/null)" != "true" ]; then
        echo "no running database container $1" >&2
        exit 3
    fi
}

drop_databases() {  # drop_databases CONTAINER USER DB...
    local container=$1 user=$2 db
    shift 2
    for db in "$@"; do
        psql_in "$container" "$user" postgres -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null || return 1
    done
}

dump() {
    local container=$1 user=$2 db=$3 dir=$4 label=$5 state_dir=$6 min_free_mb=$7 tool=$8
    require_container "$container"
    umask 077
    [ -d "$dir" ] && [ -w "$dir" ] || { echo "backup directory $dir is missing or not writable: run deploy.setup" >&2; exit 4; }

    local last name
    last=$(ls -1t "$dir"/db_*.dump "$dir"/db_*.sql.gz 2>/dev/null | head -n 1)
    require_space "$dir" "$last" "$min_free_mb"
    name=$(claim_name "$dir" db "$label" dump) || exit 1
    tmp="$dir/.$name.partial" final="$dir/$name" done=no
    err=$(mktemp)
    trap 'rm -f "$err"; [ "$done" = yes ] || rm -f "$tmp" "$tmp.json" "$final.sha256" "$final.json"' EXIT

    local release started snapshot facts
    release=$(grep -h '"result": "ok"' "$state_dir/releases.jsonl" 2>/dev/null | tail -n 1 | sed -n 's/.*"sha": "\([0-9a-f]*\)".*/\1/p')
    started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    # The snapshot stays open in this session until pg_dump has read it all.
    coproc SNAP { psql_in "$container" "$user" "$db" 2>&1; }
    printf '%s\n' "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;" "SELECT pg_export_snapshot();" "$COUNTS_SQL" >&"${SNAP[1]}"
    IFS= read -r -t 600 snapshot <&"${SNAP[0]}" || snapshot=""
    IFS= read -r -t 3600 facts <&"${SNAP[0]}" || facts=""
    [[ "$snapshot" =~ ^[0-9A-Fa-f-]+$ ]] || fail "cannot read a snapshot of $db: $(stopped "$container" "${snapshot:-no answer}")"
    [[ "$facts" == "{"* ]] || fail "cannot count the rows of $db: $(stopped "$container" "${facts:-no answer}")"

    # zstd:1 from pg_dump 16 on (see the top); before that pg_dump knows only zlib levels
    local pg_dump_version compression=gzip compress=()
    pg_dump_version=$(docker exec "$container" pg_dump --version | tr -d '"\\')
    if [ "$(printf '%s' "$pg_dump_version" | sed -n 's/^pg_dump (PostgreSQL) \([0-9]*\).*/\1/p')" -ge 16 ] 2>/dev/null; then
        compression=zstd:1 compress=(--compress=zstd:1)
    fi
    if ! docker exec "$container" pg_dump -Fc "${compress[@]}" --snapshot="$snapshot" -U "$user" -d "$db" > "$tmp" 2> "$err"; then
        why=$(no_space_why "$dir" "$(grep -v '^ *$' "$err" | tail -n 1)")
        fail "pg_dump of $db failed: $(stopped "$container" "${why:-no message}")"
    fi
    printf 'COMMIT;\n' >&"${SNAP[1]}" 2>/dev/null
    # Read back the whole archive: every compressed block must decompress.
    docker exec -i "$container" pg_restore -f /dev/null < "$tmp" 2> "$err" \
        || fail "the dump of $db does not read back: $(grep -v '^ *$' "$err" | tail -n 1)"

    local size sum
    size=$(stat -c %s "$tmp")
    sum=$(sha256sum "$tmp" | cut -d' ' -f1)
    printf '{"format": "pg_dump custom", "compression": "%s", "name": "%s", "database": "%s", "label": "%s", "size": %s, "sha256": "%s", "release": "%s", "started": "%s", "finished": "%s", "tool": "%s", "pg_dump": "%s", %s\n' \
        "$compression" "$name" "$db" "$label" "$size" "$sum" "$release" "$started" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$tool" \
        "$pg_dump_version" "${facts#\{}" > "$tmp.json" || fail "cannot write the manifest in $dir"
    printf '%s  %s\n' "$sum" "$name" > "$final.sha256" || fail "cannot write the checksum in $dir"
    mv "$tmp.json" "$final.json" && mv "$tmp" "$final" || fail "cannot rename the dump in $dir"
    done=yes
    if [ "$last_size" -gt 0 ] && [ $(( size * 2 )) -lt "$last_size" ]; then
        echo "warning: this dump is $size bytes, under half of the previous one ($last_size bytes, $(basename "$last")): check the database"
    fi
    echo "$final"
}

list() {
    local dir=$1 f
    [ -d "$dir" ] || { echo "backup directory $dir is missing: run deploy.setup" >&2; exit 4; }
    cd "$dir" || exit 4
    for f in db_* data_*; do
        case $f in *.sha256 | *.json | *.verified) continue ;; esac
        [ -f "$f" ] || continue
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$f" "$(stat -c %s "$f")" "$(stat -c %Y "$f")" \
            "$([ -f "$f.sha256" ] && echo yes || echo no)" "$([ -f "$f.json" ] && echo yes || echo no)" \
            "$(head -n 1 "$f.verified" 2>/dev/null | tr '\t' ' ')"
    done
}

load() {
    # Globals, not locals: the EXIT trap reads them after the function has returned.
    container=$1 user=$2 dir=$3 name=$4 newdb=$5 keep=$6
    local file="$dir/$name"
    [ -f "$file" ] || { echo "no backup $name in $dir" >&2; exit 6; }
    if [ -f "$file.sha256" ]; then
        (cd "$dir" && sha256sum --quiet --strict -c "$name.sha256") >/dev/null 2>&1 \
            || fail "backup $name fails its sha256 check: the file is damaged"
    elif [ "${name%.dump}" != "$name" ]; then
        fail "backup $name has no .sha256 beside it: it cannot be trusted"
    fi
    require_container "$container"
    err=$(mktemp) created=no ok=no
    trap 'rm -f "$err"; if [ "$created" = yes ] && { [ "$ok" != yes ] || [ "$keep" != yes ]; }; then drop_databases "$container" "$user" "$newdb"; fi' EXIT
    psql_in "$container" "$user" postgres -c "CREATE DATABASE \"$newdb\" OWNER \"$user\"" > /dev/null 2> "$err" \
        || fail "cannot create the database $newdb: $(tail -n 1 "$err")"
    created=yes
    case $name in
    *.dump) docker exec -i "$container" pg_restore --exit-on-error -U "$user" -d "$newdb" < "$file" > /dev/null 2> "$err" ;;
    *.sql.gz) gunzip -c "$file" 2> "$err" | psql_in "$container" "$user" "$newdb" > /dev/null 2>> "$err" ;;
    *) false ;;
    esac || fail "restoring $name into $newdb failed: $(grep -v '^ *$' "$err" | tail -n 1)"
    echo "restored=$(psql_in "$container" "$user" "$newdb" -c "$COUNTS_SQL" 2> "$err")" \
        || fail "cannot count the rows in $newdb: $(tail -n 1 "$err")"
    echo "manifest=$(head -c 1000000 "$file.json" 2>/dev/null | head -n 1)"
    ok=yes
}

swap() {
    local container=$1 user=$2 live=$3 replacement=$4 aside=$5 stop=$6 attempt
    start=$7  # a global: the EXIT trap reads it
    require_container "$container"
    trap 'sh -c "$start" > /dev/null 2>&1 || echo "warning: could not start api and pgbouncer again" >&2' EXIT
    sh -c "$stop" > /dev/null 2>&1 || fail "could not stop api and pgbouncer"
    # Renamed in one transaction: either both names moved or neither.
    for attempt in 1 2 3 4 5 6 7 8 9 10; do
        psql_in "$container" "$user" postgres -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
            WHERE datname IN ('$live', '$replacement') AND pid <> pg_backend_pid()" > /dev/null 2>&1
        if why=$(psql_in "$container" "$user" postgres \
            -c "ALTER DATABASE \"$live\" RENAME TO \"$aside\"; ALTER DATABASE \"$replacement\" RENAME TO \"$live\"" 2>&1); then
            echo "$live is now the restored database; the one before is kept as $aside"
            return 0
        fi
        case $why in *"being accessed by other users"*) sleep 1 ;; *) break ;; esac
    done
    fail "could not swap $live for $replacement: $(printf '%s' "$why" | grep -v '^ *$' | tail -n 1)"
}

record() {
    local dir=$1 name=$2 result=$3 why=$4
    [ -f "$dir/$name" ] || { echo "no backup $name in $dir" >&2; exit 6; }
    printf '%s %s %s\n' "$result" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$why" > "$dir/.$name.verified.new" &&
        mv "$dir/.$name.verified.new" "$dir/$name.verified"
}

remove() {
    local dir=$1 name
    shift
    for name in "$@"; do
        rm -f "$dir/$name" "$dir/$name.sha256" "$dir/$name.json" "$dir/$name.verified" || exit 1
        echo "removed $name"
    done
}

case "$action" in
dump | list | load | swap | record | remove) "$action" "$@" ;;
drop) drop_databases "$@" ;;
*) echo "usage: backup-db.sh dump|list|load|swap|drop|record|remove ..." >&2; exit 2 ;;
esac
