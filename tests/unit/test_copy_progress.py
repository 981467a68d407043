"""Copy progress: the shared bandwidth limit, the records a copy keeps, and the lines the status shows."""

import os

import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd import engine as nbd_copy, progress as copy_progress
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.progress import (
    KEEP_ENDED,
    CopyProgress,
    copies_dir,
    describe,
    duration,
    parse_bandwidth,
    prune_records,
    read_status,
    record_name,
    size,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError

MiB = 1024 ** 2


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(nbd_copy.time, "monotonic", clock)
    return clock


def test_the_bandwidth_limit_spaces_the_reads_of_all_threads_at_its_rate(clock):
    throttle = nbd_copy.Throttle(8 * MiB)
    # Each thread's first read starts at once; the next read of anyone waits for the bytes already started.
    assert throttle.reserve(MiB) == 1000.125
    assert throttle.reserve(MiB) == 1000.25
    clock.now = 1000.25
    assert throttle.reserve(2 * MiB) == 1000.5
    # Idle time is not saved up for a burst later.
    clock.now = 1010.0
    assert throttle.reserve(MiB) == 1010.125


def test_bandwidth_is_bytes_per_second_or_a_size():
    assert parse_bandwidth(0) == 0 and parse_bandwidth(8388608) == 8 * MiB
    assert parse_bandwidth("8M") == 8 * MiB and parse_bandwidth("1G") == 1024 * MiB
    for wrong in ("fast", "-1", -5):
        with pytest.raises(UserError, match="Invalid bandwidth .*like 100M or 1G; 0 for no limit"):
            parse_bandwidth(wrong)


def test_sizes_and_durations_read_well():
    assert [size(n) for n in (512, 1536, 310 * MiB, 1288490189, 2 ** 50 * 3)] == [
        "512 B", "1.5 KiB", "310 MiB", "1.2 GiB", "3.0 PiB"]
    assert [duration(s) for s in (6, 119.6, 250, 4800, 7300)] == ["6 s", "2 min", "4 min", "80 min", "2 h 1 min"]


def test_a_copy_keeps_its_record_from_start_to_end_and_the_status_reads_it(tmp_path, monkeypatch):
    directory = copies_dir(str(tmp_path / "state"))
    assert oct(os.stat(directory.path).st_mode & 0o777) == "0o700"
    dest = str(tmp_path / "b1.vda.qcow2")
    assert read_status(directory, dest, "vda")["msg"] == "vda: not started"
    clock = Clock()
    monkeypatch.setattr(copy_progress.time, "monotonic", clock)
    progress = CopyProgress(directory, dest)
    assert os.listdir(directory.path) == [record_name(dest)]
    status = read_status(directory, dest, "vda")
    assert (status["state"], status["running"], status["ended"], status["msg"]) == (
        "starting", True, False, "vda: starting")
    progress(0, 3 * 1024 * MiB)
    for second in range(1, 13):
        clock.now += 1
        progress(second * 100 * MiB, 3 * 1024 * MiB)
    status = read_status(directory, dest, "vda")
    assert status["rate"] == 100 * MiB and status["eta"] == 19  # 1872 MiB left at 100 MiB/s
    assert status["msg"] == "vda: 39% (1.2 GiB of 3.0 GiB) at 100 MiB/s, about 19 s left"
    progress.end(error="Writing /backup/b1.vda.qcow2 failed: No space left on device.")
    status = read_status(directory, dest, "vda")
    assert (status["state"], status["running"], status["ended"]) == ("failed", False, True)
    assert status["msg"] == ("vda: failed at 39% (1.2 GiB of 3.0 GiB): Writing /backup/b1.vda.qcow2 failed: No "
                             "space left on device.")
    assert status["pid"] == os.getpid()


def test_a_copy_whose_process_is_gone_shows_so_and_old_ended_records_are_pruned(tmp_path):
    directory = copies_dir(str(tmp_path / "state"))
    running, killed, done = (str(tmp_path / name) for name in ("running", "killed", "done"))
    CopyProgress(directory, running)(MiB, 4 * MiB)
    CopyProgress(directory, killed)(MiB, 4 * MiB)
    record = directory.read_json(record_name(killed))
    record["owner"]["started"] -= 1  # another process than ours, which had the same PID
    directory.write_json(record_name(killed), record)
    status = read_status(directory, killed)
    assert (status["state"], status["running"], status["ended"]) == ("gone", False, True)
    assert status["msg"] == "killed: stopped at 25%% (1.0 MiB of 4.0 MiB): its process %d is gone (killed?)" % (
        os.getpid())
    progress = CopyProgress(directory, done)
    progress(4 * MiB, 4 * MiB)
    progress.end()
    assert read_status(directory, done, "vdb")["msg"].startswith("vdb: done, 4.0 MiB in ")
    later = record["updated"] + KEEP_ENDED + 1
    prune_records(directory, later)
    assert os.listdir(directory.path) == [record_name(running)]


def test_lines_for_each_state():
    status = dict(state="copying", done=0, total=0, rate=None, eta=None, pid=7, started=0, updated=9)
    assert describe(status, None, "vda") == "vda: 100% (0 B of 0 B)"
    assert describe(dict(status, state="done"), "dest holds this very backup", "vda") == \
        "vda: done, dest holds this very backup"
    assert describe(dict(status, state="failed", total=None), "Cannot connect", "vda") == "vda: failed: Cannot connect"
