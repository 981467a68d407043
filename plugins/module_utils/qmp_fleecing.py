# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A pull-mode backup inside a running QEMU, over QMP, that can break but never hurts the guest.

Per disk: a nameless qcow2 scratch image handed to QEMU as a file descriptor, whose backing is the disk;
a copy-before-write filter with on-cbw-error=break-snapshot put above the device's node, which keeps
old data in the scratch image before the guest overwrites it; and a snapshot-access node on the filter.
The scratch image is exported for the data, the snapshot-access node as the probe of point_in_time.
When the scratch space runs out or a copy-before-write takes longer than cbw-timeout, the guest's write
still lands; only the snapshot breaks, and the probe fails from then on.

Every disk switches to its filter, and the bitmap transaction runs, while the vCPUs are paused: one
point in time for the whole VM. What a backup created is found again from QEMU itself: objects are
named from the backup id, and each disk's fdset carries, in its opaque string, the device and the node
to put back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils.backup_plan import nbd_url, temporary_bitmap
from ansible_collections.fleetbackup.qemu.plugins.module_utils.point_in_time import (
    describe_view,
    probe_export_name,
    view_intact,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils.errors import FleetbackupError, UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils.qmp_client import QmpCommandError
from ansible_collections.fleetbackup.qemu.plugins.module_utils.scratch import create_scratch_image

MINIMUM_QEMU = "7.1"
FDSET_MARK = "fleetbackup "
EXPORT_ID = re.compile(r"^fb-(?P<backup_id>[A-Za-z0-9_-]{1,32})-p?\d+$")
HELD_SIGNALS = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}


class QmpBackupNames:
    """Every name a backup uses inside QEMU, derived from its id."""

    def __init__(self, backup_id):
        self.backup_id = backup_id
        # QEMU node names are limited to 31 characters, so nodes carry a digest of the id.
        self._node_prefix = "fb" + hashlib.sha1(backup_id.encode()).hexdigest()[:12]
        self.temp_bitmap = temporary_bitmap(backup_id)
        self.socket_fd = "fb-%s-nbd" % backup_id

    def export_id(self, index):
        return "fb-%s-%d" % (self.backup_id, index)

    def probe_export_id(self, index):
        return "fb-%s-p%d" % (self.backup_id, index)

    def scratch_node(self, index):
        return "%s-s%d" % (self._node_prefix, index)

    def filter_node(self, index):
        return "%s-f%d" % (self._node_prefix, index)

    def probe_node(self, index):
        return "%s-a%d" % (self._node_prefix, index)

    def nodes(self, index):
        """The nodes that disk `index` of this backup may have."""
        return {self.probe_node(index), self.filter_node(index), self.scratch_node(index)}

    def owns_export(self, export_id):
        match = EXPORT_ID.match(export_id or "")
        return bool(match) and match.group("backup_id") == self.backup_id

    def fdset_opaque(self, index, disk):
        """What teardown needs of a disk, kept in QEMU: it outlives any file of ours."""
        return FDSET_MARK + json.dumps(dict(backup=self.backup_id, index=index, qdev=disk["qdev"],
                                            root=disk["root"]), sort_keys=True)


def our_fdsets(qmp):
    """[(fdset id, {backup, index, qdev, root})] of every backup in this QEMU."""
    found = []
    for fdset in qmp.execute("query-fdsets"):
        for fd in fdset["fds"]:
            opaque = fd.get("opaque") or ""
            if opaque.startswith(FDSET_MARK):
                found.append((fdset["fdset-id"], json.loads(opaque[len(FDSET_MARK):])))
                break
    return found


def running_backup_ids(qmp):
    """The ids of the backups that have an export or a node in this QEMU.

    An fdset alone does not count: on a VM that is not running, QEMU closes removed fdsets only once it runs.
    """
    nodes = {entry["node-name"] for entry in qmp.execute("query-named-block-nodes", {"flat": True})}
    ids = {record["backup"] for _, record in our_fdsets(qmp)
           if QmpBackupNames(record["backup"]).nodes(record["index"]) & nodes}
    for export in qmp.execute("query-block-exports"):
        match = EXPORT_ID.match(export["id"])
        if match:
            ids.add(match.group("backup_id"))
    return ids


