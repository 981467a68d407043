# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The progress of copies, kept on the host that copies: a small record per copy in <state_dir>/copies/.

qemu_backup_copy writes the record of its dest when it begins, about once a second while it copies, and
once more when it ends: state done or failed, with the failure's message. A record stays after its copy
ended, so a status read late still learns that it ended and how; a copy that begins removes the records
of copies that ended, or whose process is gone, more than KEEP_ENDED seconds ago. A copy killed with
SIGKILL leaves its record in state copying: its recorded process is gone, and the status says so.

done and total count the bytes a copy processes: data it reads, plus zeros it writes into an overlay (a
full copy writes no zeros: a new image reads as zeros already). Unchanged and zero bytes that need no
write are not counted.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import time
from collections import deque
from contextlib import contextmanager

from ansible.module_utils.common.text.formatters import human_to_bytes

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import FleetbackupError, UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import PrivateDir
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.processes import process_alive, this_process

COPIES = "copies"
RECORD_NAME = re.compile(r"^[0-9a-f]{64}\.json$")
# Seconds that the record of an ended copy stays.
KEEP_ENDED = 86400
# The rate is measured over about this many seconds of the latest progress.
RATE_WINDOW = 10.0
RUNNING = ("starting", "copying")
# What the status returns of a record as it is.
RECORDED = ("state", "done", "total", "rate", "eta", "started", "updated")
UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def copies_dir(state_dir, create=True):
    """<state_dir>/copies, a private directory; for a read-only run only checked."""
    return PrivateDir(state_dir).prepare(create).child(COPIES, create)


def record_name(dest):
    return hashlib.sha256(os.fsencode(os.path.abspath(dest))).hexdigest() + ".json"


def parse_bandwidth(value):
    """Bytes per second from an int or a size like 100M (powers of 1024); 0 means no limit."""
    try:
        rate = value if isinstance(value, int) else human_to_bytes(str(value))
    except ValueError:
        rate = -1
    if rate < 0:
        raise UserError("Invalid bandwidth %r: give bytes per second, or a size per second like 100M or 1G; 0 for "
                        "no limit." % (value,))
    return rate


class CopyProgress:
    """The record of one copy, written atomically by the copy's process.

    A record that cannot be written (a full disk) does not fail the copy: writing stops, and error says why.
    """

    def __init__(self, directory, dest):
        self.directory = directory
        self.name = record_name(dest)
        now = time.time()
        self.record = dict(dest=os.path.abspath(dest), state="starting", done=0, total=None, rate=None, eta=None,
                           started=now, updated=now, owner=this_process(), msg=None)
        self.error = None
        self._samples = deque()
        self._write()

    def __call__(self, done, total):
        """The copy's progress, about once a second."""
        now = time.monotonic()
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW:
            self._samples.popleft()
        (first, first_done), total = self._samples[0], max(total, done)
        rate = (done - first_done) / (now - first) if now > first else None
        self.record.update(state="copying", done=done, total=total, rate=None if rate is None else int(rate),
                           eta=math.ceil((total - done) / rate) if rate else None, updated=time.time())
        self._write()

    def end(self, error=None, summary=None):
        """The copy ended: with error (its message), or done; summary replaces the usual line of a done copy."""
        now = time.time()
        elapsed = now - self.record["started"]
        self.record.update(state="failed" if error else "done", updated=now, eta=None,
                           rate=int(self.record["done"] / elapsed) if elapsed > 0 else None,
                           msg=str(error) if error else summary)
        self._write()

    def _write(self):
        if self.error:
            return
        try:
            self.directory.write_json(self.name, self.record, durable=False)
        except (OSError, FleetbackupError) as err:
            self.error = err


