#!/bin/bash
# Off-site copies of the backups: an encrypted restic repository over SFTP.
# Runs on the server as the deploy user, each action one round trip.
#
# The repository password is read here, from the app's env file
# (RESTIC_PASSWORD=...), into a private temporary file that restic reads through
# RESTIC_PASSWORD_FILE: never an argument (ps and sudo's log show those), never
# printed. The storage host is reached with a key of its own
# (~/.ssh/coachntt_offsite) and its host key pinned in ~/.ssh/known_hosts.
# Only what restic 0.16 (Ubuntu 24.04) already has is used.
#
# One snapshot per push holds the whole backup directory (hidden temporaries
# excluded), tagged coachntt-ops, state:<fingerprint of the files> and the name
# of every backup in it. A push whose fingerprint is already off-site makes no
# snapshot at all; restic's dedup keeps a changed one to its new bytes.
#
#   offsite-restic.sh init  USER HOST PORT PATH ENV_FILE
#       install restic when missing, create the key, pin the storage host's key,
#       create the repository when it does not exist. Prints restic=, key=,
#       pubkey=, hostkey=, fingerprint=, repo= lines
#   offsite-restic.sh push  USER HOST PORT PATH ENV_FILE DIR KEEP_DAILY KEEP_WEEKLY KEEP_MONTHLY
#       prints snapshot=unchanged ID | snapshot=new ID BYTES_ADDED BACKUPS, forgot=N;
#       pushed=nothing for an empty DIR
#   offsite-restic.sh fetch USER HOST PORT PATH ENV_FILE DIR NAME
#       the newest off-site copy of NAME and its sidecars into DIR: restored under
#       a temporary name, sha256 checked, then renamed. Prints fetched=PATH ID
#
# Exit codes: 1 failed; 4 no DIR; 6 no off-site copy of NAME; 20 no password;
# 21 no restic; 22 no key; 23 storage host key not pinned; 24 storage host
# unreachable; 25 its host key changed; 26 it refuses the key; 27 no repository;
# 28 the password does not open it; 29 NAME is already in DIR.
set -uo pipefail
action=$1 user=$2 host=$3 port=$4 path=$5 env_file=$6
shift 6

fail() { echo "$*" >&2; exit 1; }
quit() { local code=$1; shift; echo "$*" >&2; exit "$code"; }

umask 077
cleanup=()
trap 'rm -rf "${cleanup[@]}"' EXIT
scratch=$(mktemp -d) || fail "cannot make a temporary directory"
cleanup+=("$scratch")

home=$(getent passwd "$(id -un)" | cut -d: -f6)
# restic splits sftp.command on spaces: the paths in it must be plain.
[[ "$home" =~ ^/[A-Za-z0-9._/-]+$ ]] || fail "the home directory of $(id -un) ('$home') is not a plain path"
key="$home/.ssh/coachntt_offsite"
known="$home/.ssh/known_hosts"
repo="sftp:$user@$host:$path"
if [ "$port" = 22 ]; then hostspec=$host; else hostspec="[$host]:$port"; fi
ssh_opts=(-i "$key" -o BatchMode=yes -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$known"
          -o ConnectTimeout=15 -o ServerAliveInterval=15 -o ServerAliveCountMax=4)

