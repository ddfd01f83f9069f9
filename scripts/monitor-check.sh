#!/bin/bash
# monitor.check's facts in one round trip: every probe runs in parallel and
# reports between marker lines (the framing of fabfile/core/batch.py), so the
# whole check takes about as long as its slowest probe. Nothing here judges:
# fabfile/core/checks.py turns the frames into pass / warn / fail. Bash
# builtins stand in for small tools where they can: on a busy server every
# process started is time waited.
#
#   monitor-check.sh MARKER INCLUDE PORT_B URL_A URL_B DB_CONTAINER DB_USER DB_NAME
#                    PGBOUNCER_HOST PGBOUNCER_PORT APP_DIR CERT_FILE BACKUP_DIR CPU_SAMPLE_MS
#                    [replication=yes|no] [env=ENV_FILE] DISK_PATH...
#
# replication=yes adds the replication probe (the layout has replicas); without the word,
# or with replication=no, it does not run. env=ENV_FILE is the app's env file: where its
# DATABASE_URL points says where the database runs. A DISK_PATH is absolute, never those words.
#
# INCLUDE PORT_B URL_A URL_B: the live api slot, found by live_slot (scripts/live-slot.sh,
# sent before this script): /health is asked on the port of the slot nginx sends requests to.
# database_location (scripts/database-location.sh) is sent before it too.
#
# Runs as the login user (the deploy user is in the docker group); only the
# certificate, which certbot keeps root-only, is read through sudo -n, in
# parallel with the rest. Each frame's end line carries the probe's status:
#   now          the server's clock (epoch seconds): ages are measured on the server
#   health       "<http code> <seconds> <slot>" of the live slot's /health ("000" when
#                nothing answered; slot a or b)
#   database     PostgreSQL in DB_CONTAINER as pg_isready judges it: status 0 accepting,
#                1 rejecting, 2 no response / not running. On an app host whose
#                DATABASE_URL names another host, "elsewhere HOST:PORT" first, then the
#                same judgement of that host's PostgreSQL over the network
#   pgbouncer    the byte PgBouncer answers to an SSLRequest (N or S)
#   services     the Docker Engine's JSON list of APP_DIR's compose containers
#   disk         "<path> <mount> <used KiB> <available KiB>" per DISK_PATH, "<path> -" if missing
#   memory       MemTotal and MemAvailable from /proc/meminfo
#   certificate  openssl's "notAfter=" of CERT_FILE; status 3 when there is no such file
#   backups      BACKUP_DIR's db_*.dump in backup-db.sh list's format; status 4 without the directory
#   cpu          /proc/stat's "cpu" line before the probes and after them (at least
#                CPU_SAMPLE_MS later), /proc/loadavg, "cpus N" and "window <ms>"
#   replication  only with replication=yes: streaming replication as PostgreSQL in
#                DB_CONTAINER reports it, one psql (the one process this script starts in a
#                container). A primary: "primary <streaming replicas>", then per row of
#                pg_stat_replication "replica <client_addr> <state> <replay_lag s> <bytes behind>";
#                a standby: "standby <wal receiver status|none> <s since last replay> <bytes
#                not replayed> <sender host|->". Status 0 read, 2 not running or psql failed,
#                3 no such container (no database on this host: an app host of a layout)
set -u
export LC_ALL=C
marker=$1 db=$6 db_user=$7 db_name=$8 pgb_host=$9 pgb_port=${10} app_dir=${11} cert=${12} backup_dir=${13} cpu_ms=${14}
live_slot "$2" "$3" "$4" "$5"
shift 14
replication=no env_file=/dev/null
while :; do
    case ${1:-} in
    replication=*) replication=${1#replication=}; shift ;;
    env=*) env_file=${1#env=}; shift ;;
    *) break ;;
    esac
done
disk_paths=("$@")
work=$(mktemp -d) || exit 1
trap 'rm -rf "$work"' EXIT
cd / || exit 1

