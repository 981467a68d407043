"""A real libvirtd (and virtlogd) of the test's own, for qemu:///system, with no systemd; and domains on it.

Root's libvirtd keeps its state in fixed paths (/etc/libvirt, /run/libvirt, /var/lib/libvirt, ...), so each test's
daemons run in a mount namespace of their own, where those paths are bind mounts of the test's directory; clients
reach them at qemu:///system?socket=<dir>/sock/libvirt-sock. Inside the namespace /dev/kvm is masked by an empty
file: libvirt would otherwise probe QEMU's capabilities again on every call (KVM is root-only here), taking seconds.
The capabilities cache lives in the session's directory, so only the first daemon of a run probes.

Domains are TCG q35 machines running the one-instruction halt firmware, with qcow2 disks on virtio. The test
writes as the guest through the monitor (HMP qemu-io, which taints the domain: tests only); the modules never do.
A LibvirtGuestDomain boots the guest kit's disk instead, with a serial console and a guest agent libvirt talks to.
"""

import os
import shutil
import signal
import subprocess
import time
from xml.etree import ElementTree

import libvirt
import libvirt_qemu

from support.guest import GuestVm, kit_path
from support.processes import end_process, process_alive
from support.qemu_vm import DiskSpec, Vm, halt_firmware, virtual_size

MOUNTED = ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt")
NAMESPACE_SCRIPT = r'''
set -eu
root=$1; cache=$2
mount --bind "$root/etc" /etc/libvirt
mount --bind "$root/run" /run/libvirt
mount --bind "$root/lib" /var/lib/libvirt
mount --bind "$cache" /var/cache/libvirt
mount --bind "$root/log" /var/log/libvirt
if [ -e /dev/kvm ]; then : > "$root/kvm-mask"; chmod 0600 "$root/kvm-mask"; mount --bind "$root/kvm-mask" /dev/kvm; fi
virtlogd -d -f "$root/conf/virtlogd.conf" -p "$root/sock/virtlogd.pid"
exec libvirtd -d -f "$root/conf/libvirtd.conf" -p "$root/sock/libvirtd.pid"
'''
READY_TIMEOUT = 120  # a cold capabilities cache: QEMU probed twice, a few seconds each on 2 cores


def silence_libvirt():
    """libvirt prints every error on stderr unless told otherwise; the tests read errors from exceptions."""
    libvirt.registerErrorHandler(lambda context, error: None, None)


def end_daemon(pid, timeout=30):
    """SIGTERM pid (not our child) and wait until it is gone or a zombie."""
    end_process(pid, signal.SIGTERM, timeout)
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() > deadline:
            end_process(pid, signal.SIGKILL, timeout)
            break
        time.sleep(0.02)


def open_path(path):
    """Let QEMU's user (libvirt-qemu) through every directory from / to path, as a hypervisor's image dirs are."""
    path = os.path.abspath(path)
    while path != "/":
        os.chmod(path, os.stat(path).st_mode | 0o011)
        path = os.path.dirname(path)


class LibvirtDaemon:
    def __init__(self, root, cache):
        self.root = root
        self.cache = cache
        self.uri = "qemu:///system?socket=%s/sock/libvirt-sock" % root
        self.pids = {}
        self.connection = None

    def _write(self, relative, text):
        with open(os.path.join(self.root, relative), "w") as stream:
            stream.write(text)

    def start(self):
        for directory in ("etc", "run", "lib", "log", "sock", "conf"):
            os.makedirs(os.path.join(self.root, directory), exist_ok=True)
        os.makedirs(self.cache, exist_ok=True)
        for target in MOUNTED:
            os.makedirs(target, exist_ok=True)  # bind-mount targets must exist
        self._write("conf/libvirtd.conf", 'unix_sock_dir = "%s/sock"\nunix_sock_group = "root"\n'
                    'unix_sock_rw_perms = "0770"\nauth_unix_rw = "none"\nauth_unix_ro = "none"\n'
                    'log_outputs = "3:file:%s/log/libvirtd.log"\n' % (self.root, self.root))
        self._write("conf/virtlogd.conf", 'log_outputs = "3:file:%s/log/virtlogd.log"\n' % self.root)
        # No host cgroups (two daemons' domains would share them); no per-VM /dev, which cannot take the kvm mask.
        self._write("etc/qemu.conf", "cgroup_controllers = [ ]\nnamespaces = [ ]\n")
        subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", NAMESPACE_SCRIPT, "sh",
                        self.root, self.cache], check=True)
        for name in ("virtlogd", "libvirtd"):
            with open(os.path.join(self.root, "sock", "%s.pid" % name)) as stream:
                self.pids[name] = int(stream.read())
        self._wait_ready()
        return self

    def _wait_ready(self):
        """libvirtd -d returns before its QEMU driver is up, and exits 0 even when that fails: ask it."""
        silence_libvirt()
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if not process_alive(self.pids["libvirtd"]):
                raise AssertionError("libvirtd died at start: %s" % self.log_tail())
            try:
                connection = libvirt.open(self.uri)
                connection.getVersion()  # needs the QEMU driver, so it waits for its capabilities
                self.connection = connection
                return
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def log_tail(self, lines=10):
        try:
            with open(os.path.join(self.root, "log", "libvirtd.log"), errors="replace") as stream:
                return "".join(stream.readlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self):
        """Domains first (QEMU outlives libvirtd), then libvirtd, then virtlogd, each by its PID."""
        if self.connection is not None:
            for domain in self.connection.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                pid = domain_pid(self, domain.name())
                domain.destroy()
                if pid:
                    end_process(pid, None)
            self.connection.close()
            self.connection = None
        for name in ("libvirtd", "virtlogd"):
            if name in self.pids:
                end_daemon(self.pids.pop(name))

    def qemu_log(self, name):
        with open(os.path.join(self.root, "log", "qemu", "%s.log" % name), errors="replace") as stream:
            return stream.read()


