import json
import os
import subprocess

import pytest

from support.processes import end_process
from support.qemu_vm import Vm
from support.ssh_fleet import SshFleet


@pytest.fixture
def vms(tmp_path, tmpfs):  # after tmpfs: VMs are killed before their scratch file systems are unmounted
    """Make VMs (kind: Vm, or GuestVm for a running guest) in this test's directory.

    Every one is killed by its PID at teardown, pass or fail.
    """
    started = []

    def make(disks, name="vm", start=True, prepare=None, kind=Vm, under=None, **options):
        workdir = (under or tmp_path) / name
        workdir.mkdir(exist_ok=True)
        vm = kind(str(workdir), disks, **options)
        started.append(vm)
        if prepare:
            prepare(vm)
        return vm.start() if start else vm

    yield make
    for vm in started:
        vm.kill()


@pytest.fixture(autouse=True)
def offline_servers(tmp_path):
    """The qemu-nbds that the modules forked for stopped VMs in this test, ended by their PIDs at teardown, pass or
    fail: those its backups' state records, and those only their pid files name (a start killed before recording)."""
    yield
    for pid in recorded_qemu_nbds(str(tmp_path)):
        end_process(pid)


def recorded_qemu_nbds(root):
    """PIDs of live qemu-nbd processes that state files under root name."""
    pids = set()
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            try:
                if name == "backup.json":
                    with open(path) as stream:
                        pids.update(server["owner"]["pid"] for server in json.load(stream).get("servers", []))
                elif name.startswith("nbd-") and name.endswith(".pid"):
                    with open(path) as stream:
                        pids.add(int(stream.read()))
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return [pid for pid in pids if is_qemu_nbd(pid)]


def is_qemu_nbd(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as stream:
            return os.path.basename(stream.read().split(b"\0")[0]) == b"qemu-nbd"
    except OSError:
        return False


@pytest.fixture
def scratch(tmp_path):
    path = tmp_path / "scratch"
    path.mkdir()
    return str(path)


@pytest.fixture
def tmpfs(tmp_path):
    """Mount small file systems (a tmpfs of a given size) in this test's directory; unmounted at teardown."""
    mounted = []

    def mount(name, size):
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (CI runs as root)")
        path = tmp_path / name
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s,mode=0700" % size, "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def libvirt_daemon(tmp_path, tmp_path_factory, tmpfs):  # after tmpfs: the daemons end before it is unmounted
    """Start (call it) a libvirtd and virtlogd of this test's own; both end by their PIDs at teardown, after the
    domains. Mount any tmpfs the domains use first: the daemons' namespace sees only what was mounted before."""
    from support.libvirt_daemon import LibvirtDaemon

    started = []

    def start(name="libvirt"):
        daemon = LibvirtDaemon(str(tmp_path / name), str(tmp_path_factory.getbasetemp() / "libvirt-cache"))
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def domains(tmp_path):
    """Define and start libvirt domains (kind: LibvirtDomain, or LibvirtGuestDomain for a booting guest) in this
    test's directory, on a daemon of libvirt_daemon."""
    from support.libvirt_daemon import LibvirtDomain

    def make(daemon, disks, name="dom", start=True, prepare=None, under=None, kind=LibvirtDomain, **options):
        workdir = (under or tmp_path) / name
        workdir.mkdir(exist_ok=True)
        domain = kind(str(workdir), disks, daemon, "fbt-%s-%s" % (name, os.getpid()), **options)
        if prepare:
            prepare(domain)
        return domain.start() if start else domain

    return make


@pytest.fixture
def ssh_fleet(tmp_path):
    """Hypervisors hv1 and hv2 and a backup host, each an sshd of this test's own on its own loopback address.

    Every sshd is ended by its PID, its sessions first, at teardown, pass or fail. Start VMs of a hypervisor with
    vms(..., under=ssh_fleet.vm_dirs["hv1"]).
    """
    if os.geteuid() != 0:
        pytest.skip("the fleet logs in as root through sshds of its own, which needs root (CI runs as root)")
    fleet = SshFleet(tmp_path)
    try:
        yield fleet.start()
    finally:
        fleet.stop()


@pytest.fixture(scope="session")
def fleet_certificates(tmp_path_factory):
    """The fleet's CA and certificates (hv1's server certificate for 127.0.0.2, the backup host's and an intruder's
    client certificates), and those of another CA, each made once per run by the fleet_ca playbook."""
    from support.certificates import FleetCertificates
    from support.fleet import assert_ok

    fleet = FleetCertificates(str(tmp_path_factory.mktemp("fleet-ca")))
    other = FleetCertificates(str(tmp_path_factory.mktemp("other-ca")))
    fleet.first_run = assert_ok(fleet.make())
    assert_ok(other.make())
    return fleet, other
