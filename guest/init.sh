#!/bin/busybox sh
# shellcheck shell=dash
# The test guest's init: loads the disk drivers, then serves the line protocol documented at the
# top of build-kit.sh on ttyS0, one command at a time. If it ever exits, the kernel panics and
# QEMU (-no-reboot, panic=-1) quits, which the host sees as the serial socket closing.
# The guest disk (build-disk.sh) boots the same initramfs with fbg.root=DEV: this script then mounts DEV
# and hands over to the disk's /sbin/init, which is this script again, and which also starts the agent.
# Word splitting of unquoted expansions is intended throughout: lists of disks, a command's arguments.
# shellcheck disable=SC2046,SC2086

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
exec </dev/ttyS0 >/dev/ttyS0 2>&1
# Kernel messages would land in the middle of answer lines, and echoed commands would read as lines.
dmesg -n 1
stty -echo

boot_disk() {
    mkdir -p /newroot
    if ! mount -t ext4 "$1" /newroot; then
        echo "FBG ERROR mount $1"
        poweroff -f  # no root, no agent: QEMU quits at once, and a drill fails now rather than at its timeout
    fi
    # The disk's init mounts its own: nothing may stay mounted, hidden, under the initramfs.
    umount /proc /sys
    umount -l /dev
    exec switch_root /newroot /sbin/init
}

start_agent() {
    # udev would make this link; qemu-ga opens /dev/virtio-ports/org.qemu.guest_agent.0 by default.
    mkdir -p /dev/virtio-ports
    for port in /sys/class/virtio-ports/*; do
        [ -e "$port/name" ] && ln -s "../${port##*/}" "/dev/virtio-ports/$(cat "$port/name")"
    done
    # Its files in /run: writes to a frozen root file system would block the agent.
    qemu-ga --daemonize --pidfile=/run/qemu-ga.pid --logfile=/run/qemu-ga.log --statedir=/run || echo "FBG ERROR qemu-ga"
}

# Only the initramfs has drivers to load; on the disk, they are loaded already.
if [ -f /lib/modules/load-order ]; then
    while read -r module; do
        insmod "/lib/modules/$module.ko" || echo "FBG ERROR insmod $module"
    done </lib/modules/load-order
    read -r cmdline </proc/cmdline
    for option in $cmdline; do
        case $option in fbg.root=*) boot_disk "${option#fbg.root=}" ;; esac
    done
fi
# On the disk: scratch space in tmpfs (writes to a frozen root file system block), and the agent.
if [ -x /usr/sbin/qemu-ga ]; then
    mount -t tmpfs -o mode=0755 tmpfs /run
    mount -t tmpfs -o mode=1777 tmpfs /tmp
    start_agent
fi

is_number() {
    case $1 in '' | *[!0-9]*) return 1 ;; esac
}

disks() {
    for disk in /sys/block/vd* /sys/block/sd*; do
        [ -e "$disk" ] && echo "${disk#/sys/block/}"
    done
}

ready() {
    echo "FBG READY" $(disks)
}

overwrite() {
    if [ $# -ne 3 ] || [ ! -b "/dev/$1" ] || ! is_number "$2" || ! is_number "$3" || [ "$3" -gt 255 ]; then
        echo "FBG ERROR usage overwrite DEV MIB BYTE"
        return
    fi
    # fullblock: a pipe returns short reads, and every O_DIRECT write must be a whole MiB.
    tr '\0' "\\$(printf %o "$3")" </dev/zero |
        dd of="/dev/$1" bs=1M count="$2" iflag=fullblock oflag=direct 2>/tmp/dd.log
    status=$?
    [ "$status" -eq 0 ] || cat /tmp/dd.log
    # Debian's busybox dd prints no byte count, only "FULL+PARTIAL records out".
    blocks=$(sed -n 's/^\([0-9]*\)+[0-9]* records out$/\1/p' /tmp/dd.log)
    echo "FBG DONE overwrite $status $((${blocks:-0} * 1048576))"
}

records() {
    if [ $# -ne 1 ] || ! is_number "$1"; then
        echo "FBG ERROR usage records N"
        return
    fi
    echo "FBG RECORDS STARTED"
    record=0
    while [ "$record" -lt "$1" ]; do
        if [ $((record % 2)) -eq 0 ]; then disk=vda; else disk=vdb; fi
        # Each dd ends only after its O_DIRECT write completed: the disks always hold a prefix of the records.
        printf 'REC %08d\n' "$record" |
            dd of="/dev/$disk" bs=4096 seek=$((record / 2)) count=1 iflag=fullblock conv=sync oflag=direct \
                status=none || { echo "FBG ERROR records $record"; return; }
        record=$((record + 1))
    done
    echo "FBG DONE records $1"
}

flush() {
    sync
    # fdatasync on a whole disk sends the device a flush: QEMU then writes out its image metadata.
    (cd /dev && sync -d $(disks))
    echo "FBG DONE sync $?"
}

# For a host that cannot run it through the agent: a libvirt domain's agent channel is libvirt's.
workload() {
    if [ ! -x /usr/bin/fbg-workload ]; then
        echo "FBG ERROR workload: only the guest disk has fbg-workload"
        return
    fi
    answer=$(fbg-workload "$@" 2>&1)
    echo "FBG DONE workload $?" $answer
}

ready
while read -r command arguments; do
    case $command in
        '') ;;
        ping) ready ;;
        overwrite) overwrite $arguments ;;
        records) records $arguments ;;
        sync) flush ;;
        workload) workload $arguments ;;
        *) echo "FBG ERROR unknown $command" ;;
    esac
done
