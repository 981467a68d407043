#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qemu_backup_restore
short_description: Restore a VM's disks from its backup repository into standalone images
version_added: 0.1.0
description:
  - Flattens each disk's backup chain, as of a recorded backup (the newest by default), into a standalone qcow2 or
    raw image C(<dest>/<disk>.<format>), ready to attach to a VM.
  - Each result is written under a temporary name, verified (C(qemu-img check) for qcow2, and C(qemu-img compare)
    against the chain's top), and only then renamed into place.
  - An existing image with the same content is left alone and reported unchanged. One with other content is
    replaced only with O(force).
  - It reads the repository only; it needs no running QEMU. Every file name read from the manifest must be a
    plain name inside the VM's directory.
  - The temporary image is created with mode 0600 from the start and never through a symlink.
author:
  - fleetbackup.qemu developers (@fleetbackup)
extends_documentation_fragment:
  - fleetbackup.qemu.repository
options:
  vm:
    description: The VM's name, its subdirectory in the repository, holding C(manifest.json).
    type: str
    required: true
  backup:
    description: Name of the backup to restore, as in the manifest; the newest complete backup by default.
    type: str
  dest:
    description: Directory for the restored images. It must exist.
    type: path
    required: true
  format:
    description: Format of the restored images.
    type: str
    choices: [qcow2, raw]
    default: qcow2
  disks:
    description: Disks to restore; every disk of the backup by default.
    type: list
    elements: str
  force:
    description: Replace existing images whose content differs.
    type: bool
    default: false
requirements:
  - qemu-img (Debian package qemu-utils)
attributes:
  check_mode:
    support: full
    description: Compares existing images and reports which would be written.
"""

EXAMPLES = r"""
- name: Restore web1 as of its newest backup
  fleetbackup.qemu.qemu_backup_restore:
    repository: /backup
    vm: web1
    dest: /var/lib/vms/web1-restored

- name: Restore the system disk as of a given backup, as raw
  fleetbackup.qemu.qemu_backup_restore:
    repository: /backup
    vm: web1
    backup: 20261128T020000Z-3f2a
    disks: [vda]
    format: raw
    dest: /srv/restore
"""

RETURN = r"""
backup:
  description: Name of the backup restored.
  returned: success
  type: str
  sample: 20261128T020000Z
disks:
  description: One entry per restored disk.
  returned: success
  type: list
  elements: dict
  contains:
    disk:
      description: The disk.
      type: str
      sample: vda
    image:
      description: The restored image.
      type: str
      sample: /srv/restore/vda.qcow2
    source:
      description: The top of the backup chain it was flattened from.
      type: str
      sample: /backup/web1/20261128T020000Z.vda.qcow2
    size:
      description: Virtual size in bytes.
      type: int
      sample: 10737418240
    changed:
      description: Whether this image was written.
      type: bool
      sample: true
"""

import os

from ansible_collections.fleetbackup.qemu.plugins.module_utils.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils.qemu_img import (
    check_image,
    convert_into,
    image_info,
    images_equal,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils.module_base import FleetbackupModule
from ansible_collections.fleetbackup.qemu.plugins.module_utils.private_state import create_exclusive, remove_file
from ansible_collections.fleetbackup.qemu.plugins.module_utils.repository import Repository


def main():
    module = FleetbackupModule(
        argument_spec=dict(
            repository=dict(type="path", required=True),
            vm=dict(type="str", required=True),
            backup=dict(type="str"),
            dest=dict(type="path", required=True),
            format=dict(type="str", choices=["qcow2", "raw"], default="qcow2"),
            disks=dict(type="list", elements="str"),
            force=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    module.run(restore)


def restore(module):
    params = module.params
    if not os.path.isdir(params["dest"]):
        raise UserError("dest %s is not a directory: create it first." % params["dest"])
    repository = Repository(params["repository"], params["vm"])
    backup = repository.find(repository.load_existing(), params["backup"])
    disks = _chosen_disks(backup, params["disks"])
    results = [_restore_disk(module, repository, disk) for disk in disks]
    return dict(changed=any(r["changed"] for r in results), backup=backup["name"], disks=results)


def _chosen_disks(backup, wanted):
    if not wanted:
        return backup["disks"]
    known = {d["disk"]: d for d in backup["disks"]}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise UserError("Backup %s has no disk %s; it has %s." % (backup["name"], ", ".join(unknown),
                                                                    ", ".join(known)))
    return [known[name] for name in wanted]


def _restore_disk(module, repository, disk):
    params = module.params
    source = repository.image(disk["file"])
    try:
        chain = image_info(source, chain=True)
    except Exception as err:  # pylint: disable=broad-except
        raise UserError("The backup chain of disk %s is broken at %s: %s" % (disk["disk"], source, err)) from None
    target = os.path.join(params["dest"], "%s.%s" % (disk["disk"], params["format"]))
    result = dict(disk=disk["disk"], image=target, source=source, size=chain[0]["virtual-size"], changed=False)
    if os.path.exists(target):
        if image_info(target)["format"] == params["format"] and images_equal(source, target):
            return result
        if not params["force"]:
            raise UserError("%s exists with other content: set force to replace it, or restore elsewhere." % target)
    result["changed"] = True
    if module.check_mode:
        return result
    partial = create_exclusive(params["dest"], ".%s.part-%d" % (os.path.basename(target), os.getpid()), os.O_RDWR)
    try:
        try:
            convert_into(source, partial.fd, params["format"], result["size"])
        finally:
            os.close(partial.fd)
        if params["format"] == "qcow2":
            check_image(partial.path)
        if not images_equal(source, partial.path):
            raise UserError("The restored image of disk %s differs from its backup %s." % (disk["disk"], source))
        os.rename(partial.path, target)
    finally:
        remove_file(partial.path)  # nothing is left there after the rename
    return result


if __name__ == "__main__":
    main()
