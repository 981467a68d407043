# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Scratch space: where QEMU keeps the old data that the guest overwrites while a backup runs.

Scratch images have no name. They are made with O_TMPFILE (or named and unlinked at once where a file
system lacks it) and handed to QEMU as file descriptors. So QEMU may run as any user, nobody can plant
or swap them, and they vanish when QEMU lets go of them, even when QEMU or a module dies.
"""

from __future__ import annotations

import errno
import os
import re
import secrets

from ansible.module_utils.common.text.formatters import human_to_bytes

from ansible_collections.fleetbackup.qemu.plugins.module_utils.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils.private_state import (
    check_trusted_directory,
    create_exclusive,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils.qemu_img import checked_qemu_img

PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def minimum_free_bytes(setting, disks_size):
    """scratch_min_free in bytes: a size (512M, 2G, bytes) or a percentage of the backed-up disks' total size."""
    text = str(setting)
    percent = PERCENT.match(text)
    if percent:
        return int(disks_size * float(percent.group(1)) / 100)
    try:
        return human_to_bytes(text)
    except ValueError:
        raise UserError("Invalid scratch_min_free '%s': give a size like 512M or 2G, or a percentage of the disks' "
                        "size like 10%%." % text) from None


def check_scratch_dir(path, needed_bytes):
    """Refuse a scratch_dir that others could write into without the sticky bit, or that lacks room."""
    check_trusted_directory(path, "scratch_dir", "room for what the guest overwrites during the backup")
    fs = os.statvfs(path)
    free = fs.f_bavail * fs.f_frsize
    if free < needed_bytes:
        raise UserError("scratch_dir %s has %d MiB free, less than the %d MiB that scratch_min_free asks for: free "
                        "some room, point scratch_dir at a bigger file system, or lower scratch_min_free. If the "
                        "scratch space runs out during the backup, only the backup fails, never the guest."
                        % (path, free >> 20, needed_bytes >> 20))
    return free


def create_scratch_image(directory, size):
    """A new, nameless qcow2 image of `size` bytes in directory; returns its file descriptor (read-write)."""
    fd = _nameless_file(directory)
    try:
        checked_qemu_img("create", "-q", "-f", "qcow2", "/dev/fd/%d" % fd, size, pass_fds=(fd,))
    except BaseException:
        os.close(fd)
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
