#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qemu_backup_verify
short_description: Verify the backups in a repository, without their VMs
version_added: 0.1.0
description:
  - Checks every image that the chosen backups of a VM (or of every VM in the repository) need, where the
    repository is; no VM and no QEMU process is involved.
  - "For each image: it is a plain file in the VM's directory; C(qemu-img check) finds nothing wrong with it; its
    virtual size is the one recorded; an incremental image names its parent's image, as the manifest records it, as
    its backing file, with the parent's format; and its checksum, recomputed from the image alone, is the one that
    M(fleetbackup.qemu.qemu_backup_copy) recorded as it wrote the image."
  - The checksum is recomputed from the image alone, without its backing file, by a C(qemu-nbd) that the module
    starts on a socket in a private temporary directory and ends by its PID. No path that an image names is ever
    opened. The copy engine reads it, as fast as a copy (several connections, many reads in flight); the result
    gives the rate.
  - Each checksum is recomputed with the algorithm it names (C(xxh3-128-blocks64k) for new copies,
    C(sha256-blocks64k) for older ones). An image whose checksum names an algorithm that this version does not know
    is bad, not passed.
  - An image with no recorded checksum (written before checksums were recorded) is reported as unverified; the
    other checks still run.
  - It fails when an image is bad, naming each bad image and every backup that needs it (its own backup and each
    later backup of its chain).
author:
  - fleetbackup.qemu developers (@fleetbackup)
extends_documentation_fragment:
  - fleetbackup.qemu.repository
  - fleetbackup.qemu.repository.link
  - fleetbackup.qemu.encryption
options:
  vm:
    description: The VM whose backups to verify, its subdirectory in the repository; a plain file name. Every VM that
      has a manifest in the repository by default.
    type: str
    required: false
  backups:
    description:
      - Names of the backups to verify, with every image they need; all of them by default.
      - Only with O(vm).
    type: list
    elements: str
requirements:
  - qemu-img and qemu-nbd (Debian package qemu-utils)
  - libnbd's Python bindings (Debian package python3-libnbd)
  - the xxhash bindings (Debian package python3-xxhash), for images whose checksum is xxh3-128, which copies record since 0.1.0
seealso:
  - module: fleetbackup.qemu.qemu_backup_copy
  - module: fleetbackup.qemu.qemu_backup_repository
attributes:
  check_mode:
    support: full
    description: It only reads, in check mode too, and does the same checks.
"""

EXAMPLES = r"""
- name: Verify every backup of web1
  fleetbackup.qemu.qemu_backup_verify:
    repository: /backup
    vm: web1

- name: Verify the whole repository
  fleetbackup.qemu.qemu_backup_verify:
    repository: /backup

- name: Verify the newest backup of web1 and every image it needs
  fleetbackup.qemu.qemu_backup_verify:
    repository: /backup
    vm: web1
    backups: [20261130T020001Z-3f2a]
"""

RETURN = r"""
repository:
  description: The repository, where it really is (after a link the module was let to follow).
  returned: always
  type: str
  sample: /backup
vms:
  description: Per VM, each backup checked.
  returned: always
  type: list
  elements: dict
  contains:
    vm:
      description: The VM's name.
      type: str
    backups:
      description:
        - Per backup, C(name), C(state) and C(problems). C(state) is C(ok), C(bad) (an image it needs is bad; the
          problems say which and why) or C(unverified) (an image it needs has no recorded checksum).
      type: list
      elements: dict
    bad_images:
      description: The bad images of this VM, as in RV(bad_images).
      type: list
      elements: dict
    unverified_images:
      description: Images that passed every other check but have no recorded checksum.
      type: list
      elements: str
    images_checked:
      description: How many images were checked.
      type: int
    bytes_read:
      description: The bytes of data read from this VM's images to recompute their checksums.
      type: int
    read_seconds:
      description: The seconds those reads took.
      type: float
    read_rate:
      description: RV(vms[].bytes_read) per second.
      type: int
