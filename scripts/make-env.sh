#!/bin/sh
# Create the app's env file from its example, generating every secret the
# example marks "change-me". An existing env file is never touched: secrets
# are generated once. Nothing secret is printed; only the names generated.
#   make-env.sh EXAMPLE TARGET OWNER
set -eu
example=$1 target=$2 owner=$3
if [ -e "$target" ]; then
    echo "kept existing $target"
    exit 0
fi
umask 077
tmp=$(mktemp "$target.XXXXXX")
db_password=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
generated=""
while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
    POSTGRES_PASSWORD=change-me) line="POSTGRES_PASSWORD=$db_password"; generated="$generated POSTGRES_PASSWORD" ;;
    DATABASE_URL=*change-me*) line=$(printf '%s' "$line" | sed "s/change-me/$db_password/"); generated="$generated DATABASE_URL" ;;
    *=change-me) key=${line%%=*}; line="$key=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"; generated="$generated $key" ;;
    esac
    printf '%s\n' "$line" >> "$tmp"
done < "$example"
chmod 600 "$tmp"
chown "$owner" "$tmp"
mv "$tmp" "$target"
echo "created $target with generated:$generated"
