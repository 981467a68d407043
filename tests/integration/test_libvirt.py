"""libvirt-managed VMs: the same modules through libvirt's backup and checkpoint APIs, against a real libvirtd.

Each test starts its own libvirtd and virtlogd (no systemd) and domains of type qemu with two qcow2 disks. The
test writes as the guest through libvirt's monitor (HMP qemu-io); the modules never touch the monitor. The freeze
test boots the guest kit's Linux instead, whose qemu-guest-agent libvirt talks to.
"""

import json
import os
import stat
import subprocess
from xml.etree import ElementTree

import pytest

from support.fleet import Fleet, assert_clean, assert_ok
from support.flows import Backups, marks, restores_exactly, vm_state_files
from support.guest import clean_filesystem, workload_files
from support.libvirt_daemon import LibvirtGuestDomain
from support.qemu_vm import DiskSpec, MiB, same
from support.modules import run_module
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.qemu_img import image_bitmaps

TWO_DISKS = [DiskSpec("vda", size=64 * MiB), DiskSpec("vdb", size=32 * MiB)]


def run_files(vm):
    """What is left under qemu_dir besides the VMs' own directories: scratch images, starts' socket directories."""
    found = []
    for top, dirs, files in os.walk(vm.qemu_dir):
        found += [os.path.join(top, name) for name in files]
        if top != vm.qemu_dir:
            found += [os.path.join(top, name) for name in dirs]
    return found


def assert_nothing_left(vm, flow, checkpoints):
    assert vm.leftovers() == dict(job=False, exports=[], jobs=[], bitmaps=[])
    assert vm.checkpoints() == sorted(checkpoints)
    assert run_files(vm) == []
    assert flow.vm_state_files() == []


@pytest.fixture
def domain(libvirt_daemon, domains):
    def prepare(vm):
        vm.write("vda", 0, 4 * MiB, 0x11)
        vm.write("vdb", MiB, 2 * MiB, 0x21)

    return domains(libvirt_daemon(), TWO_DISKS, prepare=prepare)


