#!/bin/bash
# Archives of the app's data directory (app.data_dir), on the server, as root so
# every file is read whatever its owner; each action one round trip.
#
# Format: tar with numeric owners, compressed with gzip (present on every
# server; the data directory is small next to the database). Like a database
# dump, an archive is written under a temporary name and renamed only once it
# is whole: tar ended well, the archive reads back completely (every gzip block
# and every tar header), its sha256 and its manifest (entries, bytes of regular
# files) are written. Any failure before that leaves no file behind.
# backup-db.sh lists, records and removes both kinds; backup-common.sh is sent
# in front of both.
#
#   backup-data.sh archive DIR SOURCE LABEL STATE_DIR MIN_FREE_MB TOOL OWNER
#       warnings, then the final path on the last line. Exit 4: no backup
#       directory; 5: not enough free space; 7: no data directory
#   backup-data.sh load DIR NAME TARGET KEEP
#       checksum, extract into the new directory TARGET, print what it holds
#       ("restored=<json>") and the manifest ("manifest=<json>"); TARGET is
#       removed on failure, and at the end unless KEEP=yes. Exit 6: no such backup
#   backup-data.sh swap LIVE REPLACEMENT ASIDE STOP START
#       stop the api, rename LIVE to ASIDE and REPLACEMENT to LIVE, start the
#       api again (also when anything failed); a missing LIVE is no error
#   backup-data.sh remove PATH...      set-aside directories (LIVE.before_* etc.)
set -uo pipefail
action=$1
shift

fail() { echo "$*" >&2; exit 1; }

# "entries bytes" of a gzip'd tar, reading all of it: a damaged block fails here.
# Regular files' sizes only (hard links and directories add no bytes).
measure() {
    tar -tvzf "$1" --quoting-style=escape 2>/dev/null | awk '
        { n++ } substr($1, 1, 1) == "-" { b += $3 }
        END { printf "%d %d\n", n, b }'
    return "${PIPESTATUS[0]}"
}

