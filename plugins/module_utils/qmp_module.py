# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The base of every module: shared options, library checks and uniform errors."""

from __future__ import annotations

from contextlib import contextmanager

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.fleetbackup.qemu.plugins.module_utils.checkpoints import CheckpointRegistry
from ansible_collections.fleetbackup.qemu.plugins.module_utils.errors import FleetbackupError
from ansible_collections.fleetbackup.qemu.plugins.module_utils.nbd_copy import HAS_LIBNBD, LIBNBD_IMPORT_ERROR
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

BACKUP_ID_ARGUMENT_SPEC = dict(
    backup_id=dict(type="str", required=True),
    scratch_dir=dict(type="path", default="/var/tmp"),
)

class FleetbackupModule(AnsibleModule):
    """An AnsibleModule that checks its libraries and turns our errors into fail_json."""

    def __init__(self, argument_spec, needs_qmp=False, needs_nbd=False, **kwargs):
        spec = dict(QMP_ARGUMENT_SPEC) if needs_qmp else {}
        spec.update(argument_spec)
        super().__init__(argument_spec=spec, **kwargs)
        if needs_qmp and not HAS_QEMU_QMP:
            self.fail_json(msg=missing_required_lib("qemu.qmp (pip install qemu.qmp)"),
                           exception=str(QEMU_QMP_IMPORT_ERROR))
        if needs_nbd and not HAS_LIBNBD:
            self.fail_json(msg=missing_required_lib(
                "libnbd's Python bindings (Debian: apt install python3-libnbd; the pip package 'nbd' "
                "is unrelated), with an interpreter that sees them"),
                exception=str(LIBNBD_IMPORT_ERROR))

    @property
    def checkpoints(self):
        """The registry of what QEMU does not record about checkpoints."""
        return CheckpointRegistry(self.params["checkpoint_dir"])

    @contextmanager
    def qmp(self):
        """A connected QMP client for this module's qmp_socket."""
        with QmpClient(self.params["qmp_socket"], self.params["qmp_timeout"]) as client:
            yield client

    def run(self, main):
        """Call main(self) and exit with its result; our errors become fail_json."""
        try:
            result = main(self)
        except FleetbackupError as err:
            self.fail_json(msg=str(err))
        self.exit_json(**result)
