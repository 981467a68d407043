"""Full backups of a running QEMU, checked against rebuilt images with qemu-img compare."""

import json
import os
import socket
import subprocess
import sys

from qemu.qmp.legacy import QEMUMonitorProtocol

from support.paths import COLLECTIONS
from support.flows import Backups
from support.modules import ansible_bin, ansible_env, run_module
from support.qemu_vm import DiskSpec, MiB, same

BACKUP = "bk1"


def start(vm, scratch, **args):
    return Backups(vm, os.path.dirname(scratch)).start(args.pop("backup_id", BACKUP), **args)


def stop(vm, scratch, **args):
    return Backups(vm, os.path.dirname(scratch)).stop(args.pop("backup_id", BACKUP), **args)


def assert_nothing_left(vm, scratch):
    Backups(vm, os.path.dirname(scratch)).assert_nothing_left()


def fill(vm):
    vm.write("vda", 0, 4 * MiB, 0xA1)
    vm.write("vda", 20 * MiB, 3 * MiB, 0xB2)
    vm.zero("vda", 21 * MiB, MiB)
    vm.write("vda", 60 * MiB, 4 * MiB, 0xC3)


def test_backup_equals_disk_at_start_while_guest_writes(vms, scratch, tmp_path):
    vm = vms([DiskSpec("vda", size=256 * MiB)], prepare=fill)
    at_start = vm.mark("vda")
    started = start(vm, scratch)
    assert started["changed"] is True
    disk = started["backup"]["disks"][0]
    assert (disk["disk"], disk["mode"], disk["size"], disk["dirty_bitmap"]) == ("vda", "full", 256 * MiB, None)
    # Writes after the freeze, before the copy reads anything.
    vm.write("vda", 0, MiB, 0xEE)
    vm.zero("vda", 60 * MiB, 4 * MiB, unmap=True)
    dest = str(tmp_path / "vda.qcow2")
    copier = subprocess.Popen(
        [sys.executable, "-m", "ansible_collections.fleetbackup.qemu.plugins.modules.qemu_backup_copy"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=ansible_env() | {"PYTHONPATH": COLLECTIONS})
    arguments = {"src": disk["url"], "dest": dest, "connections": 1, "requests": 1, "request_size": 65536}
    copier.stdin.write(json.dumps({"ANSIBLE_MODULE_ARGS": arguments}).encode())
    copier.stdin.close()
    # And writes while the copy runs, over the data it is reading.
    writes_during_copy = 0
    for step in range(64):
        if copier.poll() is not None:
            break
        vm.write("vda", (step % 32) * 2 * MiB, MiB, 0x10 + step)
        writes_during_copy += 1
    result = json.loads(copier.stdout.read())
    assert copier.wait() == 0, result
    assert writes_during_copy > 0
    assert result["changed"] is True and result["size"] == 256 * MiB
    expected = vm.expected_image("vda", at_start, str(tmp_path / "expected.raw"))
    assert same(dest, expected)
    # The live disk did take the later writes, so the equality above is the fleecing's doing.
    assert not same(vm.flushed_image("vda"), expected)
    assert same(vm.flushed_image("vda"), vm.expected_image("vda", vm.mark("vda"), str(tmp_path / "now.raw")))
    assert stop(vm, scratch)["changed"] is True
    assert_nothing_left(vm, scratch)


def test_copy_reads_only_data_and_stays_sparse(vms, scratch, tmp_path):
    vm = vms([DiskSpec("vda", size=512 * MiB)], prepare=fill)
    disk = start(vm, scratch)["backup"]["disks"][0]
    for image_format in ("qcow2", "raw"):
        dest = str(tmp_path / ("vda." + image_format))
        result = run_module("qemu_backup_copy", src=disk["url"], dest=dest, format=image_format)
        # 4 + 2 + 4 MiB of data; the zeroed MiB and everything else is never read.
        assert result["bytes_read"] == 10 * MiB
        assert result["bytes_zeroed"] == 502 * MiB
        assert result["disk_usage"] < 16 * MiB
        assert os.stat(dest).st_mode & 0o777 == 0o600
        assert same(dest, vm.flushed_image("vda"))
    stop(vm, scratch)


def test_two_disks_share_one_point_in_time(vms, scratch, tmp_path):
    def prepare(vm):
        vm.write("vda", 0, 2 * MiB, 0x11)
        vm.write("sdb", 5 * MiB, 2 * MiB, 0x22)

    vm = vms([DiskSpec("vda"), DiskSpec("sdb", format="raw", size=32 * MiB, bus="scsi")], prepare=prepare)
    marks = {d: vm.mark(d) for d in vm.disks}
    backup = start(vm, scratch)["backup"]
    assert [d["disk"] for d in backup["disks"]] == ["vda", "sdb"]
    vm.write("vda", 0, MiB, 0x33)
    vm.write("sdb", 5 * MiB, MiB, 0x44)
    for disk in backup["disks"]:
        dest = str(tmp_path / (disk["disk"] + ".qcow2"))
        assert run_module("qemu_backup_copy", src=disk["url"], dest=dest)["changed"] is True
        expected = vm.expected_image(disk["disk"], marks[disk["disk"]], str(tmp_path / (disk["disk"] + ".raw")))
        assert same(dest, expected)
    stop(vm, scratch)
    assert_nothing_left(vm, scratch)


def test_start_copy_stop_again_change_nothing(vms, scratch, tmp_path):
    vm = vms([DiskSpec("vda")], prepare=lambda vm: vm.write("vda", 0, MiB, 0x5A))
    first = start(vm, scratch)
    # The socket gives the disk's contents: only its owner may open it. Scratch images have no name at all.
    assert os.stat(first["backup"]["nbd_socket"]).st_mode & 0o777 == 0o600
    assert os.listdir(scratch) == [] and len(vm.qmp("query-fdsets")) == 1
    second = start(vm, scratch)
    assert second["changed"] is False
    assert second["backup"] == first["backup"]
    url = first["backup"]["disks"][0]["url"]
    dest = str(tmp_path / "vda.qcow2")
    assert run_module("qemu_backup_copy", src=url, dest=dest)["changed"] is True
    before = os.stat(dest)
    again = run_module("qemu_backup_copy", src=url, dest=dest)
    assert again["changed"] is False
    assert os.stat(dest).st_mtime_ns == before.st_mtime_ns
    forced = run_module("qemu_backup_copy", src=url, dest=dest, force=True)
    assert forced["changed"] is True and same(dest, vm.flushed_image("vda"))
    stopped = stop(vm, scratch)
    assert stopped["changed"] is True and stopped["intact"] is True
    again = stop(vm, scratch)
    assert again["changed"] is False and again["intact"] is None
    assert_nothing_left(vm, scratch)


def test_check_mode_creates_nothing(vms, scratch, tmp_path):
    vm = vms([DiskSpec("vda")])
    planned = start(vm, scratch, check_mode=True)
    assert planned["changed"] is True
    assert planned["backup"]["disks"][0]["disk"] == "vda"
    assert_nothing_left(vm, scratch)
    assert not (tmp_path / "state").exists()  # not even fleetbackup's own directory
    url = start(vm, scratch)["backup"]["disks"][0]["url"]
    dest = str(tmp_path / "vda.qcow2")
    assert run_module("qemu_backup_copy", src=url, dest=dest, check_mode=True)["changed"] is True
    assert not os.path.exists(dest)
    wrong = run_module("qemu_backup_copy", src=url.replace("vda", "nope"), dest=dest, check_mode=True)
    assert wrong.failed and "Cannot connect" in wrong["msg"]
    would = stop(vm, scratch, check_mode=True)
    assert would["changed"] is True and would["removed"]["exports"] == ["fb-bk1-0", "fb-bk1-p0"]
    assert vm.leftovers()["exports"]
    stop(vm, scratch)
    assert_nothing_left(vm, scratch)


def test_failed_start_rolls_back_everything(vms, scratch, tmp_path):
    vm = vms([DiskSpec("vda"), DiskSpec("vdb")])
    # QEMU runs one NBD server; one that is already up makes the start fail after the transaction.
    other = str(tmp_path / "other.nbd")
    vm.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": other}})
    result = start(vm, scratch, checkpoint="c1")
    assert result.failed
    assert "starting the NBD server" in result["msg"] and "already running" in result["msg"]
    assert "removed" in result["msg"]
    assert_nothing_left(vm, scratch)
    assert vm.named_bitmaps("vda") == {} and vm.named_bitmaps("vdb") == {}
    vm.qmp("nbd-server-stop")
    assert start(vm, scratch)["changed"] is True
    stop(vm, scratch)


def test_stop_cleans_after_killed_copy_and_half_done_start(vms, scratch, tmp_path):
    import nbd

    vm = vms([DiskSpec("vda")])
    url = start(vm, scratch)["backup"]["disks"][0]["url"]
    # A copy killed mid-way leaves its connection to the export open, and its partial image.
    stuck = nbd.NBD()
    stuck.connect_uri(url)
    stuck.pread(4096, 0)
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    partial = tmp_path / (".old.qcow2.part-%d@%s" % (dead.pid, host))
    partial.write_bytes(b"half a backup")
    alive = tmp_path / (".other.qcow2.part-%d@%s" % (os.getpid(), host))
    alive.write_bytes(b"a copy still running")
    elsewhere = tmp_path / (".third.qcow2.part-%d@another-host" % dead.pid)  # a shared repository's
    elsewhere.write_bytes(b"a copy on another host")
    foreign = tmp_path / (".fourth.qcow2.part-%d@%s" % (dead.pid, host))
    foreign.write_bytes(b"looks like ours, is not ours")
    os.chown(foreign, 65534, 65534)
    copied = run_module("qemu_backup_copy", src=url, dest=str(tmp_path / "new.qcow2"))
    assert copied["removed_partials"] == [partial.name]
    assert not partial.exists() and alive.exists() and elsewhere.exists() and foreign.exists()
    assert stop(vm, scratch)["changed"] is True
    assert_nothing_left(vm, scratch)
    # A start killed half-way: its export is missing, everything else is there.
    started = start(vm, scratch, backup_id="half")
    vm.qmp("block-export-del", id="fb-half-0", mode="hard")
    vm.wait_event("BLOCK_EXPORT_DELETED", id="fb-half-0")
    again = start(vm, scratch, backup_id="half")
    assert again.failed and "partly there" in again["msg"] and "qemu_backup_stop" in again["msg"]
    other = start(vm, scratch, backup_id="other")
    assert other.failed and "Backup half of" in other["msg"] and "backup_id: half" in other["msg"]
    removed = stop(vm, scratch, backup_id="half")
    assert removed["changed"] is True and len(removed["removed"]["nodes"]) == 3
    assert started["backup"]["nbd_socket"] in removed["removed"]["files"]
    assert_nothing_left(vm, scratch)


def test_ad_hoc_ansible_copy(vms, scratch, tmp_path):
    vm = vms([DiskSpec("vda")], prepare=lambda vm: vm.write("vda", MiB, 2 * MiB, 0x77))
    url = start(vm, scratch)["backup"]["disks"][0]["url"]
    dest = str(tmp_path / "adhoc.qcow2")
    tree = tmp_path / "tree"
    process = subprocess.run(
        [ansible_bin("ansible"), "localhost", "-m", "fleetbackup.qemu.qemu_backup_copy",
         "-a", "src=%s dest=%s" % (url, dest), "-t", str(tree)],
        env=ansible_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300, check=False)
    assert process.returncode == 0, process.stdout.decode()
    result = json.loads((tree / "localhost").read_text())
    assert result["changed"] is True and result["bytes_read"] == 2 * MiB
    assert same(dest, vm.flushed_image("vda"))
    stop(vm, scratch)


def test_bad_input_fails_clearly(vms, scratch, tmp_path):
    vm = vms([DiskSpec("vda")])
    state_dir = str(tmp_path / "state")
    missing = run_module("qemu_backup_start", qmp_socket=str(tmp_path / "nope.sock"), backup_id="x",
                         scratch_dir=scratch, state_dir=state_dir)
    assert missing.failed and "does not exist" in missing["msg"] and "-qmp" in missing["msg"]

    nbd_socket = start(vm, scratch, backup_id="other")["backup"]["nbd_socket"]
    not_qemu = run_module("qemu_backup_start", qmp_socket=nbd_socket, backup_id="x", scratch_dir=scratch,
                          state_dir=state_dir, qmp_timeout=3)
    assert not_qemu.failed and "QMP" in not_qemu["msg"]
    stop(vm, scratch, backup_id="other")

    # A monitor that another client holds greets nobody else: fail, do not hang.
    holder = QEMUMonitorProtocol(vm.qmp_socket)
    holder.connect()
    try:
        busy = start(vm, scratch, qmp_timeout=2)
    finally:
        holder.close()
    assert busy.failed and "busy with another client" in busy["msg"]

    unknown = start(vm, scratch, disks=["vdz"])
    assert unknown.failed and "Unknown disk 'vdz'" in unknown["msg"] and "vda" in unknown["msg"]

    for bad_id in ("has space", "x" * 33, "semi;colon", ""):
        invalid = start(vm, scratch, backup_id=bad_id)
        assert invalid.failed and "Invalid backup_id" in invalid["msg"], bad_id

    absent = start(vm, scratch, scratch_dir=str(tmp_path / "no-such-dir"))
    assert absent.failed and "scratch_dir" in absent["msg"] and "does not exist" in absent["msg"]
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    refused = start(vm, scratch, scratch_dir=str(shared))
    assert refused.failed and "written by other users and is not sticky" in refused["msg"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 65534, 65534)
    refused = start(vm, scratch, scratch_dir=str(foreign))
    assert refused.failed and "belongs to uid 65534" in refused["msg"]
    too_full = start(vm, scratch, scratch_size="100000T")
    assert too_full.failed and "less than the" in too_full["msg"] and "scratch_size" in too_full["msg"]
    bad_size = start(vm, scratch, scratch_size="lots")
    assert bad_size.failed and "Invalid scratch_size" in bad_size["msg"]
    for bad_timeout in (0, 4000):
        refused = start(vm, scratch, cbw_timeout=bad_timeout)
        assert refused.failed and "cbw_timeout must be" in refused["msg"]

    no_dir = run_module("qemu_backup_copy", src="nbd+unix:///vda?socket=/x", dest=str(tmp_path / "a" / "b.qcow2"))
    assert no_dir.failed and "does not exist" in no_dir["msg"]
    no_server = run_module("qemu_backup_copy", src="nbd+unix:///vda?socket=%s" % (tmp_path / "x.nbd"),
                           dest=str(tmp_path / "b.qcow2"))
    assert no_server.failed and "Cannot connect to NBD export" in no_server["msg"]
    assert not os.path.exists(tmp_path / "b.qcow2")
    assert [name for name in os.listdir(tmp_path) if name.startswith(".b.qcow2")] == []
    assert_nothing_left(vm, scratch)
