# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""A shut-off libvirt domain: its images, as its definition names them, reached offline, with libvirt's checkpoint
metadata kept in step."""

from __future__ import annotations

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.connection import LIBVIRT_PULL, LIBVIRT_PULL_VIEW, OFFLINE, OFFLINE_EXPORT_VIEW
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.libvirt.checkpoints import LibvirtCheckpoints
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.offline.vm import OfflineVm


class ShutOffDomain(OfflineVm):
    """A shut-off domain: its images, as its definition names them, backed up offline; checkpoint metadata and
    what a backup of it while it ran left behind, the libvirt way."""

    # A pull backup of it while it ran is libvirt's, which still finds what the job left.
    views = {LIBVIRT_PULL: LIBVIRT_PULL_VIEW, OFFLINE: OFFLINE_EXPORT_VIEW}

    def __init__(self, vm):
        super().__init__(vm.state, vm.registry, vm.timeout, vm.description + ", shut off",
                         offline_images(vm.definition()), LibvirtCheckpoints(vm))
        self.libvirt = vm

    def close(self):
        self.libvirt.close()


def offline_images(root):
    """The images of a shut-off domain's disks, as its definition names them."""
    images = []
    for element in root.findall("./devices/disk"):
        source = element.find("source")
        if element.get("device", "disk") != "disk" or source is None:
            continue
        target = element.find("target").get("dev")
        if element.get("type") != "file" or not source.get("file"):
            raise UserError("Disk %s is a %s disk: a shut-off domain is backed up from image files only; start it "
                            "to back it up through libvirt." % (target, element.get("type")))
        driver = element.find("driver")
        images.append(dict(name=target, node=target, qdev=target, filename=source.get("file"),
                           format=driver.get("type", "raw") if driver is not None else "raw",
                           read_only=element.find("readonly") is not None, identity=None))
    return images