def test_chain_differential_and_writes_during_backups(domain, tmp_path):
    vm = domain
    flow = Backups(vm, str(tmp_path))
    repo = str(tmp_path / "repo")
    os.mkdir(repo)
    points = []

    # No agent channel: freeze always fails before anything is made; auto takes a crash-consistent backup.
    always = flow.start("b1", checkpoint="c1", freeze="always")
    assert always.failed and "has no guest agent channel" in always["msg"], always["msg"]
    assert "VIR_ERR_ARGUMENT_UNSUPPORTED" in always["msg"]
    assert_nothing_left(vm, flow, [])

    points.append(marks(vm))
    full = flow.start("b1", checkpoint="c1")
    assert full.get("changed") is True, full
    backup = full["backup"]
    assert [d["mode"] for d in backup["disks"]] == ["full", "full"] and backup["pause"] is None
    assert backup["consistency"] == "crash" and "has no guest agent channel" in backup["freeze"]["reason"]
    # QEMU made the socket as libvirt-qemu, which every VM's QEMU shares: the start made it, and its directory,
    # root's alone, so no other VM's QEMU can read this VM's disks through it or swap it.
    socket_info = os.stat(backup["nbd_socket"])
    assert stat.S_ISSOCK(socket_info.st_mode) and stat.S_IMODE(socket_info.st_mode) == 0o600
    assert socket_info.st_uid == 0 and backup["nbd_socket"].startswith(vm.qemu_dir + "/")
    directory = os.stat(os.path.dirname(backup["nbd_socket"]))
    assert directory.st_uid == 0 and stat.S_IMODE(directory.st_mode) == 0o700
    as_qemu = subprocess.run(["runuser", "-u", "libvirt-qemu", "--", "nbdinfo", "--list",
                              "nbd+unix:///?socket=" + backup["nbd_socket"]], capture_output=True, text=True,
                             check=False)
    assert as_qemu.returncode != 0 and "Permission denied" in as_qemu.stderr, as_qemu
    scratch = [path for path in run_files(vm) if path.endswith(".scratch")]
    assert len(scratch) == 2 and all(os.stat(path).st_size >= 32 * MiB for path in scratch), scratch
    again = flow.start("b1", checkpoint="c1")
    assert again["changed"] is False and again["backup"] == backup
    other = flow.start("b9")
    assert other.failed and "Backup b1 of domain %s" % vm.name in other["msg"] and "one backup per VM" in other["msg"]
    would = flow.stop("b1", check_mode=True)
    assert would["changed"] is True and would["removed"]["job"] is True and vm.leftovers()["job"] is True
    assert flow.checkpoint("c9", check_mode=True)["changed"] is True and vm.checkpoints() == ["c1"]
    vm.write("vda", 8 * MiB, MiB, 0x99)  # during b1: belongs to b2
    flow.copy_all(backup, repo, "b1")
    stopped = flow.stop("b1")
    assert stopped["changed"] is True and stopped["intact"] is True and stopped["removed"]["job"] is True
    assert flow.stop("b1")["changed"] is False
    assert_nothing_left(vm, flow, ["c1"])

    vm.write("vda", 16 * MiB, MiB, 0x31)
    vm.zero("vda", 0, MiB)
    vm.write("vdb", 20 * MiB, MiB, 0x32)
    points.append(marks(vm))
    inc = flow.start("b2", incremental="c1", checkpoint="c2")["backup"]
    vda, vdb = inc["disks"]
    assert vda["mode"] == vdb["mode"] == "incremental"
    assert vda["dirty_bitmap"] == "qemu:dirty-bitmap:fb-b2" and vda["dirty_bytes"] == 3 * MiB
    vm.write("vdb", 24 * MiB, MiB, 0x77)  # during b2: belongs to b3
    copies = flow.copy_all(inc, repo, "b2", previous_prefix="b1")
    assert copies["vda"]["bytes_read"] == 2 * MiB  # 0x99 and 0x31; the zeroed MiB is written as zeros, unread
    flow.stop("b2")

    vm.write("vda", 40 * MiB, MiB, 0x41)
    points.append(marks(vm))
    inc3 = flow.start("b3", incremental="c2", checkpoint="c3")["backup"]
    flow.copy_all(inc3, repo, "b3", previous_prefix="b2")
    flow.stop("b3")
    assert_nothing_left(vm, flow, ["c1", "c2", "c3"])

    # A differential: since c1 again, while c2 and c3 exist.
    points.append(marks(vm))
    diff = flow.start("b4", incremental="c1")["backup"]
    assert diff["disks"][0]["dirty_bytes"] == 4 * MiB
    flow.copy_all(diff, repo, "b4", previous_prefix="b1")
    flow.stop("b4")

    for prefix, point in zip(("b1", "b2", "b3", "b4"), points):
        for disk in vm.disks:
            assert restores_exactly(vm, tmp_path, disk, os.path.join(repo, "%s.%s.qcow2" % (prefix, disk)), point[disk]), \
                (prefix, disk)

    info = flow.info()
    checkpoints = {c["name"]: c for c in info["disks"][0]["checkpoints"]}
    assert sorted(checkpoints) == ["c1", "c2", "c3"] and checkpoints["c3"]["dirty_bytes"] == 0
    removed = flow.checkpoint("c1", state="absent")
    assert removed["changed"] is True and sorted(removed["disks"]) == ["vda", "vdb"]
    assert_nothing_left(vm, flow, ["c2", "c3"])


def workload(vm, *args):
    """fbg-workload's answer, as words, through the guest's serial console: the agent's channel is libvirt's, and
    an agent command passed through libvirt would taint the domain."""
    status, *words = vm.run(" ".join(("workload",) + args), timeout=90)
    assert status == "0", words
    return words


