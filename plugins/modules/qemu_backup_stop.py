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
  - Removes the backup's NBD exports (waiting for C(BLOCK_EXPORT_DELETED)) and the NBD server that the backup
    started, which closes its listener (unix socket or TCP), and the TLS credentials and client filter objects of a
    TCP backup; puts every disk back on its own node, deletes the filters, the snapshot and scratch nodes, the
    temporary bitmaps and the scratch images, the socket and the backup's state.
  - It needs only the VM and the O(backup_id). It finds what the backup created in QEMU by its names and in
    fleetbackup's private state, whatever O(fleetbackup.qemu.qemu_backup_start#module:scratch_dir) or
    O(fleetbackup.qemu.qemu_backup_start#module:nbd_socket) the start used; so it also cleans up after a start
    that was interrupted half-way and after a copy that was killed.
  - When the VM itself is gone (its QMP socket is missing or refuses connections), the backup's QEMU objects and
    scratch images went with it; the stop then removes the backup's socket and state.
  - With O(domain), it ends libvirt's backup job (C(abortJob)), waits until libvirt removed the socket, and
    removes the scratch images. The checkpoint of a domain that stopped meanwhile is removed from its images
    offline. A domain that is paused on an I/O error is reported.
  - Like the start and M(fleetbackup.qemu.qemu_backup_info), it first resumes a VM whose vCPUs a killed fleetbackup
    run left paused, and thaws a guest whose file systems such a run left frozen, and warns.
  - With nothing left to stop it reports no change.
  - It reports in RV(intact) whether the point-in-time view held until the stop; stop before recording a backup as
    good, as the C(fleetbackup.qemu.qemu_backup) role does.
author:
  - fleetbackup.qemu developers (@fleetbackup)
extends_documentation_fragment:
  - fleetbackup.qemu.vm
  - fleetbackup.qemu.vm.backup_id
options:
  discard_checkpoint:
    description:
      - Also remove the checkpoint that this backup created. Use it when the copy failed, so that the next
        incremental starts from the last checkpoint whose backup completed.
    type: bool
    default: false
requirements:
  - libnbd's Python bindings (Debian package python3-libnbd), to probe the point-in-time view
seealso:
  - module: fleetbackup.qemu.qemu_backup_start
attributes:
  check_mode:
    support: full
    description: Reports what would be removed and whether the view held; removes nothing.
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
    - Whether the point-in-time view held until the stop, that is, every snapshot of the backup could still be read.
      When false, the guest overwrote data that could not be kept (the scratch space ran out, or a copy-before-write
      took longer than O(fleetbackup.qemu.qemu_backup_start#module:cbw_timeout)); the guest's writes all landed,
      and any copy that read the broken view has failed. Do not keep such a backup.
    - Null when there was no complete backup to stop, or when the VM was gone.
    - For a backup served over TCP (O(fleetbackup.qemu.qemu_backup_start#module:nbd_tcp)), where QEMU admits only the
      backup host's certificate, the stop first ends the TCP server and then reads the probes on a unix socket of its
      own; so in check mode it is null there.
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
    nodes:
      description: Snapshot, filter and scratch block nodes.
      type: list
      elements: str
      sample: [fb3c1f0a2b9d4e-a0, fb3c1f0a2b9d4e-f0, fb3c1f0a2b9d4e-s0]
    devices:
      description: The devices of a QMP VM put back on their own nodes from the backup's filters; empty otherwise.
      type: list
      elements: str
      sample: [/machine/peripheral/vda/virtio-backend]
    bitmaps:
      description: How many frozen copies of a checkpoint (those an incremental exported) were removed.
      type: int
      sample: 1
    scratch_images:
      description: How many of a QMP VM's scratch images QEMU let go of; with O(domain) they are in RV(removed.files).
      type: int
      sample: 1
    files:
      description: The NBD socket, and with O(domain) the scratch images.
      type: list
      elements: str
      sample: [/var/lib/fleetbackup/vms/qmp-3c1f0a2b9d4e/nbd.sock]
    job:
      description: With O(domain), whether libvirt's backup job was ended; false for a QMP VM.
      type: bool
      sample: true
    nbd_server:
      description: Whether the NBD server that the backup started was stopped.
      type: bool
      sample: true
    objects:
      description: The QEMU objects of a TCP backup, its x509 credentials and its client filter (tls-authz).
      type: list
      elements: str
      sample: [fb-web1-nightly-authz, fb-web1-nightly-tls]
    checkpoint:
      description: The checkpoint removed with O(discard_checkpoint), else null.
      type: str
      sample: c0002
    state_file:
      description: Whether the backup's state was removed.
      type: bool
      sample: true
"""

from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.backups import VmBackups
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.options import BACKUP_ID_ARGUMENT_SPEC
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.module import VmModule


def main():
    module = VmModule(
        argument_spec=dict(BACKUP_ID_ARGUMENT_SPEC, discard_checkpoint=dict(type="bool", default=False)),
        needs_nbd=True,
        supports_check_mode=True,
    )
    module.run(stop)


def stop(module):
    params = module.params
    with module.vm(ending=params["backup_id"]) as vm:
        changed, removed, intact = VmBackups(vm).stop(params["backup_id"], params["discard_checkpoint"],
                                                      module.check_mode)
    module.warn_all(vm.notes)
    return dict(changed=changed, removed=removed.result(), intact=intact)


if __name__ == "__main__":
    main()
