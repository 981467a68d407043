"""A run that goes on in the background: a short one answers at once, a long one is followed to its result, a killed
one is reported as gone. Real processes, forked as the module forks them."""

import json
import os
import signal

import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._run.background import follow, run_in_background
from support.processes import end_process


def blocked_work(gate):
    """work() that returns once a byte arrives on the gate (a pipe's read end)."""
    def work(job_record):
        job_record([])
        os.read(gate, 1)
        return dict(changed=True, msg="ran")
    return work


def test_a_short_run_answers_within_its_wait(tmp_path):
    result = run_in_background(lambda job_record: dict(changed=True, msg="quick"), 30, str(tmp_path))
    assert result["finished"] is True and result["msg"] == "quick"
    assert os.listdir(tmp_path / "runs") == []  # its record is collected with its result


def test_a_long_run_goes_on_and_is_followed_to_its_result(tmp_path):
    gate, opener = os.pipe()
    started = run_in_background(blocked_work(gate), 0.1, str(tmp_path))
    assert started["finished"] is False and started["msg"] == "starting"
    waiting = follow(str(tmp_path), started["job"], 0.1)
    assert waiting["finished"] is False
    os.write(opener, b"x")
    ended = follow(str(tmp_path), started["job"], 30)
    assert ended["finished"] is True and ended["msg"] == "ran" and ended["job"] == started["job"]
    with pytest.raises(UserError, match="was collected already"):
        follow(str(tmp_path), started["job"], 0)


def test_a_killed_run_is_reported_gone(tmp_path):
    gate, _opener = os.pipe()
    started = run_in_background(blocked_work(gate), 0.1, str(tmp_path))
    record = json.loads((tmp_path / "runs" / ("%s.json" % started["job"])).read_text())
    for _round in range(50):  # the run's process records itself as it starts
        if record["owner"]:
            break
        follow(str(tmp_path), started["job"], 0.2)
        record = json.loads((tmp_path / "runs" / ("%s.json" % started["job"])).read_text())
    end_process(record["owner"]["pid"], signal.SIGKILL)
    with pytest.raises(UserError, match="its process %d is gone" % record["owner"]["pid"]):
        follow(str(tmp_path), started["job"], 5)


@pytest.mark.parametrize("job", ["../x", "", "5F3A9C01D2E4B6A8", "a" * 17])
def test_a_job_that_is_no_job_of_ours_is_refused(tmp_path, job):
    with pytest.raises(UserError, match="is not a job of qemu_backup"):
        follow(str(tmp_path), job, 0)


def test_records_nobody_collected_go_after_a_week_unless_their_run_still_runs(tmp_path):
    gate, opener = os.pipe()
    running = run_in_background(blocked_work(gate), 0.1, str(tmp_path))
    runs = tmp_path / "runs"
    record = runs / (running["job"] + ".json")
    while json.loads(record.read_text())["state"] != "running":  # its process has written who it is
        follow(str(tmp_path), running["job"], 0.1)
    ended = runs / "0123456789abcdef.json"
    ended.write_text(json.dumps(dict(state="ended", owner=None, dests=[], result=dict(msg="old"))))
    recent = runs / "fedcba9876543210.json"
    recent.write_text(json.dumps(dict(state="ended", owner=None, dests=[], result=dict(msg="recent"))))
    damaged = runs / "00000000000000aa.json"  # a crash cut it short: passed over, never the cause of a failed run
    damaged.write_text("")
    week_ago = os.stat(ended).st_mtime - 7 * 86400 - 60
    for old in (ended, record, damaged):
        os.utime(old, (week_ago, week_ago))
    assert run_in_background(lambda job_record: dict(changed=True, msg="quick"), 30, str(tmp_path))["msg"] == "quick"
    assert sorted(os.listdir(runs)) == sorted((recent.name, damaged.name, running["job"] + ".json"))
    os.write(opener, b"x")
    assert follow(str(tmp_path), running["job"], 30)["msg"] == "ran"


def test_a_record_removed_while_the_old_ones_are_looked_at_is_passed_over(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    assert run_in_background(lambda job_record: dict(changed=True, msg="first"), 30, str(tmp_path))["msg"] == "first"
    (runs / "0123456789abcdef.json").write_text("{}")
    real_lstat = os.lstat

    def collected_meanwhile(path, *args, **kwargs):
        if path.endswith("0123456789abcdef.json"):
            os.unlink(path)  # another VM's module collects its own record between the listing and the lstat
        return real_lstat(path, *args, **kwargs)
    monkeypatch.setattr(os, "lstat", collected_meanwhile)
    assert run_in_background(lambda job_record: dict(changed=True, msg="next"), 30, str(tmp_path))["msg"] == "next"
