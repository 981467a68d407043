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
  - A backup of a libvirt domain also gives back the domain's definition, C(<dest>/domain.xml), pointing at the
    restored images, and its UEFI variables, C(<dest>/nvram.fd). With O(define_domain), the module defines the
    restored domain in libvirt (O(libvirt_uri)). Under a new name (O(domain)) it gets a new UUID and new MAC
    addresses, so it can run beside the original; disks that were not restored are left out of it.
author:
  - fleetbackup.qemu developers (@fleetbackup)
extends_documentation_fragment:
  - fleetbackup.qemu.repository
  - fleetbackup.qemu.repository.link
  - fleetbackup.qemu.encryption
options:
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
  define_domain:
    description:
      - Define the restored domain in libvirt from the backup's domain XML. Only for backups of libvirt domains.
      - A domain of that name must not exist yet, unless a restore defined it (its metadata says which). The same
        restore again changes nothing; a restore of another backup into that domain needs O(force).
      - The XML comes from the repository, which others may be able to write, and libvirt acts on it as root. So
        the restored domain keeps only what touches nothing of the host. Its disks become the restored images,
        firmware comes only from the host's firmware directories, and host devices, direct kernel boot, scripts,
        emulator and QEMU command-line passthrough are left out (listed in RV(domain.left_out)).
    type: bool
    default: false
  domain:
    description: Name of the restored domain; the backed-up domain's name by default.
    type: str
  firmware_dirs:
    description:
      - With a libvirt backup, the directories from which the restored domain may take its firmware and its UEFI
        variables' template; a firmware elsewhere is left out. The distribution's own by default.
    type: list
    elements: path
    default: [/usr/share/OVMF, /usr/share/qemu, /usr/share/seabios, /usr/share/AAVMF]
  libvirt_uri:
    description: libvirt's connection URI, with O(define_domain).
    type: str
    default: qemu:///system
    aliases: [uri]
requirements:
  - qemu-img (Debian package qemu-utils)
  - With O(define_domain), libvirt's Python bindings (Debian package python3-libvirt)
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

- name: Restore the libvirt domain web1 as web1-drill, defined and ready to start beside web1
  fleetbackup.qemu.qemu_backup_restore:
    repository: /backup
    vm: web1
    dest: /var/lib/libvirt/images/web1-drill
    define_domain: true
    domain: web1-drill
"""

RETURN = r"""
backup:
  description: Name of the backup restored.
  returned: success
  type: str
  sample: 20261128T020000Z
