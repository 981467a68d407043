# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The machine a restore drill boots: its disks and buses, machine type and firmware, from a libvirt domain's XML
or q35 with SeaBIOS and virtio disks. The XML comes from the repository, which others may be able to write, so
only the host's own firmware and the machine types a drill knows get through."""

from __future__ import annotations

import os
import re
from xml.etree import ElementTree

from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.libvirt.definition import in_firmware_directories
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError

OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
# The host's empty UEFI variable stores, for a backup that kept none.
OVMF_VARS = {False: "/usr/share/OVMF/OVMF_VARS_4M.fd", True: "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"}
# The machine types a drill boots; the value goes into -machine, so nothing else may pass.
MACHINE_TYPE = re.compile(r"^(pc|q35)(-[a-z0-9.]+)*$")


class DrillDisk:
    """A disk as the drill boots it: its name (the backup's), the image the overlay sits on, and its bus."""

    def __init__(self, name, image, bus="virtio"):
        self.name = name
        self.image = os.path.abspath(image)
        self.bus = bus


class DrillMachine:
    """The virtual hardware: q35 with SeaBIOS and virtio disks, or what a libvirt domain's XML says."""

    def __init__(self, machine="q35", loader=None, secure=False, memory_mib=None, buses=None):
        self.machine = machine
        self.loader = loader
        self.secure = secure
        self.memory_mib = memory_mib
        self.buses = buses or {}

    @classmethod
    def from_domain_xml(cls, xml):
        """The hardware a domain's XML describes, as far as a drill needs it."""
        try:
            root = ElementTree.fromstring(xml)
        except ElementTree.ParseError as err:
            raise UserError("The backup's domain XML cannot be read (%s)." % err) from None
        os_type = root.find("./os/type")
        machine = os_type.get("machine") if os_type is not None and os_type.get("machine") else "q35"
        if not MACHINE_TYPE.match(machine):
            raise UserError("The backup's domain XML names the machine type %r: drills boot pc and q35 machines "
                            "only." % machine)
        loader = root.find("./os/loader")
        uefi = root.find("./os").get("firmware") == "efi" if root.find("./os") is not None else False
        path = loader.text.strip() if loader is not None and loader.text else None
        if loader is not None and loader.get("type") == "rom":
            raise UserError("The domain boots from a firmware ROM (%s): drills boot SeaBIOS or a UEFI pflash only." % path)
        if path and not in_firmware_directories(path):
            # The repository may be anyone's: QEMU would read any host file it named, and the guest with it.
            raise UserError("The backup's domain XML names the firmware %s, outside the host's firmware directories: "
                            "a drill boots only the host's own firmware." % path)
        if uefi and not path:
            path = OVMF_CODE
        memory = root.find("memory")
        memory_mib = None
        if memory is not None and memory.text:
            memory_mib = int(memory.text) * {"b": 1, "bytes": 1, "KiB": 1024, "k": 1024, "MiB": 1 << 20, "M": 1 << 20,
                                             "GiB": 1 << 30, "G": 1 << 30}.get(memory.get("unit", "KiB"), 1024) >> 20
        buses = {disk.find("target").get("dev"): disk.find("target").get("bus", "virtio")
                 for disk in root.findall("./devices/disk") if disk.get("device", "disk") == "disk"}
        return cls(machine, path, loader is not None and loader.get("secure") == "yes", memory_mib, buses)
