#!/usr/bin/env bash
# The demo: a real guest (the guest kit's disk, booted through its firmware under TCG) writes files while it is
# backed up live, with its file systems frozen by its agent; then a restore, and a drill that boots the restore.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
venv=${VENV:-$root/.venv}
demo_dir=$(mktemp -d /tmp/fleetbackup-demo.XXXXXX)
backup_dir=${BACKUP_DIR:-$root/build/demo-backups}
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

guest() {
    PYTHONPATH=${ANSIBLE_COLLECTIONS_PATH:-$root/build/collections} "$venv/bin/python" "$here/guest_agent.py" \
        "$demo_dir/qga.sock" "$@"
}

kit=$("$root/guest/build-kit.sh")
echo "== The guest: an overlay of $kit/disk.qcow2 (ext4 root, extlinux, qemu-guest-agent, fbg-workload), and a data disk"
qemu-img create -q -f qcow2 -b "$kit/disk.qcow2" -F qcow2 "$demo_dir/system.qcow2"
qemu-img create -q -f qcow2 "$demo_dir/data.qcow2" 512M
qemu-io -f qcow2 -c 'write -P 0x33 100M 48M' "$demo_dir/data.qcow2" >/dev/null

echo "== Starting QEMU: it boots the disk through SeaBIOS and extlinux under TCG, its agent on qga.sock"
qemu-system-x86_64 -nodefaults -display none -machine q35,accel=tcg -m 256 \
    -qmp "unix:$demo_dir/qmp.sock,server=on,wait=off" \
    -blockdev "driver=file,filename=$demo_dir/system.qcow2,node-name=system-file" \
    -blockdev "driver=qcow2,file=system-file,node-name=system" \
    -device virtio-blk-pci,drive=system,id=vda \
    -blockdev "driver=file,filename=$demo_dir/data.qcow2,node-name=data-file" \
    -blockdev "driver=qcow2,file=data-file,node-name=data" \
    -device virtio-blk-pci,drive=data,id=vdb \
    -chardev "socket,id=qga0,path=$demo_dir/qga.sock,server=on,wait=off" \
    -device virtio-serial -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0 \
    -serial "file:$demo_dir/console.log" \
    -daemonize -pidfile "$demo_dir/qemu.pid" 2>/dev/null
qemu_pid=$(cat "$demo_dir/qemu.pid")
started=$(date +%s%N)
guest wait
echo "   the guest agent answered $(( ($(date +%s%N) - started) / 1000000 )) ms after QEMU started"
rm -rf "$backup_dir" && mkdir -p "$backup_dir"

echo "== The workload writes files of 64 KiB into /data, fsync'd, with a checksum log"
guest run fbg-workload start 64
guest run fbg-workload wait 10

echo
echo "== The modules: demo/full_backup.yml, a full backup with the file systems frozen"
"$venv/bin/ansible-playbook" "$here/full_backup.yml" -e "demo_dir=$demo_dir" -e "backup_dir=$backup_dir"
qemu-img compare -U "$backup_dir/vdb.qcow2" "$demo_dir/data.qcow2" | sed "s|^|vdb (no guest writes to it): |"

echo
echo "== The backup role: a repository of chains. First run: a full backup"
repository="$backup_dir/repository"
cat > "$demo_dir/inventory.yml" <<INVENTORY
vms:
  hosts:
    demo-vm:
      qemu_backup_qmp_socket: $demo_dir/qmp.sock
      qemu_backup_guest_agent_socket: $demo_dir/qga.sock
  vars:
    ansible_connection: local
    ansible_python_interpreter: "{{ ansible_playbook_python }}"
    qemu_backup_repository: $repository
    qemu_backup_state_dir: $demo_dir/state
    qemu_drill_accel: tcg  # this machine's KVM cannot boot guests
INVENTORY
# Each copy held to 32 MiB/s, and a progress line every second.
"$venv/bin/ansible-playbook" -i "$demo_dir/inventory.yml" fleetbackup.qemu.fleet_backup \
    -e qemu_backup_bandwidth=32M -e qemu_backup_progress_interval=1

logged=$(guest run fbg-workload status | cut -d' ' -f2)
echo "== The workload writes on: $(guest run fbg-workload wait $((logged + 10)))"

echo "== Second run: an incremental that reads only what changed"
"$venv/bin/ansible-playbook" -i "$demo_dir/inventory.yml" fleetbackup.qemu.fleet_backup

echo "== Third run with max_age=1h: nothing is due, nothing changes"
"$venv/bin/ansible-playbook" -i "$demo_dir/inventory.yml" fleetbackup.qemu.fleet_backup -e qemu_backup_max_age=1h

echo "== Restoring the newest backup (the incremental) into $backup_dir/restored"
"$venv/bin/ansible-playbook" -i "$demo_dir/inventory.yml" fleetbackup.qemu.restore -e "qemu_restore_dest=$backup_dir/restored"

echo "== A restore drill: the restored disks boot in an isolated QEMU; the guest checks its files against the log"
"$venv/bin/ansible-playbook" -i "$demo_dir/inventory.yml" fleetbackup.qemu.restore_drill -e "$(printf '%s' \
    '{"qemu_drill_images": {"vda": "'"$backup_dir"'/restored/vda.qcow2", "vdb": "'"$backup_dir"'/restored/vdb.qcow2"},' \
    ' "qemu_drill_command": ["sh", "-c", "fbg-workload verify && tail -n 3 /data/checksums.log"]}')"

echo "== Verifying every backup without the VM: qemu-img check, backing links, checksums"
"$venv/bin/ansible-playbook" -i "$demo_dir/inventory.yml" fleetbackup.qemu.verify

echo "== The manifest of demo-vm:"
"$venv/bin/python" -c 'import json, sys
for b in json.load(open(sys.argv[1]))["backups"]:
    frozen = b["freeze"]["seconds"]
    print("  %s  %-11s %s-consistent%s  parent=%s  read %s" % (
        b["name"], b["level"], b["consistency"], " (frozen %.0f ms)" % (frozen * 1000) if frozen else "", b["parent"],
        ", ".join("%s %.1f MiB" % (d["disk"], d["bytes_read"] / 2**20) for d in b["disks"])))' \
    "$repository/demo-vm/manifest.json"
echo "== Everything is kept in $backup_dir:"
ls -lsh "$backup_dir" "$repository/demo-vm"
