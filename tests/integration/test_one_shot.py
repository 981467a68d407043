"""qemu_backup, the whole run in one process, against real QEMU: the guarantees the role gives, in one module run."""

import json
import os

from support.fleet import assert_clean
from support.flows import vm_state_files
from support.modules import run_module
from support.qemu_vm import DiskSpec, MiB, same


def backup(vm, tmp_path, check_mode=False, **args):
    args = dict(vm.connection_args(), repository=str(tmp_path / "repository"), vm="vm1",
                state_dir=str(tmp_path / "state"), scratch_dir=str(tmp_path / "scratch"), **args)
    return run_module("qemu_backup", check_mode=check_mode, **args)


def manifest(tmp_path):
    with open(tmp_path / "repository" / "vm1" / "manifest.json") as stream:
        return json.load(stream)


def test_one_task_takes_a_chain_that_restores_exactly(vms, tmp_path):
    vm = vms([DiskSpec("vda"), DiskSpec("vdb")], prepare=lambda vm: vm.write("vda", 0, 4 * MiB, 0x11))
    (tmp_path / "repository").mkdir()
    (tmp_path / "scratch").mkdir()
    predicted = backup(vm, tmp_path, check_mode=True)
    assert predicted["changed"] and predicted["summary"]["result"] == "would back up", predicted
    assert predicted["summary"]["level"] == "full" and not (tmp_path / "repository" / "vm1").exists()
    marks = []
    for step in range(3):
        marks.append({d: vm.mark(d) for d in vm.disks})
        done = backup(vm, tmp_path, keep_chains=1)
        assert done["changed"] and done["summary"]["result"] == "ok", done
        vm.write("vda", (step + 1) * 8 * MiB, MiB, 0x30 + step)
    backups = manifest(tmp_path)["backups"]
    assert [b["level"] for b in backups] == ["full", "incremental", "incremental"]
    assert backups[1]["dirty_bytes"] == MiB and backups[2]["disk_bytes"] == sum(spec.size for spec in vm.disks.values())
    assert done["summary"]["change"]["share"] > 0 and not done["summary"]["change"]["flagged"]
    assert list(vm.named_bitmaps("vda")) == [backups[2]["checkpoint"]]
    assert vm_state_files(str(tmp_path / "state")) == []
    assert_clean(vm)
    for point, entry in enumerate(backups):
        for disk in entry["disks"]:
            image = str(tmp_path / "repository" / "vm1" / disk["file"])
            expected = vm.expected_image(disk["disk"], marks[point][disk["disk"]], str(tmp_path / "e.raw"))
            assert same(image, expected)
    # Not due: the lease is taken and given back, nothing else.
    again = backup(vm, tmp_path, max_age="1h")
    assert not again["changed"] and again["summary"]["result"] == "nothing due", again
    assert len(manifest(tmp_path)["backups"]) == 3