@contextmanager
def recorded_progress(state_dir, dest, check_mode, warn):
    """The progress (a CopyProgress, or None in check mode, which records nothing) of a copy into dest, recorded
    from beginning to end: whoever follows the copy learns of any failure; warn(message) says when it could not be
    recorded."""
    directory = copies_dir(state_dir, create=not check_mode)
    if check_mode:
        yield None
        return
    prune_records(directory, time.time())
    progress = CopyProgress(directory, dest)
    try:
        yield progress
    except BaseException as err:
        progress.end(error=str(err) or type(err).__name__)
        raise
    if progress.error:
        warn("The progress of this copy could not be recorded in %s: %s" % (directory.path, progress.error))


def progress_recorded(copy):
    """Decorator: copy(module, progress) becomes copy(module), its progress recorded from beginning to end.

    The record comes first: whoever follows the copy learns of any failure, a missing library's too.
    """
    @functools.wraps(copy)
    def recorded(module):
        with recorded_progress(module.params["state_dir"], module.params["dest"], module.check_mode,
                               module.warn) as progress:
            result = copy(module, progress)
            if progress:
                progress.end(summary=result.get("msg"))
        return result
    return recorded


def read_status(directory, dest, label=None):
    """What the record of dest says, as the status module returns it."""
    record = directory.read_json(record_name(dest))
    status = dict(dest=os.path.abspath(dest), state="not started", running=False, ended=False, done=0,
                  total=None, rate=None, eta=None, started=None, updated=None, pid=None)
    if record:
        status.update({key: record.get(key) for key in RECORDED}, pid=record["owner"]["pid"])
        status["running"] = record["state"] in RUNNING and process_alive(record["owner"])
        if record["state"] in RUNNING and not status["running"]:
            status.update(state="gone", rate=None, eta=None)
        status["ended"] = not status["running"]
    status["msg"] = describe(status, record and record.get("msg"), label or os.path.basename(dest))
    return status


def describe(status, message, label):
    """One line: "vda: 42% (1.2 GiB of 2.9 GiB) at 310 MiB/s, about 6 s left"."""
    state, done, total = status["state"], status["done"], status["total"]
    if state == "not started":
        return "%s: not started" % label
    if state == "done":
        elapsed = status["updated"] - status["started"]
        return "%s: done, %s" % (label, message or "%s in %s" % (size(done), duration(elapsed)))
    amount = "%d%% (%s of %s)" % (percent(done, total), size(done), size(total)) if total is not None else None
    if state in RUNNING:
        if amount is None:
            return "%s: starting" % label
        rate = " at %s/s" % size(status["rate"]) if status["rate"] is not None else ""
        left = ", about %s left" % duration(status["eta"]) if status["eta"] is not None else ""
        return "%s: %s%s%s" % (label, amount, rate, left)
    where = " at %s" % amount if amount else ""
    if state == "failed":
        return "%s: failed%s: %s" % (label, where, message)
    return "%s: stopped%s: its process %d is gone (killed?)" % (label, where, status["pid"])


def percent(done, total):
    return 100 if not total else min(100, done * 100 // total)


def size(count):
    """Bytes for people: 512 B, 1.2 GiB, 310 MiB."""
    value, unit = float(count), 0
    while value >= 1024 and unit < len(UNITS) - 1:
        value /= 1024
        unit += 1
    return "%d %s" % (value, UNITS[unit]) if unit == 0 or value >= 100 else "%.1f %s" % (value, UNITS[unit])


def duration(seconds):
    """Seconds for people: 6 s, 4 min, 1 h 20 min."""
    seconds = int(round(seconds))
    if seconds < 120:
        return "%d s" % seconds
    if seconds < 7200:
        return "%d min" % (seconds // 60)
    return "%d h %d min" % (seconds // 3600, seconds % 3600 // 60)


def prune_records(directory, now):
    """Remove the records of copies that ended, or whose process is gone, more than KEEP_ENDED seconds ago."""
    for name in os.listdir(directory.path):
        if RECORD_NAME.match(name):
            try:
                record = directory.read_json(name)
            except UserError:
                continue  # not a record of ours: not ours to remove, and the status of its dest says what it is
            ended = record is not None and (record["state"] not in RUNNING or not process_alive(record["owner"]))
            if ended and now - record["updated"] > KEEP_ENDED:
                directory.remove(name)
