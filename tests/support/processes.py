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
