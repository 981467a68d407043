#!/usr/bin/env bash
# Builds the guest disk: a qcow2 image that boots on its own through the firmware, into the test guest's
# init (serial protocol, see build-kit.sh) with qemu-guest-agent running. build-kit.sh calls it:
#
#   guest/build-disk.sh WORK   (root, or sudo: extlinux installs only into a mounted file system)
#
#   reads  WORK/unpacked/{qemu-guest-agent,extlinux}  those packages, unpacked
#          WORK/initramfs/{bin,init}                 busybox and its applet links; guest/init.sh
#          WORK/kit/{vmlinuz,initramfs.gz}            the kit's kernel and initramfs
#   writes WORK/kit/disk.qcow2, and appends the Debian packages of qemu-ga's libraries to WORK/kit/packages
#
# The disk: an MBR (syslinux's mbr.bin) with one bootable partition from 1 MiB to the end of 256 MiB, an
# ext4 file system labelled fbg-root in it, extlinux in its boot sector and /boot/extlinux.
#   /boot/vmlinuz, /boot/initramfs.gz   the kit's: its init loads virtio_blk and virtio_console, and given
#                                       fbg.root=/dev/vda1 mounts the disk and runs its /sbin/init
#   /sbin/init                          guest/init.sh again: the serial protocol, after starting the agent
#   /usr/sbin/qemu-ga + its libraries   on /dev/virtio-ports/org.qemu.guest_agent.0; its files in /run
#   /usr/bin/fbg-workload               guest/workload.sh: files and a checksum log in /data (180 MiB free)
#   /run, /tmp                          tmpfs, mounted at boot
#   /bin                                busybox-static
# Boot it through SeaBIOS (no -kernel) under TCG, with the agent's channel:
#   qemu-system-x86_64 -nodefaults -display none -machine q35,accel=tcg -m 256 -no-reboot \
#     -blockdev driver=file,filename=OVERLAY,node-name=root-file -blockdev driver=qcow2,file=root-file,node-name=root \
#     -device virtio-blk-pci,drive=root,id=vda \
#     -chardev socket,id=qga0,path=DIR/qga.sock,server=on,wait=off \
#     -device virtio-serial -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0 \
#     -chardev socket,id=ser0,path=DIR/serial.sock,server=on,wait=off -serial chardev:ser0
# The disk must be the first virtio-blk device (the kernel's command line names /dev/vda1). It is a template:
# give each VM an overlay (qemu-img create -f qcow2 -b KIT/disk.qcow2 -F qcow2 OVERLAY), never the image itself.
#
# Checked on Debian 12 (kernel 6.1 cloud, syslinux 6.04, qemu-guest-agent 7.2, QEMU 7.2, TCG):
# * extlinux 6.04 can't read ext4 with 1 KiB blocks (mke2fs's default below 512 MiB): it loads ldlinux.c32,
#   then stops at "Loading /boot/vmlinuz failed: I/O error". With 4 KiB blocks it boots; mke2fs 1.47's
#   other default features (64bit, metadata_csum, flex_bg) are fine.
# * extlinux --install needs the file system mounted. Mounted from the whole image with -o loop,offset=,
#   extlinux reads the partition's start from the loop device (LOOP_GET_STATUS64) and writes it into the
#   boot sector as its hidden sectors, which is what the boot needs. It warns "unable to obtain device
#   geometry": harmless, the BIOS reads by LBA. The mount lives in a private mount namespace (unshare -m):
#   if the build is killed, the kernel unmounts it and frees the loop device (mount's loop is autoclear).
#   /dev/nbd* and modprobe don't exist on these machines, so qemu-nbd can't serve the image to the kernel.
# * mkfs.ext4 -E offset= -d DIR writes the file system, files included, into the image without mounting;
#   on a regular file it marks the inode tables zeroed, so the guest's kernel runs no lazy init (no
#   writes of its own at boot).
# * qemu-ga from the .deb runs with the libraries ldd resolves on this machine (glib, pcre2, libnuma,
#   liburing, libudev, libc), copied from their Debian packages as installed here. Without udev nothing
#   makes /dev/virtio-ports/org.qemu.guest_agent.0: init.sh links it from /sys/class/virtio-ports. Its
#   pid file, state and log go to /run, a tmpfs: on the frozen root file system, their writes would block.
#   guest-fsfreeze-freeze freezes / (ext4 on vda1) and answers 1; thaw answers 1. While frozen, the agent
#   answers guest-sync-delimited, guest-ping, guest-info and the fsfreeze commands, and refuses guest-exec:
#   "CommandNotFound: Command guest-exec has been disabled: the agent is in frozen state".
# * A sync sent before the agent runs waits in the channel (QEMU reads the socket only once the guest has
#   opened the port): one guest-sync-delimited, sent as QEMU starts, is answered when qemu-ga is up.
# * From the start of QEMU to the agent's answer: 2.3 to 3.2 s on a shared, loaded 2-core machine (QEMU used
#   2.0 to 2.2 s of CPU time): SeaBIOS and extlinux loading the 14 MB kernel about 1 s, the kernel about
#   1.4 s, init and qemu-ga the rest. The crypto self-tests took 0.2 s of it: cryptomgr.notests.
set -euo pipefail

