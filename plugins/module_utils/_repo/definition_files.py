# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The files a backup of a libvirt domain keeps beside its images: the domain's XML and its UEFI variables."""

from __future__ import annotations

import base64
import hashlib

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError


def definition_file_names(name):
    """(domain XML, NVRAM): the files a backup of a libvirt domain keeps beside its images."""
    return "%s.domain.xml" % name, "%s.nvram" % name


def definition_files(backup):
    """The files of a recorded backup besides its images."""
    definition = backup.get("definition") or {}
    return [name for name in (definition.get("domain_xml"), (definition.get("nvram") or {}).get("file")) if name]


def store_definition(repository, name, definition):
    """Write a libvirt backup's definition (RV backup.libvirt of the start) beside its images.

    The manifest entry's part: the files, the checkpoint's XML, and what the backup could not keep.
    """
    if not isinstance(definition.get("domain_xml"), str) or not isinstance(definition.get("nvram") or {}, dict):
        raise UserError("definition must be the libvirt part of qemu_backup_start's result (backup.libvirt), with "
                        "its domain_xml.")
    xml_file, nvram_file = definition_file_names(name)
    stored = dict(domain_xml=repository.write_file(xml_file, definition["domain_xml"].encode()),
                  checkpoint_xml=definition.get("checkpoint_xml"), nvram=None,
                  not_backed_up=definition.get("not_backed_up") or [])
    nvram = definition.get("nvram")
    if nvram:
        try:
            content = base64.b64decode(nvram["content"], validate=True)
        except (KeyError, ValueError, TypeError):
            content = None
        if content is None or hashlib.sha256(content).hexdigest() != nvram.get("sha256"):
            raise UserError("The NVRAM of backup %s does not match its checksum: it was damaged on its way; run the "
                            "backup again." % name)
        stored["nvram"] = dict(file=repository.write_file(nvram_file, content), path=nvram["path"],
                               sha256=nvram["sha256"])
    return stored
