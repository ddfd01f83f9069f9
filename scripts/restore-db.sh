#!/bin/bash
# Restore the app database from a backup made by backup-db.sh. The dump is
# checked (checksum, gzip -t) BEFORE the database is dropped, so a bad file
# changes nothing. The caller stops the app first.
#   restore-db.sh CONTAINER DB_USER DB_NAME FILE
set -euo pipefail
container=$1 user=$2 db=$3 file=$4
[ -f "$file" ] || { echo "backup $file does not exist" >&2; exit 3; }
if [ -f "$file.sha256" ]; then
    (cd "$(dirname "$file")" && sha256sum --quiet -c "$(basename "$file").sha256") || { echo "backup $file fails its checksum" >&2; exit 3; }
fi
gzip -t "$file" || { echo "backup $file is not a readable gzip" >&2; exit 3; }
docker exec "$container" psql -q -v ON_ERROR_STOP=1 -U "$user" -d postgres \
    -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" -c "CREATE DATABASE \"$db\" OWNER \"$user\""
gunzip -c "$file" | docker exec -i "$container" psql -q -v ON_ERROR_STOP=1 -U "$user" -d "$db" >/dev/null
echo "restored $db from $file"