archive() {
    local dir=$1 source=$2 label=$3 state_dir=$4 min_free_mb=$5 tool=$6 owner=$7
    umask 077
    [ -d "$dir" ] && [ -w "$dir" ] || { echo "backup directory $dir is missing or not writable: run deploy.setup" >&2; exit 4; }
    [ -d "$source" ] || { echo "data directory $source is missing: set app.data_dir to the app's data directory" >&2; exit 7; }

    local last name
    last=$(ls -1t "$dir"/data_*.tar.gz 2>/dev/null | head -n 1)
    require_space "$dir" "$last" "$min_free_mb"
    name=$(claim_name "$dir" data "$label" tar.gz) || exit 1
    tmp="$dir/.$name.partial" final="$dir/$name" done=no
    err=$(mktemp)
    trap 'rm -f "$err"; [ "$done" = yes ] || rm -f "$tmp" "$final.sha256" "$final.json"' EXIT

    local release started status measured size sum
    release=$(grep -h '"result": "ok"' "$state_dir/releases.jsonl" 2>/dev/null | tail -n 1 | sed -n 's/.*"sha": "\([0-9a-f]*\)".*/\1/p')
    started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    tar --create --gzip --numeric-owner --file="$tmp" --directory="$(dirname "$source")" "$(basename "$source")" 2> "$err"
    status=$?
    if [ "$status" -eq 1 ]; then
        # GNU tar's exit 1: a file changed or vanished while it was read; the rest is whole.
        echo "warning: some files changed while they were archived: $(grep -v '^ *$' "$err" | tail -n 1)"
    elif [ "$status" -ne 0 ]; then
        why=$(no_space_why "$dir" "$(grep -v '^ *$' "$err" | tail -n 1)")
        fail "archiving $source failed: ${why:-tar exit $status}"
    fi
    measured=$(measure "$tmp") || fail "the archive of $source does not read back"
    size=$(stat -c %s "$tmp")
    sum=$(sha256sum "$tmp" | cut -d' ' -f1)
    printf '{"format": "tar.gz", "name": "%s", "directory": "%s", "label": "%s", "size": %s, "sha256": "%s", "release": "%s", "started": "%s", "finished": "%s", "tool": "%s", "entries": %s, "bytes": %s}\n' \
        "$name" "$source" "$label" "$size" "$sum" "$release" "$started" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$tool" \
        "${measured% *}" "${measured#* }" > "$final.json" || fail "cannot write the manifest in $dir"
    printf '%s  %s\n' "$sum" "$name" > "$final.sha256" || fail "cannot write the checksum in $dir"
    chown "$owner:" "$tmp" "$final.json" "$final.sha256" || fail "cannot hand the archive to $owner"
    mv "$tmp" "$final" || fail "cannot rename the archive in $dir"
    done=yes
    if [ "$last_size" -gt 0 ] && [ $(( size * 2 )) -lt "$last_size" ]; then
        echo "warning: this archive is $size bytes, under half of the previous one ($last_size bytes, $(basename "$last")): check $source"
    fi
    echo "$final"
}

load() {
    # Globals, not locals: the EXIT trap reads them after the function has returned.
    dir=$1 name=$2 target=$3 keep=$4
    local file="$dir/$name"
    [ -f "$file" ] || { echo "no backup $name in $dir" >&2; exit 6; }
    [ -f "$file.sha256" ] || fail "backup $name has no .sha256 beside it: it cannot be trusted"
    (cd "$dir" && sha256sum --quiet --strict -c "$name.sha256") >/dev/null 2>&1 \
        || fail "backup $name fails its sha256 check: the file is damaged"
    [ ! -e "$target" ] || fail "$target is in the way: remove it (a cut-off restore left it) and retry"
    err=$(mktemp) created=no ok=no
    trap 'rm -f "$err"; rm -rf "$target.extract"; if [ "$created" = yes ] && { [ "$ok" != yes ] || [ "$keep" != yes ]; }; then rm -rf "$target"; fi' EXIT
    rm -rf "$target.extract" && mkdir -m 700 "$target.extract" || fail "cannot create $target.extract"
    created=yes
    # The archive holds one top directory (the data directory, with its owner and
    # mode): extracted whole into a private parent, then moved into place.
    tar -xzf "$file" --numeric-owner --same-permissions -C "$target.extract" 2> "$err" \
        || fail "extracting $name failed: $(grep -v '^ *$' "$err" | tail -n 1)"
    local top
    top=$(ls -A "$target.extract")
    [ -n "$top" ] && [ "$(printf '%s\n' "$top" | wc -l)" -eq 1 ] && [ -d "$target.extract/$top" ] \
        || fail "$name does not hold one top directory: it is not one of our archives"
    mv -T "$target.extract/$top" "$target" || fail "cannot move the extracted copy to $target"
    local entries bytes
    entries=$(find "$target" | wc -l)
    bytes=$(find "$target" -type f -printf '%i %s\n' | sort -u | awk '{ b += $2 } END { printf "%d\n", b }')
    echo "restored={\"entries\": $entries, \"bytes\": $bytes}"
    echo "manifest=$(head -c 1000000 "$file.json" 2>/dev/null | head -n 1)"
    ok=yes
}

swap() {
    local live=$1 replacement=$2 aside=$3 stop=$4
    start=$5  # a global: the EXIT trap reads it
    trap 'sh -c "$start" > /dev/null 2>&1 || echo "warning: could not start the api again" >&2' EXIT
    [ -d "$replacement" ] || fail "$replacement is missing: nothing to swap in"
    sh -c "$stop" > /dev/null 2>&1 || fail "could not stop the api"
    if [ -e "$live" ]; then
        mv -T "$live" "$aside" || fail "could not move $live aside"
    fi
    if ! mv -T "$replacement" "$live"; then
        [ -e "$aside" ] && mv -T "$aside" "$live"
        fail "could not move $replacement into place; $live is as it was"
    fi
    echo "$live is now the restored directory; the one before is kept as $aside"
}

remove() {
    local path
    for path in "$@"; do
        rm -rf --one-file-system -- "$path" || exit 1
        echo "removed $path"
    done
}

case "$action" in
archive | load | swap | remove) "$action" "$@" ;;
*) echo "usage: backup-data.sh archive|load|swap|remove ..." >&2; exit 2 ;;
esac
