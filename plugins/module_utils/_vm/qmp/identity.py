# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Who a QMP VM is: the name and UUID its QEMU reports, and the key of its private state."""

from __future__ import annotations

import hashlib
import os


NO_UUID = "00000000-0000-0000-0000-000000000000"


def qmp_vm_identity(client, socket_path):
    """(name, uuid) a running QEMU reports: its -name, else its socket's directory; its -uuid, else None."""
    name = client.execute("query-name").get("name")
    uuid = client.execute("query-uuid")["UUID"]
    return name or os.path.basename(os.path.dirname(os.path.abspath(socket_path))), (
        None if uuid == NO_UUID else uuid)


def qmp_vm_key(qmp_socket):
    """The private-state key of the VM behind a QMP socket."""
    return "qmp-" + hashlib.sha256(os.path.realpath(qmp_socket).encode()).hexdigest()[:12]
