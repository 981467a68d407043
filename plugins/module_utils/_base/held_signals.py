# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Signals that must not end a run while it holds the guest still (vCPUs paused, file systems frozen).

SIGTERM, SIGHUP and SIGINT are held from hold() to release(); release() then raises Interrupted, so that the
run lets go of the guest first and then fails (and rolls back) instead of dying half-way. SIGKILL cannot be
held: that is what the records in the VM's state are for. Holds nest: an inner release() puts back the outer
hold's handlers and signal mask.
"""

from __future__ import annotations

import signal

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import FleetbackupError

HELD_SIGNALS = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}


class Interrupted(FleetbackupError):
    """A signal came while the guest was held still; the start rolls back instead of dying half-way."""


class HeldSignals:
    """hold() ... release(): the signals that came in between become Interrupted at release()."""

    def __init__(self, window):
        self.window = window  # for the message: "while the vCPUs were paused"
        self._signals = []
        self._handlers = None
        self._mask = None

    def hold(self, then=None):
        """Hold the signals, then call then() (the record of what is about to be held still); if it fails, let them
        go again: nothing is held still yet, and its failure is the news."""
        self._signals = []
        self._handlers = {signum: signal.signal(signum, self._hold) for signum in HELD_SIGNALS}
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        if then is not None:
            try:
                then()
            except BaseException:
                self.release(interrupt=False)
                raise
        return self

    def _hold(self, signum, frame):
        self._signals.append(signal.Signals(signum).name)

    def release(self, interrupt=True):
        """Let the held signals through (they reach _hold here) and put the handlers back.

        Interrupted if any came, unless interrupt is false (the caller raises a more urgent error).
        """
        if self._handlers is None:
            return
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        finally:
            for signum, handler in self._handlers.items():
                signal.signal(signum, handler)
            self._handlers = None
        if self._signals and interrupt:
            raise Interrupted("%s arrived %s" % (" and ".join(self._signals), self.window))
