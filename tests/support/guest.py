"""A real guest for tests: the guest kit's Linux boots under TCG and takes commands on its serial console.

The line protocol (ping, overwrite, records, sync) is documented at the top of guest/build-kit.sh.
Nothing here sleeps: every wait reads console lines until the one it waits for, or fails with the
console's last lines.
"""

import functools
import os
import socket
import subprocess
import time

from support.paths import ROOT
from support.qemu_vm import Vm

BUILD_SCRIPT = os.path.join(ROOT, "guest", "build-kit.sh")
RECORD_SIZE = 4096


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
        return ["-machine", "q35,accel=tcg", "-m", "256",
                "-kernel", os.path.join(self.kit, "vmlinuz"), "-initrd", os.path.join(self.kit, "initramfs.gz"),
                "-append", "console=ttyS0 quiet panic=-1", "-no-reboot",
                "-chardev", "socket,id=serial,path=%s,server=on,wait=off" % self.serial_socket,
                "-serial", "chardev:serial"]

    def start(self):
        super().start()
        self.serial = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.serial.connect(self.serial_socket)
        return self

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
