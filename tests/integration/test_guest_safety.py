"""The guest always wins: a backup may break, the VM never does. One point in time for all disks; exact pauses."""

import json
import os
import signal
import subprocess
import time

from support.fleet import Fleet, assert_clean, assert_ok
from support.flows import Backups, used_bytes
from support.guest import BootedGuestVm, GuestVm, RECORD_SIZE, clean_filesystem, record_block, record_location, \
    workload_files
from support.modules import run_module
from support.held import INTERRUPTED, hold_in_a_child
from support.qemu_vm import DiskSpec, MiB, same

from ansible_collections.fleetbackup.qemu.plugins.module_utils._views import fleecing as qmp_fleecing
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.checkpoints import CheckpointRegistry
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.guest_freeze import GuestFreeze
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.client import QmpClient
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.pause import VcpuPause
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.identity import qmp_vm_key
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.reach import open_qmp_vm
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.drill import FILESYSTEM_ERRORS
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.state import VmState

BROKEN = "point-in-time view of disk vda broke while it was copied"


def new_events(vm):
    """The names of the events that the test monitor received since the last call."""
    return {event["event"] for event in vm.monitor.get_events()}


def assert_image_reads(image, image_format, pattern, length):
    """Out of band, after QEMU let go: the guest's writes really landed (HMP qemu-io hides failed writes)."""
    check = subprocess.run(["qemu-io", "-f", image_format, "-r", "-c", "read -P 0x%02x 0 %d" % (pattern, length),
                            image], stdout=subprocess.PIPE, text=True, check=True)
    assert "read %d/%d bytes" % (length, length) in check.stdout, check.stdout


def test_a_full_scratch_breaks_the_backup_never_the_guest(vms, tmp_path, tmpfs):
    def prepare(vm):
        vm.write("vda", 0, 64 * MiB, 0x5A)
        vm.write("vdb", 0, 4 * MiB, 0x5B)

    vm = vms([DiskSpec("vda", size=96 * MiB), DiskSpec("vdb", iothread=True)], prepare=prepare)
    scratch = str(tmpfs("scratch8m", "8m"))
    flow = Backups(vm, str(tmp_path))
    started = flow.start("b1", scratch_dir=scratch, scratch_size="4M")["backup"]
    assert vm.status() == "running" and started["pause"] > 0 and new_events(vm) == {"STOP", "RESUME"}
    # The guest overwrites 64 MiB of data that existed at the start: eight times what the scratch space holds.
    for step in range(64):
        vm.write("vda", step * MiB, MiB, 0xA7)
    assert vm.status() == "running" and not new_events(vm) & {"STOP", "BLOCK_IO_ERROR"}

    vda = next(d for d in started["disks"] if d["disk"] == "vda")
    copied = run_module("qemu_backup_copy", src=vda["url"], dest=str(tmp_path / "vda.qcow2"))
    assert copied.failed and BROKEN in copied["msg"] and scratch in copied["msg"] and "cbw_timeout" in copied["msg"]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".vda.qcow2")]
    stopped = flow.stop("b1")
    assert stopped["changed"] is True and stopped["intact"] is False
    flow.assert_nothing_left()  # devices back on their own nodes, the iothread disk too
    assert vm.status() == "running"
    vm.quit()
    assert_image_reads(vm.image("vda"), "qcow2", 0xA7, 64 * MiB)


def test_a_backup_never_takes_space_from_the_vms_on_its_file_system(vms, tmp_path, tmpfs):
    shared = tmpfs("shared", "64m")  # the VM's disk and the scratch space on one small file system
    vm = vms([DiskSpec("vda", size=48 * MiB)], under=shared, prepare=lambda vm: vm.write("vda", 0, 24 * MiB, 0x61))
    scratch = shared / "scratch"
    scratch.mkdir(mode=0o700)
    flow = Backups(vm, str(tmp_path))
    flow.start("b1", scratch_dir=str(scratch), scratch_size="8M")
    reserved = used_bytes(shared)
    # The guest overwrites three times the scratch room, then fills the rest of its disk with new data, for
    # which the file system has just enough room: the backup must not have taken any of it.
    for step in range(24):
        vm.write("vda", step * MiB, MiB, 0x62)
    assert used_bytes(shared) == reserved  # the scratch image never grew beyond its room
    for step in range(24, 48):
        vm.write("vda", step * MiB, MiB, 0x63)
    assert vm.status() == "running" and flow.stop("b1")["intact"] is False
    flow.assert_nothing_left()
    vm.quit()
    assert_image_reads(vm.image("vda"), "qcow2", 0x62, 24 * MiB)
    check = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x63 24M 24M", vm.image("vda")],
                           stdout=subprocess.PIPE, text=True, check=True)
    assert "read 25165824/25165824 bytes" in check.stdout, check.stdout