def domain_pid(daemon, name):
    try:
        with open(os.path.join(daemon.root, "run", "qemu", "%s.pid" % name)) as stream:
            return int(stream.read())
    except (FileNotFoundError, ValueError):
        return None


def domain_xml(name, firmware, disks, nvram=None, memory_mib=64, serial_socket=None, agent_channel=False):
    """A TCG q35 domain. firmware None: SeaBIOS, which boots the first disk. serial_socket: the serial console, a
    unix socket that QEMU listens on. agent_channel: org.qemu.guest_agent.0, whose socket libvirt makes and holds."""
    root = ElementTree.Element("domain", type="qemu")
    ElementTree.SubElement(root, "name").text = name
    ElementTree.SubElement(root, "memory", unit="MiB").text = str(memory_mib)
    ElementTree.SubElement(root, "vcpu").text = "1"
    os_element = ElementTree.SubElement(root, "os")
    ElementTree.SubElement(os_element, "type", arch="x86_64", machine="q35").text = "hvm"
    if nvram:  # UEFI-like: the firmware read-only on the first flash, a variable store on the second
        ElementTree.SubElement(os_element, "loader", readonly="yes", type="pflash").text = firmware
        ElementTree.SubElement(os_element, "nvram").text = nvram
    elif firmware:
        ElementTree.SubElement(os_element, "loader", type="rom").text = firmware
    features = ElementTree.SubElement(root, "features")
    ElementTree.SubElement(features, "acpi")
    devices = ElementTree.SubElement(root, "devices")
    ElementTree.SubElement(devices, "emulator").text = "/usr/bin/qemu-system-x86_64"
    for disk_id, image, image_format in disks:
        disk = ElementTree.SubElement(devices, "disk", type="file", device="disk")
        ElementTree.SubElement(disk, "driver", name="qemu", type=image_format)
        ElementTree.SubElement(disk, "source", file=image)
        ElementTree.SubElement(disk, "target", dev=disk_id, bus="virtio")
        ElementTree.SubElement(disk, "alias", name="ua-" + disk_id)  # a user alias: the qdev id is ua-<target>
    if serial_socket:
        serial = ElementTree.SubElement(devices, "serial", type="unix")
        ElementTree.SubElement(serial, "source", mode="bind", path=serial_socket)
    if agent_channel:
        channel = ElementTree.SubElement(devices, "channel", type="unix")
        ElementTree.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    ElementTree.SubElement(devices, "controller", type="usb", model="none")
    ElementTree.SubElement(devices, "memballoon", model="none")
    return ElementTree.tostring(root, encoding="unicode")