def backup_is_whole(qmp, record):
    """Whether every export of a completed start is still there."""
    names = QmpBackupNames(record["backup_id"])
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


class VcpuPause:
    """Stops the vCPUs of a running VM for the block, and only of a running one; puts the run state back.

    The pause is recorded before the stop, and SIGTERM, SIGHUP and SIGINT wait until the cont, so
    that a run which dies in the window leaves a record by which a later run resumes the VM.
    """

    def __init__(self, qmp, state, backup_id):
        self.qmp = qmp
        self.state = state
        self.backup_id = backup_id
        self.seconds = None

    def __enter__(self):
        if self.qmp.execute("query-status")["status"] != "running":
            return self  # paused, prelaunch...: no guest write can come, and the state stays as it was
        self.state.record_pause(self.backup_id)
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        self._started = time.monotonic()
        self.qmp.execute("stop")
        return self

    def __exit__(self, *exc_info):
        if not hasattr(self, "_started"):
            return
        try:
            self.qmp.execute("cont")
            self.seconds = round(time.monotonic() - self._started, 6)
            self.state.forget_pause()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)


def resume_abandoned_pause(qmp, state):
    """Resume the VM if a run of ours died while it had it paused; a message saying so, or None."""
    record = state.abandoned_pause()
    if record is None:
        return None
    status = qmp.execute("query-status")["status"]
    if status == "paused":
        qmp.execute("cont")
    state.forget_pause()
    return ("A fleetbackup run (pid %d, backup %s) died while it had the vCPUs paused; the VM was %s."
            % (record["owner"]["pid"], record["backup_id"],
               "resumed" if status == "paused" else "already %s, and was left so" % status))


def start_backup(qmp, state, plan, registry, pause=VcpuPause):
    """Create the backup of plan. Returns its state record; on any failure, removes all it created."""
    names = QmpBackupNames(plan.backup_id)
    record = dict(backup_id=plan.backup_id, tag=plan.tag, request=plan.request, complete=False,
                  qmp_socket=qmp.socket_path, nbd_socket=plan.nbd_socket, socket_identity=None,
                  nbd_server_started=False, checkpoint=plan.checkpoint, disks=plan.disks, result=plan.result(),
                  started=int(time.time()))
    state.save_backup(record)
    try:
        _prepare_filters(qmp, names, plan)
        with pause(qmp, state, plan.backup_id) as paused:
            _step("the bitmap transaction", _freeze_bitmaps, qmp, names, plan)
            for index, disk in enumerate(plan.disks):
                _step("switching disk %s to its copy-before-write filter" % disk["disk"], set_drive, qmp,
                      disk["qdev"], names.filter_node(index))
        registry.record([disk for disk, planned in zip(plan.chosen, plan.disks) if planned["checkpoint"]],
                        plan.checkpoint)
        _export(qmp, names, plan, record, state)
    except (FleetbackupError, OSError) as err:
        _roll_back(qmp, state, names, registry, err)
    for index, disk in enumerate(plan.disks):
        if disk["mode"] == "incremental":
            disk["dirty_bytes"] = _bitmap_count(qmp, disk["node"], names.temp_bitmap)
    record.update(complete=True, disks=plan.disks, result=dict(plan.result(), pause=paused.seconds))
    state.save_backup(record)
    return record


class _StepError(FleetbackupError):
    def __init__(self, step, cause):
        super().__init__("%s failed: %s" % (step, cause))


def _step(name, action, *args):
    try:
        return action(*args)
    except (FleetbackupError, OSError) as err:
        raise _StepError(name, err) from None


def _roll_back(qmp, state, names, registry, err):
    try:
        stop_backup(qmp, state, names.backup_id, registry, discard_checkpoint=True)
    except (FleetbackupError, OSError) as cleanup_error:
        raise UserError("Starting backup '%s' failed: %s. Cleaning up failed too: %s" % (
            names.backup_id, err, cleanup_error)) from None
    raise UserError("Starting backup '%s' failed: %s. Everything it had created was removed."
                    % (names.backup_id, err)) from None


