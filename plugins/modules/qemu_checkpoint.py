#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qemu_checkpoint
short_description: Add or remove a checkpoint (persistent dirty bitmap) on the disks of a running QEMU VM
version_added: 0.1.0
description:
  - A checkpoint is a persistent dirty bitmap with the same name on each disk. It records every write from its
    creation on, survives clean QEMU restarts, and lets M(fleetbackup.qemu.qemu_backup_start) export only what
    changed since it (O(fleetbackup.qemu.qemu_backup_start#module:incremental)).
  - Checkpoints are normally created by M(fleetbackup.qemu.qemu_backup_start) in the same instant as a backup.
    This module adds one outside a backup, and removes old or inconsistent ones (an inconsistent checkpoint,
    left by a QEMU that died, can only be removed).
  - All disks are changed in one QMP transaction, or one libvirt checkpoint call.
  - With O(domain), checkpoints are libvirt's, and libvirt removes a checkpoint from all its disks at once.
    O(definition) gives libvirt back a checkpoint whose metadata it lost (libvirtd reinstalled, the domain undefined
    and defined again) while its bitmaps are still in the images, so that a backup chain goes on; the
    C(fleetbackup.qemu.qemu_backup) role does so from the definition it keeps in the repository.
author:
  - fleetbackup.qemu developers (@fleetbackup)
extends_documentation_fragment:
  - fleetbackup.qemu.vm
options:
  name:
    description: Name of the checkpoint.
    type: str
    required: true
  disks:
    description:
      - Disks to act on, each a qdev id, qdev path, drive id or node name.
      - Default with O(state=present), every writable disk; with O(state=absent), every disk that has the checkpoint.
    type: list
    elements: str
  state:
    description: Whether the checkpoint should exist on the disks.
    type: str
    choices: [present, absent]
    default: present
  definition:
    description:
      - With O(domain) and O(state=present), the checkpoint's libvirt XML as a backup recorded it
        (RV(fleetbackup.qemu.qemu_backup_start#module:backup.libvirt.checkpoint_xml)). If libvirt does not know the
        checkpoint, it is defined again from it, after libvirt checked that its bitmaps are in the images and sound;
        if they are not, the module fails and the next backup must be full.
      - Its name must be O(name). O(disks) does not apply, since the definition lists them.
    type: str
attributes:
  check_mode:
    support: full
    description: Reports the disks that would change.
"""

EXAMPLES = r"""
- name: Open a checkpoint on every writable disk
  fleetbackup.qemu.qemu_checkpoint:
    qmp_socket: /run/vms/web1/qmp.sock
    name: before-upgrade

- name: Give libvirt back a checkpoint it lost, from the definition a backup recorded
  fleetbackup.qemu.qemu_checkpoint:
    domain: web1
    name: "{{ newest.checkpoint }}"
    definition: "{{ newest.definition.checkpoint_xml }}"

- name: Drop a checkpoint whose chain was pruned
  fleetbackup.qemu.qemu_checkpoint:
    qmp_socket: /run/vms/web1/qmp.sock
    name: c0001
    state: absent
"""

RETURN = r"""
disks:
  description: The disks whose checkpoint was added, removed or defined again (in check mode, would be).
  returned: success
  type: list
  elements: str
  sample: [vda, vdb]
"""

from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.plan import check_checkpoint_name
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.disks import select_disks
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.module import VmModule


def main():
    module = VmModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            disks=dict(type="list", elements="str"),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            definition=dict(type="str"),
        ),
        mutually_exclusive=[("definition", "disks")],
        supports_check_mode=True,
    )
    module.run(ensure_checkpoint)


def ensure_checkpoint(module):
    name = check_checkpoint_name(module.params["name"], "checkpoint name")
    present = module.params["state"] == "present"
    if module.params["definition"] is not None:
        if not present:
            raise UserError("definition gives a checkpoint back to libvirt: use it with state present.")
        with module.vm() as vm:
            changed, disks = vm.restore_checkpoint(name, module.params["definition"], module.check_mode)
        return dict(changed=changed, disks=disks)
    with module.vm() as vm:
        disks = vm.disks()
        if present or module.params["disks"]:
            try:
                disks = select_disks(disks, module.params["disks"])
            except LookupError as err:
                raise UserError(str(err)) from None
        if present:
            for disk in disks:
                if disk.format != "qcow2":
                    raise UserError("Cannot add checkpoint '%s' to disk %s: it is %s, and persistent dirty bitmaps "
                                    "need qcow2. Name only qcow2 disks in disks." % (name, disk.name, disk.format))
        todo = [disk for disk in disks if (name in disk.bitmaps) != present]
        if todo and not module.check_mode:
            vm.change_checkpoint(name, todo, present)
    return dict(changed=bool(todo), disks=[disk.name for disk in todo])


if __name__ == "__main__":
    main()
