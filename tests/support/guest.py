"""A real guest for tests: the guest kit's Linux boots under TCG and takes commands on its serial console.

The line protocol (ping, overwrite, records, sync) is documented at the top of guest/build-kit.sh.
GuestVm boots the kit's kernel directly; BootedGuestVm boots the kit's disk through the firmware, and its
guest agent answers too. Nothing here sleeps: every wait reads console lines until the one it waits for,
or fails with the console's last lines.
"""

import functools
import hashlib
import os
import socket
import subprocess
import time

from support.paths import ROOT
from support.qemu_vm import DiskSpec, Vm, virtual_size

from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.guest_agent import GuestAgent

BUILD_SCRIPT = os.path.join(ROOT, "guest", "build-kit.sh")
RECORD_SIZE = 4096
ROOT_FS_OFFSET = 1024 ** 2  # where guest/build-disk.sh puts the disk's ext4 partition


@functools.cache
def kit_path():
    """The guest kit's directory; guest/build-kit.sh builds it when it is missing or stale."""
    result = subprocess.run([BUILD_SCRIPT], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError("guest/build-kit.sh failed with status %d (it downloads Debian packages, and runs "
                           "apt-get update as root when the package lists are missing or stale):\n%s"
                           % (result.returncode, result.stderr))
    return result.stdout.strip()


def record_location(index):
    """(guest disk, byte offset) where the guest's `records` command writes record `index`."""
    return ("vda" if index % 2 == 0 else "vdb"), index // 2 * RECORD_SIZE


def record_block(index):
    """The RECORD_SIZE bytes of record `index`, as the guest writes them."""
    return ("REC %08d\n" % index).encode().ljust(RECORD_SIZE, b"\0")


class GuestError(AssertionError):
    pass


class GuestVm(Vm):
    """A Vm whose guest runs: the kit's kernel and initramfs, under TCG (a booting guest hangs under our KVM).

    Disks appear in the guest in the order given: virtio ones as vda, vdb, ...; scsi ones as sda, ...
    (in no guaranteed order among several scsi disks).
    """

    def __init__(self, workdir, disks):
        super().__init__(workdir, disks)
        self.kit = kit_path()
        self.serial_socket = os.path.join(workdir, "serial.sock")
        self.serial = None
        self.console = []  # every complete line the guest printed since start()
        self._unread = b""

    def machine_args(self):
        return ["-machine", "q35,accel=tcg", "-m", "256", "-no-reboot", *self.boot_args(),
                "-chardev", "socket,id=serial,path=%s,server=on,wait=off" % self.serial_socket,
                "-serial", "chardev:serial"]

    def boot_args(self):
        return ["-kernel", os.path.join(self.kit, "vmlinuz"), "-initrd", os.path.join(self.kit, "initramfs.gz"),
                "-append", "console=ttyS0 quiet panic=-1"]

    def start(self):
        super().start()
        self.connect_console()
        return self

    def connect_console(self):
        self.serial = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.serial.connect(self.serial_socket)

    def send(self, command):
        self.serial.sendall(command.encode() + b"\n")

    def wait_line(self, prefix, timeout=60.0):
        """The next console line starting with prefix (a string or a tuple of them), skipping other lines."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._read_line(prefix, deadline)
            if line.startswith(prefix):
                return line

    def wait_ready(self, timeout=60.0):
        """Wait until the guest's drivers are loaded; the disks it sees, e.g. ["vda", "vdb"].

        The guest may have booted before we connected, and its unprompted READY is then lost: ask. A ping sent
        while the guest was opening its console may arrive cut ("ng"): a marker that no command answers, sent
        after READY, consumes every answer to such debris before it can be taken for a later command's.
        """
        self.send("ping")
        disks = self.wait_line("FBG READY", timeout).split()[2:]
        marker = "marker-%d" % time.monotonic_ns()
        self.send(marker)
        self.wait_line("FBG ERROR unknown %s" % marker, timeout)
        return disks

    def run(self, command, timeout=60.0):
        """Run a command to its end: the words after "FBG DONE <command>". GuestError if the guest refuses it."""
        verb = command.split()[0]
        self.send(command)
        line = self.wait_line(("FBG DONE %s " % verb, "FBG ERROR"), timeout)
        if line.startswith("FBG ERROR"):
            raise self._failure("%r answered %r" % (command, line))
        return line.split()[3:]

    def _read_line(self, prefix, deadline):
        while b"\n" not in self._unread:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._failure("no line starting with %r in time" % (prefix,))
            self.serial.settimeout(remaining)
            try:
                data = self.serial.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise self._failure("the console closed (QEMU quit?) before a line starting with %r" % (prefix,))
            self._unread += data
        line, self._unread = self._unread.split(b"\n", 1)
        self.console.append(line.decode(errors="replace").rstrip("\r"))
        return self.console[-1]

    def _failure(self, what):
        return GuestError("%s; the guest's console said:\n%s" % (what, "\n".join(self.console[-40:])))

    def _forget(self):
        super()._forget()
        if self.serial is not None:
            self.serial.close()
            self.serial = None


class BootedGuestVm(GuestVm):
    """A GuestVm that boots from the kit's disk through the firmware (SeaBIOS, extlinux), with a guest agent.

    Its first disk, vda, is a qcow2 overlay on the kit's disk.qcow2 (the kit's image is never written); the disks
    given follow it (vdb, ...). The agent's channel is qga.sock; the serial console speaks the line protocol.
    """

    def __init__(self, workdir, disks=()):
        template = os.path.join(kit_path(), "disk.qcow2")
        root = DiskSpec("vda", size=virtual_size(template), backing=template)
        super().__init__(workdir, [root, *disks])
        self.agent_socket = os.path.join(workdir, "qga.sock")
        self.template_nodes = set()

    def boot_args(self):
        return ["-chardev", "socket,id=qga0,path=%s,server=on,wait=off" % self.agent_socket,
                "-device", "virtio-serial",
                "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]

    def start(self):
        super().start()
        # vda's backing chain (the template) has nodes of QEMU's naming: they are the VM's, not a backup's.
        self.template_nodes = {node["node-name"] for node in self.qmp("query-named-block-nodes", flat=True)
                               if node["node-name"].startswith("#")}
        return self

    def leftovers(self):
        found = super().leftovers()
        found["nodes"] = [node for node in found["nodes"] if node not in self.template_nodes]
        return found

    def agent(self, timeout=60.0):
        """A connected GuestAgent; it waits (up to timeout) for a booting guest to start its agent. Close it."""
        return GuestAgent(self.agent_socket, timeout=timeout).connect()


def root_filesystem(image, path):
    """A raw copy, at path, of the root file system of a guest disk's image (qcow2, backing chain included)."""
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", "--image-opts",
                    "driver=raw,offset=%d,file.driver=qcow2,file.file.driver=file,file.file.filename=%s"
                    % (ROOT_FS_OFFSET, image), path], check=True)
    return path