def test_the_pause_is_only_for_a_running_vm_and_the_run_state_comes_back(vms, tmp_path):
    running = vms([DiskSpec("vda"), DiskSpec("vdb")], name="running")
    flow = Backups(running, str(tmp_path / "running"))
    backup = flow.start("b1")["backup"]
    assert 0 < backup["pause"] < 1 and running.status() == "running"
    assert new_events(running) == {"STOP", "RESUME"}
    flow.stop("b1")
    assert running.status() == "running"

    running.qmp("stop")  # paused by its owner: no guest write can come, so no pause, and it stays paused
    assert flow.start("b2")["backup"]["pause"] is None and running.status() == "paused"
    flow.stop("b2")
    assert running.status() == "paused"

    prelaunch = vms([DiskSpec("vda")], name="prelaunch", paused=True)
    flow = Backups(prelaunch, str(tmp_path / "prelaunch"))
    assert flow.start("b1")["backup"]["pause"] is None and prelaunch.status() == "prelaunch"
    flow.stop("b1")
    assert prelaunch.status() == "prelaunch"
    flow.assert_nothing_left()
    # The same id again: QEMU keeps the first scratch fdset until the VM runs, and must not be confused by it.
    assert flow.start("b1")["changed"] is True
    stopped = flow.stop("b1")
    assert stopped["changed"] is True and stopped["removed"]["devices"] == ["/machine/peripheral/vda/virtio-backend"]
    assert flow.stop("b1")["changed"] is False and prelaunch.status() == "prelaunch"
    flow.assert_nothing_left()


def pause_in_a_child(vm, state_dir, signum):
    """Fork a run of ours that pauses the VM and sends itself signum in the pause window; its wait status."""
    def pause():
        qmp = QmpClient(vm.qmp_socket)
        qmp.connect()
        return VcpuPause(qmp, VmState(state_dir, qmp_vm_key(vm.qmp_socket), "test VM"), "dying")

    return hold_in_a_child(pause, signum)


def test_a_run_killed_in_the_pause_window_never_leaves_the_vm_paused(vms, tmp_path):
    vm = vms([DiskSpec("vda")])
    flow = Backups(vm, str(tmp_path))
    paused_record = os.path.join(flow.state_dir, "vms", qmp_vm_key(vm.qmp_socket), "paused.json")

    # SIGTERM and SIGINT wait for the cont, then become an error that rolls the start back.
    for signum in (signal.SIGTERM, signal.SIGINT):
        status = pause_in_a_child(vm, flow.state_dir, signum)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == INTERRUPTED
        assert vm.status() == "running" and not os.path.exists(paused_record)

    # SIGKILL cannot wait: the record says the pause was ours, and the next info resumes the VM.
    status = pause_in_a_child(vm, flow.state_dir, signal.SIGKILL)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert vm.status() == "paused" and os.path.exists(paused_record)
    info = flow.info()
    assert info["changed"] is True and "died while it had the vCPUs paused" in json.dumps(info["warnings"])
    assert vm.status() == "running" and not os.path.exists(paused_record)

    # Only such a VM: one that its owner paused stays paused through info, start and stop.
    vm.qmp("stop")
    assert flow.info()["changed"] is False
    flow.start("b1")
    flow.stop("b1")
    assert vm.status() == "paused"


def records_in(image, image_format, disk):
    """The indexes of the guest's numbered records that a disk image (or backup image) of `disk` holds."""
    raw = image + ".records.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", image_format, "-O", "raw", image, raw], check=True)
    found = set()
    with open(raw, "rb") as stream:
        data = stream.read()
    os.unlink(raw)
    for offset in range(0, len(data), RECORD_SIZE):
        block = data[offset:offset + RECORD_SIZE]
        if block.startswith(b"REC "):
            index = int(block[4:12])
            assert block == record_block(index) and record_location(index) == (disk, offset), (disk, offset)
            found.add(index)
    return found


def backup_records(flow, vm, backup, tmp_path, name):
    """Copy both disks of a running backup, stop it; the records the backups hold, and the records on the disks."""
    found = set()
    for disk in backup["disks"]:
        dest = str(tmp_path / ("%s.%s.qcow2" % (name, disk["disk"])))
        assert not run_module("qemu_backup_copy", src=disk["url"], dest=dest).failed
        found |= records_in(dest, "qcow2", disk["disk"])
    assert flow.stop(backup["id"])["intact"] is True
    live = records_in(vm.image("vda"), "raw", "vda") | records_in(vm.image("vdb"), "raw", "vdb")
    return found, live


