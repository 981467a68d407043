# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The change-rate signal: an incremental whose dirty share is far above the VM's own history."""

from __future__ import annotations

import statistics

HISTORY = 10
MIN_SAMPLES = 3
TIMES_MEDIAN = 5
MIN_SHARE = 0.10


def change_signal(backups, dirty_bytes, disk_bytes):
    """{dirty_bytes, disk_bytes, share, median_share, samples, flagged, note} of an incremental now."""
    shares = [b["dirty_bytes"] / b["disk_bytes"] for b in backups
              if b.get("dirty_bytes") is not None and b.get("disk_bytes")][-HISTORY:]
    share = dirty_bytes / disk_bytes if disk_bytes else 0.0
    median = statistics.median(shares) if shares else None
    flagged = (len(shares) >= MIN_SAMPLES and share > MIN_SHARE and share > TIMES_MEDIAN * (median or 0))
    note = ("%.0f%% of the disks changed since the last backup, %s its median of %.1f%%: mass rewriting, such as "
            "ransomware encrypting, looks like this" % (share * 100, "%.0fx" % (share / median) if median else "far above",
                                                         (median or 0) * 100)) if flagged else None
    return dict(dirty_bytes=dirty_bytes, disk_bytes=disk_bytes, share=round(share, 6),
                median_share=None if median is None else round(median, 6), samples=len(shares), flagged=flagged,
                note=note)
