# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""A restored domain, defined in libvirt: never over a domain that no restore of the same backup defined."""

from __future__ import annotations

from xml.etree import ElementTree

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.libvirt.calls import (
    LibvirtFailure,
    call,
    connect,
    libvirt,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.libvirt.definition import (
    domain_name,
    restore_identity,
)


def define_domain(uri, xml, force, check_mode):
    """Define a restored domain; whether it had to.

    A domain of that name must not exist, unless this restore's metadata says it defined it: from the same backup
    into the same place, it is left alone; from another, it is defined again (same UUID) only with force.
    """
    connection = connect(uri)
    try:
        name = domain_name(xml)
        try:
            existing = call("Looking up domain %s" % name, connection.lookupByName, name)
        except LibvirtFailure as failure:
            if failure.code != "VIR_ERR_NO_DOMAIN":
                raise
            existing = None
        if existing is not None:
            made_by = restore_identity(call("Reading domain %s" % name, existing.XMLDesc,
                                            libvirt.VIR_DOMAIN_XML_INACTIVE))
            wanted = restore_identity(xml)
            if made_by == wanted:
                return False
            if made_by is None:
                raise UserError("libvirt at %s already has a domain %s that no restore defined: give the restored "
                                "domain another name (domain), or undefine the old one first." % (uri, name))
            if not force:
                raise UserError("Domain %s was defined by the restore of %s; this is the restore of %s. Set force to "
                                "define it again from this one." % (name, made_by, wanted))
            root = ElementTree.fromstring(xml)
            uuid = root.find("uuid")
            if uuid is None:
                uuid = ElementTree.SubElement(root, "uuid")
            uuid.text = existing.UUIDString()  # the same domain, defined anew
            xml = ElementTree.tostring(root, encoding="unicode")
        if not check_mode:
            call("Defining domain %s" % name, connection.defineXML, xml)
        return True
    finally:
        connection.close()
