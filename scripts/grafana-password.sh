#!/bin/sh
# Grafana's admin password, generated ON the server once: 48 random hex characters in FILE,
# mode 600, owned by OWNER (Grafana's uid in its container, which reads it). An existing
# file is never touched; nothing secret is printed.
#   grafana-password.sh FILE OWNER
set -eu
file=$1 owner=$2
if [ -e "$file" ]; then
    echo "kept existing $file"
    exit 0
fi
umask 077
mkdir -p "$(dirname "$file")"
tmp=$(mktemp "$file.XXXXXX")
trap 'rm -f "$tmp"' EXIT
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$tmp"
chown "$owner" "$tmp"
chmod 600 "$tmp"
mv "$tmp" "$file"
trap - EXIT
echo "created $file"
