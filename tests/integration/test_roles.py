"""The backup and restore roles, and the fleet playbook, against real QEMU processes."""

import json
import os
import re
import subprocess

from support.fleet import Fleet, assert_clean, assert_ok
from support.flows import vm_state_files
from support.modules import support_command
from support.qemu_vm import DiskSpec, MiB, same


def two_disks(vm):
    vm.write("vda", 0, 4 * MiB, 0x11)
    vm.write("vdb", 8 * MiB, 2 * MiB, 0x22)


def test_chain_restores_each_point_and_reruns_change_nothing(vms, tmp_path):
    vm = vms([DiskSpec("vda"), DiskSpec("vdb")], prepare=two_disks)
    fleet = Fleet(tmp_path, {"vm1": vm})
    marks = []
    for step in range(3):
        marks.append({d: vm.mark(d) for d in vm.disks})
        assert_ok(fleet.backup())
        vm.write("vda", (step + 1) * 8 * MiB, MiB, 0x30 + step)
        vm.zero("vdb", 8 * MiB, MiB)
    backups = fleet.manifest("vm1")["backups"]
    assert [b["level"] for b in backups] == ["full", "incremental", "incremental"]
    assert [b["parent"] for b in backups] == [None, backups[0]["name"], backups[1]["name"]]
    assert {b["chain"] for b in backups} == {backups[0]["name"]}
    assert backups[1]["disks"][0]["bytes_read"] == MiB
    # Only the newest checkpoint stays in QEMU: the next incremental starts from it.
    assert list(vm.named_bitmaps("vda")) == [backups[2]["checkpoint"]]
    assert_clean(vm)

    for point, backup in enumerate(backups):
        dest = tmp_path / ("restore-%d" % point)
        results = assert_ok(fleet.restore("vm1", dest, qemu_restore_backup=backup["name"]), changed={"vm1": 2})
        for disk in vm.disks:
            expected = vm.expected_image(disk, marks[point][disk], str(tmp_path / ("exp-%d-%s.raw" % (point, disk))))
            assert same(str(dest / ("%s.qcow2" % disk)), expected)
            check = subprocess.run(["qemu-img", "check", str(dest / ("%s.qcow2" % disk))], stdout=subprocess.PIPE,
                                   check=False)
            assert check.returncode == 0
        assert results["tasks"]["vm1"]["Restore the disks"]["backup"] == backup["name"]
    # The same restore again: identical images, no change.
    assert_ok(fleet.restore("vm1", tmp_path / "restore-2", qemu_restore_backup=backups[2]["name"]),
              changed={"vm1": 0})
    raw = tmp_path / "restore-raw"
    assert_ok(fleet.restore("vm1", raw, qemu_restore_format="raw"))
    assert same(str(raw / "vda.raw"), str(tmp_path / "restore-2" / "vda.qcow2"))


def test_max_age_and_check_mode_write_nothing(vms, tmp_path):
    vm = vms([DiskSpec("vda")], prepare=lambda vm: vm.write("vda", 0, MiB, 0x42))
    fleet = Fleet(tmp_path, {"vm1": vm})
    rc, results, output = fleet.backup(qemu_backup_repository_host="localhost")  # copies there, exports here
    refused, failed = results["failures"]["vm1"]  # the role's check, rescued; then the last play fails the VM
    reason = "vm1: a repository on localhost, another host than vm1, needs qemu_backup_nbd_tcp"
    assert rc != 0 and refused.startswith("fleetbackup.qemu.qemu_backup : Check that the VM is named once, and that "
                                          "copies on another host can reach the exports: " + reason)
    assert failed.startswith("Fail the VM with its run's error: " + reason)
    # Check mode says what a run would change: a backup; the run report is not written.
    planned = assert_ok(fleet.backup(check=True, qemu_backup_max_age="1h"), changed={"vm1": 1, "localhost": 0})
    assert "full backup" in planned["tasks"]["vm1"]["Report the run"]["msg"]
    assert not (fleet.repository / "vm1" / "manifest.json").exists() and vm.named_bitmaps("vda") == {}

    assert_ok(fleet.backup(qemu_backup_max_age="1h"))
    vm.write("vda", 4 * MiB, 2 * MiB, 0x43)
    # localhost: the run report, written.
    again = assert_ok(fleet.backup(qemu_backup_max_age="1h"), changed={"vm1": 0, "localhost": 1})
    assert "younger than max_age" in again["tasks"]["vm1"]["Report the run"]["msg"]
    assert len(fleet.manifest("vm1")["backups"]) == 1

    planned = assert_ok(fleet.backup(check=True), changed={"vm1": 1, "localhost": 0})
    message = planned["tasks"]["vm1"]["Report the run"]["msg"]
    assert "incremental backup" in message and "vda" in message and "2.0 MiB" in message
    assert len(fleet.manifest("vm1")["backups"]) == 1
    assert len(vm.named_bitmaps("vda")) == 1
    assert_clean(vm)


