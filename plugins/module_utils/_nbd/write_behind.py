# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Write-behind for image files, as nbdcopy does it.

Letting gigabytes of dirty pages pile up makes the kernel throttle writers
and leaves all the disk work to the final flush. Starting writeback as soon
as a range is written keeps the disk busy during the copy; dropping ranges
from the page cache once they are on disk keeps a backup from pushing the
VMs' own cache out of the hypervisor's memory.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import deque

SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4
# Ranges written but not yet waited for: enough to keep the disk busy, few enough to bound dirty memory.
WINDOW = 64


def _sync_file_range():
    try:
        # The running interpreter's own symbols include libc's, without a search for the library.
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None  # not Linux: the final flush does all the work
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


SYNC_FILE_RANGE = _sync_file_range()


class WriteBehind:
    def __init__(self, fd):
        self.fd = fd
        self._lock = threading.Lock()
        self._written = deque()

    def written(self, offset, length):
        """Call after each write: starts its writeback, and retires the oldest range once the window is full."""
        if SYNC_FILE_RANGE is None:
            return
        SYNC_FILE_RANGE(self.fd, offset, length, SYNC_FILE_RANGE_WRITE)
        with self._lock:
            self._written.append((offset, length))
            oldest = self._written.popleft() if len(self._written) > WINDOW else None
        if oldest:
            SYNC_FILE_RANGE(self.fd, oldest[0], oldest[1],
                            SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER)
            os.posix_fadvise(self.fd, oldest[0], oldest[1], os.POSIX_FADV_DONTNEED)
