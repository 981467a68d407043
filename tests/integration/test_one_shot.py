"""qemu_backup, the whole run in one process, against real QEMU: the guarantees the role gives, in one module run."""

import json
import os
import signal

from support.fleet import assert_clean
from support.flows import vm_state_files
from support.modules import run_module
from support.processes import end_process
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


def test_a_killed_run_is_taken_over_at_once_and_cleaned_up_by_the_next(vms, tmp_path):
    vm = vms([DiskSpec("vda")], prepare=lambda vm: vm.write("vda", 0, 8 * MiB, 0x21))
    (tmp_path / "repository").mkdir()
    (tmp_path / "scratch").mkdir()
    assert backup(vm, tmp_path)["summary"]["result"] == "ok"
    [first] = manifest(tmp_path)["backups"]
    vm.write("vda", 16 * MiB, 8 * MiB, 0x22)
    # 8 MiB at 1 MiB/s: the run goes on in the background after half a second.
    started = backup(vm, tmp_path, bandwidth="1M", background_after=0.5)
    assert started["finished"] is False, started
    followed = started
    for _round in range(20):  # until the run has started its backup and copies: its progress names the disk
        if followed["msg"].startswith("vda: "):
            break
        followed = run_module("qemu_backup", step="follow", job=started["job"], state_dir=str(tmp_path / "state"),
                              wait=0.5)
    assert followed["finished"] is False and followed["msg"].startswith("vda: "), followed
    job_file = tmp_path / "state" / "runs" / ("%s.json" % started["job"])
    record = json.loads(job_file.read_text())
    assert record["state"] == "running" and record["dests"][0][1] == "vda"
    given_up = run_module("qemu_backup", step="follow", job=started["job"], state_dir=str(tmp_path / "state"), wait=0,
                          fail_if_running=True)
    assert given_up.failed and "job %s is still at work (vda: " % started["job"] in given_up["msg"], given_up
    assert vm.leftovers()["exports"], "the run to kill must have its backup running on the VM"
    opened = [name for name in vm.named_bitmaps("vda") if name.startswith("ckpt-") and name != first["checkpoint"]]
    assert first["checkpoint"] in vm.named_bitmaps("vda") and opened  # the chain's checkpoint, and the run's own
    end_process(record["owner"]["pid"], signal.SIGKILL)  # this test's own run, by its PID

    # Nothing is due, yet the dead run's backup and checkpoint go, and the chain's checkpoint stays.
    quiet = backup(vm, tmp_path, max_age="1h")
    assert quiet["changed"] and quiet["summary"]["result"] == "nothing due", quiet
    assert any("which a run that died left running" in note for note in quiet["notes"]), quiet["notes"]
    assert list(vm.named_bitmaps("vda")) == [first["checkpoint"]]
    assert_clean(vm)
    files = sorted(os.listdir(tmp_path / "repository" / "vm1"))
    assert files == sorted(("lock", "manifest.json", first["disks"][0]["file"])), files
    assert (tmp_path / "repository" / "vm1" / "lock").read_text() == ""  # given up

    mark = vm.mark("vda")
    rerun = backup(vm, tmp_path)
    assert rerun["summary"]["result"] == "ok" and rerun["summary"]["level"] == "incremental", rerun
    backups = manifest(tmp_path)["backups"]
    assert [b["level"] for b in backups] == ["full", "incremental"]
    image = tmp_path / "repository" / "vm1" / backups[1]["disks"][0]["file"]
    assert same(str(image), vm.expected_image("vda", mark, str(tmp_path / "e.raw")))
    assert_clean(vm)
    # The dead run's job says what happened to it.
    gone = run_module("qemu_backup", step="follow", job=started["job"], state_dir=str(tmp_path / "state"), wait=0)
    assert gone.failed and "its process %d is gone" % record["owner"]["pid"] in gone["msg"], gone
    assert not job_file.exists()


def test_check_mode_predicts_the_level_and_the_bytes_and_writes_nothing(vms, tmp_path):
    vm = vms([DiskSpec("vda")], prepare=lambda vm: vm.write("vda", 0, 2 * MiB, 0x31))
    (tmp_path / "repository").mkdir()
    (tmp_path / "scratch").mkdir()
    assert backup(vm, tmp_path)["summary"]["result"] == "ok"
    vm.write("vda", 16 * MiB, 3 * MiB, 0x32)
    before = {name: (tmp_path / "repository" / "vm1" / name).read_bytes()
              for name in os.listdir(tmp_path / "repository" / "vm1")}
    predicted = backup(vm, tmp_path, check_mode=True)
    assert predicted["changed"] and predicted["summary"]["level"] == "incremental", predicted
    assert predicted["summary"]["bytes"] == 3 * MiB and "3.0 MiB" in predicted["msg"]
    after = {name: (tmp_path / "repository" / "vm1" / name).read_bytes()
             for name in os.listdir(tmp_path / "repository" / "vm1")}
    assert after == before
    assert_clean(vm)


def test_copies_past_copy_timeout_are_stopped_and_the_run_leaves_nothing(vms, tmp_path):
    vm = vms([DiskSpec("vda")], prepare=lambda vm: vm.write("vda", 0, 8 * MiB, 0x41))
    (tmp_path / "repository").mkdir()
    (tmp_path / "scratch").mkdir()
    # 8 MiB at 1 MiB/s outlasts the copy's one second: only the deadline ends it.
    failed = backup(vm, tmp_path, bandwidth="1M", copy_timeout=1)
    assert failed.failed and "did not end in the time it was given (copy_timeout)" in failed["msg"], failed
    assert failed["summary"]["result"] == "failed"
    assert_clean(vm)
    assert list(vm.named_bitmaps("vda")) == []
    files = sorted(os.listdir(tmp_path / "repository" / "vm1"))
    assert files == ["lock"] and (tmp_path / "repository" / "vm1" / "lock").read_text() == "", files
    mark = vm.mark("vda")
    done = backup(vm, tmp_path)
    assert done["summary"]["result"] == "ok" and done["summary"]["level"] == "full", done
    [entry] = manifest(tmp_path)["backups"]
    image = tmp_path / "repository" / "vm1" / entry["disks"][0]["file"]
    assert same(str(image), vm.expected_image("vda", mark, str(tmp_path / "e.raw")))


def test_abort_undoes_a_started_run_and_says_changed_only_when_it_did(vms, tmp_path):
    vm = vms([DiskSpec("vda")], prepare=lambda vm: vm.write("vda", 0, 2 * MiB, 0x51))
    (tmp_path / "repository").mkdir()
    (tmp_path / "scratch").mkdir()
    begun = backup(vm, tmp_path, step="begin")
    started = backup(vm, tmp_path, step="start", run=begun["run"])
    assert started["changed"] and vm.leftovers()["exports"], started
    aborted = backup(vm, tmp_path, step="abort", run=started["run"], reason="the test aborts it")
    assert aborted["changed"] and aborted["summary"]["result"] == "failed", aborted
    assert aborted["summary"]["reason"] == "the test aborts it"
    assert_clean(vm)
    assert list(vm.named_bitmaps("vda")) == []
    assert os.listdir(tmp_path / "repository" / "vm1") == ["lock"]
    assert (tmp_path / "repository" / "vm1" / "lock").read_text() == ""
    again = backup(vm, tmp_path, step="abort", run=started["run"])
    assert not again["changed"] and again["discarded"] == [], again
