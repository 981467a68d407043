"""Checkpoints and incremental chains against a real QEMU, restored with qemu-img convert and compared."""

import os
import subprocess

from support.flows import Backups
from support.qemu_vm import DiskSpec, MiB, same


def flatten(top, path):
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", top, path], check=True)
    return path


def assert_restores(vm, tmp_path, disk, top, mark, size=None):
    flat = flatten(top, str(tmp_path / ("flat-%s-%d.raw" % (disk, mark))))
    expected = vm.expected_image(disk, mark, str(tmp_path / ("expected-%s-%d.raw" % (disk, mark))), size)
    assert same(flat, expected), "%s does not restore %s as of write %d" % (top, disk, mark)


def backing_of(image):
    return subprocess.run(["qemu-img", "info", "-U", "--output=json", image], check=True,
                          stdout=subprocess.PIPE, text=True).stdout


def test_chain_restores_every_point_and_reads_only_dirty_bytes(vms, tmp_path):
    def prepare(vm):
        vm.write("vda", 0, 8 * MiB, 0x11)
        vm.write("vda", 32 * MiB, 8 * MiB, 0x12)
        vm.write("vdb", 0, 4 * MiB, 0x21)

    vm = vms([DiskSpec("vda", size=128 * MiB), DiskSpec("vdb")], prepare=prepare)
    flow = Backups(vm, str(tmp_path))
    repo = tmp_path / "repo"
    repo.mkdir()
    marks = []

    # Full, opening c1.
    marks.append({d: vm.mark(d) for d in vm.disks})
    full = flow.start("b1", checkpoint="c1")["backup"]
    assert [d["mode"] for d in full["disks"]] == ["full", "full"]
    vm.write("vda", 100 * MiB, MiB, 0x99)  # after the freeze: belongs to the next backup
    flow.copy_all(full, str(repo), "b1")
    assert flow.stop("b1")["changed"] is True

    # Guest changes: data, zeroes over old data, a discard of old data.
    vm.write("vda", 2 * MiB, MiB, 0x31)
    vm.zero("vda", 4 * MiB, 2 * MiB)
    vm.discard("vda", 36 * MiB, 2 * MiB)
    vm.write("vdb", 10 * MiB, MiB, 0x32)

    # Incremental since c1, opening c2.
    marks.append({d: vm.mark(d) for d in vm.disks})
    inc = flow.start("b2", incremental="c1", checkpoint="c2")["backup"]
    vda = inc["disks"][0]
    assert vda["mode"] == "incremental" and vda["dirty_bitmap"] == "qemu:dirty-bitmap:fb-b2"
    # 0x99 (1), data (1), zeros (2), discard (2) MiB, each aligned to the 64 KiB granularity.
    assert vda["dirty_bytes"] == 6 * MiB
    vm.write("vda", 60 * MiB, MiB, 0x77)  # during the backup: not in b2, in b3
    copies = flow.copy_all(inc, str(repo), "b2", previous_prefix="b1")
    assert copies["vda"]["bytes_read"] == 2 * MiB
    assert copies["vda"]["bytes_read"] + copies["vda"]["bytes_zeroed"] == vda["dirty_bytes"]
    assert copies["vdb"]["bytes_read"] == MiB
    assert '"backing-filename": "b1.vda.qcow2"' in backing_of(str(repo / "b2.vda.qcow2"))
    flow.stop("b2")

    vm.write("vda", 64 * MiB, 2 * MiB, 0x41)
    marks.append({d: vm.mark(d) for d in vm.disks})
    inc2 = flow.start("b3", incremental="c2", checkpoint="c3")["backup"]
    copies = flow.copy_all(inc2, str(repo), "b3", previous_prefix="b2")
    assert copies["vda"]["bytes_read"] == 3 * MiB and copies["vdb"]["bytes_read"] == 0
    flow.stop("b3")

    for point, prefix in enumerate(("b1", "b2", "b3")):
        for disk in vm.disks:
            assert_restores(vm, tmp_path, disk, str(repo / ("%s.%s.qcow2" % (prefix, disk))), marks[point][disk])

    # A differential since c1 while c2 and c3 exist: one overlay on the full backup.
    marks.append({d: vm.mark(d) for d in vm.disks})
    diff = flow.start("d1", incremental="c1")["backup"]
    flow.copy_all(diff, str(repo), "d1", previous_prefix="b1")
    flow.stop("d1")
    for disk in vm.disks:
        assert_restores(vm, tmp_path, disk, str(repo / ("d1.%s.qcow2" % disk)), marks[3][disk])
    assert sorted(vm.named_bitmaps("vda")) == ["c1", "c2", "c3"]
    flow.assert_nothing_left()

    # The repository can move: backing files are relative.
    moved = tmp_path / "moved"
    os.rename(repo, moved)
    assert_restores(vm, tmp_path, "vda", str(moved / "b3.vda.qcow2"), marks[2]["vda"])


