#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qemu_backup_info
short_description: Describe a running QEMU VM's disks, checkpoints and running backups
version_added: 0.1.0
description:
  - For each disk with a medium it returns the node, image file, format and virtual size, and its
    checkpoints with their dirty byte counts. It also lists the backups running in the VM.
  - It changes nothing, except to resume a VM whose vCPUs a killed fleetbackup run left paused, or to thaw a guest
    whose file systems such a run left frozen (then it reports a change and warns).
  - Use it to decide between a full and an incremental backup, or to estimate how much an incremental will read.
author:
  - fleetbackup.qemu developers (@fleetbackup)
extends_documentation_fragment:
  - fleetbackup.qemu.vm
attributes:
  check_mode:
    support: full
    description: Reports without changing anything; a VM left paused or frozen by a killed run is only reported.
"""

EXAMPLES = r"""
- name: Look at the VM
  fleetbackup.qemu.qemu_backup_info:
    qmp_socket: /run/vms/web1/qmp.sock
  register: info

- name: Bytes the next incremental since c0001 will read
  ansible.builtin.debug:
    msg: "{{ info.disks | map(attribute='checkpoints') | flatten | selectattr('name', 'eq', 'c0001')
             | map(attribute='dirty_bytes') | sum }}"
"""

RETURN = r"""
disks:
  description: The disks that have a medium.
  returned: success
  type: list
  elements: dict
  contains:
    disk:
      description: The disk's name (qdev id, else drive id, else node name).
      type: str
      sample: vda
    node:
      description: Its image node (below any filter a running backup added).
      type: str
      sample: disk0
    file:
      description: Its image file.
      type: str
      sample: /var/lib/vms/web1/system.qcow2
    format:
      description: Its image format.
      type: str
      sample: qcow2
    size:
      description: Virtual size in bytes.
      type: int
      sample: 10737418240
    read_only:
      description: Whether the disk is read-only.
      type: bool
      sample: false
    checkpoints:
      description: Checkpoints on the disk, by name.
      type: list
      elements: dict
      contains:
        name:
          description: Checkpoint name.
          type: str
        dirty_bytes:
          description: Bytes written since the checkpoint.
          type: int
        granularity:
          description: Bitmap granularity in bytes.
          type: int
        recording:
          description: Whether the bitmap records writes.
          type: bool
        persistent:
          description: Whether QEMU stores it in the qcow2 image.
          type: bool
        inconsistent:
          description: Whether QEMU found it damaged after an unclean stop; such a checkpoint can only be removed.
          type: bool
        busy:
          description: Whether a backup is using it.
          type: bool
        size_at_checkpoint:
          description: The disk's size when the checkpoint was made, if the registry knows it.
          type: int
        created:
          description: When the checkpoint was made, in seconds since the epoch, if the registry knows it.
          type: int
        usable:
          description: Whether an incremental backup since this checkpoint can be taken.
          type: bool
backups:
  description:
    - The backups running on the VM, by backup_id, with whether their start completed and when it began
      (null when fleetbackup's state does not know the backup).
  returned: success
  type: dict
  sample: {"web1-nightly": {"complete": true, "started": 1796000000}}
"""

from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.backups import VmBackups
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.checkpoints import describe_disks
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.module import VmModule


def main():
    module = VmModule(argument_spec={}, supports_check_mode=True)
    module.run(describe)


def describe(module):
    with module.vm() as vm:
        resumed = vm.recover_now()
        disks = describe_disks(vm.disks(), module.checkpoints)
        backups = VmBackups(vm).describe()
    module.warn_all(vm.notes)
    return dict(changed=resumed, disks=disks, backups=backups)


if __name__ == "__main__":
    main()
