# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The view of a stopped VM's images: each exported read-only by a qemu-nbd of its own.

A backup, in this order, so that a run stopped at any point is undone by qemu_backup_stop with its id:
  1. every disk's checkpoint is checked in the image (a bitmap QEMU left in use is inconsistent);
  2. the new checkpoint is added to the images (qemu-img bitmap --add), each recorded in our state first;
  3. each image is exported read-only by a qemu-nbd of its own (with -B for an incremental), recorded by PID.

qemu-nbd opens the images without a lock (locking=off), so a VM that starts during the backup wins: it runs and
writes as usual. The backup then no longer holds one point in time, which the stop sees (the images' inode,
size, mtime and ctime changed) and reports as intact=false; the backup role then records nothing.
"""

from __future__ import annotations

import contextlib
import os

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import remove_file
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.processes import process_alive
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.qemu_img import checked_qemu_img
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.extents import dirty_context
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.tls import (
    SERVER_FILES,
    credential_copies,
    credential_copies_name,
    listen_tcp,
    read_credentials,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.tls import remove_credential_copies
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.plan import BackupPlan, check_socket_path, nbd_url
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.qemu_nbd import (
    end_server,
    pidfile_name,
    serve_image,
    servers_alive,
    unrecorded_servers,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.removed import Removed
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.view import PointInTimeView
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.connection import OFFLINE
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.offline.vm import BITMAP_GRANULARITY
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.offline.seen_disks import image_fingerprint


class OfflineExport(PointInTimeView):
    """qemu-nbd over the images, whichever connection reaches the VM now: a VM may start while its offline backup
    runs (it wins), so its stop may come through the QMP or libvirt connection of the running VM."""

    kind = OFFLINE

    def running_ids(self):
        record = self.vm.state.backup()
        return {record["backup_id"]} if record and record.get("kind") == OFFLINE and servers_alive(record) else set()

    def is_whole(self, record):
        return servers_alive(record) and len(record["servers"]) == len(record["disks"])

    def plan(self, backup_id, request):
        vm = self.vm
        if request["nbd_socket"]:
            raise UserError("%s is not running: each of its disks is served by a qemu-nbd of its own, on a socket in "
                            "fleetbackup's directory of the VM; leave out nbd_socket." % vm.description)
        chosen = self.chosen_disks(request)
        tcp = request.get("nbd_tcp")
        if tcp and tcp["port"] and len(chosen) > 1:
            raise UserError("%s is not running: each of its %d disks is served by a qemu-nbd of its own, on a port "
                            "of its own; give nbd_tcp.port 0 (free ports, each in its disk's url), or one disk."
                            % (vm.description, len(chosen)))
        if tcp and tcp["tls_dir"]:
            read_credentials(tcp["tls_dir"], SERVER_FILES, "nbd_tcp.tls_dir")  # before any bitmap is added
        plan = BackupPlan(backup_id, chosen, request, vm.registry, vm.state.default_socket)
        for index, disk in enumerate(plan.disks):
            if tcp:
                disk["socket"] = None
                disk["url"] = plan.url(disk["export"])  # its port once its server listens
            else:
                disk["socket"] = vm.state.dir.path_of("nbd-%d.sock" % index)
                check_socket_path(disk["socket"], given=False)
                disk["url"] = nbd_url(disk["export"], disk["socket"])
            if disk["mode"] == "incremental":
                disk["dirty_bitmap"] = dirty_context(plan.incremental)
        plan.nbd_socket = None
        return plan

    def new_record(self, plan):
        return dict(super().new_record(plan), added=[], servers=[], fingerprints={}, result=None)

    def make(self, plan, freeze, record):
        vm = self.vm
        with_checkpoint = [disk for disk in plan.disks if disk["checkpoint"]]
        for disk in with_checkpoint:
            record["added"].append(disk["filename"])
            vm.state.save_backup(record)  # recorded before the bitmap exists
            checked_qemu_img("bitmap", "--add", "-g", BITMAP_GRANULARITY, disk["filename"], plan.checkpoint)
        if with_checkpoint:
            vm.registry.record([d for d in plan.chosen if d.filename in record["added"]], plan.checkpoint)
            if vm.metadata:
                vm.metadata.define(plan.checkpoint, [disk["disk"] for disk in with_checkpoint])
        record["fingerprints"] = {disk["filename"]: image_fingerprint(disk["filename"]) for disk in plan.disks}
        credentials = None
        if plan.tcp and not plan.tcp["plain"]:
            credentials = read_credentials(plan.tcp["tls_dir"], SERVER_FILES, "nbd_tcp.tls_dir")
        for index, disk in enumerate(plan.disks):
            record["servers"].append(self._serve(plan, index, disk, credentials))
            vm.state.save_backup(record)
            remove_file(vm.state.dir.path_of(pidfile_name(index)))  # recorded: no longer needed to find it
        if plan.tcp and len(plan.disks) > 1:
            plan.port = None  # each disk has a port of its own, in its url
        result = dict(plan.result(), offline=True, **freeze.result())
        record.update(complete=True, result=result)
        vm.state.save_backup(record)

    def _serve(self, plan, index, disk, credentials):
        """One disk's qemu-nbd: on its unix socket, or on a TCP listener of ours, with TLS when credentials."""
        pidfile = self.vm.state.dir.path_of(pidfile_name(index))
        if not plan.tcp:
            return serve_image(disk, plan.incremental, pidfile)
        with contextlib.closing(listen_tcp(plan.tcp["host"], plan.tcp["port"])) as listener:
            plan.port = listener.getsockname()[1]
            disk["url"] = plan.url(disk["export"])
            if credentials is None:
                return serve_image(disk, plan.incremental, pidfile, listener)
            with credential_copies(self.vm.state.dir.path_of(credential_copies_name(plan.backup_id)), credentials,
                                   os.geteuid()) as directory:
                return serve_image(disk, plan.incremental, pidfile, listener, (directory, plan.tcp["tls_allow"]))

    def remove(self, backup_id, record, discard_checkpoint, check_mode):
        """End an offline backup: its qemu-nbds (by recorded PID and start time), their sockets, its state; with
        discard_checkpoint, the bitmaps it added.

        Intact when it completed, its servers still ran, and no image changed since the export began.
        """
        vm = self.vm
        unrecorded = unrecorded_servers(vm.state, record)
        alive = [server for server in record["servers"] + unrecorded if process_alive(server["owner"])]
        changed = [path for path, fingerprint in record["fingerprints"].items()
                   if image_fingerprint(path) != fingerprint]
        intact = (len(alive) == len(record["servers"]) and not changed) if record["complete"] else None
        checkpoint = record["checkpoint"] if discard_checkpoint and record["added"] else None
        # The VM may run now: its connection removes the bitmaps from QEMU, or from the images when it is stopped.
        sockets = [server["socket"] for server in record["servers"] if server["socket"]]
        removed = Removed(exports=[disk["export"] for disk in record["disks"]] if alive else [],
                          nbd_server=bool(alive), checkpoint=checkpoint, state_file=True,
                          files=[path for path in sockets if os.path.lexists(path)])
        if changed:
            vm.notes.append("The images %s changed during the backup (the VM was started, or something else "
                            "wrote them): the VM won, and this backup holds no single point in time."
                            % ", ".join(sorted(changed)))
        if check_mode:
            return removed, intact
        for server in alive:
            end_server(server["owner"])
        for path in removed.files:
            remove_file(path)
        for index in range(len(record["disks"])):
            remove_file(vm.state.dir.path_of(pidfile_name(index)))
        # A start killed while qemu-nbd loaded its credentials left their copies.
        remove_credential_copies(vm.state.dir.path_of(credential_copies_name(record["backup_id"])))
        if checkpoint:
            vm.remove_checkpoint(checkpoint, record["added"])
            vm.registry.forget(record["added"], checkpoint)
        vm.state.forget_backup()
        return removed, intact