def test_a_real_guest_agent_freezes_through_libvirt_and_the_copy_restores_clean(
        libvirt_daemon, domains, tmp_path, scratch):
    vm = domains(libvirt_daemon(), [], kind=LibvirtGuestDomain)
    assert vm.wait_ready() == ["vda"]
    assert workload(vm, "start", "64") == ["started"]
    vm.wait_agent_connected()  # what the start's check reads: the channel's state in the live XML
    workload(vm, "wait", "5")
    flow = Backups(vm, str(tmp_path))

    backup = flow.start("app", freeze="always")["backup"]
    assert backup["consistency"] == "application" and backup["freeze"]["filesystems"] == 1
    assert backup["freeze"]["reason"] is None and 0 < backup["freeze"]["seconds"] < 5
    # Thawed: the workload, whose every file is fsync'd, goes on writing while the backup runs.
    logged = int(workload(vm, "status")[1])
    assert workload(vm, "wait", str(logged + 2))[0] == "logged"
    flow.copy_all(backup, str(tmp_path), "app")
    assert flow.stop("app")["intact"] is True

    # The same guest without the freeze: its journal needs recovery, so the check below can fail.
    crash = flow.start("crash", freeze="never")["backup"]
    assert crash["consistency"] == "crash" and crash["freeze"]["reason"] == "freeze is never"
    flow.copy_all(crash, str(tmp_path), "crash")
    flow.stop("crash")

    # The freeze went through libvirt's API: no monitor command, no agent command passed through.
    assert vm.tainted() == []
    assert_nothing_left(vm, flow, [])  # its QMP queries taint the domain: after the check
    image = str(tmp_path / "app.vda.qcow2")
    assert clean_filesystem(image, scratch) == (False, 0)
    assert clean_filesystem(str(tmp_path / "crash.vda.qcow2"), scratch)[0] is True
    files, changed = workload_files(image, scratch)
    assert files >= 5 and changed == []


def test_crash_falls_back_to_full_and_a_clean_destroy_keeps_the_chain(domain, tmp_path):
    vm = domain
    flow = Backups(vm, str(tmp_path))
    repo = flow.full_into_new_repo(tmp_path)

    # virsh destroy: QEMU gets SIGTERM and stores its bitmaps; the chain goes on.
    vm.write("vda", 8 * MiB, MiB, 0x51)
    vm.destroy()
    vm.start()
    point = marks(vm)
    inc = flow.start("b2", incremental="c1", checkpoint="c2")["backup"]
    assert [d["mode"] for d in inc["disks"]] == ["incremental", "incremental"]
    flow.copy_all(inc, repo, "b2", previous_prefix="b1")
    flow.stop("b2")
    assert restores_exactly(vm, tmp_path, "vda", os.path.join(repo, "b2.vda.qcow2"), point["vda"])

    # kill -9: c2 was added at run time and never written to the images; libvirt still lists it.
    vm.kill()
    vm.start()
    assert "c2" in vm.checkpoints()
    refused = flow.start("b3", incremental="c2")
    assert refused.failed and "inconsistent" in refused["msg"] and "fallback_to_full" in refused["msg"]
    assert_nothing_left(vm, flow, ["c1", "c2"])
    fallback = flow.start("b3", incremental="c2", fallback_to_full=True)["backup"]
    assert [d["mode"] for d in fallback["disks"]] == ["full", "full"]
    assert all("inconsistent" in d["reason"] for d in fallback["disks"])
    flow.stop("b3")
    assert_nothing_left(vm, flow, ["c1", "c2"])


