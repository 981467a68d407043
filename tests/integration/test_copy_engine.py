"""The parallel copy engine: exact output with 1 and 4 connections, full and incremental, multi-conn or not,
from QEMU and from qemu-nbd, for disks past many status windows; and failing fast and cleanly when its server
dies or hangs, or one of its threads fails."""

import ctypes
import gc
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import FleetbackupError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.client import export_size_and_connections
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.engine import copy_to_image
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.targets import FileTarget
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.qcow2_writer import ImageWriteError

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
    # The same blocks, whatever the format and the number of connections.
    assert raw["checksum"] == copies["vda"]["checksum"]
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
        assert subprocess.run(["qemu-img", "check", str(tmp_path / image)], stdout=subprocess.PIPE,
                              check=False).returncode == 0


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
    """serve(image, *options): qemu-nbd -r -t exporting image; returns (url, pid). Each is killed by its PID,
    also when a test stopped it."""
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
        end_process(pid)


def copy_within(seconds, url, dest, image_format, connections=4, **options):
    """The engine copies url to dest in this process; a copy still running after seconds fails the test."""
    size, connections = export_size_and_connections(url, None, connections)
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
    url, _server = serve(image)  # without --shared: one client at a time, so no multi-conn
    for image_format in ("qcow2", "raw"):
        dest = str(tmp_path / ("copy." + image_format))
        result = run_module("qemu_backup_copy", src=url, dest=dest, format=image_format, connections=4)
        assert result["connections"] == 1 and result["bytes_read"] == 4 * MiB
        assert same(dest, image)


def test_the_backing_format_is_the_one_given_never_guessed_from_the_backing_file(tmp_path, serve):
    url, _server = serve(make_image(str(tmp_path / "source.qcow2"), 64 * MiB, [(0x51, 0, MiB)]))
    # A raw disk whose guest wrote a qcow2 magic at its start: those bytes must not decide its format.
    with open(tmp_path / "b1.vda.raw", "wb") as backing:
        backing.write(b"QFI\xfb")
        backing.truncate(64 * MiB)
    dest = str(tmp_path / "b2.vda.qcow2")
    assert not run_module("qemu_backup_copy", src=url, dest=dest, backing=str(tmp_path / "b1.vda.raw"),
                          backing_format="raw").failed
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", dest], check=True,
                                     stdout=subprocess.PIPE).stdout)
    assert info["backing-filename"] == "b1.vda.raw" and info["backing-filename-format"] == "raw"
    assert same(dest, str(tmp_path / "source.qcow2"))


@pytest.mark.parametrize("image_format", ["qcow2", "raw"])
def test_data_before_a_hole_larger_than_a_status_window_is_copied_without_hanging(tmp_path, serve, image_format):
    # Reads in flight when the last window is mapped complete inside that block status; they hung the copy.
    image = make_image(str(tmp_path / "source.qcow2"), 3 * GiB, [(0x5a, 0, 256 * MiB)])
    url, _server = serve(image, "--shared=1")
    dest = str(tmp_path / ("copy." + image_format))
    assert copy_within(60, url, dest, image_format)[0] == 256 * MiB
    assert same(dest, image)


@pytest.mark.parametrize("options", [(), ("--shared=4",), ("-A",), ("--shared=4", "-A")],
                         ids=["plain", "shared4", "A", "shared4+A"])
