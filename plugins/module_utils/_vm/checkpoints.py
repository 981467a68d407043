# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Checkpoints: persistent dirty bitmaps in QEMU, and what QEMU does not record about them.

A bitmap does not know the disk's size when it was created, and a disk shrunk
and grown again after a checkpoint would let stale backup data show through an
incremental. So each checkpoint's disk size and creation time are kept in a
registry file per disk image, as libvirt keeps checkpoint metadata beside QEMU.
"""

from __future__ import annotations

import hashlib
import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import PrivateDir


class CheckpointRegistry:
    """{image file: {checkpoint: {size, created}}}, one small JSON file per image in our private directory."""

    def __init__(self, directory):
        self.directory = directory

    @staticmethod
    def _name(image):
        return hashlib.sha1(image.encode()).hexdigest()[:20] + ".json"

    def _load(self, image):
        try:
            record = PrivateDir(self.directory).read_json(self._name(image)) or {}
        except UserError:
            return {}  # a damaged record only costs the resize check, never data
        return record.get("checkpoints", {})

    def _save(self, image, checkpoints):
        try:
            PrivateDir(self.directory).ensure().write_json(self._name(image), dict(image=image, checkpoints=checkpoints))
        except OSError as err:
            raise UserError("Cannot write the checkpoint registry in %s (%s): check state_dir."
                            % (self.directory, err.strerror)) from None

    def get(self, image, name):
        """{size, created} recorded for the checkpoint, or None when unknown."""
        return self._load(image).get(name)

    def record(self, disks, name):
        for disk in disks:
            checkpoints = self._load(disk.filename)
            checkpoints[name] = dict(size=disk.size, created=int(time.time()))
            self._save(disk.filename, checkpoints)

    def forget(self, images, name):
        for image in images:
            checkpoints = self._load(image)
            if checkpoints.pop(name, None) is not None:
                self._save(image, checkpoints)


def checkpoint_problem(disk, name, registry):
    """Why checkpoint `name` cannot serve an incremental of `disk`, or None when it can."""
    if disk.format != "qcow2":
        return "disk %s is %s, which cannot hold checkpoints" % (disk.name, disk.format)
    bitmap = disk.bitmaps.get(name)
    if bitmap is None:
        return "checkpoint '%s' does not exist on disk %s" % (name, disk.name)
    if bitmap.get("inconsistent"):
        return ("checkpoint '%s' on disk %s is inconsistent (QEMU stopped uncleanly); it can only be removed"
                % (name, disk.name))
    recorded = registry.get(disk.filename, name)
    if recorded and recorded["size"] != disk.size:
        return ("disk %s was resized from %d to %d bytes since checkpoint '%s'"
                % (disk.name, recorded["size"], disk.size, name))
    return None


def is_backup_bitmap(bitmap):
    """The frozen, temporary bitmap a running incremental backup exports: no checkpoint."""
    return bitmap["name"].startswith("fb-") and not bitmap["persistent"]


def describe_checkpoints(disk, registry):
    """The checkpoints of a disk, for qemu_backup_info."""
    described = []
    for name, bitmap in sorted(disk.bitmaps.items()):
        if is_backup_bitmap(bitmap):
            continue
        recorded = registry.get(disk.filename, name) or {}
        described.append(dict(
            name=name, dirty_bytes=bitmap["count"], granularity=bitmap["granularity"],
            recording=bitmap["recording"], persistent=bitmap["persistent"], busy=bitmap["busy"],
            inconsistent=bool(bitmap.get("inconsistent")), size_at_checkpoint=recorded.get("size"),
            created=recorded.get("created"),
            usable=checkpoint_problem(disk, name, registry) is None))
    return described


def describe_disks(disks, registry):
    """The disks as qemu_backup_info lists them, and as a run's plan reads them."""
    return [dict(disk=disk.name, node=disk.node, file=disk.filename, format=disk.format, size=disk.size,
                 read_only=disk.read_only, checkpoints=describe_checkpoints(disk, registry)) for disk in disks]