directory:
  description: The VM's directory in the repository, where it really is (after a link the module was let to follow).
  returned: success
  type: str
  sample: /backup/web1
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
domain:
  description: For a backup of a libvirt domain, its restored definition; else null.
  returned: success
  type: dict
  contains:
    name:
      description: The restored domain's name.
      type: str
      sample: web1-drill
    xml:
      description: The file holding its XML.
      type: str
      sample: /var/lib/libvirt/images/web1-drill/domain.xml
    nvram:
      description: The file holding its UEFI variables, or null.
      type: str
      sample: /var/lib/libvirt/images/web1-drill/nvram.fd
    defined:
      description: Whether this run defined it in libvirt.
      type: bool
      sample: true
    left_out:
      description: What the restored domain does not get back (disks not restored, a vTPM's state).
      type: list
      elements: str
      sample: ["the vTPM's state: swtpm keeps it outside the domain's disks"]
"""

import os

from ansible.module_utils.basic import missing_required_lib

from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.libvirt.definition import (
    FIRMWARE_DIRECTORIES,
    domain_name,
    restored_domain_xml,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.libvirt.calls import (
    HAS_LIBVIRT,
    LIBVIRT_IMPORT_ERROR,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.libvirt.define import define_domain
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.qemu_img import (
    SecretError,
    check_image,
    convert_into,
    image_info,
    images_equal,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.encryption import encryption_from
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.module_base import FleetbackupModule
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.options import (
    ENCRYPTION_ARGUMENT_SPEC,
    REPOSITORY_ARGUMENT_SPEC,
    VM_ARGUMENT_SPEC,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import (
    create_exclusive,
    read_regular_file,
    remove_file,
    write_atomic,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.images import (
    partial_name,
    publish,
    remove_stale_partials,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.repository import Repository
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.disks import named_disks


DOMAIN_XML_FILE = "domain.xml"
NVRAM_FILE = "nvram.fd"


def main():
    module = FleetbackupModule(
        argument_spec=dict(
            **REPOSITORY_ARGUMENT_SPEC,
            backup=dict(type="str"),
            dest=dict(type="path", required=True),
            format=dict(type="str", choices=["qcow2", "raw"], default="qcow2"),
            disks=dict(type="list", elements="str"),
            force=dict(type="bool", default=False),
            define_domain=dict(type="bool", default=False),
            domain=dict(type="str"),
            libvirt_uri=VM_ARGUMENT_SPEC["libvirt_uri"],
            firmware_dirs=dict(type="list", elements="path", default=FIRMWARE_DIRECTORIES),
            **ENCRYPTION_ARGUMENT_SPEC,
        ),
        supports_check_mode=True,
    )
    if module.params["define_domain"] and not HAS_LIBVIRT:
        module.fail_json(msg=missing_required_lib("libvirt's Python bindings (Debian: apt install python3-libvirt)"),
                         exception=str(LIBVIRT_IMPORT_ERROR))
    module.run(restore)


def restore(module):
    params = module.params
    if not os.path.isdir(params["dest"]):
        raise UserError("dest %s is not a directory: create it first." % params["dest"])
    repository = Repository(params["repository"], params["vm"], params["follow_repository_link"])
    backup = repository.recorded(params["backup"])
    disks = _chosen_disks(backup, params["disks"])
    definition = backup.get("definition")
    if params["define_domain"] and not definition:
        raise UserError("Backup %s of %s holds no libvirt domain definition (a QMP VM's, or an older backup): "
                        "leave out define_domain." % (backup["name"], params["vm"]))
    results = [_restore_disk(module, repository, disk) for disk in disks]
    domain = _restore_definition(module, repository, backup["name"], definition, results) if definition else None
    changed = any(r["changed"] for r in results) or bool(domain and domain.pop("changed"))
    return dict(changed=changed, backup=backup["name"], directory=repository.path, disks=results, domain=domain)


def _restore_definition(module, repository, backup_name, definition, results):
    """Write the restored domain's XML and UEFI variables into dest; define it with define_domain."""
    params = module.params
    original = repository.read_file(definition["domain_xml"]).decode()
    nvram = definition.get("nvram")
    nvram_path = os.path.join(params["dest"], NVRAM_FILE) if nvram else None
    images = {r["disk"]: (r["image"], params["format"]) for r in results}
    identity = dict(repository=os.path.abspath(params["repository"]), vm=params["vm"], backup=backup_name,
                    dest=os.path.abspath(params["dest"]))
    xml, left_out = restored_domain_xml(original, params["domain"] or domain_name(original), images, nvram_path,
                                        identity, params["firmware_dirs"])
    changed = False
    if nvram:
        changed |= _write_if_different(module, nvram_path, repository.nvram(definition))
    xml_path = os.path.join(params["dest"], DOMAIN_XML_FILE)
    changed |= _write_if_different(module, xml_path, xml.encode())
    defined = params["define_domain"] and define_domain(params["libvirt_uri"], xml, params["force"], module.check_mode)
    return dict(name=domain_name(xml), xml=xml_path, nvram=nvram_path, defined=bool(defined),
                left_out=definition.get("not_backed_up", []) + left_out, changed=changed or bool(defined))


def _write_if_different(module, path, content):
    """Put content at path (0600, through a fresh file renamed into place); whether it had to."""
    existing = read_regular_file(path, "The restored file", missing_ok=True)
    if existing == content:
        return False
    if existing is not None and not module.params["force"]:
        raise UserError("%s exists with other content: set force to replace it, or restore elsewhere." % path)
    if not module.check_mode:
        write_atomic(os.path.dirname(path), os.path.basename(path), content)
    return True


def _chosen_disks(backup, wanted):
    chosen, unknown = named_disks(backup["disks"], wanted, lambda disk: (disk["disk"],), lambda disk: True)
    if unknown:
        raise UserError("Backup %s has no disk %s; it has %s."
                        % (backup["name"], ", ".join(unknown), ", ".join(d["disk"] for d in backup["disks"])))
    return chosen


def _restore_disk(module, repository, disk):
    params = module.params
    source = repository.image(disk["file"])
    chain = repository.chain(disk)
    target = os.path.join(params["dest"], "%s.%s" % (disk["disk"], params["format"]))
    result = dict(disk=disk["disk"], image=target, source=source, size=chain[0]["virtual-size"], changed=False)
    encryption = encryption_from(params["encryption"])
    if os.path.exists(target):
        if image_info(target)["format"] == params["format"] and images_equal(source, target, encryption):
            return result
        if not params["force"]:
            raise UserError("%s exists with other content: set force to replace it, or restore elsewhere." % target)
    result["changed"] = True
    if module.check_mode:
        return result
    try:
        _write_restored(params, disk["disk"], source, target, result["size"], encryption)
    except SecretError as err:
        raise err.of(source) from None
    return result


def _write_restored(params, disk_name, source, target, size, encryption):
    """Flatten source's chain into target through a partial file, checked before it is renamed into place."""
    remove_stale_partials(params["dest"])  # a restore killed here before left its partial
    partial = create_exclusive(params["dest"], partial_name(target), os.O_RDWR)
    try:
        try:
            convert_into(source, partial.fd, params["format"], size, encryption)
        finally:
            os.close(partial.fd)
        if params["format"] == "qcow2":
            check_image(partial.path)
        if not images_equal(source, partial.path, encryption):
            raise UserError("The restored image of disk %s differs from its backup %s." % (disk_name, source))
        publish(partial.path, target)
    except BaseException:
        remove_file(partial.path)  # ours: made above, and not yet renamed
        raise


if __name__ == "__main__":
    main()
