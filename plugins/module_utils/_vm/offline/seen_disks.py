# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""A running VM's disks as fleetbackup last saw them, kept to back it up on its images once it stopped, and the
identity of an image file, so a swapped file is refused."""

from __future__ import annotations

import os
import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import file_identity

DISKS = "disks.json"


def image_identity(path):
    """What identifies an image file (a symlink to it is fine): [device, inode]; None when it is no regular file."""
    return file_identity(path, follow=True)


def image_fingerprint(path):
    """(inode, size, mtime, ctime): any write, metadata change or replacement of the file changes it."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def remember_disks(state, disks, vm):
    """Record a running VM's disks, and vm (its socket, name and UUID), in its private state: what a backup while it
    is stopped goes by."""
    record = dict(vm, disks=[dict(name=disk.name, node=disk.node, qdev=disk.qdev, format=disk.format,
                                  filename=disk.filename, read_only=disk.read_only,
                                  identity=image_identity(disk.filename)) for disk in disks])
    known = state.dir.read_json(DISKS)
    if known is None or {key: value for key, value in known.items() if key != "seen"} != record:
        state.dir.write_json(DISKS, dict(record, seen=int(time.time())))


def recorded_disks(state):
    """(disks, when) as fleetbackup last saw a QMP VM running; None when it never saw it."""
    record = state.dir.read_json(DISKS)
    if record is None:
        return None
    return record["disks"], record["seen"]
