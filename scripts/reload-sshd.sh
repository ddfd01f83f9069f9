#!/bin/sh
# Make a running sshd pick up new configuration without dropping sessions.
#   ssh.socket, Accept=no (Ubuntu 24.04): restart ssh.service; systemd hands the
#       new sshd the same listening socket (a SIGHUP re-exec would try to bind
#       the port itself and die). KillMode=process keeps open sessions.
#   ssh.socket, Accept=yes: every connection starts a fresh sshd; nothing to do.
#   ssh.service (Debian default): reload.
set -e
if systemctl is-active --quiet ssh.socket; then
    if [ "$(systemctl show -p Accept --value ssh.socket)" = "no" ]; then
        systemctl restart ssh.service
    fi
elif systemctl is-active --quiet ssh.service; then
    systemctl reload ssh.service
else
    systemctl start ssh.service
fi