health() { curl -s -m 3 -o /dev/null -w "%{http_code} %{time_total} $live_name\n" "$live_url"; }
# pg_isready's exchange without `docker exec` (a process in the container costs more than
# every other probe): a startup packet to the container's address; the first byte back says
# it. R (asks for a password) or an error other than 57P03: accepting; 57P03 (starting up,
# shutting down): rejecting; nothing: no response. Closing at the password prompt is the
# disconnect PostgreSQL does not log, as with pg_isready.
database() {
    local where info state ip port=5432 length reply message
    where=$(database_location "$env_file")
    if [ "$where" != here ]; then
        # An app host of a layout: the database runs on roles.db; the same exchange, over the network.
        echo "$where"
        ip=${where#elsewhere } && port=${ip##*:} && ip=${ip%:*}
    else
        info=$(curl -sf -m 3 --unix-socket /var/run/docker.sock "http://docker/containers/$db/json") \
            || { echo "no container $db"; return 2; }
        [[ $info =~ \"State\":\{\"Status\":\"([a-z]+)\" ]] && state=${BASH_REMATCH[1]}
        [ "${state:-}" = running ] || { echo "$db is not running (${state:-unknown})"; return 2; }
        [[ $info =~ \"IPAddress\":\"([0-9.]+)\" ]] && ip=${BASH_REMATCH[1]}
        [ -n "${ip:-}" ] || { echo "$db has no address on a Docker network"; return 2; }
    fi
    # StartupMessage, protocol 3.0: length (< 256 for names settings allow), then user and database.
    length=$(printf '%03o' $((25 + ${#db_user} + ${#db_name})))
    reply=$(timeout 3 bash -c 'exec 3<> "/dev/tcp/$0/$4" &&
        printf "\0\0\0\\$1\0\003\0\0user\0%s\0database\0%s\0\0" "$2" "$3" >&3 && dd bs=512 count=1 status=none <&3' \
        "$ip" "$length" "$db_user" "$db_name" "$port" 2> /dev/null | tr -c '[:print:]' '\n')
    case $reply in
    R*) echo "accepting connections" ;;
    E*C57P03*) message=${reply#*$'\n'M}; echo "rejecting connections: ${message%%$'\n'*}"; return 1 ;;
    E*) echo "accepting connections" ;;
    *) echo "no response from $ip:$port"; return 2 ;;
    esac
}
pgbouncer() {
    # PostgreSQL's SSLRequest (length 8, code 80877103): PgBouncer answers one byte, no login needed.
    timeout 3 bash -c 'exec 3<> "/dev/tcp/$0/$1" && printf "\0\0\0\010\004\322\026\057" >&3 && head -c 1 <&3' \
        "$pgb_host" "$pgb_port"
}
services() {
    curl -sf -m 5 --unix-socket /var/run/docker.sock -G http://docker/containers/json --data-urlencode all=1 \
         --data-urlencode "filters={\"label\":[\"com.docker.compose.project.working_dir=$app_dir\"]}"
}
disk() {
    local path present=() rows=() fields i=1
    for path in "${disk_paths[@]}"; do [ -e "$path" ] && present+=("$path"); done
    # df -P prints a header, then one line per path in the order given.
    [ "${#present[@]}" -eq 0 ] || mapfile -t rows < <(timeout 5 df -Pk -- "${present[@]}")
    for path in "${disk_paths[@]}"; do
        if [ ! -e "$path" ]; then
            echo "$path -"
        elif [ "$i" -lt "${#rows[@]}" ]; then
            read -r -a fields <<< "${rows[i]}"
            echo "$path ${fields[5]} ${fields[2]} ${fields[3]}"
            i=$((i + 1))
        fi
    done
}
memory() {
    local key value _
    while read -r key value _; do
        case $key in MemTotal: | MemAvailable:) echo "$key $value kB" ;; esac
    done < /proc/meminfo
}
certificate() {
    local as_root=()
    [ "$EUID" -eq 0 ] || as_root=(sudo -n)
    "${as_root[@]}" sh -c '[ -e "$1" ] || exit 3; exec openssl x509 -enddate -noout -in "$1"' certificate "$cert"
}
backups() {
    local name size mtime sha manifest verified
    cd "$backup_dir" 2>/dev/null || return 4
    local names=(db_*.dump)
    [ -e "${names[0]}" ] || return 0
    stat -c '%n %s %Y' -- "${names[@]}" | while read -r name size mtime; do
        sha=no manifest=no verified=""
        [ -f "$name.sha256" ] && sha=yes
        [ -f "$name.json" ] && manifest=yes
        [ -f "$name.verified" ] && { read -r verified < "$name.verified" || true; }
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$size" "$mtime" "$sha" "$manifest" "${verified//$'\t'/ }"
    done
}
# Lags in whole seconds, 0 when nothing waits to be replayed (an idle primary writes nothing,
# so the last replayed transaction grows old while the standby is current). One statement;
# CASE keeps pg_current_wal_lsn(), which fails during recovery, off a standby's rows.
replication() {
    local answer
    if ! answer=$(timeout 5 docker exec -i "$db" psql -AtX -v ON_ERROR_STOP=1 -U "$db_user" -d "$db_name" 2>&1 <<'SQL'
SELECT line FROM (
    SELECT 0 AS n, CASE WHEN pg_is_in_recovery() THEN concat_ws(' ', 'standby',
            coalesce((SELECT status FROM pg_stat_wal_receiver), 'none'),
            CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
                 ELSE coalesce(greatest(round(extract(epoch FROM now() - pg_last_xact_replay_timestamp())), 0), 0) END,
            coalesce(greatest(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), 0), 0),
            coalesce((SELECT sender_host FROM pg_stat_wal_receiver), '-'))
        ELSE 'primary ' || (SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming') END AS line
    UNION ALL
    SELECT 1, concat_ws(' ', 'replica', coalesce(host(client_addr), 'local'), state,
            coalesce(round(extract(epoch FROM replay_lag)), 0),
            CASE WHEN pg_is_in_recovery() THEN '-'
                 ELSE coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::text, '-') END)
        FROM pg_stat_replication WHERE NOT pg_is_in_recovery()
) AS facts ORDER BY n, line;
SQL
    ); then
        case $answer in *"No such container"*) echo "no container $db"; return 3 ;; esac
        echo "${answer%%$'\n'*}"
        return 2
    fi
    printf '%s\n' "$answer"
}

probes=(health database pgbouncer services disk memory certificate backups)
[ "$replication" = yes ] && probes+=(replication)
read -r cpu_first < /proc/stat
started=$EPOCHREALTIME
for name in "${probes[@]}"; do
    ( "$name" > "$work/$name.out" 2> /dev/null < /dev/null; echo $? > "$work/$name.rc" ) &
done
wait
# The CPU sample spans the probes and at least CPU_SAMPLE_MS (the probes' own work is in it:
# checks.py's verdict needs the 1-minute load average to agree).
left=$(( cpu_ms - (${EPOCHREALTIME/./} - ${started/./}) / 1000 ))
if [ "$left" -gt 0 ]; then
    printf -v pause '%d.%03d' $((left / 1000)) $((left % 1000))
    sleep "$pause"
fi
read -r cpu_second < /proc/stat
window=$(( (${EPOCHREALTIME/./} - ${started/./}) / 1000 ))
read -r loadavg < /proc/loadavg
cpus=0
while read -r line; do [[ $line == cpu[0-9]* ]] && cpus=$((cpus + 1)); done < /proc/stat
printf '%s\n' "$cpu_first" "$cpu_second" "$loadavg" "cpus $cpus" "window $window" > "$work/cpu.out"
echo "$EPOCHSECONDS" > "$work/now.out"
echo 0 > "$work/cpu.rc"
echo 0 > "$work/now.rc"

for name in now "${probes[@]}" cpu; do
    printf '%s begin %s\n' "$marker" "$name"
    while IFS= read -r line || [ -n "$line" ]; do printf '%s\n' "$line"; done < "$work/$name.out"
    read -r status < "$work/$name.rc"
    printf '\n%s end %s %s\n' "$marker" "$name" "$status"
done