def _prepare_filters(qmp, names, plan):
    """Everything that can be made before the pause: scratch images, their nodes, the filters."""
    scratch_dir = plan.request["scratch_dir"]
    for index, disk in enumerate(plan.disks):
        fd = _step("creating the scratch image of disk %s in %s" % (disk["disk"], scratch_dir),
                   create_scratch_image, scratch_dir, disk["size"])
        try:
            fdset = _step("handing the scratch image of disk %s to QEMU" % disk["disk"], qmp.execute_with_fd, fd,
                          "add-fd", {"opaque": names.fdset_opaque(index, disk)})["fdset-id"]
        finally:
            os.close(fd)
        _step("adding the scratch node of disk %s" % disk["disk"], qmp.execute, "blockdev-add", {
            "driver": "qcow2", "node-name": names.scratch_node(index), "discard": "unmap",
            "file": {"driver": "file", "filename": "/dev/fdset/%d" % fdset}, "backing": disk["root"]})
        _step("adding the copy-before-write filter of disk %s" % disk["disk"], qmp.execute, "blockdev-add", {
            "driver": "copy-before-write", "node-name": names.filter_node(index), "file": disk["root"],
            "target": names.scratch_node(index), "on-cbw-error": "break-snapshot",
            "cbw-timeout": plan.request["cbw_timeout"]})


def _freeze_bitmaps(qmp, names, plan):
    """The exported bitmaps are frozen copies of the checkpoint, taken in the same instant as the new one."""
    actions = []
    for disk in plan.disks:
        if disk["mode"] == "incremental":
            actions.append(("block-dirty-bitmap-add", dict(
                node=disk["node"], name=names.temp_bitmap, granularity=disk["granularity"], persistent=False,
                disabled=True)))
            actions.append(("block-dirty-bitmap-merge", dict(
                node=disk["node"], target=names.temp_bitmap, bitmaps=[plan.incremental])))
        if disk["checkpoint"]:
            actions.append(("block-dirty-bitmap-add", dict(node=disk["node"], name=plan.checkpoint, persistent=True)))
    if actions:
        qmp.transaction(actions)


def attached_node(qmp, qdev):
    """The node a device is attached to now, by its qdev path (None when the device has no medium)."""
    for device in qmp.execute("query-block"):
        if device.get("qdev") == qdev and device.get("inserted"):
            return device["inserted"]["node-name"]
    return None


def set_drive(qmp, qdev, node):
    """Attach the device to node. Some QEMU builds report an error yet swap the node: trust query-block."""
    try:
        qmp.execute("qom-set", {"path": qdev, "property": "drive", "value": node})
    except QmpCommandError:
        if attached_node(qmp, qdev) != node:
            raise


def _export(qmp, names, plan, record, state):
    for index, disk in enumerate(plan.disks):
        _step("adding the probe node of disk %s" % disk["disk"], qmp.execute, "blockdev-add", {
            "driver": "snapshot-access", "node-name": names.probe_node(index), "file": names.filter_node(index)})
    _step("starting the NBD server", _start_nbd_server, qmp, names, plan.nbd_socket, record, state)
    for index, disk in enumerate(plan.disks):
        export = {"type": "nbd", "id": names.export_id(index), "node-name": names.scratch_node(index),
                  "name": disk["export"], "writable": False, "allocation-depth": True,
                  "description": describe_view(plan.backup_id, disk["disk"], disk["export"],
                                               plan.request["scratch_dir"], plan.request["cbw_timeout"])}
        if disk["mode"] == "incremental":
            export["bitmaps"] = [{"node": disk["node"], "name": names.temp_bitmap}]
        _step("exporting disk %s over NBD" % disk["disk"], qmp.execute, "block-export-add", export)
        _step("exporting the probe of disk %s over NBD" % disk["disk"], qmp.execute, "block-export-add", {
            "type": "nbd", "id": names.probe_export_id(index), "node-name": names.probe_node(index),
            "name": probe_export_name(disk["export"]), "writable": False})


