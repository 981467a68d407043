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

echo "== Starting QEMU: a running VM whose only code halts its vCPU (no guest OS needed for the disks)"
# The reset vector, at the end of the firmware: cli; hlt; jmp back to the hlt.
{ head -c 65520 /dev/zero; printf '\xfa\xf4\xeb\xfd'; head -c 12 /dev/zero; } > "$demo_dir/halt.bin"
qemu-system-x86_64 -nodefaults -display none -machine q35,accel=kvm:tcg -bios "$demo_dir/halt.bin" \
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

echo
echo "== The backup role: a repository of chains. First run: a full backup"
repository="$backup_dir/repository"
cat > "$demo_dir/inventory.yml" <<INVENTORY
vms:
  hosts:
    demo-vm:
      qemu_backup_qmp_socket: $demo_dir/qmp.sock
  vars:
    ansible_connection: local
    ansible_python_interpreter: "{{ ansible_playbook_python }}"
    qemu_backup_repository: $repository
    qemu_backup_state_dir: $demo_dir/state
INVENTORY
# Each copy held to 32 MiB/s, and a progress line every second.
"$venv/bin/ansible-playbook" -i "$demo_dir/inventory.yml" fleetbackup.qemu.fleet_backup \
    -e qemu_backup_bandwidth=32M -e qemu_backup_progress_interval=1

echo "== The guest writes 8 MiB on vda and zeroes 16 MiB of old data on vdb"
"$venv/bin/python" "$here/guest_write.py" "$demo_dir/qmp.sock" vda/virtio-backend 'write -P 0x44 300M 8M'
"$venv/bin/python" "$here/guest_write.py" "$demo_dir/qmp.sock" vdb/virtio-backend 'write -z 100M 16M'

echo "== Second run: an incremental that reads only what changed"
"$venv/bin/ansible-playbook" -i "$demo_dir/inventory.yml" fleetbackup.qemu.fleet_backup

echo "== Third run with max_age=1h: nothing is due, nothing changes"
"$venv/bin/ansible-playbook" -i "$demo_dir/inventory.yml" fleetbackup.qemu.fleet_backup -e qemu_backup_max_age=1h

echo "== Restoring the newest backup and comparing it with the live disks"
"$venv/bin/ansible-playbook" -i "$demo_dir/inventory.yml" fleetbackup.qemu.restore -e "qemu_restore_dest=$backup_dir/restored"
for disk in vda:system vdb:data; do
    qemu-img compare -U "$backup_dir/restored/${disk%%:*}.qcow2" "$demo_dir/${disk##*:}.qcow2" \
        | sed "s|^|restored ${disk%%:*}: |"
done

echo "== Verifying every backup without the VM: qemu-img check, backing links, checksums"
"$venv/bin/ansible-playbook" -i "$demo_dir/inventory.yml" fleetbackup.qemu.verify

echo "== The manifest of demo-vm:"
"$venv/bin/python" -c 'import json, sys
for b in json.load(open(sys.argv[1]))["backups"]:
    print("  %s  %-11s parent=%s  read %s" % (b["name"], b["level"], b["parent"],
          ", ".join("%s %.1f MiB" % (d["disk"], d["bytes_read"] / 2**20) for d in b["disks"])))' \
    "$repository/demo-vm/manifest.json"
echo "== Everything is kept in $backup_dir:"
ls -lsh "$backup_dir" "$repository/demo-vm"