def test_checkpoint_given_back_after_libvirt_lost_its_metadata(domain, tmp_path):
    vm = domain
    flow = Backups(vm, str(tmp_path))
    repo = str(tmp_path / "repo")
    os.mkdir(repo)
    full = flow.start("b1", checkpoint="c1")["backup"]
    definition = full["libvirt"]["checkpoint_xml"]
    assert "<name>c1</name>" in definition and "<domain" in full["libvirt"]["domain_xml"]
    flow.copy_all(full, repo, "b1")
    flow.stop("b1")
    vm.write("vda", 8 * MiB, MiB, 0x61)

    # The domain undefined with its checkpoints' metadata and defined again: the bitmaps stay in the images.
    vm.define_again_without_checkpoints()
    assert vm.checkpoints() == []
    lost = flow.start("b2", incremental="c1")
    assert lost.failed and "does not exist" in lost["msg"]

    checked = flow.checkpoint("c1", definition=definition, check_mode=True)
    assert checked["changed"] is True and vm.checkpoints() == []
    given_back = flow.checkpoint("c1", definition=definition)
    assert given_back["changed"] is True and sorted(given_back["disks"]) == ["vda", "vdb"]
    assert flow.checkpoint("c1", definition=definition)["changed"] is False
    point = marks(vm)
    inc = flow.start("b2", incremental="c1", checkpoint="c2")["backup"]
    assert [d["mode"] for d in inc["disks"]] == ["incremental", "incremental"]
    flow.copy_all(inc, repo, "b2", previous_prefix="b1")
    flow.stop("b2")
    for disk in vm.disks:
        assert restores_exactly(vm, tmp_path, disk, os.path.join(repo, "b2.%s.qcow2" % disk), point[disk])

    # A definition whose bitmaps are gone is refused by name, and nothing is defined.
    flow.checkpoint("c2", state="absent")
    gone = flow.checkpoint("c2", definition=inc["libvirt"]["checkpoint_xml"])
    assert gone.failed and "VIR_ERR_CHECKPOINT_INCONSISTENT" in gone["msg"] and vm.checkpoints() == ["c1"]


def test_scratch_room_reserved_or_refused(libvirt_daemon, domains, tmpfs, tmp_path):
    small = tmpfs("small", "40M")  # before the daemon: its namespace sees only earlier mounts
    os.chmod(str(small), 0o711)
    vm = domains(libvirt_daemon(), TWO_DISKS)
    flow = Backups(vm, str(tmp_path))
    refused = flow.start("b1", scratch_dir=str(small))
    assert refused.failed and "libvirt_small_scratch" in refused["msg"] and "MiB free" in refused["msg"]
    assert os.listdir(str(small)) == [] and flow.vm_state_files() == []
    accepted = flow.start("b1", scratch_dir=str(small), libvirt_small_scratch=True, scratch_size="8M")
    assert not accepted.failed, accepted
    assert sorted(os.listdir(str(small))) == sorted(
        "b1.%s.%s.scratch" % (accepted["backup"]["disks"][0]["export"].split("/")[1], disk) for disk in vm.disks)
    vm.write("vda", 0, 2 * MiB, 0x71)  # fits in the reserved room: the guest's write lands
    flow.stop("b1")
    assert os.listdir(str(small)) == [] and flow.vm_state_files() == []


def test_check_mode_and_bad_input(domain, tmp_path):
    vm = domain
    flow = Backups(vm, str(tmp_path))
    planned = flow.start("b1", checkpoint="c1", check_mode=True)
    assert planned["changed"] is True and [d["mode"] for d in planned["backup"]["disks"]] == ["full", "full"]
    assert vm.checkpoints() == [] and run_files(vm) == [] and flow.vm_state_files() == []

    unknown = run_module("qemu_backup_info", domain="no-such-domain", libvirt_uri=vm.daemon.uri,
                         state_dir=flow.state_dir)
    assert unknown.failed and "has no domain no-such-domain" in unknown["msg"]
    both = run_module("qemu_backup_info", domain=vm.name, qmp_socket="/nonexistent", state_dir=flow.state_dir)
    assert both.failed and "mutually exclusive" in both["msg"]
    unreachable = run_module("qemu_backup_info", domain=vm.name, libvirt_uri="qemu:///system?socket=/nonexistent",
                             state_dir=flow.state_dir)
    assert unreachable.failed and "Connecting to libvirt" in unreachable["msg"]
    disk = flow.start("b1", disks=["vdz"])
    assert disk.failed and "Unknown disk 'vdz'" in disk["msg"]
    # A checkpoint name libvirt knows, on whatever disks, is refused, and that checkpoint is left alone.
    assert flow.checkpoint("c1", disks=["vdb"])["changed"] is True
    taken = flow.start("b1", disks=["vda"], checkpoint="c1")
    assert taken.failed and "already exists" in taken["msg"] and vm.checkpoints() == ["c1"]
    flow.checkpoint("c1", state="absent")
    vm.destroy()
    stopped = flow.info()  # a shut-off domain: its images, as its definition names them
    assert [d["disk"] for d in stopped["disks"]] == ["vda", "vdb"] and stopped["disks"][0]["checkpoints"] == []
    assert flow.vm_state_files() == []


