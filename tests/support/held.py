"""A run of ours that dies while it holds the guest still (a vCPU pause, a file system freeze).

Apart from processes.py, which hooks run with no collection on their path.
"""

import os

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.held_signals import Interrupted

# The exit status of hold_in_a_child's child when the signal became Interrupted.
INTERRUPTED = 3


def hold_in_a_child(hold, signum):
    """Fork a run of ours that enters hold() (a context manager that holds the guest still: a vCPU pause, a freeze)
    and sends itself signum inside it; the child's wait status.

    It exits with INTERRUPTED when the hold turned the signal into Interrupted once it let go of the guest.
    """
    child = os.fork()
    if child == 0:
        code = 0
        try:
            with hold():
                os.kill(os.getpid(), signum)
        except Interrupted:
            code = INTERRUPTED
        finally:
            os._exit(code)
    return os.waitpid(child, 0)[1]
