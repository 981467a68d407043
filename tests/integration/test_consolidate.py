"""Consolidation: restore points dropped from a chain by merging its images on the repository's host, without the VM;
every remaining point restores the same bytes, verifies, and survives a kill at any step."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.checksum import XXH3_128
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.consolidation import PAUSE_ENV
from support.fleet import Fleet, assert_ok, two_disk_chain
from support.flows import image_checksum, marks, restores_exactly
from support.qemu_vm import MiB
from support.modules import run_module
from support.paths import COLLECTIONS


@pytest.fixture(scope="module")
def built_chain(tmp_path_factory):
    """A running VM of two disks and a chain of four backups (a full and three incrementals) by the backup role; the
    points' flattened images, taken before any consolidation."""
    workdir = tmp_path_factory.mktemp("chain")
    vm, fleet = two_disk_chain(workdir, 4)
    try:
        names = [b["name"] for b in fleet.manifest("vm1")["backups"]]
        flat = workdir / "flat"
        flat.mkdir()
        for name in names:
            for disk in ("vda", "vdb"):
                subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(fleet.repository / "vm1" / (
                    "%s.%s.qcow2" % (name, disk))), str(flat / ("%s.%s.raw" % (name, disk)))], check=True)
        yield vm, fleet.repository, names, flat
    finally:
        vm.kill()


@pytest.fixture
def chain(built_chain, tmp_path):
    """A copy of the built chain's repository for one test: (fleet, backup names, flattened points, the VM)."""
    vm, repository, names, flat = built_chain
    fleet = Fleet(tmp_path, {"vm1": vm})
    shutil.copytree(repository / "vm1", fleet.repository / "vm1")
    return fleet, names, flat, vm


def lock(fleet):
    result = run_module("qemu_backup_repository", repository=str(fleet.repository), vm="vm1", action="lock")
    assert not result.failed, result
    return result["lease"]["run_id"]


def consolidate(fleet, run_id, check_mode=False, **args):
    return run_module("qemu_backup_repository", check_mode=check_mode, repository=str(fleet.repository), vm="vm1",
                      action="consolidate", run_id=run_id, **args)


def image(fleet, name, disk):
    return str(fleet.repository / "vm1" / ("%s.%s.qcow2" % (name, disk)))


def assert_restores_as_before(fleet, flat, names):
    """qemu-img compare of every remaining point, flattened through its chain, with the same point before."""
    for name in names:
        for disk in ("vda", "vdb"):
            compared = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", image(fleet, name, disk),
                                       str(flat / ("%s.%s.raw" % (name, disk)))], capture_output=True, text=True,
                                      check=False)
            assert compared.returncode == 0, (name, disk, compared.stdout, compared.stderr)


def assert_verifies(fleet, names):
    result = run_module("qemu_backup_verify", repository=str(fleet.repository))
    assert not result.failed, result
    [vm_report] = result["vms"]
    assert [(b["name"], b["state"]) for b in vm_report["backups"]] == [(name, "ok") for name in names], vm_report


def listing(names):
    """The VM directory's files when it holds these points: their images, the lease and the manifest."""
    return sorted(["%s.%s.qcow2" % (name, disk) for name in names for disk in ("vda", "vdb")] + ["lock", "manifest.json"])


def repository_state(fleet):
    """Every file of the VM's directory with its content's hash and mtime, but the lease's (renewed)."""
    directory = fleet.repository / "vm1"
    state = {}
    for name in sorted(os.listdir(directory)):
        if name != "lock":
            path = directory / name
            state[name] = (hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns)
    return state


def test_the_oldest_points_merge_into_a_synthetic_full_that_restores_and_verifies_as_before(chain):
    fleet, names, flat, _vm = chain
    run_id = lock(fleet)
    before = repository_state(fleet)
    planned = consolidate(fleet, run_id, check_mode=True, keep_last=2)
    assert not planned.failed and planned["changed"] and planned["pruned"] == names[:2], planned
    [merge] = planned["consolidated"]
    assert (merge["target"], merge["onto"], merge["drop"]) == (names[2], None, names[:2])
    assert [r["layers"] for r in merge["rewrites"]] == [["%s.%s.qcow2" % (n, d) for n in reversed(names[:3])]
                                                        for d in ("vda", "vdb")]
    assert merge["bytes_to_write"] > 0
    assert repository_state(fleet) == before  # check mode changed nothing

    done = consolidate(fleet, run_id, keep_last=2)
    assert not done.failed and done["changed"] and done["pruned"] == names[:2], done
    assert done["obsolete_checkpoints"] == ["ckpt-%s" % n for n in names[:3]]
    manifest = fleet.manifest("vm1")
    assert [b["name"] for b in manifest["backups"]] == names[2:] and manifest["consolidation"] is None
    full, top = manifest["backups"]
    assert (full["level"], full["parent"], full["chain"], top["chain"], top["parent"]) == (
        "full", None, names[2], names[2], names[2])
    for disk in full["disks"]:
        assert disk["mode"] == "full" and disk["backing"] is None
        assert disk["checksum"] == image_checksum(image(fleet, names[2], disk["disk"]), XXH3_128)
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", image(fleet, names[2], disk["disk"])],
                                         check=True, capture_output=True).stdout)
        assert "backing-filename" not in info
        subprocess.run(["qemu-img", "check", "-U", image(fleet, names[2], disk["disk"])], check=True,
                       capture_output=True)
    assert sorted(os.listdir(fleet.repository / "vm1")) == listing(names[2:])
    assert_restores_as_before(fleet, flat, names[2:])
    assert_verifies(fleet, names[2:])
    again = consolidate(fleet, run_id, keep_last=2)
    assert not again.failed and not again["changed"] and again["consolidated"] == []