guest_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
work=$1
disk_mib=256
start_sector=2048
offset=$((start_sector * 512))
rootfs=$work/rootfs
raw=$work/disk.raw
agent=$work/unpacked/qemu-guest-agent/usr/sbin/qemu-ga
extlinux=$work/unpacked/extlinux/usr/bin/extlinux
mbr=$work/unpacked/extlinux/usr/lib/EXTLINUX/mbr.bin

say() {
    echo "build-disk: $*" >&2
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# The libraries the dynamic loader resolves for qemu-ga on this machine, loader included.
agent_libraries() {
    local resolved
    resolved=$(ldd "$agent")
    if grep -q 'not found' <<<"$resolved"; then
        say "qemu-ga needs libraries that this machine lacks (install their Debian packages):"
        grep 'not found' <<<"$resolved" >&2
        return 1
    fi
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$resolved"
}

# bytes of a little-endian 32-bit number, for the partition table
le32() {
    local shift
    for shift in 0 8 16 24; do
        # shellcheck disable=SC2059  # the format is the byte's octal escape
        printf "\\$(printf %03o $((($1 >> shift) & 255)))"
    done
}

mkdir -p "$rootfs"/{dev,proc,sys,run,tmp,data,sbin,usr/bin,boot/extlinux}
cp -a "$work/initramfs/bin" "$rootfs/bin"
install -m 755 "$work/initramfs/init" "$rootfs/sbin/init"
install -m 755 "$guest_dir/workload.sh" "$rootfs/usr/bin/fbg-workload"
install -D -m 755 "$agent" "$rootfs/usr/sbin/qemu-ga"
libraries=$(agent_libraries)
patterns=()
for library in $libraries; do
    install -D -m 755 "$library" "$rootfs$library"  # the kernel must be allowed to execute ld-linux
    patterns+=("*/${library##*/}")
done
# One dpkg -S for all: each one reads the whole package database.
# shellcheck disable=SC2016  # dpkg-query expands ${Package}, not the shell
dpkg -S "${patterns[@]}" | cut -d: -f1 | sort -u |
    xargs dpkg-query -W -f='${Package} ${Version} (from this machine)\n' >>"$work/kit/packages"
cp "$work/kit/vmlinuz" "$work/kit/initramfs.gz" "$rootfs/boot/"
# SERIAL: its messages (and failures) show on the console; NOESCAPE: no key ever stops the boot at a prompt.
# cryptomgr.notests: the kernel's crypto self-tests cost 0.2 s of TCG time at every boot.
cat >"$rootfs/boot/extlinux/extlinux.conf" <<'EOF'
SERIAL 0 115200
NOESCAPE 1
PROMPT 0
TIMEOUT 0
DEFAULT fbg
LABEL fbg
  LINUX /boot/vmlinuz
  INITRD /boot/initramfs.gz
  APPEND console=ttyS0 quiet panic=-1 cryptomgr.notests fbg.root=/dev/vda1
EOF

truncate -s "${disk_mib}M" "$raw"
mkfs.ext4 -q -F -b 4096 -L fbg-root -E "offset=$offset" -d "$rootfs" "$raw" "$((disk_mib * 1024 - offset / 1024))k"
dd if="$mbr" of="$raw" bs=440 count=1 conv=notrunc status=none
# One bootable Linux partition, addressed by LBA only (CHS fields 0xfeffff).
{
    printf '\x80\xfe\xff\xff\x83\xfe\xff\xff'
    le32 "$start_sector"
    le32 $((disk_mib * 2048 - start_sector))
} | dd of="$raw" bs=1 seek=446 conv=notrunc status=none
printf '\x55\xaa' | dd of="$raw" bs=1 seek=510 conv=notrunc status=none

mkdir "$work/mnt"
# shellcheck disable=SC2016  # the inner shell expands its own arguments
if ! installed=$(as_root unshare --mount sh -c \
        'mount -o "loop,offset=$1" "$2" "$3" || exit; "$4" --install "$3/boot/extlinux"; status=$?; umount "$3"; exit $status' \
        - "$offset" "$raw" "$work/mnt" "$extlinux" 2>&1); then
    say "installing extlinux failed (it needs root, a free loop device and the right to mount):"
    echo "$installed" >&2
    exit 1
fi
qemu-img convert -O qcow2 "$raw" "$work/kit/disk.qcow2"
rm "$raw"
