#!/bin/sh
# Point a freshly generated env file at staging's own database name: POSTGRES_DB and the
# database path of DATABASE_URL. Prints nothing secret (no line of the file).
#   staging-env-db.sh ENV_FILE DB_NAME
set -eu
env_file=$1 db=$2
# sed -i keeps the file's mode (600) and owner; the password part of the URL is untouched.
sed -i -e "s|^POSTGRES_DB=.*|POSTGRES_DB=$db|" \
       -e "s|^\(DATABASE_URL=[^?]*/\)[A-Za-z0-9_]*\(?.*\)\{0,1\}$|\1$db\2|" "$env_file"
grep -q "^POSTGRES_DB=$db\$" "$env_file" || { echo "no POSTGRES_DB line in $env_file" >&2; exit 1; }
echo "database name in $env_file: $db"
