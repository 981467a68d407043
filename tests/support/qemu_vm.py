"""A real, running QEMU for tests: no guest OS, disks on devices, two QMP monitors.

The VM runs (status 'running') a firmware of one instruction, a halt with interrupts off,
so it costs no CPU; paused=True starts it with -S instead. The modules get qmp.sock; the
test itself talks on test-qmp.sock, because a monitor serves one client at a time. Guest
writes go through HMP qemu-io on the device, and every write is logged so that the disk's
content at any moment can be rebuilt offline.
"""

import json
import os
import subprocess
from collections import namedtuple

from qemu.qmp.legacy import QEMUMonitorProtocol

from support.modules import support_command
from support.processes import end_process

# backing: a qcow2 image that the disk's new image is an overlay on (format qcow2, size the backing's).
DiskSpec = namedtuple("DiskSpec", "id format size bus iothread backing")
DiskSpec.__new__.__defaults__ = ("qcow2", 64 * 1024 ** 2, "virtio", False, None)

MiB = 1024 ** 2
# The reset vector, 16 bytes below 4 GiB, is the end of the firmware: cli; hlt; jmp back to the hlt.
HALT_FIRMWARE_TAIL = bytes([0xFA, 0xF4, 0xEB, 0xFD]) + bytes(12)


def halt_firmware(directory):
    path = os.path.join(directory, "halt.bin")
    with open(path, "wb") as stream:
        stream.write(bytes(64 * 1024 - len(HALT_FIRMWARE_TAIL)) + HALT_FIRMWARE_TAIL)
    return path