def test_failed_copy_leaves_the_repository_and_the_next_run_continues(vms, tmp_path, tmpfs):
    small_filesystem = tmpfs("small", "12m")
    small_filesystem.chmod(0o755)
    vm = vms([DiskSpec("vda")], prepare=lambda vm: vm.write("vda", 0, 4 * MiB, 0x51))
    fleet = Fleet(tmp_path, {"vm1": vm})
    fleet.repository = small_filesystem
    fleet.inventory.write_text(fleet.inventory.read_text().replace(str(tmp_path / "repository"),
                                                                   str(small_filesystem)))
    marks = [vm.mark("vda")]
    assert_ok(fleet.backup())
    manifest = (small_filesystem / "vm1" / "manifest.json").read_bytes()
    images = fleet.images("vm1")
    checkpoints = list(vm.named_bitmaps("vda"))

    vm.write("vda", 16 * MiB, 24 * MiB, 0x52)  # more than the file system holds
    rc, results, output = fleet.backup()
    failure = " ".join(results["failures"]["vm1"])
    assert rc != 0 and "was not recorded" in failure and "No space left on device" in failure, output[-3000:]
    assert (small_filesystem / "vm1" / "manifest.json").read_bytes() == manifest
    assert fleet.images("vm1") == images and not [n for n in os.listdir(small_filesystem / "vm1") if ".part" in n]
    assert list(vm.named_bitmaps("vda")) == checkpoints
    assert_clean(vm)

    # A read-only destination fails the copy before it writes anything; the repository stays as it was.
    subprocess.run(["mount", "-o", "remount,ro", str(small_filesystem)], check=True)
    rc, results, output = fleet.backup()
    failure = " ".join(results["failures"]["vm1"])
    assert rc != 0 and "Cannot open the lease" in failure and "Read-only file system" in failure, output[-3000:]
    assert (small_filesystem / "vm1" / "manifest.json").read_bytes() == manifest
    assert list(vm.named_bitmaps("vda")) == checkpoints
    assert_clean(vm)

    subprocess.run(["mount", "-o", "remount,rw,size=128m", str(small_filesystem)], check=True)
    marks.append(vm.mark("vda"))
    assert_ok(fleet.backup())
    backups = fleet.manifest("vm1")["backups"]
    assert [b["level"] for b in backups] == ["full", "incremental"]
    assert backups[1]["incremental"] == backups[0]["checkpoint"]
    dest = tmp_path / "restored"
    assert_ok(fleet.restore("vm1", dest))
    assert same(str(dest / "vda.qcow2"), vm.expected_image("vda", marks[1], str(tmp_path / "e.raw")))