bytes_read:
  description: The bytes of data read from all images checked to recompute their checksums (holes are not read).
  returned: always
  type: int
  sample: 2147483648
read_seconds:
  description: The seconds those reads took, the images read one after another.
  returned: always
  type: float
  sample: 1.52
read_rate:
  description: The rate of those reads, RV(bytes_read) per second; 0 when nothing was read.
  returned: always
  type: int
  sample: 1412818083
bad_images:
  description: Every bad image.
  returned: always
  type: list
  elements: dict
  contains:
    vm:
      description: Its VM.
      type: str
    image:
      description: Its file name in the VM's directory.
      type: str
    backup:
      description: The backup it belongs to.
      type: str
    disk:
      description: Its disk.
      type: str
    problems:
      description: What is wrong with it.
      type: list
      elements: str
    dependents:
      description: The backups that need it, its own first, and every later backup whose chain runs through it.
      type: list
      elements: str
  sample:
    - vm: web1
      image: 20261130T020001Z-3f2a.vda.qcow2
      backup: 20261130T020001Z-3f2a
      disk: vda
      problems: ["its data has checksum xxh3-128-blocks64k:9c1e..., not xxh3-128-blocks64k:3f2a... as recorded ..."]
      dependents: [20261130T020001Z-3f2a, 20261130T030001Z-77c0]
msg:
  description: What was found, in one line.
  returned: always
  type: str
"""

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.encryption import encryption_from
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.module_base import FleetbackupModule
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.options import (
    ENCRYPTION_ARGUMENT_SPEC,
    REPOSITORY_ARGUMENT_SPEC,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import shown_paths
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.repository import Repository, RepositoryRoot
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.verify import read_totals, verify_vm


def main():
    module = FleetbackupModule(
        argument_spec=dict(
            REPOSITORY_ARGUMENT_SPEC,
            vm=dict(type="str"),
            backups=dict(type="list", elements="str"),
            **ENCRYPTION_ARGUMENT_SPEC,
        ),
        required_by=dict(backups="vm"),
        needs_nbd=True,  # xxhash only for images that record xxh3: check_image() asks for it there
        supports_check_mode=True,
    )
    module.run(verify)


def verify(module):
    params = module.params
    root = RepositoryRoot(params["repository"], params["follow_repository_link"])
    names = [params["vm"]] if params["vm"] else root.vm_names()
    encryption = encryption_from(params["encryption"])
    reports = []
    for name in names:
        # One VM's directory open at a time; its paths shown before its descriptor goes.
        with Repository(root, name, params["follow_repository_link"]) as repository:
            reports.append(shown_paths(verify_vm(repository, params["backups"], encryption)))
    bad = [dict(image, vm=report["vm"]) for report in reports for image in report["bad_images"]]
    unverified = sum(len(report["unverified_images"]) for report in reports)
    checked = sum(report["images_checked"] for report in reports)
    totals = read_totals([(report["bytes_read"], report["read_seconds"]) for report in reports])
    result = dict(changed=False, repository=root.path, vms=reports, bad_images=bad, **totals)
    if bad:
        result.update(failed=True, msg="%d of the %d images checked are bad: %s." % (len(bad), checked, "; ".join(
            "%s/%s (%s), needed by %s" % (image["vm"], image["image"], "; ".join(image["problems"]),
                                          ", ".join(image["dependents"])) for image in bad)))
    else:
        vms = "1 VM" if len(reports) == 1 else "%d VMs" % len(reports)
        result["msg"] = "%d images of %s checked: all good%s%s." % (checked, vms, (
            "; %d have no recorded checksum (written by an older copy), so their content could not be verified"
            % unverified) if unverified else "", "; %.1f MiB of data read at %.0f MiB/s" % (
            totals["bytes_read"] / 1024 ** 2, totals["read_rate"] / 1024 ** 2) if totals["bytes_read"] else "")
    if unverified:
        module.warn("%d images have no recorded checksum: their content could not be verified (they were written "
                    "before checksums were recorded)." % unverified)
    return result


if __name__ == "__main__":
    main()
