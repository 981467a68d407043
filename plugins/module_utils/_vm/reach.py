# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The one place that decides which connection reaches a VM: its running QEMU or libvirt domain, else its images."""

from __future__ import annotations

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import utc
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.libvirt.shut_off import ShutOffDomain
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.libvirt.vm import LibvirtVm
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.offline.seen_disks import recorded_disks
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.offline.vm import OfflineVm
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.client import QmpUnreachable
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.vm import QmpVm


class UnseenQmpVm(OfflineVm):
    """A QMP VM that nothing serves, whose disks fleetbackup never saw: only a backup of it can still be ended."""

    def __init__(self, vm, unreachable):
        super().__init__(vm.state, vm.registry, vm.timeout, vm.description, images=[])
        self.notes.append(str(unreachable))

    def remove_checkpoint(self, name, filenames):
        """Its images were never seen, so none is touched: the checkpoint stays in them."""


def open_qmp_vm(qmp_socket, timeout, state_dir, registry, read_only=False, ending=None):
    """The VM behind a QMP socket: its running QEMU; when none serves it, its images as fleetbackup last saw them
    running; when it never saw them, only to end backup `ending` of it, if that is the one it recorded."""
    vm = QmpVm(qmp_socket, timeout, state_dir, registry, read_only)
    try:
        return vm.connect()
    except QmpUnreachable as unreachable:
        vm.close()
        recorded = recorded_disks(vm.state)
        if recorded is not None:
            images, seen = recorded
            return OfflineVm(vm.state, registry, timeout, "the stopped VM of QMP socket %s (its disks as fleetbackup "
                             "saw them running at %s)" % (qmp_socket, utc(seen)), images)
        record = vm.state.backup()
        if ending is None or record is None or record["backup_id"] != ending:
            raise
        return UnseenQmpVm(vm, unreachable)


def open_libvirt_vm(uri, domain, timeout, state_dir, qemu_dir, registry, read_only=False):
    """A libvirt domain: running, or shut off and reached on the images its definition names."""
    vm = LibvirtVm(uri, domain, timeout, state_dir, qemu_dir, registry, read_only)
    try:
        vm.connect()
        return vm if vm.active() else ShutOffDomain(vm)
    except BaseException:
        vm.close()
        raise