def test_qemu_killed_during_the_copy_leaves_the_repository_and_the_next_run_is_full(vms, tmp_path):
    vm = vms([DiskSpec("vda")], prepare=lambda vm: vm.write("vda", 0, 4 * MiB, 0x91))
    fleet = Fleet(tmp_path, {"vm1": vm})
    assert_ok(fleet.backup())
    manifest = (fleet.repository / "vm1" / "manifest.json").read_bytes()
    images = fleet.images("vm1")
    vm.write("vda", 8 * MiB, MiB, 0x92)
    vm.flushed_image("vda")

    # Slow copies, followed after a second: QEMU dies while the run copies in the background.
    rc, results, output = fleet.backup(qemu_backup_bandwidth="256K", qemu_backup_progress_interval="1",
                                       at_task=("Show the progress of the copies", support_command(
                                           "from support.processes import end_process; end_process(%d)" % vm.pid)))
    assert rc != 0 and "was not recorded" in " ".join(results["failures"]["vm1"]), output[-3000:]
    assert (fleet.repository / "vm1" / "manifest.json").read_bytes() == manifest
    assert fleet.images("vm1") == images
    assert vm_state_files(str(tmp_path / "state")) == []  # the stop removed the dead backup's socket and state

    vm.kill()
    vm.start()
    mark = vm.mark("vda")
    # The checkpoint of the first backup lived only in the killed QEMU: auto takes a full backup.
    rerun = assert_ok(fleet.backup())
    assert "full backup" in rerun["tasks"]["vm1"]["Report the run"]["msg"]
    assert [b["level"] for b in fleet.manifest("vm1")["backups"]] == ["full", "full"]
    dest = tmp_path / "restored"
    assert_ok(fleet.restore("vm1", dest))
    assert same(str(dest / "vda.qcow2"), vm.expected_image("vda", mark, str(tmp_path / "e.raw")))
    assert_clean(vm)


def test_retention_prunes_whole_old_chains(vms, tmp_path):
    vm = vms([DiskSpec("vda")], prepare=lambda vm: vm.write("vda", 0, MiB, 0x61))
    fleet = Fleet(tmp_path, {"vm1": vm})
    names = []
    for level in ("full", "incremental", "full", "incremental", "full"):
        vm.write("vda", len(names) * MiB, MiB, 0x70 + len(names))
        assert_ok(fleet.backup(qemu_backup_level=level, qemu_backup_keep_chains=2))
        names.append(fleet.manifest("vm1")["backups"][-1]["name"])
    backups = fleet.manifest("vm1")["backups"]
    assert [b["name"] for b in backups] == names[2:]
    assert [b["chain"] for b in backups] == [names[2], names[2], names[4]]
    assert fleet.images("vm1") == sorted("%s.vda.qcow2" % name for name in names[2:])
    assert list(vm.named_bitmaps("vda")) == [backups[-1]["checkpoint"]]


def test_fleet_playbook_backs_up_vms_in_parallel_and_isolates_failures(vms, tmp_path):
    machines = {}
    for index in range(3):
        machines["vm%d" % index] = vms([DiskSpec("vda")], name="vm%d" % index,
                                       prepare=lambda vm, i=index: vm.write("vda", 0, MiB, 0x80 + i))
    fleet = Fleet(tmp_path, machines)
    inventory = json.loads(fleet.inventory.read_text())
    inventory["vms"]["hosts"]["broken"] = {"qemu_backup_qmp_socket": str(tmp_path / "no-such-vm.sock")}
    fleet.inventory.write_text(json.dumps(inventory))
    rc, results, output = fleet.backup()
    assert rc != 0
    assert list(results["failures"]) == ["broken"] and "does not exist" in results["failures"]["broken"][0]
    for name, vm in machines.items():
        assert results["stats"][name]["failures"] == 0, output[-3000:]
        backups = fleet.manifest(name)["backups"]
        assert len(backups) == 1
        image = fleet.repository / name / backups[0]["disks"][0]["file"]
        assert same(str(image), vm.flushed_image("vda"))
        assert_clean(vm)


def test_a_second_run_for_the_same_vm_fails_fast_while_the_first_holds_the_repository(vms, tmp_path):
    vm = vms([DiskSpec("vda")], prepare=lambda vm: vm.write("vda", 0, MiB, 0x71))
    fleet = Fleet(tmp_path, {"vm1": vm})
    mark = vm.mark("vda")
    # While the first run copies, a second one (say, the nightly next to the hourly) runs from start to end.
    second = tmp_path / "second"
    nightly = fleet.command("fleet_backup.yml", second, qemu_backup_level="full")
    # The VM's QEMU is stopped meanwhile, so the first run's copy cannot end (and give up the lease) on a slow machine.
    held_copy = ["sh", "-c", 'kill -STOP "$0"; "$@"; ended=$?; kill -CONT "$0"; exit $ended', str(vm.pid)] + nightly
    rc, results, output = fleet.backup(qemu_backup_bandwidth="256K", qemu_backup_progress_interval="1",
                                       at_task=("Show the progress of the copies", held_copy))
    assert_ok((rc, results, output))
    second_rc, second_results = fleet.outcome(second)
    failure = " ".join(second_results["failures"]["vm1"])
    assert second_rc != 0 and "is locked by another run: play 'Back up the fleet' for vm1" in failure
    assert "wait for it" in failure
    backups = fleet.manifest("vm1")["backups"]
    assert len(backups) == 1 and fleet.images("vm1") == [backups[0]["disks"][0]["file"]]
    restored = tmp_path / "restored"
    assert_ok(fleet.restore("vm1", restored))
    assert same(str(restored / "vda.qcow2"), vm.expected_image("vda", mark, str(tmp_path / "e.raw")))
    # The lease is given up: the next run goes ahead.
    assert_ok(fleet.backup())
    assert len(fleet.manifest("vm1")["backups"]) == 2


