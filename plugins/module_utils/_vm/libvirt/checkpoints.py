# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""libvirt checkpoints as XML, and the checkpoint metadata of a shut-off domain."""

from __future__ import annotations

import time
from xml.etree import ElementTree

from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.disks import Disk
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.libvirt.calls import call, libvirt


def checkpoint_xml(name, disks, without=()):
    """A checkpoint with a bitmap on disks, and none on the others."""
    root = ElementTree.Element("domaincheckpoint")
    ElementTree.SubElement(root, "name").text = name
    listed = ElementTree.SubElement(root, "disks")
    for disk in disks:
        ElementTree.SubElement(listed, "disk", name=disk.name, checkpoint="bitmap")
    for disk in without:
        ElementTree.SubElement(listed, "disk", name=disk.name, checkpoint="no")
    return ElementTree.tostring(root, encoding="unicode")


class LibvirtCheckpoints:
    """The checkpoint metadata of a shut-off domain, which libvirt lets us list, define and forget (not create)."""

    def __init__(self, vm):
        self.vm = vm

    def names(self):
        return {checkpoint.getName() for checkpoint in self.vm.listed_checkpoints()}

    def define(self, name, disk_names):
        """Tell libvirt about a checkpoint whose bitmaps were added to the images offline."""
        disks = [Disk(name=disk, node=disk, root=disk, drive=disk, qdev=disk, format="qcow2", filename=None, size=0,
                      read_only=False, bitmaps={}) for disk in disk_names]
        root = ElementTree.fromstring(checkpoint_xml(name, disks))
        ElementTree.SubElement(root, "creationTime").text = str(int(time.time()))
        call("Defining checkpoint %s" % name, self.vm.domain.checkpointCreateXML,
             ElementTree.tostring(root, encoding="unicode"), libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)

    def forget(self, name):
        checkpoint = call("Looking up checkpoint %s" % name, self.vm.domain.checkpointLookupByName, name)
        call("Forgetting checkpoint %s" % name, checkpoint.delete, libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
