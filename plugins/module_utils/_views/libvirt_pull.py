# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""libvirt's own view: a pull-mode backup job (virDomainBackupBegin), through libvirt's APIs alone, so no domain is
ever tainted.

libvirt (9.0) fleeces with blockdev-backup: when the scratch image cannot grow, the guest's write fails. So the
start makes the scratch images itself, each in a file with room reserved (fallocate) for every cluster of its
disk, and hands them to libvirt to reuse: they can never run out, and they take no space the VMs need later.

QEMU runs as its own user (libvirt-qemu). The scratch images sit in a root-owned directory per VM that QEMU's
user may only pass through (libvirt hands it each image); the NBD socket, which QEMU creates, sits in a
subdirectory of QEMU's user.
"""

from __future__ import annotations

import base64
import grp
import hashlib
import os
import pwd
import re
import stat
import time
from xml.etree import ElementTree

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import (
    check_trusted_directory,
    file_identity,
    read_regular_file,
    remove_file,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.qemu_img import qcow2_full_size
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.extents import dirty_context
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.plan import (
    EXPORT_NAME,
    BackupPlan,
    check_socket_path,
    new_tag,
    temporary_bitmap,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.removed import Removed
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.scratch import (
    check_scratch_dir,
    create_scratch_image,
    existing_parent,
    scratch_bytes,
    scratch_shares,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.view import PointInTimeView
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.connection import LIBVIRT_PULL
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.libvirt.calls import LibvirtFailure, call, libvirt
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.libvirt.checkpoints import checkpoint_xml

# A start's own socket directory is named after its tag (8 hex digits).
START_DIR = re.compile(r"^[0-9a-f]{8}$")
NBD_SOCKET = "nbd.sock"
# The scratch file system keeps this share free after the reservation: the VMs' own images grow there too.
SCRATCH_HEADROOM = 0.1
SCRATCH_SUFFIX = ".scratch"
# A backup job that fleetbackup did not start (another tool's): it blocks ours all the same.
FOREIGN_BACKUP = "A backup job that fleetbackup did not start (see virsh domjobinfo)"
# The largest UEFI variable store kept with a backup; OVMF's are 128 KiB to 4 MiB.
MAX_NVRAM = 64 * 1024 * 1024
JOB_POLL = 0.02


class LibvirtPull(PointInTimeView):
    """A pull backup of a libvirt domain; vm is its connection, running or shut off (vm.libvirt: the domain)."""

    kind = LIBVIRT_PULL

    def __init__(self, vm):
        super().__init__(vm)
        self.lv = vm.libvirt

    def running_ids(self):
        if self.lv.job_operation() != libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP:
            return set()
        exports = self._exports()
        if exports is None:
            return set()  # it ended between the two calls
        matches = (EXPORT_NAME.match(export or "") for export, _bitmap in exports.values())
        ids = {match.group("backup_id") for match in matches if match}
        return ids or {FOREIGN_BACKUP}

    def _exports(self):
        """{disk: (export name, bitmap export name)} of the running backup job, or None when there is none."""
        try:
            xml = call("Reading the backup job's XML", self.lv.domain.backupGetXMLDesc, 0)
        except LibvirtFailure as failure:
            if failure.code == "VIR_ERR_NO_DOMAIN_BACKUP":
                return None
            raise
        return {disk.get("name"): (disk.get("exportname"), disk.get("exportbitmap"))
                for disk in ElementTree.fromstring(xml).findall("./disks/disk") if disk.get("backup") == "yes"}

    def is_whole(self, record):
        return record["backup_id"] in self.running_ids()

    def plan(self, backup_id, request):
        if request.get("nbd_tcp"):
            # libvirt 9.0 serves a backup over TCP with the host-wide certificates of qemu.conf
            # (backup_tls_x509_cert_dir) and admits any client certificate of that CA: it has no tls-authz.
            raise UserError("nbd_tcp is not available for libvirt domains: libvirt's backup server would admit every "
                            "client certificate of the CA (it has no tls-authz to restrict it to the backup host's), "
                            "and takes its certificates from qemu.conf for the whole host. Copy on the hypervisor "
                            "over the unix socket, or back up this VM over its own QMP socket (qmp_socket).")
        self.lv.check_running()
        chosen = self.chosen_disks(request)
        if request["checkpoint"] in {checkpoint.getName() for checkpoint in self.lv.listed_checkpoints()}:
            raise UserError("Checkpoint '%s' already exists on %s: name the new checkpoint differently."
                            % (request["checkpoint"], self.vm.description))
        tag = new_tag()
        # A directory of its own per start, which QEMU's user can find only while it binds the socket.
        nbd_socket = request["nbd_socket"] or os.path.join(self.lv.run_dir, tag, NBD_SOCKET)
        check_socket_path(nbd_socket, given=bool(request["nbd_socket"]))
        plan = BackupPlan(backup_id, chosen, request, self.vm.registry, nbd_socket, tag)
        plan.scratch_dir = request["scratch_dir"] or self.lv.run_dir
        if request["libvirt_small_scratch"]:
            rooms = scratch_shares(scratch_bytes(request["scratch_size"], sum(disk.size for disk in chosen)),
                                   [disk.size for disk in chosen])
        else:
            rooms = [qcow2_full_size(disk.size) for disk in chosen]
        check_scratch_dir(plan.scratch_dir, 0, ours=not request["scratch_dir"])
        fs = os.statvfs(existing_parent(plan.scratch_dir))
        free, headroom = fs.f_bavail * fs.f_frsize, int(fs.f_blocks * fs.f_frsize * SCRATCH_HEADROOM)
        if free - sum(rooms) < headroom:
            raise UserError(
                "The scratch directory %s has %d MiB free; the %d MiB that %s's disks can take would leave less than "
                "the %d%% of its file system that stays free for the VMs' own images. libvirt keeps the old data of "
                "every block the guest overwrites during the backup, and when that space runs out the guest's writes "
                "fail (a guest that stops on errors pauses), so the start reserves room for all of it. Point "
                "scratch_dir at a bigger file system, or set libvirt_small_scratch to reserve only scratch_size and "
                "accept the risk." % (plan.scratch_dir, free >> 20, sum(rooms) >> 20, self.vm.description,
                                      SCRATCH_HEADROOM * 100))
        for disk, room in zip(plan.disks, rooms):
            disk["scratch_room"] = room
            disk["scratch"] = os.path.join(plan.scratch_dir, "%s.%s.%s%s" % (
                backup_id, plan.tag, disk["export"].rsplit("/", 1)[1], SCRATCH_SUFFIX))
        return plan

    def _qemu_owner(self):
        """(uid, gid) QEMU runs as, from the dac label of the running domain (root without one)."""
        for label in self.lv.xml().findall("./seclabel[@model='dac']/label"):
            user, group = label.text.split(":")
            return (int(user[1:]) if user.startswith("+") else pwd.getpwnam(user).pw_uid,
                    int(group[1:]) if group.startswith("+") else grp.getgrnam(group).gr_gid)
        return 0, 0

    def _make_dirs(self, nbd_dir):
        """This VM's directory under qemu_dir, ours, for the scratch images; and the start's own directory, QEMU's
        user's until the socket is made, for the socket.

        qemu_dir and the VM's directory let anybody through but list nothing (0711), so QEMU's user (which every VM
        shares) cannot find a start's directory by listing.
        """
        check_trusted_directory(os.path.dirname(os.path.abspath(self.lv.qemu_dir)), "qemu_dir's parent",
                                "fleetbackup's directory for QEMU")
        uid, gid = self._qemu_owner()
        ours = (os.geteuid(), os.getegid())
        wanted = ((self.lv.qemu_dir, ours, 0o711), (self.lv.run_dir, ours, 0o711), (nbd_dir, (uid, gid), 0o700))
        for path, owner, mode in wanted:
            if path is None:
                continue
            try:
                os.mkdir(path, mode)
                os.chown(path, *owner)
                os.chmod(path, mode)
            except FileExistsError:
                info = os.lstat(path)
                if not stat.S_ISDIR(info.st_mode) or info.st_uid != owner[0] or stat.S_IMODE(info.st_mode) != mode:
                    raise UserError("%s is not the directory fleetbackup makes there (uid %d, mode %o): remove it, "
                                    "or choose another qemu_dir." % (path, owner[0], mode)) from None

    def _lock_down_socket(self, socket_path, own_dir):
        """QEMU made the socket as its user, which every VM's QEMU shares: make it, and its directory, root's alone."""
        uid, _gid = self._qemu_owner()
        fd = os.open(socket_path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            if not stat.S_ISSOCK(info.st_mode) or info.st_uid not in (uid, os.geteuid()):
                raise UserError("%s is not the socket QEMU made for the backup." % socket_path)
            os.chown("/proc/self/fd/%d" % fd, os.geteuid(), os.getegid())
            os.chmod("/proc/self/fd/%d" % fd, 0o600)
        finally:
            os.close(fd)
        if own_dir:
            directory = os.path.dirname(socket_path)
            os.chown(directory, os.geteuid(), os.getegid())
            os.chmod(directory, 0o700)

    def create(self, plan, freeze):
        """The directories first: a start that cannot have them makes nothing else."""
        if not plan.request["nbd_socket"] or not plan.request["scratch_dir"]:
            self._make_dirs(os.path.dirname(plan.nbd_socket) if not plan.request["nbd_socket"] else None)
        return super().create(plan, freeze)

    def new_record(self, plan):
        return dict(super().new_record(plan), scratch_images={})

    def make(self, plan, freeze, record):
        for disk in plan.disks:
            fd = create_scratch_image(plan.scratch_dir, disk["size"], disk["scratch_room"],
                                      os.path.basename(disk["scratch"]))
            info = os.fstat(fd)
            os.close(fd)
            record["scratch_images"][disk["scratch"]] = [info.st_dev, info.st_ino]
            self.vm.state.save_backup(record)
        all_disks = self.vm.disks()
        checkpointed = {disk["disk"] for disk in plan.disks if disk["checkpoint"]}
        with_checkpoint = [disk for disk in all_disks if disk.name in checkpointed]
        checkpoint = checkpoint_xml(plan.checkpoint, with_checkpoint, [
            disk for disk in all_disks if disk.name not in checkpointed]) if plan.checkpoint else None
        with freeze:  # backupBegin has no quiesce flag of its own
            self._begin(backup_xml(plan, all_disks), checkpoint)
        exports = self._exports() or {}
        missing = [disk["disk"] for disk in plan.disks if disk["disk"] not in exports]
        if missing:
            raise UserError("libvirt's backup job exports no disk %s." % ", ".join(missing))
        for disk in plan.disks:
            disk["export"], bitmap = exports[disk["disk"]]
            if disk["mode"] == "incremental":
                disk["dirty_bitmap"] = dirty_context(bitmap)
        self._lock_down_socket(plan.nbd_socket, own_dir=not plan.request["nbd_socket"])
        if plan.checkpoint:
            self.vm.registry.record(with_checkpoint, plan.checkpoint)
        result = dict(plan.result(), **freeze.result())
        result["libvirt"] = self._definition(plan)
        record.update(complete=True, disks=plan.disks, result=result)
        self.vm.state.save_backup(record)

    def _begin(self, xml, checkpoint):
        """backupBegin, with libvirt's answer for a checkpoint whose bitmap is gone told by name."""
        try:
            call("Starting the backup", self.lv.domain.backupBegin, xml, checkpoint,
                 libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL)
        except LibvirtFailure as failure:
            if failure.code == "VIR_ERR_CHECKPOINT_INCONSISTENT":
                raise UserError("libvirt finds the checkpoint of this incremental inconsistent (QEMU stopped "
                                "uncleanly; %s): take a full backup, or set fallback_to_full."
                                % failure.cause.get_error_message()) from None
            raise

    def _definition(self, plan):
        """What a restore needs besides the disks: the domain's and the checkpoint's XML, the UEFI variables; and
        what cannot be kept."""
        live = self.lv.xml()
        definition = dict(domain_xml=call("Reading the domain's definition", self.lv.domain.XMLDesc,
                                          libvirt.VIR_DOMAIN_XML_INACTIVE),
                          checkpoint_xml=None, nvram=None, not_backed_up=[])
        if plan.checkpoint:
            checkpoint = call("Looking up checkpoint %s" % plan.checkpoint, self.lv.domain.checkpointLookupByName,
                              plan.checkpoint)
            definition["checkpoint_xml"] = call("Reading checkpoint %s" % plan.checkpoint, checkpoint.getXMLDesc,
                                                libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
        nvram = live.findtext("./os/nvram")
        if nvram:
            definition["nvram"] = read_nvram(nvram)
        if live.find("./devices/tpm") is not None:
            definition["not_backed_up"].append("the vTPM's state: swtpm keeps it outside the domain's disks, and "
                                               "a restored domain starts with a new, empty TPM")
        for filesystem in live.findall("./devices/filesystem"):
            definition["not_backed_up"].append("the host directory shared as %s" % (
                filesystem.find("target").get("dir") if filesystem.find("target") is not None else "a filesystem"))
        backed_up = {disk["disk"] for disk in plan.disks}
        for disk in live.findall("./devices/disk"):
            target = disk.find("target").get("dev")
            if disk.get("device", "disk") == "disk" and target not in backed_up:
                definition["not_backed_up"].append("disk %s, which this backup leaves out" % target)
        return definition

    def remove(self, backup_id, record, discard_checkpoint, check_mode):
        exports = self._exports() if backup_id in self.running_ids() else None
        # libvirt's view never breaks (the guest's writes would fail instead): it held while its job ran.
        intact = (exports is not None or bool(record.get("ending"))) if record and record["complete"] else None
        checkpoint = self._checkpoint_of(record) if discard_checkpoint else None
        removed = Removed(job=exports is not None,
                          exports=sorted(export for export, _bitmap in (exports or {}).values()),
                          nbd_server=exports is not None, checkpoint=checkpoint, state_file=record is not None,
                          files=self._leftover_files(backup_id, record, exports is not None))
        self._note_paused_on_error()
        if check_mode:
            return removed, intact
        if exports is not None:
            if record:
                record["ending"] = True
                self.vm.state.save_backup(record)  # a stop killed after abortJob still knows the view held
            self._end_job()
            removed.files = self._leftover_files(backup_id, record, False)
        if checkpoint:
            images = [disk["filename"] for disk in record["disks"] if disk["checkpoint"]]
            self.lv.delete_checkpoint(checkpoint, images)
            self.vm.registry.forget(images, checkpoint)
        for path in removed.files:
            remove_file(path)
        for directory in self._leftover_dirs(record):
            os.rmdir(directory)
        if record:
            self.vm.state.forget_backup()
        return removed, intact

    def _checkpoint_of(self, record):
        """The checkpoint the recorded start created: libvirt lists it, made no earlier than the start (the start
        refused a name libvirt knew)."""
        if not record or not record["checkpoint"]:
            return None
        for checkpoint in self.lv.listed_checkpoints():
            if checkpoint.getName() == record["checkpoint"]:
                created = ElementTree.fromstring(call("Reading checkpoint %s" % record["checkpoint"],
                                                      checkpoint.getXMLDesc, 0)).findtext("creationTime")
                return record["checkpoint"] if created and int(created) >= record["started"] else None
        return None

    def _end_job(self):
        """abortJob ends a pull backup (libvirt then removes its socket); wait until the job is gone."""
        call("Ending the backup job", self.lv.domain.abortJob)
        deadline = time.monotonic() + self.vm.timeout
        while self.lv.job_operation() == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP:
            if time.monotonic() > deadline:
                raise UserError("The backup job of %s did not end within %ss of abortJob: raise timeout, or look "
                                "at libvirtd's log." % (self.vm.description, self.vm.timeout))
            time.sleep(JOB_POLL)

    def _leftover_files(self, backup_id, record, job_running):
        """The scratch images of this backup, and sockets no job serves any more.

        The scratch images were made by this module (O_EXCL): those of the record while they are still the same
        files, and in this VM's own directory (ours alone) those named after the backup id. Sockets only in the
        starts' own directories of this VM.
        """
        if job_running:
            return []
        paths = [path for path, identity in (record["scratch_images"] if record else {}).items()
                 if file_identity(path) == identity]
        if os.path.isdir(self.lv.run_dir):
            paths += [os.path.join(self.lv.run_dir, name) for name in os.listdir(self.lv.run_dir)
                      if name.startswith(backup_id + ".") and name.endswith(SCRATCH_SUFFIX)]
        paths += [os.path.join(directory, name) for directory in self._leftover_dirs(record)
                  for name in os.listdir(directory)]
        return sorted(set(path for path in paths if os.path.lexists(path)))

    def _leftover_dirs(self, record):
        """The starts' own socket directories of this VM, when no backup job of it runs."""
        if not os.path.isdir(self.lv.run_dir) or self.running_ids():
            return []
        return [os.path.join(self.lv.run_dir, name) for name in sorted(os.listdir(self.lv.run_dir))
                if START_DIR.match(name) and os.path.isdir(os.path.join(self.lv.run_dir, name))]

    def _note_paused_on_error(self):
        state, reason = call("Reading the domain's state", self.lv.domain.state)
        if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR:
            self.vm.notes.append("%s is paused on an I/O error (disk errors: %s). If its scratch space ran out during "
                                 "the backup (libvirt_small_scratch), resume it once the backup stopped: virsh resume."
                                 % (self.vm.description, call("Reading the disk errors", self.lv.domain.diskErrors)))


def read_nvram(path):
    """{path, sha256, content (base64)} of the domain's UEFI variable store; None when it has none yet."""
    content = read_regular_file(path, "The domain's NVRAM", MAX_NVRAM, missing_ok=True)
    if content is None:
        return None
    return dict(path=path, sha256=hashlib.sha256(content).hexdigest(), content=base64.b64encode(content).decode())


def backup_xml(plan, all_disks):
    """A pull backup of the planned disks, each exported under fleetbackup's name with our scratch image.

    Every other disk is listed with backup='no': libvirt would back up a disk it is not told about.
    """
    root = ElementTree.Element("domainbackup", mode="pull")
    if plan.incremental:
        ElementTree.SubElement(root, "incremental").text = plan.incremental
    ElementTree.SubElement(root, "server", transport="unix", socket=plan.nbd_socket)
    disks = ElementTree.SubElement(root, "disks")
    for disk in plan.disks:
        element = ElementTree.SubElement(disks, "disk", name=disk["disk"], backup="yes", type="file",
                                         exportname=disk["export"], exportbitmap=temporary_bitmap(plan.backup_id),
                                         backupmode=disk["mode"])
        if disk["mode"] == "incremental":
            element.set("incremental", plan.incremental)
        ElementTree.SubElement(element, "scratch", file=disk["scratch"])
    given = {disk["disk"] for disk in plan.disks}
    for disk in all_disks:
        if disk.name not in given:
            ElementTree.SubElement(disks, "disk", name=disk.name, backup="no")
    return ElementTree.tostring(root, encoding="unicode")
