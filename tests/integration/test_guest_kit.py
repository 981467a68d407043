"""The guest kit: a real Linux boots under TCG, obeys its serial console, and its writes land on the images."""

import os
import subprocess

import pytest

from support.guest import RECORD_SIZE, GuestError, GuestVm, record_block, record_location
from support.qemu_vm import DiskSpec, MiB

DISK_SIZE = 64 * MiB
PATTERN = 170
PATTERN_MIB = 16
RECORDS = 40


def raw_content(image, path):
    subprocess.run(["qemu-img", "convert", "-O", "raw", image, path], check=True)
    with open(path, "rb") as stream:
        return stream.read()


def differing_blocks(actual, expected):
    return [offset for offset in range(0, len(expected), RECORD_SIZE)
            if actual[offset:offset + RECORD_SIZE] != expected[offset:offset + RECORD_SIZE]]


def test_guest_writes_land_where_the_protocol_says(vms, scratch):
    vm = vms([DiskSpec("vda", size=DISK_SIZE), DiskSpec("vdb", size=DISK_SIZE)], kind=GuestVm)
    assert vm.wait_ready() == ["vda", "vdb"]
    with pytest.raises(GuestError, match="FBG ERROR unknown bogus"):
        vm.run("bogus")

    assert vm.run("overwrite vda %d %d" % (PATTERN_MIB, PATTERN)) == ["0", str(PATTERN_MIB * MiB)]
    vm.send("records %d" % RECORDS)
    vm.wait_line("FBG RECORDS STARTED")
    assert vm.wait_line("FBG DONE records ") == "FBG DONE records %d" % RECORDS
    # Until a flush, QEMU may hold the qcow2 metadata of newly allocated clusters, which SIGKILL would lose.
    assert vm.run("sync") == ["0"]
    vm.kill()

    expected = {disk: bytearray(DISK_SIZE) for disk in ("vda", "vdb")}
    expected["vda"][:PATTERN_MIB * MiB] = bytes([PATTERN]) * (PATTERN_MIB * MiB)
    for index in range(RECORDS):
        disk, offset = record_location(index)
        expected[disk][offset:offset + RECORD_SIZE] = record_block(index)
    for disk, content in expected.items():
        actual = raw_content(vm.image(disk), os.path.join(scratch, "%s.raw" % disk))
        assert len(actual) == DISK_SIZE
        differing = differing_blocks(actual, content)
        assert not differing, "%s: %d blocks differ, first at offsets %s" % (disk, len(differing), differing[:5])