@pytest.mark.parametrize("size", [3 * GiB, 5 * GiB, 17 * GiB], ids=lambda size: "%dG" % (size // GiB))
def test_sparse_disks_from_qemu_nbd_copy_exactly(tmp_path, serve, size, options):
    # Data at the start, across the first status window's end, and up to an unaligned end of the disk.
    writes = [(0x11, 0, 8 * MiB), (0x12, 2 * GiB - MiB, 2 * MiB), (0x13, size - 3 * MiB + 512, 3 * MiB - 512)]
    image = make_image(str(tmp_path / "source.qcow2"), size, writes)
    url, _server = serve(image, *options)
    for image_format in ("qcow2", "raw"):
        dest = str(tmp_path / ("copy." + image_format))
        copy_within(60, url, dest, image_format)
        assert same(dest, image), image_format


# Failing fast and cleanly: every wait is bounded, the first failure stops every thread.

IN_MODIFY = 0x2


def wait_for_a_write(directory, prefix, timeout):
    """Block (inotify, no polling) until a file in directory whose name starts with prefix is written to."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    assert fd >= 0 and libc.inotify_add_watch(fd, os.fsencode(directory), IN_MODIFY) >= 0, ctypes.get_errno()
    deadline = time.monotonic() + timeout
    try:
        while select.select([fd], [], [], max(0, deadline - time.monotonic()))[0]:
            events = os.read(fd, 65536)
            while events:  # struct inotify_event: wd, mask, cookie, len, then a name of len bytes
                _wd, _mask, _cookie, length = struct.unpack_from("iIII", events)
                if events[16:16 + length].rstrip(b"\0").decode().startswith(prefix):
                    return
                events = events[16 + length:]
        raise AssertionError("nothing was written in %s within %d s" % (directory, timeout))
    finally:
        os.close(fd)


def copy_threads():
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("copy-")]


def open_sockets():
    """The sockets this process holds open that not even the garbage collector can free."""
    gc.collect()
    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            names.append(os.readlink("/proc/self/fd/" + fd))
        except FileNotFoundError:
            pass  # the descriptor that listed the directory
    return sorted(name for name in names if name.startswith("socket:"))


def test_a_server_killed_mid_copy_fails_it_within_seconds_and_leaves_nothing(tmp_path, serve):
    image = make_image(str(tmp_path / "source.qcow2"), GiB, [(0x21, 0, 256 * MiB)])
    url, pid = serve(image)
    out = tmp_path / "out"
    out.mkdir()
    result = {}
    # One 64 KiB read at a time: 4096 round trips, so the copy is surely running when the server dies.
    copying = threading.Thread(target=lambda: result.update(run_module(
        "qemu_backup_copy", src=url, dest=str(out / "copy.raw"), format="raw", connections=1, requests=1,
        request_size=65536)))
    copying.start()
    wait_for_a_write(str(out), ".copy.raw.part-", 60)
    assert end_process(pid)
    killed = time.monotonic()
    copying.join(60)
    assert time.monotonic() - killed < 10
    assert result["failed"] and re.match("Cannot read .*NBD export %s: .*, then copy again" % re.escape(url),
                                         result["msg"]), result
    assert os.listdir(out) == []  # no partial image, and of course no copy


def test_a_server_that_accepts_and_never_answers_fails_the_connect_after_the_io_timeout(tmp_path):
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX) as silent:
        silent.bind(path)
        silent.listen(8)  # the kernel accepts connections; nothing ever answers them
        url = "nbd+unix:///?socket=" + path
        sockets = open_sockets()
        started = time.monotonic()
        with pytest.raises(FleetbackupError, match="Cannot connect to NBD export .*: its server sent nothing for 2 s"):
            copy_to_image(url, str(tmp_path / "copy.raw"), "raw", GiB, connections=2, io_timeout=2)
        assert 2 <= time.monotonic() - started < 5
        assert open_sockets() == sockets


@pytest.mark.parametrize("options,connections", [((), 1), (("--shared=4",), 4)], ids=["1 connection", "4"])
def test_a_server_stopped_mid_copy_fails_it_after_the_io_timeout(tmp_path, serve, monkeypatch, options, connections):
    image = make_image(str(tmp_path / "source.qcow2"), GiB, [(0x31, 0, 256 * MiB)])
    url, pid = serve(image, *options)
    sockets = open_sockets()
    write = FileTarget.write

    def write_then_stop_the_server(target, buf, offset):
        write(target, buf, offset)
        os.kill(pid, signal.SIGSTOP)  # from the first write on, nothing answers: reads are in flight

    monkeypatch.setattr(FileTarget, "write", write_then_stop_the_server)
    started = time.monotonic()
    with pytest.raises(FleetbackupError, match="Cannot read from NBD export .*: its server sent nothing for 2 s"):
        copy_within(30, url, str(tmp_path / "copy.raw"), "raw", connections=connections, io_timeout=2)
    assert 2 <= time.monotonic() - started < 5
    assert copy_threads() == [] and open_sockets() == sockets


def test_a_failing_thread_stops_the_others_at_once(tmp_path, serve, monkeypatch):
    image = make_image(str(tmp_path / "source.qcow2"), GiB, [(0x41, 0, 256 * MiB)])
    url, _server = serve(image, "--shared=4")
    writes = []
    write = FileTarget.write

    def fail_the_tenth_write(target, buf, offset):
        writes.append(offset)
        if len(writes) == 10:
            raise ImageWriteError("Writing %s failed: the test's disk is full." % target.path)
        write(target, buf, offset)

    monkeypatch.setattr(FileTarget, "write", fail_the_tenth_write)
    with pytest.raises(FleetbackupError, match="the test's disk is full"):
        copy_within(30, url, str(tmp_path / "copy.raw"), "raw", connections=4)
    # 1024 reads of 256 KiB hold the data; after the failure, each thread writes at most what it had read.
    assert len(writes) <= 10 + 4 * 16, len(writes)
    assert copy_threads() == []
