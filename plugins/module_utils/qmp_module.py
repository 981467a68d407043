# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The base of the modules that talk QMP: one argument spec (doc fragment fleetbackup.qemu.qmp) and a client."""

from __future__ import annotations

from contextlib import contextmanager

from ansible.module_utils.basic import missing_required_lib

from ansible_collections.fleetbackup.qemu.plugins.module_utils.checkpoints import CheckpointRegistry
from ansible_collections.fleetbackup.qemu.plugins.module_utils.module_base import FleetbackupModule
from ansible_collections.fleetbackup.qemu.plugins.module_utils.qmp_client import (
    DEFAULT_TIMEOUT,
    HAS_QEMU_QMP,
    QEMU_QMP_IMPORT_ERROR,
    QmpClient,
)

QMP_ARGUMENT_SPEC = dict(
    qmp_socket=dict(type="path", required=True),
    qmp_timeout=dict(type="float", default=DEFAULT_TIMEOUT),
    checkpoint_dir=dict(type="path", default="/var/lib/fleetbackup/checkpoints"),
)

# With doc fragment fleetbackup.qemu.qmp.backup_id.
BACKUP_ID_ARGUMENT_SPEC = dict(
    backup_id=dict(type="str", required=True),
    scratch_dir=dict(type="path", default="/var/tmp"),
)


class QmpModule(FleetbackupModule):
    """A module with the shared QMP options, a QMP client and the checkpoint registry."""

    def __init__(self, argument_spec, **kwargs):
        super().__init__(argument_spec=dict(QMP_ARGUMENT_SPEC, **argument_spec), **kwargs)
        if not HAS_QEMU_QMP:
            self.fail_json(msg=missing_required_lib("qemu.qmp (pip install qemu.qmp)"),
                           exception=str(QEMU_QMP_IMPORT_ERROR))

    @property
    def checkpoints(self):
        """The registry of what QEMU does not record about checkpoints."""
        return CheckpointRegistry(self.params["checkpoint_dir"])

    @contextmanager
    def qmp(self):
        """A connected QMP client for this module's qmp_socket."""
        with QmpClient(self.params["qmp_socket"], self.params["qmp_timeout"]) as client:
            yield client
