# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""What a backup start will do, whatever connection reaches the VM: disks, levels, exports and their names.

Each start gets a tag of its own. Export names carry the backup id, the tag and the disk, so a copy can
record exactly which backup an image holds, even when a backup id is used again the next night.
"""

from __future__ import annotations

import os
import re
import secrets
from urllib.parse import quote

from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.checkpoints import checkpoint_problem
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.options import START_ARGUMENT_SPEC
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.guest_freeze import check_freeze_timeout
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import check_trusted_directory
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.extents import dirty_context
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.tls import check_tcp_request, tcp_url

BACKUP_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
EXPORT_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
# <backup_id>/<start tag>/<disk>: what qemu_backup_copy records as the identity of an image.
EXPORT_NAME = re.compile(r"^(?P<backup_id>[A-Za-z0-9_-]{1,32})/(?P<tag>[0-9a-f]{8})/(?P<disk>[A-Za-z0-9_.-]+)$")
MAX_CBW_TIMEOUT = 60
# sun_path holds 108 bytes with its terminating NUL.
MAX_SOCKET_PATH = 107
# The options that define a backup: a second start with the same id must ask for the same.
REQUEST_KEYS = tuple(START_ARGUMENT_SPEC)


def check_backup_id(backup_id):
    if not BACKUP_ID_PATTERN.match(backup_id or ""):
        raise UserError("Invalid backup_id '%s': use 1 to 32 letters, digits, '_' or '-'." % backup_id)
    return backup_id


def check_checkpoint_name(name, option):
    """A checkpoint name: not empty, and not fb-..., which running backups use for their own bitmaps."""
    if name is not None and (not name or name.startswith("fb-") or len(name) > 1023):
        raise UserError("Invalid %s '%s': a checkpoint name must not be empty or start with 'fb-', which running "
                        "backups use for their own bitmaps." % (option, name))
    return name


def check_request(request):
    """The checks of a start's options that need no VM."""
    check_checkpoint_name(request["checkpoint"], "checkpoint")
    check_checkpoint_name(request["incremental"], "incremental")
    check_freeze_timeout(request["freeze_timeout"])
    if not 1 <= request["cbw_timeout"] <= MAX_CBW_TIMEOUT:
        raise UserError("cbw_timeout must be 1 to %d seconds: a guest write waits that long at most, and guests "
                        "reset a disk that does not answer within 30 s (Linux SCSI)." % MAX_CBW_TIMEOUT)
    check_tcp_request(request.get("nbd_tcp"))


def check_socket_path(path, given):
    """A socket path that fits sun_path, in a directory where nobody can swap it (ours needs no check)."""
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise UserError("The socket path %s is longer than the %d bytes a unix socket path may have: choose a shorter "
                        "nbd_socket or state_dir." % (path, MAX_SOCKET_PATH))
    if given:
        check_trusted_directory(os.path.dirname(path), "nbd_socket", "room for the backup's NBD socket")


def export_names(disks):
    """A unique, URL-safe NBD export name part per disk."""
    names = []
    for disk in disks:
        name = EXPORT_NAME_UNSAFE.sub("_", disk.name)
        names.append(name if name not in names else "%s_%d" % (name, len(names)))
    return names


def nbd_url(export, socket_path):
    return "nbd+unix:///%s?socket=%s" % (quote(export), quote(socket_path, safe="/"))


def request_differences(recorded, requested):
    """The options in which two starts of one backup id differ."""
    return [key for key in REQUEST_KEYS if recorded.get(key) != requested.get(key)]