password() {  # RESTIC_PASSWORD from the env file into a private file for restic; exit 20 without one
    local line value
    [ -r "$env_file" ] || quit 20 "cannot read $env_file"
    line=$(grep -E '^[[:space:]]*(export[[:space:]]+)?RESTIC_PASSWORD[[:space:]]*=' "$env_file" | tail -n 1)
    value=${line#*=}
    value=${value#"${value%%[![:space:]]*}"}
    if [[ $value == \"*\"* ]]; then  # quoted: up to the closing quote, whatever follows
        value=${value:1} && value=${value%%\"*}
    elif [[ $value == \'*\'* ]]; then
        value=${value:1} && value=${value%%\'*}
    else  # unquoted: an inline comment starts at " #", as in docker compose's env files
        value=${value%%[[:space:]]#*}
        value=${value%"${value##*[![:space:]]}"}
    fi
    [ -n "$value" ] || quit 20 "no RESTIC_PASSWORD in $env_file"
    printf '%s' "$value" > "$scratch/password" || fail "cannot write a temporary file"
    unset value line RESTIC_PASSWORD RESTIC_PASSWORD_COMMAND
    export RESTIC_PASSWORD_FILE="$scratch/password"
}

need_restic() { command -v restic > /dev/null || quit 21 "restic is not installed"; }
need_key() { [ -f "$key" ] || quit 22 "no key $key"; }
need_pinned() { ssh-keygen -F "$hostspec" -f "$known" > /dev/null 2>&1 || quit 23 "$hostspec is not in $known"; }

r() {  # restic on the repository, through our ssh options
    restic -r "$repo" -o "sftp.command=ssh ${ssh_opts[*]} -p $port $user@$host -s sftp" --retry-lock 2m "$@"
}

restic_failed() {  # restic_failed WHAT STATUS: say why, from restic's stderr in $scratch/err
    local what=$1 status=$2 why
    why=$(grep -v '^ *$' "$scratch/err" | tail -n 1)
    if [ "$status" = 12 ] || grep -q 'wrong password' "$scratch/err"; then
        quit 28 "the password does not open $repo"
    fi
    [ "$status" = 10 ] && quit 27 "no repository at $repo"
    if [ "$status" = 11 ] || grep -q 'already locked' "$scratch/err"; then
        fail "the off-site repository is locked by another run (retry later; \`restic unlock\` removes a lock whose run is gone)"
    fi
    fail "$what failed: ${why:-restic exit $status}"
}

probe() {  # reach the storage host over SFTP as restic will; sets repo_exists=yes|no
    local out status why
    out=$(printf 'ls %s/config\n' "$path" | sftp "${ssh_opts[@]}" -P "$port" -b - "$user@$host" 2>&1)
    status=$?
    if [ "$status" -eq 0 ]; then repo_exists=yes; return; fi
    why=$(printf '%s\n' "$out" | grep -v -e '^sftp>' -e '^Connection closed$' -e '^ *$' | head -n 1)
    case $out in
    *"IDENTIFICATION HAS CHANGED"*) quit 25 "the storage host's key is not the one pinned in $known" ;;
    *"host key is known"* | *"Host key verification failed"*) quit 23 "$hostspec is not in $known" ;;
    *"Permission denied"*) quit 26 "${why:-permission denied}" ;;
    esac
    if [ "$status" -eq 1 ] && [[ $out == *"not found"* ]]; then repo_exists=no; return; fi
    [ "$status" -eq 255 ] && quit 24 "${why:-no answer}"
    fail "the storage host answered: ${why:-sftp exit $status}"
}

init() {
    password
    local installed=""
    if ! command -v restic > /dev/null; then
        local apt=(sudo -n env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=120)
        { "${apt[@]}" install restic || { "${apt[@]}" update && "${apt[@]}" install restic; }; } > "$scratch/apt" 2>&1 \
            || fail "could not install restic: $(grep -v '^ *$' "$scratch/apt" | tail -n 1)"
        installed=" (installed now)"
    fi
    echo "restic=$(restic version | cut -d' ' -f2)$installed"

    mkdir -p "$home/.ssh" && chmod 700 "$home/.ssh" || fail "cannot make $home/.ssh"
    if [ -f "$key" ]; then
        echo "key=exists $key"
    else
        ssh-keygen -q -t ed25519 -N '' -C "coachntt-offsite@$(hostname)" -f "$key" < /dev/null > /dev/null || fail "cannot create $key"
        echo "key=created $key"
    fi
    [ -f "$key.pub" ] || ssh-keygen -y -f "$key" > "$key.pub" || fail "cannot read $key"
    echo "pubkey=$(head -n 1 "$key.pub")"

    # Pinned once, here: every later connection checks the storage host against it.
    ssh-keyscan -T 10 -p "$port" "$host" 2> /dev/null | grep -v '^#' > "$scratch/scanned"
    [ -s "$scratch/scanned" ] || quit 24 "no SSH answer from $host port $port"
    if ssh-keygen -F "$hostspec" -f "$known" 2> /dev/null | grep -v '^#' > "$scratch/stored"; then
        awk '{print $2, $3}' "$scratch/scanned" | sort > "$scratch/scanned.keys"
        awk '{print $2, $3}' "$scratch/stored" | sort > "$scratch/stored.keys"
        [ -n "$(comm -12 "$scratch/scanned.keys" "$scratch/stored.keys")" ] \
            || quit 25 "the storage host's key is not the one pinned in $known"
        echo "hostkey=known $known"
    else
        cat "$scratch/scanned" >> "$known" && chmod 600 "$known" || fail "cannot write $known"
        echo "hostkey=pinned $known"
    fi
    ssh-keygen -l -f "$scratch/scanned" | sed 's/^/fingerprint=/'

    probe
    if [ "$repo_exists" = yes ]; then
        r cat config > /dev/null 2> "$scratch/err" || restic_failed "reading the repository" $?
        echo "repo=exists"
    else
        r init > /dev/null 2> "$scratch/err" || restic_failed "restic init" $?
        echo "repo=created"
    fi
}

backups_in() {  # the backups in DIR, dumps and data archives (not their sidecars, not hidden temporaries)
    find "$1" -maxdepth 1 -type f \( -name 'db_*' -o -name 'data_*' \) ! -name '*.sha256' ! -name '*.json' ! -name '*.verified' \
        -printf '%f\n' | LC_ALL=C sort
}

push() {
    local dir=$1 daily=$2 weekly=$3 monthly=$4 state out id names tags=() name status summary added forgot
    password
    need_restic
    need_key
    need_pinned
    [ -d "$dir" ] || quit 4 "backup directory $dir is missing"
    names=$(backups_in "$dir")
    [ -n "$names" ] || { echo "pushed=nothing"; return; }
    probe
    [ "$repo_exists" = yes ] || quit 27 "no repository at $repo"

    # Names, sizes and times of every file restic would read: the same state is already off-site.
    state=$(cd "$dir" && find . -maxdepth 1 -type f ! -name '.*' -printf '%f %s %T@\n' | LC_ALL=C sort | sha256sum | cut -c1-16)
    out=$(r snapshots --json --tag "coachntt-ops,state:$state" 2> "$scratch/err") || restic_failed "listing the snapshots" $?
    id=$(printf '%s' "$out" | grep -o '"short_id":"[0-9a-f]*"' | tail -n 1 | cut -d'"' -f4)
    if [ -n "$id" ]; then
        echo "snapshot=unchanged $id"
        return
    fi

    tags=(--tag coachntt-ops --tag "state:$state")
    while IFS= read -r name; do tags+=(--tag "$name"); done <<< "$names"
    r backup --json "${tags[@]}" --exclude "$dir/.*" "$dir" > "$scratch/out" 2> "$scratch/err"
    status=$?
    # 3: some file could not be read (a backup pruned meanwhile): not a whole copy.
    [ "$status" -eq 0 ] || restic_failed "restic backup of $dir" "$status"
    summary=$(grep '"message_type":"summary"' "$scratch/out" | tail -n 1)
    id=$(printf '%s' "$summary" | grep -o '"snapshot_id":"[0-9a-f]*"' | cut -d'"' -f4)
    added=$(printf '%s' "$summary" | grep -o '"data_added":[0-9]*' | cut -d: -f2)
    echo "snapshot=new ${id:0:8} ${added:-0} $(printf '%s\n' "$names" | wc -l)"

    # Retention: push snapshots of this host and directory, by push time. The newest
    # is always kept: it holds every backup now in DIR.
    local policy=(--keep-last 1)
    [ "$daily" -gt 0 ] && policy+=(--keep-daily "$daily")
    [ "$weekly" -gt 0 ] && policy+=(--keep-weekly "$weekly")
    [ "$monthly" -gt 0 ] && policy+=(--keep-monthly "$monthly")
    r forget --prune --tag coachntt-ops --group-by host,paths "${policy[@]}" > "$scratch/out" 2> "$scratch/err" \
        || restic_failed "snapshot ${id:0:8} is off-site, but restic forget" $?
    forgot=$(grep -o '^remove [0-9]* snapshots' "$scratch/out" | awk '{n += $2} END {print n + 0}')
    echo "forgot=$forgot"
}

fetch() {
    local dir=$1 name=$2 out id tmp found from sidecar
    password
    need_restic
    need_key
    need_pinned
    [ -d "$dir" ] || quit 4 "backup directory $dir is missing"
    [ -e "$dir/$name" ] && quit 29 "$name is already in $dir"
    probe
    [ "$repo_exists" = yes ] || quit 27 "no repository at $repo"
    out=$(r snapshots --json --tag "coachntt-ops,$name" 2> "$scratch/err") || restic_failed "listing the snapshots" $?
    id=$(printf '%s' "$out" | grep -o '"short_id":"[0-9a-f]*"' | tail -n 1 | cut -d'"' -f4)  # oldest first
    [ -n "$id" ] || quit 6 "no off-site copy of $name"

    # Restored beside the backups (same filesystem: the rename is atomic), checked, then renamed.
    tmp=$(mktemp -d "$dir/.fetch.XXXXXX") || fail "cannot write in $dir"
    cleanup+=("$tmp")
    r restore "$id" --target "$tmp" --include "$name" --include "$name.sha256" --include "$name.json" \
        --include "$name.verified" > /dev/null 2> "$scratch/err" || restic_failed "restoring $name from snapshot $id" $?
    found=$(find "$tmp" -type f -name "$name" | head -n 1)
    [ -n "$found" ] || fail "snapshot $id holds no $name"
    from=$(dirname "$found")
    [ -f "$from/$name.sha256" ] || fail "the off-site copy of $name has no .sha256: it cannot be checked; nothing kept"
    (cd "$from" && sha256sum --quiet --strict -c "$name.sha256") > /dev/null 2>&1 \
        || fail "the off-site copy of $name (snapshot $id) fails its sha256 check: nothing kept"
    [ -e "$dir/$name" ] && quit 29 "$name is already in $dir"
    # The backup itself last: until it is there, backup.list shows nothing of it.
    for sidecar in .sha256 .json .verified; do
        if [ -f "$from/$name$sidecar" ]; then mv -f "$from/$name$sidecar" "$dir/$name$sidecar" || fail "cannot move into $dir"; fi
    done
    mv "$from/$name" "$dir/$name" || fail "cannot move $name into $dir"
    echo "fetched=$dir/$name $id"
}

case "$action" in
init) init ;;
push | fetch) "$action" "$@" ;;
*) echo "usage: offsite-restic.sh init|push|fetch USER HOST PORT PATH ENV_FILE ..." >&2; exit 2 ;;
esac
