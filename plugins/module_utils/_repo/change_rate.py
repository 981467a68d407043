# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The change-rate signal: how much of a VM's disks changed since its last backup, against its own history.

The dirty bytes of an incremental are known before the copy (the checkpoints count them). A share of the disks far
above the VM's usual one is what mass rewriting looks like, such as ransomware encrypting the guest's files: a cheap
early warning. It only informs: it never fails a backup, and odd input gives no signal rather than an error.
"""

from __future__ import annotations

import statistics

# How many of the latest recorded incrementals make a VM's usual share.
HISTORY = 10
# Fewer recorded incrementals than this are no history to compare with: nothing is flagged.
MIN_SAMPLES = 3
# Flagged above this many times the usual share...
SURGE_FACTOR = 5
# ...when it is also more than this share of the disks: a quiet VM that doubles a tiny share is no alarm.
SURGE_SHARE = 0.10


def change_signal(backups, dirty_bytes, disk_bytes, disks=()):
    """The change of the incremental about to be copied, against the VM's recorded incrementals.

    backups: the VM's manifest entries, oldest first; an incremental's dirty_bytes and disk_bytes (all its disks
    together) make one sample, and an entry without them (recorded before they were) is skipped.
    dirty_bytes, disk_bytes: this incremental's. disks: its disk names, for the note.
    Returns {dirty_bytes, disk_bytes, share, median_share, samples, flagged, note}; share and median_share are
    None when unknown (no disk bytes), note a line saying why when flagged, else None.
    """
    share = _share(dirty_bytes, disk_bytes)
    history = [_share(entry.get("dirty_bytes"), entry.get("disk_bytes")) for entry in _entries(backups)
               if entry.get("level") == "incremental"]
    history = [sample for sample in history if sample is not None][-HISTORY:]
    median = statistics.median(history) if history else None
    flagged = (share is not None and len(history) >= MIN_SAMPLES and share > SURGE_FACTOR * median
               and share > SURGE_SHARE)
    return dict(dirty_bytes=_count(dirty_bytes), disk_bytes=_count(disk_bytes), share=share, median_share=median,
                samples=len(history), flagged=flagged, note=_note(share, median, disks) if flagged else None)


def _entries(backups):
    return [entry for entry in backups if isinstance(entry, dict)] if isinstance(backups, (list, tuple)) else []


def _count(value):
    """value as a count of bytes, or None when it is none."""
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else None


def _share(dirty_bytes, disk_bytes):
    dirty, disk = _count(dirty_bytes), _count(disk_bytes)
    if dirty is None or not disk:
        return None
    return min(dirty / disk, 1.0)  # a count over the disk's size is a count that went wrong, not more change


def _percent(share):
    return "%.0f%%" % (share * 100) if share >= 0.1 else "%.1f%%" % (share * 100)


def _note(share, median, disks):
    names = ",".join(str(disk) for disk in disks) or "the disks"
    usual = ("%.0fx its median of %s" % (share / median, _percent(median)) if median
             else "where its median is 0%")
    return ("%s: %s of the disk changed since the last backup, %s: mass rewriting, such as ransomware encrypting, "
            "looks like this" % (names, _percent(share), usual))
