"""Verify: a repository built by the backup role, checked without its VM; damage of every kind is found and named
with every backup that needs the damaged image."""

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess

import pytest

from support.fleet import CLUSTER, Fleet, assert_ok, two_disk_chain
from support.modules import run_module
from support.qemu_vm import MiB


@pytest.fixture(scope="module")
def built_chain(tmp_path_factory):
    """A VM of two disks and a chain of three backups (full, incremental, incremental) made by the backup role."""
    vm, fleet = two_disk_chain(tmp_path_factory.mktemp("chain"), 3)
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


def old_checksum(path):
    """The image's checksum by the rule of backups made before xxh3-128 (sha256-blocks64k), summed here from
    qemu-img map and the file's bytes, independently of the collection's code: a data block that is not all zeros
    adds sha256(offset || bytes); in an overlay, a block written as zeros adds sha256(offset || "zero")."""
    spec = json.dumps(dict(driver="qcow2", file=dict(driver="file", filename=str(path)), backing=None))
    extents = json.loads(subprocess.run(["qemu-img", "map", "--output=json", "json:" + spec], check=True,
                                        stdout=subprocess.PIPE).stdout)
    overlay = "backing-filename" in json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                                                              check=True, stdout=subprocess.PIPE).stdout)
    total = 0
    with open(path, "rb") as stream:
        for extent in extents:
            for start in range(extent["start"], extent["start"] + extent["length"], CLUSTER):
                where = start.to_bytes(8, "little")
                if extent["data"]:
                    stream.seek(extent["offset"] + start - extent["start"])
                    block = stream.read(min(CLUSTER, extent["start"] + extent["length"] - start))
                    if block.count(0) != len(block):
                        total += int.from_bytes(hashlib.sha256(where + block).digest(), "big")
                elif overlay and extent["present"] and extent["zero"]:
                    total += int.from_bytes(hashlib.sha256(where + b"zero").digest(), "big")
    return "sha256-blocks64k:%064x" % (total % (1 << 256))


