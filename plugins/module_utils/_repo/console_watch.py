# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Whether a drill's booting guest is stuck, judged by its serial console and its vCPUs, and the failure that ends
a drill."""

from __future__ import annotations

import os
import time


class DrillFailed(Exception):
    """The drill cannot go on: the message is its problem."""


class ConsoleWatch:
    """Whether a booting guest is stuck: it wrote on its serial console, then nothing for silence_timeout seconds,
    while its vCPUs idled (QEMU used less than IDLE_SHARE of a CPU). A guest that boots on without a serial console
    keeps its vCPUs busy; one that never writes there is not judged by it; 0 turns the watch off.
    """

    IDLE_SHARE = 0.25

    def __init__(self, path, silence_timeout, pid):
        self.path = path
        self.silence_timeout = silence_timeout
        self.pid = pid
        self.size = 0
        self.grew = time.monotonic()
        self.cpu_at_growth = self._cpu_seconds()

    def _cpu_seconds(self):
        """The CPU time QEMU has used, in seconds (utime and stime of /proc/<pid>/stat)."""
        try:
            with open("/proc/%d/stat" % self.pid) as stream:
                fields = stream.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def check(self):
        """DrillFailed once the console has been silent, and the guest idle, for too long."""
        if not self.silence_timeout:
            return
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            size = 0
        now = time.monotonic()
        silent = now - self.grew
        if size != self.size or (silent >= self.silence_timeout and
                                 self._cpu_seconds() - self.cpu_at_growth > self.IDLE_SHARE * silent):
            self.size, self.grew, self.cpu_at_growth = size, now, self._cpu_seconds()  # growing, or busy: not stuck
        elif size and silent >= self.silence_timeout:
            raise DrillFailed("the guest wrote nothing more on its serial console for %g s, its vCPUs idle, and "
                              "its agent did not answer: it is stuck (in its bootloader, firmware or kernel). For a "
                              "guest that waits that long in silence, raise console_silence_timeout (0 turns this "
                              "check off)" % self.silence_timeout)
