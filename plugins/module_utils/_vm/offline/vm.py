# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A VM that is not running: the third implementation of VmConnection, on its image files.

The images come from fleetbackup's own state, recorded while a QMP VM ran (with the device and inode of each file,
so a swapped file is refused), or from libvirt's definition of an inactive domain; never from a repository.

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
import json
import os
import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.plan import (
    BackupPlan,
    check_socket_path,
    nbd_url,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.guest_freeze import FreezeUnavailable
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.extents import dirty_context
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.tls import (
    SERVER_FILES,
    credential_copies,
    credential_copies_name,
    listen_tcp,
    read_credentials,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.offline_export import (
    OFFLINE,
    image_fingerprint,
    image_identity,
    pidfile_name,
    remove_offline_backup,
    serve_image,
    servers_alive,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import remove_file
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.qemu_img import (
    QemuImgError,
    checked_qemu_img,
    image_bitmaps,
    run_qemu_img,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.connection import VmConnection
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.disks import Disk, select_disks

BITMAP_GRANULARITY = 64 * 1024
# qemu-img's words when another process holds an image's write lock.
LOCKED = "Failed to get"


class OfflineVm(VmConnection):
    """images: [{name, qdev, node, format, filename, read_only, identity (or None: libvirt's definition)}].

    metadata: libvirt's checkpoint metadata of an inactive domain (LibvirtCheckpoints), or None.
    """

    def __init__(self, state, registry, timeout, description, images, metadata=None):
        super().__init__(state, registry, timeout)
        self.description = description
        self.images = images
        self.metadata = metadata

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None

    def undo_abandoned(self):
        return []  # nothing of ours runs in a stopped VM

    def guest_agent(self, request):
        raise FreezeUnavailable("%s is not running: its file systems are as its shutdown left them"
                                % self.description)

    # ---- disks and checkpoints

    def disks(self):
        return [self._disk(image) for image in self.images]

    def _disk(self, image):
        path = image["filename"]
        if image.get("identity") is not None and image_identity(path) != image["identity"]:
            raise UserError("The image %s of disk %s is not the file %s had open when fleetbackup last saw it "
                            "running (another file, or none, is there now): start the VM once so that fleetbackup "
                            "sees its disks again." % (path, image["name"], self.description))
        process = run_qemu_img("info", "--output=json", path)
        if process.returncode != 0:
            error = process.stderr.decode(errors="replace").strip()
            if LOCKED in error:
                raise UserError("The image %s of %s is in use by another process (%s): the VM is running after "
                                "all, or something else holds it. Back it up through its running QEMU."
                                % (path, self.description, error))
            raise UserError("Cannot read the image %s of disk %s: %s" % (path, image["name"], error))
        info = json.loads(process.stdout)
        if info["format"] != image["format"]:
            raise UserError("The image %s of disk %s is %s now, not %s as recorded: start the VM once so that "
                            "fleetbackup sees its disks again."
                            % (path, image["name"], info["format"], image["format"]))
        known = self.metadata.names() if self.metadata else None
        bitmaps = {}
        for bitmap in info.get("format-specific", {}).get("data", {}).get("bitmaps", []):
            if known is not None and bitmap["name"] not in known:
                continue  # a bitmap libvirt does not list is no checkpoint of the domain
            bitmaps[bitmap["name"]] = dict(
                name=bitmap["name"], count=None, granularity=bitmap["granularity"],
                inconsistent="in-use" in bitmap["flags"], persistent=True, recording="auto" in bitmap["flags"],
                busy=False)
        return Disk(name=image["name"], node=image["node"], root=image["node"], drive=image["name"],
                    qdev=image["qdev"], format=info["format"], filename=path, size=info["virtual-size"],
                    read_only=image["read_only"], bitmaps=bitmaps)

    def set_bitmaps(self, name, disks, present):
        for disk in disks:
            checked_qemu_img("bitmap", "--add" if present else "--remove", *(
                ["-g", BITMAP_GRANULARITY] if present else []), disk.filename, name)
        if self.metadata:
            if present:
                self.metadata.define(name, [disk.name for disk in disks])
            else:
                self.metadata.forget(name)

    def remove_checkpoint(self, name, filenames):
        """Remove the bitmaps of checkpoint `name` from these images (where still there), and libvirt's metadata."""
        for filename in filenames:
            if name in image_bitmaps(filename):
                checked_qemu_img("bitmap", "--remove", filename, name)
        if self.metadata and name in self.metadata.names():
            self.metadata.forget(name)

    # ---- backups

    def running_backup_ids(self):
        record = self.state.backup()
        return {record["backup_id"]} if record and record.get("kind") == OFFLINE and servers_alive(record) else set()

    def is_whole(self, record):
        return record.get("kind") == OFFLINE and servers_alive(record) and len(record["servers"]) == len(
            record["disks"])

    def plan(self, backup_id, request, check_mode):
        if request["nbd_socket"]:
            raise UserError("%s is not running: each of its disks is served by a qemu-nbd of its own, on a socket in "
                            "fleetbackup's directory of the VM; leave out nbd_socket." % self.description)
        try:
            chosen = select_disks(self.disks(), request["disks"])
        except LookupError as err:
            raise UserError(str(err)) from None
        if not chosen:
            raise UserError("%s has no writable disk to back up; name disks explicitly." % self.description)
        tcp = request.get("nbd_tcp")
        if tcp and tcp["port"] and len(chosen) > 1:
            raise UserError("%s is not running: each of its %d disks is served by a qemu-nbd of its own, on a port "
                            "of its own; give nbd_tcp.port 0 (free ports, each in its disk's url), or one disk."
                            % (self.description, len(chosen)))
        if tcp and tcp["tls_dir"]:
            read_credentials(tcp["tls_dir"], SERVER_FILES, "nbd_tcp.tls_dir")  # before any bitmap is added
        plan = BackupPlan(backup_id, chosen, request, self.registry, self.state.default_socket)
        for index, disk in enumerate(plan.disks):
            if tcp:
                disk["socket"] = None
                disk["url"] = plan.url(disk["export"])  # its port once its server listens
            else:
                disk["socket"] = self.state.dir.path_of("nbd-%d.sock" % index)
                check_socket_path(disk["socket"], given=False)
                disk["url"] = nbd_url(disk["export"], disk["socket"])
            if disk["mode"] == "incremental":
                disk["dirty_bitmap"] = dirty_context(plan.incremental)
        plan.nbd_socket = None
        return plan

    def create_backup(self, plan, freeze):
        record = dict(kind=OFFLINE, backup_id=plan.backup_id, tag=plan.tag, request=plan.request, complete=False,
                      checkpoint=plan.checkpoint, disks=plan.disks, added=[], servers=[], fingerprints={},
                      nbd_socket=None, socket_identity=None, result=None, started=int(time.time()))
        self.state.save_backup(record)  # before anything is changed: a stop finds all of it by this record
        try:
            with_checkpoint = [disk for disk in plan.disks if disk["checkpoint"]]
            for disk in with_checkpoint:
                record["added"].append(disk["filename"])
                self.state.save_backup(record)  # recorded before the bitmap exists
                checked_qemu_img("bitmap", "--add", "-g", BITMAP_GRANULARITY, disk["filename"], plan.checkpoint)
            if with_checkpoint:
                self.registry.record([d for d in plan.chosen if d.filename in record["added"]], plan.checkpoint)
                if self.metadata:
                    self.metadata.define(plan.checkpoint, [disk["disk"] for disk in with_checkpoint])
            record["fingerprints"] = {disk["filename"]: image_fingerprint(disk["filename"]) for disk in plan.disks}
            credentials = None
            if plan.tcp and not plan.tcp["plain"]:
                credentials = read_credentials(plan.tcp["tls_dir"], SERVER_FILES, "nbd_tcp.tls_dir")
            for index, disk in enumerate(plan.disks):
                record["servers"].append(self._serve(plan, index, disk, credentials))
                self.state.save_backup(record)
                remove_file(self.state.dir.path_of(pidfile_name(index)))  # recorded: no longer needed to find it
            if plan.tcp and len(plan.disks) > 1:
                plan.port = None  # each disk has a port of its own, in its url
            result = dict(plan.result(), offline=True, **freeze.result())
            record.update(complete=True, result=result)
            self.state.save_backup(record)
        except (UserError, QemuImgError, OSError) as err:
            try:
                remove_offline_backup(self, record, True, False)
            except (UserError, QemuImgError, OSError) as cleanup_error:
                raise UserError("Starting backup '%s' of %s failed: %s. Cleaning up failed too: %s"
                                % (plan.backup_id, self.description, err, cleanup_error)) from None
            raise UserError("Starting backup '%s' of %s failed: %s. Everything it had created was removed."
                            % (plan.backup_id, self.description, err)) from None
        return record

    def _serve(self, plan, index, disk, credentials):
        """One disk's qemu-nbd: on its unix socket, or on a TCP listener of ours, with TLS when credentials."""
        pidfile = self.state.dir.path_of(pidfile_name(index))
        if not plan.tcp:
            return serve_image(disk, plan.incremental, pidfile)
        with contextlib.closing(listen_tcp(plan.tcp["host"], plan.tcp["port"])) as listener:
            plan.port = listener.getsockname()[1]
            disk["url"] = plan.url(disk["export"])
            if credentials is None:
                return serve_image(disk, plan.incremental, pidfile, listener)
            with credential_copies(self.state.dir.path_of(credential_copies_name(plan.backup_id)), credentials,
                                   os.geteuid()) as directory:
                return serve_image(disk, plan.incremental, pidfile, listener, (directory, plan.tcp["tls_allow"]))

    def remove_backup(self, backup_id, discard_checkpoint, check_mode):
        """A backup of the VM while it ran, which stopped since: QEMU took its objects along."""
        record = self.state.backup()
        if record is None or record["backup_id"] != backup_id:
            return dict(job=False, exports=[], nodes=[], nbd_server=False, objects=[], checkpoint=None,
                        state_file=False, files=[]), None
        removed = self.forget_backup_state(record, discard_checkpoint, check_mode)
        if removed["checkpoint"] and not check_mode:
            self.remove_checkpoint(removed["checkpoint"], [d["filename"] for d in record["disks"] if d["checkpoint"]])
        self.notes.append("%s is not running: the backup's QEMU objects went with it; its socket and state were "
                          "removed." % self.description)
        return removed, None
