# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A VM that libvirt manages: the libvirt implementation of VmConnection, through libvirt's own APIs.

Backups go through virDomainBackupBegin in pull mode, checkpoints through libvirt's checkpoint API. Nothing
here talks to the domain's monitor, so no domain is ever tainted.

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

from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.plan import (
    EXPORT_NAME,
    BackupPlan,
    check_socket_path,
    new_tag,
    temporary_bitmap,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.libvirt.definition import domain_name, restore_identity
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import FleetbackupError, UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.guest_agent import GuestAgentError, GuestAgentUnreachable
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.guest_freeze import (
    FreezeUnavailable,
    thaw_abandoned_freeze,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.copy import dirty_context
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.offline.vm import OfflineVm
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import (
    check_trusted_directory,
    file_identity,
    read_regular_file,
    remove_file,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.qemu_img import (
    checked_qemu_img,
    image_bitmaps,
    qcow2_full_size,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.scratch import (
    check_scratch_dir,
    create_scratch_image,
    existing_parent,
    scratch_bytes,
    scratch_shares,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.connection import VmConnection
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.disks import Disk, select_disks
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.state import VmState

try:
    import libvirt
    HAS_LIBVIRT = True
    LIBVIRT_IMPORT_ERROR = None
except ImportError as import_error:
    HAS_LIBVIRT = False
    LIBVIRT_IMPORT_ERROR = import_error

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
AGENT_CHANNEL = "org.qemu.guest_agent.0"


class LibvirtFailure(FleetbackupError):
    """A libvirt call failed; the message names libvirt's error and what was being done."""


def error_name(err):
    """The VIR_ERR_* name of a libvirtError, as libvirt's documentation spells it."""
    code = err.get_error_code()
    return next((name for name in dir(libvirt) if name.startswith("VIR_ERR_") and name != "VIR_ERR_NONE"
                 and getattr(libvirt, name) == code), "libvirt error %s" % code)


def call(what, function, *args):
    """function(*args), with a libvirtError turned into a LibvirtFailure that says what was being done."""
    try:
        return function(*args)
    except libvirt.libvirtError as err:
        raise LibvirtFailure("%s failed: %s: %s" % (what, error_name(err), err.get_error_message())) from None


def is_error(err, name):
    return isinstance(err, libvirt.libvirtError) and err.get_error_code() == getattr(libvirt, name)


def libvirt_vm_key(uuid):
    """The private-state key of a libvirt domain: its UUID, which outlives renames and redefinitions (short: sockets
    live under it)."""
    return "lv-" + uuid.replace("-", "")


class LibvirtVm(VmConnection):
    def __init__(self, uri, domain, timeout, state_dir, qemu_dir, registry, read_only=False):
        super().__init__(None, registry, timeout)
        self.uri = uri
        self.domain_name = domain
        self.state_dir = state_dir
        self.qemu_dir = qemu_dir
        self.read_only = read_only
        self.connection = None
        self.domain = None
        self.run_dir = None

    def __enter__(self):
        self.connection = connect(self.uri)
        self.domain = self._lookup()
        uuid = self.domain.UUIDString()
        self.description = "domain %s (%s) on %s" % (self.domain.name(), uuid, self.uri)
        self.state = VmState(self.state_dir, libvirt_vm_key(uuid), self.description, self.read_only)
        self.run_dir = os.path.join(self.qemu_dir, libvirt_vm_key(uuid))
        if not self.active():
            return ShutOffDomain(self)
        return self

    def __exit__(self, *exc_info):
        if self.connection is not None:
            self.connection.close()

    def _lookup(self):
        for lookup in (self.connection.lookupByUUIDString, self.connection.lookupByName):
            try:
                return lookup(self.domain_name)
            except libvirt.libvirtError as err:
                if not is_error(err, "VIR_ERR_NO_DOMAIN") and not is_error(err, "VIR_ERR_INVALID_ARG"):
                    raise LibvirtFailure("Looking up domain %s failed: %s: %s"
                                         % (self.domain_name, error_name(err), err.get_error_message())) from None
        raise UserError("libvirt at %s has no domain %s (by name or UUID): check domain and libvirt_uri."
                        % (self.uri, self.domain_name))

    def active(self):
        return bool(call("Asking whether the domain runs", self.domain.isActive))

    def _job_operation(self):
        """The operation of the domain's current job (VIR_DOMAIN_JOB_OPERATION_*), 0 without one."""
        if not self.active():
            return 0
        return call("Reading the domain's job", self.domain.jobStats).get("operation", 0)

    def _running(self):
        if not self.active():
            raise UserError("%s is not running: libvirt backs up and checkpoints only running domains. Start it."
                            % self.description)

    def definition(self):
        """The domain's persistent definition, as an element tree."""
        return self.xml(libvirt.VIR_DOMAIN_XML_INACTIVE)

    def xml(self, flags=0):
        return ElementTree.fromstring(call("Reading the domain's XML", self.domain.XMLDesc, flags))

    def undo_abandoned(self):
        # libvirt pauses no vCPU for us, and what a dead backup leaves, stop removes: only a freeze is undone here.
        message = thaw_abandoned_freeze(self.state, lambda _agent: LibvirtGuestAgent(self))
        return [message] if message else []

    def guest_agent(self, request):
        return LibvirtGuestAgent(self)

    # ---- disks and checkpoints

    def disks(self):
        self._running()
        checkpoints = self._checkpoint_sizes()
        disks = []
        for element in self.xml().findall("./devices/disk"):
            source = element.find("source")
            if element.get("device", "disk") != "disk" or source is None:
                continue  # CD-ROMs, floppies, empty drives
            target = element.find("target").get("dev")
            driver = element.find("driver")
            alias = element.find("alias")
            size = call("Reading the size of disk %s" % target, self.domain.blockInfo, target)[0]
            # libvirt reports neither granularity nor state; its checkpoints are persistent bitmaps that record.
            bitmaps = {name: dict(name=name, count=sizes[target], granularity=None,
                                  inconsistent=sizes[target] is None, persistent=True, recording=True, busy=False)
                       for name, sizes in checkpoints.items() if target in sizes}
            disks.append(Disk(
                name=target, node=target, root=target, drive=target,
                qdev=alias.get("name") if alias is not None else target,
                format=driver.get("type", "raw") if driver is not None else "raw",
                filename=source.get("file") or source.get("dev") or source.get("name"), size=size,
                read_only=element.find("readonly") is not None, bitmaps=bitmaps))
        return disks

    def _checkpoint_sizes(self):
        """{checkpoint: {disk: dirty bytes, or None where libvirt finds its bitmap missing or inconsistent}}."""
        flags = libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE | libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN
        sizes = {}
        for checkpoint in self.listed_checkpoints():
            root = ElementTree.fromstring(call("Reading checkpoint %s" % checkpoint.getName(),
                                               checkpoint.getXMLDesc, flags))
            sizes[checkpoint.getName()] = {
                disk.get("name"): int(disk.get("size")) if disk.get("size") is not None else None
                for disk in root.findall("./disks/disk") if disk.get("checkpoint") == "bitmap"}
        return sizes

    def listed_checkpoints(self):
        return call("Listing checkpoints", self.domain.listAllCheckpoints, 0)

    def _redefine(self, xml, name):
        """Hand libvirt a checkpoint's XML again, checked against the bitmaps in the images.

        False when a bitmap is missing or inconsistent (libvirt's VIR_ERR_CHECKPOINT_INCONSISTENT).
        """
        try:
            self.domain.checkpointCreateXML(xml, libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
                                            | libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE)
            return True
        except libvirt.libvirtError as err:
            if is_error(err, "VIR_ERR_CHECKPOINT_INCONSISTENT"):
                return False
            raise LibvirtFailure("Redefining checkpoint %s failed: %s: %s"
                                 % (name, error_name(err), err.get_error_message())) from None

    def restore_checkpoint(self, name, definition, check_mode):
        """Give libvirt back a checkpoint whose metadata it lost (libvirtd reinstalled, the domain undefined and
        defined again) from the XML a backup kept.

        The bitmaps must still be in the images. A parent that libvirt no longer knows (an older checkpoint
        deleted since) is left out: the parent only orders checkpoints, and the bitmap holds every change.
        """
        self._running()
        try:
            root = ElementTree.fromstring(definition)
        except ElementTree.ParseError as err:
            raise UserError("The definition of checkpoint %s is no XML (%s): pass the checkpoint_xml a backup "
                            "recorded." % (name, err)) from None
        if root.tag != "domaincheckpoint" or root.findtext("name") != name:
            raise UserError("The definition is not one of checkpoint %s (it is a <%s> named %s): pass the "
                            "checkpoint_xml of the backup that created it." % (name, root.tag, root.findtext("name")))
        if root.find("domain") is not None or any(disk.get("bitmap") not in (None, name)
                                                  for disk in root.findall("./disks/disk")):
            raise UserError("The definition of checkpoint %s names other bitmaps or a domain: it is not the "
                            "checkpoint_xml a backup recorded." % name)
        disks = [disk.get("name") for disk in root.findall("./disks/disk") if disk.get("checkpoint") == "bitmap"]
        with self.state.lock(self.timeout):
            known = {checkpoint.getName() for checkpoint in self.listed_checkpoints()}
            if name in known:
                return False, []
            if check_mode:
                return True, disks
            parent = root.find("parent")
            if parent is not None and parent.findtext("name") not in known:
                root.remove(parent)
            if not self._redefine(ElementTree.tostring(root, encoding="unicode"), name):
                raise UserError("Checkpoint %s cannot be given back to libvirt: a bitmap of it is missing or "
                                "inconsistent in the images of %s (libvirt: VIR_ERR_CHECKPOINT_INCONSISTENT). The "
                                "next backup must be full." % (name, self.description))
        return True, disks

    def set_bitmaps(self, name, disks, present):
        self._running()
        if present:
            chosen = {disk.name for disk in disks}
            call("Creating checkpoint %s" % name, self.domain.checkpointCreateXML, checkpoint_xml(
                name, disks, [disk for disk in self.disks() if disk.name not in chosen]), 0)
            return
        holding = {disk.name for disk in self.disks() if name in disk.bitmaps}
        if {disk.name for disk in disks} != holding:
            raise UserError("libvirt removes checkpoint %s from all its disks at once (%s): leave out disks, or "
                            "name them all." % (name, ", ".join(sorted(holding))))
        self._delete_checkpoint(name)

    def _delete_checkpoint(self, name, images=()):
        """Delete a checkpoint; libvirt merges its bitmap into its parent's, so the parent still sees every change.

        libvirt deletes checkpoints of running domains only: of a stopped one, the bitmaps are removed from its
        images (those of our record) offline, and libvirt forgets the metadata.
        """
        checkpoint = call("Looking up checkpoint %s" % name, self.domain.checkpointLookupByName, name)
        if self.active():
            try:
                checkpoint.delete(0)
                return
            except libvirt.libvirtError as err:
                if any(size is not None for size in self._checkpoint_sizes().get(name, {}).values()):
                    raise LibvirtFailure("Deleting checkpoint %s failed: %s: %s"
                                         % (name, error_name(err), err.get_error_message())) from None
            # Its bitmap is gone (a kill -9 of QEMU, or another tool): only the metadata is left to delete.
            call("Forgetting checkpoint %s" % name, checkpoint.delete, libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            return
        for image in images:
            if name in image_bitmaps(image):
                checked_qemu_img("bitmap", "--remove", image, name)
        call("Deleting checkpoint %s" % name, checkpoint.delete,
             libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)

    # ---- backups

    def running_backup_ids(self):
        if self._job_operation() != libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP:
            return set()
        exports = self._exports()
        if exports is None:
            return set()  # it ended between the two calls
        ids = {match.group("backup_id") for match in (EXPORT_NAME.match(export or "") for export, _bitmap in exports.values())
               if match}
        return ids or {FOREIGN_BACKUP}

    def _exports(self):
        """{disk: (export name, bitmap export name)} of the running backup job, or None when there is none."""
        try:
            xml = self.domain.backupGetXMLDesc(0)
        except libvirt.libvirtError as err:
            if is_error(err, "VIR_ERR_NO_DOMAIN_BACKUP"):
                return None
            raise LibvirtFailure("Reading the backup job's XML failed: %s: %s"
                                 % (error_name(err), err.get_error_message())) from None
        return {disk.get("name"): (disk.get("exportname"), disk.get("exportbitmap"))
                for disk in ElementTree.fromstring(xml).findall("./disks/disk") if disk.get("backup") == "yes"}

    def is_whole(self, record):
        return record["backup_id"] in self.running_backup_ids()

    def plan(self, backup_id, request, check_mode):
        if request.get("nbd_tcp"):
            # libvirt 9.0 serves a backup over TCP with the host-wide certificates of qemu.conf
            # (backup_tls_x509_cert_dir) and admits any client certificate of that CA: it has no tls-authz.
            raise UserError("nbd_tcp is not available for libvirt domains: libvirt's backup server would admit every "
                            "client certificate of the CA (it has no tls-authz to restrict it to the backup host's), "
                            "and takes its certificates from qemu.conf for the whole host. Copy on the hypervisor "
                            "over the unix socket, or back up this VM over its own QMP socket (qmp_socket).")
        self._running()
        try:
            chosen = select_disks(self.disks(), request["disks"])
        except LookupError as err:
            raise UserError(str(err)) from None
        if request["checkpoint"] in {checkpoint.getName() for checkpoint in self.listed_checkpoints()}:
            raise UserError("Checkpoint '%s' already exists on %s: name the new checkpoint differently."
                            % (request["checkpoint"], self.description))
        tag = new_tag()
        # A directory of its own per start, which QEMU's user can find only while it binds the socket.
        nbd_socket = request["nbd_socket"] or os.path.join(self.run_dir, tag, NBD_SOCKET)
        check_socket_path(nbd_socket, given=bool(request["nbd_socket"]))
        plan = BackupPlan(backup_id, chosen, request, self.registry, nbd_socket, tag)
        plan.scratch_dir = request["scratch_dir"] or self.run_dir
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
                "accept the risk." % (plan.scratch_dir, free >> 20, sum(rooms) >> 20, self.description,
                                      SCRATCH_HEADROOM * 100))
        for disk, room in zip(plan.disks, rooms):
            disk["scratch_room"] = room
            disk["scratch"] = os.path.join(plan.scratch_dir, "%s.%s.%s%s" % (
                backup_id, plan.tag, disk["export"].rsplit("/", 1)[1], SCRATCH_SUFFIX))
        return plan

    def _qemu_owner(self):
        """(uid, gid) QEMU runs as, from the dac label of the running domain (root without one)."""
        for label in self.xml().findall("./seclabel[@model='dac']/label"):
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
        check_trusted_directory(os.path.dirname(os.path.abspath(self.qemu_dir)), "qemu_dir's parent",
                                "fleetbackup's directory for QEMU")
        uid, gid = self._qemu_owner()
        ours = (os.geteuid(), os.getegid())
        wanted = ((self.qemu_dir, ours, 0o711), (self.run_dir, ours, 0o711), (nbd_dir, (uid, gid), 0o700))
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

    def create_backup(self, plan, freeze):
        own_socket = not plan.request["nbd_socket"]
        if own_socket or not plan.request["scratch_dir"]:
            self._make_dirs(os.path.dirname(plan.nbd_socket) if own_socket else None)
        record = dict(backup_id=plan.backup_id, tag=plan.tag, request=plan.request, complete=False,
                      nbd_socket=plan.nbd_socket, checkpoint=plan.checkpoint, disks=plan.disks, scratch_images={},
                      result=plan.result(), started=int(time.time()))
        self.state.save_backup(record)  # before anything exists: a stop finds all of it by this record
        try:
            for disk in plan.disks:
                fd = create_scratch_image(plan.scratch_dir, disk["size"], disk["scratch_room"],
                                          os.path.basename(disk["scratch"]))
                info = os.fstat(fd)
                os.close(fd)
                record["scratch_images"][disk["scratch"]] = [info.st_dev, info.st_ino]
                self.state.save_backup(record)
            all_disks = self.disks()
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
            self._lock_down_socket(plan.nbd_socket, own_socket)
            if plan.checkpoint:
                self.registry.record(with_checkpoint, plan.checkpoint)
            result = dict(plan.result(), **freeze.result())
            result["libvirt"] = self._definition(plan)
            record.update(complete=True, disks=plan.disks, result=result)
            self.state.save_backup(record)
        except (FleetbackupError, OSError) as err:
            try:
                self.remove_backup(plan.backup_id, True, False)
            except (FleetbackupError, OSError) as cleanup_error:
                raise UserError("Starting backup '%s' of %s failed: %s. Cleaning up failed too: %s"
                                % (plan.backup_id, self.description, err, cleanup_error)) from None
            raise UserError("Starting backup '%s' of %s failed: %s. Everything it had created was removed."
                            % (plan.backup_id, self.description, err)) from None
        return record

    def _begin(self, xml, checkpoint):
        """backupBegin, with libvirt's answer for a checkpoint whose bitmap is gone told by name."""
        try:
            self.domain.backupBegin(xml, checkpoint, libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL)
        except libvirt.libvirtError as err:
            if is_error(err, "VIR_ERR_CHECKPOINT_INCONSISTENT"):
                raise UserError("libvirt finds the checkpoint of this incremental inconsistent (QEMU stopped "
                                "uncleanly; %s): take a full backup, or set fallback_to_full."
                                % err.get_error_message()) from None
            raise LibvirtFailure("Starting the backup failed: %s: %s"
                                 % (error_name(err), err.get_error_message())) from None

    def _definition(self, plan):
        """What a restore needs besides the disks: the domain's and the checkpoint's XML, the UEFI variables; and
        what cannot be kept."""
        live = self.xml()
        definition = dict(domain_xml=call("Reading the domain's definition", self.domain.XMLDesc,
                                          libvirt.VIR_DOMAIN_XML_INACTIVE),
                          checkpoint_xml=None, nvram=None, not_backed_up=[])
        if plan.checkpoint:
            checkpoint = call("Looking up checkpoint %s" % plan.checkpoint, self.domain.checkpointLookupByName,
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

    def remove_backup(self, backup_id, discard_checkpoint, check_mode):
        record = self.state.backup()
        record = record if record is not None and record["backup_id"] == backup_id else None
        exports = self._exports() if backup_id in self.running_backup_ids() else None
        # libvirt's view never breaks (the guest's writes would fail instead): it held while its job ran.
        intact = (exports is not None or bool(record.get("ending"))) if record and record["complete"] else None
        checkpoint = self._checkpoint_of(record) if discard_checkpoint else None
        removed = dict(job=exports is not None, exports=sorted(export for export, _bitmap in (exports or {}).values()),
                       nodes=[], nbd_server=exports is not None, objects=[], checkpoint=checkpoint,
                       state_file=record is not None,
                       files=self._leftover_files(backup_id, record, exports is not None))
        self._note_paused_on_error()
        if check_mode:
            return removed, intact
        if exports is not None:
            if record:
                record["ending"] = True
                self.state.save_backup(record)  # a stop killed after abortJob still knows the view held
            self._end_job()
            removed["files"] = self._leftover_files(backup_id, record, False)
        if checkpoint:
            images = [disk["filename"] for disk in record["disks"] if disk["checkpoint"]]
            self._delete_checkpoint(checkpoint, images)
            self.registry.forget(images, checkpoint)
        for path in removed["files"]:
            remove_file(path)
        for directory in self._leftover_dirs(record):
            os.rmdir(directory)
        if record:
            self.state.forget_backup()
        return removed, intact

    def _checkpoint_of(self, record):
        """The checkpoint the recorded start created: libvirt lists it, made no earlier than the start (the start
        refused a name libvirt knew)."""
        if not record or not record["checkpoint"]:
            return None
        for checkpoint in self.listed_checkpoints():
            if checkpoint.getName() == record["checkpoint"]:
                created = ElementTree.fromstring(call("Reading checkpoint %s" % record["checkpoint"],
                                                      checkpoint.getXMLDesc, 0)).findtext("creationTime")
                return record["checkpoint"] if created and int(created) >= record["started"] else None
        return None

    def _end_job(self):
        """abortJob ends a pull backup (libvirt then removes its socket); wait until the job is gone."""
        call("Ending the backup job", self.domain.abortJob)
        deadline = time.monotonic() + self.timeout
        while self._job_operation() == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP:
            if time.monotonic() > deadline:
                raise UserError("The backup job of %s did not end within %ss of abortJob: raise timeout, or look "
                                "at libvirtd's log." % (self.description, self.timeout))
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
        if os.path.isdir(self.run_dir):
            paths += [os.path.join(self.run_dir, name) for name in os.listdir(self.run_dir)
                      if name.startswith(backup_id + ".") and name.endswith(SCRATCH_SUFFIX)]
        paths += [os.path.join(directory, name) for directory in self._leftover_dirs(record)
                  for name in os.listdir(directory)]
        return sorted(set(path for path in paths if os.path.lexists(path)))

    def _leftover_dirs(self, record):
        """The starts' own socket directories of this VM, when no backup job of it runs."""
        if not os.path.isdir(self.run_dir) or self.running_backup_ids():
            return []
        return [os.path.join(self.run_dir, name) for name in sorted(os.listdir(self.run_dir))
                if START_DIR.match(name) and os.path.isdir(os.path.join(self.run_dir, name))]

    def _note_paused_on_error(self):
        state, reason = call("Reading the domain's state", self.domain.state)
        if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR:
            self.notes.append("%s is paused on an I/O error (disk errors: %s). If its scratch space ran out during "
                              "the backup (libvirt_small_scratch), resume it once the backup stopped: virsh resume."
                              % (self.description, call("Reading the disk errors", self.domain.diskErrors)))


class ShutOffDomain(OfflineVm):
    """A shut-off domain: its images, as its definition names them, backed up offline; checkpoint metadata and
    what a backup of it while it ran left behind, the libvirt way."""

    def __init__(self, vm):
        super().__init__(vm.state, vm.registry, vm.timeout, vm.description + ", shut off",
                         offline_images(vm.definition()), LibvirtCheckpoints(vm))
        self.vm = vm

    def remove_backup(self, backup_id, discard_checkpoint, check_mode):
        return self.vm.remove_backup(backup_id, discard_checkpoint, check_mode)


class LibvirtCheckpoints:
    """The checkpoint metadata of a shut-off domain, which libvirt lets us list, define and forget (not create)."""

    def __init__(self, vm):
        self.vm = vm

    def names(self):
        return {checkpoint.getName() for checkpoint in self.vm.listed_checkpoints()}

    def define(self, name, disk_names):
        """Tell libvirt about a checkpoint whose bitmaps were added to the images offline."""
        disks = [Disk(name=disk, node=disk, root=disk, drive=disk, qdev=disk, format="qcow2", filename=None, size=0,
                      read_only=False, bitmaps={}) for disk in disk_names]
        root = ElementTree.fromstring(checkpoint_xml(name, disks))
        ElementTree.SubElement(root, "creationTime").text = str(int(time.time()))
        call("Defining checkpoint %s" % name, self.vm.domain.checkpointCreateXML,
             ElementTree.tostring(root, encoding="unicode"), libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)

    def forget(self, name):
        checkpoint = call("Looking up checkpoint %s" % name, self.vm.domain.checkpointLookupByName, name)
        call("Forgetting checkpoint %s" % name, checkpoint.delete, libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)


def offline_images(root):
    """The images of a shut-off domain's disks, as its definition names them."""
    images = []
    for element in root.findall("./devices/disk"):
        source = element.find("source")
        if element.get("device", "disk") != "disk" or source is None:
            continue
        target = element.find("target").get("dev")
        if element.get("type") != "file" or not source.get("file"):
            raise UserError("Disk %s is a %s disk: a shut-off domain is backed up from image files only; start it "
                            "to back it up through libvirt." % (target, element.get("type")))
        driver = element.find("driver")
        images.append(dict(name=target, node=target, qdev=target, filename=source.get("file"),
                           format=driver.get("type", "raw") if driver is not None else "raw",
                           read_only=element.find("readonly") is not None, identity=None))
    return images


class LibvirtGuestAgent:
    """A domain's guest agent, through libvirt's virDomainFSFreeze and virDomainFSThaw: no monitor command, no taint.

    libvirt bounds the wait for the agent itself (virsh guest-agent-timeout).
    """

    def __init__(self, vm):
        self.vm = vm

    def record(self):
        return {}  # libvirt knows its domain's agent

    def check(self):
        """Whether the domain has an agent channel that its guest has opened, as the live XML says: no agent call."""
        vm = self.vm
        if not vm.active():
            raise FreezeUnavailable("%s is not running" % vm.description)
        live = vm.xml()
        states = [target.get("state") for target in live.findall("./devices/channel/target")
                  if target.get("name") == AGENT_CHANNEL]
        if not states:
            raise FreezeUnavailable("%s has no guest agent channel (a <channel type='unix'> whose target is virtio, "
                                    "named %s; libvirt: VIR_ERR_ARGUMENT_UNSUPPORTED)" % (vm.description, AGENT_CHANNEL))
        if "connected" not in states:
            raise FreezeUnavailable("the guest agent of %s is not connected: is qemu-guest-agent running in the guest? "
                                    "(libvirt: VIR_ERR_AGENT_UNRESPONSIVE)" % vm.description)

    def freeze(self):
        return self._agent_call("Freezing the guest's file systems", self.vm.domain.fsFreeze)

    def thaw(self):
        return self._agent_call("Thawing the guest's file systems", self.vm.domain.fsThaw)

    thaw_if_frozen = thaw  # thawing file systems that are not frozen does nothing

    def close(self):
        pass

    def _agent_call(self, what, function):
        try:
            return function()
        except libvirt.libvirtError as err:
            message = "%s of %s failed: %s: %s" % (what, self.vm.description, error_name(err), err.get_error_message())
            if is_error(err, "VIR_ERR_ARGUMENT_UNSUPPORTED") or not self.vm.domain.isActive():
                raise GuestAgentUnreachable(message) from None  # no channel, or no domain: nothing can be frozen
            if is_error(err, "VIR_ERR_AGENT_UNRESPONSIVE"):
                raise FreezeUnavailable(message) from None
            raise GuestAgentError(message) from None


def read_nvram(path):
    """{path, sha256, content (base64)} of the domain's UEFI variable store; None when it has none yet."""
    content = read_regular_file(path, "The domain's NVRAM", MAX_NVRAM, missing_ok=True)
    if content is None:
        return None
    return dict(path=path, sha256=hashlib.sha256(content).hexdigest(), content=base64.b64encode(content).decode())


def checkpoint_xml(name, disks, without=()):
    """A checkpoint with a bitmap on disks, and none on the others."""
    root = ElementTree.Element("domaincheckpoint")
    ElementTree.SubElement(root, "name").text = name
    listed = ElementTree.SubElement(root, "disks")
    for disk in disks:
        ElementTree.SubElement(listed, "disk", name=disk.name, checkpoint="bitmap")
    for disk in without:
        ElementTree.SubElement(listed, "disk", name=disk.name, checkpoint="no")
    return ElementTree.tostring(root, encoding="unicode")


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


def connect(uri):
    """A connection to libvirt at uri; its errors go in our messages, not on stderr."""
    libvirt.registerErrorHandler(lambda context, error: None, None)
    return call("Connecting to libvirt at %s" % uri, libvirt.open, uri)


def define_domain(uri, xml, force, check_mode):
    """Define a restored domain; whether it had to.

    A domain of that name must not exist, unless this restore's metadata says it defined it: from the same backup
    into the same place, it is left alone; from another, it is defined again (same UUID) only with force.
    """
    connection = connect(uri)
    try:
        name = domain_name(xml)
        try:
            existing = connection.lookupByName(name)
        except libvirt.libvirtError as err:
            if not is_error(err, "VIR_ERR_NO_DOMAIN"):
                raise LibvirtFailure("Looking up domain %s failed: %s: %s"
                                     % (name, error_name(err), err.get_error_message())) from None
            existing = None
        if existing is not None:
            made_by = restore_identity(call("Reading domain %s" % name, existing.XMLDesc,
                                            libvirt.VIR_DOMAIN_XML_INACTIVE))
            wanted = restore_identity(xml)
            if made_by == wanted:
                return False
            if made_by is None:
                raise UserError("libvirt at %s already has a domain %s that no restore defined: give the restored "
                                "domain another name (domain), or undefine the old one first." % (uri, name))
            if not force:
                raise UserError("Domain %s was defined by the restore of %s; this is the restore of %s. Set force to "
                                "define it again from this one." % (name, made_by, wanted))
            root = ElementTree.fromstring(xml)
            uuid = root.find("uuid")
            if uuid is None:
                uuid = ElementTree.SubElement(root, "uuid")
            uuid.text = existing.UUIDString()  # the same domain, defined anew
            xml = ElementTree.tostring(root, encoding="unicode")
        if not check_mode:
            call("Defining domain %s" % name, connection.defineXML, xml)
        return True
    finally:
        connection.close()
