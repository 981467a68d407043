# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""A run that goes on in the background once it takes longer than a while, so that its progress can be shown.

A short run returns from the module that started it, as any module does: one task. A long one leaves the module
after `wait` seconds, still running in a process of its own (in a session of its own, with no terminal or pipe of
Ansible's); the module returns its job, which follow() then reports on. The job's record, in
<state_dir>/runs/<job>.json, holds the run's process, the images it copies into and, once it ended, its result.
"""

from __future__ import annotations

import os
import re
import secrets
import select
import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import FleetbackupError, UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import PrivateDir, shown_paths
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.processes import process_alive, this_process
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.progress import copies_dir, read_status

RUNS = "runs"
JOB = re.compile(r"^[0-9a-f]{16}$")
# A job that nobody followed to its end (the playbook was interrupted) keeps its record this long, to be looked at.
UNCOLLECTED_KEPT = 7 * 86400


def jobs_dir(state_dir):
    return PrivateDir(state_dir).prepare(True).child(RUNS, True)


def run_in_background(work, wait, state_dir):
    """work(job_record), which returns a module result, in a process of its own: its result when it ends within
    wait seconds, else dict(finished=False, job=...). job_record(dests) records the images it copies into."""
    directory = jobs_dir(state_dir)
    _forget_uncollected(directory, time.time() - UNCOLLECTED_KEPT)
    job = secrets.token_hex(8)
    directory.write_json(job + ".json", dict(state="starting", owner=None, dests=[]), durable=False)
    ended_reader, ended_writer = os.pipe()  # end of file once the run's process ended
    child = os.fork()
    if child == 0:
        os.close(ended_reader)
        _detach_and_run(work, directory, job)
    os.close(ended_writer)
    os.waitpid(child, 0)  # the first child only forks the run's process and ends
    try:
        finished = select.select([ended_reader], [], [], wait)[0]
    finally:
        os.close(ended_reader)
    if finished:
        return _ended(directory, job, state_dir)
    line = progress_line(directory.read_json(job + ".json"), state_dir)
    return dict(finished=False, job=job, changed=True, msg=line, progress=line)


def _forget_uncollected(directory, before):
    """Remove the records, last written before then, of jobs that ended or whose process is gone.

    Housekeeping never fails a run: a record another module removes meanwhile, or one that a crash left
    damaged, is passed over.
    """
    for name in os.listdir(directory.path):
        job = name[:-len(".json")]
        if not (JOB.match(job) and name.endswith(".json")):
            continue
        try:
            if os.lstat(directory.path_of(name)).st_mtime >= before:
                continue
            record = directory.read_json(name) or {}
        except (FileNotFoundError, UserError):
            continue
        owner = record.get("owner")
        if record.get("state") == "ended" or not (owner and process_alive(owner)):
            directory.remove(name)


def _detach_and_run(work, directory, job):
    """In the first child: a new session, and the run's process in it, which never returns to the module's code."""
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # Ansible (and ssh) wait until every copy of the module's pipes is closed
            os.dup2(null, fd)
        record = dict(state="running", owner=this_process(), dests=[])

        def job_record(dests):
            record["dests"] = dests
            directory.write_json(job + ".json", record, durable=False)

        job_record([])
        try:
            result = work(job_record)
        except FleetbackupError as err:
            result = dict(failed=True, msg=str(err))
        except BaseException as err:  # a result, whatever happened: follow() must learn that the run ended
            result = dict(failed=True, msg="The backup run failed unexpectedly: %s: %s" % (type(err).__name__, err))
        directory.write_json(job + ".json", dict(record, state="ended", result=shown_paths(result)))
    finally:
        os._exit(0)  # never the module's own exit: its payload's cleanup belongs to the module's process


def follow(state_dir, job, wait):
    """The job's result once it ended, waiting at most wait seconds for that; else its progress."""
    if not JOB.match(job or ""):
        raise UserError("job '%s' is not a job of qemu_backup: pass the job it returned." % job)
    directory = jobs_dir(state_dir)
    record = directory.read_json(job + ".json")
    if record is None:
        raise UserError("No backup run job %s on this host: it was collected already, or never started here; "
                        "follow it on the host that ran it." % job)
    deadline = time.monotonic() + wait
    while record["state"] != "ended":
        owner = record.get("owner")
        if owner and not process_alive(owner):
            record = directory.read_json(job + ".json")  # it may have ended, and written so, since the read above
            if record and record["state"] == "ended":
                break
            directory.remove(job + ".json")
            raise UserError("The backup run job %s ended without a result: its process %d is gone (killed?). The "
                            "next run cleans up after it." % (job, owner["pid"]))
        left = deadline - time.monotonic()
        if left <= 0:
            line = progress_line(record, state_dir)
            return dict(finished=False, job=job, changed=False, msg=line, progress=line)
        _wait_for_exit(owner, min(left, 1.0))
        record = directory.read_json(job + ".json")
    return _ended(directory, job, state_dir)


def _wait_for_exit(owner, seconds):
    """Until the owner's process exits, at most seconds; a pidfd tells at once (a record written since counts too)."""
    try:
        pidfd = os.pidfd_open(owner["pid"]) if owner else None
    except OSError:
        return
    if pidfd is None:
        time.sleep(seconds)  # the process has not yet written its record: it is being forked
        return
    try:
        select.select([pidfd], [], [], seconds)
    finally:
        os.close(pidfd)


def _ended(directory, job, state_dir):
    """The job's result, and its copies' last progress line; the job's record is gone then."""
    record = directory.read_json(job + ".json")
    directory.remove(job + ".json")
    if record is None or record["state"] != "ended":
        raise FleetbackupError("The backup run job %s ended without a result." % job)
    return dict(record["result"], finished=True, job=job, progress=progress_line(record, state_dir))


def progress_line(record, state_dir):
    """One line of the copies' progress, "vda: 42% (1.2 GiB of 2.9 GiB) at 310 MiB/s, ..."."""
    dests = (record or {}).get("dests") or []
    if not dests:
        return "starting"
    copies = copies_dir(state_dir, create=False)
    return "; ".join(read_status(copies, dest, label)["msg"] for dest, label in dests)
