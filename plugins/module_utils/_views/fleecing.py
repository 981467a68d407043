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
to put back and the NBD socket that the backup bound.

Over TCP, the NBD server speaks TLS with x509 credentials (verify-peer) and admits only the client
certificates whose distinguished names the start allows (an authz-list object); both objects are named
from the backup id too, and the listener, the credentials and the filter go with the stop.

Block status of the scratch image is not a tracked request, so in principle a guest write could land
between its two halves (the scratch's own allocation, then the disk's); on QEMU 7.2 both halves hold the
node's qcow2 lock or run without yielding, and the copy-before-write waits for them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.plan import nbd_url, temporary_bitmap
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.client import NbdTimeout
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.tls import (
    SERVER_FILES,
    authz_rules,
    credential_copies,
    credential_copies_name,
    listen_tcp,
    read_credentials,
    remove_credential_copies,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.point_in_time import (
    describe_view,
    probe_export_name,
    view_intact,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import FleetbackupError, UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.guest_freeze import GuestLeftFrozen
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.held_signals import HeldSignals
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import remove_file
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.client import QmpCommandError, QmpError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.scratch import create_scratch_image
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.state import VmState

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


class VmLeftPaused(FleetbackupError):
    """The vCPUs could not be resumed: the one failure the user must hear about first."""


class VcpuPause:
    """Stops the vCPUs of a running VM for the block, and only of a running one; puts the run state back.

    The pause is recorded before the stop. SIGTERM, SIGHUP and SIGINT are held until the cont, then turned
    into an error that rolls the start back. A run killed by SIGKILL in the window leaves the record, by
    which a later start, stop or info resumes the VM.
    """

    def __init__(self, qmp, state, backup_id):
        self.qmp = qmp
        self.state = state
        self.backup_id = backup_id
        self.seconds = None
        self._stopped_at = None
        self._signals = HeldSignals("while the vCPUs were paused")

    def __enter__(self):
        if self.qmp.execute("query-status")["status"] != "running":
            return self  # paused, prelaunch...: no guest write can come, and the state stays as it was
        self._signals.hold(then=lambda: self.state.record_pause(self.backup_id))
        self._stopped_at = time.monotonic()
        try:
            self.qmp.execute("stop")
        except BaseException:
            self._resume()  # a late answer to stop may still have paused the VM
            raise
        return self

    def __exit__(self, *exc_info):
        if self._stopped_at is not None:
            self._resume()

    def _resume(self):
        try:
            cont(self.qmp)
            self.seconds = round(time.monotonic() - self._stopped_at, 6)
            self.state.forget_pause()
        except BaseException:
            self._signals.release(interrupt=False)  # VmLeftPaused is what the user must hear first
            raise
        finally:
            self._stopped_at = None
        self._signals.release()  # a held signal arrives here, and becomes Interrupted


def cont(qmp):
    """Resume the vCPUs, trying twice; VmLeftPaused if the VM still does not run."""
    for _attempt in range(2):
        try:
            qmp.execute("cont")
            return
        except QmpError as err:
            failure = err
    raise VmLeftPaused("THE VM IS LEFT PAUSED: resuming its vCPUs failed (%s). Resume it with the QMP command "
                       "'cont'; the next fleetbackup start, stop or info of this VM resumes it too." % failure)


def resume_abandoned_pause(qmp, state):
    """Resume the VM if a run of ours died while it had it paused; a message saying so, or None."""
    record = state.abandoned_pause()
    if record is None:
        return None
    status = qmp.execute("query-status")["status"]
    if status == "paused":
        cont(qmp)
    state.forget_pause()
    return ("A fleetbackup run (pid %d, backup %s) died while it had the vCPUs paused; the VM was %s."
            % (record["owner"]["pid"], record["backup_id"],
               "resumed" if status == "paused" else "already %s, and was left so" % status))


def start_backup(qmp, state, plan, registry, freeze, pause=VcpuPause):
    """Create the backup of plan, inside freeze (a GuestFreeze) at its point in time. Returns its state record; on
    any failure, removes all it created."""
    names = QmpBackupNames(plan.backup_id)
    record = dict(backup_id=plan.backup_id, tag=plan.tag, request=plan.request, complete=False,
                  qmp_socket=qmp.socket_path, nbd_socket=plan.nbd_socket, tcp=None, socket_identity=None,
                  nbd_server_started=False, checkpoint=plan.checkpoint, disks=plan.disks, result=plan.result(),
                  started=int(time.time()))
    state.save_backup(record)
    listener = None
    try:
        if plan.tcp:
            listener = _step("listening on TCP", _listen_tcp, plan, record, state)
        else:
            listener = _step("listening on the NBD socket", _listen, plan.nbd_socket, record, state)
        _prepare_filters(qmp, names, plan, record)
        with freeze, pause(qmp, state, plan.backup_id) as paused:
            _step("the bitmap transaction", _freeze_bitmaps, qmp, names, plan)
            for index, disk in enumerate(plan.disks):
                _step("switching disk %s to its copy-before-write filter" % disk["disk"], set_drive, qmp,
                      disk["qdev"], names.filter_node(index))
        registry.record([disk for disk, planned in zip(plan.chosen, plan.disks) if planned["checkpoint"]],
                        plan.checkpoint)
        _export(qmp, names, plan, record, state, listener)
        for disk in plan.disks:
            if disk["mode"] == "incremental":
                disk["dirty_bytes"] = _bitmap_count(qmp, disk["node"], names.temp_bitmap)
        record.update(complete=True, disks=plan.disks,
                      result=dict(plan.result(), pause=paused.seconds, **freeze.result()))
        state.save_backup(record)
    except (FleetbackupError, OSError) as err:
        _roll_back(qmp, state, names, registry, err)
    finally:
        if listener is not None:
            listener.close()  # QEMU holds its own descriptor of it
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
    held = "; the VM is still paused" if isinstance(err, VmLeftPaused) else \
        "; the guest's file systems may still be frozen" if isinstance(err, GuestLeftFrozen) else ""
    try:
        Teardown(qmp, state, names.backup_id, discard_checkpoint=True).run(registry)
    except (FleetbackupError, OSError) as cleanup_error:
        raise UserError("Starting backup '%s' failed: %s. Cleaning up failed too: %s" % (
            names.backup_id, err, cleanup_error)) from None
    raise UserError("Starting backup '%s' failed: %s. Everything it had created was removed%s."
                    % (names.backup_id, err, held)) from None


def _listen(path, record, state):
    """Bind and listen on path ourselves, mode 0600; QEMU will get the listening socket, never the path."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
    except OSError as err:
        listener.close()
        raise UserError("cannot listen on %s (%s): remove it if no backup uses it, or choose another nbd_socket"
                        % (path, err.strerror)) from None
    os.chmod(path, 0o600)  # nobody can connect before the listen below
    created = os.lstat(path)
    record["socket_identity"] = [created.st_dev, created.st_ino]
    state.save_backup(record)
    listener.listen(16)
    return listener


def _listen_tcp(plan, record, state):
    """The TCP listener, made by us as the unix one is: QEMU gets the listening socket, and keeps it until the stop's
    nbd-server-stop closes it, so the listener lives exactly as long as the backup."""
    listener = listen_tcp(plan.tcp["host"], plan.tcp["port"])
    plan.port = listener.getsockname()[1]
    record.update(tcp=dict(host=plan.tcp["host"], port=plan.port), result=plan.result())
    state.save_backup(record)
    return listener


def _prepare_filters(qmp, names, plan, record):
    """Everything that can be made before the pause: scratch images, their nodes, the filters."""
    scratch_dir = plan.scratch_dir
    for index, disk in enumerate(plan.disks):
        fd = _step("creating the scratch image of disk %s in %s" % (disk["disk"], scratch_dir),
                   create_scratch_image, scratch_dir, disk["size"], disk["scratch_room"])
        try:
            opaque = names.fdset_opaque(index, disk, plan.nbd_socket, record["socket_identity"])
            fdset = _step("handing the scratch image of disk %s to QEMU" % disk["disk"], qmp.execute_with_fd, fd,
                          "add-fd", {"opaque": opaque})["fdset-id"]
        finally:
            os.close(fd)
        # The raw node caps the image at its reserved room: beyond it, writes fail and break the snapshot.
        _step("adding the scratch node of disk %s" % disk["disk"], qmp.execute, "blockdev-add", {
            "driver": "qcow2", "node-name": names.scratch_node(index), "discard": "unmap", "backing": disk["root"],
            "file": {"driver": "raw", "size": disk["scratch_room"],
                     "file": {"driver": "file", "filename": "/dev/fdset/%d" % fdset}}})
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
    """Attach the device to node. Some QEMU builds report an error yet swap the node: trust query-block.

    A device already on node is left alone: QEMU 7.2 aborts on a qom-set to the node it has.
    """
    if attached_node(qmp, qdev) == node:
        return
    try:
        qmp.execute("qom-set", {"path": qdev, "property": "drive", "value": node})
    except QmpCommandError:
        if attached_node(qmp, qdev) != node:
            raise


def _export(qmp, names, plan, record, state, listener):
    for index, disk in enumerate(plan.disks):
        _step("adding the probe node of disk %s" % disk["disk"], qmp.execute, "blockdev-add", {
            "driver": "snapshot-access", "node-name": names.probe_node(index), "file": names.filter_node(index)})
    tls = bool(plan.tcp) and not plan.tcp["plain"]
    if tls:
        _step("adding the TLS credentials and the client filter", _add_tls, qmp, names, plan.tcp, state)
    _step("starting the NBD server", _start_nbd_server, qmp, names, listener, record, state, tls)
    for index, disk in enumerate(plan.disks):
        export = {"type": "nbd", "id": names.export_id(index), "node-name": names.scratch_node(index),
                  "name": disk["export"], "writable": False, "allocation-depth": True,
                  "description": describe_view(plan.backup_id, disk["disk"], disk["export"], plan.scratch_dir,
                                               plan.request["cbw_timeout"])}
        if disk["mode"] == "incremental":
            export["bitmaps"] = [{"node": disk["node"], "name": names.temp_bitmap}]
        _step("exporting disk %s over NBD" % disk["disk"], qmp.execute, "block-export-add", export)
        _step("exporting the probe of disk %s over NBD" % disk["disk"], _export_probe, qmp, names, index, disk)


def _export_probe(qmp, names, index, disk):
    """The snapshot-access node of a disk, exported: it fails every read once the point-in-time view broke."""
    qmp.execute("block-export-add", {"type": "nbd", "id": names.probe_export_id(index),
                                     "node-name": names.probe_node(index),
                                     "name": probe_export_name(disk["export"]), "writable": False})


def _add_tls(qmp, names, tcp, state):
    """QEMU's x509 credentials, checking every client's certificate against the CA (verify-peer), and the filter
    that admits only the allowed distinguished names.

    QEMU reads the credentials itself, as the user it runs as (-runas), once: when the object is made. So
    the files are copied, as we read and checked them, into a directory of ours inside the private state
    directory, as files that QEMU's user owns and alone can read; QEMU reaches them through a descriptor of
    that directory (/proc/self/fd/N), never by a path, and the copies are gone as soon as QEMU has read them.
    """
    contents = read_credentials(tcp["tls_dir"], SERVER_FILES, "nbd_tcp.tls_dir")
    with credential_copies(state.dir.path_of(names.tls_dir), contents, qmp.peer_file_uid()) as directory:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            added = qmp.execute_with_fd(fd, "add-fd", {"opaque": names.tls_fdset})
        finally:
            os.close(fd)
        try:
            qmp.execute("object-add", {"qom-type": "tls-creds-x509", "id": names.tls_creds, "endpoint": "server",
                                       "verify-peer": True, "dir": "/proc/self/fd/%d" % added["fd"]})
        finally:
            qmp.execute("remove-fd", {"fdset-id": added["fdset-id"]})
    qmp.execute("object-add", {"qom-type": "authz-list", "id": names.tls_authz, "policy": "deny",
                               "rules": authz_rules(tcp["tls_allow"])})


def _start_nbd_server(qmp, names, listener, record, state, tls):
    """QEMU serves NBD on the socket we listen on: it opens no path of ours."""
    record["nbd_server_started"] = True  # before, so that a start killed right after it still stops it
    state.save_backup(record)
    qmp.execute_with_fd(listener.fileno(), "getfd", {"fdname": names.socket_fd})
    arguments = {"addr": {"type": "fd", "data": {"str": names.socket_fd}}}
    if tls:
        arguments.update({"tls-creds": names.tls_creds, "tls-authz": names.tls_authz})
    try:
        qmp.execute("nbd-server-start", arguments)
    except QmpCommandError as err:
        qmp.execute("closefd", {"fdname": names.socket_fd})
        record["nbd_server_started"] = False  # it is someone else's: ours never started
        state.save_backup(record)
        raise UserError("%s. QEMU runs only one NBD server: stop whatever else uses it first" % err) from None


def _bitmap_count(qmp, node, bitmap):
    for entry in qmp.execute("query-named-block-nodes", {"flat": True}):
        if entry["node-name"] == node:
            for info in entry.get("dirty-bitmaps", []):
                if info.get("name") == bitmap:
                    return info["count"]
    raise UserError("Bitmap %s of disk node %s is gone from QEMU." % (bitmap, node))


class Teardown:
    """What stopping a backup removes, found in QEMU and in fleetbackup's state; run() removes it.

    It needs nothing of the start's options: QEMU's own objects name what to remove, and the fdsets' opaque
    strings hold the devices, their nodes and the socket, even when the state is gone.
    """

    def __init__(self, qmp, state, backup_id, discard_checkpoint):
        self.qmp = qmp
        self.state = state
        self.names = names = QmpBackupNames(backup_id)
        record = state.backup()
        self.record = record if record is not None and record["backup_id"] == backup_id else None
        # On a VM that is not running, removed fdsets linger: an id used again may have several per disk.
        fdsets = qmp.execute("query-fdsets")
        self.fdsets = [(fdset, disk) for fdset, disk in our_fdsets(qmp, fdsets) if disk["backup"] == backup_id]
        disks = {disk["index"]: disk for _fdset, disk in self.fdsets}
        self.exports = sorted(e["id"] for e in qmp.execute("query-block-exports") if names.owns_export(e["id"]))
        present = {entry["node-name"]: entry for entry in qmp.execute("query-named-block-nodes", {"flat": True})}
        self.nodes = [node for index in sorted(disks) for node in names.nodes(index) if node in present]
        self.devices = [disk for index, disk in sorted(disks.items())
                        if attached_node(qmp, disk["qdev"]) == names.filter_node(index)]
        self.scratch_images = sum(names.scratch_node(index) in present for index in disks)
        # Only the frozen copy an incremental made: never a checkpoint that happens to share the name.
        self.bitmap_nodes = [node for node, entry in present.items()
                             if _bitmap(entry, names.temp_bitmap, persistent=False)]
        self.checkpoint = self.record["checkpoint"] if self.record and discard_checkpoint else None
        self.checkpoint_disks = [disk for disk in self.record["disks"] if disk["checkpoint"]
                                 and _bitmap(present.get(disk["node"]), self.checkpoint)] if self.checkpoint else []
        # Our exports live only on the NBD server we started.
        self.nbd_server = bool(self.exports) or bool(self.record and self.record["nbd_server_started"])
        self.sockets, self.foreign_sockets = self._sockets(disks.values())
        present_objects = {entry["name"] for entry in qmp.execute("qom-list", {"path": "/objects"})}
        # The server holds the credentials: the filter and the credentials go after it.
        self.objects = [name for name in (names.tls_authz, names.tls_creds) if name in present_objects]
        self.tls_fdsets = [fdset["fdset-id"] for fdset in fdsets
                           if any(fd.get("opaque") == names.tls_fdset for fd in fdset["fds"])]

    def _sockets(self, disks):
        """(the sockets to remove, those named only by QEMU outside our own directory, which we leave alone).

        A socket counts only where it is the very one a start bound there (device and inode).
        """
        named = {(disk["socket"], tuple(disk["socket_identity"])) for disk in disks if disk.get("socket_identity")}
        if self.record and self.record["socket_identity"]:
            named.add((self.record["nbd_socket"], tuple(self.record["socket_identity"])))
        ours, foreign = [], []
        for path, identity in sorted(named):
            if VmState.holds_socket(path, identity):
                trusted = os.path.dirname(path) == self.state.dir.path or (
                    self.record is not None and path == self.record["nbd_socket"])
                (ours if trusted else foreign).append(path)
        return ours, foreign

    @property
    def removed(self):
        return dict(job=False, exports=self.exports, nodes=self.nodes, devices=[disk["qdev"] for disk in self.devices],
                    bitmaps=len(self.bitmap_nodes), scratch_images=self.scratch_images, nbd_server=self.nbd_server,
                    objects=self.objects, files=self.sockets, checkpoint=self.checkpoint if self.checkpoint_disks else None,
                    state_file=self.record is not None)

    def intact(self):
        """Whether the point-in-time view of a completed start still holds; None when there is none.

        Over TCP QEMU admits only the backup host's certificate, so the probes are read after the TCP server
        ended, on a unix socket of ours (_serve_probes_on_unix). That changes QEMU: in check mode it is None.
        A probe that QEMU does not answer proves nothing: not intact.
        """
        record = self.record
        if not record or not record["complete"]:
            return None
        if record.get("tcp") and self.state.read_only:
            return None
        if not backup_is_whole(self.qmp, record, set(self.exports)):
            return False
        socket_path = self._serve_probes_on_unix() if record.get("tcp") else record["nbd_socket"]
        try:
            return all(view_intact(nbd_url(probe_export_name(d["export"]), socket_path)) for d in record["disks"])
        except NbdTimeout:
            return False

    def _serve_probes_on_unix(self):
        """End the TCP server and every export, then serve the probes alone on the VM's default unix socket."""
        qmp, names, record = self.qmp, self.names, self.record
        self._delete_exports()
        _stop_nbd_server(qmp)
        path = record["nbd_socket"] = self.state.default_socket  # recorded: a stop that dies still finds it
        remove_file(path)  # ours, in our own directory: left by a stop that died
        listener = _listen(path, record, self.state)
        try:
            _start_nbd_server(qmp, names, listener, record, self.state, tls=False)
        finally:
            listener.close()
        self.sockets.append(path)
        for index, disk in enumerate(record["disks"]):
            _export_probe(qmp, names, index, disk)
        return path

    def _delete_exports(self):
        """Delete the exports of this backup that QEMU has now, and wait until they are gone."""
        for export in self.qmp.execute("query-block-exports"):
            if self.names.owns_export(export["id"]):
                self.qmp.execute("block-export-del", {"id": export["id"], "mode": "hard"})
                self.qmp.wait_event("BLOCK_EXPORT_DELETED", id=export["id"])

    def run(self, registry):
        qmp, names = self.qmp, self.names
        self._delete_exports()
        if self.nbd_server:
            _stop_nbd_server(qmp)
        for name in self.objects:
            qmp.execute("object-del", {"id": name})
        remove_credential_copies(self.state.dir.path_of(names.tls_dir))
        # The probe holds the filter's source consistent: it goes before the devices can move back.
        self._delete("-p")
        for disk in self.devices:
            set_drive(qmp, disk["qdev"], disk["root"])
        self._delete("-f")
        self._delete("-s")
        for node in self.bitmap_nodes:
            qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": names.temp_bitmap})
        for disk in self.checkpoint_disks:
            qmp.execute("block-dirty-bitmap-remove", {"node": disk["node"], "name": self.checkpoint})
        if self.checkpoint_disks:
            registry.forget([disk["filename"] for disk in self.checkpoint_disks], self.checkpoint)
        for fdset in [fdset for fdset, _disk in self.fdsets] + self.tls_fdsets:
            qmp.execute("remove-fd", {"fdset-id": fdset})
        for path in self.sockets:
            remove_file(path)  # QEMU may have unlinked it already when it closed the listener, if it could
        if self.record:
            self.state.forget_backup()

    def _delete(self, kind):
        """blockdev-del our nodes of one kind (-p probe, -f filter, -s scratch)."""
        for node in self.nodes:
            if node.rstrip("0123456789").endswith(kind):
                self.qmp.execute("blockdev-del", {"node-name": node})


def _bitmap(node_entry, name, persistent=None):
    """Whether a node has a bitmap of that name (and, if given, that persistence)."""
    return bool(node_entry) and any(b.get("name") == name and persistent in (None, b.get("persistent"))
                                    for b in node_entry.get("dirty-bitmaps", []))


def _stop_nbd_server(qmp):
    try:
        qmp.execute("nbd-server-stop")
    except QmpCommandError as err:
        if "not running" not in err.desc:
            raise
