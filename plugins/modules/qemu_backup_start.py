#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qemu_backup_start
short_description: Freeze a point-in-time view of a running QEMU VM's disks and export it over NBD
version_added: 0.1.0
description:
  - Starts a pull-mode backup of a running QEMU VM over QMP. All chosen disks are frozen in one QMP
    C(transaction), so they share a single point in time, while the guest keeps running and writing.
  - Each disk's frozen view is exported read-only over NBD on a unix socket; copy it with
    M(fleetbackup.qemu.qemu_backup_copy), then end the backup with M(fleetbackup.qemu.qemu_backup_stop).
  - Overwritten blocks are kept in a qcow2 scratch image per disk in O(scratch_dir) until the stop.
  - With O(checkpoint) it adds a persistent dirty bitmap to every disk in the same instant, and with
    O(incremental) it exports only the blocks changed since an earlier checkpoint.
  - A failure at any step removes everything the start had created and names the failed step.
  - Running it again with the same O(backup_id) while that backup runs reports no change and returns
    the same result.
author:
  - fleetbackup.qemu developers
extends_documentation_fragment:
  - fleetbackup.qemu.qmp
  - fleetbackup.qemu.qmp.backup_id
options:
  disks:
    description:
      - The disks to back up, each a qdev id (C(vda)), a qdev path, a drive id or a block node name.
      - By default every writable disk that has a medium.
    type: list
    elements: str
  nbd_socket:
    description:
      - Path of the unix socket that QEMU's NBD server listens on for this backup. Made mode 0600.
      - Defaults to C(<scratch_dir>/<backup_id>.nbd).
      - QEMU runs one NBD server at a time, so one backup at a time runs per VM.
    type: path
  checkpoint:
    description:
      - Name of a new checkpoint (a persistent dirty bitmap) added to every backed-up disk at the backup's
        point in time. A later O(incremental) backup since it reads only what changed after this backup.
      - Needs qcow2 disks. It must not exist yet on any of them.
      - The checkpoint exists from the start on; if the copy fails, stop with
        O(fleetbackup.qemu.qemu_backup_stop#module:discard_checkpoint=true).
    type: str
  incremental:
    description:
      - Name of an existing checkpoint. Each disk exports only the blocks written since it, as the
        NBD meta context in the disk's RV(backup.disks[].dirty_bitmap).
      - Checkpoints keep recording, so naming an older checkpoint gives a differential backup.
    type: str
  fallback_to_full:
    description:
      - Where O(incremental) cannot be used on a disk (the checkpoint is missing, inconsistent after QEMU
        died, or the disk was resized since it), back that disk up in full and say why in RV(backup.disks[].reason).
      - Without it such a disk fails the start before anything is created.
    type: bool
    default: false
seealso:
  - module: fleetbackup.qemu.qemu_backup_copy
  - module: fleetbackup.qemu.qemu_backup_stop
attributes:
  check_mode:
    support: full
    description: Resolves the disks and checkpoints and returns the planned result; creates nothing.
"""

EXAMPLES = r"""
- name: Freeze every writable disk of the VM
  fleetbackup.qemu.qemu_backup_start:
    qmp_socket: /run/vms/web1/qmp.sock
    backup_id: web1-nightly
  register: started

- name: Copy each disk
  fleetbackup.qemu.qemu_backup_copy:
    src: "{{ item.url }}"
    dest: "/backup/web1/{{ item.disk }}.qcow2"
  loop: "{{ started.backup.disks }}"

- name: Start a full backup that opens a checkpoint for the next incremental
  fleetbackup.qemu.qemu_backup_start:
    qmp_socket: /run/vms/web1/qmp.sock
    backup_id: web1-0001
    checkpoint: c0001
    disks: [vda, vdb]
    scratch_dir: /srv/scratch

- name: Incremental since c0001, opening c0002
  fleetbackup.qemu.qemu_backup_start:
    qmp_socket: /run/vms/web1/qmp.sock
    backup_id: web1-0002
    incremental: c0001
    checkpoint: c0002
    fallback_to_full: true
"""

RETURN = r"""
backup:
  description: The running backup.
  returned: success
  type: dict
  contains:
    id:
      description: The backup id.
      type: str
      sample: web1-nightly
    nbd_socket:
      description: The NBD server's unix socket.
      type: str
      sample: /var/tmp/web1-nightly.nbd
    checkpoint:
      description: The checkpoint created at this backup's point in time, if any.
      type: str
      sample: c0002
    incremental:
      description: The checkpoint this backup is incremental to, if any.
      type: str
      sample: c0001
    disks:
      description: One entry per disk.
      type: list
      elements: dict
      contains:
        disk:
          description: The disk's name (qdev id, else drive id, else node name).
          type: str
          sample: vda
        node:
          description: The disk's block node.
          type: str
          sample: disk0
        export:
          description: The NBD export name.
          type: str
          sample: vda
        url:
          description: NBD URL of the frozen view; the O(fleetbackup.qemu.qemu_backup_copy#module:src) to copy.
          type: str
          sample: nbd+unix:///vda?socket=/var/tmp/web1-nightly.nbd
        size:
          description: Virtual size in bytes.
          type: int
          sample: 10737418240
        mode:
          description: C(full) or C(incremental).
          type: str
          sample: full
        dirty_bitmap:
          description: For an incremental disk, the NBD meta context listing the changed blocks; else null.
          type: str
          sample: "qemu:dirty-bitmap:fb-web1-0002"
        dirty_bytes:
          description: For an incremental disk, the bytes changed since the checkpoint; else null.
          type: int
          sample: 1048576
        reason:
          description: Why a disk asked to be incremental is backed up in full, with O(fallback_to_full).
          type: str
          sample: checkpoint 'c0001' on disk vda is inconsistent (QEMU stopped uncleanly); it can only be removed
"""

import os

from ansible_collections.fleetbackup.qemu.plugins.module_utils.backup_session import (
    backup_names,
    check_scratch_dir,
    plan_backup,
    running_backup,
    start_backup,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils.qmp_module import (
    BACKUP_ID_ARGUMENT_SPEC,
    QmpModule,
)

# sun_path holds 108 bytes with its terminating NUL.
MAX_SOCKET_PATH = 107


def main():
    module = QmpModule(
        argument_spec=dict(
            BACKUP_ID_ARGUMENT_SPEC,
            disks=dict(type="list", elements="str"),
            nbd_socket=dict(type="path"),
            checkpoint=dict(type="str"),
            incremental=dict(type="str"),
            fallback_to_full=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    module.run(start)


def start(module):
    params = module.params
    names = backup_names(params)
    check_scratch_dir(params["scratch_dir"])
    nbd_socket = params["nbd_socket"] or names.default_socket
    if len(nbd_socket.encode()) > MAX_SOCKET_PATH:
        raise UserError("nbd_socket %s is longer than the %d bytes a unix socket path may have: choose a "
                        "shorter nbd_socket or scratch_dir." % (nbd_socket, MAX_SOCKET_PATH))
    if not os.path.isdir(os.path.dirname(nbd_socket)):
        raise UserError("The directory of nbd_socket %s does not exist: create it or choose another path."
                        % nbd_socket)
    with module.qmp() as qmp:
        running = running_backup(qmp, names)
        if running is not None:
            return dict(changed=False, backup=running.data["result"])
        plan = plan_backup(qmp, names, params["disks"], nbd_socket, module.checkpoints, params["checkpoint"],
                           params["incremental"], params["fallback_to_full"])
        return dict(changed=True, backup=start_backup(qmp, names, plan, module.check_mode))


if __name__ == "__main__":
    main()
