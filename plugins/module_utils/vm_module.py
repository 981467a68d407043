# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The base of the modules that talk to a VM: one argument spec (doc fragment fleetbackup.qemu.vm) and a connection."""

from __future__ import annotations

from ansible.module_utils.basic import missing_required_lib

from ansible_collections.fleetbackup.qemu.plugins.module_utils.checkpoints import CheckpointRegistry
from ansible_collections.fleetbackup.qemu.plugins.module_utils.module_base import FleetbackupModule
from ansible_collections.fleetbackup.qemu.plugins.module_utils.private_state import DEFAULT_STATE_DIR
from ansible_collections.fleetbackup.qemu.plugins.module_utils.qmp_client import (
    DEFAULT_TIMEOUT,
    HAS_QEMU_QMP,
    QEMU_QMP_IMPORT_ERROR,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils.qmp_vm import QmpVm
from ansible_collections.fleetbackup.qemu.plugins.module_utils.vm_state import registry_dir

VM_ARGUMENT_SPEC = dict(
    qmp_socket=dict(type="path", required=True),
    qmp_timeout=dict(type="float", default=DEFAULT_TIMEOUT),
    state_dir=dict(type="path", default=DEFAULT_STATE_DIR),
)

# With doc fragment fleetbackup.qemu.vm.backup_id.
BACKUP_ID_ARGUMENT_SPEC = dict(backup_id=dict(type="str", required=True))


class VmModule(FleetbackupModule):
    """A module with the shared VM options, a connection to the VM and the checkpoint registry."""

    def __init__(self, argument_spec, **kwargs):
        super().__init__(argument_spec=dict(VM_ARGUMENT_SPEC, **argument_spec), **kwargs)
        if not HAS_QEMU_QMP:
            self.fail_json(msg=missing_required_lib("qemu.qmp (pip install qemu.qmp)"),
                           exception=str(QEMU_QMP_IMPORT_ERROR))

    @property
    def checkpoints(self):
        """The registry of what QEMU does not record about checkpoints."""
        return CheckpointRegistry(registry_dir(self.params["state_dir"]))

    def vm(self):
        """The VM's connection, to use in a with block."""
        return QmpVm(self.params["qmp_socket"], self.params["qmp_timeout"], self.params["state_dir"], self.checkpoints,
                     read_only=self.check_mode)
