#!/bin/bash
# Dump the app database to DIR as a gzip, safely: written under a temporary
# name, checked readable (gzip -t), then renamed; a .sha256 beside it.
# Prints the final path. Exit 3 when no database container is running.
#   backup-db.sh CONTAINER DB_USER DB_NAME DIR LABEL
set -euo pipefail
container=$1 user=$2 db=$3 dir=$4 label=$5
if [ "$(docker inspect -f '{{.State.Running}}' "$container" 2>/dev/null)" != "true" ]; then
    echo "no running database container $container" >&2
    exit 3
fi
mkdir -p "$dir"
chmod 700 "$dir"
name="db_$(date -u +%Y%m%d_%H%M%S)_$label.sql.gz"
tmp="$dir/.$name.partial"
trap 'rm -f "$tmp"' EXIT
docker exec "$container" pg_dump -U "$user" "$db" | gzip > "$tmp"
gzip -t "$tmp"
mv "$tmp" "$dir/$name"
(cd "$dir" && sha256sum "$name" > "$name.sha256")
echo "$dir/$name"
