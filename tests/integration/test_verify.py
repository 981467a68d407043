"""Verify: a repository built by the backup role, checked without its VM; damage of every kind is found and named
with every backup that needs the damaged image."""

import json
import os
import shutil
import subprocess

import pytest

from support.fleet import Fleet, assert_ok
from support.modules import run_module
from support.qemu_vm import DiskSpec, MiB, Vm

CLUSTER = 65536


@pytest.fixture(scope="module")
def built_chain(tmp_path_factory):
    """A VM of two disks and a chain of three backups (full, incremental, incremental) made by the backup role."""
    workdir = tmp_path_factory.mktemp("chain")
    (workdir / "vm").mkdir()
    vm = Vm(str(workdir / "vm"), [DiskSpec("vda"), DiskSpec("vdb")])
    vm.write("vda", 0, CLUSTER, 0x11)
    vm.write("vda", MiB, CLUSTER, 0x22)
    vm.write("vdb", 2 * MiB, 3 * MiB, 0x33)
    try:
        vm.start()
        fleet = Fleet(workdir, {"vm1": vm})
        for step in range(3):
            assert_ok(fleet.backup())
            vm.write("vda", (step + 4) * MiB, MiB, 0x40 + step)
            vm.zero("vdb", 2 * MiB + step * MiB, CLUSTER)  # an overlay hides these with zero clusters
    finally:
        vm.kill()  # verify needs no VM
    return vm, fleet.repository


@pytest.fixture
def chain(built_chain, tmp_path):
    """A copy of the built chain's repository for one test to damage."""
    vm, repository = built_chain
    fleet = Fleet(tmp_path, {"vm1": vm})
    shutil.copytree(repository / "vm1", fleet.repository / "vm1")
    return fleet, [b["name"] for b in fleet.manifest("vm1")["backups"]]


def verify(fleet, **args):
    return run_module("qemu_backup_verify", repository=str(fleet.repository), **args)


def image(fleet, backup, disk):
    return fleet.repository / "vm1" / ("%s.%s.qcow2" % (backup, disk))


def data_clusters(path):
    """{guest offset: host offset} of the data clusters an image holds itself (read without its backing file)."""
    spec = json.dumps(dict(driver="qcow2", file=dict(driver="file", filename=str(path)), backing=None))
    extents = json.loads(subprocess.run(["qemu-img", "map", "--output=json", "json:" + spec], check=True,
                                        stdout=subprocess.PIPE).stdout)
    return {e["start"] + index: e["offset"] + index for e in extents if e["data"] and e["depth"] == 0
            for index in range(0, e["length"], CLUSTER)}


def qemu_img_check_passes(path):
    spec = json.dumps(dict(driver="qcow2", file=dict(driver="file", filename=str(path)), backing=None))
    return subprocess.run(["qemu-img", "check", "json:" + spec], stdout=subprocess.PIPE, check=False).returncode == 0


def states(result):
    return {b["name"]: b["state"] for vm in result["vms"] for b in vm["backups"]}


def test_a_clean_repository_passes_and_changes_nothing(chain):
    fleet, names = chain
    manifest = fleet.manifest("vm1")
    assert all(d["checksum"].startswith("sha256-blocks64k:") for b in manifest["backups"] for d in b["disks"])
    for check_mode in (False, True):
        result = verify(fleet, check_mode=check_mode)
        assert not result.failed and result["changed"] is False, result
        assert states(result) == dict.fromkeys(names, "ok") and result["bad_images"] == []
        assert result["vms"][0]["images_checked"] == 6 and result["msg"] == "6 images of 1 VM checked: all good."
    newest = verify(fleet, vm="vm1", backups=[names[2]])
    assert states(newest) == {names[2]: "ok"} and newest["vms"][0]["images_checked"] == 6
    # The role over the inventory changes nothing and says so.
    results = assert_ok(fleet.run("verify.yml"), changed={"vm1": 0})
    assert results["tasks"]["vm1"]["Report the verification"]["msg"] == "6 images of 1 VM checked: all good."
    # An image recorded without a checksum (by an older version) is unverified, not passed.
    del manifest["backups"][1]["disks"][0]["checksum"]
    (fleet.repository / "vm1" / "manifest.json").write_text(json.dumps(manifest))
    result = verify(fleet, vm="vm1")
    assert not result.failed and states(result) == {names[0]: "ok", names[1]: "unverified", names[2]: "unverified"}
    assert result["vms"][0]["unverified_images"] == ["%s.vda.qcow2" % names[1]]
    assert "could not be verified" in result["msg"] and result["warnings"]


