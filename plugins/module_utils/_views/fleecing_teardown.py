# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The stop of a fleecing backup: everything it made in QEMU and in fleetbackup's state, found and removed.

It needs nothing of the start's options: QEMU's own objects name what to remove, and the fdsets' opaque strings
hold the devices, their nodes and the socket, even when the state is gone. QEMU is asked each thing once.
"""

from __future__ import annotations

import os

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import remove_file
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.client import NbdTimeout
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.tls import remove_credential_copies
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.plan import nbd_url
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.point_in_time import (
    probe_export_name,
    view_intact,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.qemu_nbd_server import (
    export_probe,
    listen_on_unix,
    start_nbd_server,
    stop_nbd_server,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.qmp_objects import (
    QmpBackupNames,
    attached_nodes,
    backup_is_whole,
    has_bitmap,
    our_fdsets,
    set_drive,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.removed import Removed
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.view import PointInTimeView
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.connection import FLEECING
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.state import VmState


class Teardown:
    """What stopping a backup removes, found in QEMU and in fleetbackup's state (record, or None); run() removes it."""

    def __init__(self, qmp, state, backup_id, record, discard_checkpoint):
        self.qmp = qmp
        self.state = state
        self.names = names = QmpBackupNames(backup_id)
        self.record = record
        # On a VM that is not running, removed fdsets linger: an id used again may have several per disk.
        fdsets = qmp.execute("query-fdsets")
        self.fdsets = [(fdset, disk) for fdset, disk in our_fdsets(qmp, fdsets) if disk["backup"] == backup_id]
        disks = {disk["index"]: disk for _fdset, disk in self.fdsets}
        self.exports = sorted(e["id"] for e in qmp.execute("query-block-exports") if names.owns_export(e["id"]))
        self._serving = list(self.exports)  # the exports QEMU has now, until deleted
        present = {entry["node-name"]: entry for entry in qmp.execute("query-named-block-nodes", {"flat": True})}
        self.nodes = [node for index in sorted(disks) for node in names.nodes(index) if node in present]
        self.attached = attached_nodes(qmp)
        self.devices = [disk for index, disk in sorted(disks.items())
                        if self.attached.get(disk["qdev"]) == names.filter_node(index)]
        self.scratch_images = sum(names.scratch_node(index) in present for index in disks)
        # Only the frozen copy an incremental made: never a checkpoint that happens to share the name.
        self.bitmap_nodes = [node for node, entry in present.items()
                             if has_bitmap(entry, names.temp_bitmap, persistent=False)]
        self.checkpoint = self.record["checkpoint"] if self.record and discard_checkpoint else None
        self.checkpoint_disks = [disk for disk in self.record["disks"] if disk["checkpoint"]
                                 and has_bitmap(present.get(disk["node"]), self.checkpoint)] if self.checkpoint else []
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
        return Removed(exports=self.exports, nodes=self.nodes, devices=[disk["qdev"] for disk in self.devices],
                       bitmaps=len(self.bitmap_nodes), scratch_images=self.scratch_images, nbd_server=self.nbd_server,
                       objects=self.objects, files=self.sockets,
                       checkpoint=self.checkpoint if self.checkpoint_disks else None,
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
        stop_nbd_server(qmp)
        path = record["nbd_socket"] = self.state.default_socket  # recorded: a stop that dies still finds it
        remove_file(path)  # ours, in our own directory: left by a stop that died
        listener = listen_on_unix(path, record, self.state)
        try:
            start_nbd_server(qmp, names, listener, record, self.state, tls=False)
        finally:
            listener.close()
        self.sockets.append(path)
        for index, disk in enumerate(record["disks"]):
            export_probe(qmp, names, index, disk)
            self._serving.append(names.probe_export_id(index))
        return path

    def _delete_exports(self):
        """Delete the exports of this backup that QEMU has now, and wait until they are gone."""
        while self._serving:
            export = self._serving.pop(0)
            self.qmp.execute("block-export-del", {"id": export, "mode": "hard"})
            self.qmp.wait_event("BLOCK_EXPORT_DELETED", id=export)

    def run(self, registry):
        qmp, names = self.qmp, self.names
        self._delete_exports()
        if self.nbd_server:
            stop_nbd_server(qmp)
        for name in self.objects:
            qmp.execute("object-del", {"id": name})
        remove_credential_copies(self.state.dir.path_of(names.tls_dir))
        # The probe holds the filter's source consistent: it goes before the devices can move back.
        self._delete("-p")
        for disk in self.devices:
            set_drive(qmp, disk["qdev"], disk["root"], self.attached.get(disk["qdev"]))
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


class EndedFleecing(PointInTimeView):
    """A fleecing backup of a QMP VM that stopped since: QEMU took its objects and scratch images along; what is left
    outside QEMU, its socket and state (and with discard_checkpoint, the checkpoint in its images), goes."""

    kind = FLEECING

    def is_whole(self, record):
        return False

    def remove(self, backup_id, record, discard_checkpoint, check_mode):
        vm = self.vm
        if record is None:
            return Removed(), None
        checkpoint = record["checkpoint"] if discard_checkpoint else None
        ours = record["socket_identity"] and vm.state.holds_socket(record["nbd_socket"], record["socket_identity"])
        removed = Removed(checkpoint=checkpoint, state_file=True, files=[record["nbd_socket"]] if ours else [])
        vm.notes.append("QEMU no longer runs %s: the backup's objects and scratch images went with it; its socket "
                        "and state were removed." % vm.description)
        if check_mode:
            return removed, None
        if checkpoint:
            filenames = [disk["filename"] for disk in record["disks"] if disk["checkpoint"]]
            vm.remove_checkpoint(checkpoint, filenames)
            vm.registry.forget(filenames, checkpoint)
        if ours:
            os.unlink(record["nbd_socket"])
        vm.state.forget_backup()
        vm.state.forget_pause()
        vm.state.forget_freeze()
        return removed, None
