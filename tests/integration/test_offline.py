"""Stopped VMs: backed up from their image files through qemu-nbd, checkpoints added offline, the chain kept
across offline and online runs; a VM that starts during its offline backup wins."""

import json
import os
import subprocess

import libvirt
import nbd

from support.flows import Backups, assert_servers_gone, marks, offline_record, restores_exactly
from support.modules import run_module
from support.qemu_vm import DiskSpec, MiB

from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.tls import listen_tcp
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.offline_export import end_server, serve_image
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.processes import process_start_time
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.qemu_img import image_bitmaps

TWO_DISKS = [DiskSpec("vda", size=32 * MiB), DiskSpec("vdb", size=16 * MiB)]


def test_a_stopped_vm_continues_its_chain_offline_and_online(vms, tmp_path):
    vm = vms(TWO_DISKS, prepare=lambda vm: vm.write("vda", 0, 4 * MiB, 0x11))
    flow = Backups(vm, str(tmp_path))
    points = [marks(vm)]
    repo = flow.full_into_new_repo(tmp_path)
    vm.write("vda", 8 * MiB, MiB, 0x21)
    vm.write("vdb", 0, MiB, 0x22)
    vm.quit()  # a clean shutdown: QEMU stores c1 and what it recorded

    # Offline: from the images fleetbackup recorded while the VM ran.
    info = flow.info()
    assert [c["name"] for c in info["disks"][0]["checkpoints"]] == ["c1"]
    assert info["disks"][0]["checkpoints"][0]["usable"] is True
    points.append(marks(vm))
    started = flow.start("b2", incremental="c1", checkpoint="c2")
    assert started.get("changed") is True, started
    backup = started["backup"]
    assert backup["offline"] is True and [d["mode"] for d in backup["disks"]] == ["incremental", "incremental"]
    assert backup["disks"][0]["dirty_bitmap"] == "qemu:dirty-bitmap:c1"
    assert all(image_bitmaps(vm.image(disk)) == ["c1", "c2"] for disk in vm.disks)
    assert flow.start("b2", incremental="c1", checkpoint="c2")["changed"] is False
    other = flow.start("b9")
    assert other.failed and "Backup b2" in other["msg"]
    copies = flow.copy_all(backup, repo, "b2", previous_prefix="b1")
    assert copies["vda"]["bytes_read"] == MiB and copies["vdb"]["bytes_read"] == MiB
    record = offline_record(flow)
    stopped = flow.stop("b2")
    assert stopped["changed"] is True and stopped["intact"] is True, stopped
    assert_servers_gone(record)
    assert flow.vm_state_files() == [] and flow.stop("b2")["changed"] is False

    # Running again: QEMU loads c2, added offline, and the chain goes on.
    vm.start()
    vm.write("vda", 16 * MiB, MiB, 0x31)
    points.append(marks(vm))
    online = flow.start("b3", incremental="c2", checkpoint="c3")["backup"]
    assert [d["mode"] for d in online["disks"]] == ["incremental", "incremental"]
    assert online["disks"][0]["dirty_bytes"] == MiB and online["disks"][1]["dirty_bytes"] == 0
    flow.copy_all(online, repo, "b3", previous_prefix="b2")
    flow.stop("b3")
    for prefix, point in zip(("b1", "b2", "b3"), points):
        for disk in vm.disks:
            assert restores_exactly(vm, tmp_path, disk, os.path.join(repo, "%s.%s.qcow2" % (prefix, disk)), point[disk])
    flow.assert_nothing_left()


def test_a_vm_started_during_its_offline_backup_wins_and_the_backup_is_not_intact(vms, tmp_path):
    vm = vms(TWO_DISKS, prepare=lambda vm: vm.write("vda", 0, MiB, 0x41))
    flow = Backups(vm, str(tmp_path))
    flow.info()  # fleetbackup sees the VM's disks while it runs
    vm.quit()
    backup = flow.start("b1", checkpoint="c1")["backup"]
    record = offline_record(flow)
    vm.start()  # qemu-nbd holds no lock: the VM starts and writes
    vm.write("vda", 0, MiB, 0x42)
    assert vm.status() == "running"
    stopped = flow.stop("b1", discard_checkpoint=True)
    assert stopped["intact"] is False and "the VM won" in json.dumps(stopped["warnings"]), stopped
    assert_servers_gone(record)
    assert vm.named_bitmaps("vda") == {} and flow.vm_state_files() == []
    assert backup["disks"][0]["url"].startswith("nbd+unix:///b1/")
    assert vm.status() == "running"