class Vm:
    def __init__(self, workdir, disks, paused=False, runas=None, uuid=None):
        self.workdir = workdir
        self.paused = paused
        self.runas = runas  # a user QEMU switches to once its images and sockets are open
        self.vm_uuid = uuid
        self.disks = {spec.id: spec for spec in disks}
        self.qmp_socket = os.path.join(workdir, "qmp.sock")
        self.test_socket = os.path.join(workdir, "test-qmp.sock")
        # For a process that acts as the guest while a playbook runs (the test holds test-qmp.sock).
        self.hook_socket = os.path.join(workdir, "hook-qmp.sock")
        # QEMU's messages (-D keeps a daemonized QEMU's stderr there), such as why it refused an NBD client.
        self.log = os.path.join(workdir, "qemu.log")
        self.pid = None
        self.monitor = None
        self.writes = {spec.id: [] for spec in disks}
        for spec in disks:
            if not os.path.exists(self.image(spec.id)):
                backing = ["-b", spec.backing, "-F", "qcow2"] if spec.backing else []
                subprocess.run(["qemu-img", "create", "-q", "-f", spec.format, *backing, self.image(spec.id),
                                str(spec.size)], check=True)

    def connection_args(self):
        """How the modules name this VM."""
        return dict(qmp_socket=self.qmp_socket)

    def image(self, disk_id):
        spec = self.disks[disk_id]
        return os.path.join(self.workdir, "%s.%s" % (disk_id, spec.format))

    def machine_args(self):
        """No guest OS: a halted vCPU (KVM is fine for that), or vCPUs that never start."""
        start = ["-S"] if self.paused else ["-bios", halt_firmware(self.workdir)]
        return ["-machine", "q35,accel=kvm:tcg"] + start

    def command_line(self):
        cmd = ["qemu-system-x86_64", "-nodefaults", "-display", "none", *self.machine_args(),
               "-qmp", "unix:%s,server=on,wait=off" % self.qmp_socket,
               "-qmp", "unix:%s,server=on,wait=off" % self.test_socket,
               "-qmp", "unix:%s,server=on,wait=off" % self.hook_socket,
               "-daemonize", "-pidfile", os.path.join(self.workdir, "qemu.pid"), "-D", self.log]
        if self.runas:
            cmd += ["-runas", self.runas]
        if self.vm_uuid:
            cmd += ["-uuid", self.vm_uuid]
        if any(spec.bus == "scsi" for spec in self.disks.values()):
            cmd += ["-device", "virtio-scsi-pci,id=scsi0"]
        for spec in self.disks.values():
            # discard=unmap, so that a guest's discard really drops the data, as the replayed log does.
            cmd += ["-blockdev", "driver=file,filename=%s,node-name=%s-file,discard=unmap"
                    % (self.image(spec.id), spec.id),
                    "-blockdev", "driver=%s,file=%s-file,node-name=%s-fmt,discard=unmap"
                    % (spec.format, spec.id, spec.id)]
            device = "virtio-blk-pci" if spec.bus == "virtio" else "scsi-hd"
            if spec.iothread:
                cmd += ["-object", "iothread,id=io-%s" % spec.id]
                device += ",iothread=io-%s" % spec.id
            cmd += ["-device", "%s,drive=%s-fmt,id=%s" % (device, spec.id, spec.id)]
        return cmd

    def start(self):
        # -daemonize returns once QEMU is initialised and its sockets listen.
        subprocess.run(self.command_line(), check=True, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(os.path.join(self.workdir, "qemu.pid")) as stream:
            self.pid = int(stream.read())
        self.monitor = QEMUMonitorProtocol(self.test_socket)
        self.monitor.connect()
        return self

    def qmp(self, command, **arguments):
        return self.monitor.cmd(command, **arguments)

    def messages(self):
        """What QEMU has written to its log so far."""
        with open(self.log, errors="replace") as stream:
            return stream.read()

    def wait_event(self, name, timeout=30.0, **match):
        """The next event `name` whose data has every key=value of match, as the test monitor receives it."""
        while True:
            event = self.monitor.pull_event(wait=timeout)
            data = event.get("data", {})
            if event["event"] == name and all(data.get(key) == value for key, value in match.items()):
                return event

    def node(self, disk_id):
        return "%s-fmt" % disk_id

    def _qdev_backend(self, disk_id):
        return "%s/virtio-backend" % disk_id if self.disks[disk_id].bus == "virtio" else disk_id

    def _apply(self, disk_id, io_command):
        if self.pid is None:
            spec = self.disks[disk_id]
            subprocess.run(["qemu-io", "-f", spec.format, "-c", io_command, self.image(disk_id)],
                           check=True, stdout=subprocess.DEVNULL)
        else:
            guest_io(self.monitor, self._qdev_backend(disk_id), [io_command])
        self.writes[disk_id].append(io_command)

    def writes_by_hook(self, disk_id, offset, length, pattern):
        """argv of a process that writes as the guest through hook-qmp.sock, for a playbook's at_task.

        The write is logged now: take marks before the playbook runs, and after it.
        """
        io_command = "write -P 0x%02x %d %d" % (pattern, offset, length)
        self.writes[disk_id].append(io_command)
        return support_command("from support.qemu_vm import guest_io_on; guest_io_on(%r, %r, [%r, 'flush'])"
                               % (self.hook_socket, self._qdev_backend(disk_id), io_command))

    def flushed_image(self, disk_id):
        """The disk's image file, after QEMU has written out its caches, for reading with qemu-img -U."""
        if self.pid is not None:
            guest_io(self.monitor, self._qdev_backend(disk_id), ["flush"])
        return self.image(disk_id)

    def write(self, disk_id, offset, length, pattern):
        """Write as the guest would, through the device."""
        self._apply(disk_id, "write -P 0x%02x %d %d" % (pattern, offset, length))

    def write_file(self, disk_id, offset, length, source):
        """Write the bytes of file source (repeated, if shorter), as the guest would: data of our choosing."""
        self._apply(disk_id, "write -s %s %d %d" % (source, offset, length))

    def zero(self, disk_id, offset, length, unmap=False):
        self._apply(disk_id, "write -z %s%d %d" % ("-u " if unmap else "", offset, length))

    def discard(self, disk_id, offset, length):
        self._apply(disk_id, "discard %d %d" % (offset, length))

    def resize(self, disk_id, size):
        """block_resize, as a management tool would; the log replays it as a truncate."""
        self.qmp("block_resize", **{"node-name": self.node(disk_id), "size": size})
        self.writes[disk_id].append("truncate %d" % size)

    def mark(self, disk_id):
        """A point in the write log, for expected_image."""
        return len(self.writes[disk_id])

    def expected_image(self, disk_id, mark, path, size=None):
        """Rebuild the disk as it was at `mark` by replaying the logged writes on a fresh raw image."""
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", path, str(size or self.disks[disk_id].size)],
                       check=True)
        commands = self.writes[disk_id][:mark]
        if commands:
            args = ["qemu-io", "-f", "raw"]
            for command in commands:
                args += ["-c", command]
            subprocess.run(args + [path], check=True, stdout=subprocess.DEVNULL)
        return path

    def named_bitmaps(self, disk_id):
        for node in self.qmp("query-named-block-nodes", flat=True):
            if node["node-name"] == self.node(disk_id):
                return {b["name"]: b for b in node.get("dirty-bitmaps", []) if b.get("name")}
        raise KeyError(disk_id)

    def leftovers(self):
        """Everything in QEMU that a backup adds: nodes beyond the disks', devices moved off their node, exports,
        jobs, temporary bitmaps, fdsets (scratch images), objects (TLS credentials and client filters)."""
        own_nodes = {"%s-file" % d for d in self.disks} | {self.node(d) for d in self.disks}
        return dict(
            nodes=[n["node-name"] for n in self.qmp("query-named-block-nodes", flat=True)
                   if n["node-name"] not in own_nodes],
            moved={d["qdev"]: d["inserted"]["node-name"] for d in self.qmp("query-block")
                   if d.get("inserted") and d["inserted"]["node-name"] not in own_nodes},
            exports=self.qmp("query-block-exports"),
            jobs=self.qmp("query-jobs"),
            bitmaps={d: sorted(b for b in self.named_bitmaps(d) if b.startswith("fb-")) for d in self.disks},
            fdsets=[] if self.paused else self.qmp("query-fdsets"),
            deleted_files=[] if self.paused else self.deleted_files(),
            objects=sorted(o["name"] for o in self.qmp("qom-list", path="/objects") if o["name"].startswith("fb-")),
        )

    def deleted_files(self):
        """The unlinked files QEMU holds open: nameless scratch images that were not let go."""
        fd_dir = "/proc/%d/fd" % self.pid
        targets = [os.readlink(os.path.join(fd_dir, fd)) for fd in os.listdir(fd_dir)]
        return [target for target in targets if target.endswith(" (deleted)")]

    def status(self):
        return self.qmp("query-status")["status"]

    def kill(self):
        """SIGKILL by PID, as a crash would, and wait until the process is gone."""
        if self.pid is None:
            return
        end_process(self.pid)  # it may be gone already: a test crashed it on purpose
        self._forget()

    def quit(self):
        """A clean shutdown: QEMU stores persistent bitmaps on the way out."""
        self.qmp("quit")
        end_process(self.pid, None, 60)
        self._forget()

    def _forget(self):
        if self.monitor is not None:
            try:
                self.monitor.close()
            except Exception:  # pylint: disable=broad-except
                pass  # the process is gone, and so is the socket
        self.monitor = None
        self.pid = None


def guest_io(monitor, qdev_backend, io_commands):
    """Run qemu-io commands through a device's backend, as the guest would write."""
    for io_command in io_commands:
        output = monitor.cmd("human-monitor-command",
                             **{"command-line": 'qemu-io -d %s "%s"' % (qdev_backend, io_command)})
        if output.strip():
            raise AssertionError("qemu-io %r failed: %s" % (io_command, output))


def guest_io_on(socket_path, qdev_backend, io_commands):
    monitor = QEMUMonitorProtocol(socket_path)
    monitor.connect()
    try:
        guest_io(monitor, qdev_backend, io_commands)
    finally:
        monitor.close()


def virtual_size(path):
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], check=True, stdout=subprocess.PIPE)
    return json.loads(info.stdout)["virtual-size"]


def same(first, second):
    """Same virtual size and same bytes (strict mode would also compare allocation, which differs)."""
    return virtual_size(first) == virtual_size(second) and subprocess.run(
        ["qemu-img", "compare", "-U", first, second], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        check=False).returncode == 0