def test_failed_copy_discards_its_checkpoint(vms, tmp_path):
    vm = vms([DiskSpec("vda")], prepare=lambda vm: vm.write("vda", 0, MiB, 0x10))
    flow = Backups(vm, str(tmp_path))
    flow.start("b1", checkpoint="c1")
    flow.stop("b1")
    flow.start("b2", incremental="c1", checkpoint="c2")
    assert sorted(vm.named_bitmaps("vda")) == ["c1", "c2", "fb-b2"]
    stopped = flow.stop("b2", discard_checkpoint=True)
    assert stopped["removed"]["checkpoint"] == "c2"
    assert sorted(vm.named_bitmaps("vda")) == ["c1"]
    assert flow.stop("b2", discard_checkpoint=True)["changed"] is False
    flow.assert_nothing_left()


def test_inconsistent_checkpoint_after_kill_fails_or_falls_back(vms, tmp_path):
    vm = vms([DiskSpec("vda")], prepare=lambda vm: vm.write("vda", 0, MiB, 0x10))
    flow = Backups(vm, str(tmp_path))
    flow.start("b1", checkpoint="c1")
    flow.stop("b1")
    # QEMU stores a new bitmap in the image only when it closes it; one that was loaded is marked in use.
    vm.quit()
    vm.start()
    vm.write("vda", MiB, MiB, 0x20)
    vm.flushed_image("vda")  # the guest's flush: without it the crash may lose the write itself
    vm.kill()
    vm.start()
    assert vm.named_bitmaps("vda")["c1"]["inconsistent"] is True
    refused = flow.start("b2", incremental="c1", checkpoint="c2")
    assert refused.failed and "inconsistent" in refused["msg"] and "fallback_to_full" in refused["msg"]
    flow.assert_nothing_left()
    assert "c2" not in vm.named_bitmaps("vda")

    mark = vm.mark("vda")
    fallback = flow.start("b2", incremental="c1", checkpoint="c2", fallback_to_full=True)["backup"]
    disk = fallback["disks"][0]
    assert disk["mode"] == "full" and "inconsistent" in disk["reason"] and disk["dirty_bitmap"] is None
    copies = flow.copy_all(fallback, str(tmp_path), "b2")
    flow.stop("b2")
    assert_restores(vm, tmp_path, "vda", str(tmp_path / "b2.vda.qcow2"), mark)
    info = flow.info()
    checkpoints = {c["name"]: c for c in info["disks"][0]["checkpoints"]}
    assert checkpoints["c1"]["inconsistent"] is True and checkpoints["c1"]["usable"] is False
    assert checkpoints["c2"]["usable"] is True and copies["vda"]["bytes_read"] == 2 * MiB
    removed = flow.checkpoint("c1", state="absent")
    assert removed["changed"] is True and removed["disks"] == ["vda"]


