# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The one factory of views: by the kind a start recorded, and the view the connection says ends that kind."""

from __future__ import annotations

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.fleecing import FleecingView
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.fleecing_teardown import EndedFleecing
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.libvirt_pull import LibvirtPull
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.offline_export import OfflineExport
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.connection import ENDED_FLEECING_VIEW, FLEECING_VIEW, LIBVIRT_PULL_VIEW, OFFLINE_EXPORT_VIEW

VIEWS = {FLEECING_VIEW: FleecingView, ENDED_FLEECING_VIEW: EndedFleecing, LIBVIRT_PULL_VIEW: LibvirtPull,
         OFFLINE_EXPORT_VIEW: OfflineExport}


def view_of(vm, record):
    """The view that ends a backup: for the kind its start recorded, else the VM manager's own (first of vm.views),
    which finds a backup by its id alone. Records made before views had kinds are the manager's too."""
    kind = (record or {}).get("kind") or next(iter(vm.views))
    if kind not in vm.views:
        raise UserError("Backup %s of %s is a %s backup, which nothing reaching %s now can end: stop it with the "
                        "fleetbackup version that started it." % (record["backup_id"], vm.description, kind,
                                                                  vm.description))
    return VIEWS[vm.views[kind]](vm)


def new_view(vm):
    """The view a start makes now on this connection."""
    return VIEWS[vm.views[vm.new_view]](vm)
