# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The vCPU pause of a running QEMU, for the instant a backup's point in time is made, and its undoing."""

from __future__ import annotations

import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import LeftHeld
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.held_signals import HeldSignals
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.client import QmpError


class VmLeftPaused(LeftHeld):
    """The vCPUs could not be resumed: the one failure the user must hear about first."""

    still = "the VM is still paused"


class VcpuPause:
    """Stops the vCPUs of a running VM for the block, and only of a running one; puts the run state back.

    The pause is recorded before the stop. SIGTERM, SIGHUP and SIGINT are held until the cont, then turned
    into an error that rolls the start back. A run killed by SIGKILL in the window leaves the record, by
    which a later start, stop or info resumes the VM.
    """

    def __init__(self, qmp, state, backup_id):
        self.qmp = qmp
        self.state = state
        self.backup_id = backup_id
        self.seconds = None
        self._stopped_at = None
        self._signals = HeldSignals("while the vCPUs were paused")

    def __enter__(self):
        if self.qmp.execute("query-status")["status"] != "running":
            return self  # paused, prelaunch...: no guest write can come, and the state stays as it was
        self._signals.hold(then=lambda: self.state.record_pause(self.backup_id))
        self._stopped_at = time.monotonic()
        try:
            self.qmp.execute("stop")
        except BaseException:
            self._resume()  # a late answer to stop may still have paused the VM
            raise
        return self

    def __exit__(self, *exc_info):
        if self._stopped_at is not None:
            self._resume()

    def _resume(self):
        try:
            cont(self.qmp)
            self.seconds = round(time.monotonic() - self._stopped_at, 6)
            self.state.forget_pause()
        except BaseException:
            self._signals.release(interrupt=False)  # VmLeftPaused is what the user must hear first
            raise
        finally:
            self._stopped_at = None
        self._signals.release()  # a held signal arrives here, and becomes Interrupted


def cont(qmp):
    """Resume the vCPUs, trying twice; VmLeftPaused if the VM still does not run."""
    for _attempt in range(2):
        try:
            qmp.execute("cont")
            return
        except QmpError as err:
            failure = err
    raise VmLeftPaused("THE VM IS LEFT PAUSED: resuming its vCPUs failed (%s). Resume it with the QMP command "
                       "'cont'; the next fleetbackup start, stop or info of this VM resumes it too." % failure)


def resume_abandoned_pause(qmp, state):
    """Resume the VM if a run of ours died while it had it paused; a message saying so, or None."""
    record = state.abandoned_pause()
    if record is None:
        return None
    status = qmp.execute("query-status")["status"]
    if status == "paused":
        cont(qmp)
    state.forget_pause()
    return ("A fleetbackup run (pid %d, backup %s) died while it had the vCPUs paused; the VM was %s."
            % (record["owner"]["pid"], record["backup_id"],
               "resumed" if status == "paused" else "already %s, and was left so" % status))