def test_a_middle_point_is_merged_into_the_next_which_becomes_an_overlay_of_the_one_before(chain):
    fleet, names, flat, _vm = chain
    run_id = lock(fleet)
    done = consolidate(fleet, run_id, drop=[names[1]])
    assert not done.failed and done["pruned"] == [names[1]], done
    [merge] = done["consolidated"]
    assert (merge["target"], merge["onto"]) == (names[2], names[0])
    manifest = fleet.manifest("vm1")
    kept = [names[0]] + names[2:]
    assert [b["name"] for b in manifest["backups"]] == kept
    target = manifest["backups"][1]
    assert (target["parent"], target["level"], target["incremental"]) == (
        names[0], "incremental", "ckpt-%s" % names[0])
    for disk in target["disks"]:
        assert disk["backing"] == "%s.%s.qcow2" % (names[0], disk["disk"])
        assert disk["checksum"] == image_checksum(image(fleet, names[2], disk["disk"]), XXH3_128)
    assert_restores_as_before(fleet, flat, kept)
    assert_verifies(fleet, kept)


def test_consolidation_needs_the_lease_and_refuses_the_newest(chain):
    fleet, names, _flat, _vm = chain
    lock(fleet)
    before = repository_state(fleet)
    refused = consolidate(fleet, "another-run", keep_last=1)
    assert refused.failed and "no longer holds the lease" in refused["msg"], refused
    newest = consolidate(fleet, json.loads((fleet.repository / "vm1" / "lock").read_text())["run_id"],
                         drop=[names[-1]])
    assert newest.failed and "is the newest" in newest["msg"], newest
    assert repository_state(fleet) == before


def test_a_merge_that_fails_while_writing_is_undone_and_leaves_nothing(chain):
    fleet, names, _flat, _vm = chain
    run_id = lock(fleet)
    # The second disk's oldest image swapped for a link to it: never followed, so the merge fails after vda's image.
    oldest = image(fleet, names[0], "vdb")
    os.rename(oldest, oldest + ".moved")
    os.symlink(os.path.basename(oldest) + ".moved", oldest)
    before, manifest = repository_state(fleet), fleet.manifest("vm1")
    failed = consolidate(fleet, run_id, keep_last=2)
    assert failed.failed and "Cannot merge image %s" % os.path.basename(oldest) in failed["msg"], failed
    assert "not a symbolic link" in failed["msg"]
    # vda's new image, written before vdb's failed, is gone; the journal is closed; no image changed.
    after = repository_state(fleet)
    assert after.keys() == before.keys() and all(after[n] == before[n] for n in before if n != "manifest.json")
    assert fleet.manifest("vm1") == dict(manifest, consolidation=None)


def killed_at(fleet, run_id, step, tmp_path, **args):
    """Run the consolidation as its own process and SIGKILL it once it reached step (it waits there on a FIFO)."""
    fifo = str(tmp_path / "pause")
    os.mkfifo(fifo)
    module_args = dict(repository=str(fleet.repository), vm="vm1", action="consolidate", run_id=run_id, **args)
    process = subprocess.Popen(
        [sys.executable, "-m", "ansible_collections.fleetbackup.qemu.plugins.modules.qemu_backup_repository"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=COLLECTIONS, **{PAUSE_ENV: "%s:%s" % (step, fifo)}))
    process.stdin.write(json.dumps({"ANSIBLE_MODULE_ARGS": module_args}).encode())
    process.stdin.close()
    try:
        with open(fifo) as stream:
            assert stream.read() == step, process.stderr.read()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
        process.stderr.close()
        os.unlink(fifo)


@pytest.mark.parametrize("step,merge,finished", [
    ("writing", "oldest", False), ("written", "oldest", False), ("replacing", "oldest", True), ("renamed", "oldest", True),
    ("removing", "oldest", True), ("renamed", "middle", True)])
