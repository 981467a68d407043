# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""What a backup makes inside QEMU, and how it is found again: names derived from the backup id, and each disk's
fdset carrying, in its opaque string, the device and the node to put back and the NBD socket the backup bound."""

from __future__ import annotations

import hashlib
import json
import re

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.tls import credential_copies_name
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.plan import temporary_bitmap
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.client import QmpCommandError

MINIMUM_QEMU = "7.1"
FDSET_MARK = "fleetbackup "
EXPORT_ID = re.compile(r"^fb-(?P<backup_id>[A-Za-z0-9_-]{1,32})-p?\d+$")
OBJECT_ID = re.compile(r"^fb-(?P<backup_id>[A-Za-z0-9_-]{1,32})-(?:tls|authz)$")
# The opaque string of the fdset that hands QEMU the directory of a start's TLS credentials, for a moment.
TLS_FDSET_MARK = "fleetbackup-tls "


class QmpBackupNames:
    """Every name a backup uses inside QEMU, derived from its id."""

    def __init__(self, backup_id):
        self.backup_id = backup_id
        # QEMU node names are limited to 31 characters, so nodes carry a digest of the id.
        self._node_prefix = "fb" + hashlib.sha1(backup_id.encode()).hexdigest()[:12]
        self.temp_bitmap = temporary_bitmap(backup_id)
        self.socket_fd = "fb-%s-nbd" % backup_id
        self.tls_creds = "fb-%s-tls" % backup_id
        self.tls_authz = "fb-%s-authz" % backup_id
        self.tls_fdset = TLS_FDSET_MARK + backup_id
        self.tls_dir = credential_copies_name(backup_id)

    def export_id(self, index):
        return "fb-%s-%d" % (self.backup_id, index)

    def probe_export_id(self, index):
        return "fb-%s-p%d" % (self.backup_id, index)

    def scratch_node(self, index):
        return "%s-s%d" % (self._node_prefix, index)

    def filter_node(self, index):
        return "%s-f%d" % (self._node_prefix, index)

    def probe_node(self, index):
        return "%s-p%d" % (self._node_prefix, index)

    def nodes(self, index):
        """The nodes of disk `index`, in the order teardown deletes them."""
        return [self.probe_node(index), self.filter_node(index), self.scratch_node(index)]

    def owns_export(self, export_id):
        match = EXPORT_ID.match(export_id or "")
        return bool(match) and match.group("backup_id") == self.backup_id

    def fdset_opaque(self, index, disk, socket_path, socket_identity):
        """What teardown needs of a disk, kept in QEMU: it outlives any file of ours."""
        return FDSET_MARK + json.dumps(dict(backup=self.backup_id, index=index, qdev=disk["qdev"], root=disk["root"],
                                            socket=socket_path, socket_identity=socket_identity), sort_keys=True)


def our_fdsets(qmp, fdsets=None):
    """[(fdset id, {backup, index, qdev, root, socket, socket_identity})] of every backup in this QEMU (fdsets: its
    query-fdsets answer, if already asked)."""
    found = []
    for fdset in qmp.execute("query-fdsets") if fdsets is None else fdsets:
        for fd in fdset["fds"]:
            record = _parse_opaque(fd.get("opaque"))
            if record is not None:
                found.append((fdset["fdset-id"], record))
                break
    return found


def _parse_opaque(opaque):
    if not (opaque or "").startswith(FDSET_MARK):
        return None
    try:
        return json.loads(opaque[len(FDSET_MARK):])
    except ValueError:
        return None  # not one of ours after all


def running_backup_ids(qmp):
    """The ids of the backups that have an export or a node in this QEMU.

    An fdset alone does not count: on a VM that is not running, QEMU closes removed fdsets only once it runs.
    """
    nodes = {entry["node-name"] for entry in qmp.execute("query-named-block-nodes", {"flat": True})}
    ids = {record["backup"] for _fdset, record in our_fdsets(qmp)
           if set(QmpBackupNames(record["backup"]).nodes(record["index"])) & nodes}
    for export in qmp.execute("query-block-exports"):
        match = EXPORT_ID.match(export["id"])
        if match:
            ids.add(match.group("backup_id"))
    for entry in qmp.execute("qom-list", {"path": "/objects"}):
        match = OBJECT_ID.match(entry["name"])
        if match:
            ids.add(match.group("backup_id"))
    return ids


def backup_is_whole(qmp, record, present=None):
    """Whether every export of a completed start is still there (present: the export ids, if already asked)."""
    names = QmpBackupNames(record["backup_id"])
    if present is None:
        present = {export["id"] for export in qmp.execute("query-block-exports")}
    return all(names.export_id(index) in present and names.probe_export_id(index) in present
               for index in range(len(record["disks"])))


def check_fleecing_support(qmp):
    """QEMU must have copy-before-write with on-cbw-error and snapshot-access (7.1 and newer)."""
    schema = qmp.execute("query-qmp-schema")
    members = {m["name"] for entry in schema for m in entry.get("members", []) if "name" in m}
    values = {value for entry in schema if entry["meta-type"] == "enum" for value in entry.get("values", [])}
    if "on-cbw-error" not in members or "snapshot-access" not in values:
        version = qmp.execute("query-version")["qemu"]
        raise UserError("QEMU %d.%d.%d cannot fleece without risk to the guest: it lacks copy-before-write's "
                        "on-cbw-error and the snapshot-access driver. Upgrade QEMU to %s or newer."
                        % (version["major"], version["minor"], version["micro"], MINIMUM_QEMU))


def attached_nodes(qmp):
    """{qdev path: node} of the devices that have a medium, from one query-block."""
    return {device.get("qdev"): device["inserted"]["node-name"] for device in qmp.execute("query-block")
            if device.get("inserted")}


def set_drive(qmp, qdev, node, attached=None):
    """Attach the device to node (attached: the node it has now, when just read). Some QEMU builds report an error
    yet swap the node: trust query-block.

    A device already on node is left alone: QEMU 7.2 aborts on a qom-set to the node it has.
    """
    if (attached_nodes(qmp).get(qdev) if attached is None else attached) == node:
        return
    try:
        qmp.execute("qom-set", {"path": qdev, "property": "drive", "value": node})
    except QmpCommandError:
        if attached_nodes(qmp).get(qdev) != node:
            raise


def has_bitmap(node_entry, name, persistent=None):
    """Whether a node (a query-named-block-nodes entry) has a bitmap of that name (and, if given, that persistence)."""
    return bool(node_entry) and any(b.get("name") == name and persistent in (None, b.get("persistent"))
                                    for b in node_entry.get("dirty-bitmaps", []))
