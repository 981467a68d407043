# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""A VM that is not running, reached on its image files: the third implementation of VmConnection.

The images come from fleetbackup's own state, recorded while a QMP VM ran (with the device and inode of each file,
so a swapped file is refused), or from libvirt's definition of an inactive domain; never from a repository. Its
backups are made by the offline view (_views.offline_export).
"""

from __future__ import annotations

import json

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.qemu_img import (
    checked_qemu_img,
    remove_bitmap,
    run_qemu_img,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.connection import (
    ENDED_FLEECING_VIEW,
    FLEECING,
    OFFLINE,
    OFFLINE_EXPORT_VIEW,
    VmConnection,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.disks import Disk
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.guest_freeze import FreezeUnavailable
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.offline.seen_disks import image_identity

BITMAP_GRANULARITY = 64 * 1024
# qemu-img's words when another process holds an image's write lock.
LOCKED = "Failed to get"


class OfflineVm(VmConnection):
    """images: [{name, qdev, node, format, filename, read_only, identity (or None: libvirt's definition)}].

    metadata: libvirt's checkpoint metadata of an inactive domain (LibvirtCheckpoints), or None.
    """

    # A backup of the VM while it ran over QMP, which stopped since, is its manager's: QEMU took its view along.
    views = {FLEECING: ENDED_FLEECING_VIEW, OFFLINE: OFFLINE_EXPORT_VIEW}
    new_view = OFFLINE

    def __init__(self, state, registry, timeout, description, images, metadata=None):
        super().__init__(state, registry, timeout)
        self.description = description
        self.images = images
        self.metadata = metadata

    def undo_abandoned(self):
        return []  # nothing of ours runs in a stopped VM

    def guest_agent(self, request):
        raise FreezeUnavailable("%s is not running: its file systems are as its shutdown left them"
                                % self.description)

    # ---- disks and checkpoints

    def disks(self):
        return [self._disk(image) for image in self.images]

    def _disk(self, image):
        path = image["filename"]
        if image.get("identity") is not None and image_identity(path) != image["identity"]:
            raise UserError("The image %s of disk %s is not the file %s had open when fleetbackup last saw it "
                            "running (another file, or none, is there now): start the VM once so that fleetbackup "
                            "sees its disks again." % (path, image["name"], self.description))
        process = run_qemu_img("info", "--output=json", path)
        if process.returncode != 0:
            error = process.stderr.decode(errors="replace").strip()
            if LOCKED in error:
                raise UserError("The image %s of %s is in use by another process (%s): the VM is running after "
                                "all, or something else holds it. Back it up through its running QEMU."
                                % (path, self.description, error))
            raise UserError("Cannot read the image %s of disk %s: %s" % (path, image["name"], error))
        info = json.loads(process.stdout)
        if info["format"] != image["format"]:
            raise UserError("The image %s of disk %s is %s now, not %s as recorded: start the VM once so that "
                            "fleetbackup sees its disks again."
                            % (path, image["name"], info["format"], image["format"]))
        known = self.metadata.names() if self.metadata else None
        bitmaps = {}
        for bitmap in info.get("format-specific", {}).get("data", {}).get("bitmaps", []):
            if known is not None and bitmap["name"] not in known:
                continue  # a bitmap libvirt does not list is no checkpoint of the domain
            bitmaps[bitmap["name"]] = dict(
                name=bitmap["name"], count=None, granularity=bitmap["granularity"],
                inconsistent="in-use" in bitmap["flags"], persistent=True, recording="auto" in bitmap["flags"],
                busy=False)
        return Disk(name=image["name"], node=image["node"], root=image["node"], drive=image["name"],
                    qdev=image["qdev"], format=info["format"], filename=path, size=info["virtual-size"],
                    read_only=image["read_only"], bitmaps=bitmaps)

    def set_bitmaps(self, name, disks, present):
        for disk in disks:
            checked_qemu_img("bitmap", "--add" if present else "--remove", *(
                ["-g", BITMAP_GRANULARITY] if present else []), disk.filename, name)
        if self.metadata:
            if present:
                self.metadata.define(name, [disk.name for disk in disks])
            else:
                self.metadata.forget(name)

    def remove_checkpoint(self, name, filenames):
        """Remove the bitmaps of checkpoint `name` from these images (where still there), and libvirt's metadata."""
        for filename in filenames:
            remove_bitmap(filename, name)
        if self.metadata and name in self.metadata.names():
            self.metadata.forget(name)