def test_resized_disk_needs_a_full_backup(vms, tmp_path):
    vm = vms([DiskSpec("vda")], prepare=lambda vm: vm.write("vda", 40 * MiB, 8 * MiB, 0x10))
    flow = Backups(vm, str(tmp_path))
    flow.start("b1", checkpoint="c1")
    flow.stop("b1")
    # Shrinking and growing back leaves zeros where the last backup holds data, and no dirty bit on them.
    vm.resize("vda", 32 * MiB)
    vm.resize("vda", 96 * MiB)
    refused = flow.start("b2", incremental="c1")
    assert refused.failed and "resized from 67108864 to 100663296 bytes" in refused["msg"]
    mark = vm.mark("vda")
    fallback = flow.start("b2", incremental="c1", fallback_to_full=True)["backup"]
    assert fallback["disks"][0]["mode"] == "full" and "resized" in fallback["disks"][0]["reason"]
    flow.copy_all(fallback, str(tmp_path), "b2")
    flow.stop("b2")
    assert_restores(vm, tmp_path, "vda", str(tmp_path / "b2.vda.qcow2"), mark, size=96 * MiB)


def test_checkpoint_survives_a_clean_restart(vms, tmp_path):
    vm = vms([DiskSpec("vda")], prepare=lambda vm: vm.write("vda", 0, 2 * MiB, 0x10))
    flow = Backups(vm, str(tmp_path))
    flow.copy_all(flow.start("b1", checkpoint="c1")["backup"], str(tmp_path), "b1")
    flow.stop("b1")
    vm.write("vda", 8 * MiB, MiB, 0x20)
    vm.quit()
    vm.start()
    assert vm.named_bitmaps("vda")["c1"]["count"] == MiB
    mark = vm.mark("vda")
    inc = flow.start("b2", incremental="c1")["backup"]
    assert inc["disks"][0]["mode"] == "incremental"
    assert flow.copy_all(inc, str(tmp_path), "b2", previous_prefix="b1")["vda"]["bytes_read"] == MiB
    flow.stop("b2")
    assert_restores(vm, tmp_path, "vda", str(tmp_path / "b2.vda.qcow2"), mark)


def test_checkpoint_module_and_info(vms, tmp_path):
    vm = vms([DiskSpec("vda"), DiskSpec("sdb", format="raw", bus="scsi")])
    flow = Backups(vm, str(tmp_path))
    refused = flow.checkpoint("c1")
    assert refused.failed and "need qcow2" in refused["msg"] and "sdb" in refused["msg"]
    assert flow.checkpoint("c1", disks=["vda"], check_mode=True)["changed"] is True
    assert vm.named_bitmaps("vda") == {}
    assert flow.checkpoint("c1", disks=["vda"])["disks"] == ["vda"]
    assert flow.checkpoint("c1", disks=["vda"])["changed"] is False
    vm.write("vda", 0, MiB, 0x55)

    started = flow.start("b1", disks=["vda"], incremental="c1")["backup"]
    info = flow.info()
    assert info["changed"] is False
    vda = info["disks"][0]
    assert (vda["disk"], vda["node"], vda["format"], vda["size"]) == ("vda", "vda-fmt", "qcow2", 64 * MiB)
    assert vda["file"] == vm.image("vda")
    assert [(c["name"], c["dirty_bytes"], c["persistent"], c["size_at_checkpoint"]) for c in vda["checkpoints"]] \
        == [("c1", MiB, True, 64 * MiB)]
    assert list(info["backups"]) == ["b1"] and info["backups"]["b1"]["complete"] is True
    assert started["disks"][0]["dirty_bytes"] == MiB
    flow.stop("b1")
    assert flow.info()["backups"] == {}

    assert flow.checkpoint("c1", state="absent")["changed"] is True
    assert flow.checkpoint("c1", state="absent")["changed"] is False
    assert vm.named_bitmaps("vda") == {}