def is_prefix(records):
    return records == set(range(len(records)))


class NoPause:
    """The test-only variant: the filters go in while the vCPUs run."""

    def __init__(self, qmp, state, backup_id):
        self.seconds = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass


def start_without_pause(vm, flow, backup_id, monkeypatch, delay):
    """Start a backup in this process with the vCPUs running and `delay` seconds between the disks' filters."""
    switch = qmp_fleecing.set_drive

    def slowly(qmp, qdev, node):
        switch(qmp, qdev, node)
        time.sleep(delay)  # widens the window between the two disks' points in time, on purpose

    monkeypatch.setattr(qmp_fleecing, "set_drive", slowly)
    registry = CheckpointRegistry(os.path.join(flow.state_dir, "checkpoints"))
    request = dict(disks=None, checkpoint=None, incremental=None, fallback_to_full=False, nbd_socket=None,
                   cbw_timeout=10, scratch_size="0", scratch_dir=flow.scratch, freeze="never",
                   guest_agent_socket=None, freeze_timeout=10)
    try:
        with open_qmp_vm(vm.qmp_socket, 10, flow.state_dir, registry) as connection:
            view = qmp_fleecing.FleecingView(connection)
            view.pause = NoPause
            plan = view.plan(backup_id, request)
            return view.create(plan, GuestFreeze(connection.state, backup_id, "never", None))["result"]
    finally:
        monkeypatch.setattr(qmp_fleecing, "set_drive", switch)


def test_writes_racing_the_start_on_two_disks_give_one_point_in_time(vms, tmp_path, monkeypatch):
    vm = vms([DiskSpec("vda", format="raw"), DiskSpec("vdb", format="raw")], kind=GuestVm)
    assert vm.wait_ready() == ["vda", "vdb"]
    vm.send("records 1000000")
    vm.wait_line("FBG RECORDS STARTED")
    flow = Backups(vm, str(tmp_path))

    for attempt in range(3):
        backup = flow.start("real%d" % attempt)["backup"]
        assert backup["pause"] > 0
        found, live = backup_records(flow, vm, backup, tmp_path, "real%d" % attempt)
        # Records landed before the point in time and after it, and the backups hold exactly a prefix.
        assert found and max(live) > max(found) and is_prefix(found), sorted(found)[-20:]

    # The same start with the vCPUs running and a delay between the disks mixes two points in time.
    mixed = 0
    for attempt in range(3):
        backup = start_without_pause(vm, flow, "racy%d" % attempt, monkeypatch, delay=0.3)
        found, live = backup_records(flow, vm, backup, tmp_path, "racy%d" % attempt)
        assert found and max(live) > max(found)
        mixed += not is_prefix(found)
        if mixed:
            break
    assert mixed, "the test could not tell one point in time from two"
    flow.assert_nothing_left()
    assert vm.status() == "running"


def assert_only_the_backup_broke(vm, flow, backup, scratch, tmp_path):
    """The guest's writes broke backup b1's view and nothing else: the VM ran on, the copy fails naming the scratch
    directory, the stop says the view broke, and nothing is left."""
    assert vm.status() == "running" and not new_events(vm) & {"STOP", "BLOCK_IO_ERROR"}
    copied = run_module("qemu_backup_copy", src=backup["disks"][0]["url"], dest=str(tmp_path / "vda.qcow2"))
    assert copied.failed and BROKEN in copied["msg"] and scratch in copied["msg"]
    stopped = flow.stop("b1")
    assert stopped["intact"] is False and vm.status() == "running"
    flow.assert_nothing_left()


def test_a_real_guest_overwriting_more_than_the_scratch_holds_keeps_running(vms, tmp_path, tmpfs):
    vm = vms([DiskSpec("vda", size=320 * MiB)], kind=GuestVm,
             prepare=lambda vm: vm.write("vda", 0, 256 * MiB, 0x11))
    assert vm.wait_ready() == ["vda"]
    scratch = str(tmpfs("scratch48m", "48m"))
    flow = Backups(vm, str(tmp_path))
    backup = flow.start("b1", scratch_dir=scratch, scratch_size="1M")["backup"]
    new_events(vm)
    # The guest's own virtio-blk driver overwrites 256 MiB with O_DIRECT while the backup runs.
    assert vm.run("overwrite vda 256 170", timeout=300) == ["0", str(256 * MiB)]
    assert_only_the_backup_broke(vm, flow, backup, scratch, tmp_path)
    assert vm.run("sync") == ["0"]
    vm.quit()
    assert_image_reads(vm.image("vda"), "qcow2", 170, 256 * MiB)


