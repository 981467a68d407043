# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""A domain that libvirt manages: the libvirt implementation of VmConnection, through libvirt's own APIs.

Checkpoints go through libvirt's checkpoint API, backups through its pull-backup job (_views.libvirt_pull). Nothing
here talks to the domain's monitor, so no domain is ever tainted.
"""

from __future__ import annotations

import os
from xml.etree import ElementTree

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.qemu_img import remove_bitmap
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.connection import (
    CheckpointGone,
    LIBVIRT_PULL,
    LIBVIRT_PULL_VIEW,
    OFFLINE,
    OFFLINE_EXPORT_VIEW,
    VmConnection,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.disks import Disk
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.guest_freeze import thaw_abandoned_freeze
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.libvirt.agent import LibvirtGuestAgent
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.libvirt.checkpoints import checkpoint_xml
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.libvirt.calls import (
    LibvirtErrors,
    LibvirtFailure,
    call,
    connect,
    libvirt,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.state import VmState


def libvirt_vm_key(uuid):
    """The private-state key of a libvirt domain: its UUID, which outlives renames and redefinitions (short: sockets
    live under it)."""
    return "lv-" + uuid.replace("-", "")


class LibvirtVm(VmConnection):
    """A running domain; connect() before use (open_libvirt_vm does, and hands a shut-off one to ShutOffDomain)."""

    keeps_checkpoint_definitions = True

    # An offline backup of its images may still run when the domain started during it.
    views = {LIBVIRT_PULL: LIBVIRT_PULL_VIEW, OFFLINE: OFFLINE_EXPORT_VIEW}
    new_view = LIBVIRT_PULL

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

    @property
    def libvirt(self):
        """The domain's own connection, which its views use (a ShutOffDomain has one too)."""
        return self

    def connect(self):
        self.connection = connect(self.uri)
        self.domain = self._lookup()
        uuid = self.domain.UUIDString()
        self.description = "domain %s (%s) on %s" % (self.domain.name(), uuid, self.uri)
        self.state = VmState(self.state_dir, libvirt_vm_key(uuid), self.description, self.read_only)
        self.run_dir = os.path.join(self.qemu_dir, libvirt_vm_key(uuid))
        return self

    def close(self):
        if self.connection is not None:
            self.connection.close()

    def _lookup(self):
        for lookup in (self.connection.lookupByUUIDString, self.connection.lookupByName):
            try:
                return call("Looking up domain %s" % self.domain_name, lookup, self.domain_name)
            except LibvirtFailure as failure:
                if failure.code not in ("VIR_ERR_NO_DOMAIN", "VIR_ERR_INVALID_ARG"):
                    raise
        raise UserError("libvirt at %s has no domain %s (by name or UUID): check domain and libvirt_uri."
                        % (self.uri, self.domain_name))

    @LibvirtErrors.handles("Asking whether the domain runs")
    def active(self):
        return bool(self.domain.isActive())

    def job_operation(self):
        """The operation of the domain's current job (VIR_DOMAIN_JOB_OPERATION_*), 0 without one."""
        if not self.active():
            return 0
        return self._job_stats().get("operation", 0)

    @LibvirtErrors.handles("Reading the domain's job")
    def _job_stats(self):
        return self.domain.jobStats()

    def check_running(self):
        if not self.active():
            raise UserError("%s is not running: libvirt backs up and checkpoints only running domains. Start it."
                            % self.description)

    def definition(self):
        """The domain's persistent definition, as an element tree."""
        return self.xml(libvirt.VIR_DOMAIN_XML_INACTIVE)

    def xml(self, flags=0):
        return ElementTree.fromstring(self._xml_text(flags))

    @LibvirtErrors.handles("Reading the domain's XML")
    def _xml_text(self, flags):
        return self.domain.XMLDesc(flags)

    def undo_abandoned(self):
        # libvirt pauses no vCPU for us, and what a dead backup leaves, stop removes: only a freeze is undone here.
        message = thaw_abandoned_freeze(self.state, lambda _agent: LibvirtGuestAgent(self))
        return [message] if message else []

    def guest_agent(self, request):
        return LibvirtGuestAgent(self)

    # ---- disks and checkpoints

    def disks(self):
        self.check_running()
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

    @LibvirtErrors.handles("Listing checkpoints")
    def listed_checkpoints(self):
        return self.domain.listAllCheckpoints(0)

    def _redefine(self, xml, name):
        """Hand libvirt a checkpoint's XML again, checked against the bitmaps in the images.

        False when a bitmap is missing or inconsistent (libvirt's VIR_ERR_CHECKPOINT_INCONSISTENT).
        """
        try:
            call("Redefining checkpoint %s" % name, self.domain.checkpointCreateXML, xml,
                 libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE | libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE)
            return True
        except LibvirtFailure as failure:
            if failure.code == "VIR_ERR_CHECKPOINT_INCONSISTENT":
                return False
            raise

    def restore_checkpoint(self, name, definition, check_mode):
        """Give libvirt back a checkpoint whose metadata it lost (libvirtd reinstalled, the domain undefined and
        defined again) from the XML a backup kept.

        The bitmaps must still be in the images. A parent that libvirt no longer knows (an older checkpoint
        deleted since) is left out: the parent only orders checkpoints, and the bitmap holds every change.
        """
        self.check_running()
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
                raise CheckpointGone("Checkpoint %s cannot be given back to libvirt: a bitmap of it is missing or "
                                     "inconsistent in the images of %s (libvirt: VIR_ERR_CHECKPOINT_INCONSISTENT). "
                                     "The next backup must be full." % (name, self.description))
        return True, disks

    def set_bitmaps(self, name, disks, present):
        self.check_running()
        if present:
            chosen = {disk.name for disk in disks}
            call("Creating checkpoint %s" % name, self.domain.checkpointCreateXML, checkpoint_xml(
                name, disks, [disk for disk in self.disks() if disk.name not in chosen]), 0)
            return
        holding = {disk.name for disk in self.disks() if name in disk.bitmaps}
        if {disk.name for disk in disks} != holding:
            raise UserError("libvirt removes checkpoint %s from all its disks at once (%s): leave out disks, or "
                            "name them all." % (name, ", ".join(sorted(holding))))
        self.delete_checkpoint(name)

    def delete_checkpoint(self, name, images=()):
        """Delete a checkpoint; libvirt merges its bitmap into its parent's, so the parent still sees every change.

        libvirt deletes checkpoints of running domains only: of a stopped one, the bitmaps are removed from its
        images (those of our record) offline, and libvirt forgets the metadata.
        """
        checkpoint = call("Looking up checkpoint %s" % name, self.domain.checkpointLookupByName, name)
        if self.active():
            try:
                call("Deleting checkpoint %s" % name, checkpoint.delete, 0)
                return
            except LibvirtFailure:
                if any(size is not None for size in self._checkpoint_sizes().get(name, {}).values()):
                    raise
            # Its bitmap is gone (a kill -9 of QEMU, or another tool): only the metadata is left to delete.
            call("Forgetting checkpoint %s" % name, checkpoint.delete,
                 libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            return
        for image in images:
            remove_bitmap(image, name)
        call("Deleting checkpoint %s" % name, checkpoint.delete,
             libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
