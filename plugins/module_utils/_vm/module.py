# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The base of the modules that talk to a VM: the VM options (doc fragment fleetbackup.qemu.vm) and a connection.

A VM is reached either over a QMP socket of its own (qmp_socket) or through libvirt (domain, libvirt_uri); the
modules get a VmConnection and never look at which.
"""

from __future__ import annotations

from ansible.module_utils.basic import missing_required_lib

from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.checkpoints import CheckpointRegistry
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.libvirt.calls import (
    HAS_LIBVIRT,
    LIBVIRT_IMPORT_ERROR,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.module_base import FleetbackupModule
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.options import VM_ARGUMENT_SPEC
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.client import HAS_QEMU_QMP, QEMU_QMP_IMPORT_ERROR
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.reach import open_libvirt_vm, open_qmp_vm
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.state import registry_dir

VM_CONNECTIONS = ("qmp_socket", "domain")


class VmModule(FleetbackupModule):
    """A module with the shared VM options, a connection to the VM and the checkpoint registry."""

    def __init__(self, argument_spec, mutually_exclusive=(), vm_required=True, **kwargs):
        super().__init__(argument_spec=dict(VM_ARGUMENT_SPEC, **argument_spec),
                         mutually_exclusive=[VM_CONNECTIONS] + list(mutually_exclusive),
                         required_one_of=[VM_CONNECTIONS] if vm_required else [], **kwargs)
        if vm_required:  # else checked when the VM is reached: the steps on a repository's host never reach it
            self.check_vm_libraries()

    def check_vm_libraries(self):
        """fail_json when the Python lacks the library that reaches this VM."""
        if self.params["domain"] is not None and not HAS_LIBVIRT:
            self.fail_json(msg=missing_required_lib(
                "libvirt's Python bindings (Debian: apt install python3-libvirt; the interpreter must see Debian's "
                "packages, as a venv made with --system-site-packages does)"), exception=str(LIBVIRT_IMPORT_ERROR))
        if self.params["qmp_socket"] is not None and not HAS_QEMU_QMP:
            self.fail_json(msg=missing_required_lib("qemu.qmp (pip install qemu.qmp)"),
                           exception=str(QEMU_QMP_IMPORT_ERROR))

    @property
    def checkpoints(self):
        """The registry of what QEMU does not record about checkpoints."""
        return CheckpointRegistry(registry_dir(self.params["state_dir"]))

    @property
    def names_vm(self):
        return any(self.params[option] is not None for option in VM_CONNECTIONS)

    @property
    def uses_libvirt(self):
        return self.params["domain"] is not None

    def vm(self, ending=None):
        """The VM's connection, to use in a with block; ending: the id of a backup to end even on a QMP VM that is
        gone and was never seen."""
        params = self.params
        self.check_vm_libraries()
        if self.uses_libvirt:
            return open_libvirt_vm(params["libvirt_uri"], params["domain"], params["timeout"], params["state_dir"],
                                   params["qemu_dir"], self.checkpoints, read_only=self.check_mode)
        return open_qmp_vm(params["qmp_socket"], params["timeout"], params["state_dir"], self.checkpoints,
                           read_only=self.check_mode, ending=ending)