class BackupPlan:
    """The disks of one start and what each of them will be: full or incremental, exported under which name."""

    def __init__(self, backup_id, disks, request, registry, nbd_socket, tag=None):
        self.backup_id = backup_id
        self.request = request
        self.nbd_socket = nbd_socket  # None when the exports are served over TCP
        self.tcp = request.get("nbd_tcp")
        self.port = self.tcp["port"] if self.tcp else None  # the port the listener got, once it listens
        self.scratch_dir = request["scratch_dir"]
        self.tag = tag or new_tag()
        self.checkpoint = request["checkpoint"]
        self.incremental = request["incremental"]
        self.chosen = disks
        self.disks = []
        for disk, export in zip(disks, export_names(disks)):
            mode, reason = _disk_mode(disk, self.incremental, request["fallback_to_full"], registry)
            checkpoint, checkpoint_reason = _checkpoint_for(disk, self.checkpoint, request["fallback_to_full"])
            incremental = mode == "incremental"
            export_name = "%s/%s/%s" % (backup_id, self.tag, export)
            self.disks.append(dict(
                disk=disk.name, node=disk.node, root=disk.root, qdev=disk.qdev, format=disk.format,
                filename=disk.filename, size=disk.size, mode=mode, reason=reason or checkpoint_reason,
                checkpoint=checkpoint, export=export_name,
                dirty_bitmap=dirty_context(temporary_bitmap(backup_id)) if incremental else None,
                dirty_bytes=disk.bitmaps[self.incremental]["count"] if incremental else None,
                granularity=disk.bitmaps[self.incremental]["granularity"] if incremental else None))

    def url(self, export):
        """The NBD URL of an export: over the unix socket, or over TCP at the address the copy host reaches.

        A disk served apart (a stopped VM's, by a qemu-nbd of its own) carries its own url instead.
        """
        if self.tcp:
            return tcp_url(export, self.tcp["host"], self.port, tls=not self.tcp["plain"])
        return nbd_url(export, self.nbd_socket)

    def result(self):
        public = ("disk", "node", "export", "size", "mode", "dirty_bitmap", "dirty_bytes", "checkpoint", "reason")
        tcp = dict(host=self.tcp["host"], port=self.port, tls=not self.tcp["plain"]) if self.tcp else None
        return dict(id=self.backup_id, nbd_socket=self.nbd_socket, nbd_tcp=tcp, checkpoint=self.checkpoint,
                    incremental=self.incremental, pause=None,
                    disks=[dict({key: disk[key] for key in public}, url=disk.get("url") or self.url(disk["export"]))
                           for disk in self.disks])


def new_tag():
    """A start's own tag: 8 hex digits."""
    return secrets.token_hex(4)


def temporary_bitmap(backup_id):
    """The frozen copy of a checkpoint that an incremental backup exports."""
    return "fb-%s" % backup_id


def _disk_mode(disk, incremental, fallback_to_full, registry):
    """('full' | 'incremental', reason for a full backup where an incremental was asked)."""
    if not incremental:
        return "full", None
    problem = checkpoint_problem(disk, incremental, registry)
    if problem is None:
        return "incremental", None
    if fallback_to_full:
        return "full", problem
    raise UserError("Cannot back up incrementally: %s. Take a full backup, or set fallback_to_full: true."
                    % problem)


def _checkpoint_for(disk, checkpoint, fallback_to_full):
    """(whether disk gets the new checkpoint, why not) ; a disk that cannot hold one fails without the fallback."""
    if not checkpoint:
        return False, None
    if checkpoint in disk.bitmaps:
        raise UserError("Checkpoint '%s' already exists on disk %s: name the new checkpoint differently, or "
                        "remove the old one with fleetbackup.qemu.qemu_checkpoint state=absent."
                        % (checkpoint, disk.name))
    if disk.format == "qcow2":
        return True, None
    if fallback_to_full:
        return False, ("disk %s is %s, which cannot hold a checkpoint: it is backed up in full every time"
                       % (disk.name, disk.format))
    raise UserError("Cannot add checkpoint '%s' to disk %s: it is %s, and persistent dirty bitmaps need qcow2. "
                    "Leave out the checkpoint, set fallback_to_full to back it up in full every time, or back up "
                    "only the qcow2 disks." % (checkpoint, disk.name, disk.format))
