#!/bin/sh
# Where the app's PostgreSQL runs, as its own env file says: the host of DATABASE_URL
# (only its host and port are ever printed, never the URL with its password).
#   database_location ENV_FILE
#       "here" when DATABASE_URL names a service of the compose file (postgres, pgbouncer)
#       or loopback: the single-VPS layout, the database container on this host;
#       "elsewhere HOST:PORT" when it names another host: an app host of a layout whose
#       database runs on roles.db (coachntt-ops db.primary writes that URL)
#   database_ready ENV_FILE CONTAINER USER DB
#       the location line, then exit 0 only when that database accepts connections:
#       pg_isready in the container here, a TCP connection to HOST:PORT elsewhere
database_location() {
    _at=$(sed -n 's#^DATABASE_URL=[a-z0-9+]*://[^@/]*@\([^/?]*\).*#\1#p' "$1" 2> /dev/null | tail -n 1)
    case ${_at%:*} in
    "" | postgres | pgbouncer | localhost | 127.0.0.1) echo here ;;
    *) case $_at in *:*) echo "elsewhere $_at" ;; *) echo "elsewhere $_at:5432" ;; esac ;;
    esac
}

database_ready() {
    _where=$(database_location "$1")
    echo "$_where"
    case $_where in
    here) docker exec "$2" pg_isready -q -t 3 -U "$3" -d "$4" ;;
    *)
        _at=${_where#elsewhere }
        timeout 3 bash -c 'exec 3<> "/dev/tcp/$0/$1"' "${_at%:*}" "${_at##*:}" 2> /dev/null ;;
    esac
}
