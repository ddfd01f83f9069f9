#!/bin/sh
# image-updates.sh IMAGE...: for each image, whether its registry has something newer
# under the same tag than what this host holds. One line per image:
#   IMAGE <TAB> current|update|local|missing|unknown <TAB> detail
# current/update compare the tag's manifest digest in the registry (a HEAD request,
# anonymous token when the registry asks for one, as `docker pull` does) with the
# image's RepoDigests here; local: built or loaded here, no registry digest to compare;
# unknown: the registry could not be asked (the detail says why). Never pulls.
set -u
ACCEPT="application/vnd.oci.image.index.v1+json,application/vnd.docker.distribution.manifest.list.v2+json"
ACCEPT="$ACCEPT,application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json"

# IMAGE -> "registry repository tag" the way Docker reads a reference.
split_reference() {
    ref=${1%%@*} first=${1%%/*}
    case "$1" in
    */*) case "$first" in
         *.*|*:*|localhost) registry=$first rest=${ref#*/} ;;
         *) registry=docker.io rest=$ref ;;
         esac ;;
    *) registry=docker.io rest=library/$ref ;;
    esac
    case "${rest##*/}" in
    *:*) tag=${rest##*:} repository=${rest%:*} ;;
    *) tag=latest repository=$rest ;;
    esac
    [ "$registry" = docker.io ] && registry=registry-1.docker.io
    echo "$registry $repository $tag"
}

# The registry's digest for repository:tag (plain http for a registry on loopback,
# as Docker allows without configuration).
remote_digest() {
    case "$1" in
    localhost*|127.*) scheme=http ;;
    *) scheme=https ;;
    esac
    url="$scheme://$1/v2/$2/manifests/$3"
    headers=$(curl -sS -I -m 10 -H "Accept: $ACCEPT" "$url" 2>&1) || { echo "ERR $(echo "$headers" | tail -n 1)"; return; }
    challenge=$(printf '%s\n' "$headers" | sed -n 's/^[Ww][Ww][Ww]-[Aa]uthenticate: Bearer \(.*\)\r*$/\1/p' | tr -d '\r')
    if [ -n "$challenge" ]; then
        realm=$(echo "$challenge" | sed -n 's/.*realm="\([^"]*\)".*/\1/p')
        service=$(echo "$challenge" | sed -n 's/.*service="\([^"]*\)".*/\1/p')
        token=$(curl -sS -m 10 -G "$realm" --data-urlencode "service=$service" \
                    --data-urlencode "scope=repository:$2:pull" 2>/dev/null | sed -n 's/.*"token" *: *"\([^"]*\)".*/\1/p')
        [ -n "$token" ] || { echo "ERR the registry wants a login"; return; }
        headers=$(curl -sS -I -m 10 -H "Accept: $ACCEPT" -H "Authorization: Bearer $token" "$url" 2>&1) ||
            { echo "ERR $(echo "$headers" | tail -n 1)"; return; }
    fi
    code=$(printf '%s\n' "$headers" | sed -n '1s/^HTTP[^ ]* \([0-9]*\).*/\1/p')
    digest=$(printf '%s\n' "$headers" | sed -n 's/^[Dd]ocker-[Cc]ontent-[Dd]igest: *\([^[:space:]]*\).*/\1/p')
    if [ "$code" = 200 ] && [ -n "$digest" ]; then echo "$digest"; else echo "ERR the registry answered HTTP $code"; fi
}

for image in "$@"; do
    if ! local_digests=$(docker image inspect -f '{{join .RepoDigests " "}}' "$image" 2>/dev/null); then
        printf '%s\tmissing\tnot on this host\n' "$image"
        continue
    fi
    if [ -z "$local_digests" ]; then
        printf '%s\tlocal\tbuilt or loaded here: no registry digest to compare\n' "$image"
        continue
    fi
    words=$(split_reference "$image")
    registry=${words%% *} rest=${words#* }
    repository=${rest%% *} tag=${rest#* }
    remote=$(remote_digest "$registry" "$repository" "$tag")
    case "$remote" in
    ERR*) printf '%s\tunknown\tcannot ask %s: %s\n' "$image" "$registry" "${remote#ERR }" ;;
    *) case " $local_digests " in
       *"@$remote "*) printf '%s\tcurrent\t%s\n' "$image" "$remote" ;;
       *) printf '%s\tupdate\t%s has %s\n' "$image" "$registry" "$remote" ;;
       esac ;;
    esac
done
