# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Processes told apart for good: by host, boot, PID and the PID's start time, so a reused PID is never ours; and
children that die with the process that started them."""

from __future__ import annotations

import ctypes
import os
import signal
import socket


def boot_id():
    with open("/proc/sys/kernel/random/boot_id") as stream:
        return stream.read().strip()


def process_start_time(pid):
    """The start time of pid in clock ticks since boot, or None when there is no such process, or only its zombie.

    With the boot id it tells a process apart from a later one that got the same PID.
    """
    try:
        with open("/proc/%d/stat" % pid) as stream:
            fields = stream.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def this_process():
    """Who we are, in a form that outlives us: host, boot, PID and the PID's start time."""
    return dict(host=socket.gethostname(), boot_id=boot_id(), pid=os.getpid(),
                started=process_start_time(os.getpid()))


def process_alive(owner):
    """Whether the process that this_process() described still runs."""
    return (owner.get("boot_id") == boot_id() and owner.get("host") == socket.gethostname()
            and process_start_time(owner.get("pid", -1)) == owner.get("started"))


PR_SET_PDEATHSIG = 1


def die_with_parent():
    """In a child before exec (preexec_fn): SIGKILL when the thread that started it dies, so it outlives nothing."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