def test_the_role_with_too_little_scratch_fails_that_vm_alone_and_recovers(vms, tmp_path, tmpfs):
    machines = {name: vms([DiskSpec("vda", size=96 * MiB)], name=name,
                          prepare=lambda vm: vm.write("vda", 0, 64 * MiB, 0x61))
                for name in ("vm1", "vm2")}
    fleet = Fleet(tmp_path, machines)
    small = tmpfs("scratch8m", "8m")
    inventory = json.loads(fleet.inventory.read_text())
    inventory["vms"]["hosts"]["vm1"]["qemu_backup_scratch_dir"] = str(small)
    inventory["vms"]["vars"]["qemu_backup_scratch_size"] = "1M"
    fleet.inventory.write_text(json.dumps(inventory))
    assert_ok(fleet.backup())
    manifest = (fleet.repository / "vm1" / "manifest.json").read_bytes()
    images = fleet.images("vm1")

    vm1 = machines["vm1"]
    # 4 MiB to copy at 1 MiB/s, followed after a second: the guest overwrites the disk while the copy runs.
    vm1.write("vda", 0, 4 * MiB, 0x61)
    overwrite = vm1.writes_by_hook("vda", 0, 64 * MiB, 0x62)  # logged now, as the hook will write
    inventory["vms"]["hosts"]["vm1"].update(qemu_backup_bandwidth="1M", qemu_backup_progress_interval=1)
    fleet.inventory.write_text(json.dumps(inventory))
    rc, results, output = fleet.backup(at_task=("Show the progress of the copies", overwrite))
    assert rc != 0 and list(results["failures"]) == ["vm1"], output[-3000:]
    assert "broke while it was copied" in " ".join(results["failures"]["vm1"])
    assert (fleet.repository / "vm1" / "manifest.json").read_bytes() == manifest and fleet.images("vm1") == images
    assert len(fleet.manifest("vm2")["backups"]) == 2
    assert_clean(vm1)
    assert used_bytes(small) == 0 and vm1.status() == "running"  # its scratch space was given back

    mark = vm1.mark("vda")
    assert_ok(fleet.backup())
    assert [b["level"] for b in fleet.manifest("vm1")["backups"]] == ["full", "incremental"]
    restored = tmp_path / "restored"
    assert_ok(fleet.restore("vm1", restored))
    assert same(str(restored / "vda.qcow2"), vm1.expected_image("vda", mark, str(tmp_path / "expected.raw")))


def test_a_guest_file_system_overwriting_more_than_the_scratch_holds_stays_clean(vms, tmp_path, tmpfs, scratch):
    vm = vms([], kind=BootedGuestVm)
    rewrite = ["if=/dev/urandom", "of=/data/big", "bs=1M", "count=16", "conv=notrunc,fsync"]
    with vm.agent() as agent:  # waits for the boot
        assert agent.run("fbg-workload", ["start", "64"]).exitcode == 0  # files, each fsync'd and logged
        assert agent.run("dd", rewrite, timeout=90).exitcode == 0  # 16 MiB of data the backup will have to keep
        logged = int(agent.run("fbg-workload", ["wait", "2"], timeout=90).stdout.split()[1])
    small = str(tmpfs("scratch4m", "4m"))
    flow = Backups(vm, str(tmp_path))
    backup = flow.start("b1", scratch_dir=small, scratch_size="1M", guest_agent_socket=vm.agent_socket)["backup"]
    assert backup["consistency"] == "application"
    new_events(vm)
    with vm.agent() as agent:
        # The guest overwrites its file in place, through ext4 and its virtio-blk driver: sixteen times the scratch
        # room, while the workload goes on writing new files.
        result = agent.run("dd", rewrite, timeout=90)
        assert result.exitcode == 0, result
        assert agent.run("fbg-workload", ["wait", str(logged + 4)], timeout=90).exitcode == 0
    assert_only_the_backup_broke(vm, flow, backup, small, tmp_path)

    with vm.agent() as agent:
        assert agent.run("fbg-workload", ["wait", str(logged + 8)], timeout=90).exitcode == 0  # it writes on
        state, count = agent.run("fbg-workload", ["stop"], timeout=90).stdout.decode().split()
        assert state == "stopped" and agent.run("fbg-workload", ["verify"], timeout=90).exitcode == 0
        kernel_log = agent.run("dmesg").stdout.decode()
        assert not FILESYSTEM_ERRORS.search(kernel_log), kernel_log[-2000:]
        assert agent.fsfreeze_freeze() == 1  # the file system as the guest left it, complete on the disk
    vm.kill()
    assert clean_filesystem(vm.image("vda"), scratch) == (False, 0)
    assert workload_files(vm.image("vda"), scratch) == (int(count), [])
