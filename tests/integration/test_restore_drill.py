"""Restore drills: a backup of a real guest boots in an isolated QEMU and passes, a damaged one fails saying why."""

import json
import os
import subprocess

from support.fleet import Fleet, assert_ok
from support.guest import ROOT_FS_OFFSET, BootedGuestVm, file_digest, kit_path
from support.modules import run_module
from support.processes import descendants

# ext4's primary superblock is 1024 bytes into the file system; s_last_mounted, 64 bytes, at 0x88 in it.
LAST_MOUNTED = ROOT_FS_OFFSET + 1024 + 0x88


def guest_fleet(vms, tmp_path, names):
    """Booted guests with the workload writing, in a fleet whose backups freeze them through their agents."""
    machines = {name: vms([], name=name, kind=BootedGuestVm) for name in names}
    for vm in machines.values():
        with vm.agent() as agent:  # waits for the boot
            assert agent.run("fbg-workload", ["start", "64"]).exitcode == 0
            assert agent.run("fbg-workload", ["wait", "5"], timeout=90).exitcode == 0
    fleet = Fleet(tmp_path, machines)
    inventory = json.loads(fleet.inventory.read_text())
    for name, vm in machines.items():
        inventory["vms"]["hosts"][name]["qemu_backup_guest_agent_socket"] = vm.agent_socket
    inventory["vms"]["vars"].update(qemu_drill_accel="tcg", qemu_drill_command=["fbg-workload", "verify"])
    fleet.inventory.write_text(json.dumps(inventory))
    return machines, fleet


def drill(fleet, vm, **args):
    return run_module("qemu_restore_drill", repository=str(fleet.repository), vm=vm,
                      state_dir=str(fleet.tmp_path / "state"), accel="tcg", **args)


def assert_nothing_left(fleet):
    assert os.listdir(fleet.tmp_path / "state" / "drills") == []
    assert descendants(os.getpid()) == []  # the drill's QEMU is gone (the VMs' QEMUs are daemons)


def damage_superblock(image):
    """Bytes of the superblock change under its checksum: the bootloader still reads it, the kernel refuses it."""
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a %d 16" % LAST_MOUNTED, image], check=True,
                   stdout=subprocess.DEVNULL)


def test_the_drill_passes_on_a_good_backup_and_fails_saying_why_on_a_damaged_superblock(vms, tmp_path):
    _machines, fleet = guest_fleet(vms, tmp_path, ["guest"])
    assert_ok(fleet.backup())
    newest = fleet.manifest("guest")["backups"][-1]
    assert newest["consistency"] == "application" and 0 < newest["freeze"]["seconds"] < 2
    image = str(fleet.repository / "guest" / newest["disks"][0]["file"])
    before = (file_digest(image), os.stat(image).st_mtime_ns)

    planned = drill(fleet, "guest", _ansible_check_mode=True)
    assert planned["changed"] is False and planned["drill"]["passed"] is None
    assert planned["drill"]["disks"] == [dict(disk="vda", image=image, bus="virtio")]

    good = drill(fleet, "guest", command=["fbg-workload", "verify"], boot_timeout=120)["drill"]
    assert good["passed"] is True and good["problems"] == [] and good["backup"] == newest["name"]
    assert 0 < good["boot_seconds"] < good["seconds"] and good["firmware"] == "bios"
    assert good["filesystems"] == [dict(mountpoint="/", type="ext4", device="vda1")]
    verified, logged = good["command"]["stdout"].split()
    assert good["command"]["exitcode"] == 0 and verified == "verified" and int(logged) >= 5
    assert (file_digest(image), os.stat(image).st_mtime_ns) == before  # the repository was never written
    assert_nothing_left(fleet)

    # A restored image whose file system lost its superblock: the guest cannot mount its root and powers off.
    restored = tmp_path / "restored"
    restored.mkdir()
    result = run_module("qemu_backup_restore", repository=str(fleet.repository), vm="guest", dest=str(restored))
    damage_superblock(result["disks"][0]["image"])
    bad = drill(fleet, "guest", images=dict(vda=result["disks"][0]["image"]), boot_timeout=120)
    assert bad.failed and "QEMU exited (status 0) before the guest agent answered" in bad["msg"], bad["msg"]
    assert "the console's last lines: " in bad["msg"] and "FBG ERROR mount /dev/vda1" in bad["msg"]
    assert bad["drill"]["passed"] is False and bad["drill"]["boot_seconds"] is None
    assert "FBG ERROR mount /dev/vda1" in bad["drill"]["console"], bad["drill"]["console"]
    assert_nothing_left(fleet)

    unknown = drill(fleet, "guest", images=dict(vdz=image))
    assert unknown.failed and "has no disk vdz; it has vda" in unknown["msg"]


