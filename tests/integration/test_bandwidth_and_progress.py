"""Progress and bandwidth: a copy held to its bandwidth limit shows its progress mid-way through the status module,
and ends exactly; a copy that is killed, or that fails, says so."""

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from support.modules import run_module
from support.paths import COLLECTIONS
from support.processes import end_process
from support.qemu_vm import MiB, same

DATA = 64 * MiB
LIMIT = 8 * MiB


@pytest.fixture
def server(tmp_path):
    """qemu-nbd exporting a 128 MiB qcow2 image holding 64 MiB of data; yields (url, image, pid); killed by PID."""
    image = str(tmp_path / "source.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, str(2 * DATA)], check=True)
    writes = []
    for index in range(8):  # 8 MiB pieces of distinct bytes, with holes between them
        writes += ["-c", "write -P 0x%x %d %d" % (0x31 + index, index * 16 * MiB, 8 * MiB)]
    subprocess.run(["qemu-io", "-f", "qcow2"] + writes + [image], check=True, stdout=subprocess.DEVNULL)
    socket_path = str(tmp_path / "nbd.sock")
    subprocess.run(["qemu-nbd", "-r", "-t", "-f", "qcow2", "--shared=4", "--fork", "--pid-file", socket_path + ".pid",
                    "-k", socket_path, image], check=True)
    with open(socket_path + ".pid") as stream:
        pid = int(stream.read())
    yield "nbd+unix:///?socket=" + socket_path, image, pid
    end_process(pid)


def status(tmp_path, dest, **args):
    result = run_module("qemu_backup_copy_status", dest=dest, names=["vda"], state_dir=str(tmp_path / "state"), **args)
    assert not result.failed and result["changed"] is False, result
    return result["copies"][0]


def copy_process(url, dest, tmp_path, **args):
    """The copy module as a process of its own, as Ansible's async runs it."""
    payload = dict(src=url, dest=dest, state_dir=str(tmp_path / "state"), **args)
    process = subprocess.Popen([sys.executable, "-m", "ansible_collections.fleetbackup.qemu.plugins.modules."
                                "qemu_backup_copy"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               env=dict(os.environ, PYTHONPATH=COLLECTIONS))
    process.stdin.write(json.dumps({"ANSIBLE_MODULE_ARGS": payload}).encode())
    process.stdin.close()
    return process


def progress_past(tmp_path, dest, share):
    """The status once the copy of dest has done more than share of its total, awaited on the status module."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        copy = status(tmp_path, dest, wait=10)  # answers as soon as the record changes, about once a second
        if copy["total"] and copy["done"] > share * copy["total"]:
            return copy
    raise AssertionError("the copy of %s made no progress in 60 s: %s" % (dest, copy))


def test_a_copy_held_to_its_bandwidth_shows_its_progress_mid_way_and_ends_exactly(tmp_path, server):
    url, image, _pid = server
    dest = str(tmp_path / "b1.vda.qcow2")
    assert status(tmp_path, dest)["msg"] == "vda: not started"
    outcome = {}
    started = time.monotonic()
    copying = threading.Thread(target=lambda: outcome.update(result=run_module(
        "qemu_backup_copy", src=url, dest=dest, bandwidth="8M", state_dir=str(tmp_path / "state"))))
    copying.start()
    try:
        middle = progress_past(tmp_path, dest, 0.25)
        assert middle["state"] == "copying" and middle["running"] and not middle["ended"]
        assert middle["total"] == DATA and 0 < middle["done"] < DATA
        assert 0.6 * LIMIT < middle["rate"] < 1.4 * LIMIT, middle
        assert 0 < middle["eta"] < DATA / LIMIT
        assert re.match(r"^vda: \d+% \([\d.]+ MiB of 64\.0 MiB\) at [\d.]+ MiB/s, about \d+ s left$", middle["msg"])
        ended = status(tmp_path, dest, wait=60, wait_for="end")
    finally:
        copying.join(120)
    elapsed = time.monotonic() - started
    result = outcome["result"]
    assert not result.failed and result["changed"], result
    assert ended["state"] == "done" and ended["ended"] and not ended["running"] and ended["done"] == DATA
    assert re.match(r"^vda: done, 64\.0 MiB in \d+ s$", ended["msg"]), ended["msg"]
    # 64 MiB at 8 MiB/s: 8 s, less the first read of each of the 4 connections.
    assert elapsed > (DATA - 4 * 256 * 1024) / LIMIT
    assert result["bytes_read"] == DATA and same(dest, image)
    assert result["checksum"].startswith("xxh3-128-blocks64k:")


def test_a_copy_that_is_killed_shows_gone_and_one_that_fails_says_why(tmp_path, server):
    url, _image, pid = server
    killed = str(tmp_path / "killed.qcow2")
    process = copy_process(url, killed, tmp_path, bandwidth="8M")
    try:
        assert progress_past(tmp_path, killed, 0.1)["running"]
    finally:
        end_process(process.pid)
        process.wait()
    gone = status(tmp_path, killed)
    assert (gone["state"], gone["running"], gone["ended"]) == ("gone", False, True)
    assert re.match(r"^vda: stopped at \d+%% \(.* of 64\.0 MiB\): its process %d is gone \(killed\?\)$"
                    % process.pid, gone["msg"]), gone["msg"]

    failing = str(tmp_path / "failing.qcow2")
    process = copy_process(url, failing, tmp_path, bandwidth="8M")
    try:
        progress_past(tmp_path, failing, 0.1)
        end_process(pid)  # the server dies mid-copy
        failed = status(tmp_path, failing, wait=60, wait_for="end")
    finally:
        process.wait(60)
    assert (failed["state"], failed["running"], failed["ended"]) == ("failed", False, True)
    assert re.match(r"^vda: failed at \d+%% \(.* of 64\.0 MiB\): Cannot read .*NBD export %s" % re.escape(url),
                    failed["msg"]), failed["msg"]
    assert json.loads(process.stdout.read())["failed"]
