# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""A pull-mode backup inside a running QEMU, over QMP, that can break but never hurts the guest.

Per disk: a nameless qcow2 scratch image handed to QEMU as a file descriptor, whose backing is the disk;
a copy-before-write filter with on-cbw-error=break-snapshot put above the device's node, which keeps
old data in the scratch image before the guest overwrites it; and a snapshot-access node on the filter.
The scratch image is exported for the data, the snapshot-access node as the probe of point_in_time.
When the scratch space runs out or a copy-before-write takes longer than cbw-timeout, the guest's write
still lands; only the snapshot breaks, and the probe fails from then on.

Every disk switches to its filter, and the bitmap transaction runs, while the vCPUs are paused: one
point in time for the whole VM. What a backup created is found again from QEMU itself (qmp_objects).

Block status of the scratch image is not a tracked request, so in principle a guest write could land
between its two halves (the scratch's own allocation, then the disk's); on QEMU 7.2 both halves hold the
node's qcow2 lock or run without yielding, and the copy-before-write waits for them.
"""

from __future__ import annotations

import os

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import (
    ErrorHandler,
    FleetbackupError,
    UserError,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.tls import SERVER_FILES, read_credentials
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.fleecing_teardown import Teardown
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.plan import BackupPlan, check_socket_path
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.point_in_time import describe_view
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.qemu_nbd_server import (
    add_tls,
    export_probe,
    listen_on_tcp,
    listen_on_unix,
    start_nbd_server,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.qmp_objects import (
    QmpBackupNames,
    backup_is_whole,
    check_fleecing_support,
    running_backup_ids,
    set_drive,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.scratch import (
    check_scratch_dir,
    create_scratch_image,
    scratch_bytes,
    scratch_shares,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.view import PointInTimeView
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.connection import FLEECING
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.client import QmpCommandError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.pause import VcpuPause


class StartStep(ErrorHandler):
    """A step of the start that failed, named: what failed inside it is ours already, or the system's."""

    library_errors = (FleetbackupError, OSError)


class FleecingView(PointInTimeView):
    """QEMU's own view of the disks: copy-before-write filters over scratch images, exported by its NBD server."""

    kind = FLEECING
    pause = VcpuPause  # how the vCPUs stop for the point in time

    def running_ids(self):
        return running_backup_ids(self.vm.qmp)

    def plan(self, backup_id, request):
        vm = self.vm
        check_fleecing_support(vm.qmp)
        chosen = self.chosen_disks(request)
        nbd_socket = None
        if request.get("nbd_tcp"):
            if request["nbd_tcp"]["tls_dir"]:
                read_credentials(request["nbd_tcp"]["tls_dir"], SERVER_FILES, "nbd_tcp.tls_dir")
            check_socket_path(vm.state.default_socket, given=False)  # where the stop serves the probes
        else:
            nbd_socket = request["nbd_socket"] or vm.state.default_socket
            check_socket_path(nbd_socket, given=bool(request["nbd_socket"]))
        shares = scratch_shares(scratch_bytes(request["scratch_size"], sum(disk.size for disk in chosen)),
                                [disk.size for disk in chosen])
        scratch_dir = request["scratch_dir"] or vm.state.default_scratch_dir
        check_scratch_dir(scratch_dir, sum(shares), ours=not request["scratch_dir"])
        plan = BackupPlan(backup_id, chosen, request, vm.registry, nbd_socket)
        plan.scratch_dir = scratch_dir
        for disk, share in zip(plan.disks, shares):
            disk["scratch_room"] = share
        return plan

    def new_record(self, plan):
        return dict(super().new_record(plan), qmp_socket=self.vm.qmp.socket_path, tcp=None, nbd_server_started=False)

    def make(self, plan, freeze, record):
        """Scratch images and filters first; then, inside the freeze and the pause, the bitmaps and the switch of
        every disk to its filter: one point in time for the whole VM; then the exports."""
        qmp, state = self.vm.qmp, self.vm.state
        names = QmpBackupNames(plan.backup_id)
        if plan.tcp:
            listener = StartStep.call("listening on TCP", listen_on_tcp, plan, record, state)
        else:
            listener = StartStep.call("listening on the NBD socket", listen_on_unix, plan.nbd_socket, record, state)
        try:
            _prepare_filters(qmp, names, plan, record)
            with freeze, self.pause(qmp, state, plan.backup_id) as paused:
                StartStep.call("the bitmap transaction", _freeze_bitmaps, qmp, names, plan)
                for index, disk in enumerate(plan.disks):
                    StartStep.call("switching disk %s to its copy-before-write filter" % disk["disk"], set_drive,
                                   qmp, disk["qdev"], names.filter_node(index))
            self.vm.registry.record([disk for disk, planned in zip(plan.chosen, plan.disks) if planned["checkpoint"]],
                                    plan.checkpoint)
            _export(qmp, names, plan, record, state, listener)
        finally:
            listener.close()  # QEMU holds its own descriptor of it
        for disk in plan.disks:
            if disk["mode"] == "incremental":
                disk["dirty_bytes"] = _bitmap_count(qmp, disk["node"], names.temp_bitmap)
        record.update(complete=True, disks=plan.disks,
                      result=dict(plan.result(), pause=paused.seconds, **freeze.result()))
        state.save_backup(record)

    def is_whole(self, record):
        return backup_is_whole(self.vm.qmp, record)

    def remove(self, backup_id, record, discard_checkpoint, check_mode):
        vm = self.vm
        teardown = Teardown(vm.qmp, vm.state, backup_id, record, discard_checkpoint)
        try:
            intact = teardown.intact()
        except (UserError, QmpCommandError) as err:
            intact = None  # unknown; the teardown must go on all the same
            vm.notes.append("Whether the point in time held could not be read (%s): the backup is removed, and its "
                            "copies' own probe checks are what tell." % err)
        if not check_mode:
            teardown.run(vm.registry)
        if teardown.scratch_images and vm.qmp.execute("query-status")["status"] != "running":
            vm.notes.append("The VM is not running: QEMU lets go of the backup's scratch images, and their space, "
                            "only once it runs again.")
        for path in teardown.foreign_sockets:
            vm.notes.append("QEMU names %s as this backup's socket, outside fleetbackup's own directory: it was "
                            "left alone; remove it if nothing uses it." % path)
        return teardown.removed, intact


