"""The parallel copy engine: exact output with 1 and 4 connections, full and incremental, multi-conn or not."""

import signal
import subprocess
import threading

import pytest

from support.flows import Backups
from support.modules import run_module
from support.processes import end_process
from support.qemu_vm import DiskSpec, MiB, same

from ansible_collections.fleetbackup.qemu.plugins.module_utils.nbd_copy import (
    copy_to_image,
    export_size_and_connections,
)

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
    assert raw_disk.failed and "only one NBD server" in raw_disk["msg"]
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


def make_image(path, size, writes):
    """A qcow2 image of size bytes holding the qemu-io writes (pattern, offset, length)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True)
    commands = []
    for pattern, offset, length in writes:
        commands += ["-c", "write -P 0x%x %d %d" % (pattern, offset, length)]
    subprocess.run(["qemu-io", "-f", "qcow2"] + commands + [path], check=True, stdout=subprocess.DEVNULL)
    return path


@pytest.fixture
def serve(tmp_path):
    """serve(image, *options): qemu-nbd -r -t exporting image; returns (url, pid). Each is ended by its PID."""
    pids = []

    def start(image, *options):
        socket_path = str(tmp_path / ("nbd%d.sock" % len(pids)))
        pid_file = socket_path + ".pid"
        # --fork returns once the socket listens.
        subprocess.run(["qemu-nbd", "-r", "-t", "-f", "qcow2", "--fork", "--pid-file", pid_file, "-k", socket_path]
                       + list(options) + [image], check=True)
        with open(pid_file) as stream:
            pids.append(int(stream.read()))
        return "nbd+unix:///?socket=" + socket_path, pids[-1]

    yield start
    for pid in pids:
        end_process(pid, signal.SIGTERM)


def copy_within(seconds, url, dest, image_format, **options):
    """The engine copies url to dest in this process; a copy still running after seconds fails the test."""
    size, connections = export_size_and_connections(url, None, 4)
    outcome = {}

    def run():
        try:
            outcome["counts"] = copy_to_image(url, dest, image_format, size, connections=connections, **options)
        except Exception as err:  # pylint: disable=broad-except
            outcome["error"] = err

    # A daemon thread, so that a hung copy fails this test instead of hanging the run.
    thread = threading.Thread(target=run, name="test-copy", daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the copy of %s hangs: still running after %d s" % (url, seconds)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["counts"]


def test_a_source_without_multi_conn_is_copied_over_one_connection(tmp_path, serve):
    image = make_image(str(tmp_path / "source.qcow2"), 256 * MiB, [(0x61, MiB, 3 * MiB), (0x62, 200 * MiB, MiB)])
    url, _ = serve(image)  # without --shared: one client at a time, so no multi-conn
    for image_format in ("qcow2", "raw"):
        dest = str(tmp_path / ("copy." + image_format))
        result = run_module("qemu_backup_copy", src=url, dest=dest, format=image_format, connections=4)
        assert result["connections"] == 1 and result["bytes_read"] == 4 * MiB
        assert same(dest, image)


@pytest.mark.parametrize("image_format", ["qcow2", "raw"])
def test_data_before_a_hole_larger_than_a_status_window_is_copied_without_hanging(tmp_path, serve, image_format):
    # Reads in flight when the last window is mapped complete inside that block status; they hung the copy.
    image = make_image(str(tmp_path / "source.qcow2"), 3 * GiB, [(0x5a, 0, 256 * MiB)])
    url, _ = serve(image, "--shared=1")
    dest = str(tmp_path / ("copy." + image_format))
    assert copy_within(60, url, dest, image_format)[0] == 256 * MiB
    assert same(dest, image)


@pytest.mark.parametrize("options", [(), ("--shared=4",), ("-A",), ("--shared=4", "-A")], ids=["plain", "shared4", "A", "shared4+A"])
@pytest.mark.parametrize("size", [3 * GiB, 5 * GiB, 17 * GiB], ids=lambda size: "%dG" % (size // GiB))
def test_sparse_disks_from_qemu_nbd_copy_exactly(tmp_path, serve, size, options):
    # Data at the start, across the first status window's end, and up to an unaligned end of the disk.
    writes = [(0x11, 0, 8 * MiB), (0x12, 2 * GiB - MiB, 2 * MiB), (0x13, size - 3 * MiB + 512, 3 * MiB - 512)]
    image = make_image(str(tmp_path / "source.qcow2"), size, writes)
    url, _ = serve(image, *options)
    for image_format in ("qcow2", "raw"):
        dest = str(tmp_path / ("copy." + image_format))
        copy_within(60, url, dest, image_format)
        assert same(dest, image), image_format
