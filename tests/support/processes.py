"""Ending the processes a test started, by PID, and waiting until they are gone."""

import os
import select
import signal


def end_process(pid, signum=signal.SIGKILL, timeout=30):
    """Send signum (None: none, the process is ending by itself) to pid and wait on a pidfd for it to exit.

    False if it was already gone.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if signum is not None:
            os.kill(pid, signum)
        select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    return True


def descendants(pid):
    """PIDs of every process below pid, deepest first, so that each can be ended before its parent."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as stream:
                # The command name in parentheses may hold spaces; the parent's PID is the second field after it.
                parent = int(stream.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone while we looked
        children.setdefault(parent, []).append(int(entry))
    found = []
    level = children.get(pid, [])
    while level:
        found = level + found
        level = [child for parent in level for child in children.get(parent, [])]
    return found


def process_alive(pid):
    """Alive and not a zombie: daemons double-fork, and their reaper (PID 1) may reap them late."""
    try:
        with open("/proc/%d/stat" % pid) as stream:
            return stream.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