def _prepare_filters(qmp, names, plan, record):
    """Everything that can be made before the pause: scratch images, their nodes, the filters."""
    scratch_dir = plan.scratch_dir
    for index, disk in enumerate(plan.disks):
        fd = StartStep.call("creating the scratch image of disk %s in %s" % (disk["disk"], scratch_dir),
                            create_scratch_image, scratch_dir, disk["size"], disk["scratch_room"])
        try:
            opaque = names.fdset_opaque(index, disk, plan.nbd_socket, record["socket_identity"])
            fdset = StartStep.call("handing the scratch image of disk %s to QEMU" % disk["disk"], qmp.execute_with_fd,
                                   fd, "add-fd", {"opaque": opaque})["fdset-id"]
        finally:
            os.close(fd)
        # The raw node caps the image at its reserved room: beyond it, writes fail and break the snapshot.
        StartStep.call("adding the scratch node of disk %s" % disk["disk"], qmp.execute, "blockdev-add", {
            "driver": "qcow2", "node-name": names.scratch_node(index), "discard": "unmap", "backing": disk["root"],
            "file": {"driver": "raw", "size": disk["scratch_room"],
                     "file": {"driver": "file", "filename": "/dev/fdset/%d" % fdset}}})
        StartStep.call("adding the copy-before-write filter of disk %s" % disk["disk"], qmp.execute, "blockdev-add", {
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


def _export(qmp, names, plan, record, state, listener):
    for index, disk in enumerate(plan.disks):
        StartStep.call("adding the probe node of disk %s" % disk["disk"], qmp.execute, "blockdev-add", {
            "driver": "snapshot-access", "node-name": names.probe_node(index), "file": names.filter_node(index)})
    tls = bool(plan.tcp) and not plan.tcp["plain"]
    if tls:
        StartStep.call("adding the TLS credentials and the client filter", add_tls, qmp, names, plan.tcp, state)
    StartStep.call("starting the NBD server", start_nbd_server, qmp, names, listener, record, state, tls)
    for index, disk in enumerate(plan.disks):
        export = {"type": "nbd", "id": names.export_id(index), "node-name": names.scratch_node(index),
                  "name": disk["export"], "writable": False, "allocation-depth": True,
                  "description": describe_view(plan.backup_id, disk["disk"], disk["export"], plan.scratch_dir,
                                               plan.request["cbw_timeout"])}
        if disk["mode"] == "incremental":
            export["bitmaps"] = [{"node": disk["node"], "name": names.temp_bitmap}]
        StartStep.call("exporting disk %s over NBD" % disk["disk"], qmp.execute, "block-export-add", export)
        StartStep.call("exporting the probe of disk %s over NBD" % disk["disk"], export_probe, qmp, names, index, disk)


def _bitmap_count(qmp, node, bitmap):
    for entry in qmp.execute("query-named-block-nodes", {"flat": True}):
        if entry["node-name"] == node:
            for info in entry.get("dirty-bitmaps", []):
                if info.get("name") == bitmap:
                    return info["count"]
    raise UserError("Bitmap %s of disk node %s is gone from QEMU." % (bitmap, node))