def _start_nbd_server(qmp, names, path, record, state):
    """Listen on path ourselves, mode 0600, and hand QEMU the listening socket: QEMU opens no path."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            listener.bind(path)
        except OSError as err:
            raise UserError("cannot listen on %s (%s): remove it if no backup uses it, or choose another "
                            "nbd_socket" % (path, err.strerror)) from None
        os.chmod(path, 0o600)
        created = os.lstat(path)
        record["socket_identity"] = [created.st_dev, created.st_ino]
        state.save_backup(record)
        listener.listen(16)
        qmp.execute_with_fd(listener.fileno(), "getfd", {"fdname": names.socket_fd})
        try:
            qmp.execute("nbd-server-start", {"addr": {"type": "fd", "data": {"str": names.socket_fd}}})
        except QmpCommandError as err:
            qmp.execute("closefd", {"fdname": names.socket_fd})
            raise UserError("%s. QEMU runs only one NBD server: stop whatever else uses it first" % err) from None
    finally:
        listener.close()
    record["nbd_server_started"] = True
    state.save_backup(record)


def _bitmap_count(qmp, node, bitmap):
    for entry in qmp.execute("query-named-block-nodes", {"flat": True}):
        if entry["node-name"] == node:
            return next(b["count"] for b in entry.get("dirty-bitmaps", []) if b.get("name") == bitmap)
    raise UserError("Disk node %s is gone from QEMU." % node)


def stop_backup(qmp, state, backup_id, registry, discard_checkpoint=False, check_mode=False):
    """Remove everything the backup created in QEMU and on disk; (what was removed, whether the view held).

    The view held when the start completed and every snapshot still reads; None when there was no backup.
    """
    names = QmpBackupNames(backup_id)
    record = state.backup()
    if record is not None and record["backup_id"] != backup_id:
        record = None  # another backup's state: not ours to touch
    fdsets = [(fdset, disk) for fdset, disk in our_fdsets(qmp) if disk["backup"] == backup_id]
    exports = sorted(e["id"] for e in qmp.execute("query-block-exports") if names.owns_export(e["id"]))
    nodes = {entry["node-name"]: entry for entry in qmp.execute("query-named-block-nodes", {"flat": True})}
    indexes = sorted({disk["index"] for _, disk in fdsets})
    checkpoint = record.get("checkpoint") if record and discard_checkpoint else None
    checkpoint_nodes = [d["node"] for d in record["disks"] if checkpoint and d["checkpoint"]
                        and _has_bitmap(nodes.get(d["node"]), checkpoint)] if record else []
    intact = None
    if record and record["complete"]:
        intact = backup_is_whole(qmp, record) and all(
            view_intact(nbd_url(probe_export_name(d["export"]), record["nbd_socket"])) for d in record["disks"])
    removed = dict(exports=exports, nodes=[n for i in indexes for n in (names.probe_node(i), names.filter_node(i),
                                                                         names.scratch_node(i)) if n in nodes],
                   nbd_server=bool(record and record["nbd_server_started"]),
                   files=[record["nbd_socket"]] if record and state.holds_socket(record) else [],
                   checkpoint=checkpoint if checkpoint_nodes else None, state_file=record is not None)
    if check_mode:
        return removed, intact
    for export_id in exports:
        qmp.execute("block-export-del", {"id": export_id, "mode": "hard"})
        qmp.wait_event("BLOCK_EXPORT_DELETED", id=export_id)
    if removed["nbd_server"]:
        _stop_nbd_server(qmp)
    for index in indexes:
        _delete_node(qmp, nodes, names.probe_node(index))
    for _, disk in fdsets:
        if attached_node(qmp, disk["qdev"]) == names.filter_node(disk["index"]):
            set_drive(qmp, disk["qdev"], disk["root"])
    for index in indexes:
        _delete_node(qmp, nodes, names.filter_node(index))
        _delete_node(qmp, nodes, names.scratch_node(index))
    for node, entry in nodes.items():
        if _has_bitmap(entry, names.temp_bitmap):
            qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": names.temp_bitmap})
    for node in checkpoint_nodes:
        qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": checkpoint})
    if checkpoint_nodes:
        registry.forget([d["filename"] for d in record["disks"] if d["node"] in checkpoint_nodes], checkpoint)
    for fdset, _ in fdsets:
        qmp.execute("remove-fd", {"fdset-id": fdset})
    if record:
        state.remove_backup(record)
    return removed, intact


def _has_bitmap(node_entry, name):
    return bool(node_entry) and any(b.get("name") == name for b in node_entry.get("dirty-bitmaps", []))


def _delete_node(qmp, nodes, node):
    if node in nodes:
        qmp.execute("blockdev-del", {"node-name": node})


def _stop_nbd_server(qmp):
    try:
        qmp.execute("nbd-server-stop")
    except QmpCommandError as err:
        if "not running" not in err.desc:
            raise