def test_a_flipped_byte_names_its_image_and_every_later_point_of_its_chain(chain):
    fleet, names = chain
    path = image(fleet, names[1], "vda")
    host = data_clusters(path)[4 * MiB]
    with open(path, "r+b") as stream:
        stream.seek(host + 1000)
        byte = stream.read(1)
        stream.seek(host + 1000)
        stream.write(bytes([byte[0] ^ 0x01]))
    assert qemu_img_check_passes(path)  # its structure is intact: only the checksum tells
    result = verify(fleet, vm="vm1")
    assert result.failed and result["changed"] is False
    [bad] = result["bad_images"]
    assert (bad["image"], bad["backup"], bad["disk"], bad["dependents"]) == (path.name, names[1], "vda", names[1:])
    assert bad["problems"][0].startswith("its data has checksum sha256-blocks64k:")
    assert states(result) == {names[0]: "ok", names[1]: "bad", names[2]: "bad"}
    assert "1 of the 6 images checked are bad: vm1/%s (its data has checksum" % path.name in result["msg"]
    assert "needed by %s, %s" % (names[1], names[2]) in result["msg"]
    # The role fails for that VM, with the same message.
    rc, results, _output = fleet.run("verify.yml")
    assert rc != 0 and "needed by %s, %s" % (names[1], names[2]) in results["failures"]["vm1"][0]


def test_two_swapped_data_regions_of_an_image_are_found(chain):
    fleet, names = chain
    path = image(fleet, names[0], "vda")
    clusters = data_clusters(path)
    first, second = clusters[0], clusters[MiB]  # 64 KiB of 0x11 and 64 KiB of 0x22
    with open(path, "r+b") as stream:
        stream.seek(first)
        one = stream.read(CLUSTER)
        stream.seek(second)
        other = stream.read(CLUSTER)
        assert one != other
        stream.seek(first)
        stream.write(other)
        stream.seek(second)
        stream.write(one)
    assert qemu_img_check_passes(path)
    result = verify(fleet, vm="vm1")
    assert result.failed
    [bad] = result["bad_images"]
    assert (bad["image"], bad["dependents"]) == (path.name, names)
    assert "its data has checksum" in bad["problems"][0]
    assert states(result) == dict.fromkeys(names, "bad")


def test_a_missing_parent_image_is_found(chain):
    fleet, names = chain
    os.unlink(image(fleet, names[0], "vdb"))
    result = verify(fleet)
    assert result.failed
    [bad] = result["bad_images"]
    assert (bad["image"], bad["problems"], bad["dependents"]) == (
        "%s.vdb.qcow2" % names[0], ["missing from %s" % (fleet.repository / "vm1")], names)
    assert states(result) == dict.fromkeys(names, "bad")
    # Every other image was still checked, and is fine.
    assert result["vms"][0]["images_checked"] == 6


def test_a_backing_link_that_the_manifest_does_not_record_is_found(chain):
    fleet, names = chain
    # The newest vdb image is made to name the full backup's image as its backing file.
    path = image(fleet, names[2], "vdb")
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", "%s.vdb.qcow2" % names[0],
                    str(path)], check=True)
    result = verify(fleet, vm="vm1")
    assert result.failed
    [bad] = result["bad_images"]
    assert bad["image"] == path.name and bad["dependents"] == [names[2]]
    assert bad["problems"] == ["it names %s.vdb.qcow2 as its backing file, not its parent's image %s.vdb.qcow2"
                               % (names[0], names[1])]


def test_names_that_are_not_in_the_repository_fail_clearly(chain):
    fleet, _names = chain
    missing = verify(fleet, vm="nothere")
    assert missing.failed and missing["msg"] == "%s is no backup repository of VM nothere: it has no manifest.json." % (
        fleet.repository / "nothere")
    unknown = verify(fleet, vm="vm1", backups=["nope"])
    assert unknown.failed and unknown["msg"].startswith("No backup named nope in ")