def test_a_start_stopped_part_way_is_undone_by_stop(vms, tmp_path):
    vm = vms(TWO_DISKS)
    flow = Backups(vm, str(tmp_path))
    flow.info()
    vm.quit()
    # The module is killed (SIGKILL) once the checkpoints are added, as qemu-nbd would start.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "qemu-nbd").write_text("#!/bin/sh\nkill -KILL $PPID\n")
    (fake / "qemu-nbd").chmod(0o755)
    killed = run_module_with_path("qemu_backup_start", str(fake), **dict(
        vm.connection_args(), state_dir=flow.state_dir, backup_id="b1", checkpoint="c1"))
    assert killed.returncode == -9
    record = offline_record(flow)
    assert record["added"] == [vm.image("vda"), vm.image("vdb")] and record["servers"] == []
    assert all(image_bitmaps(vm.image(disk)) == ["c1"] for disk in vm.disks)
    partly = flow.start("b1", checkpoint="c1")
    assert partly.failed and "only partly there" in partly["msg"]
    stopped = flow.stop("b1", discard_checkpoint=True)
    assert stopped["changed"] is True and stopped["removed"]["checkpoint"] == "c1"
    assert all(image_bitmaps(vm.image(disk)) == [] for disk in vm.disks) and flow.vm_state_files() == []

    # Killed once the first disk's qemu-nbd forked and listens, before the start recorded it: the stop finds it by
    # the pid file it wrote in our directory and its command line, and ends it.
    (fake / "qemu-nbd").write_text('#!/bin/sh\n/usr/bin/qemu-nbd "$@" && kill -KILL $PPID\n')
    killed = run_module_with_path("qemu_backup_start", str(fake), **dict(
        vm.connection_args(), state_dir=flow.state_dir, backup_id="b3", checkpoint="c3"))
    assert killed.returncode == -9
    record = offline_record(flow)
    assert record["servers"] == []
    (key,) = os.listdir(os.path.join(flow.state_dir, "vms"))
    pidfile = os.path.join(flow.state_dir, "vms", key, "nbd-0.pid")
    with open(pidfile) as stream:
        orphan = int(stream.read())
    assert process_start_time(orphan) is not None  # serving vda, recorded nowhere but in its pid file
    stopped = flow.stop("b3", discard_checkpoint=True)
    assert stopped["changed"] is True and stopped["removed"]["nbd_server"] is True, stopped
    assert process_start_time(orphan) is None and flow.vm_state_files() == []
    assert all(image_bitmaps(vm.image(disk)) == [] for disk in vm.disks)

    # A qemu-nbd that fails for the second disk: the start removes what it made, and names the failure.
    (fake / "qemu-nbd").write_text('#!/bin/sh\ncase "$*" in *vdb*) echo "no room" >&2; exit 1;; esac\n'
                                   'exec /usr/bin/qemu-nbd "$@"\n')
    failed = run_module_with_path("qemu_backup_start", str(fake), **dict(
        vm.connection_args(), state_dir=flow.state_dir, backup_id="b2", checkpoint="c2"))
    result = json.loads(failed.stdout)
    assert result["failed"] and "no room" in result["msg"] and "Everything it had created was removed" in result["msg"]
    assert all(image_bitmaps(vm.image(disk)) == [] for disk in vm.disks) and flow.vm_state_files() == []


def run_module_with_path(name, bindir, **args):
    """A module run with bindir first on PATH, to put a failing tool in its way."""
    import sys
    from support.paths import COLLECTIONS
    return subprocess.run([sys.executable, "-m", "ansible_collections.fleetbackup.qemu.plugins.modules." + name],
                          input=json.dumps({"ANSIBLE_MODULE_ARGS": args}).encode(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=COLLECTIONS,
                                                           PATH=bindir + ":" + os.environ["PATH"]), check=False)