def test_the_drill_role_over_a_fleet_runs_with_forks_and_ends_with_a_summary(vms, tmp_path):
    _machines, fleet = guest_fleet(vms, tmp_path, ["good", "bad"])
    assert_ok(fleet.backup(qemu_backup_compress="zstd"))  # compressed images boot as any other
    assert [fleet.manifest(vm)["backups"][-1]["consistency"] for vm in ("good", "bad")] == ["application"] * 2
    newest = fleet.manifest("bad")["backups"][-1]
    image = fleet.repository / "bad" / newest["disks"][0]["file"]
    checked = subprocess.run(["qemu-img", "check", "--output=json", str(image)], stdout=subprocess.PIPE, check=True)
    assert json.loads(checked.stdout)["compressed-clusters"] > 0
    sound = image.read_bytes()
    damage_superblock(str(image))

    rc, results, output = fleet.run("restore_drill.yml", qemu_drill_boot_timeout=120)
    assert rc != 0 and list(results["failures"]) == ["bad"], output[-3000:]
    summary, = [tasks["Report the summary"]["msg"] for tasks in results["tasks"].values()
                if "Report the summary" in tasks]
    good, bad = sorted(summary, reverse=True)
    assert good.startswith("good: PASS, backup %s booted in " % fleet.manifest("good")["backups"][-1]["name"])
    assert good.endswith(", 1 file system(s), fbg-workload verify exited 0"), good
    assert bad.startswith("bad: FAIL, backup %s: QEMU exited (status 0) before the guest agent answered"
                          % newest["name"]), bad
    assert "FBG ERROR mount /dev/vda1" in " ".join(results["failures"]["bad"])
    assert_nothing_left(fleet)

    # The same for every VM of a repository, with its backup sound again, on the controller.
    image.write_bytes(sound)
    rc, results, output = fleet.run("restore_drill.yml", drill_repository=str(fleet.repository))
    assert rc == 0 and results["failures"] == {}, output[-3000:]
    summary, = [tasks["Report the summary"]["msg"] for tasks in results["tasks"].values()
                if "Report the summary" in tasks]
    assert sorted(line.split(",")[0] for line in summary) == ["bad: PASS", "good: PASS"]
    assert_nothing_left(fleet)


def test_a_guest_stuck_in_its_bootloader_fails_once_its_console_falls_silent(tmp_path):
    """The guest kit's disk with a bootloader whose kernel is gone: SYSLINUX says so on the console, then waits."""
    raw = str(tmp_path / "stuck.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", os.path.join(kit_path(), "disk.qcow2"), raw], check=True)
    config = tmp_path / "extlinux.conf"
    config.write_text("SERIAL 0 115200\nPROMPT 0\nTIMEOUT 0\nDEFAULT gone\nLABEL gone\n  LINUX /boot/no-such-kernel\n")
    root = "%s?offset=%d" % (raw, ROOT_FS_OFFSET)
    for request in ("rm /boot/extlinux/extlinux.conf", "write %s /boot/extlinux/extlinux.conf" % config):
        subprocess.run(["debugfs", "-w", "-R", request, root], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    repository = tmp_path / "repository"
    (repository / "stuck").mkdir(parents=True)
    image = repository / "stuck" / "b1.vda.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, str(image)], check=True)
    size = os.stat(raw).st_size
    (repository / "stuck" / "manifest.json").write_text(json.dumps(dict(format=1, vm="stuck", backups=[dict(
        name="b1", level="full", parent=None, chain="b1", checkpoint=None, finished=1,
        disks=[dict(disk="vda", file="b1.vda.qcow2", size=size, format="qcow2")])])))
    state = tmp_path / "state"
    failed = run_module("qemu_restore_drill", repository=str(repository), vm="stuck", state_dir=str(state),
                        accel="tcg", boot_timeout=600, console_silence_timeout=5)
    assert failed.failed and "wrote nothing more on its serial console for 5 s" in failed["msg"]
    assert "no-such-kernel" in failed["msg"]  # the console's last lines show where it stuck
    assert failed["drill"]["seconds"] < 120  # it did not wait for boot_timeout
    assert os.listdir(state / "drills") == [] and descendants(os.getpid()) == []
