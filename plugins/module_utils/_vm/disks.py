# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The disks of a VM as QMP describes them, the checkpoints on them, and the one rule that selects disks by name."""

from __future__ import annotations

import re
from collections import namedtuple

Disk = namedtuple("Disk", "name node root drive qdev format filename size read_only bitmaps")
Disk.__doc__ = """One disk with a medium.

name: the qdev id where the device has one, else the drive id, else the node name.
node: the image node, below any filters; root: the node the device is attached to.
bitmaps: {name: query dict} of named dirty bitmaps on the disk's node.
"""

PERIPHERAL = re.compile(r"^/machine/peripheral/([^/]+)(/.*)?$")

# Filters that may sit above a disk's image node; a running backup inserts copy-before-write.
FILTER_DRIVERS = ("copy-before-write", "throttle", "preallocate", "compress")


def list_disks(qmp):
    """Every block device that has a medium, in QEMU's order, described by its image node."""
    nodes = qmp.execute("query-named-block-nodes", {"flat": True})
    bitmaps_by_node = {node["node-name"]: _named_bitmaps(node) for node in nodes}
    disks = []
    for device in qmp.execute("query-block"):
        inserted = device.get("inserted")
        if not inserted:
            continue
        qdev = device.get("qdev", "")
        match = PERIPHERAL.match(qdev)
        node = _below_filters(inserted, nodes)
        name = match.group(1) if match else (qdev if qdev and "/" not in qdev else device["device"] or node)
        disks.append(Disk(
            name=name, node=node["node-name"], root=inserted["node-name"], drive=device["device"], qdev=qdev, format=node["drv"],
            filename=node.get("file"), size=node["image"]["virtual-size"],
            read_only=inserted["ro"], bitmaps=bitmaps_by_node.get(node["node-name"], {})))
    return disks


def _below_filters(inserted, nodes):
    """The image node under any filters: a filter reports its child as its backing image.

    query-block's image carries backing-image even where the flat node list leaves it out.
    """
    node, image = inserted, inserted["image"]
    while node["drv"] in FILTER_DRIVERS:
        child = image.get("backing-image", {})
        candidates = [n for n in nodes if n["drv"] == child.get("format") and n.get("file") == child.get("filename")]
        if len(candidates) != 1:
            break
        node = candidates[0]
        image = node["image"]
    return node


def _named_bitmaps(node):
    """{name: info} of a node's dirty bitmaps; the unnamed one a block job adds is no checkpoint."""
    return {bitmap["name"]: bitmap for bitmap in node.get("dirty-bitmaps", []) if bitmap.get("name")}


def named_disks(disks, wanted, names_of, default):
    """The one disk selection: the disks named in `wanted`, in its order and each once, where names_of(disk) are
    the names a disk answers to; without `wanted`, the disks that default(disk) keeps.

    Returns (the disks chosen, the names in `wanted` that no disk answers to); each caller words its own error.
    """
    if not wanted:
        return [disk for disk in disks if default(disk)], []
    chosen, unknown = [], []
    for key in wanted:
        found = next((disk for disk in disks if key in names_of(disk)), None)
        if found is None:
            unknown.append(key)
        elif found not in chosen:
            chosen.append(found)
    return chosen, unknown


def select_disks(disks, wanted):
    """A VM's disks named in `wanted` (qdev id, qdev path, drive id or node name), or every writable one.

    Raises LookupError naming the unknown disk and the known ones.
    """
    chosen, unknown = named_disks(disks, wanted, lambda disk: (disk.name, disk.qdev, disk.drive, disk.node),
                                  lambda disk: not disk.read_only)
    if unknown:
        raise LookupError("Unknown disk '%s'. This VM's disks are: %s." % (unknown[0], describe(disks)))
    return chosen


def describe(disks):
    return ", ".join("%s (node %s, %s%s)" % (d.name, d.node, d.filename, ", read-only" if d.read_only else "")
                     for d in disks) or "none"
