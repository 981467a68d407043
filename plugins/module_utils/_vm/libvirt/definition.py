# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""A backed-up libvirt domain's XML, made to describe its restored copy: the restored images and UEFI variables.

The XML comes from a repository, which others may be able to write, and libvirt acts on it as root. So only what a
restored VM needs is kept: its machine, memory, CPUs, firmware from the host's own firmware directories, and devices
that touch nothing of the host (disks become the restored images; networks, consoles and channels are libvirt's
managed kinds). Everything else is left out, and said so.

Pure XML: the restore writes it whether or not libvirt runs where it restores.
"""

from __future__ import annotations

import os
from xml.etree import ElementTree

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError

METADATA_NAMESPACE = "https://fleetbackup.invalid/restore/1"
# Top-level elements that describe the machine and nothing of the host.
KEPT_ELEMENTS = {"name", "uuid", "title", "description", "memory", "currentMemory", "vcpu", "vcpus", "cpu", "os",
                 "features", "clock", "on_poweroff", "on_reboot", "on_crash", "pm", "devices", "metadata",
                 "memoryBacking"}
# Devices kept as they are: they name no host file, device or program.
KEPT_DEVICES = {"controller", "input", "video", "sound", "memballoon", "watchdog", "panic", "graphics", "console",
                "serial", "channel", "interface", "rng", "tpm"}
# Firmware and NVRAM templates are read by QEMU as root's choice: only the distribution's own, unless told more.
FIRMWARE_DIRECTORIES = ["/usr/share/OVMF", "/usr/share/qemu", "/usr/share/seabios", "/usr/share/AAVMF"]


def restored_domain_xml(xml, name, images, nvram_path, identity, firmware_dirs=None):
    """The domain XML for a restored copy named `name`.

    images: {disk target: (restored image path, format)}. Disks without a restored image are left out, so the copy
    never shares a disk with the original. Under a new name the copy also gets a new UUID and new MAC addresses
    (libvirt makes them), so it can run beside the original. identity: what this restore is (repository, VM,
    backup, dest), kept in the domain's metadata so that a later run knows the domain it defined.
    Returns (xml, [what was left out]).
    """
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as err:
        raise UserError("The backup's domain XML cannot be read (%s)." % err) from None
    if root.tag != "domain" or root.find("devices") is None:
        raise UserError("The backup's domain XML is no libvirt domain definition.")
    left_out = []
    for element in list(root):
        if element.tag not in KEPT_ELEMENTS:
            root.remove(element)
            left_out.append("<%s>, which a restore does not take from a repository" % local_name(element.tag))
    if root.findtext("name") != name:
        root.find("name").text = name
        for element in [root.find("uuid")] + root.findall("./devices/interface/mac"):
            if element is not None:
                parent_of(root, element).remove(element)
    left_out += restored_os(root.find("os"), nvram_path, firmware_dirs or FIRMWARE_DIRECTORIES)
    left_out += restored_devices(root.find("devices"), images)
    mark_restore(root, identity)
    return ElementTree.tostring(root, encoding="unicode"), left_out


def in_firmware_directories(path, firmware_dirs=None):
    """Whether path names a file right inside one of the host's firmware directories (never one a backup chose)."""
    return any(os.path.dirname(os.path.normpath(path)) == os.path.normpath(directory)
               for directory in firmware_dirs or FIRMWARE_DIRECTORIES)


def restored_os(os_element, nvram_path, firmware_dirs):
    """Firmware from the host's firmware directories only; no host kernel; the restored UEFI variables."""
    left_out = []
    if os_element is None:
        return left_out
    for element in list(os_element):
        if element.tag in ("kernel", "initrd", "dtb", "cmdline"):
            os_element.remove(element)
            left_out.append("the direct kernel boot from <%s>" % element.tag)
        elif element.tag in ("loader", "nvram"):
            path = element.text if element.tag == "loader" else element.get("template")
            if path and not in_firmware_directories(path, firmware_dirs):
                os_element.remove(element)
                left_out.append("the firmware %s, outside the host's firmware directories" % path)
    nvram = os_element.find("nvram")
    uefi = os_element.get("firmware") == "efi" or os_element.find("loader[@type='pflash']") is not None
    if nvram_path:
        if nvram is None:  # firmware='efi' domains name their store only while they run
            nvram = ElementTree.SubElement(os_element, "nvram")
        nvram.text = nvram_path
    elif uefi:
        if nvram is not None:
            nvram.text = None  # libvirt makes a fresh store from the template
        left_out.append("the UEFI variables, which the backup did not hold")
    return left_out


