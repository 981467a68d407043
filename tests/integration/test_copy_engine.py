"""The parallel copy engine: exact output with 1 and 4 connections, full and incremental, multi-conn or not."""

import signal
import subprocess

import pytest

from support.flows import Backups
from support.modules import run_module
from support.processes import end_process
from support.qemu_vm import DiskSpec, MiB, same

GiB = 1024 * MiB


def scattered(vm):
    """Data in three 512 MiB regions, at offsets and lengths that are not cluster-aligned."""
    vm.write("vda", 0, 3 * MiB, 0x01)
    vm.write("vda", 700 * MiB + 4096, 5 * 4096, 0x02)
    vm.write("vda", 1100 * MiB - 512, 1024, 0x03)
    vm.write("vda", GiB + 300 * MiB, 2 * MiB + 512, 0x04)
    vm.write("sdb", 12288, 4096, 0x05)
    vm.write("sdb", 5 * MiB + 512, 512, 0x06)


@pytest.mark.parametrize("connections", [1, 4])
def test_full_and_incremental_copies_are_exact(vms, tmp_path, connections):
    vm = vms([DiskSpec("vda", size=GiB + 512 * MiB), DiskSpec("sdb", format="raw", size=64 * MiB, bus="scsi")],
             prepare=scattered)
    flow = Backups(vm, str(tmp_path))
    marks = {d: vm.mark(d) for d in vm.disks}
    full = flow.start("b1", disks=["vda"], checkpoint="c1")["backup"]
    raw_disk = flow.start("r1", disks=["sdb"], nbd_socket=str(tmp_path / "r1.nbd"))
    assert raw_disk.failed and "one backup per VM runs at a time" in raw_disk["msg"]
    copies = flow.copy_all(full, str(tmp_path), "b1", connections=connections, requests=4)
    assert copies["vda"]["connections"] == connections
    assert same(str(tmp_path / "b1.vda.qcow2"), vm.expected_image("vda", marks["vda"], str(tmp_path / "e1.raw")))
    raw = run_module("qemu_backup_copy", src=full["disks"][0]["url"], dest=str(tmp_path / "b1.vda.raw"),
                     format="raw", connections=connections)
    # QEMU maps a qcow2 disk by cluster: 48 + 1 + 2 + 33 clusters of 64 KiB hold the data.
    assert raw["bytes_read"] == copies["vda"]["bytes_read"] == 84 * 65536
    assert same(str(tmp_path / "b1.vda.raw"), str(tmp_path / "e1.raw"))
    flow.stop("b1")

    # The raw disk, whose extents are 512-byte and 4 KiB pieces.
    other = flow.start("r1", disks=["sdb"])["backup"]
    flow.copy_all(other, str(tmp_path), "r1", connections=connections)
    assert same(str(tmp_path / "r1.sdb.qcow2"), vm.expected_image("sdb", marks["sdb"], str(tmp_path / "e2.raw")))
    flow.stop("r1")

    vm.write("vda", 700 * MiB, MiB, 0x07)
    vm.zero("vda", 0, 2 * MiB)
    vm.write("vda", GiB + 510 * MiB, 2 * MiB, 0x08)  # up to the end of the disk
    mark = vm.mark("vda")
    inc = flow.start("b2", disks=["vda"], incremental="c1")["backup"]
    copies = flow.copy_all(inc, str(tmp_path), "b2", previous_prefix="b1", connections=connections)
    assert copies["vda"]["bytes_read"] == 3 * MiB
    flow.stop("b2")
    flat = str(tmp_path / "flat.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(tmp_path / "b2.vda.qcow2"), flat], check=True)
    assert same(flat, vm.expected_image("vda", mark, str(tmp_path / "e3.raw")))
    for image in ("b1.vda.qcow2", "b2.vda.qcow2", "r1.sdb.qcow2"):
        assert subprocess.run(["qemu-img", "check", str(tmp_path / image)], stdout=subprocess.PIPE).returncode == 0


@pytest.fixture
def single_connection_export(tmp_path):
    """qemu-nbd serving an image without multi-conn (its default --shared=1), to many clients in turn (-t).

    Ended by its PID.
    """
    image = str(tmp_path / "source.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "256M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 1M 3M", "-c", "write -P 0x62 200M 1M", image],
                   check=True, stdout=subprocess.DEVNULL)
    socket_path, pid_file = str(tmp_path / "src.sock"), str(tmp_path / "qemu-nbd.pid")
    # --fork returns once the socket listens.
    subprocess.run(["qemu-nbd", "-r", "-t", "-f", "qcow2", "--fork", "--pid-file", pid_file, "-k", socket_path, image],
                   check=True)
    with open(pid_file) as stream:
        pid = int(stream.read())
    yield image, "nbd+unix:///?socket=" + socket_path
    end_process(pid, signal.SIGTERM)


def test_a_source_without_multi_conn_is_copied_over_one_connection(tmp_path, single_connection_export):
    image, url = single_connection_export
    for image_format in ("qcow2", "raw"):
        dest = str(tmp_path / ("copy." + image_format))
        result = run_module("qemu_backup_copy", src=url, dest=dest, format=image_format, connections=4)
        assert result["connections"] == 1 and result["bytes_read"] == 4 * MiB
        assert same(dest, image)
