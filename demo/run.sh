#!/usr/bin/env bash
# The demo: a small VM with data on two disks, backed up live by a playbook, then checked.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${VENV:-$here/../.venv}
demo_dir=$(mktemp -d /tmp/fleetbackup-demo.XXXXXX)
backup_dir=${BACKUP_DIR:-$(cd "$here/.." && pwd)/build/demo-backups}
qemu_pid=

cleanup() {
    # End only the QEMU this demo started, by its PID.
    if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill "$qemu_pid"
        tail --pid="$qemu_pid" -f /dev/null
    fi
    rm -rf "$demo_dir"
}
trap cleanup EXIT

echo "== Creating two disks with data in $demo_dir"
qemu-img create -q -f qcow2 "$demo_dir/system.qcow2" 1G
qemu-img create -q -f qcow2 "$demo_dir/data.qcow2" 512M
qemu-io -f qcow2 -c 'write -P 0x11 0 64M' -c 'write -P 0x22 512M 32M' -c 'write -z 600M 16M' "$demo_dir/system.qcow2" >/dev/null
qemu-io -f qcow2 -c 'write -P 0x33 100M 48M' "$demo_dir/data.qcow2" >/dev/null

echo "== Starting QEMU (no guest needed: the disks are attached to virtio devices)"
qemu-system-x86_64 -nodefaults -display none -S -machine q35,accel=kvm:tcg \
    -qmp "unix:$demo_dir/qmp.sock,server=on,wait=off" \
    -blockdev "driver=file,filename=$demo_dir/system.qcow2,node-name=system-file" \
    -blockdev "driver=qcow2,file=system-file,node-name=system" \
    -device virtio-blk-pci,drive=system,id=vda \
    -blockdev "driver=file,filename=$demo_dir/data.qcow2,node-name=data-file" \
    -blockdev "driver=qcow2,file=data-file,node-name=data" \
    -device virtio-blk-pci,drive=data,id=vdb \
    -daemonize -pidfile "$demo_dir/qemu.pid" 2>/dev/null
qemu_pid=$(cat "$demo_dir/qemu.pid")
rm -rf "$backup_dir" && mkdir -p "$backup_dir"

echo "== Running demo/full_backup.yml"
"$venv/bin/ansible-playbook" "$here/full_backup.yml" -e "demo_dir=$demo_dir" -e "backup_dir=$backup_dir"

echo "== Checking each backup against its disk"
for disk in vda:system vdb:data; do
    qemu-img compare -U "$backup_dir/${disk%%:*}.qcow2" "$demo_dir/${disk##*:}.qcow2" \
        | sed "s|^|${disk%%:*}: |"
done
echo "== The backups are kept in $backup_dir:"
ls -lsh "$backup_dir"
