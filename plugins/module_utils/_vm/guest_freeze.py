# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Application-consistent backups: the guest agent freezes the guest's file systems around the point in time.

freeze: never, always, or auto (freeze when the agent answers). The agent is asked before anything of the
backup is created: `always` without an answer fails then and leaves nothing. The freeze itself comes last,
right around the point in time (the vCPU pause and the bitmap transaction over QMP, backupBegin with libvirt),
and the thaw follows on every way out: success, failure, and SIGTERM, SIGHUP or SIGINT, which are held until
the thaw. The freeze is recorded in the VM's state before it is asked for; a run killed by SIGKILL while the
guest may be frozen leaves the record, by which the next start, stop or info of the VM thaws the guest.

How long the guest was frozen is measured from the freeze request to the thaw's answer: the longest its
writes can have waited.

Each connection reaches the agent its own way: an agent object has check() (does it answer?), freeze() and
thaw() (how many file systems), thaw_if_frozen() for a dead run's freeze, record() (what the state keeps to
reach it again) and close(). They raise GuestAgentError; GuestAgentUnreachable when no agent can be there
(the VM stopped, or has no agent channel).
"""

from __future__ import annotations

import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import LeftHeld, UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.guest_agent import (
    GuestAgent,
    GuestAgentError,
    GuestAgentUnreachable,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.held_signals import HeldSignals

MAX_FREEZE_TIMEOUT = 60
APPLICATION = "application"
CRASH = "crash"


class FreezeUnavailable(GuestAgentError):
    """This guest cannot be frozen now: auto goes on crash-consistent, always fails."""


class GuestLeftFrozen(LeftHeld):
    """Thawing failed: the one failure the user must hear about first."""

    still = "the guest's file systems may still be frozen"


def check_freeze_timeout(seconds):
    if not 0 < seconds <= MAX_FREEZE_TIMEOUT:
        raise UserError("freeze_timeout must be more than 0 and at most %d seconds: the guest's writes wait while "
                        "it is frozen." % MAX_FREEZE_TIMEOUT)


class SocketAgent:
    """The guest agent of a QMP VM, on the host's socket of its virtio-serial port org.qemu.guest_agent.0."""

    def __init__(self, socket_path, timeout):
        self.socket_path = socket_path
        self.session = GuestAgent(socket_path, timeout)

    def record(self):
        return dict(socket=self.socket_path)

    def check(self):
        self.session.connect()

    def freeze(self):
        return self.session.fsfreeze_freeze()

    def thaw(self):
        return self.session.fsfreeze_thaw()

    def thaw_if_frozen(self):
        self.session.connect()
        if self.session.fsfreeze_status() != "frozen":
            return 0
        return self.thaw()

    def close(self):
        self.session.close()


class GuestFreeze:
    """The guest's file systems frozen for the block when the mode and the agent allow; thawed on every way out.

    find_agent() gives the agent, or raises FreezeUnavailable saying why there is none.
    """

    def __init__(self, state, backup_id, mode, find_agent):
        self.state = state
        self.backup_id = backup_id
        self.mode = mode
        self._find_agent = find_agent
        self.agent = None
        self.consistency = CRASH
        self.seconds = None
        self.filesystems = None
        self.reason = "freeze is never" if mode == "never" else None
        self._asked_at = None
        self._signals = HeldSignals("while the guest's file systems were frozen")

    def check(self):
        """Before anything is created: whether an agent answers. always fails without one (UserError)."""
        if self.mode == "never":
            return
        try:
            self.agent = self._find_agent()
            self.agent.check()
        except GuestAgentError as err:
            self._cannot_freeze(err)
            return
        self.consistency = APPLICATION  # planned; the freeze must still succeed

    def _cannot_freeze(self, err):
        self.close()
        self.consistency = CRASH
        if self.mode == "always":
            raise UserError("freeze is always, but the guest's file systems cannot be frozen: %s. Run "
                            "qemu-guest-agent in the guest (reachable as this module's documentation says), or use "
                            "freeze: auto to take a crash-consistent backup when it does not answer." % err) from None
        self.reason = "the guest's file systems could not be frozen: %s" % err

    def close(self):
        if self.agent is not None:
            self.agent.close()
        self.agent = None

    def __enter__(self):
        if self.agent is None:
            return self
        self._signals.hold(then=lambda: self.state.record_freeze(self.backup_id, self.agent.record()))
        self._asked_at = time.monotonic()
        try:
            frozen = self.agent.freeze()
            if not frozen:
                raise FreezeUnavailable("the guest agent found no file system to freeze")
        except GuestAgentError as err:
            self._thaw()  # a freeze that failed or timed out may have frozen some of them
            self._cannot_freeze(err)
            return self
        self.filesystems = frozen
        return self

    def __exit__(self, *exc_info):
        if self._asked_at is not None:
            self._thaw()

    def _thaw(self):
        """Thaw, measure, forget the record, let the held signals through."""
        try:
            self.agent.thaw()
        except GuestAgentUnreachable:
            pass  # no agent there any more: the VM stopped, and its file systems with it
        except GuestAgentError as err:
            self._asked_at = None
            self._signals.release(interrupt=False)
            raise GuestLeftFrozen(
                "THE GUEST'S FILE SYSTEMS MAY BE LEFT FROZEN: thawing them failed (%s). Thaw them with the guest "
                "agent's guest-fsfreeze-thaw (virsh domfsthaw for a libvirt domain); the next fleetbackup start, "
                "stop or info of this VM thaws them too." % err) from None
        self.seconds = round(time.monotonic() - self._asked_at, 6)
        self._asked_at = None
        self.state.forget_freeze()
        self._signals.release()  # a held signal arrives here, and becomes Interrupted

    def result(self):
        """RV backup.consistency and backup.freeze."""
        return dict(consistency=self.consistency,
                    freeze=dict(seconds=self.seconds, filesystems=self.filesystems, reason=self.reason))


def thaw_abandoned_freeze(state, agent_for):
    """Thaw the guest if a run of ours died while it may have been frozen; a message saying so, or None.

    agent_for(record["agent"]) reaches the agent again.
    """
    record = state.abandoned_freeze()
    if record is None:
        return None
    died = "A fleetbackup run (pid %d, backup %s) died while the guest's file systems were frozen" % (
        record["owner"]["pid"], record["backup_id"])
    agent = agent_for(record["agent"])
    try:
        thawed = agent.thaw_if_frozen()
        outcome = "they were thawed" if thawed else "they were thawed already"
    except GuestAgentUnreachable as err:
        outcome = "its guest agent is gone (%s), and the file systems with it" % err
    except GuestAgentError as err:
        raise GuestLeftFrozen("%s, and THEY MAY STILL BE FROZEN: thawing them failed (%s). Thaw them with the guest "
                              "agent's guest-fsfreeze-thaw (virsh domfsthaw for a libvirt domain), or run this again."
                              % (died, err)) from None
    finally:
        agent.close()
    state.forget_freeze()
    return "%s; %s." % (died, outcome)
