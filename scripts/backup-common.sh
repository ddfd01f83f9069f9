# Shell functions both backup scripts share (backup-db.sh, backup-data.sh):
# sent in front of either one, never run on its own.

# require_space DIR LAST MIN_FREE_MB: exit 5 unless DIR has the size of the last
# backup LAST plus MIN_FREE_MB MiB free; sets last_size for the shrink warning.
require_space() {
    local dir=$1 last=$2 min_free_mb=$3 free_kb need_kb
    last_size=$(stat -c %s "$last" 2>/dev/null || echo 0)
    free_kb=$(df -Pk "$dir" | awk 'NR == 2 {print $4}')
    need_kb=$(( last_size / 1024 + min_free_mb * 1024 ))
    if [ "$free_kb" -lt "$need_kb" ]; then
        echo "not enough free space in $dir: $(( free_kb / 1024 )) MiB free, a backup needs $(( need_kb / 1024 )) MiB" \
             "(the last one's size plus backup.min_free_mb); free space or prune old backups" >&2
        exit 5
    fi
}

# claim_name DIR PREFIX LABEL EXTENSION: a new name PREFIX_<UTC stamp>_LABEL[-n].EXTENSION
# on stdout, its DIR/.<name>.partial created with noclobber, so several backups a
# second never overwrite each other.
claim_name() {
    local dir=$1 prefix=$2 label=$3 extension=$4 stamp name n=2
    stamp=$(date -u +%Y%m%d_%H%M%S)
    name="${prefix}_${stamp}_$label.$extension"
    while ! (set -C; : > "$dir/.$name.partial") 2>/dev/null || [ -e "$dir/$name" ]; do
        name="${prefix}_${stamp}_$label-$n.$extension"
        n=$((n + 1))
        [ "$n" -lt 100 ] || { echo "cannot find a free backup name in $dir" >&2; return 1; }
    done
    printf '%s\n' "$name"
}

# no_space_why DIR WHY: WHY, led by "no space left in DIR" when under 1 MiB is free.
no_space_why() {
    local free_kb
    free_kb=$(df -Pk "$1" | awk 'NR == 2 {print $4}')
    if [ "$free_kb" -ge 1024 ]; then echo "$2"; else echo "no space left in $1${2:+ ($2)}"; fi
}
