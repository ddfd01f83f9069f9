#!/usr/bin/env bash
# The deploy step of .github/workflows/deploy.yml. Its lines live here, not in the
# workflow, so a test runs exactly them (tests/integration/test_actions.py).
#
# It SSHes to the server with a pinned host key and runs the tool installed there
# (`tool.install`, in /opt/coachntt-ops): `coachntt-inv TASK --sha SHA` uses the server's settings file,
# its deploy lock and release log, and every phase runs beside the app.
#
#   DEPLOY_TASK          the task, from the workflow (release)
#   DEPLOY_HOST          the server: HOST or USER@HOST[:PORT] (user coachntt, port 22 by default)
#   DEPLOY_SSH_KEY       a private key the deploy user accepts (a secret: only ever in a 0600 file)
#   DEPLOY_KNOWN_HOSTS   the server's host key line(s) as `ssh-keyscan` prints them
#                        ("[HOST]:PORT ..." for a port other than 22); no other key is trusted
#   GITHUB_SHA           the commit to release; GITHUB_ACTOR, who pushed it (the release log's who)
#
# The exit status is the task's (1 failed, 2 bad input, 3 lost the host, 4 lock held,
# 130 interrupted); 255 is ssh's: no connection, refused key or a host key that does not match.
set -euo pipefail

refuse() { echo "ci-deploy: $1" >&2; exit 2; }

task=${DEPLOY_TASK:-}
[[ $task =~ ^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)?$ ]] || refuse "DEPLOY_TASK must be a task name like release, got '$task'"
sha=${GITHUB_SHA:-}
[[ $sha =~ ^[0-9a-f]{40}$ ]] || refuse "GITHUB_SHA must be a full commit id, got '$sha'"
# A GitHub login (or an app's, like dependabot[bot]); it travels single-quoted.
actor=${GITHUB_ACTOR:-}
[[ $actor =~ ^[A-Za-z0-9][A-Za-z0-9-]*(\[bot\])?$ ]] || actor=unknown
address=${DEPLOY_HOST:-}
[[ $address =~ ^(([a-z_][a-z0-9_-]*)@)?([A-Za-z0-9][A-Za-z0-9.-]*)(:([0-9]{1,5}))?$ ]] ||
    refuse "DEPLOY_HOST must be HOST or USER@HOST[:PORT] (the VPS_HOST secret)"
user=${BASH_REMATCH[2]:-coachntt} host=${BASH_REMATCH[3]} port=${BASH_REMATCH[5]:-22}
[[ -n ${DEPLOY_SSH_KEY:-} ]] || refuse "DEPLOY_SSH_KEY is empty (the VPS_SSH_KEY secret)"
grep -q '[^[:space:]]' <<< "${DEPLOY_KNOWN_HOSTS:-}" ||
    refuse "DEPLOY_KNOWN_HOSTS is empty (the VPS_KNOWN_HOSTS variable): an unknown host key is never trusted"

umask 077
private=$(mktemp -d)
trap 'rm -rf "$private"' EXIT
trap 'exit 143' TERM  # a cancelled job: still remove the key (the EXIT trap)
trap 'exit 130' INT
printf '%s\n' "$DEPLOY_SSH_KEY" > "$private/key"
printf '%s\n' "$DEPLOY_KNOWN_HOSTS" > "$private/known_hosts"

echo "ci-deploy: $task --sha $sha on $user@$host:$port (host key pinned), for $actor"
# -tt and exec: the tool on the server holds the session's terminal, so a cancelled job (the
# connection gone) reaches it as SIGHUP and it leaves the server in order (README: when a
# release is cut off). Without them it would learn of it only at its next print.
status=0
ssh -tt -F none -i "$private/key" -p "$port" \
    -o BatchMode=yes -o IdentitiesOnly=yes \
    -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$private/known_hosts" -o GlobalKnownHostsFile=/dev/null \
    -o UpdateHostKeys=no -o ConnectTimeout=20 -o ServerAliveInterval=15 -o ServerAliveCountMax=4 -o LogLevel=ERROR \
    "$user@$host" "cd /opt/coachntt-ops && exec env GITHUB_ACTOR='$actor' coachntt-inv $task --sha $sha" || status=$?
exit "$status"
