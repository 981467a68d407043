#!/bin/sh
# The users libvirt-daemon-system's postinst makes, for a machine with only libvirt-daemon: libvirtd runs QEMU as
# libvirt-qemu (group kvm), and refuses to start without it. Idempotent.
set -eu
getent group kvm >/dev/null || addgroup --quiet --system kvm
getent passwd libvirt-qemu >/dev/null || adduser --quiet --system --ingroup kvm --disabled-login \
    --disabled-password --home /var/lib/libvirt --no-create-home --gecos "Libvirt Qemu" libvirt-qemu
if ! getent group libvirt-qemu >/dev/null; then
    addgroup --quiet --system libvirt-qemu
    adduser --quiet libvirt-qemu libvirt-qemu
fi