class LibvirtDomain(Vm):
    """A Vm whose QEMU libvirt runs: the same disks, write log and expected images; writes through libvirt's monitor.

    Disk ids are the targets (vda, vdb).
    """

    def __init__(self, workdir, disks, daemon, name, nvram=False):
        super().__init__(workdir, disks)
        self.daemon = daemon
        self.name = name
        self.nvram = os.path.join(workdir, "nvram.fd") if nvram else None
        if nvram:
            with open(self.nvram, "wb") as stream:
                stream.write(os.urandom(64 * 1024))
        open_path(workdir)
        self.domain = daemon.connection.defineXML(self.definition())

    def definition(self):
        return domain_xml(self.name, halt_firmware(self.workdir), self.disk_sources(), self.nvram)

    def disk_sources(self):
        return [(d, self.image(d), self.disks[d].format) for d in self.disks]

    @property
    def qemu_dir(self):
        """Short: the starts' sockets go three levels below it, and a socket path has 107 bytes."""
        return os.path.join(os.path.dirname(self.workdir), "q")

    def connection_args(self):
        return dict(domain=self.name, libvirt_uri=self.daemon.uri, qemu_dir=self.qemu_dir)

    @property
    def uuid(self):
        return self.domain.UUIDString()

    def start(self):
        self.domain.create()
        self.pid = domain_pid(self.daemon, self.name)
        return self

    def qmp(self, command, **arguments):
        raise AssertionError("a libvirt domain's monitor is libvirt's: ask libvirt")

    def _qdev_backend(self, disk_id):
        return "ua-%s/virtio-backend" % disk_id

    def _apply(self, disk_id, io_command):
        if self.pid is None:
            super()._apply(disk_id, io_command)
            return
        # HMP answers nothing whether the write worked or not; qemu-io tells QEMU's stdout, the domain's log.
        log = os.path.join(self.daemon.root, "log", "qemu", "%s.log" % self.name)
        before = os.path.getsize(log)
        output = libvirt_qemu.qemuMonitorCommand(self.domain, 'qemu-io -d %s "%s"' % (
            self._qdev_backend(disk_id), io_command), libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        with open(log, errors="replace") as stream:
            stream.seek(before)
            told = stream.read()
        if output.strip() or "failed" in told:
            raise AssertionError("qemu-io %r failed: %s %s" % (io_command, output, told))
        self.writes[disk_id].append(io_command)

    def flushed_image(self, disk_id):
        if self.pid is not None:
            libvirt_qemu.qemuMonitorCommand(self.domain, 'qemu-io -d %s "flush"' % self._qdev_backend(disk_id),
                                            libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        return self.image(disk_id)

    def qmp_query(self, command):
        """A read-only QMP query through libvirt (taints the domain; tests only)."""
        import json
        return json.loads(libvirt_qemu.qemuMonitorCommand(self.domain, json.dumps(dict(execute=command)), 0))["return"]

    def leftovers(self):
        """What a backup adds, as libvirt and QEMU tell: a job, checkpoints of fb-, exports, nodes, bitmaps."""
        job = self.domain.jobStats() if self.domain.isActive() else {}
        left = dict(job=job.get("operation") == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP)
        if self.domain.isActive():
            left.update(exports=self.qmp_query("query-block-exports"), jobs=self.qmp_query("query-jobs"),
                        bitmaps=sorted(b["name"] for node in self.qmp_query("query-named-block-nodes")
                                       for b in node.get("dirty-bitmaps", []) if b.get("name", "").startswith("fb-")))
        return left

    def define_again_without_checkpoints(self):
        """Undefine the domain with its checkpoints' metadata and define it again, as after a libvirtd reinstall;
        the bitmaps stay in the images. It runs again afterwards."""
        xml = self.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        self.destroy()
        self.domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                                  | libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM)
        self.domain = self.daemon.connection.defineXML(xml)
        return self.start()

    def checkpoints(self):
        return sorted(checkpoint.getName() for checkpoint in self.domain.listAllCheckpoints(0))

    def destroy(self):
        """virsh destroy: SIGTERM, so QEMU stores its persistent bitmaps on the way out."""
        pid = self.pid
        self.domain.destroy()
        if pid:
            end_process(pid, None)
        self._forget()

    def kill(self):
        """SIGKILL of QEMU by its PID, as a crash would: no bitmap is stored."""
        if self.pid is None:
            return
        end_process(self.pid)
        deadline = time.monotonic() + 30
        while self.domain.isActive():  # libvirt notices the monitor's EOF
            assert time.monotonic() < deadline, "libvirt did not notice that QEMU died"
            time.sleep(0.02)
        self._forget()

    def quit(self):
        self.destroy()

    def tainted(self):
        """The taints libvirt wrote in the domain's log ("Domain id=1 is tainted: custom-monitor"), e.g.
        custom-monitor (a monitor command passed through), custom-ga-command (an agent command passed through)."""
        return [line.split(" is tainted: ", 1)[1].split()[0] for line in self.daemon.qemu_log(self.name).splitlines()
                if " is tainted: " in line]


class LibvirtGuestDomain(LibvirtDomain, GuestVm):
    """A LibvirtDomain that boots the guest kit's disk through SeaBIOS under TCG, as BootedGuestVm does, with its
    serial console (the line protocol of guest/build-kit.sh) and the agent's channel, which libvirt holds.

    vda is a copy of the kit's disk.qcow2 in the domain's directory: libvirt chowns a domain's images, backing
    files included, to libvirt-qemu, and the kit's image is shared. The disks given follow it (vdb, ...).
    """

    def __init__(self, workdir, disks, daemon, name):
        template = os.path.join(kit_path(), "disk.qcow2")
        root = DiskSpec("vda", size=virtual_size(template))
        shutil.copyfile(template, os.path.join(workdir, "vda.qcow2"))
        super().__init__(workdir, [root, *disks], daemon, name)

    def definition(self):
        return domain_xml(self.name, None, self.disk_sources(), memory_mib=256, serial_socket=self.serial_socket,
                          agent_channel=True)

    def start(self):
        super().start()
        self.connect_console()
        return self

    def wait_agent_connected(self, timeout=60.0):
        """Wait until libvirt says that the guest opened its agent's channel (the live XML's channel state)."""
        deadline = time.monotonic() + timeout
        while True:
            live = ElementTree.fromstring(self.domain.XMLDesc(0))
            if [target.get("state") for target in live.findall("./devices/channel/target")] == ["connected"]:
                return
            if time.monotonic() > deadline:
                raise self._failure("libvirt did not see the guest agent connect in %d s" % timeout)
            time.sleep(0.05)
