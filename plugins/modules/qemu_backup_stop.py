#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qemu_backup_stop
short_description: End a backup started by qemu_backup_start and remove everything it created
version_added: 0.1.0
description:
  - Removes the backup's NBD exports (waiting for C(BLOCK_EXPORT_DELETED)), stops the NBD server that the
    backup started, cancels its block jobs (waiting for their events), deletes its scratch nodes, its
    temporary bitmaps, its scratch images, its socket and its state file.
  - It finds the backup's objects by their names, so it also cleans up after a start that was interrupted
    half-way and after a copy that was killed.
  - When the VM itself is gone (its QMP socket is missing or refuses connections), the backup's QEMU objects went
    with it; the stop then removes the backup's files, if its state file names this same O(qmp_socket).
  - With nothing left to stop it reports no change.
  - It reports in RV(intact) whether the point-in-time view held until the stop; stop before recording a backup as
    good, as the M(fleetbackup.qemu.backup) role does.
author:
  - fleetbackup.qemu developers
extends_documentation_fragment:
  - fleetbackup.qemu.qmp
  - fleetbackup.qemu.qmp.backup_id
options:
  discard_checkpoint:
    description:
      - Also remove the checkpoint that this backup created. Use it when the copy failed, so that the next
        incremental starts from the last checkpoint whose backup completed.
    type: bool
    default: false
seealso:
  - module: fleetbackup.qemu.qemu_backup_start
attributes:
  check_mode:
    support: full
    description: Reports what would be removed; removes nothing.
"""

EXAMPLES = r"""
- name: End the backup
  fleetbackup.qemu.qemu_backup_stop:
    qmp_socket: /run/vms/web1/qmp.sock
    backup_id: web1-nightly

- name: End a backup whose copy failed, dropping the checkpoint it opened
  fleetbackup.qemu.qemu_backup_stop:
    qmp_socket: /run/vms/web1/qmp.sock
    backup_id: web1-0002
    discard_checkpoint: true
"""

RETURN = r"""
intact:
  description:
    - Whether the point-in-time view held until the stop, that is, every block job of the backup was still running.
      When false, a job ended early (its scratch image ran out of room, say), QEMU stopped keeping the old data,
      and a copy made since may mix two points in time. Do not keep such a backup.
    - Null when there was no complete backup to stop, or when the VM was gone.
  returned: success
  type: bool
  sample: true
removed:
  description: What the stop removed (in check mode, what it would remove).
  returned: success
  type: dict
  contains:
    exports:
      description: NBD export ids.
      type: list
      elements: str
      sample: [fb-web1-nightly-0]
    jobs:
      description: Block job ids.
      type: list
      elements: str
      sample: [fb-web1-nightly-0]
    nodes:
      description: Scratch block nodes.
      type: list
      elements: str
      sample: [fb3c1f0a2b9d4e-s0]
    files:
      description: Scratch images and the NBD socket.
      type: list
      elements: str
      sample: [/var/tmp/web1-nightly.vda.scratch.qcow2, /var/tmp/web1-nightly.nbd]
    nbd_server:
      description: Whether the NBD server that the backup started was stopped.
      type: bool
      sample: true
    checkpoint:
      description: The checkpoint removed with O(discard_checkpoint), else null.
      type: str
      sample: c0002
    state_file:
      description: Whether the backup's state file was removed.
      type: bool
      sample: true
"""

from ansible_collections.fleetbackup.qemu.plugins.module_utils.backup_session import (
    backup_names,
    stop_backup,
    stop_dead_backup,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils.qmp_client import QmpUnreachable
from ansible_collections.fleetbackup.qemu.plugins.module_utils.qmp_module import (
    BACKUP_ID_ARGUMENT_SPEC,
    QmpModule,
)


def main():
    module = QmpModule(
        argument_spec=dict(BACKUP_ID_ARGUMENT_SPEC, discard_checkpoint=dict(type="bool", default=False)),
        supports_check_mode=True,
    )
    module.run(stop)


def stop(module):
    params = module.params
    names = backup_names(params)
    try:
        with module.qmp() as qmp:
            removed, intact = stop_backup(qmp, names, module.checkpoints, params["discard_checkpoint"],
                                          module.check_mode)
    except QmpUnreachable as err:
        removed = stop_dead_backup(names, params["qmp_socket"], module.checkpoints, params["discard_checkpoint"],
                                   module.check_mode)
        if removed is None:
            raise
        intact = None  # a copy that finished read a sound view; one that did not has failed on its own
        module.warn("%s The VM took the backup's QEMU objects with it; its files were removed." % err)
    return dict(changed=any(removed.values()), removed=removed, intact=intact)


if __name__ == "__main__":
    main()