def test_a_merge_killed_at_any_step_leaves_a_chain_that_restores_and_verifies_and_the_next_run_ends_it(
        chain, tmp_path, step, merge, finished):
    fleet, names, flat, _vm = chain
    dropped = names[:2] if merge == "oldest" else [names[1]]
    run_id = lock(fleet)
    killed_at(fleet, run_id, step, tmp_path, **(dict(keep_last=2) if merge == "oldest" else dict(drop=dropped)))
    journal = fleet.manifest("vm1")["consolidation"]
    assert journal["phase"] == {"renamed": "replacing", "written": "writing"}.get(step, step)
    # As it was left (after "written", vda's new image is complete; after "renamed", one disk's image is its new
    # file, the other's the old one): every point still
    # listed restores as before and verifies, the manifest read as the images are.
    listed = [name for name in names if step != "removing" or name not in dropped]
    assert_restores_as_before(fleet, flat, listed)
    assert_verifies(fleet, listed)
    # The next holder of the lease (once the play gave the dead run's up) finishes the merge, or undoes it when no
    # old image was touched yet.
    assert not run_module("qemu_backup_repository", repository=str(fleet.repository), vm="vm1", action="unlock",
                          run_id=run_id).failed
    lock(fleet)
    manifest = fleet.manifest("vm1")
    assert manifest["consolidation"] is None
    left = [name for name in names if not finished or name not in dropped]
    assert [b["name"] for b in manifest["backups"]] == left
    assert sorted(os.listdir(fleet.repository / "vm1")) == listing(left)
    assert_restores_as_before(fleet, flat, left)
    assert_verifies(fleet, left)


def test_the_backup_role_keeps_the_last_points_and_the_next_incremental_continues_the_consolidated_chain(chain,
                                                                                                         tmp_path):
    fleet, names, flat, vm = chain
    points = marks(vm)
    assert_ok(fleet.backup(qemu_backup_keep_last=3))
    manifest = fleet.manifest("vm1")
    newest = manifest["backups"][-1]
    assert [b["name"] for b in manifest["backups"]] == names[2:] + [newest["name"]]
    assert (newest["level"], newest["parent"], newest["chain"]) == ("incremental", names[-1], names[2])
    assert manifest["backups"][0]["level"] == "full"
    assert_restores_as_before(fleet, flat, names[2:])
    for disk in ("vda", "vdb"):
        assert restores_exactly(vm, tmp_path, disk, image(fleet, newest["name"], disk), points[disk])
    assert_verifies(fleet, names[2:] + [newest["name"]])


def test_a_compressed_chain_consolidates_into_a_compressed_full(tmp_path):
    vm, fleet = two_disk_chain(tmp_path, 3, qemu_backup_compress="zstd")
    try:
        names = [b["name"] for b in fleet.manifest("vm1")["backups"]]
        flat = tmp_path / "flat"
        flat.mkdir()
        for disk in ("vda", "vdb"):
            subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", image(fleet, names[2], disk),
                            str(flat / ("%s.%s.raw" % (names[2], disk)))], check=True)
        done = consolidate(fleet, lock(fleet), keep_last=1)
        assert not done.failed and done["pruned"] == names[:2], done
        for disk in ("vda", "vdb"):
            info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", image(fleet, names[2], disk)],
                                             check=True, capture_output=True).stdout)
            assert info["format-specific"]["data"]["compression-type"] == "zstd" and "backing-filename" not in info
            subprocess.run(["qemu-img", "check", "-U", image(fleet, names[2], disk)], check=True, capture_output=True)
        # vdb's 3 MiB of one byte value take a few KiB compressed: its clusters are compressed, not only declared so.
        assert os.stat(image(fleet, names[2], "vdb")).st_size < MiB
        assert_restores_as_before(fleet, flat, names[2:])
        assert_verifies(fleet, names[2:])
    finally:
        vm.kill()


def test_an_encrypted_chain_that_needs_a_merge_is_refused_before_anything_is_written(chain):
    fleet, names, _flat, _vm = chain
    run_id = lock(fleet)
    manifest = fleet.manifest("vm1")
    manifest["backups"][0]["disks"][1]["encryption"] = "luks"  # as a chain written with encryption records it
    (fleet.repository / "vm1" / "manifest.json").write_text(json.dumps(manifest))
    before = repository_state(fleet)
    for check_mode in (True, False):
        refused = consolidate(fleet, run_id, check_mode=check_mode, keep_last=2)
        assert refused.failed and "they are encrypted: this version consolidates only plain chains" in refused["msg"]
        assert repository_state(fleet) == before, check_mode


def test_a_lock_whose_resume_fails_gives_up_the_lease_it_made_up(chain):
    fleet, names, _flat, _vm = chain
    manifest = fleet.manifest("vm1")
    target = "%s.vda.qcow2" % names[2]
    # A merge half-way through its renames whose new file is neither in place nor where it was written.
    manifest["consolidation"] = dict(phase="replacing", target=names[2], onto=None, drop=names[:2], remove=[],
                                     disks=[dict(disk="vda", file=target, temp=target + ".merge-0badf00d",
                                                 backing=None, identity=[1, 2], checksum=None)])
    (fleet.repository / "vm1" / "manifest.json").write_text(json.dumps(manifest))
    failed = run_module("qemu_backup_repository", repository=str(fleet.repository), vm="vm1", action="lock")
    assert failed.failed and "stopped half-way" in failed["msg"], failed
    assert os.stat(fleet.repository / "vm1" / "lock").st_size == 0  # nobody holds it: no run_id was handed out
