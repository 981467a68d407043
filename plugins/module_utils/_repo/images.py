# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Image files as a copy or a restore writes them: the partial file, its rename, and which backup an image holds.

An image NAME is written as the partial file .NAME.part-PID@HOST in its directory, and renamed to NAME only
once complete, so NAME never holds a partial image. The writer's PID and host tell a stale partial, whose
writer is gone, from one being written. Which backup an image holds (its identity) is recorded in an
extended attribute of the image, so that a later copy can prove it holds that very backup.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import stat

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.processes import process_start_time
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import sync_directory

PARTIAL = re.compile(r"^\..+\.part-(\d+)@(.+)$")
# Which backup an image holds: its export (backup id, start tag, disk), size and changed-block context.
IDENTITY_XATTR = "user.fleetbackup.backup"


def partial_name(image):
    """The name of the partial file that this process writes image (a path or a name) as."""
    return ".%s.part-%d@%s" % (os.path.basename(image), os.getpid(), socket.gethostname())


def publish(partial, image):
    """Rename the complete partial file to image, durably."""
    os.rename(partial, image)
    sync_directory(os.path.dirname(image) or ".")


def remove_stale_partials(directory):
    """Delete the partial images that killed writers on this host left in directory: files of ours whose writer is gone.

    A name proves nothing: only a regular file that this user owns is taken for one of ours. A partial of another
    host (a shared repository) may belong to a copy running there: it is left alone.
    """
    removed = []
    for name in os.listdir(directory):
        match = PARTIAL.match(name)
        if match and match.group(2) == socket.gethostname() and process_start_time(int(match.group(1))) is None:
            info = os.lstat(os.path.join(directory, name))
            if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid():
                os.unlink(os.path.join(directory, name))
                removed.append(name)
    return removed


def recorded_identity(path):
    """The identity (and checksum) a copy recorded on the image at path, or None (none, or no xattr support)."""
    try:
        return json.loads(os.getxattr(path, IDENTITY_XATTR, follow_symlinks=False))
    except OSError as err:
        if err.errno in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT):
            return None
        raise
    except ValueError:
        return None


def record_identity(path, identity):
    """Record which backup the image holds, and its checksum; False where the file system keeps no xattrs."""
    try:
        os.setxattr(path, IDENTITY_XATTR, json.dumps(identity, sort_keys=True).encode(), follow_symlinks=False)
        return True
    except OSError as err:
        if err.errno == errno.ENOTSUP:
            return False
        raise


def describe_identity(identity):
    if not identity:
        return "an image with no record of its backup"
    return "export %s (%s, %d bytes%s%s)" % (
        identity["export"], identity.get("format"), identity["size"],
        ", changes in %s" % identity["bitmap"] if identity["bitmap"] else "",
        ", over %s" % identity["backing"] if identity.get("backing") else "")


def disk_usage(path):
    """Bytes that the image at path takes on its file system."""
    return os.stat(path).st_blocks * 512