def drop_cluster(path, guest_offset):
    """Edit a qcow2 image so that it no longer holds the cluster at guest_offset: its L2 entry and its refcount go."""
    with open(path, "r+b") as stream:
        header = stream.read(104)
        cluster_bits, = struct.unpack(">I", header[20:24])
        l1_offset, refcount_table_offset = struct.unpack(">QQ", header[40:56])
        refcount_bits = 1 << struct.unpack(">I", header[96:100])[0]
        cluster = 1 << cluster_bits
        l2_entries = cluster // 8
        index = guest_offset // cluster
        stream.seek(l1_offset + 8 * (index // l2_entries))
        l2_offset = struct.unpack(">Q", stream.read(8))[0] & 0x00FFFFFFFFFFFE00
        stream.seek(l2_offset + 8 * (index % l2_entries))
        host = struct.unpack(">Q", stream.read(8))[0] & 0x00FFFFFFFFFFFE00
        assert host, "the image holds no data cluster at %d" % guest_offset
        stream.seek(l2_offset + 8 * (index % l2_entries))
        stream.write(bytes(8))
        assert refcount_bits == 16  # the copy's writer's
        per_block = cluster * 8 // refcount_bits
        stream.seek(refcount_table_offset + 8 * (host // cluster // per_block))
        block = struct.unpack(">Q", stream.read(8))[0]
        stream.seek(block + 2 * (host // cluster % per_block))
        stream.write(bytes(2))


def reads(path, offset, length, pattern):
    """Whether the image, read through its backing chain as a restore reads it, holds pattern there."""
    return subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x%02x %d %d" % (pattern, offset, length),
                           str(path)], stdout=subprocess.PIPE, check=True).stdout.find(b"Pattern verification failed") < 0


def states(result):
    return {b["name"]: b["state"] for vm in result["vms"] for b in vm["backups"]}


def test_a_clean_repository_passes_and_changes_nothing(chain):
    fleet, names = chain
    manifest = fleet.manifest("vm1")
    assert all(d["checksum"].startswith("xxh3-128-blocks64k:") for b in manifest["backups"] for d in b["disks"])
    good = re.compile(r"^6 images of 1 VM checked: all good; [0-9.]+ MiB of data read at [0-9]+ MiB/s\.$")
    # What the images hold as data, each read once: the full's vda and vdb, then each incremental's vda.
    data = (2 * CLUSTER + 3 * MiB) + (MiB + CLUSTER) + MiB
    for check_mode in (False, True):
        result = verify(fleet, check_mode=check_mode)
        assert not result.failed and result["changed"] is False, result
        assert states(result) == dict.fromkeys(names, "ok") and result["bad_images"] == []
        assert result["vms"][0]["images_checked"] == 6 and good.match(result["msg"]), result["msg"]
        assert result["bytes_read"] == result["vms"][0]["bytes_read"] == data
        assert result["read_seconds"] > 0 and result["read_rate"] == int(data / result["read_seconds"])
    newest = verify(fleet, vm="vm1", backups=[names[2]])
    assert states(newest) == {names[2]: "ok"} and newest["vms"][0]["images_checked"] == 6
    # The role over the inventory changes nothing and says so.
    results = assert_ok(fleet.run("verify.yml"), changed={"vm1": 0})
    assert good.match(results["tasks"]["vm1"]["Report the verification"]["msg"])
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
    assert bad["problems"][0].startswith("its data has checksum xxh3-128-blocks64k:")
    assert states(result) == {names[0]: "ok", names[1]: "bad", names[2]: "bad"}
    assert "1 of the 6 images checked are bad: vm1/%s (its data has checksum" % path.name in result["msg"]
    assert "needed by %s, %s" % (names[1], names[2]) in result["msg"]
    # The role fails for that VM, with the same message.
    rc, results, _output = fleet.run("verify.yml")
    assert rc != 0 and "needed by %s, %s" % (names[1], names[2]) in results["failures"]["vm1"][0]


def test_a_lost_data_cluster_of_zeros_that_hid_the_parents_data_is_found(chain):
    fleet, names = chain
    path = image(fleet, names[1], "vda")
    assert 0 in data_clusters(path) and reads(path, 0, CLUSTER, 0x00)  # zeros as data, over the full's 0x11
    before = old_checksum(path)
    drop_cluster(path, 0)
    # The image is sound, and a restore now reads the full's data there.
    assert qemu_img_check_passes(path) and 0 not in data_clusters(path) and reads(path, 0, CLUSTER, 0x11)
    assert old_checksum(path) == before  # sha256-blocks64k, which counted zeros of data for nothing, would pass it
    result = verify(fleet, vm="vm1")
    assert result.failed
    [bad] = result["bad_images"]
    assert (bad["image"], bad["backup"], bad["dependents"]) == (path.name, names[1], names[1:])
    assert bad["problems"][0].startswith("its data has checksum xxh3-128-blocks64k:")
    assert states(result) == {names[0]: "ok", names[1]: "bad", names[2]: "bad"}


def test_old_backups_verify_with_their_own_algorithm_and_an_unknown_one_is_never_a_pass(chain):
    fleet, names = chain
    manifest = fleet.manifest("vm1")
    for backup in manifest["backups"]:
        for disk in backup["disks"]:
            disk["checksum"] = old_checksum(fleet.repository / "vm1" / disk["file"])
    (fleet.repository / "vm1" / "manifest.json").write_text(json.dumps(manifest))
    result = verify(fleet, vm="vm1")
    assert not result.failed and states(result) == dict.fromkeys(names, "ok"), result
    # Damage is found with the old algorithm too, and named by it.
    path = image(fleet, names[2], "vda")
    host = data_clusters(path)[5 * MiB]
    with open(path, "r+b") as stream:
        stream.seek(host)
        stream.write(b"\x99")
    result = verify(fleet, vm="vm1")
    [bad] = result["bad_images"]
    assert result.failed and bad["image"] == path.name and bad["dependents"] == [names[2]]
    assert bad["problems"][0].startswith("its data has checksum sha256-blocks64k:")
    # A checksum of an algorithm this version does not know fails its image, saying so.
    manifest["backups"][0]["disks"][1]["checksum"] = "blake3-blocks64k:" + "0" * 64
    (fleet.repository / "vm1" / "manifest.json").write_text(json.dumps(manifest))
    result = verify(fleet, vm="vm1")
    assert result.failed and states(result) == dict.fromkeys(names, "bad")
    unknown = next(b for b in result["bad_images"] if b["image"] == manifest["backups"][0]["disks"][1]["file"])
    assert unknown["problems"] == ["its recorded checksum uses the algorithm blake3-blocks64k, which this version of "
                                   "the collection does not know (it knows sha256-blocks64k, xxh3-128-blocks64k): "
                                   "verify it with the version that wrote it"]
    assert unknown["dependents"] == names


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
