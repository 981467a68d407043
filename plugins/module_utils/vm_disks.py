# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The disks of a VM as QMP describes them, and the checkpoints on them."""

from __future__ import annotations

import re
from collections import namedtuple

Disk = namedtuple("Disk", "name node drive qdev format filename size read_only bitmaps")
Disk.__doc__ = """One disk with a medium.

name: the qdev id where the device has one, else the drive id, else the node name.
bitmaps: {name: query dict} of named dirty bitmaps on the disk's node.
"""

PERIPHERAL = re.compile(r"^/machine/peripheral/([^/]+)(/.*)?$")


def list_disks(qmp):
    """Every block device that has a medium, in QEMU's order."""
    bitmaps_by_node = node_bitmaps(qmp)
    disks = []
    for device in qmp.execute("query-block"):
        inserted = device.get("inserted")
        if not inserted:
            continue
        qdev = device.get("qdev", "")
        match = PERIPHERAL.match(qdev)
        node = inserted["node-name"]
        name = match.group(1) if match else (qdev if qdev and "/" not in qdev else device["device"] or node)
        disks.append(Disk(
            name=name, node=node, drive=device["device"], qdev=qdev, format=inserted["drv"],
            filename=inserted.get("file"), size=inserted["image"]["virtual-size"],
            read_only=inserted["ro"], bitmaps=bitmaps_by_node.get(node, {})))
    return disks


def node_bitmaps(qmp):
    """{node: {bitmap name: info}} for every named dirty bitmap.

    A running block job adds an unnamed bitmap; it is no checkpoint and is skipped.
    """
    return {
        node["node-name"]: {bitmap["name"]: bitmap for bitmap in node.get("dirty-bitmaps", []) if bitmap.get("name")}
        for node in qmp.execute("query-named-block-nodes", {"flat": True})
    }


def select_disks(disks, wanted):
    """The disks named in `wanted` (qdev id, qdev path, drive id or node name), or every writable one.

    Raises LookupError naming the unknown disk and the known ones.
    """
    if not wanted:
        return [disk for disk in disks if not disk.read_only]
    chosen = []
    for key in wanted:
        found = [disk for disk in disks if key in (disk.name, disk.qdev, disk.drive, disk.node)]
        if not found:
            raise LookupError("Unknown disk '%s'. This VM's disks are: %s." % (key, describe(disks)))
        if found[0] not in chosen:
            chosen.append(found[0])
    return chosen


def describe(disks):
    return ", ".join("%s (node %s, %s%s)" % (d.name, d.node, d.filename, ", read-only" if d.read_only else "")
                     for d in disks) or "none"