def test_stop_after_the_domain_died_removes_what_is_left(domain, tmp_path):
    vm = domain
    flow = Backups(vm, str(tmp_path))
    flow.start("b1", checkpoint="c1")
    vm.kill()
    stopped = flow.stop("b1", discard_checkpoint=True)
    assert stopped.get("changed") is True and stopped["intact"] is False and stopped["removed"]["checkpoint"] == "c1"
    assert vm.checkpoints() == [] and run_files(vm) == [] and flow.vm_state_files() == []
    assert flow.stop("b1")["changed"] is False

    # A clean destroy stores the new checkpoint's bitmaps in the images: the stop removes them offline.
    vm.start()
    flow.start("b2", checkpoint="c2")
    vm.destroy()
    assert all(image_bitmaps(vm.image(disk)) == ["c2"] for disk in vm.disks)
    stopped = flow.stop("b2", discard_checkpoint=True)
    assert stopped["removed"]["checkpoint"] == "c2" and vm.checkpoints() == []
    assert all(image_bitmaps(vm.image(disk)) == [] for disk in vm.disks)
    assert run_files(vm) == [] and flow.vm_state_files() == []


def test_roles_back_up_libvirt_and_qmp_vms_together_and_restore_defines_the_domain(libvirt_daemon, domains, vms,
                                                                                   tmp_path):
    daemon = libvirt_daemon()
    written = domains(daemon, TWO_DISKS, name="written", nvram=True,
                      prepare=lambda vm: vm.write("vda", 0, 4 * MiB, 0x11))
    # Only the collection touches this one: no test write, no query through its monitor.
    untouched = domains(daemon, [DiskSpec("vda", size=16 * MiB)], name="untouched")
    qmp_vm = vms([DiskSpec("vda", size=16 * MiB)], name="qmp", prepare=lambda vm: vm.write("vda", 0, MiB, 0x21))
    fleet = Fleet(tmp_path, {"written": written, "untouched": untouched, "qmp": qmp_vm})
    points = []
    for step in range(2):
        points.append(marks(written))
        results = assert_ok(fleet.backup())
        assert not [note for note in results["tasks"]["qmp"]["Run the whole backup"]["notes"] if "libvirt" in note]
        written.write("vda", (step + 2) * 8 * MiB, MiB, 0x30 + step)
        written.write("vdb", step * MiB, MiB, 0x40 + step)
        qmp_vm.write("vda", (step + 1) * MiB, MiB, 0x50 + step)
    for name in ("written", "untouched", "qmp"):
        assert [b["level"] for b in fleet.manifest(name)["backups"]] == ["full", "incremental"], name
    newest = fleet.manifest("written")["backups"][-1]
    assert written.checkpoints() == [newest["checkpoint"]] and run_files(written) == []
    assert "<domain" in (fleet.repository / "written" / newest["definition"]["domain_xml"]).read_text()
    assert newest["definition"]["checkpoint_xml"].count("<name>%s</name>" % newest["checkpoint"]) == 1

    # libvirt loses the checkpoints' metadata (the domain defined again): the role gives the newest back.
    written.define_again_without_checkpoints()
    points.append(marks(written))
    results = assert_ok(fleet.backup())
    assert "Gave libvirt back checkpoint %s" % newest["checkpoint"] in " ".join(
        results["tasks"]["written"]["Run the whole backup"]["notes"])
    assert [b["level"] for b in fleet.manifest("written")["backups"]] == ["full", "incremental", "incremental"]

    for point, backup in zip(points, fleet.manifest("written")["backups"]):
        dest = tmp_path / ("restore-%s" % backup["name"])
        assert_ok(fleet.restore("written", dest, qemu_restore_backup=backup["name"]))
        for disk in written.disks:
            expected = written.expected_image(disk, point[disk], str(tmp_path / ("exp-%s-%s.raw" % (
                backup["name"], disk))))
            assert same(str(dest / ("%s.qcow2" % disk)), expected), (backup["name"], disk)
    qmp_restored = tmp_path / "restore-qmp"
    assert_ok(fleet.restore("qmp", qmp_restored))
    assert same(str(qmp_restored / "vda.qcow2"), qmp_vm.expected_image("vda", qmp_vm.mark("vda"), str(
        tmp_path / "exp-qmp.raw")))

    # The restored domain, defined beside the original under a new name, with its own UUID and the restored disks.
    drill = tmp_path / "drill"
    # The test's firmware is its own, not the distribution's: the restore is told to trust its directory.
    trusted = dict(qemu_restore_firmware_dirs=[written.workdir])
    results = assert_ok(fleet.restore("written", drill, qemu_restore_define_domain=True,
                                      qemu_restore_domain="written-drill", **trusted))
    restored = results["tasks"]["written"]["Restore the disks"]["domain"]
    assert restored["defined"] is True and restored["name"] == "written-drill", restored
    defined = daemon.connection.lookupByName("written-drill")
    assert defined.UUIDString() != written.uuid
    sources = sorted(source.get("file") for source in ElementTree.fromstring(defined.XMLDesc(0)).findall(
        "./devices/disk/source"))
    assert sources == [str(drill / "vda.qcow2"), str(drill / "vdb.qcow2")]
    # The UEFI variables as the newest backup read them (the halt firmware never writes them).
    assert ElementTree.fromstring(defined.XMLDesc(0)).findtext("./os/nvram") == str(drill / "nvram.fd")
    with open(written.nvram, "rb") as original:
        assert (drill / "nvram.fd").read_bytes() == original.read()
    assert stat.S_IMODE(os.stat(str(drill / "nvram.fd")).st_mode) == 0o600
    again = assert_ok(fleet.restore("written", drill, qemu_restore_define_domain=True,
                                    qemu_restore_domain="written-drill", **trusted), changed={"written": 0})
    assert again["tasks"]["written"]["Restore the disks"]["domain"]["defined"] is False
    # Another backup into the same domain: only with force, and it stays the same domain.
    first = fleet.manifest("written")["backups"][0]["name"]
    other = dict(qemu_restore_define_domain=True, qemu_restore_domain="written-drill", qemu_restore_backup=first,
                 **trusted)
    rc, results, output = fleet.restore("written", drill, **other)
    assert rc != 0 and "set force" in json.dumps(results["failures"]).lower(), output[-2000:]
    assert_ok(fleet.restore("written", drill, qemu_restore_force=True, **other))
    assert daemon.connection.lookupByName("written-drill").UUIDString() == defined.UUIDString()

    # Nothing left; and the domain that only the collection touched was never tainted.
    for domain in (written, untouched):
        assert not domain.domain.jobStats().get("operation") and run_files(domain) == []
        assert len(domain.checkpoints()) == 1
    assert_clean(qmp_vm)
    assert vm_state_files(str(tmp_path / "state")) == []
    assert not untouched.tainted()
    assert written.tainted()  # the test's own writes: proof that the check can see a taint
