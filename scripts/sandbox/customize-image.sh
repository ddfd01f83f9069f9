#!/bin/sh
# Finish a sandbox image tree built by mmdebstrap (runs on this machine, as root).
#   customize-image.sh ROOT FLAVOUR CONFIGS_DIR
# Turns the package set into something that boots like a new VPS under systemd-nspawn.
set -eu
root=$1 flavour=$2 configs=$3

cp -rT "$configs/rootfs" "$root"
rm -f "$root/etc/apt/apt.conf.d/99mmdebstrap"   # build-time copy of the same proxy setting

# Network comes from systemd-networkd (per-host .network file written at host creation).
systemctl --root="$root" enable systemd-networkd.service ssh.service
# Background jobs that would fight tests for the dpkg lock or the disk. apt-daily-upgrade
# (unattended-upgrades) stays as on a real VPS: the secure task checks and enables it.
systemctl --root="$root" mask apt-daily.timer man-db.timer fstrim.timer e2scrub_all.timer \
    systemd-networkd-wait-online.service

if [ "$flavour" = ubuntu-like ]; then
    cp -rT "$configs/ubuntu-like" "$root"
    # Ubuntu 24.04: sshd is socket-activated; ssh.service only runs when a client connects.
    systemctl --root="$root" disable ssh.service
    systemctl --root="$root" enable ssh.socket
    echo 'root:coachntt-sandbox' | chroot "$root" chpasswd
fi

# Per-host identity is made when a host is created: host keys (so the harness can pin
# them in known_hosts), machine-id (empty = new one each boot), host name.
rm -f "$root"/etc/ssh/ssh_host_*
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id" "$root/etc/hostname"