def restored_devices(devices, images):
    left_out = []
    for element in list(devices):
        tag = element.tag
        reason = None
        if tag == "disk":
            reason = restored_disk(element, images)
        elif tag not in KEPT_DEVICES:
            reason = "the <%s> device, which a restore does not take from a repository" % tag
        elif not host_free(element):
            reason = "the <%s> device, which names something of the host" % tag
        if reason:
            devices.remove(element)
            left_out.append(reason)
    return left_out


def restored_disk(disk, images):
    """Point a disk at its restored image; the reason it is left out, or None."""
    target = disk.find("target").get("dev") if disk.find("target") is not None else "?"
    if disk.get("device", "disk") != "disk":
        return "the %s %s, which holds no backed-up disk" % (disk.get("device"), target)
    if target not in images:
        return "disk %s, which was not restored" % target
    path, image_format = images[target]
    for child in list(disk):
        if child.tag not in ("target", "boot", "address", "alias", "readonly", "shareable", "serial", "wwn",
                             "blockio", "iotune"):
            disk.remove(child)  # the original's source, driver, encryption, auth, backing store
    disk.set("type", "file")
    disk.insert(0, ElementTree.Element("driver", name="qemu", type=image_format))
    disk.insert(1, ElementTree.Element("source", file=path))
    return None


def host_free(device):
    """Whether a kept device touches nothing of the host: no host path, program or device node."""
    kind = device.get("type")
    if device.tag == "interface":
        return kind in ("network", "bridge", "user") and device.find("script") is None and \
            device.find("target") is None
    if device.tag in ("serial", "console", "channel"):
        if kind == "unix" and device.tag == "channel":
            for source in device.findall("source"):
                device.remove(source)  # libvirt makes the agent's socket itself
            return True
        return kind in (None, "pty", "spicevmc", "qemu-vdagent")
    if device.tag == "rng":
        backend = device.find("backend")
        return backend is not None and backend.get("model") == "random" and (backend.text or "/dev/urandom") in (
            "/dev/urandom", "/dev/random")
    if device.tag == "tpm":
        backend = device.find("backend")
        return backend is not None and backend.get("type") == "emulator"
    if device.tag == "graphics":
        for attribute in ("port", "tlsPort", "websocket"):
            device.attrib.pop(attribute, None)  # the original's ports: libvirt picks free ones for the copy
        if device.get("type") in ("vnc", "spice"):
            device.set("autoport", "yes")
        return all(listen.get("type") in (None, "address", "network", "none") for listen in device.findall("listen"))
    return True


def mark_restore(root, identity):
    """Keep what this restore is in the domain's own metadata."""
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ElementTree.SubElement(root, "metadata")
    for element in list(metadata):
        metadata.remove(element)  # the original's, from other tools
    ElementTree.SubElement(metadata, "{%s}restore" % METADATA_NAMESPACE, {key: str(value) for key, value in
                                                                          sorted(identity.items())})


def restore_identity(xml):
    """What restore made a domain, from its metadata; None for a domain no restore of ours defined."""
    element = ElementTree.fromstring(xml).find("./metadata/{%s}restore" % METADATA_NAMESPACE)
    return dict(element.attrib) if element is not None else None


def domain_name(xml):
    return ElementTree.fromstring(xml).findtext("name")


def local_name(tag):
    return tag.rsplit("}", 1)[-1]


def parent_of(root, element):
    return next(parent for parent in root.iter() if element in list(parent))