def test_a_stopped_vm_is_refused_clearly_when_its_disks_are_unknown_or_swapped(vms, tmp_path):
    vm = vms([DiskSpec("vda", size=16 * MiB)])
    flow = Backups(vm, str(tmp_path))
    vm.quit()
    unknown = flow.start("b1")
    assert unknown.failed and ("does not exist" in unknown["msg"] or "Nothing listens" in unknown["msg"])
    vm.start()
    flow.info()
    vm.quit()
    os.rename(vm.image("vda"), vm.image("vda") + ".old")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", vm.image("vda"), str(16 * MiB)], check=True)
    swapped = flow.start("b1")
    assert swapped.failed and "is not the file" in swapped["msg"] and flow.vm_state_files() == []


def test_a_shut_off_libvirt_domain_is_backed_up_offline_and_its_chain_goes_on(libvirt_daemon, domains, tmp_path):
    vm = domains(libvirt_daemon(), TWO_DISKS, prepare=lambda vm: vm.write("vda", 0, 2 * MiB, 0x51))
    flow = Backups(vm, str(tmp_path))
    repo = flow.full_into_new_repo(tmp_path)
    vm.write("vda", 4 * MiB, MiB, 0x52)
    vm.destroy()
    point = marks(vm)
    offline = flow.start("b2", incremental="c1", checkpoint="c2")
    assert not offline.failed, offline["msg"]
    offline = offline["backup"]
    assert offline["offline"] is True and [d["mode"] for d in offline["disks"]] == ["incremental", "incremental"]
    assert vm.checkpoints() == ["c1", "c2"]  # libvirt knows the checkpoint added offline
    flow.copy_all(offline, repo, "b2", previous_prefix="b1")
    assert flow.stop("b2")["intact"] is True
    for disk in vm.disks:
        assert restores_exactly(vm, tmp_path, disk, os.path.join(repo, "b2.%s.qcow2" % disk), point[disk])

    vm.start()
    vm.write("vdb", 0, MiB, 0x53)
    point = marks(vm)
    online = flow.start("b3", incremental="c2")["backup"]
    assert [d["mode"] for d in online["disks"]] == ["incremental", "incremental"]
    assert online["disks"][1]["dirty_bytes"] == MiB
    flow.copy_all(online, repo, "b3", previous_prefix="b2")
    flow.stop("b3")
    assert vm.domain.jobStats().get("operation") != libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP
    for disk in vm.disks:
        assert restores_exactly(vm, tmp_path, disk, os.path.join(repo, "b3.%s.qcow2" % disk), point[disk])
    assert run_module("qemu_backup_info", **dict(vm.connection_args(), state_dir=flow.state_dir))["disks"]


def test_qemu_nbd_gets_its_listener_whatever_descriptor_it_has(vms, tmp_path):
    """Socket activation hands qemu-nbd descriptor 3 whichever descriptor the module's listener got (the shell of
    Debian, dash, takes none above 9 in a redirection)."""
    vm = vms([DiskSpec("vda", size=16 * MiB)], prepare=lambda vm: vm.write("vda", 0, MiB, 0x61))
    vm.quit()
    taken = [os.open(os.devnull, os.O_RDONLY) for _index in range(12)]
    listener = listen_tcp("127.0.0.1", 0)
    pidfile = str(tmp_path / "nbd.pid")
    try:
        assert listener.fileno() > 9
        disk = dict(disk="vda", socket=None, export="e", mode="full", format="qcow2", filename=vm.image("vda"))
        server = serve_image(disk, None, pidfile, listener)
        url = "nbd://127.0.0.1:%d/e" % listener.getsockname()[1]
    finally:
        listener.close()
        for fd in taken:
            os.close(fd)
    try:
        handle = nbd.NBD()
        handle.connect_uri(url)
        assert handle.pread(4096, 0) == b"\x61" * 4096
        handle.shutdown()
    finally:
        end_server(server["owner"])
    assert process_start_time(server["owner"]["pid"]) is None
