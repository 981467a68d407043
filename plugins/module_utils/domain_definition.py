# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A backed-up libvirt domain's XML, made to describe its restored copy: the restored images and UEFI variables.

Pure XML: the restore writes it whether or not libvirt runs where it restores.
"""

from __future__ import annotations

from xml.etree import ElementTree

from ansible_collections.fleetbackup.qemu.plugins.module_utils.errors import UserError


def restored_domain_xml(xml, name, images, nvram_path):
    """The domain XML for a restored copy named `name`.

    images: {disk target: (restored image path, format)}. Disks without a restored image are left out, so the copy
    never shares a disk with the original. Under a new name the copy also gets a new UUID and new MAC addresses
    (libvirt makes them), so it can run beside the original.
    Returns (xml, [what was left out]).
    """
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as err:
        raise UserError("The backup's domain XML cannot be read (%s)." % err) from None
    left_out = []
    if root.findtext("name") != name:
        root.find("name").text = name
        for element in [root.find("uuid")] + root.findall("./devices/interface/mac"):
            if element is not None:
                _parent(root, element).remove(element)
    devices = root.find("devices")
    for disk in devices.findall("disk"):
        target = disk.find("target").get("dev")
        if disk.get("device", "disk") != "disk":
            continue
        if target not in images:
            devices.remove(disk)
            left_out.append("disk %s, which was not restored" % target)
            continue
        path, image_format = images[target]
        disk.set("type", "file")
        for source in disk.findall("source"):
            disk.remove(source)
        source = ElementTree.Element("source", file=path)
        disk.insert(list(disk).index(disk.find("driver")) + 1 if disk.find("driver") is not None else 0, source)
        driver = disk.find("driver")
        if driver is None:
            driver = ElementTree.SubElement(disk, "driver", name="qemu")
        driver.set("type", image_format)
        backing = disk.find("backingStore")
        if backing is not None:
            disk.remove(backing)  # the restored image is standalone
    nvram = root.find("./os/nvram")
    if nvram is not None:
        if nvram_path:
            nvram.text = nvram_path
        else:
            nvram.text = None  # libvirt makes a fresh store from the template
            left_out.append("the UEFI variables, which the backup did not hold")
    return ElementTree.tostring(root, encoding="unicode"), left_out


def domain_name(xml):
    return ElementTree.fromstring(xml).findtext("name")


def disk_sources(xml):
    """{disk target: source file} of a domain XML."""
    root = ElementTree.fromstring(xml)
    return {disk.find("target").get("dev"): (disk.find("source").get("file") if disk.find("source") is not None
                                             else None)
            for disk in root.findall("./devices/disk") if disk.get("device", "disk") == "disk"}


def _parent(root, element):
    return next(parent for parent in root.iter() if element in list(parent))
