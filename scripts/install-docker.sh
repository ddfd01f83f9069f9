#!/bin/sh
# Install Docker Engine and the compose v2 plugin from the distribution's own
# packages, keeping whatever already works. Runs on the server as root, after
# apt-install.sh refreshed the package lists.
#   Ubuntu 24.04: docker.io + docker-compose-v2
#   Debian 13:    docker.io + docker-cli + docker-compose (the v2 plugin)
set -eu
APT="apt-get -q -y -o DPkg::Lock::Timeout=300"
export DEBIAN_FRONTEND=noninteractive

available() { apt-cache show --no-all-versions "$1" >/dev/null 2>&1; }

want=""
if ! docker version >/dev/null 2>&1; then
    want="docker.io"
    available docker-cli && want="$want docker-cli"
fi
if ! docker compose version >/dev/null 2>&1; then
    if available docker-compose-v2; then
        want="$want docker-compose-v2"
    else
        want="$want docker-compose"
    fi
fi
if [ -n "$want" ]; then
    # shellcheck disable=SC2086 # word splitting of the package list is intended
    $APT install --no-install-recommends $want
fi
systemctl enable --now docker >/dev/null 2>&1 || systemctl enable --now docker.service
docker compose version --short