def test_a_vm_with_a_qcow2_and_a_raw_disk_keeps_an_incremental_chain(vms, tmp_path):
    def prepare(vm):
        vm.write("vda", 0, 2 * MiB, 0x81)
        vm.write("sdb", 4 * MiB, MiB, 0x82)

    vm = vms([DiskSpec("vda"), DiskSpec("sdb", format="raw", size=16 * MiB, bus="scsi")], prepare=prepare)
    fleet = Fleet(tmp_path, {"vm1": vm})
    marks = []
    for step in range(3):
        marks.append({d: vm.mark(d) for d in vm.disks})
        results = assert_ok(fleet.backup())
        vm.write("vda", (step + 4) * MiB, MiB, 0x90 + step)
        vm.write("sdb", step * MiB, 4096, 0xA0 + step)
    report = results["tasks"]["vm1"]["Report the run"]["msg"]
    assert "incremental backup" in report and "a raw disk is backed up in full every time" in report
    backups = fleet.manifest("vm1")["backups"]
    assert [b["level"] for b in backups] == ["full", "incremental", "incremental"]
    assert [[(d["disk"], d["mode"]) for d in b["disks"]] for b in backups[1:]] == [
        [("vda", "incremental"), ("sdb", "full")]] * 2
    assert list(vm.named_bitmaps("vda")) == [backups[-1]["checkpoint"]]
    for point, backup in enumerate(backups):
        dest = tmp_path / ("restore-%d" % point)
        assert_ok(fleet.restore("vm1", dest, qemu_restore_backup=backup["name"]))
        for disk in vm.disks:
            expected = vm.expected_image(disk, marks[point][disk], str(tmp_path / ("e-%d-%s.raw" % (point, disk))))
            assert same(str(dest / ("%s.qcow2" % disk)), expected)


def test_a_slow_copy_shows_progress_lines_and_the_manifest_records_checksums_that_verify(vms, tmp_path):
    vm = vms([DiskSpec("vda")], prepare=lambda vm: vm.write("vda", 0, 16 * MiB, 0x5A))
    fleet = Fleet(tmp_path, {"vm1": vm})
    mark = vm.mark("vda")
    # 16 MiB at 4 MiB/s: about 4 s of copying, a progress line each second (given as -e gives it: a string).
    rc, results, output = fleet.backup(qemu_backup_bandwidth="4M", qemu_backup_progress_interval="1")
    assert_ok((rc, results, output))
    lines = [round_["progress"] for round_ in results["tasks"]["vm1"]["Show the progress of the copies"]["results"]]
    assert any(re.match(r"^vda: \d+% \([\d.]+ MiB of 16\.0 MiB\) at [\d.]+ MiB/s", line) for line in lines), lines
    assert re.match(r"^vda: done, 16\.0 MiB in \d+ s$", lines[-1]), lines
    assert len(lines) >= 2  # the run went on in the background, followed round by round
    assert "ok: [vm1] => (item=vda: " in output  # the default callback shows each line as its round ends
    [disk] = fleet.manifest("vm1")["backups"][0]["disks"]
    assert disk["checksum"].startswith("xxh3-128-blocks64k:") and disk["bytes_read"] == 16 * MiB
    restored = tmp_path / "restored"
    assert_ok(fleet.restore("vm1", restored))
    assert same(str(restored / "vda.qcow2"), vm.expected_image("vda", mark, str(tmp_path / "e.raw")))
    assert_ok(fleet.run("verify.yml"), changed={"vm1": 0})
    assert_clean(vm)