def workload_files(image, scratch):
    """Offline, on a copy of a guest disk's image: (how many files fbg-workload logged, [those missing or changed]).

    The copy's journal is replayed first, as a mount would: in a crash-consistent copy, the journal may hold
    what the workload fsync'd.
    """
    copy = root_filesystem(image, os.path.join(scratch, "root.ext4"))
    replay = subprocess.run(["e2fsck", "-E", "journal_only", "-y", copy], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, check=False)
    assert replay.returncode in (0, 1), replay.stdout  # 1: the journal was replayed
    dump = os.path.join(scratch, "root")
    os.mkdir(dump)
    subprocess.run(["debugfs", "-R", "rdump /data %s" % dump, copy], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    log = os.path.join(dump, "data", "checksums.log")
    if not os.path.exists(log):
        return 0, []
    with open(log, "rb") as stream:
        lines = stream.read().split(b"\n")[:-1]  # a last line without its newline vouches for nothing
    changed = []
    for line in lines:
        digest, name = line.decode().split("  ", 1)
        path = os.path.join(dump, name.lstrip("/"))
        if not os.path.exists(path) or file_digest(path) != digest:
            changed.append(name)
    return len(lines), changed


def clean_filesystem(image, scratch):
    """(whether the journal needs recovery, e2fsck -fn's exit status) of the guest disk's root file system."""
    copy = root_filesystem(image, os.path.join(scratch, "clean-check.ext4"))
    header = subprocess.run(["dumpe2fs", "-h", copy], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            check=True).stdout
    features = next(line for line in header.splitlines() if line.startswith("Filesystem features:"))
    check = subprocess.run(["e2fsck", "-fn", copy], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           check=False)
    os.unlink(copy)
    return "needs_recovery" in features.split(), check.returncode


def file_digest(path):
    with open(path, "rb") as stream:
        return hashlib.sha256(stream.read()).hexdigest()
