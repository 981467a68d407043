# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Scratch space: where QEMU keeps the old data that the guest overwrites while a backup runs.

Scratch images have no name. They are made with O_TMPFILE (or named and unlinked at once where a file
system lacks it) and handed to QEMU as file descriptors. So QEMU may run as any user, nobody can plant
or swap them, and they vanish when QEMU lets go of them, even when QEMU or a module dies.

Each one's room is reserved (fallocate) when the backup starts and never grows: QEMU sees it through a
raw node of that size. So a backup never competes with the VMs for space on the scratch file system,
even when their disks live there too; a backup that needs more breaks instead.
"""

from __future__ import annotations

import errno
import os
import re
import secrets

from ansible.module_utils.common.text.formatters import human_to_bytes

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import (
    check_trusted_directory,
    create_exclusive,
    remove_file,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.qemu_img import checked_qemu_img

PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
CLUSTER = 64 * 1024
# Room for a qcow2 image's header and first tables, whatever share a disk gets.
MIN_SCRATCH = 1024 * 1024


def scratch_bytes(setting, disks_size):
    """scratch_size in bytes: a size (512M, 2G, bytes) or a percentage of the backed-up disks' total size."""
    text = str(setting)
    percent = PERCENT.match(text)
    if percent:
        return int(disks_size * float(percent.group(1)) / 100)
    try:
        return human_to_bytes(text)
    except ValueError:
        raise UserError("Invalid scratch_size '%s': give a size like 512M or 2G, or a percentage of the disks' "
                        "size like 10%%." % text) from None


def scratch_shares(total, disk_sizes):
    """Each disk's part of the scratch room, by its size, in whole clusters and at least MIN_SCRATCH."""
    whole = sum(disk_sizes) or 1
    return [max(MIN_SCRATCH, -(-total * size // whole // CLUSTER) * CLUSTER) for size in disk_sizes]


def existing_parent(path):
    """path, or its nearest ancestor that exists (a check-mode run has not made our own directories yet)."""
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_scratch_dir(path, needed_bytes, ours=False):
    """Refuse a scratch_dir that others could write into without the sticky bit, or that lacks the room.

    ours: fleetbackup's own private directory, which a check-mode run may not have created yet.
    """
    if ours:
        path = existing_parent(path)
    else:
        check_trusted_directory(path, "scratch_dir", "room for what the guest overwrites during the backup")
    fs = os.statvfs(path)
    free = fs.f_bavail * fs.f_frsize
    if free < needed_bytes:
        raise UserError("scratch_dir %s has %d MiB free, less than the %d MiB of scratch_size to reserve: free "
                        "some room, point scratch_dir at a bigger file system, or lower scratch_size. If the "
                        "scratch space runs out during the backup, only the backup fails, never the guest."
                        % (path, free >> 20, needed_bytes >> 20))
    return free


def create_scratch_image(directory, size, room, name=None):
    """A new qcow2 image for a disk of `size` bytes, in a file of `room` bytes reserved in directory.

    Nameless unless a name is given (libvirt opens its scratch images by path). Returns its file descriptor
    (read-write). qcow2 takes free clusters inside the file before it grows it.
    """
    created = create_exclusive(directory, name, os.O_RDWR) if name else None
    fd = created.fd if created else _nameless_file(directory)
    try:
        checked_qemu_img("create", "-q", "-f", "qcow2", "/dev/fd/%d" % fd, size, pass_fds=(fd,))
        os.posix_fallocate(fd, 0, room)
    except BaseException as err:
        os.close(fd)
        if created:
            remove_file(created.path)  # made above, by us
        if isinstance(err, OSError):
            raise UserError("Cannot reserve %d MiB of scratch space in %s (%s): free some room or lower "
                            "scratch_size." % (room >> 20, directory, err.strerror)) from None
        raise
    return fd


def _nameless_file(directory):
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EISDIR):
            raise UserError("Cannot create a scratch image in %s: %s." % (directory, err.strerror)) from None
    # No O_TMPFILE here: a fresh name that nobody can have planted (O_EXCL, no symlink), unlinked at once.
    created = create_exclusive(directory, ".fleetbackup-scratch-%s" % secrets.token_hex(8), os.O_RDWR)
    os.unlink(created.path)
    return created.fd
